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
