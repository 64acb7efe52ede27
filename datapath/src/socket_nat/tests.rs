use super::*;
use crate::wire::ipv4::PROTO_TCP;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PEER: Peer = Peer {
    port: PortId(0),
    mac: MacAddr([0x52, 0x54, 0, 0, 0, 0x0a]),
};

/// A frame without offloads.
const PLAIN: VnetHdr = VnetHdr {
    flags: 0,
    gso_type: gso::NONE,
    hdr_len: 0,
    gso_size: 0,
    csum_start: 0,
    csum_offset: 0,
};

/// A frame whose L4 checksum is left to offload (virtio NEEDS_CSUM).
fn partial() -> VnetHdr {
    VnetHdr {
        flags: crate::wire::vnet::F_NEEDS_CSUM,
        ..PLAIN
    }
}

fn nat(now: Instant) -> SocketNat {
    SocketNat::new(SocketNatConfig::new(GATEWAY, 24), now)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum::checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// A TCP segment from the guest (RFC 9293 3.1), checksum filled in; a SYN carries MSS 1460.
fn segment(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let syn = flags & 0x02 != 0;
    let header = if syn { 24 } else { 20 };
    let mut t = vec![0u8; header];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((header / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    if syn {
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    }
    t.extend_from_slice(data);
    let sum =
        checksum::pseudo_header_v4(GUEST.octets(), REMOTE.octets(), PROTO_TCP, t.len() as u16);
    let c = !checksum::fold(checksum::accumulate(sum, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(GUEST, REMOTE, PROTO_TCP, &t)
}

/// The TCP header fields of a packet the stack sent (after the Ethernet room).
fn tcp_fields(frame: &[u8]) -> (u32, u32, u8) {
    let ip = &frame[ethernet::HEADER_LEN..];
    let t = &ip[usize::from(ip[0] & 0x0f) * 4..];
    (
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        t[13],
    )
}

fn open_action(nat: &mut SocketNat) -> (FlowId, HostSocket) {
    match nat.poll_action() {
        Some(Action::Open(id, what)) => (id, what),
        other => panic!("expected an open, got {other:?}"),
    }
}

/// RFC 9293 3.5: the guest's handshake completes only once the host's connect() did; data
/// then flows both ways through the buffers.
#[test]
fn a_syn_is_held_until_the_host_connects_then_bytes_flow_both_ways() {
    let now = Instant::now();
    let mut nat = nat(now);
    let syn = segment(40000, 80, 1000, 0, 0x02, &[]);
    nat.handle_packet(now, PEER, &syn, &PLAIN).unwrap();
    let (id, what) = open_action(&mut nat);
    assert_eq!(what, HostSocket::Tcp(SocketAddrV4::new(REMOTE, 80)));
    nat.poll_stack(now);
    assert!(
        nat.poll_packet().map(|(frame, _)| frame).is_none(),
        "no SYN-ACK before the host connects"
    );

    // A retransmitted SYN meanwhile changes nothing.
    nat.handle_packet(now, PEER, &syn, &PLAIN).unwrap();
    assert_eq!(nat.counters.tcp_syn_while_connecting, 1);

    let local = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 3), 51000);
    nat.handle_opened(now, id, Ok(local));
    let synack = nat.poll_packet().map(|(frame, _)| frame).expect("SYN-ACK");
    let (server_seq, ack, flags) = tcp_fields(&synack);
    assert_eq!((ack, flags & 0x12), (1001, 0x12));
    assert_eq!(
        &synack[ethernet::HEADER_LEN + 12..ethernet::HEADER_LEN + 16],
        &REMOTE.octets()
    );

    let ack_seg = segment(40000, 80, 1001, server_seq + 1, 0x10, &[]);
    nat.handle_packet(now, PEER, &ack_seg, &PLAIN).unwrap();
    let request = segment(
        40000,
        80,
        1001,
        server_seq + 1,
        0x18,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    nat.handle_packet(now, PEER, &request, &PLAIN).unwrap();
    nat.poll_stack(now);
    assert_eq!(nat.poll_ready(), Some(id));
    let mut to_host = Vec::new();
    let moved = nat.to_host(id, |data| {
        to_host.extend_from_slice(data);
        Ok(data.len())
    });
    assert_eq!(moved.bytes, 18);
    assert_eq!(to_host, b"GET / HTTP/1.0\r\n\r\n");

    let mut answered = false;
    let moved = nat.from_host(now, id, |room| {
        if answered {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        answered = true;
        room[..5].copy_from_slice(b"hello");
        Ok(5)
    });
    assert_eq!(
        moved,
        Transfer {
            bytes: 5,
            blocked: true
        }
    );
    nat.poll_stack(now);
    let mut data = None;
    while let Some(frame) = nat.poll_packet().map(|(frame, _)| frame) {
        let ip = &frame[ethernet::HEADER_LEN..];
        let payload = &ip[40..];
        if !payload.is_empty() {
            data = Some(payload.to_vec());
        }
    }
    assert_eq!(data.as_deref(), Some(&b"hello"[..]));

    // Bulk from the host leaves as one TSO frame cut at the guest's MSS (1460, no options),
    // its checksum partial (the pseudo-header's sum) for the offload to finish.
    let ack = segment(40000, 80, 1019, server_seq + 6, 0x10, &[]);
    nat.handle_packet(now, PEER, &ack, &PLAIN).unwrap();
    let mut sent = false;
    nat.from_host(now, id, |room| {
        if sent {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        sent = true;
        room[..10_000].fill(7);
        Ok(10_000)
    });
    nat.poll_stack(now);
    let (frame, vnet) = nat.poll_packet().expect("bulk segment");
    assert_eq!(frame.len(), ethernet::HEADER_LEN + 40 + 10_000);
    assert_eq!(vnet.gso_type, crate::wire::vnet::gso::TCPV4);
    assert_eq!((vnet.gso_size, vnet.hdr_len), (1460, 54));
    assert!(vnet.needs_csum());
    assert_eq!((vnet.csum_start, vnet.csum_offset), (34, 16));
    assert_eq!(nat.rows(now).len(), 1);
    assert_eq!(nat.rows(now)[0].state, "ESTABLISHED");
}

/// A refused host connect() becomes a RST to the guest (RFC 9293 3.10.7.1), and the flow is
/// gone.
#[test]
fn a_refused_connect_resets_the_guest() {
    let now = Instant::now();
    let mut nat = nat(now);
    nat.handle_packet(now, PEER, &segment(40001, 9, 5000, 0, 0x02, &[]), &PLAIN)
        .unwrap();
    let (id, _) = open_action(&mut nat);
    nat.handle_opened(now, id, Err(io::ErrorKind::ConnectionRefused));
    let rst = nat.poll_packet().map(|(frame, _)| frame).expect("RST");
    let (_, ack, flags) = tcp_fields(&rst);
    assert_eq!((ack, flags), (5001, 0x14));
    let ip = &rst[ethernet::HEADER_LEN..];
    assert_eq!(checksum::checksum(&ip[..20]), 0);
    assert!(tcp_checksum_ok(ip, 20));
    assert_eq!(nat.poll_action(), Some(Action::Close(id)));
    assert!(nat.is_empty());
}

/// RFC 792: an echo socket the host refuses becomes host-unreachable for the guest, quoting
/// its request.
#[test]
fn a_refused_ping_socket_answers_unreachable() {
    let now = Instant::now();
    let mut nat = nat(now);
    let mut echo = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(&[0xab; 56]);
    let c = checksum::checksum(&echo);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    let request = ipv4(GUEST, REMOTE, PROTO_ICMP, &echo);
    nat.handle_packet(now, PEER, &request, &PLAIN).unwrap();
    let (id, what) = open_action(&mut nat);
    assert_eq!(what, HostSocket::Ping);
    nat.handle_opened(now, id, Err(io::ErrorKind::PermissionDenied));
    let frame = nat
        .poll_packet()
        .map(|(frame, _)| frame)
        .expect("unreachable");
    let ip = &frame[ethernet::HEADER_LEN..];
    assert_eq!((ip[20], ip[21]), (3, 1));
    assert_eq!(&ip[12..16], &GATEWAY.octets());
    assert_eq!(&ip[16..20], &GUEST.octets());
}

/// RFC 4787 REQ-1 and REQ-8: one host socket per guest address and port; answers only from
/// where the guest sent (address and port dependent filtering, the default).
#[test]
fn udp_maps_per_guest_port_and_filters_answers() {
    let now = Instant::now();
    let mut nat = nat(now);
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&5000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&10u16.to_be_bytes());
    udp.extend_from_slice(b"hi");
    let datagram = ipv4(GUEST, REMOTE, PROTO_UDP, &udp);
    nat.handle_packet(now, PEER, &datagram, &PLAIN).unwrap();
    nat.handle_packet(now, PEER, &datagram, &PLAIN).unwrap();
    let (id, what) = open_action(&mut nat);
    assert_eq!(
        what,
        HostSocket::Udp {
            preferred: 5000,
            range: (1024, 65535)
        }
    );
    let to = SocketAddrV4::new(REMOTE, 53);
    assert_eq!(
        nat.poll_action(),
        Some(Action::SendTo(id, to, Datagrams::one(b"hi".to_vec())))
    );
    assert_eq!(
        nat.poll_action(),
        Some(Action::SendTo(id, to, Datagrams::one(b"hi".to_vec())))
    );
    nat.handle_opened(now, id, Ok(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5000)));

    nat.handle_datagram(now, id, SocketAddrV4::new(REMOTE, 54), b"other port");
    assert_eq!(nat.counters.udp_filtered, 1);
    assert!(nat.poll_packet().map(|(frame, _)| frame).is_none());
    nat.handle_datagram(now, id, to, b"answer");
    let frame = nat.poll_packet().map(|(frame, _)| frame).expect("answer");
    let ip = &frame[ethernet::HEADER_LEN..];
    assert_eq!(&ip[12..16], &REMOTE.octets());
    assert_eq!(&ip[28..], b"answer");

    // RFC 4787 REQ-5: an idle mapping ends after the UDP timeout.
    let later = now + Duration::from_secs(301);
    nat.handle_timeout(later);
    assert_eq!(nat.poll_action(), Some(Action::Close(id)));
    assert!(nat.is_empty());
}

#[test]
fn nothing_is_sent_to_the_subnet_loopback_or_broadcast() {
    let now = Instant::now();
    let mut nat = nat(now);
    for dst in [
        Ipv4Addr::new(192, 168, 122, 20),
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::BROADCAST,
        GATEWAY,
    ] {
        let mut p = segment(40000, 80, 1, 0, 0x02, &[]);
        p[16..20].copy_from_slice(&dst.octets());
        assert_eq!(
            nat.handle_packet(now, PEER, &p, &partial()),
            Err(DropReason::NoRoute),
            "{dst}"
        );
    }
    assert!(nat.poll_action().is_none());
}

/// A guest's UDP packet from port 5000 to REMOTE:4433 carrying `payload`.
fn udp_packet(payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&5000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&4433u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    ipv4(GUEST, REMOTE, PROTO_UDP, &udp)
}

/// The offload state of a USO super-frame (virtio 1.2 5.1.6.2: `GSO_UDP_L4`, `gso_size` the
/// payload per datagram), with its partial checksum, as a Linux guest's `UDP_SEGMENT` send
/// reaches the tap.
fn uso(gso_size: u16) -> VnetHdr {
    VnetHdr {
        flags: crate::wire::vnet::F_NEEDS_CSUM,
        gso_type: gso::UDP_L4,
        hdr_len: 42,
        gso_size,
        csum_start: 34,
        csum_offset: 6,
    }
}

/// RFC 768: UDP keeps datagram boundaries, so a super-frame leaves the host socket as the
/// datagrams it stands for, each `gso_size` bytes but the last, in order, never as one.
#[test]
fn a_uso_super_frame_leaves_as_its_datagrams() {
    let now = Instant::now();
    let mut nat = nat(now);
    let payload: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    nat.handle_packet(now, PEER, &udp_packet(&payload), &uso(1200))
        .unwrap();
    let (id, _) = open_action(&mut nat);
    let Some(Action::SendTo(to_id, to, datagrams)) = nat.poll_action() else {
        panic!("expected a send");
    };
    assert_eq!((to_id, to), (id, SocketAddrV4::new(REMOTE, 4433)));
    let sizes: Vec<usize> = datagrams.iter().map(<[u8]>::len).collect();
    assert_eq!(sizes, [1200, 1200, 100]);
    assert_eq!(datagrams.iter().collect::<Vec<_>>().concat(), payload);
    assert_eq!(nat.counters.udp_datagrams_out, 3);
    assert_eq!(nat.counters.udp_super_frames_out, 1);
    let row = nat.rows(now)[0].to_string();
    assert!(row.contains("packets=3 bytes=2500"), "{row}");

    // Ten full segments, as the end-to-end test sends them.
    let payload = vec![7u8; 12_000];
    nat.handle_packet(now, PEER, &udp_packet(&payload), &uso(1200))
        .unwrap();
    let Some(Action::SendTo(_, _, datagrams)) = nat.poll_action() else {
        panic!("expected a send");
    };
    assert_eq!(datagrams.count(), 10);
    assert!(datagrams.iter().all(|d| d.len() == 1200));
}

/// virtio 1.2 5.1.6.2.1: the GSO type names the packet's own protocol and a non-zero size;
/// one that does not cannot be cut as it says, and is dropped (counted as bad_vnet_header).
#[test]
fn a_gso_type_that_is_not_the_packets_own_is_refused() {
    let now = Instant::now();
    let mut nat = nat(now);
    let udp = udp_packet(&[1; 3000]);
    let tcp = segment(40000, 80, 1000, 0, 0x02, &[]);
    let tso = VnetHdr {
        gso_type: gso::TCPV4,
        gso_size: 1448,
        ..partial()
    };
    for (packet, vnet) in [(&udp, tso), (&udp, uso(0)), (&tcp, uso(1200))] {
        assert_eq!(
            nat.handle_packet(now, PEER, packet, &vnet),
            Err(DropReason::BadVnetHeader),
            "{vnet:?}"
        );
    }
    assert!(nat.poll_action().is_none());
    assert_eq!(nat.counters.udp_datagrams_out, 0);
}

/// RFC 768: a UDP datagram may carry no data at all; it is still one datagram.
#[test]
fn an_empty_payload_is_one_empty_datagram() {
    let one = Datagrams::one(Vec::new());
    assert_eq!(one.count(), 1);
    assert_eq!(one.iter().collect::<Vec<_>>(), [&[] as &[u8]]);
    let exact = Datagrams {
        data: vec![0; 2400],
        segment: 1200,
    };
    assert_eq!(exact.count(), 2);
}

/// A UDP mapping from GUEST:5000 that has sent to REMOTE:4433, its host socket open.
fn udp_mapping(nat: &mut SocketNat, now: Instant) -> FlowId {
    nat.handle_packet(now, PEER, &udp_packet(b"hello"), &PLAIN)
        .unwrap();
    let (id, _) = open_action(nat);
    assert!(matches!(nat.poll_action(), Some(Action::SendTo(..))));
    nat.handle_opened(now, id, Ok(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5000)));
    id
}

/// RFC 768: the checksum over the pseudo-header (source, destination, protocol, UDP length)
/// and the whole UDP datagram, complemented, verifies when the sum of all of it is all ones.
fn udp_checksum_ok(ip: &[u8]) -> bool {
    let udp = &ip[20..];
    let sum = checksum::pseudo_header_v4(
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
        PROTO_UDP,
        udp.len() as u16,
    );
    checksum::fold(checksum::accumulate(sum, udp)) == 0xffff
}

/// The frames socket NAT queued for guests, with their offload state.
fn frames(nat: &mut SocketNat) -> Vec<(Vec<u8>, VnetHdr)> {
    std::iter::from_fn(|| nat.poll_packet()).collect()
}

/// The datagrams a super-frame stands for, as a device (or the I/O edge for a port without
/// offloads) cuts it: each checked against its own RFC 768 checksum and IPv4 lengths.
fn cut(frame: &[u8], vnet: &VnetHdr) -> Vec<Vec<u8>> {
    let mut segmenter = crate::wire::offload::Segmenter::new(vnet, frame).unwrap();
    let mut out = vec![0; segmenter.max_segment_len()];
    let mut payloads = Vec::new();
    while let Some(len) = segmenter.next_into(&mut out) {
        let ip = &out[ethernet::HEADER_LEN..len];
        assert_eq!(checksum::checksum(&ip[..20]), 0, "IPv4 header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[24], ip[25]])),
            ip.len() - 20
        );
        assert!(udp_checksum_ok(ip), "datagram {} verifies", payloads.len());
        payloads.push(ip[28..].to_vec());
    }
    payloads
}

/// Datagrams the host's kernel coalesced (UDP GRO: one read, its `gso_size` in a control
/// message) reach the guest as one UDP super-frame: IPv4 and UDP lengths over the whole
/// payload, virtio `GSO_UDP_L4` with that size, and a partial checksum (the pseudo-header's
/// sum, RFC 768) that the device completes, or that verifies datagram by datagram once cut.
#[test]
fn coalesced_host_datagrams_reach_the_guest_as_one_uso_frame() {
    let now = Instant::now();
    let mut nat = nat(now);
    let id = udp_mapping(&mut nat, now);
    let from = SocketAddrV4::new(REMOTE, 4433);
    let payload: Vec<u8> = (0..12_000u32).map(|i| (i % 251) as u8).collect();
    nat.handle_datagrams(now, id, from, &payload, Some(1200));

    let mut out = frames(&mut nat);
    assert_eq!(out.len(), 1, "one frame for ten datagrams");
    let (mut frame, vnet) = out.remove(0);
    assert_eq!(frame.len(), ethernet::HEADER_LEN + 20 + 8 + 12_000);
    assert_eq!(&frame[12..14], &[0x08, 0x00]);
    let ip = &frame[ethernet::HEADER_LEN..];
    assert_eq!(checksum::checksum(&ip[..20]), 0, "IPv4 header checksum");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 12_000);
    assert_eq!(ip[9], PROTO_UDP);
    assert_eq!(
        (&ip[12..16], &ip[16..20]),
        (&REMOTE.octets()[..], &GUEST.octets()[..])
    );
    let udp = &ip[20..];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 4433);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 5000);
    assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8 + 12_000);
    assert_eq!(&udp[8..], &payload[..]);
    assert_eq!(
        vnet,
        VnetHdr {
            flags: crate::wire::vnet::F_NEEDS_CSUM,
            gso_type: gso::UDP_L4,
            hdr_len: 42,
            gso_size: 1200,
            csum_start: 34,
            csum_offset: 6,
        }
    );
    // The field holds the pseudo-header's sum over the whole UDP length, uncomplemented, as
    // Linux leaves a CHECKSUM_PARTIAL packet.
    let pseudo = checksum::pseudo_header_v4(REMOTE.octets(), GUEST.octets(), PROTO_UDP, 12_008);
    assert_eq!(&udp[6..8], &checksum::fold(pseudo).to_be_bytes());

    // Cut as a device or the I/O edge cuts it: ten datagrams, each whole and verifying.
    let datagrams = cut(&frame, &vnet);
    assert_eq!(datagrams.len(), 10);
    assert!(datagrams.iter().all(|d| d.len() == 1200));
    assert_eq!(datagrams.concat(), payload);

    // Completed whole (virtio 1.2 5.1.6.2: the sum from csum_start, stored at csum_offset),
    // the super-frame is one valid long UDP datagram.
    crate::wire::offload::complete_checksum(&vnet, &mut frame).unwrap();
    assert!(udp_checksum_ok(&frame[ethernet::HEADER_LEN..]));

    assert_eq!(nat.counters.udp_datagrams_in, 10);
    assert_eq!(nat.counters.udp_super_frames_in, 1);
    let row = &nat.rows(now)[0];
    assert_eq!((row.packets[1], row.bytes[1]), (10, 12_000));
}

/// A coalesced read whose last datagram is short is still one super-frame, cut at the same
/// sizes; a read of one datagram (a size no shorter than the data, or none) is a plain frame
/// with its full checksum.
#[test]
fn a_short_last_datagram_and_a_lone_one() {
    let now = Instant::now();
    let mut nat = nat(now);
    let id = udp_mapping(&mut nat, now);
    let from = SocketAddrV4::new(REMOTE, 4433);
    let payload: Vec<u8> = (0..2500u32).map(|i| (i % 13) as u8).collect();
    nat.handle_datagrams(now, id, from, &payload, Some(1200));
    let (frame, vnet) = frames(&mut nat).remove(0);
    let sizes: Vec<usize> = cut(&frame, &vnet).iter().map(Vec::len).collect();
    assert_eq!(sizes, [1200, 1200, 100]);

    for segment in [None, Some(1200), Some(5000)] {
        nat.handle_datagrams(now, id, from, &payload[..1200], segment);
        let (frame, vnet) = frames(&mut nat).remove(0);
        assert_eq!(vnet, VnetHdr::default(), "{segment:?}");
        assert!(udp_checksum_ok(&frame[ethernet::HEADER_LEN..]));
    }
    assert_eq!(nat.counters.udp_datagrams_in, 6);
    assert_eq!(nat.counters.udp_super_frames_in, 1);
}

/// `<sy:nat filtering>` refuses a coalesced read from where the guest never sent as it
/// refuses each datagram in it: all counted, none reaching the guest.
#[test]
fn a_coalesced_read_is_filtered_as_its_datagrams() {
    let now = Instant::now();
    let mut nat = nat(now);
    let id = udp_mapping(&mut nat, now);
    nat.handle_datagrams(
        now,
        id,
        SocketAddrV4::new(REMOTE, 4434),
        &[1; 12_000],
        Some(1200),
    );
    assert!(frames(&mut nat).is_empty());
    assert_eq!(nat.counters.udp_filtered, 10);
    assert_eq!(nat.counters.udp_datagrams_in, 0);
    assert_eq!(nat.counters.udp_super_frames_in, 0);
}

/// No frame outgrows the engine's buffers (64 KiB and headers) or Linux's 64 datagrams per
/// `GSO_UDP_L4` frame: a longer read is cut into several super-frames, whole datagrams each,
/// and a datagram no IPv4 packet can carry is dropped and counted, never a panic.
#[test]
fn coalesced_reads_past_one_frame_are_split_and_impossible_ones_dropped() {
    let now = Instant::now();
    let mut nat = nat(now);
    let id = udp_mapping(&mut nat, now);
    let from = SocketAddrV4::new(REMOTE, 4433);
    let cases: [(usize, usize, &[usize]); 3] = [
        // 100 x 1000 bytes: 64 datagrams (the segment cap) then 36.
        (1000, 100, &[64, 36]),
        // 5 x 30000 bytes: two per frame fit in 64 KiB, then the last.
        (30_000, 5, &[2, 2, 1]),
        // 200 x 100 bytes: 64, 64, 64, 8.
        (100, 200, &[64, 64, 64, 8]),
    ];
    for (segment, count, per_frame) in cases {
        let payload: Vec<u8> = (0..segment * count).map(|i| (i % 241) as u8).collect();
        nat.handle_datagrams(now, id, from, &payload, Some(segment));
        let mut datagrams = Vec::new();
        let mut counts = Vec::new();
        for (frame, vnet) in frames(&mut nat) {
            assert!(frame.len() <= crate::engine::MAX_FRAME_LEN);
            assert!(frame.len() - ethernet::HEADER_LEN <= 65535);
            let got = if vnet.is_gso() {
                cut(&frame, &vnet)
            } else {
                vec![frame[ethernet::HEADER_LEN + 28..].to_vec()]
            };
            counts.push(got.len());
            datagrams.extend(got);
        }
        assert_eq!(counts, per_frame, "{segment} x {count}");
        assert!(datagrams.iter().all(|d| d.len() == segment));
        assert_eq!(datagrams.concat(), payload);
    }
    assert_eq!(nat.counters.udp_datagrams_in, 305);
    assert_eq!(nat.counters.udp_super_frames_in, 2 + 2 + 4);

    // More than an IPv4 packet holds, as one datagram or as the size of each.
    nat.handle_datagrams(now, id, from, &vec![0; 70_000], None);
    nat.handle_datagrams(now, id, from, &vec![0; 140_000], Some(70_000));
    assert!(frames(&mut nat).is_empty());
    assert_eq!(nat.counters.udp_oversize_in, 3);
    assert_eq!(nat.counters.udp_datagrams_in, 305);
}

/// A forwarded UDP port's coalesced read reaches the guest the same way, from the gateway
/// port kept for that peer.
#[test]
fn a_forwarded_ports_coalesced_read_is_one_uso_frame() {
    let now = Instant::now();
    let mut nat = nat(now);
    let peer = SocketAddrV4::new(REMOTE, 7000);
    let guest = SocketAddrV4::new(GUEST, 5353);
    nat.handle_forwarded_datagrams(now, (0, peer), guest, &[9; 4800], Some(1200));
    let (frame, vnet) = frames(&mut nat).remove(0);
    assert_eq!((vnet.gso_type, vnet.gso_size), (gso::UDP_L4, 1200));
    let ip = &frame[ethernet::HEADER_LEN..];
    assert_eq!(
        (&ip[12..16], &ip[16..20]),
        (&GATEWAY.octets()[..], &GUEST.octets()[..])
    );
    assert_eq!(u16::from_be_bytes([ip[22], ip[23]]), 5353);
    assert_eq!(cut(&frame, &vnet).len(), 4);
    assert_eq!(nat.counters.udp_datagrams_in, 4);
    assert_eq!(nat.counters.udp_super_frames_in, 1);
    assert_eq!(nat.rows(now)[0].packets[1], 4);
}

/// What a worker's socket NAT takes from its queue: a connection's first SYN (RFC 9293 3.5)
/// and the segments of connections it holds; not a segment of one it does not hold (the
/// engine's), not the gateway's own ports, not UDP, not a fragment.
#[test]
fn a_shard_claims_syns_and_its_own_connections_only() {
    let now = Instant::now();
    let mut nat = nat(now);
    let syn = segment(40000, 80, 1000, 0, 0x02, &[]);
    let ack = segment(40000, 80, 1001, 1, 0x10, &[]);
    assert_eq!(nat.claim(&syn, PEER), Claim::Opens);
    assert_eq!(
        nat.claim(&ack, PEER),
        Claim::Not,
        "another thread's connection"
    );
    assert_eq!(
        nat.claim(&segment(40000, 80, 1000, 1, 0x12, &[]), PEER),
        Claim::Not,
        "a SYN-ACK opens nothing"
    );
    nat.handle_packet(now, PEER, &syn, &PLAIN).unwrap();
    assert_eq!(nat.claim(&ack, PEER), Claim::Held, "held from its SYN on");
    assert_eq!(
        nat.claim(&syn, PEER),
        Claim::Held,
        "a retransmitted SYN too"
    );
    let elsewhere = Peer {
        port: PortId(3),
        ..PEER
    };
    assert_eq!(
        nat.claim(&ack, elsewhere),
        Claim::Not,
        "another port forging the guest's address: the engine's guard sees it"
    );
    assert_eq!(
        nat.claim(&segment(40001, 80, 1001, 1, 0x10, &[]), PEER),
        Claim::Not
    );

    let mut to_gateway = segment(40002, 80, 1000, 0, 0x02, &[]);
    to_gateway[16..20].copy_from_slice(&GATEWAY.octets());
    assert_eq!(
        nat.claim(&to_gateway, PEER),
        Claim::Not,
        "the gateway's ports"
    );
    let mut fragment = syn.clone();
    fragment[6] = 0x20;
    assert_eq!(nat.claim(&fragment, PEER), Claim::Not);
    assert_eq!(nat.claim(&udp_packet(b"dns?"), PEER), Claim::Not);
}

/// A guest's port goes away: its connections end and their host sockets are closed, and
/// nothing more is sent towards that port.
#[test]
fn a_removed_ports_guests_lose_their_connections() {
    let now = Instant::now();
    let mut nat = nat(now);
    let syn = segment(40000, 80, 1000, 0, 0x02, &[]);
    nat.handle_packet(now, PEER, &syn, &PLAIN).unwrap();
    let (id, _) = open_action(&mut nat);
    nat.forget_port(PortId(1));
    assert!(
        nat.peer(GUEST).is_some(),
        "another port's removal changes nothing"
    );
    nat.forget_port(PEER.port);
    assert_eq!(nat.peer(GUEST), None);
    assert_eq!(nat.len(), 0);
    assert_eq!(nat.poll_action(), Some(Action::Close(id)));
}

/// The caps are the network's: a guest's connections count against `max_flows_per_guest`
/// in all, whichever threads' socket NATs hold them, and a place comes back when its
/// connection ends, or its socket NAT with it.
#[test]
fn socket_nats_sharing_caps_hold_a_guests_connections_to_the_one_cap() {
    let now = Instant::now();
    let mut config = SocketNatConfig::new(GATEWAY, 24);
    config.max_flows_per_guest = 2;
    let mut engine = SocketNat::new(config.clone(), now);
    let mut worker = SocketNat::sharing_caps(config, engine.caps(), now);
    let syn = |sport| segment(sport, 80, 1000, 0, 0x02, &[]);
    engine
        .handle_packet(now, PEER, &syn(40000), &PLAIN)
        .unwrap();
    worker
        .handle_packet(now, PEER, &syn(40001), &PLAIN)
        .unwrap();
    assert_eq!(engine.caps().flows(), 2);
    assert_eq!(
        worker.handle_packet(now, PEER, &syn(40002), &PLAIN),
        Err(DropReason::NatGuestLimit)
    );
    assert_eq!(
        engine.handle_packet(now, PEER, &syn(40003), &PLAIN),
        Err(DropReason::NatGuestLimit)
    );
    assert_eq!(
        (worker.counters.guest_limit, engine.counters.guest_limit),
        (1, 1)
    );
    // The engine's connection ends: the worker may open one more.
    engine.forget_port(PEER.port);
    worker
        .handle_packet(now, PEER, &syn(40002), &PLAIN)
        .unwrap();
    assert_eq!(engine.caps().flows(), 2);
    // A worker's socket NAT that goes away gives its places back.
    drop(worker);
    assert_eq!(engine.caps().flows(), 0);
    engine
        .handle_packet(now, PEER, &syn(40004), &PLAIN)
        .unwrap();
}

/// A datagram from the guest's `sport` to REMOTE:53.
fn query(sport: u16) -> Vec<u8> {
    query_from(GUEST, sport)
}

/// A datagram from `src`'s `sport` to REMOTE:53.
fn query_from(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&9u16.to_be_bytes());
    udp.push(b'q');
    ipv4(src, REMOTE, PROTO_UDP, &udp)
}

/// The flow (its host socket's id) that `sport`'s first datagram opened.
fn opened_by(nat: &mut SocketNat, now: Instant, sport: u16) -> FlowId {
    nat.handle_packet(now, PEER, &query(sport), &PLAIN).unwrap();
    let (id, _) = open_action(nat);
    nat.handle_opened(now, id, Ok(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport)));
    while nat.poll_action().is_some() {}
    id
}

// As packet NAT and Linux's early_drop: at a cap, a UDP flow that is not assured (one query and
// its answer) or past its timeout gives its place to a new one, oldest first; a UDP stream
// (both ways twice) never does, and with only such streams the cap refuses.
#[test]
fn unassured_udp_flows_make_room_at_the_caps() {
    let now = Instant::now();
    let mut config = SocketNatConfig::new(GATEWAY, 24);
    config.max_flows_per_guest = 2;
    let mut nat = SocketNat::new(config, now);
    let from = SocketAddrV4::new(REMOTE, 53);
    let answered = opened_by(&mut nat, now, 5001);
    nat.handle_datagram(now, answered, from, b"a");
    let stream = opened_by(&mut nat, now, 5002);
    for _ in 0..2 {
        nat.handle_packet(now, PEER, &query(5002), &PLAIN).unwrap();
        nat.handle_datagram(now, stream, from, b"a");
    }
    while nat.poll_packet().is_some() {}
    while nat.poll_action().is_some() {}
    // The query and its answer go for the next query.
    nat.handle_packet(now, PEER, &query(5003), &PLAIN).unwrap();
    assert_eq!(nat.poll_action(), Some(Action::Close(answered)));
    assert_eq!(nat.counters.flows_evicted, 1);
    while nat.poll_action().is_some() {}
    // Unanswered queries take each other's places; the stream stays.
    for sport in 5004..5010 {
        nat.handle_packet(now, PEER, &query(sport), &PLAIN).unwrap();
        while let Some(action) = nat.poll_action() {
            assert_ne!(action, Action::Close(stream));
        }
    }
    assert_eq!(nat.counters.flows_evicted, 7);
    assert_eq!(nat.len(), 2);

    // A stream only: refused, and counted; past its timeout (before the sweep), it goes,
    // counted as expired.
    for expired in [false, true] {
        let mut config = SocketNatConfig::new(GATEWAY, 24);
        config.max_flows_per_guest = 1;
        let mut nat = SocketNat::new(config, now);
        let stream = opened_by(&mut nat, now, 6001);
        for _ in 0..2 {
            nat.handle_packet(now, PEER, &query(6001), &PLAIN).unwrap();
            nat.handle_datagram(now, stream, from, b"a");
        }
        if expired {
            let later = now + Duration::from_secs(301);
            nat.handle_packet(later, PEER, &query(6002), &PLAIN)
                .unwrap();
            assert_eq!(nat.counters.flows_expired, 1);
        } else {
            assert_eq!(
                nat.handle_packet(now, PEER, &query(6002), &PLAIN),
                Err(DropReason::NatGuestLimit)
            );
            assert_eq!(
                (nat.counters.guest_limit, nat.counters.flows_evicted),
                (1, 0)
            );
        }
    }
}

// Both caps full at once (the table's and the guest's): the guest's own flow makes room, not
// another guest's; and a worker's shard leaves a SYN at the cap to the engine, whose socket NAT
// holds the flows that may make room.
#[test]
fn at_both_caps_a_guest_makes_room_from_its_own_flows_and_shards_defer_to_the_engine() {
    let now = Instant::now();
    let other = Ipv4Addr::new(192, 168, 122, 11);
    let mut config = SocketNatConfig::new(GATEWAY, 24);
    config.max_flows = 2;
    config.max_flows_per_guest = 1;
    let caps = Arc::new(SharedCaps::default());
    let mut nat = SocketNat::sharing_caps(config.clone(), caps.clone(), now);
    let shard = SocketNat::sharing_caps(config, caps, now);
    let syn = segment(40000, 80, 1000, 0, 0x02, &[]);
    assert_eq!(shard.claim(&syn, PEER), Claim::Opens, "below the caps");
    nat.handle_packet(now, PEER, &query_from(other, 7000), &PLAIN)
        .unwrap();
    let (theirs, _) = open_action(&mut nat);
    while nat.poll_action().is_some() {}
    nat.handle_packet(now, PEER, &query(5000), &PLAIN).unwrap();
    let (mine, _) = open_action(&mut nat);
    while nat.poll_action().is_some() {}
    assert_eq!(
        shard.claim(&syn, PEER),
        Claim::Not,
        "at the cap: the engine's"
    );
    nat.handle_packet(now, PEER, &query(5001), &PLAIN).unwrap();
    let mut closed = Vec::new();
    while let Some(action) = nat.poll_action() {
        if let Action::Close(id) = action {
            closed.push(id);
        }
    }
    assert_eq!(closed, [mine]);
    assert_ne!(mine, theirs);
    assert_eq!(nat.counters.flows_evicted, 1);
}
