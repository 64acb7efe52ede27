//! NAT behaviour, one test per requirement, citing it.

use super::packet::fixtures::*;
use super::packet::*;
use super::*;
use crate::wire::checksum;

const G1: [u8; 4] = [192, 168, 122, 10];
const G2: [u8; 4] = [192, 168, 122, 11];
const EXT: [u8; 4] = [203, 0, 113, 2];
const R1: [u8; 4] = [203, 0, 113, 1];
const R2: [u8; 4] = [198, 51, 100, 7];
const MAC1: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x10]);
const MAC2: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);

fn nat_with(f: impl FnOnce(&mut NatConfig)) -> (Nat, Instant) {
    let mut c = NatConfig::new(Ipv4Addr::new(192, 168, 122, 1), 24, Ipv4Addr::from(EXT));
    f(&mut c);
    (Nat::new(c), Instant::now())
}

fn nat() -> (Nat, Instant) {
    nat_with(|_| {})
}

fn tuple_of(p: &[u8]) -> Tuple {
    classify(p, 20).unwrap().0
}

/// Sends `p` out from the guest with MAC `mac`; returns the translated packet.
fn out(n: &mut Nat, t: Instant, mac: MacAddr, mut p: Vec<u8>) -> Result<Vec<u8>, DropReason> {
    n.handle_outbound(t, &mut p, mac, false)?;
    assert!(checksums_ok(&p), "checksums after outbound translation");
    Ok(p)
}

fn inb(n: &mut Nat, t: Instant, mut p: Vec<u8>) -> Result<(Vec<u8>, MacAddr), DropReason> {
    let mac = n.handle_inbound(t, &mut p, false)?;
    assert!(checksums_ok(&p), "checksums after inbound translation");
    Ok((p, mac))
}

// RFC 4787 REQ-1 / RFC 5382 REQ-1: endpoint-independent mapping: one guest endpoint keeps one
// external port whatever the destination. MASQUERADE keeps the guest's port when it is free.
#[test]
fn mapping_is_endpoint_independent_and_keeps_the_port() {
    let (mut n, t) = nat();
    let a = out(&mut n, t, MAC1, udp(G1, 40000, R1, 53, b"q")).unwrap();
    let b = out(&mut n, t, MAC1, udp(G1, 40000, R2, 123, b"q")).unwrap();
    let (ta, tb) = (tuple_of(&a), tuple_of(&b));
    assert_eq!(ta.src, Ipv4Addr::from(EXT));
    assert_eq!((ta.sport, tb.sport), (40000, 40000));
    assert_eq!(n.len(), 2);
}

// The "two guests using the same source port get distinct mappings".
#[test]
fn same_source_port_from_two_guests_gets_distinct_ports() {
    let (mut n, t) = nat();
    let a = out(&mut n, t, MAC1, udp(G1, 5000, R1, 53, b"q")).unwrap();
    let b = out(&mut n, t, MAC2, udp(G2, 5000, R1, 53, b"q")).unwrap();
    let (pa, pb) = (tuple_of(&a).sport, tuple_of(&b).sport);
    assert_eq!(pa, 5000);
    assert_ne!(pa, pb);
    assert!((1024..=65535).contains(&pb));
    // Replies reach the right guest, with its own port restored.
    let (r, mac) = inb(&mut n, t, udp(R1, 53, EXT, pb, b"a")).unwrap();
    assert_eq!(mac, MAC2);
    assert_eq!(
        (tuple_of(&r).dst, tuple_of(&r).dport),
        (Ipv4Addr::from(G2), 5000)
    );
}

// libvirt: `MASQUERADE --to-ports 1024-65535`: a privileged source port is mapped into range.
#[test]
fn ports_outside_the_range_are_mapped_into_it() {
    let (mut n, t) = nat_with(|c| c.ports = (20000, 20009));
    let p = out(&mut n, t, MAC1, udp(G1, 123, R1, 123, b"ntp")).unwrap();
    assert!((20000..=20009).contains(&tuple_of(&p).sport));
    let p = out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_SYN)).unwrap();
    assert!((20000..=20009).contains(&tuple_of(&p).sport));
}

// RFC 4787 REQ-8 and section 5: the three filtering behaviours.
#[test]
fn filtering_behaviours() {
    for (filtering, same_addr_other_port, other_addr) in [
        (Filtering::AddressAndPortDependent, false, false),
        (Filtering::AddressDependent, true, false),
        (Filtering::EndpointIndependent, true, true),
    ] {
        let (mut n, t) = nat_with(|c| c.filtering = filtering);
        out(&mut n, t, MAC1, udp(G1, 40000, R1, 3478, b"stun")).unwrap();
        let r = inb(&mut n, t, udp(R1, 3479, EXT, 40000, b"x"));
        assert_eq!(r.is_ok(), same_addr_other_port, "{filtering:?}");
        let r = inb(&mut n, t, udp(R2, 3478, EXT, 40000, b"x"));
        assert_eq!(r.is_ok(), other_addr, "{filtering:?}");
        if let Ok((p, mac)) = r {
            assert_eq!(mac, MAC1);
            assert_eq!(tuple_of(&p).dst, Ipv4Addr::from(G1));
        } else {
            assert_eq!(r.unwrap_err(), DropReason::NatNoFlow);
        }
        // Nothing reaches a port without a mapping.
        assert_eq!(
            inb(&mut n, t, udp(R1, 3478, EXT, 40001, b"x")).unwrap_err(),
            DropReason::NatNoFlow
        );
    }
}

// RFC 5382 REQ-3 (and the kernel): an unsolicited TCP segment other than a SYN opens nothing.
#[test]
fn tcp_opens_only_with_a_syn() {
    let (mut n, t) = nat_with(|c| c.filtering = Filtering::EndpointIndependent);
    assert_eq!(
        out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_ACK)).unwrap_err(),
        DropReason::NatUnsupported
    );
    out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(
        inb(&mut n, t, tcp(R2, 9, EXT, 40000, TCP_ACK)).unwrap_err(),
        DropReason::NatNoFlow
    );
    assert!(inb(&mut n, t, tcp(R2, 9, EXT, 40000, TCP_SYN)).is_ok());
}

// RFC 5382 5 and REQ-5: handshake to ESTABLISHED (2 h 4 min idle), close to a 4 min timeout.
#[test]
fn tcp_state_follows_the_handshake_and_sets_the_timeout() {
    let (mut n, t) = nat();
    let syn = out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_SYN)).unwrap();
    let port = tuple_of(&syn).sport;
    assert_eq!(n.rows(t)[0].state, "SYN_SENT");
    inb(&mut n, t, tcp(R1, 80, EXT, port, TCP_SYN | TCP_ACK)).unwrap();
    assert_eq!(n.rows(t)[0].state, "SYN_RECV");
    out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_ACK)).unwrap();
    let row = &n.rows(t)[0];
    assert_eq!(row.state, "ESTABLISHED");
    assert_eq!(row.timeout_secs, 7440);
    assert!(row.replied);

    let later = t + Duration::from_secs(7439);
    out(
        &mut n,
        later,
        MAC1,
        tcp(G1, 40000, R1, 80, TCP_ACK | TCP_FIN),
    )
    .unwrap();
    assert_eq!(n.rows(later)[0].state, "FIN_WAIT");
    inb(&mut n, later, tcp(R1, 80, EXT, port, TCP_ACK | TCP_FIN)).unwrap();
    let row = &n.rows(later)[0];
    assert_eq!(row.state, "TIME_WAIT");
    assert_eq!(row.timeout_secs, 240);
    assert!(n.rows(later + Duration::from_secs(241)).is_empty());
}

// RFC 7857 2.2: after a RST the entry lingers for the transitory timeout; the next SYN on the
// same tuple reopens it.
#[test]
fn rst_closes_and_a_new_syn_reopens() {
    let (mut n, t) = nat();
    let syn = out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_SYN)).unwrap();
    let port = tuple_of(&syn).sport;
    // In SYN_SENT, a RST without an ACK of the SYN closes nothing (RFC 9293 3.10.7.3).
    inb(&mut n, t, tcp(R1, 80, EXT, port, TCP_RST)).unwrap();
    assert_eq!(n.rows(t)[0].state, "SYN_SENT");
    inb(&mut n, t, tcp(R1, 80, EXT, port, TCP_RST | TCP_ACK)).unwrap();
    assert_eq!(n.rows(t)[0].state, "CLOSE");
    assert_eq!(n.rows(t)[0].timeout_secs, 240);
    out(&mut n, t, MAC1, tcp(G1, 40000, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(n.rows(t)[0].state, "SYN_SENT");
    assert_eq!(n.len(), 1);
}

// RFC 4787 REQ-5: UDP mappings last at least 2 minutes (5 by default); RFC 5508 REQ-1: ICMP
// query mappings 60 s. Expiry frees the external port.
#[test]
fn udp_and_icmp_timeouts() {
    let (mut n, t) = nat();
    out(&mut n, t, MAC1, udp(G1, 40000, R1, 53, b"q")).unwrap();
    out(&mut n, t, MAC1, echo(G1, R1, ICMP_ECHO_REQUEST, 9)).unwrap();
    let rows = n.rows(t);
    let udp_row = rows.iter().find(|r| r.proto == "udp").unwrap();
    let icmp_row = rows.iter().find(|r| r.proto == "icmp").unwrap();
    assert_eq!((udp_row.timeout_secs, icmp_row.timeout_secs), (300, 60));
    assert!(
        inb(
            &mut n,
            t + Duration::from_secs(299),
            udp(R1, 53, EXT, 40000, b"a")
        )
        .is_ok(),
        "refreshed by the reply"
    );
    let late = t + Duration::from_secs(299 + 300);
    n.handle_timeout(late);
    assert!(n.is_empty());
    assert_eq!(n.counters.flows_expired, 2);
    assert_eq!(
        inb(&mut n, late, udp(R1, 53, EXT, 40000, b"a")).unwrap_err(),
        DropReason::NatNoFlow
    );
    // The port is free again for another guest.
    let p = out(&mut n, late, MAC2, udp(G2, 40000, R1, 53, b"q")).unwrap();
    assert_eq!(tuple_of(&p).sport, 40000);
}

// ICMP echo is translated by identifier; two guests with one identifier stay apart.
#[test]
fn echo_is_translated_by_identifier() {
    let (mut n, t) = nat();
    let a = out(&mut n, t, MAC1, echo(G1, R1, ICMP_ECHO_REQUEST, 7)).unwrap();
    let b = out(&mut n, t, MAC2, echo(G2, R1, ICMP_ECHO_REQUEST, 7)).unwrap();
    let (ia, ib) = (tuple_of(&a).sport, tuple_of(&b).sport);
    assert_eq!(ia, 7);
    assert_ne!(ia, ib);
    let (r, mac) = inb(&mut n, t, echo(R1, EXT, ICMP_ECHO_REPLY, ib)).unwrap();
    assert_eq!(mac, MAC2);
    assert_eq!(tuple_of(&r).sport, 7);
    assert_eq!(tuple_of(&r).dst, Ipv4Addr::from(G2));
}

// RFC 5508 4.1 (REQ-3): an ICMP error from outside is matched by the packet it quotes and
// translated, quoted header, quoted port and every checksum included.
#[test]
fn inbound_icmp_errors_follow_their_connection() {
    let (mut n, t) = nat();
    let sent = out(&mut n, t, MAC2, udp(G2, 5000, R1, 9, b"probe")).unwrap();
    out(&mut n, t, MAC1, udp(G1, 5000, R1, 9, b"probe")).unwrap();
    let sent = if tuple_of(&sent).sport == 5000 {
        sent
    } else {
        unreachable!()
    };
    // Port unreachable, quoting the translated datagram in full.
    let err = icmp(R1, EXT, ICMP_DEST_UNREACHABLE, 3, [0; 4], &sent);
    let (p, mac) = inb(&mut n, t, err).unwrap();
    assert_eq!(mac, MAC2);
    assert_eq!(&p[16..20], &G2);
    let quoted = &p[28..];
    assert_eq!(&quoted[12..16], &G2, "quoted source is the guest again");
    assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 5000);
    assert_eq!(
        checksum::checksum(&quoted[..20]),
        0,
        "quoted IP header checksum"
    );
    assert!(checksums_ok(quoted), "quoted UDP checksum");
    assert_eq!(n.counters.icmp_errors_translated, 1);

    // Time exceeded from a router, quoting only the header and 8 bytes.
    let err = icmp(
        [198, 51, 100, 1],
        EXT,
        ICMP_TIME_EXCEEDED,
        0,
        [0; 4],
        &sent[..28],
    );
    let (p, mac) = inb(&mut n, t, err).unwrap();
    assert_eq!(mac, MAC2);
    assert_eq!(&p[28 + 12..28 + 16], &G2);

    // A damaged one is dropped, not given a good checksum (RFC 1191: its MTU would be
    // believed).
    let mut damaged = icmp(R1, EXT, ICMP_DEST_UNREACHABLE, 4, [0, 0, 0x05, 0xdc], &sent);
    damaged[26] ^= 0x01;
    assert_eq!(
        inb(&mut n, t, damaged).unwrap_err(),
        DropReason::BadChecksum
    );
    assert_eq!(n.counters.icmp_errors_translated, 2);

    // An error about a connection that does not exist goes nowhere.
    let stray = udp(EXT, 6000, R1, 9, b"x");
    let err = icmp(R1, EXT, ICMP_DEST_UNREACHABLE, 3, [0; 4], &stray);
    assert_eq!(inb(&mut n, t, err).unwrap_err(), DropReason::NatNoFlow);
}

// RFC 5508 4.2: an ICMP error a guest sends about an inbound packet leaves with the external
// address, outside and inside.
#[test]
fn outbound_icmp_errors_are_translated_too() {
    let (mut n, t) = nat_with(|c| c.ports = (30000, 30000));
    out(&mut n, t, MAC1, udp(G1, 40000, R1, 9, b"x")).unwrap();
    let (arrived, _) = inb(&mut n, t, udp(R1, 9, EXT, 30000, b"late")).unwrap();
    let err = icmp(G1, R1, ICMP_DEST_UNREACHABLE, 3, [0; 4], &arrived);
    let p = out(&mut n, t, MAC1, err).unwrap();
    assert_eq!(&p[12..16], &EXT);
    let quoted = &p[28..];
    assert_eq!(&quoted[16..20], &EXT);
    assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 30000);
    assert!(checksums_ok(quoted));
}

fn fragment(p: &[u8], offset: usize, len: usize, more: bool) -> Vec<u8> {
    let mut f = p[..20].to_vec();
    f.extend_from_slice(&p[20 + offset..20 + offset + len]);
    let total = f.len() as u16;
    f[2..4].copy_from_slice(&total.to_be_bytes());
    let word = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
    f[6..8].copy_from_slice(&word.to_be_bytes());
    f[10..12].fill(0);
    let c = checksum::checksum(&f[..20]);
    f[10..12].copy_from_slice(&c.to_be_bytes());
    f
}

// The issue: a fragmented datagram crosses in both directions. The first fragment carries the
// ports and binds the train; the rest follow by (src, dst, protocol, id).
#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    let (mut n, t) = nat_with(|c| c.ports = (30000, 30000));
    let data = vec![0xab; 3000];
    let whole = udp(G1, 40000, R1, 7, &data);
    let (f1, f2) = (
        fragment(&whole, 0, 1480, true),
        fragment(&whole, 1480, whole.len() - 20 - 1480, false),
    );
    let mut f1 = f1;
    n.handle_outbound(t, &mut f1, MAC1, false).unwrap();
    let mut f2 = f2;
    n.handle_outbound(t, &mut f2, MAC1, false).unwrap();
    for f in [&f1, &f2] {
        assert_eq!(&f[12..16], &EXT);
        assert_eq!(checksum::checksum(&f[..20]), 0);
    }
    // Reassembled, the translated datagram's UDP checksum verifies.
    let mut joined = f1.clone();
    joined.extend_from_slice(&f2[20..]);
    let total = joined.len() as u16;
    joined[2..4].copy_from_slice(&total.to_be_bytes());
    joined[6..8].fill(0);
    joined[10..12].fill(0);
    let c = checksum::checksum(&joined[..20]);
    joined[10..12].copy_from_slice(&c.to_be_bytes());
    assert!(checksums_ok(&joined));
    assert_eq!(u16::from_be_bytes([joined[20], joined[21]]), 30000);

    // And back.
    let reply = udp(R1, 7, EXT, 30000, &data);
    let (mut r1, mut r2) = (
        fragment(&reply, 0, 1480, true),
        fragment(&reply, 1480, reply.len() - 20 - 1480, false),
    );
    assert_eq!(n.handle_inbound(t, &mut r1, false), Ok(MAC1));
    assert_eq!(n.handle_inbound(t, &mut r2, false), Ok(MAC1));
    assert_eq!(&r2[16..20], &G1);
    assert_eq!(n.counters.fragments_translated, 2);

    // A later fragment whose first never came is dropped, counted.
    let mut orphan = fragment(&udp(R1, 7, EXT, 30000, &data), 1480, 8, false);
    orphan[4] ^= 0xff;
    assert_eq!(
        n.handle_inbound(t, &mut orphan, false),
        Err(DropReason::NatUnsupported)
    );
}

// RFC 4787 REQ-9 (6): hairpinning: a guest reaches another through the external address and
// mapped port, and sees the sender's external address and port as the source.
#[test]
fn hairpinning_delivers_with_the_external_source() {
    let (mut n, t) = nat_with(|c| c.filtering = Filtering::EndpointIndependent);
    out(&mut n, t, MAC2, udp(G2, 6000, R1, 9, b"open")).unwrap();
    let mut p = udp(G1, 7000, EXT, 6000, b"hello");
    let o = n.handle_outbound(t, &mut p, MAC1, false).unwrap();
    assert!(o.hairpin);
    assert_eq!(n.handle_inbound(t, &mut p, false), Ok(MAC2));
    let tu = tuple_of(&p);
    assert_eq!((tu.src, tu.sport), (Ipv4Addr::from(EXT), 7000));
    assert_eq!((tu.dst, tu.dport), (Ipv4Addr::from(G2), 6000));
    assert!(checksums_ok(&p));
    // The answer goes back the same way to the first guest.
    let mut back = udp(G2, 6000, EXT, 7000, b"hi");
    assert!(
        n.handle_outbound(t, &mut back, MAC2, false)
            .unwrap()
            .hairpin
    );
    assert_eq!(n.handle_inbound(t, &mut back, false), Ok(MAC1));
    assert_eq!(tuple_of(&back).dst, Ipv4Addr::from(G1));
}

// libvirt's RETURN rules: nothing to multicast, broadcast or the subnet itself, only the
// subnet's sources.
#[test]
fn untranslated_destinations_and_sources() {
    let (mut n, t) = nat();
    for p in [
        udp(G1, 5353, [224, 0, 0, 251], 5353, b"m"),
        udp(G1, 68, [255, 255, 255, 255], 67, b"b"),
        udp([10, 0, 0, 5], 5000, R1, 53, b"x"),
        // The subnet itself (a guest with a narrower netmask, or the subnet's broadcast, sent
        // to the gateway): libvirt's `! -d 192.168.122.0/24`, never out the uplink.
        udp(G1, 5000, G2, 53, b"s"),
        udp(G1, 5000, [192, 168, 122, 255], 53, b"s"),
    ] {
        assert_eq!(out(&mut n, t, MAC1, p).unwrap_err(), DropReason::NoRoute);
    }
    assert!(n.is_empty());
}

// RFC 9293 3.1: a TCP header is 20 bytes or more, as its data offset says; a shorter one (a
// tiny first fragment, RFC 1858) or an offset pointing inside the header is not translated.
#[test]
fn a_tcp_segment_without_a_whole_header_is_not_translated() {
    let (mut n, t) = nat();
    let mut short = tcp(G1, 40000, R1, 80, TCP_SYN);
    short.truncate(20 + 18);
    short[2..4].copy_from_slice(&38u16.to_be_bytes());
    let mut inside = tcp(G1, 40001, R1, 80, TCP_SYN);
    inside[20 + 12] = 4 << 4;
    let mut beyond = tcp(G1, 40002, R1, 80, TCP_SYN);
    beyond[20 + 12] = 15 << 4;
    for p in [short, inside, beyond] {
        let mut p = p;
        let refused = n.handle_outbound(t, &mut p, MAC1, false);
        assert_eq!(refused.unwrap_err(), DropReason::NatUnsupported);
    }
    assert!(n.is_empty());
}

/// A UDP flow from `guest`'s `port` to R1:9 that went both ways twice: assured.
fn udp_stream(n: &mut Nat, t: Instant, (mac, guest): (MacAddr, [u8; 4]), port: u16) {
    for _ in 0..2 {
        let p = out(n, t, mac, udp(guest, port, R1, 9, b"")).unwrap();
        let ext = tuple_of(&p).sport;
        inb(n, t, udp(R1, 9, EXT, ext, b"")).unwrap();
    }
}

// The limits: a table cap, a per-guest cap, and port exhaustion refuse new
// connections with a counter when every connection there is assured, and never disturb those.
#[test]
fn caps_refuse_new_connections_only() {
    let (mut n, t) = nat_with(|c| {
        c.max_flows = 3;
        c.max_flows_per_guest = 2;
    });
    udp_stream(&mut n, t, (MAC1, G1), 1);
    udp_stream(&mut n, t, (MAC1, G1), 2);
    assert_eq!(
        out(&mut n, t, MAC1, udp(G1, 3, R1, 9, b"")).unwrap_err(),
        DropReason::NatGuestLimit
    );
    udp_stream(&mut n, t, (MAC2, G2), 1);
    assert_eq!(
        out(&mut n, t, MAC2, udp(G2, 2, R1, 9, b"")).unwrap_err(),
        DropReason::NatTableFull
    );
    assert!(out(&mut n, t, MAC1, udp(G1, 1, R1, 9, b"")).is_ok());
    assert_eq!(n.counters.flows_evicted, 0);

    let (mut n, t) = nat_with(|c| c.ports = (40000, 40001));
    out(&mut n, t, MAC1, udp(G1, 40000, R1, 9, b"")).unwrap();
    out(&mut n, t, MAC1, udp(G1, 40001, R1, 9, b"")).unwrap();
    assert_eq!(
        out(&mut n, t, MAC2, udp(G2, 40000, R1, 9, b"")).unwrap_err(),
        DropReason::NatPortsExhausted
    );
    // TCP has its own port space; the existing UDP flows still pass.
    assert!(out(&mut n, t, MAC2, tcp(G2, 40000, R1, 9, TCP_SYN)).is_ok());
    assert!(inb(&mut n, t, udp(R1, 9, EXT, 40001, b"")).is_ok());
}

// RFC 5382 5 and Linux's early_drop: at a cap, what is not assured gives up its entry for a
// new connection, oldest first: a UDP query and its answer (a resolver's flow per query), a
// UDP flow never answered, a TCP handshake that never completed, an expired entry the sweep
// has not reached; a UDP stream or an established TCP connection never does.
#[test]
fn unassured_connections_make_room_at_the_caps() {
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 3);
    let query = out(&mut n, t, MAC1, udp(G1, 5001, R1, 53, b"q")).unwrap();
    inb(&mut n, t, udp(R1, 53, EXT, tuple_of(&query).sport, b"a")).unwrap();
    udp_stream(&mut n, t, (MAC1, G1), 5002);
    out(&mut n, t, MAC1, tcp(G1, 5003, R1, 80, TCP_SYN)).unwrap();
    // The query and its answer go first, then the half-open connection.
    out(&mut n, t, MAC1, udp(G1, 5004, R1, 53, b"q")).unwrap();
    assert_eq!(n.counters.flows_evicted, 1);
    assert_eq!(state_of(&n, t, 5001), None);
    out(&mut n, t, MAC1, udp(G1, 5005, R1, 53, b"q")).unwrap();
    assert_eq!(state_of(&n, t, 5003), None, "the SYN never answered");
    // The stream stays whatever comes: the unanswered queries take each other's place.
    for port in 5006..5020 {
        out(&mut n, t, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
    }
    assert!(n.rows(t).iter().any(|r| r.original.sport == 5002));
    assert_eq!(n.len(), 3);

    // Established TCP connections hold their entries: the cap refuses.
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 2);
    open(&mut n, t, 1000);
    open(&mut n, t, 1001);
    assert_eq!(
        out(&mut n, t, MAC1, udp(G1, 1002, R1, 53, b"q")).unwrap_err(),
        DropReason::NatGuestLimit
    );
    assert_eq!(n.counters.flows_evicted, 0);

    // An entry past its time counts as expired, not evicted, when it makes room.
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 1);
    udp_stream(&mut n, t, (MAC1, G1), 1000);
    let later = t + Duration::from_secs(301);
    out(&mut n, later, MAC1, udp(G1, 1001, R1, 53, b"q")).unwrap();
    assert_eq!((n.counters.flows_expired, n.counters.flows_evicted), (1, 0));
}

// A guest's cap looks at the guest's own candidates: another guest's long-lived connections,
// made first, do not hide them (one shared queue scanned 64 deep would have refused it).
#[test]
fn another_guests_connections_do_not_hide_a_guests_own_from_its_cap() {
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 70);
    for port in 1000..1070 {
        let syn = out(&mut n, t, MAC2, tcp(G2, port, R1, 80, TCP_SYN)).unwrap();
        let ext = tuple_of(&syn).sport;
        inb(&mut n, t, tcp(R1, 80, EXT, ext, TCP_SYN | TCP_ACK)).unwrap();
        out(&mut n, t, MAC2, tcp(G2, port, R1, 80, TCP_ACK)).unwrap();
    }
    for port in 2000..2070 {
        out(&mut n, t, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
    }
    out(&mut n, t, MAC1, udp(G1, 2070, R1, 53, b"q")).unwrap();
    assert_eq!(n.counters.flows_evicted, 1);
    assert_eq!(state_of(&n, t, 2000), None, "G1's oldest");
    assert_eq!(n.len(), 140);
}

// Making room for an inbound connection never takes the mapping it arrives on: a guest at its
// cap whose one flow on the mapping is the oldest unassured one still gets a new peer's
// packet on the same external port (RFC 4787 REQ-1, REQ-8 endpoint-independent filtering).
#[test]
fn making_room_keeps_the_mapping_the_new_connection_uses() {
    let (mut n, t) = nat_with(|c| {
        c.max_flows_per_guest = 1;
        c.filtering = Filtering::EndpointIndependent;
    });
    let stun = out(&mut n, t, MAC1, udp(G1, 5000, R1, 3478, b"stun")).unwrap();
    assert_eq!(tuple_of(&stun).sport, 5000);
    inb(&mut n, t, udp(R1, 3478, EXT, 5000, b"you")).unwrap();
    let (p, mac) = inb(&mut n, t, udp(R2, 4000, EXT, 5000, b"peer")).unwrap();
    assert_eq!((mac, tuple_of(&p).dport), (MAC1, 5000));
    assert_eq!(n.counters.flows_evicted, 1, "the STUN flow made room");
    // And going out to the peer keeps the port.
    let back = out(&mut n, t, MAC1, udp(G1, 5000, R2, 4000, b"hi")).unwrap();
    assert_eq!(tuple_of(&back).sport, 5000);
}

/// Opens a TCP connection from G1's `port` to R1:80 and completes its handshake.
fn open(n: &mut Nat, t: Instant, port: u16) {
    let syn = out(n, t, MAC1, tcp(G1, port, R1, 80, TCP_SYN)).unwrap();
    let ext = tuple_of(&syn).sport;
    inb(n, t, tcp(R1, 80, EXT, ext, TCP_SYN | TCP_ACK)).unwrap();
    out(n, t, MAC1, tcp(G1, port, R1, 80, TCP_ACK)).unwrap();
}

/// Opens a TCP connection from G1's `port` to R1:80 and closes it both ways (TIME_WAIT).
fn open_and_close(n: &mut Nat, t: Instant, port: u16) {
    let syn = out(n, t, MAC1, tcp(G1, port, R1, 80, TCP_SYN)).unwrap();
    let ext = tuple_of(&syn).sport;
    inb(n, t, tcp(R1, 80, EXT, ext, TCP_SYN | TCP_ACK)).unwrap();
    out(n, t, MAC1, tcp(G1, port, R1, 80, TCP_ACK)).unwrap();
    inb(n, t, tcp(R1, 80, EXT, ext, TCP_ACK | TCP_FIN)).unwrap();
    out(n, t, MAC1, tcp(G1, port, R1, 80, TCP_ACK | TCP_FIN)).unwrap();
    inb(n, t, tcp(R1, 80, EXT, ext, TCP_ACK)).unwrap();
}

fn state_of(n: &Nat, t: Instant, port: u16) -> Option<&'static str> {
    n.rows(t)
        .into_iter()
        .find(|r| r.original.sport == port)
        .map(|r| r.state)
}

// At a cap, the connection that closed longest ago (TIME_WAIT) makes room for a new one, as
// Linux's conntrack lets closing entries go first under pressure; open ones never do, and
// without a cap a closed connection keeps its full RFC 5382 REQ-5 transitory timeout.
#[test]
fn closed_connections_make_room_at_the_caps() {
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 2);
    open_and_close(&mut n, t, 1000);
    open_and_close(&mut n, t, 1001);
    assert_eq!(n.rows(t).len(), 2);
    out(&mut n, t, MAC1, tcp(G1, 1002, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(n.counters.flows_evicted, 1);
    assert_eq!(state_of(&n, t, 1000), None, "the oldest closure went");
    assert_eq!(state_of(&n, t, 1001), Some("TIME_WAIT"));
    assert_eq!(state_of(&n, t, 1002), Some("SYN_SENT"));
    // Two established connections: nothing to evict.
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 2);
    open_and_close(&mut n, t, 1000);
    open(&mut n, t, 1001);
    open(&mut n, t, 1003);
    assert_eq!(n.counters.flows_evicted, 1);
    assert_eq!(
        out(&mut n, t, MAC1, tcp(G1, 1004, R1, 80, TCP_SYN)).unwrap_err(),
        DropReason::NatGuestLimit
    );
    assert_eq!(n.counters.flows_evicted, 1);
    assert_eq!(n.len(), 2);

    // The table's cap takes anyone's closed connection; a guest's cap only its own.
    let (mut n, t) = nat_with(|c| c.max_flows = 2);
    open_and_close(&mut n, t, 1000);
    udp_stream(&mut n, t, (MAC1, G1), 1001);
    out(&mut n, t, MAC2, tcp(G2, 2000, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(state_of(&n, t, 1000), None);
    // G2's own half-open connection is all there is to take.
    out(&mut n, t, MAC2, tcp(G2, 2001, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(n.counters.flows_evicted, 2);
    let (mut n, t) = nat_with(|c| c.max_flows = 2);
    udp_stream(&mut n, t, (MAC1, G1), 1001);
    udp_stream(&mut n, t, (MAC2, G2), 2000);
    assert_eq!(
        out(&mut n, t, MAC2, tcp(G2, 2001, R1, 80, TCP_SYN)).unwrap_err(),
        DropReason::NatTableFull
    );
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 1);
    open_and_close(&mut n, t, 1000);
    out(&mut n, t, MAC2, tcp(G2, 2000, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(n.counters.flows_evicted, 0, "G2 was under its cap");
    assert_eq!(state_of(&n, t, 1000), Some("TIME_WAIT"));

    // Below the caps a closed connection stays its 4 minutes.
    let (mut n, t) = nat();
    open_and_close(&mut n, t, 1000);
    for port in 1001..1100 {
        open_and_close(&mut n, t, port);
    }
    let later = t + Duration::from_secs(239);
    assert_eq!(n.rows(later).len(), 100);
    assert_eq!(n.counters.flows_evicted, 0);
}

// A closed connection reopened by a SYN on its tuple (RFC 7857 2.2) is a new connection: its
// earlier closure does not make it the oldest candidate.
#[test]
fn a_reopened_connection_is_not_evicted_for_its_old_closure() {
    let (mut n, t) = nat_with(|c| c.max_flows_per_guest = 2);
    open_and_close(&mut n, t, 1000);
    open_and_close(&mut n, t, 1001);
    // 1000 reopens and closes again: now 1001 closed longest ago.
    open_and_close(&mut n, t, 1000);
    out(&mut n, t, MAC1, tcp(G1, 1002, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(state_of(&n, t, 1001), None);
    assert_eq!(state_of(&n, t, 1000), Some("TIME_WAIT"));
    // 1000 reopens and completes its handshake, 1002 too: nothing is left to evict.
    let syn = out(&mut n, t, MAC1, tcp(G1, 1000, R1, 80, TCP_SYN)).unwrap();
    assert_eq!(state_of(&n, t, 1000), Some("SYN_SENT"));
    let ext = tuple_of(&syn).sport;
    inb(&mut n, t, tcp(R1, 80, EXT, ext, TCP_SYN | TCP_ACK)).unwrap();
    out(&mut n, t, MAC1, tcp(G1, 1000, R1, 80, TCP_ACK)).unwrap();
    let ext = n
        .rows(t)
        .iter()
        .find(|r| r.original.sport == 1002)
        .unwrap()
        .reply
        .dport;
    inb(&mut n, t, tcp(R1, 80, EXT, ext, TCP_SYN | TCP_ACK)).unwrap();
    out(&mut n, t, MAC1, tcp(G1, 1002, R1, 80, TCP_ACK)).unwrap();
    assert_eq!(
        out(&mut n, t, MAC1, tcp(G1, 1003, R1, 80, TCP_SYN)).unwrap_err(),
        DropReason::NatGuestLimit
    );
    assert_eq!(n.counters.flows_evicted, 1);
}

// Partial checksums (virtio NEEDS_CSUM) survive translation both ways.
#[test]
fn partial_checksums_are_translated_as_partial() {
    let (mut n, t) = nat();
    let mut p = tcp(G1, 40000, R1, 80, TCP_SYN);
    let len = (p.len() - 20) as u16;
    let pseudo = |s, d| checksum::fold(checksum::pseudo_header_v4(s, d, 6, len));
    p[36..38].copy_from_slice(&pseudo(G1, R1).to_be_bytes());
    n.handle_outbound(t, &mut p, MAC1, true).unwrap();
    assert_eq!(u16::from_be_bytes([p[36], p[37]]), pseudo(EXT, R1));
    let mut r = tcp(R1, 80, EXT, 40000, TCP_SYN | TCP_ACK);
    r[36..38].copy_from_slice(&pseudo(R1, EXT).to_be_bytes());
    n.handle_inbound(t, &mut r, true).unwrap();
    assert_eq!(u16::from_be_bytes([r[36], r[37]]), pseudo(R1, G1));
}

#[test]
fn conntrack_rows_read_like_conntrack_l() {
    let (mut n, t) = nat();
    out(&mut n, t, MAC1, udp(G1, 40000, R1, 53, b"q")).unwrap();
    let line = n.rows(t)[0].to_string();
    assert_eq!(
        line,
        "udp      17 300 src=192.168.122.10 dst=203.0.113.1 sport=40000 dport=53 packets=1 \
         bytes=29 [UNREPLIED] src=203.0.113.1 dst=203.0.113.2 sport=53 dport=40000 packets=0 bytes=0"
    );
}

// Bad input costs a drop, never a panic: random bytes and truncations of real packets.
#[test]
fn garbage_never_panics() {
    let (mut n, t) = nat_with(|c| c.filtering = Filtering::EndpointIndependent);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let samples = [
        udp(G1, 40000, R1, 53, b"query"),
        tcp(G1, 40000, R1, 80, TCP_SYN),
        echo(G1, R1, ICMP_ECHO_REQUEST, 3),
        icmp(R1, EXT, 3, 3, [0; 4], &udp(EXT, 40000, R1, 53, b"q")),
    ];
    for i in 0..20000 {
        let mut p = samples[i % samples.len()].clone();
        let flips = next() % 4;
        for _ in 0..flips {
            let at = (next() as usize) % p.len();
            p[at] = next() as u8;
        }
        let cut = (next() as usize) % (p.len() + 1);
        p.truncate(cut.max(20));
        if ip_header_len(&p).is_none_or(|ihl| ihl > p.len()) {
            continue;
        }
        let _ = n.handle_outbound(t, &mut p, MAC1, next() % 2 == 0);
        let _ = n.handle_inbound(t, &mut p, false);
    }
}

// The table's index moves entries when connections go (issue 10's compact table): through
// expiry of every other connection and their return, each live connection is still found in
// both directions and each gone one in neither.
#[test]
fn connections_survive_their_neighbours_churn() {
    let (mut n, t) = nat_with(|c| c.max_flows = 4096);
    let ports = 20000..22000u16;
    for port in ports.clone() {
        out(&mut n, t, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
    }
    let later = t + Duration::from_secs(100);
    for port in ports.clone().step_by(2) {
        out(&mut n, later, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
    }
    // UDP's 300 s: the odd ports (last seen at t) are gone, the even ones stay.
    let sweep = t + Duration::from_secs(350);
    n.handle_timeout(sweep);
    assert_eq!(n.len(), 1000);
    let check = |n: &mut Nat, at: Instant, port: u16, live: bool| {
        let r = inb(n, at, udp(R1, 53, EXT, port, b"a"));
        match r {
            Ok((p, mac)) => {
                assert!(live, "port {port} answered after expiry");
                assert_eq!(mac, MAC1);
                assert_eq!(tuple_of(&p).dport, port);
            }
            Err(e) => {
                assert!(!live, "port {port} lost");
                assert_eq!(e, DropReason::NatNoFlow);
            }
        }
    };
    for port in ports.clone() {
        check(&mut n, sweep, port, port % 2 == 0);
    }
    for port in ports.clone().skip(1).step_by(2) {
        out(&mut n, sweep, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
    }
    assert_eq!(n.len(), 2000);
    for port in ports {
        check(&mut n, sweep, port, true);
        let p = out(&mut n, sweep, MAC1, udp(G1, port, R1, 53, b"q")).unwrap();
        assert_eq!(tuple_of(&p).sport, port);
    }
    assert_eq!(n.len(), 2000);
    assert_eq!(n.rows(sweep).len(), 2000);
}

/// The offload state of a USO super-frame of 2400 bytes in 1200-byte datagrams, as a Linux
/// sender's `UDP_SEGMENT` send leaves it (virtio 1.2 5.1.6.2: `GSO_UDP_L4`, NEEDS_CSUM from
/// the UDP header on).
const USO: crate::wire::VnetHdr = crate::wire::VnetHdr {
    flags: crate::wire::vnet::F_NEEDS_CSUM,
    gso_type: crate::wire::vnet::gso::UDP_L4,
    hdr_len: 42,
    gso_size: 1200,
    csum_start: 34,
    csum_offset: 6,
};

/// Completes the super-frame's partial checksum as the egress device does (from csum_start,
/// starting from the sum the field holds), and checks the result (RFC 768).
fn completed_by_the_device(packet: &[u8]) -> bool {
    let mut frame = [&[0u8; 12][..], &[0x08, 0x00], packet].concat();
    crate::wire::offload::complete_checksum(&USO, &mut frame).unwrap();
    checksums_ok(&frame[14..])
}

// RFC 768: the UDP checksum covers a pseudo-header of both addresses, the protocol and the UDP
// length; a USO super-frame with NEEDS_CSUM carries in that field only the folded pseudo-header
// sum (over the super-frame's whole UDP length, 2408 here), which the device completes for each
// datagram it cuts. Translated once, the address change is folded into that sum incrementally
// (RFC 1624 eqn. 3) and the port change is left out (the device sums the header it sends):
// the bytes below, and a checksum that verifies once completed.
#[test]
fn a_uso_super_frame_is_translated_once_with_its_partial_checksum() {
    let (mut n, t) = nat();
    #[rustfmt::skip]
    const FROM_GUEST: [u8; 28] = [
        0x45, 0x00, 0x09, 0x7c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xa8, 0x88,
        192, 168, 122, 10, 203, 0, 113, 1,
        // 40000 -> 4433, length 2408, pseudo-header sum 0x802e
        0x9c, 0x40, 0x11, 0x51, 0x09, 0x68, 0x80, 0x2e,
    ];
    #[rustfmt::skip]
    const TO_OUTSIDE: [u8; 28] = [
        0x45, 0x00, 0x09, 0x7c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xa7, 0x38,
        203, 0, 113, 2, 203, 0, 113, 1,
        0x9c, 0x40, 0x11, 0x51, 0x09, 0x68, 0x81, 0x7e,
    ];
    let payload: Vec<u8> = (0..2400u32).map(|i| (i % 253) as u8).collect();
    let mut p = [&FROM_GUEST[..], &payload].concat();
    assert!(completed_by_the_device(&p), "the fixture is consistent");
    n.handle_outbound(t, &mut p, MAC1, true).unwrap();
    assert_eq!(p[..28], TO_OUTSIDE);
    assert_eq!(p[28..], payload[..], "the payload is not touched");
    assert!(completed_by_the_device(&p));
    assert_eq!(
        n.counters.translated_out, 1,
        "translated once, not per datagram"
    );

    // The reply, a super-frame too (UDP GRO on the outside's side): back to the guest.
    #[rustfmt::skip]
    const FROM_OUTSIDE: [u8; 28] = [
        0x45, 0x00, 0x09, 0x7c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xa7, 0x38,
        203, 0, 113, 1, 203, 0, 113, 2,
        0x11, 0x51, 0x9c, 0x40, 0x09, 0x68, 0x81, 0x7e,
    ];
    #[rustfmt::skip]
    const TO_GUEST: [u8; 28] = [
        0x45, 0x00, 0x09, 0x7c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xa8, 0x88,
        203, 0, 113, 1, 192, 168, 122, 10,
        0x11, 0x51, 0x9c, 0x40, 0x09, 0x68, 0x80, 0x2e,
    ];
    let mut r = [&FROM_OUTSIDE[..], &payload].concat();
    assert_eq!(n.handle_inbound(t, &mut r, true), Ok(MAC1));
    assert_eq!(r[..28], TO_GUEST);
    assert!(completed_by_the_device(&r));

    // Cut in software (a port without offloads), every datagram verifies on its own.
    let frame = [&[0u8; 12][..], &[0x08, 0x00], &p].concat();
    let mut segmenter = crate::wire::offload::Segmenter::new(&USO, &frame).unwrap();
    let mut out = vec![0u8; segmenter.max_segment_len()];
    let mut datagrams = 0;
    while let Some(len) = segmenter.next_into(&mut out) {
        assert!(checksums_ok(&out[14..len]), "datagram {datagrams}");
        assert_eq!(&out[26..30], &EXT);
        datagrams += 1;
    }
    assert_eq!(datagrams, 2);
}
