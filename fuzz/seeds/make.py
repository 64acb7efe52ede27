#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (real messages and frames, in each target's
framing) into fuzz/seeds/<target>/. Run from anywhere: python3 fuzz/seeds/make.py"""
import os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = HERE

GUEST = bytes.fromhex("525400000001")
GW = bytes.fromhex("525400aabbcc")
UPLINK = bytes.fromhex("525400aabbdd")
NEXT_HOP = bytes.fromhex("5254000000fe")


def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF


def bootp(kind, mac, extra=b""):
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234, 0, 0x8000, bytes(4),
                       bytes(4), bytes(4), bytes(4), mac + bytes(10), bytes(64), bytes(128))
    return head + b"\x63\x82\x53\x63" + bytes([53, 1, kind]) + extra + b"\xff"


def dns_query(qid, name, qtype=1):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def ipv4(src, dst, proto, payload, ttl=64, ident=1, frag=0):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, ttl, proto, 0,
                    bytes(src), bytes(dst))
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + payload


def udp(src, dst, sport, dport, payload):
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def tcp_syn(src, dst, sport, dport, flags=0x02):
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)
    return ipv4(src, dst, 6, seg)


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op, sha, spa, tha, tpa):
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, bytes(spa), tha, bytes(tpa))


GUEST_IP, GW_IP = [192, 168, 122, 10], [192, 168, 122, 1]
EXT_IP, REMOTE_IP = [203, 0, 113, 2], [203, 0, 113, 1]


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def framed(*parts):
    # [a][b][len][bytes] per message, as each target reads them
    return b"".join(bytes([a, b, min(len(p), 255)]) + p[:255] for a, b, p in parts)


# DHCP: DORA, then renew and release.
d = bootp(1, GUEST)
r = bootp(3, GUEST, bytes([50, 4]) + bytes([192, 168, 122, 10]) + bytes([54, 4]) + bytes(GW_IP))
write("dhcp", "dora", framed((0, 1, d), (0, 1, r)))
write("dhcp", "release", framed((0, 1, d), (0, 1, r), (1, 1, bootp(7, GUEST))))
write("dhcp", "decline", framed((0, 2, d), (0, 2, bootp(4, GUEST, bytes([50, 4, 192, 168, 122, 10])))))

# DNS: local names, a forwarded name and its upstream answer, TCP.
q = dns_query(7, "printer.lab")
fwd = dns_query(8, "www.example.test")
ans = struct.pack("!HHHHHH", 8, 0x8180, 1, 1, 0, 0) + fwd[12:] + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes(REMOTE_IP)
write("dns", "local", framed((0, 0, q), (0, 0, dns_query(9, "guest1")), (2, 0, dns_query(10, "10.122.168.192.in-addr.arpa", 12))))
write("dns", "forward", framed((0, 0, fwd), (1, 1, ans), (0, 0, fwd)))
write("dns", "compression-loop", framed((0, 0, struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01")))

# Engine: ARP, DHCP, ping to the gateway, a TCP handshake through NAT, an ICMP error back,
# fragments, a next hop answering ARP.
who_has_gw = eth(b"\xff" * 6, GUEST, 0x0806, arp(1, GUEST, GUEST_IP, bytes(6), GW_IP))
discover = eth(b"\xff" * 6, GUEST, 0x0800, udp([0] * 4, [255] * 4, 68, 67, bootp(1, GUEST)))
echo = eth(GW, GUEST, 0x0800, ipv4(GUEST_IP, GW_IP, 1, struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"))
syn = eth(GW, GUEST, 0x0800, tcp_syn(GUEST_IP, REMOTE_IP, 40000, 80))
next_hop = eth(UPLINK, NEXT_HOP, 0x0806, arp(2, NEXT_HOP, REMOTE_IP, UPLINK, EXT_IP))
synack = eth(UPLINK, NEXT_HOP, 0x0800, tcp_syn(REMOTE_IP, EXT_IP, 80, 40000, 0x12))
quoted = tcp_syn(EXT_IP, REMOTE_IP, 40000, 80)[:28]
icmp_err = eth(UPLINK, NEXT_HOP, 0x0800, ipv4(REMOTE_IP, EXT_IP, 1, struct.pack("!BBHI", 3, 3, 0, 0) + quoted))
frag1 = eth(GW, GUEST, 0x0800, ipv4(GUEST_IP, REMOTE_IP, 17, struct.pack("!HHHH", 5000, 53, 1000, 0) + bytes(64), ident=9, frag=0x2000))
frag2 = eth(GW, GUEST, 0x0800, ipv4(GUEST_IP, REMOTE_IP, 17, bytes(64), ident=9, frag=9))
# The engine target's first byte picks its mode: 0 packet NAT; odd: socket NAT (bit 1
# host-loopback, bit 2 clean-traffic).
PACKET, SOCKETS, GUARDED = b"\x00", b"\x07", b"\x05"
write("engine", "arp-dhcp-ping", PACKET + framed((0, 0, who_has_gw), (0, 0, discover), (0, 0, echo)))
write("engine", "nat-handshake", PACKET + framed((0, 0, syn), (3, 4, next_hop), (3, 4, synack), (3, 4, icmp_err)))
ack_out_e = eth(GW, GUEST, 0x0800, tcp_syn(GUEST_IP, REMOTE_IP, 40000, 80, 0x10))
ack_in_e = eth(UPLINK, NEXT_HOP, 0x0800, tcp_syn(REMOTE_IP, EXT_IP, 80, 40000, 0x10))
fin_out_e = eth(GW, GUEST, 0x0800, tcp_syn(GUEST_IP, REMOTE_IP, 40000, 80, 0x11))
udp_q = eth(GW, GUEST, 0x0800, udp(GUEST_IP, REMOTE_IP, 5353, 53, b"q"))
udp_a = eth(UPLINK, NEXT_HOP, 0x0800, udp(REMOTE_IP, EXT_IP, 53, 5353, b"a"))
write("engine", "nat-established", PACKET + framed((0, 0, syn), (3, 4, next_hop), (3, 4, synack),
      (0, 4, ack_out_e), (3, 4, ack_in_e), (0, 4, ack_out_e), (0, 4, fin_out_e), (3, 4, ack_in_e),
      (0, 4, udp_q), (3, 4, udp_a), (0, 4, udp_q)))
write("engine", "fragments", PACKET + framed((0, 0, frag1), (0, 4, frag2), (3, 4, next_hop)))
udp_out = eth(GW, GUEST, 0x0800, ipv4(GUEST_IP, REMOTE_IP, 17, struct.pack("!HHHH", 5000, 53, 12, 0) + b"abcd"))
write("engine", "socket-nat", SOCKETS + framed((0, 0, who_has_gw), (0, 0, syn), (0, 4, echo), (0, 4, udp_out), (0, 4, syn)))
write("engine", "guarded", GUARDED + framed((0, 0, discover), (0, 0, who_has_gw), (1, 0, syn), (0, 4, udp_out)))

# NAT's fast path: [flags][frame]; flags bit 3 set = from the uplink, bits 0-1 GSO, bit 2
# partial checksum. The target publishes guest :40000 -> remote :80 (TCP) and :5353 -> :53
# (UDP); the NAT keeps the guest's ports.
ack_out = eth(GW, GUEST, 0x0800, tcp_syn(GUEST_IP, REMOTE_IP, 40000, 80, 0x10))
ack_in = eth(UPLINK, NEXT_HOP, 0x0800, tcp_syn(REMOTE_IP, EXT_IP, 80, 40000, 0x10))
dns_out = eth(GW, GUEST, 0x0800, udp(GUEST_IP, REMOTE_IP, 5353, 53, b"q"))
dns_in = eth(UPLINK, NEXT_HOP, 0x0800, udp(REMOTE_IP, EXT_IP, 53, 5353, b"a"))
write("nat_fast", "tcp-out", b"\x00" + ack_out)
write("nat_fast", "tcp-in", b"\x08" + ack_in)
write("nat_fast", "tcp-out-tso-partial", b"\x05" + ack_out)
write("nat_fast", "udp-out", b"\x00" + dns_out)
write("nat_fast", "udp-in", b"\x08" + dns_in)
write("nat_fast", "fin-out", b"\x00" + eth(GW, GUEST, 0x0800, tcp_syn(GUEST_IP, REMOTE_IP, 40000, 80, 0x11)))
