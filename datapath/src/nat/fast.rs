//! Packet NAT as a fast-path worker runs it: the data packets of connections the engine
//! published in the [`NatMirror`], translated in place with the same rewrites as
//! [`super::Nat`], and nothing else.
//!
//! A frame qualifies only if the engine would do nothing with it but translate it: untagged
//! IPv4 for the right MAC (the uplink's coming in, checked here; the gateway's going out,
//! checked by the worker with the rest of the switch's checks), from the MAC the connection
//! was published with, a header that
//! checks, not a fragment, a TTL that survives the hop, no larger than the egress takes
//! (else the engine sends the ICMP error), TCP without SYN, FIN or RST or UDP, and a
//! published connection. Anything else leaves the frame untouched for the engine. Because
//! the checks all come before the first write, a frame is either translated whole or not
//! touched.

use super::Dir;
use super::mirror::NatMirror;
use super::packet::{self, End, Kind, Layout, TCP_FIN, TCP_RST, TCP_SYN, Tuple};
use crate::port::PortId;
use crate::wire::ethernet::HEADER_LEN;
use crate::wire::ipv4::{Ipv4Packet, PROTO_TCP, PROTO_UDP};
use crate::wire::{MacAddr, VnetHdr, vnet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

/// What a fast-path worker needs to translate an established connection's packets itself
/// (`Engine::nat_mirror`).
#[derive(Debug, Clone)]
pub struct NatFastPath {
    pub mirror: Arc<NatMirror>,
    pub uplink: PortId,
    pub uplink_mac: MacAddr,
    pub uplink_mtu: u16,
    pub external: Ipv4Addr,
    pub gateway_mac: MacAddr,
    /// The guests' MTU (an inbound packet larger than it is the engine's to answer).
    pub guest_mtu: u16,
}

impl NatFastPath {
    /// A guest's frame for the gateway's MAC: translated in place for the uplink, next hop's
    /// MAC and all, if it is a data packet of a published connection; false (and untouched)
    /// if not.
    pub fn outward(&self, now: Instant, hdr: &VnetHdr, frame: &mut [u8]) -> bool {
        let Some((total, tuple, layout)) = data_packet(hdr, frame, self.uplink_mtu, None) else {
            return false;
        };
        let Some((to, found)) = self.mirror.lookup(Dir::Out, &tuple) else {
            return false;
        };
        if frame[6..12] != to.guest.0 {
            // The guest changed its MAC: the engine follows it, the way back included.
            return false;
        }
        let ip = &mut frame[HEADER_LEN..HEADER_LEN + total];
        let partial = hdr.needs_csum();
        packet::rewrite_addr(ip, End::Src, to.ip, Some(&layout), partial);
        packet::rewrite_port(ip, End::Src, to.port, &layout, partial);
        packet::decrement_ttl(ip);
        frame[0..6].copy_from_slice(&to.mac.0);
        frame[6..12].copy_from_slice(&self.uplink_mac.0);
        self.mirror.tally(now, found, total);
        true
    }

    /// A frame from the uplink: translated in place for its guest if it is a data packet of
    /// a published connection and `deliver` takes the guest's MAC to where it goes (a frame
    /// it cannot place is left untouched, for the engine).
    pub fn inward<T>(
        &self,
        now: Instant,
        hdr: &VnetHdr,
        frame: &mut [u8],
        deliver: impl FnOnce(MacAddr) -> Option<T>,
    ) -> Option<T> {
        // UDP super-frames are for guests whose taps take them: the engine knows which.
        if hdr.is_gso() && hdr.gso_type & !vnet::gso::ECN != vnet::gso::TCPV4 {
            return None;
        }
        if frame.get(0..6)? != self.uplink_mac.0 {
            return None;
        }
        let (total, tuple, layout) = data_packet(hdr, frame, self.guest_mtu, Some(self.external))?;
        let (to, found) = self.mirror.lookup(Dir::In, &tuple)?;
        let delivered = deliver(to.mac)?;
        let ip = &mut frame[HEADER_LEN..HEADER_LEN + total];
        let partial = hdr.needs_csum();
        packet::rewrite_addr(ip, End::Dst, to.ip, Some(&layout), partial);
        packet::rewrite_port(ip, End::Dst, to.port, &layout, partial);
        packet::decrement_ttl(ip);
        frame[0..6].copy_from_slice(&to.mac.0);
        frame[6..12].copy_from_slice(&self.gateway_mac.0);
        self.mirror.tally(now, found, total);
        Some(delivered)
    }
}

/// The IPv4 packet in `frame` (Ethernet, untagged) if it is one a worker may translate: its
/// total length, tuple and layout. `dst`: the address it must be for.
fn data_packet(
    hdr: &VnetHdr,
    frame: &[u8],
    mtu: u16,
    dst: Option<Ipv4Addr>,
) -> Option<(usize, Tuple, Layout)> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[HEADER_LEN..]).ok()?;
    if !ip.header_checksum_ok()
        || ip.is_fragment()
        || ip.ttl() <= 1
        || dst.is_some_and(|d| d != ip.dst())
    {
        return None;
    }
    let (total, ihl) = (ip.total_len(), ip.header_len());
    let ip = &frame[HEADER_LEN..HEADER_LEN + total];
    if hdr.largest_packet(ip) > usize::from(mtu) {
        return None;
    }
    let (tuple, Kind::Flow { tcp_flags }, layout) = packet::classify(ip, ihl)? else {
        return None;
    };
    let data = match tuple.proto {
        PROTO_TCP => tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0,
        PROTO_UDP => true,
        _ => false,
    };
    data.then_some((total, tuple, layout))
}

#[cfg(test)]
mod tests {
    use super::super::packet::fixtures::{checksums_ok, tcp, udp};
    use super::super::packet::{TCP_ACK, TCP_FIN, TCP_SYN};
    use super::super::{Nat, NatConfig};
    use super::*;

    const GUEST: [u8; 4] = [192, 168, 122, 10];
    const REMOTE: [u8; 4] = [203, 0, 113, 1];
    const EXT: [u8; 4] = [203, 0, 113, 2];
    const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x10]);
    const GATEWAY_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x01]);
    const UPLINK_MAC: MacAddr = MacAddr([0x02, 0x53, 0, 0, 0, 0x02]);
    const ROUTER_MAC: MacAddr = MacAddr([0x02, 0x99, 0, 0, 0, 0x01]);

    fn eth(dst: MacAddr, src: MacAddr, ip: &[u8]) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(ip);
        f
    }

    fn setup() -> (Nat, NatFastPath, Instant) {
        let config = NatConfig::new(Ipv4Addr::new(192, 168, 122, 1), 24, Ipv4Addr::from(EXT));
        let mut nat = Nat::new(config);
        let fast = NatFastPath {
            mirror: nat.mirror(),
            uplink: PortId(0),
            uplink_mac: UPLINK_MAC,
            uplink_mtu: 1500,
            external: Ipv4Addr::from(EXT),
            gateway_mac: GATEWAY_MAC,
            guest_mtu: 1500,
        };
        (nat, fast, Instant::now())
    }

    /// The engine's way out: NAT, TTL, MACs; and what it publishes.
    fn engine_out(nat: &mut Nat, t: Instant, ip: &[u8]) -> Vec<u8> {
        let mut p = ip.to_vec();
        let out = nat.handle_outbound(t, &mut p, GUEST_MAC, false).unwrap();
        packet::decrement_ttl(&mut p);
        nat.publish(&out, ROUTER_MAC);
        eth(ROUTER_MAC, UPLINK_MAC, &p)
    }

    fn engine_in(nat: &mut Nat, t: Instant, ip: &[u8]) -> Vec<u8> {
        let mut p = ip.to_vec();
        let mac = nat.handle_inbound(t, &mut p, false).unwrap();
        packet::decrement_ttl(&mut p);
        eth(mac, GATEWAY_MAC, &p)
    }

    /// Opens guest:40000 -> remote:80 through the engine's NAT; returns the external port.
    fn handshake(nat: &mut Nat, t: Instant) -> u16 {
        let syn = engine_out(nat, t, &tcp(GUEST, 40000, REMOTE, 80, TCP_SYN));
        let port = u16::from_be_bytes([syn[HEADER_LEN + 20], syn[HEADER_LEN + 21]]);
        engine_in(nat, t, &tcp(REMOTE, 80, EXT, port, TCP_SYN | TCP_ACK));
        engine_out(nat, t, &tcp(GUEST, 40000, REMOTE, 80, TCP_ACK));
        port
    }

    // The worker's translation is the engine's, byte for byte (RFC 1624 incremental
    // checksums, RFC 1812 5.3.1 TTL), in both directions, once the engine has published the
    // connection (RFC 5382 5: established).
    #[test]
    fn translates_established_tcp_as_the_engine_does_both_ways() {
        let (mut nat, fast, t) = setup();
        let hdr = VnetHdr::default();
        let port = handshake(&mut nat, t);

        let data = tcp(GUEST, 40000, REMOTE, 80, TCP_ACK);
        let mut by_worker = eth(GATEWAY_MAC, GUEST_MAC, &data);
        assert!(fast.outward(t, &hdr, &mut by_worker));
        assert_eq!(by_worker, engine_out(&mut nat, t, &data));
        assert!(checksums_ok(&by_worker[HEADER_LEN..]));

        let reply = tcp(REMOTE, 80, EXT, port, TCP_ACK);
        let mut by_worker = eth(UPLINK_MAC, ROUTER_MAC, &reply);
        assert_eq!(fast.inward(t, &hdr, &mut by_worker, Some), Some(GUEST_MAC));
        assert_eq!(by_worker, engine_in(&mut nat, t, &reply));

        // What the worker translated shows in conntrack's counts.
        let row = &nat.rows(t)[0];
        assert_eq!(
            row.packets,
            [4, 3],
            "3 by the engine and 1 by the worker out, 2 + 1 in"
        );
    }

    // RFC 5382 5: the handshake and the close are the engine's to follow; so are new
    // connections, and anything it has not published.
    #[test]
    fn leaves_handshakes_closes_and_unknown_connections_to_the_engine() {
        let (mut nat, fast, t) = setup();
        let hdr = VnetHdr::default();
        let syn = tcp(GUEST, 40000, REMOTE, 80, TCP_SYN);
        let mut f = eth(GATEWAY_MAC, GUEST_MAC, &syn);
        let before = f.clone();
        assert!(!fast.outward(t, &hdr, &mut f), "not published yet");
        assert_eq!(f, before, "untouched");
        handshake(&mut nat, t);
        for flags in [TCP_SYN, TCP_FIN | TCP_ACK, packet::TCP_RST] {
            let mut f = eth(
                GATEWAY_MAC,
                GUEST_MAC,
                &tcp(GUEST, 40000, REMOTE, 80, flags),
            );
            assert!(!fast.outward(t, &hdr, &mut f), "flags {flags:#x}");
        }
        let mut other = eth(
            GATEWAY_MAC,
            GUEST_MAC,
            &tcp(GUEST, 40001, REMOTE, 80, TCP_ACK),
        );
        assert!(!fast.outward(t, &hdr, &mut other));
        // The same connection from another MAC: the engine's, which moves the way back.
        let moved = MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);
        let data = tcp(GUEST, 40000, REMOTE, 80, TCP_ACK);
        let mut f = eth(GATEWAY_MAC, moved, &data);
        assert!(!fast.outward(t, &hdr, &mut f), "from a new MAC");
        let mut p = data.clone();
        let out = nat.handle_outbound(t, &mut p, moved, false).unwrap();
        assert!(nat.publish(&out, ROUTER_MAC));
        let (back, _) = fast
            .mirror
            .lookup(Dir::In, &tuple_of(&p).reversed())
            .unwrap();
        assert_eq!(back.mac, moved, "replies follow the guest's new MAC");
        let mut f = eth(GATEWAY_MAC, moved, &data);
        assert!(fast.outward(t, &hdr, &mut f));
        engine_out(&mut nat, t, &tcp(GUEST, 40000, REMOTE, 80, TCP_ACK));

        // A FIN through the engine withdraws the connection: its data is the engine's too.
        engine_out(
            &mut nat,
            t,
            &tcp(GUEST, 40000, REMOTE, 80, TCP_FIN | TCP_ACK),
        );
        let mut f = eth(
            GATEWAY_MAC,
            GUEST_MAC,
            &tcp(GUEST, 40000, REMOTE, 80, TCP_ACK),
        );
        assert!(!fast.outward(t, &hdr, &mut f));
    }

    // RFC 1812 5.3.1 and 4.2.2.5 (the engine sends the ICMP error), RFC 791 fragments, bad
    // header checksums, and frames for other MACs: all left alone.
    #[test]
    fn leaves_what_needs_an_answer_or_a_check_to_the_engine() {
        let (mut nat, fast, t) = setup();
        let hdr = VnetHdr::default();
        let port = handshake(&mut nat, t);
        let data = tcp(GUEST, 40000, REMOTE, 80, TCP_ACK);
        let variants: [(&str, Change); 4] = [
            ("TTL 1", |ip| {
                ip[8] = 1;
                refresh_ip_checksum(ip);
            }),
            ("a fragment", |ip| {
                ip[6] = 0x20;
                refresh_ip_checksum(ip);
            }),
            ("bad header checksum", |ip| ip[10] ^= 1),
            ("too big for the uplink", |ip| {
                ip.resize(1600, 0);
                let total = (ip.len() as u16).to_be_bytes();
                ip[2..4].copy_from_slice(&total);
                refresh_ip_checksum(ip);
            }),
        ];
        for (what, change) in variants {
            let mut ip = data.clone();
            change(&mut ip);
            let mut f = eth(GATEWAY_MAC, GUEST_MAC, &ip);
            assert!(!fast.outward(t, &hdr, &mut f), "{what}");
        }
        let mut not_ours = eth(ROUTER_MAC, GUEST_MAC, &tcp(REMOTE, 80, EXT, 40000, TCP_ACK));
        assert_eq!(fast.inward(t, &hdr, &mut not_ours, Some), None);
        // A guest the worker cannot place: untouched.
        let reply = tcp(REMOTE, 80, EXT, port, TCP_ACK);
        let mut f = eth(UPLINK_MAC, ROUTER_MAC, &reply);
        let before = f.clone();
        assert_eq!(fast.inward(t, &hdr, &mut f, |_| None::<()>), None);
        assert_eq!(f, before);
    }

    /// An answered UDP flow guest:5353 -> remote:53, published; its query.
    fn answered_udp(nat: &mut Nat, t: Instant) -> Vec<u8> {
        let query = udp(GUEST, 5353, REMOTE, 53, b"q");
        let sent = engine_out(nat, t, &query);
        let port = u16::from_be_bytes([sent[HEADER_LEN + 20], sent[HEADER_LEN + 21]]);
        engine_in(nat, t, &udp(REMOTE, 53, EXT, port, b"a"));
        engine_out(nat, t, &query);
        query
    }

    // RFC 4787 REQ-5 / RFC 5382 REQ-5: a connection only workers carry does not time out:
    // the sweep finds the engine's deadline passed and the workers' sighting recent.
    #[test]
    fn a_connection_only_workers_carry_does_not_expire() {
        let (mut nat, fast, t) = setup();
        let hdr = VnetHdr::default();
        let query = answered_udp(&mut nat, t);
        let udp_timeout = nat.config().timeouts.udp;
        // Only the worker sees the flow from here on, past the engine's deadline.
        let later = t + udp_timeout + std::time::Duration::from_secs(5);
        let mut f = eth(GATEWAY_MAC, GUEST_MAC, &query);
        assert!(fast.outward(later, &hdr, &mut f), "still published");
        nat.handle_timeout(later);
        assert_eq!(nat.len(), 1, "the worker's sighting kept it");
        assert_eq!(nat.rows(later)[0].packets, [3, 1], "and what it counted");
        let idle = later + udp_timeout + std::time::Duration::from_secs(5);
        nat.handle_timeout(idle);
        assert_eq!(nat.len(), 0, "idle everywhere: expired");
        assert!(fast.mirror.lookup(Dir::Out, &tuple_of(&query)).is_none());
    }

    // The same when the engine meets the flow again itself, after the workers lost it (a
    // next hop moved): its lookup finds the deadline passed but the sighting recent, and the
    // mapping, external port and all, carries on (RFC 4787 REQ-1).
    #[test]
    fn a_connection_workers_carried_keeps_its_mapping_when_the_engine_takes_it_back() {
        let (mut nat, fast, t) = setup();
        let hdr = VnetHdr::default();
        let query = answered_udp(&mut nat, t);
        let before = engine_out(&mut nat, t, &query);
        let later = t + nat.config().timeouts.udp + std::time::Duration::from_secs(5);
        let mut f = eth(GATEWAY_MAC, GUEST_MAC, &query);
        assert!(fast.outward(later, &hdr, &mut f));
        nat.withdraw_all();
        let mut f = eth(GATEWAY_MAC, GUEST_MAC, &query);
        assert!(!fast.outward(later, &hdr, &mut f), "taken back");
        let after = engine_out(&mut nat, later, &query);
        assert_eq!(after, before, "the same mapping");
        assert_eq!(nat.counters.flows_expired, 0);
        let mut f = eth(GATEWAY_MAC, GUEST_MAC, &query);
        assert!(fast.outward(later, &hdr, &mut f), "published again");
    }

    /// A change to a packet that makes it the engine's.
    type Change = fn(&mut Vec<u8>);

    fn tuple_of(ip: &[u8]) -> Tuple {
        packet::classify(ip, 20).unwrap().0
    }

    fn refresh_ip_checksum(ip: &mut [u8]) {
        ip[10..12].fill(0);
        let c = crate::wire::checksum::checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}
