//! Client conversations against the server, built with dhcproto as a client would build them.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

use super::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
const UNSPEC: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const T0: u64 = 1_700_000_000;
const A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];
const C: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0c];
const XID: u32 = 0x1234_5678;

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 122, n)
}

fn config() -> DhcpConfig {
    DhcpConfig::new(SERVER, 24, (ip(2), ip(254)))
}

fn server_with(config: DhcpConfig) -> DhcpServer {
    DhcpServer::new(config, Vec::new(), T0)
}

fn server() -> DhcpServer {
    server_with(config())
}

fn msg(t: MessageType, mac: [u8; 6]) -> Message {
    let mut m = Message::new_with_id(XID, UNSPEC, UNSPEC, UNSPEC, UNSPEC, &mac);
    m.opts_mut().insert(DhcpOption::MessageType(t));
    m
}

fn discover(mac: [u8; 6]) -> Message {
    msg(MessageType::Discover, mac)
}

/// A REQUEST in the SELECTING state (RFC 2131 4.3.2): option 54 and option 50.
fn select(mac: [u8; 6], server: Ipv4Addr, addr: Ipv4Addr) -> Message {
    let mut m = msg(MessageType::Request, mac);
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
    m
}

/// A REQUEST in the RENEWING or REBINDING state: ciaddr, no 50 or 54.
fn renew(mac: [u8; 6], addr: Ipv4Addr) -> Message {
    let mut m = msg(MessageType::Request, mac);
    m.set_ciaddr(addr);
    m
}

/// A REQUEST in the INIT-REBOOT state: option 50, no 54, ciaddr 0.
fn init_reboot(mac: [u8; 6], addr: Ipv4Addr) -> Message {
    let mut m = msg(MessageType::Request, mac);
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(addr));
    m
}

fn with(mut m: Message, opt: DhcpOption) -> Message {
    m.opts_mut().insert(opt);
    m
}

fn broadcast(mut m: Message) -> Message {
    m.set_flags(Flags::default().set_broadcast());
    m
}

fn mac_of(m: &Message) -> [u8; 6] {
    m.chaddr().try_into().unwrap()
}

fn send(s: &mut DhcpServer, now: u64, m: &Message) -> Result<Option<Reply>, DhcpDrop> {
    s.handle_message(now, mac_of(m), m.ciaddr(), &m.to_vec().unwrap())
}

/// Sends `m`, expects a reply, checks what every reply must satisfy, and decodes it.
fn exchange(s: &mut DhcpServer, now: u64, m: &Message) -> (Reply, Message) {
    let reply = send(s, now, m).unwrap().expect("a reply");
    // RFC 1542 2.1 / RFC 951: a BOOTP message is at least 300 bytes.
    assert!(
        reply.payload.len() >= 300,
        "reply of {} bytes",
        reply.payload.len()
    );
    // RFC 2131 4.1: option 53 is the first option (clients such as some PXE ROMs rely on it).
    assert_eq!(wire::option_codes(&reply.payload).first(), Some(&53));
    let decoded = Message::decode(&mut Decoder::new(&reply.payload)).unwrap();
    // RFC 2131 4.3.1 table 3: op BOOTREPLY, xid and chaddr from the request.
    assert_eq!(decoded.opcode(), Opcode::BootReply);
    assert_eq!(decoded.xid(), m.xid());
    assert_eq!(decoded.chaddr(), m.chaddr());
    assert_eq!(decoded.giaddr(), m.giaddr());
    assert_eq!(decoded.flags(), {
        let mut f = m.flags();
        if !m.giaddr().is_unspecified() && decoded.opts().has_msg_type(MessageType::Nak) {
            f = f.set_broadcast();
        }
        f
    });
    (reply, decoded)
}

fn kind(m: &Message) -> MessageType {
    m.opts().msg_type().unwrap()
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

/// DISCOVER, OFFER, REQUEST, ACK; returns the address.
fn dora(s: &mut DhcpServer, now: u64, mac: [u8; 6]) -> Ipv4Addr {
    let (_, offer) = exchange(s, now, &discover(mac));
    assert_eq!(kind(&offer), MessageType::Offer);
    let (_, ack) = exchange(s, now, &select(mac, SERVER, offer.yiaddr()));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    ack.yiaddr()
}

fn events(s: &mut DhcpServer) -> Vec<LeaseEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn lease_at(s: &DhcpServer, addr: Ipv4Addr) -> Option<&Lease> {
    s.leases().find(|l| l.ip == addr)
}

// ---- DORA and reply destinations ----

#[test]
fn dora_with_broadcast_flag() {
    let mut s = server();
    // RFC 2131 4.1: the broadcast bit asks for broadcast replies (the client cannot receive
    // unicast before it has an address).
    let (reply, offer) = exchange(&mut s, T0, &broadcast(discover(A)));
    assert_eq!(reply.to, Destination::Broadcast);
    assert!(!reply.durable);
    assert_eq!(kind(&offer), MessageType::Offer);
    assert_eq!(offer.yiaddr(), ip(2));
    assert_eq!(offer.ciaddr(), UNSPEC);
    assert_eq!(offer.siaddr(), UNSPEC);
    // RFC 2131 4.3.1 table 3: lease time and server identifier in an OFFER.
    assert_eq!(
        opt(&offer, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        opt(&offer, OptionCode::Renewal),
        Some(&DhcpOption::Renewal(1800))
    );
    assert_eq!(
        opt(&offer, OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(3150))
    );
    assert_eq!(
        opt(&offer, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        opt(&offer, OptionCode::Router),
        Some(&DhcpOption::Router(vec![SERVER]))
    );
    assert_eq!(
        opt(&offer, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![SERVER]))
    );
    assert_eq!(
        opt(&offer, OptionCode::BroadcastAddr),
        Some(&DhcpOption::BroadcastAddr(ip(255)))
    );
    assert_eq!(opt(&offer, OptionCode::DomainName), None);
    assert_eq!(s.leases().count(), 0, "an offer is not a lease");
    assert_eq!(s.poll_timeout(), Some(T0 + OFFER_HOLD_SECS));

    let req = broadcast(with(
        select(A, SERVER, ip(2)),
        DhcpOption::Hostname("vm-a".into()),
    ));
    let (reply, ack) = exchange(&mut s, T0 + 1, &req);
    assert_eq!(reply.to, Destination::Broadcast);
    assert!(
        reply.durable,
        "a new lease must reach the lease file before the ACK"
    );
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), ip(2));
    let lease = lease_at(&s, ip(2)).unwrap().clone();
    assert_eq!(
        lease,
        Lease {
            expiry: Some(T0 + 1 + 3600),
            mac: A,
            ip: ip(2),
            hostname: Some("vm-a".into()),
            client_id: None,
        }
    );
    assert_eq!(s.generation(), 1);
    assert_eq!(events(&mut s), vec![LeaseEvent::Added(lease)]);
    assert_eq!(
        s.poll_timeout(),
        Some(T0 + 1 + 3600),
        "the offer is gone, the lease remains"
    );
    let c = s.counters();
    assert_eq!((c.discovers, c.offers, c.requests, c.acks), (1, 1, 1, 1));
}

#[test]
fn dora_without_broadcast_flag_is_unicast_to_yiaddr() {
    let mut s = server();
    // RFC 2131 4.1: no broadcast bit, no ciaddr, no giaddr: unicast to yiaddr and chaddr.
    let (reply, offer) = exchange(&mut s, T0, &discover(A));
    let unicast = Destination::Unicast {
        ip: ip(2),
        mac: A,
        port: 68,
    };
    assert_eq!(reply.to, unicast);
    assert_eq!(offer.yiaddr(), ip(2));
    let (reply, _) = exchange(&mut s, T0, &select(A, SERVER, ip(2)));
    assert_eq!(reply.to, unicast);
}

#[test]
fn second_client_gets_next_address() {
    let mut s = server();
    assert_eq!(dora(&mut s, T0, A), ip(2));
    // An outstanding offer holds its address too.
    let (_, offer_b) = exchange(&mut s, T0, &discover(B));
    assert_eq!(offer_b.yiaddr(), ip(3));
    let (_, offer_c) = exchange(&mut s, T0, &discover(C));
    assert_eq!(offer_c.yiaddr(), ip(4));
    // A repeated DISCOVER gets the same offer.
    let (_, again) = exchange(&mut s, T0 + 5, &discover(B));
    assert_eq!(again.yiaddr(), ip(3));
}

#[test]
fn renewing_is_unicast_to_ciaddr() {
    let mut s = server();
    let addr = dora(&mut s, T0, A);
    events(&mut s);
    // RFC 2131 4.3.2 RENEWING: ciaddr set, no 50/54; 4.1: reply unicast to ciaddr.
    let (reply, ack) = exchange(&mut s, T0 + 1800, &renew(A, addr));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), addr);
    assert_eq!(ack.ciaddr(), addr);
    assert_eq!(
        reply.to,
        Destination::Unicast {
            ip: addr,
            mac: A,
            port: 68
        }
    );
    assert!(reply.durable, "the expiry moved");
    assert_eq!(lease_at(&s, addr).unwrap().expiry, Some(T0 + 1800 + 3600));
    assert_eq!(s.generation(), 2);
    assert_eq!(events(&mut s), vec![], "a renewal changes no name");
    assert_eq!(s.poll_timeout(), Some(T0 + 1800 + 3600));
    // The same request again in the same second changes nothing.
    let (reply, _) = exchange(&mut s, T0 + 1800, &renew(A, addr));
    assert!(!reply.durable);
    assert_eq!(s.generation(), 2);
}

#[test]
fn rebinding() {
    let mut s = server();
    let addr = dora(&mut s, T0, A);
    // RFC 2131 4.3.2 REBINDING: broadcast with ciaddr; the reply still goes to ciaddr (4.1).
    let (reply, ack) = exchange(&mut s, T0 + 3200, &broadcast(renew(A, addr)));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(
        reply.to,
        Destination::Unicast {
            ip: addr,
            mac: A,
            port: 68
        }
    );
    // A client rebinding an address we have no record of (say, after our lease file was lost)
    // keeps it if it is free, as dnsmasq does.
    let (_, ack) = exchange(&mut s, T0 + 3200, &broadcast(renew(B, ip(77))));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(lease_at(&s, ip(77)).unwrap().mac, B);
    // But not someone else's address.
    let (reply, nak) = exchange(&mut s, T0 + 3200, &broadcast(renew(C, addr)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(reply.to, Destination::Broadcast);
    assert_eq!(s.counters().nak_in_use, 1);
    assert_eq!(lease_at(&s, addr).unwrap().mac, A);
}

#[test]
fn init_reboot_ack_for_own_address_nak_for_foreign() {
    let mut s = server();
    let addr = dora(&mut s, T0, A);
    // RFC 2131 4.3.2 INIT-REBOOT: the client's own address is confirmed.
    let (reply, ack) = exchange(&mut s, T0 + 60, &init_reboot(A, addr));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), addr);
    assert_eq!(
        reply.to,
        Destination::Unicast {
            ip: addr,
            mac: A,
            port: 68
        }
    );
    // Another client's address: DHCPNAK, broadcast (4.3.2, 4.1), with only 53, 54 and 56.
    let (reply, nak) = exchange(&mut s, T0 + 60, &init_reboot(B, addr));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(reply.to, Destination::Broadcast);
    assert_eq!(nak.yiaddr(), UNSPEC);
    assert_eq!(wire::option_codes(&reply.payload), vec![53, 54, 56]);
    // An address of another network (the client moved): DHCPNAK.
    let (_, nak) = exchange(&mut s, T0 + 60, &init_reboot(B, Ipv4Addr::new(10, 0, 0, 5)));
    assert_eq!(kind(&nak), MessageType::Nak);
    // 4.3.2 would have us stay silent about a client we have no record of; dnsmasq
    // acknowledges a free address of the range, and so do we.
    let (_, ack) = exchange(&mut s, T0 + 60, &init_reboot(B, ip(99)));
    assert_eq!(kind(&ack), MessageType::Ack);
    // In the subnet but outside the range, and not reserved: DHCPNAK.
    let mut narrow = config();
    narrow.range = (ip(100), ip(200));
    let mut s2 = server_with(narrow);
    let (_, nak) = exchange(&mut s2, T0, &init_reboot(B, ip(99)));
    assert_eq!(kind(&nak), MessageType::Nak);
    let c = s.counters();
    assert_eq!((c.naks, c.nak_in_use, c.nak_not_in_subnet), (2, 1, 1));
    assert_eq!(s2.counters().nak_not_in_range, 1);
}

#[test]
fn selecting_another_server_is_silent_and_frees_the_offer() {
    let mut s = server();
    let (_, offer) = exchange(&mut s, T0, &discover(A));
    assert_eq!(offer.yiaddr(), ip(2));
    // RFC 2131 4.3.2: a REQUEST naming another server id tells us our offer was declined.
    let other = Ipv4Addr::new(192, 168, 122, 250);
    assert_eq!(
        send(&mut s, T0 + 1, &select(A, other, ip(2))),
        Err(DhcpDrop::NotForUs)
    );
    assert_eq!(s.counters().not_for_us, 1);
    assert_eq!(s.leases().count(), 0);
    let (_, offer_b) = exchange(&mut s, T0 + 2, &discover(B));
    assert_eq!(offer_b.yiaddr(), ip(2), "the withdrawn offer is free again");
}

#[test]
fn selecting_an_address_that_is_not_available_is_nakd() {
    let mut s = server();
    let (_, offer) = exchange(&mut s, T0, &discover(A));
    // B asks for the address held for A's pending offer.
    let (_, nak) = exchange(&mut s, T0, &select(B, SERVER, offer.yiaddr()));
    assert_eq!(kind(&nak), MessageType::Nak);
    // A SELECTING request without an address at all is dropped.
    let mut bare = msg(MessageType::Request, A);
    bare.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    assert_eq!(send(&mut s, T0, &bare), Err(DhcpDrop::NoAddress));
    assert_eq!(s.counters().no_address, 1);
}

#[test]
fn offers_expire() {
    let mut s = server();
    exchange(&mut s, T0, &discover(A));
    assert_eq!(s.poll_timeout(), Some(T0 + OFFER_HOLD_SECS));
    s.handle_timeout(T0 + OFFER_HOLD_SECS - 1);
    assert_eq!(s.counters().offers_expired, 0);
    s.handle_timeout(T0 + OFFER_HOLD_SECS);
    assert_eq!(s.counters().offers_expired, 1);
    assert_eq!(s.poll_timeout(), None);
    let (_, offer_b) = exchange(&mut s, T0 + OFFER_HOLD_SECS, &discover(B));
    assert_eq!(offer_b.yiaddr(), ip(2));
}

#[test]
fn same_address_after_expiry() {
    let mut s = server();
    assert_eq!(dora(&mut s, T0, A), ip(2));
    assert_eq!(dora(&mut s, T0, B), ip(3));
    events(&mut s);
    assert_eq!(s.poll_timeout(), Some(T0 + 3600));
    s.handle_timeout(T0 + 3600);
    assert_eq!(s.leases().count(), 0, "a lease whose expiry is now is over");
    assert_eq!(s.counters().leases_expired, 2);
    assert_eq!(s.generation(), 4);
    assert!(matches!(
        events(&mut s)[..],
        [LeaseEvent::Removed(_), LeaseEvent::Removed(_)]
    ));
    // B comes back first: it gets its old address, not the first free one.
    assert_eq!(dora(&mut s, T0 + 7200, B), ip(3));
    assert_eq!(dora(&mut s, T0 + 7200, A), ip(2));
}

#[test]
fn expired_leases_in_the_file_are_remembered() {
    let old = Lease {
        expiry: Some(T0 - 10),
        mac: A,
        ip: ip(40),
        hostname: None,
        client_id: None,
    };
    let mut s = DhcpServer::new(config(), vec![old], T0);
    assert_eq!(s.leases().count(), 0);
    assert_eq!(dora(&mut s, T0, A), ip(40));
}

#[test]
fn client_identifier_is_the_identity() {
    let mut s = server();
    // RFC 2131 4.2: with option 61 the client identifier, not chaddr, names the client: two
    // clients behind one MAC (say, two OSes in one VM) get two addresses.
    let one = DhcpOption::ClientIdentifier(vec![0xff, 1, 2, 3]);
    let two = DhcpOption::ClientIdentifier(vec![0xff, 4, 5, 6]);
    let (_, o1) = exchange(&mut s, T0, &with(discover(A), one.clone()));
    exchange(
        &mut s,
        T0,
        &with(select(A, SERVER, o1.yiaddr()), one.clone()),
    );
    let (_, o2) = exchange(&mut s, T0, &with(discover(A), two.clone()));
    assert_ne!(o1.yiaddr(), o2.yiaddr());
    exchange(
        &mut s,
        T0,
        &with(select(A, SERVER, o2.yiaddr()), two.clone()),
    );
    assert_eq!(s.leases().count(), 2);
    assert_eq!(
        lease_at(&s, o1.yiaddr()).unwrap().client_id,
        Some(vec![0xff, 1, 2, 3])
    );
    // The same identifier from another MAC is the same client: same address.
    let (_, o3) = exchange(&mut s, T0 + 10, &with(discover(B), one.clone()));
    assert_eq!(o3.yiaddr(), o1.yiaddr());
    events(&mut s);
    let (_, ack) = exchange(&mut s, T0 + 10, &with(select(B, SERVER, o3.yiaddr()), one));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(lease_at(&s, o1.yiaddr()).unwrap().mac, B);
    assert_eq!(s.leases().count(), 2);
    // The owner changed: the name record is replaced.
    assert!(matches!(
        events(&mut s)[..],
        [LeaseEvent::Removed(_), LeaseEvent::Added(_)]
    ));
    // Without option 61, chaddr names the client.
    let (_, o4) = exchange(&mut s, T0 + 10, &discover(C));
    assert_ne!(o4.yiaddr(), o1.yiaddr());
    assert_ne!(o4.yiaddr(), o2.yiaddr());
}

#[test]
fn reservation_wins_over_a_dynamic_lease() {
    let mut s = server();
    assert_eq!(dora(&mut s, T0, B), ip(2));
    assert_eq!(dora(&mut s, T0, A), ip(3));
    events(&mut s);
    let generation = s.generation();
    // `virsh net-update default add ip-dhcp-host "<host mac='..0a' name='web' ip='..2'/>" --live`
    s.update_hosts(
        T0 + 10,
        vec![HostReservation {
            mac: A,
            name: Some("web".into()),
            ip: Some(ip(2)),
        }],
    );
    // B's lease of the reserved address is revoked, so the DNS drops its name; A's dynamic
    // lease elsewhere ends as well, since A must move to its reservation.
    let ev = events(&mut s);
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| matches!(e, LeaseEvent::Removed(_))));
    assert_eq!(s.generation(), generation + 2);
    assert_eq!(s.counters().leases_revoked, 2);
    // B renewing the reserved address is refused (RFC 2131 4.3.2: NAK an address the client
    // may not have).
    let (_, nak) = exchange(&mut s, T0 + 20, &renew(B, ip(2)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(s.counters().nak_reserved, 1);
    // A renewing its old address is told to come back for its static one.
    let (_, nak) = exchange(&mut s, T0 + 20, &renew(A, ip(3)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(s.counters().nak_static_elsewhere, 1);
    // A gets the reserved address with the reserved name, whatever name it sends.
    let (_, offer) = exchange(&mut s, T0 + 30, &discover(A));
    assert_eq!(offer.yiaddr(), ip(2));
    let req = with(
        select(A, SERVER, ip(2)),
        DhcpOption::Hostname("other".into()),
    );
    let (_, ack) = exchange(&mut s, T0 + 30, &req);
    assert_eq!(kind(&ack), MessageType::Ack);
    let lease = lease_at(&s, ip(2)).unwrap();
    assert_eq!((lease.mac, lease.hostname.as_deref()), (A, Some("web")));
    // B is never offered the reserved address.
    let (_, offer_b) = exchange(&mut s, T0 + 30, &discover(B));
    assert_ne!(offer_b.yiaddr(), ip(2));
}

#[test]
fn restored_leases_that_conflict_with_reservations_are_dropped() {
    let mut cfg = config();
    cfg.hosts = vec![
        HostReservation {
            mac: A,
            name: Some("web".into()),
            ip: Some(ip(50)),
        },
        HostReservation {
            mac: C,
            name: Some("named".into()),
            ip: None,
        },
    ];
    let restored = vec![
        Lease {
            expiry: Some(T0 + 100),
            mac: B,
            ip: ip(50),
            hostname: None,
            client_id: None,
        },
        Lease {
            expiry: Some(T0 + 100),
            mac: B,
            ip: ip(51),
            hostname: Some("b".into()),
            client_id: None,
        },
    ];
    let mut s = DhcpServer::new(cfg, restored, T0);
    let ips: Vec<Ipv4Addr> = s.leases().map(|l| l.ip).collect();
    assert_eq!(
        ips,
        vec![ip(51)],
        "the reserved address is not B's; B's other lease is kept once"
    );
    let (_, nak) = exchange(&mut s, T0 + 1, &renew(B, ip(50)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(dora(&mut s, T0 + 1, A), ip(50));
    // A reservation without an address gives only the name.
    let ip_c = dora(&mut s, T0 + 1, C);
    assert_eq!(
        lease_at(&s, ip_c).unwrap().hostname.as_deref(),
        Some("named")
    );
}

#[test]
fn decline_keeps_the_address_out_of_the_pool() {
    let mut s = server();
    let addr = dora(&mut s, T0, A);
    events(&mut s);
    // RFC 2131 4.3.3: DECLINE with option 50 and the server id.
    let decline = with(
        with(
            msg(MessageType::Decline, A),
            DhcpOption::RequestedIpAddress(addr),
        ),
        DhcpOption::ServerIdentifier(SERVER),
    );
    assert_eq!(send(&mut s, T0 + 2, &decline), Ok(None));
    assert_eq!(s.counters().declines, 1);
    assert_eq!(s.leases().count(), 0);
    assert!(matches!(events(&mut s)[..], [LeaseEvent::Removed(_)]));
    // Nobody, not even A, gets it for the next ten minutes.
    assert_eq!(dora(&mut s, T0 + 3, A), ip(3));
    let (_, offer) = exchange(&mut s, T0 + 3, &discover(B));
    assert_eq!(offer.yiaddr(), ip(4));
    s.handle_timeout(T0 + 2 + QUARANTINE_SECS);
    let (_, offer) = exchange(&mut s, T0 + 2 + QUARANTINE_SECS, &discover(C));
    assert_eq!(offer.yiaddr(), addr);
    // A client cannot decline an address it does not hold.
    let forged = with(
        msg(MessageType::Decline, C),
        DhcpOption::RequestedIpAddress(ip(3)),
    );
    assert_eq!(send(&mut s, T0 + 700, &forged), Err(DhcpDrop::UnknownLease));
    assert!(lease_at(&s, ip(3)).is_some());
}

#[test]
fn release_frees_the_address() {
    let mut s = server();
    let addr = dora(&mut s, T0, A);
    events(&mut s);
    let generation = s.generation();
    // RFC 2131 4.3.4: RELEASE names the address in ciaddr.
    let mut release = with(
        msg(MessageType::Release, A),
        DhcpOption::ServerIdentifier(SERVER),
    );
    release.set_ciaddr(addr);
    // Someone else cannot release it.
    let mut forged = release.clone();
    forged.set_chaddr(&B);
    assert_eq!(send(&mut s, T0 + 1, &forged), Err(DhcpDrop::UnknownLease));
    assert_eq!(send(&mut s, T0 + 1, &release), Ok(None));
    assert_eq!(s.leases().count(), 0);
    assert_eq!(s.generation(), generation + 1);
    assert!(matches!(events(&mut s)[..], [LeaseEvent::Removed(_)]));
    assert_eq!(s.poll_timeout(), None);
    // The client comes back to the same address.
    assert_eq!(dora(&mut s, T0 + 5, A), addr);
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut s = server();
    // RFC 2131 4.3.5: INFORM from a client configured by hand; the ACK has no lease time and
    // yiaddr 0, and goes straight to ciaddr.
    let mut inform = msg(MessageType::Inform, A);
    inform.set_ciaddr(ip(77));
    let (reply, ack) = exchange(&mut s, T0, &inform);
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), UNSPEC);
    assert_eq!(ack.ciaddr(), ip(77));
    assert_eq!(
        reply.to,
        Destination::Unicast {
            ip: ip(77),
            mac: A,
            port: 68
        }
    );
    for code in [
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ] {
        assert_eq!(opt(&ack, code), None);
    }
    assert!(opt(&ack, OptionCode::Router).is_some());
    assert!(!reply.durable);
    assert_eq!(s.leases().count(), 0);
    assert_eq!(s.counters().informs, 1);
}

#[test]
fn pool_exhaustion() {
    let cfg = DhcpConfig::new(SERVER, 24, (ip(2), ip(3)));
    let mut s = server_with(cfg.clone());
    assert_eq!(cfg.lease_max, 2);
    assert_eq!(dora(&mut s, T0, A), ip(2));
    assert_eq!(dora(&mut s, T0, B), ip(3));
    assert_eq!(send(&mut s, T0, &discover(C)), Err(DhcpDrop::PoolExhausted));
    assert_eq!(s.counters().pool_exhausted, 1);
    // Offers count as used too.
    let mut s = server_with(cfg);
    exchange(&mut s, T0, &discover(A));
    exchange(&mut s, T0, &discover(B));
    assert_eq!(send(&mut s, T0, &discover(C)), Err(DhcpDrop::PoolExhausted));
    // Until they lapse.
    s.handle_timeout(T0 + OFFER_HOLD_SECS);
    let (_, offer) = exchange(&mut s, T0 + OFFER_HOLD_SECS, &discover(C));
    assert_eq!(offer.yiaddr(), ip(2));
}

#[test]
fn lease_max() {
    let mut cfg = config();
    cfg.lease_max = 1;
    let mut s = server_with(cfg);
    assert_eq!(dora(&mut s, T0, A), ip(2));
    // dnsmasq's dhcp-lease-max: no offer past the limit, and a NAK for a new lease.
    assert_eq!(send(&mut s, T0, &discover(B)), Err(DhcpDrop::PoolExhausted));
    let (_, nak) = exchange(&mut s, T0, &init_reboot(B, ip(9)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(s.counters().nak_lease_max, 1);
    // The client that holds the one lease still renews.
    let (_, ack) = exchange(&mut s, T0 + 100, &renew(A, ip(2)));
    assert_eq!(kind(&ack), MessageType::Ack);
}

#[test]
fn address_seen_in_use_is_skipped() {
    let mut s = server();
    // A guest configured by hand answers ARP for .2: offering it would make a conflict.
    s.note_address_in_use(T0, ip(2), C);
    assert_eq!(s.counters().in_use_noted, 1);
    assert_eq!(s.poll_timeout(), Some(T0 + QUARANTINE_SECS));
    assert_eq!(dora(&mut s, T0, A), ip(3));
    let (_, nak) = exchange(&mut s, T0, &init_reboot(B, ip(2)));
    assert_eq!(kind(&nak), MessageType::Nak);
    // The guest that uses it may have it.
    assert_eq!(dora(&mut s, T0 + 1, C), ip(2));
    // A guest seen using its own lease changes nothing; neither do addresses outside the range.
    s.note_address_in_use(T0 + 2, ip(2), C);
    s.note_address_in_use(T0 + 2, ip(3), A);
    s.note_address_in_use(T0 + 2, SERVER, A);
    s.note_address_in_use(T0 + 2, Ipv4Addr::new(8, 8, 8, 8), A);
    assert_eq!(s.counters().in_use_noted, 1);
    // The mark lapses.
    s.note_address_in_use(T0 + 3, ip(4), C);
    let (_, offer) = exchange(&mut s, T0 + 3, &discover(B));
    assert_eq!(offer.yiaddr(), ip(5));
    s.handle_timeout(T0 + 3 + QUARANTINE_SECS);
    let (_, offer) = exchange(&mut s, T0 + 3 + QUARANTINE_SECS, &discover(B));
    assert_eq!(offer.yiaddr(), ip(4));
}

// RFC 2131 3.1 step 2 and 4.4.1: the server SHOULD probe an address before allocating it.
// An OFFER of an address new to its client says so; the client's own lease and its
// reservation are offered as they are (dnsmasq pings neither).
#[test]
fn offers_of_new_addresses_ask_for_a_probe() {
    let mut cfg = config();
    cfg.hosts.push(HostReservation {
        mac: C,
        name: None,
        ip: Some(ip(50)),
    });
    let mut s = server_with(cfg);
    let (reply, offer) = exchange(&mut s, T0, &discover(A));
    assert_eq!(
        reply.probe,
        Some(Probe {
            ip: offer.yiaddr(),
            mac: A
        })
    );
    let (ack, _) = exchange(&mut s, T0, &select(A, SERVER, ip(2)));
    assert_eq!(ack.probe, None, "only OFFERs wait");
    // A client that holds its lease and starts over (RFC 2131 4.3.1: its existing binding).
    let (reply, offer) = exchange(&mut s, T0 + 1, &discover(A));
    assert_eq!(offer.yiaddr(), ip(2));
    assert_eq!(reply.probe, None);
    let (reply, offer) = exchange(&mut s, T0 + 1, &discover(C));
    assert_eq!(offer.yiaddr(), ip(50));
    assert_eq!(reply.probe, None);
    // An address the client asks for (option 50) but does not hold is probed.
    let (reply, offer) = exchange(
        &mut s,
        T0 + 1,
        &with(discover(B), DhcpOption::RequestedIpAddress(ip(77))),
    );
    assert_eq!(offer.yiaddr(), ip(77));
    assert_eq!(reply.probe.map(|p| p.ip), Some(ip(77)));
}

// A probe answered by another host (RFC 5227 2.1.1): noted in use, which withdraws the offer;
// asked again, the server offers the next free address, and the retry is not counted as a
// second DISCOVER.
#[test]
fn a_probe_conflict_withdraws_the_offer_and_the_retry_offers_another() {
    let mut s = server();
    let m = discover(A);
    let (reply, _) = exchange(&mut s, T0, &m);
    let probe = reply.probe.expect("a probe");
    assert_eq!(probe.ip, ip(2));
    assert!(s.offer_pending(T0, ip(2), A));
    assert!(!s.offer_pending(T0, ip(2), B));
    s.note_address_in_use(T0, ip(2), C);
    assert!(!s.offer_pending(T0, ip(2), A), "withdrawn");
    let retry = s
        .handle_retry(T0, A, UNSPEC, &m.to_vec().unwrap())
        .unwrap()
        .expect("another offer");
    assert_eq!(retry.probe.map(|p| p.ip), Some(ip(3)));
    assert!(s.offer_pending(T0, ip(3), A));
    assert_eq!(s.counters().discovers, 1);
    assert_eq!(s.counters().offers, 2);
    // The squatter's address stays out of the pool for everyone else.
    let (_, nak) = exchange(&mut s, T0, &select(A, SERVER, ip(2)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(dora(&mut s, T0, A), ip(3));
    // An offer that could not be probed is withdrawn: the address is free again.
    let (reply, _) = exchange(&mut s, T0, &discover(B));
    let ip4 = reply.probe.unwrap().ip;
    s.withdraw_offer(ip4);
    assert!(!s.offer_pending(T0, ip4, B));
    let d = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0d];
    let (_, offer) = exchange(&mut s, T0, &discover(d));
    assert_eq!(offer.yiaddr(), ip4);
    // An offer expires: it is pending no more.
    assert!(s.offer_pending(T0, ip4, d));
    assert!(!s.offer_pending(T0 + OFFER_HOLD_SECS, ip4, d));
}

// The indexes and the free-address cursor (no scans): many clients get the addresses in
// order, each its own; an address let go below the cursor (release, expired offer, lapsed
// quarantine) is the next one handed out; a client that asks again keeps its pending offer.
#[test]
fn thousands_of_clients_get_distinct_addresses_in_order_and_freed_ones_first() {
    let base = Ipv4Addr::new(10, 0, 1, 0);
    let mut s = server_with(DhcpConfig::new(
        Ipv4Addr::new(10, 0, 0, 1),
        16,
        (base, Ipv4Addr::new(10, 0, 255, 250)),
    ));
    let nth = |n: u32| Ipv4Addr::from(u32::from(base) + n);
    let mac = |n: u32| {
        let b = n.to_be_bytes();
        [0x02, 0, b[0], b[1], b[2], b[3]]
    };
    let server = Ipv4Addr::new(10, 0, 0, 1);
    for n in 0..3000 {
        let (_, offer) = exchange(&mut s, T0, &discover(mac(n)));
        assert_eq!(offer.yiaddr(), nth(n));
        let (_, ack) = exchange(&mut s, T0, &select(mac(n), server, nth(n)));
        assert_eq!(kind(&ack), MessageType::Ack);
    }
    assert_eq!(s.leases().count(), 3000);
    // A release below the cursor: that address goes next, to a new client.
    let mut release = msg(MessageType::Release, mac(1234));
    release.set_ciaddr(nth(1234));
    release
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(server));
    assert_eq!(send(&mut s, T0, &release), Ok(None));
    let (_, offer) = exchange(&mut s, T0, &discover(mac(5000)));
    assert_eq!(offer.yiaddr(), nth(1234));
    // Asked again, the client keeps its pending offer; another client gets the next address.
    let (_, again) = exchange(&mut s, T0 + 1, &discover(mac(5000)));
    assert_eq!(again.yiaddr(), nth(1234));
    let (_, other) = exchange(&mut s, T0 + 1, &discover(mac(5001)));
    assert_eq!(other.yiaddr(), nth(3000));
    // The offer lapses unanswered: its address is free again for anyone.
    let later = T0 + 1 + OFFER_HOLD_SECS;
    let (_, offer) = exchange(&mut s, later, &discover(mac(5002)));
    assert_eq!(offer.yiaddr(), nth(1234));
    // A client's own lease is found among thousands, and renewed.
    let (_, ack) = exchange(&mut s, later, &renew(mac(2999), nth(2999)));
    assert_eq!(kind(&ack), MessageType::Ack);
    let (_, offer) = exchange(&mut s, later, &discover(mac(17)));
    assert_eq!(offer.yiaddr(), nth(17));
}

#[test]
fn parameter_request_list_is_honoured() {
    let mut cfg = config();
    cfg.domain = Some("example.test".into());
    let mut s = server_with(cfg);
    // RFC 2132 9.8: requested options in the client's order; 53 first (RFC 2131 4.1).
    let prl = DhcpOption::ParameterRequestList(vec![
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::Router,
        OptionCode::SubnetMask,
    ]);
    let (reply, offer) = exchange(&mut s, T0, &with(discover(A), prl));
    assert_eq!(
        wire::option_codes(&reply.payload),
        vec![53, 6, 3, 1, 54, 51, 58, 59]
    );
    assert_eq!(
        opt(&offer, OptionCode::DomainName),
        None,
        "15 was not requested"
    );
    // No list: everything configured, in a fixed order.
    let (reply, offer) = exchange(&mut s, T0, &discover(B));
    assert_eq!(
        wire::option_codes(&reply.payload),
        vec![53, 54, 51, 58, 59, 1, 3, 6, 15, 28]
    );
    assert_eq!(
        opt(&offer, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("example.test".into()))
    );
    // A list that asks for 54 and 51 first gets them first.
    let prl = DhcpOption::ParameterRequestList(vec![
        OptionCode::ServerIdentifier,
        OptionCode::BroadcastAddr,
        OptionCode::AddressLeaseTime,
    ]);
    let (reply, _) = exchange(&mut s, T0, &with(discover(C), prl));
    assert_eq!(
        wire::option_codes(&reply.payload),
        vec![53, 54, 28, 51, 58, 59, 1]
    );
}

#[test]
fn infinite_lease() {
    let mut cfg = config();
    cfg.lease_time = None;
    let mut s = server_with(cfg);
    let (_, offer) = exchange(&mut s, T0, &discover(A));
    // RFC 2132 9.2: 0xffffffff means infinity; T1/T2 (9.11, 9.12) make no sense then.
    assert_eq!(
        opt(&offer, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(u32::MAX))
    );
    assert_eq!(opt(&offer, OptionCode::Renewal), None);
    assert_eq!(opt(&offer, OptionCode::Rebinding), None);
    let (_, ack) = exchange(&mut s, T0, &select(A, SERVER, ip(2)));
    assert_eq!(opt(&ack, OptionCode::Renewal), None);
    assert_eq!(lease_at(&s, ip(2)).unwrap().expiry, None);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(u64::MAX);
    assert_eq!(s.leases().count(), 1);
    assert!(format_lease_file(s.leases()).starts_with("0 52:54:00:00:00:0a 192.168.122.2 "));
}

#[test]
fn hostnames_are_sanitised() {
    let mut s = server();
    let long = "x".repeat(300);
    let cases: [(&str, Option<&str>); 5] = [
        ("vm1.example.com", Some("vm1")),
        ("my_host!", Some("myhost")),
        ("-edge-", Some("edge")),
        ("...", None),
        (&long, Some(&long[..63])),
    ];
    for (i, (sent, stored)) in cases.into_iter().enumerate() {
        let mac = [2, 0, 0, 0, 0, u8::try_from(i).unwrap()];
        let (_, offer) = exchange(&mut s, T0, &discover(mac));
        let req = with(
            select(mac, SERVER, offer.yiaddr()),
            DhcpOption::Hostname(sent.into()),
        );
        exchange(&mut s, T0, &req);
        assert_eq!(
            lease_at(&s, offer.yiaddr()).unwrap().hostname.as_deref(),
            stored
        );
    }
    // A client that leaves option 12 out when renewing keeps its name.
    let (_, _) = exchange(&mut s, T0 + 10, &renew([2, 0, 0, 0, 0, 0], ip(2)));
    assert_eq!(
        lease_at(&s, ip(2)).unwrap().hostname.as_deref(),
        Some("vm1")
    );
}

#[test]
fn relayed_messages_go_back_to_the_relay() {
    let mut s = server();
    // RFC 2131 4.1: giaddr set: reply to the relay's server port.
    let relay = ip(254);
    let mut d = discover(A);
    d.set_giaddr(relay);
    let reply = send(&mut s, T0, &d).unwrap().unwrap();
    assert_eq!(
        reply.to,
        Destination::Unicast {
            ip: relay,
            mac: A,
            port: 67
        }
    );
    // A relay for another network is not ours to serve.
    let mut d = discover(B);
    d.set_giaddr(Ipv4Addr::new(10, 1, 2, 3));
    assert_eq!(send(&mut s, T0, &d), Err(DhcpDrop::NotForUs));
    // A NAK through a relay is unicast to it with the broadcast bit set (4.3.2).
    let mut r = init_reboot(B, Ipv4Addr::new(10, 0, 0, 1));
    r.set_giaddr(relay);
    let (reply, nak) = exchange(&mut s, T0, &r);
    assert_eq!(kind(&nak), MessageType::Nak);
    assert!(nak.flags().broadcast());
    assert!(matches!(reply.to, Destination::Unicast { port: 67, .. }));
}

// ---- malformed input ----

fn valid_discover_bytes() -> Vec<u8> {
    let m = with(
        with(
            with(discover(A), DhcpOption::Hostname("guest".into())),
            DhcpOption::ClientIdentifier(vec![1, 0x52, 0x54, 0, 0, 0, 0x0a]),
        ),
        DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]),
    );
    m.to_vec().unwrap()
}

#[test]
fn drops_are_named_and_counted() {
    let mut s = server();
    let good = valid_discover_bytes();
    let mut drop = |bytes: &[u8]| s.handle_message(T0, A, UNSPEC, bytes);

    assert_eq!(drop(&good[..239]), Err(DhcpDrop::Malformed));
    let mut reply_op = good.clone();
    reply_op[0] = 2;
    assert_eq!(drop(&reply_op), Err(DhcpDrop::NotBootRequest));
    let mut token_ring = good.clone();
    token_ring[1] = 6;
    assert_eq!(drop(&token_ring), Err(DhcpDrop::BadHardware));
    let mut long_hw = good.clone();
    long_hw[2] = 16;
    assert_eq!(drop(&long_hw), Err(DhcpDrop::BadHardware));
    let mut cookie = good.clone();
    cookie[236] = 0;
    assert_eq!(drop(&cookie), Err(DhcpDrop::Malformed));
    // RFC 2132 2: an option whose length runs past the end of the message.
    let mut cut = good[..240].to_vec();
    cut.extend_from_slice(&[53, 1, 1, 12, 40, b'a', b'b']);
    assert_eq!(drop(&cut), Err(DhcpDrop::Malformed));
    // Option 53 must be one byte (RFC 2132 9.6).
    let mut bad53 = good[..240].to_vec();
    bad53.extend_from_slice(&[53, 2, 1, 1, 255]);
    assert_eq!(drop(&bad53), Err(DhcpDrop::Malformed));
    // Option 50 must be four bytes (RFC 2132 9.1).
    let mut bad50 = good[..240].to_vec();
    bad50.extend_from_slice(&[53, 1, 1, 50, 3, 1, 2, 3, 255]);
    assert_eq!(drop(&bad50), Err(DhcpDrop::Malformed));
    // BOOTP without a DHCP message type.
    let mut bootp = good[..240].to_vec();
    bootp.push(255);
    assert_eq!(drop(&bootp), Err(DhcpDrop::NoMessageType));
    // A server's message type from a client.
    let mut offer = good[..240].to_vec();
    offer.extend_from_slice(&[53, 1, 2, 255]);
    assert_eq!(drop(&offer), Err(DhcpDrop::UnknownType(2)));
    // Option 52 with a value other than 1, 2 or 3.
    let mut overload = good[..240].to_vec();
    overload.extend_from_slice(&[53, 1, 1, 52, 1, 9, 255]);
    assert_eq!(drop(&overload), Err(DhcpDrop::Malformed));

    let c = s.counters();
    assert_eq!(c.malformed, 6);
    assert_eq!(c.not_boot_request, 1);
    assert_eq!(c.bad_hardware, 2);
    assert_eq!(c.no_message_type, 1);
    assert_eq!(c.unknown_type, 1);
}

#[test]
fn option_overload_is_followed() {
    let mut s = server();
    let good = valid_discover_bytes();
    // RFC 2132 9.3: option 52 = 1, the message type and hostname live in the file field.
    let mut m = good[..240].to_vec();
    m[108..108 + 10].copy_from_slice(&[53, 1, 1, 12, 4, b'f', b'i', b'l', b'e', 255]);
    m.extend_from_slice(&[52, 1, 1, 255]);
    let reply = s.handle_message(T0, A, UNSPEC, &m).unwrap().unwrap();
    assert_eq!(wire::option_codes(&reply.payload).first(), Some(&53));
    // RFC 3396: split options are concatenated.
    let mut split = good[..240].to_vec();
    split.extend_from_slice(&[53, 1, 3, 50, 2, 192, 168, 50, 2, 122, 5, 255]);
    let (reply, ack) = {
        let reply = s.handle_message(T0, B, UNSPEC, &split).unwrap().unwrap();
        let decoded = Message::decode(&mut Decoder::new(&reply.payload)).unwrap();
        (reply, decoded)
    };
    assert!(!reply.payload.is_empty());
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(ack.yiaddr(), ip(5));
}

/// Inputs that trip up option decoders: options whose decoders expect a fixed or minimum
/// length (rapid commit, client FQDN, bulk lease query status, client network interface) and
/// options with malformed contents.
#[test]
fn hostile_options_do_not_panic() {
    let mut s = server();
    let good = valid_discover_bytes();
    let hostile: [&[u8]; 8] = [
        &[80, 1, 0],
        &[81, 0],
        &[81, 2, 0, 0],
        &[151, 0],
        &[94, 1, 0],
        &[121, 3, 33, 1, 2],
        &[82, 3, 1, 5, 0],
        &[12, 3, 0xff, 0xfe, 0x00],
    ];
    for h in hostile {
        let mut m = good[..240].to_vec();
        m.extend_from_slice(&[53, 1, 1]);
        m.extend_from_slice(h);
        m.push(255);
        let r = s.handle_message(T0, A, UNSPEC, &m);
        assert!(matches!(r, Ok(Some(_))), "{h:?}: {r:?}");
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

/// Bad input costs a counter, never a panic (DESIGN.md principle 5): truncated messages,
/// random bytes, and valid messages with random bytes changed.
#[test]
fn garbage_never_panics() {
    // A small pool with reservations, so exhaustion, lease_max and reservations are reached.
    let mut cfg = DhcpConfig::new(SERVER, 24, (ip(2), ip(40)));
    cfg.lease_max = 30;
    cfg.hosts = vec![
        HostReservation {
            mac: A,
            name: Some("a".into()),
            ip: Some(ip(2)),
        },
        HostReservation {
            mac: [0x52, 0x54, 0, 0, 0, 7],
            name: Some("named".into()),
            ip: None,
        },
    ];
    let mut s = server_with(cfg);
    let samples: Vec<Vec<u8>> = vec![
        valid_discover_bytes(),
        with(select(A, SERVER, ip(2)), DhcpOption::Hostname("a".into()))
            .to_vec()
            .unwrap(),
        renew(B, ip(3)).to_vec().unwrap(),
        with(
            msg(MessageType::Decline, A),
            DhcpOption::RequestedIpAddress(ip(2)),
        )
        .to_vec()
        .unwrap(),
    ];
    let mut now = T0;
    for sample in &samples {
        for len in 0..=sample.len() {
            let _ = s.handle_message(now, A, UNSPEC, &sample[..len]);
        }
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for case in 0..6000 {
        now += rng.next() % 30;
        let bytes = match case % 3 {
            // Random bytes, of any length.
            0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            // A valid header, random options.
            1 => {
                let mut b = samples[0][..240].to_vec();
                b.extend((0..rng.below(300)).map(|_| rng.next() as u8));
                b
            }
            // A valid message with a few bytes changed.
            _ => {
                let mut b = samples[rng.below(samples.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                b
            }
        };
        let mac = [0x52, 0x54, 0, 0, 0, rng.next() as u8];
        let _ = s.handle_message(now, mac, UNSPEC, &bytes);
        if case % 7 == 0 {
            s.note_address_in_use(now, ip(rng.next() as u8), mac);
        }
        if case % 11 == 0 {
            s.handle_timeout(now);
        }
    }
    let c = s.counters();
    assert!(c.malformed + c.not_boot_request + c.bad_hardware > 1000);
    // The changed messages reach the state machine, not just the parser.
    assert!(
        c.offers > 0 && c.acks > 0 && c.naks > 0 && c.declines > 0,
        "{c:?}"
    );
    // Whatever happened, the lease set is consistent with the file format.
    let text = format_lease_file(s.leases());
    assert_eq!(parse_lease_file(&text).len(), s.leases().count());
}

#[test]
fn config_validation() {
    assert_eq!(config().validate(), Ok(()));
    assert_eq!(config().lease_max, 253);
    let mut bad = config();
    bad.range = (ip(2), Ipv4Addr::new(192, 168, 123, 1));
    assert!(matches!(
        bad.validate(),
        Err(DhcpConfigError::RangeOutsideSubnet(..))
    ));
    let mut bad = config();
    bad.range = (ip(9), ip(3));
    assert!(matches!(
        bad.validate(),
        Err(DhcpConfigError::RangeReversed(..))
    ));
    let mut bad = config();
    let host = HostReservation {
        mac: A,
        name: None,
        ip: Some(ip(9)),
    };
    bad.hosts = vec![host.clone(), HostReservation { mac: B, ..host }];
    assert_eq!(bad.validate(), Err(DhcpConfigError::DuplicateIp(ip(9))));
    // The server copes with a range that spills over the subnet.
    let mut wide = config();
    wide.range = (Ipv4Addr::new(192, 168, 121, 250), ip(2));
    let mut s = server_with(wide);
    assert_eq!(dora(&mut s, T0, A), ip(2));
    assert_eq!(send(&mut s, T0, &discover(B)), Err(DhcpDrop::PoolExhausted));
}

/// RFC 2131 4.2 lets a client name itself by option 61, so one MAC can ask under many
/// identifiers: `leases_per_mac` keeps one guest from draining the pool that way.
#[test]
fn leases_per_mac_caps_invented_client_ids() {
    let mut cfg = config();
    cfg.leases_per_mac = 2;
    let mut s = server_with(cfg);
    let id = |n: u8| DhcpOption::ClientIdentifier(vec![0xff, 0, 0, n]);
    for n in 1..=2 {
        let (_, offer) = exchange(&mut s, T0, &with(discover(A), id(n)));
        let (_, ack) = exchange(&mut s, T0, &with(select(A, SERVER, offer.yiaddr()), id(n)));
        assert_eq!(kind(&ack), MessageType::Ack);
    }
    // A third identifier on the same MAC gets no offer, and a NAK for an address it asks for.
    assert_eq!(
        send(&mut s, T0, &with(discover(A), id(3))),
        Err(DhcpDrop::MacLeaseCap)
    );
    assert_eq!(s.counters().mac_lease_cap, 1);
    let (_, nak) = exchange(&mut s, T0, &with(init_reboot(A, ip(50)), id(3)));
    assert_eq!(kind(&nak), MessageType::Nak);
    assert_eq!(s.counters().nak_mac_lease_cap, 1);
    // The identifiers that hold leases still renew, and other MACs are served.
    let (_, ack) = exchange(&mut s, T0 + 100, &with(renew(A, ip(2)), id(1)));
    assert_eq!(kind(&ack), MessageType::Ack);
    assert_eq!(dora(&mut s, T0, B), ip(4));
    // Offers count too: a pending offer to another identifier holds a place.
    let mut cfg = config();
    cfg.leases_per_mac = 1;
    let mut s = server_with(cfg);
    exchange(&mut s, T0, &with(discover(C), id(1)));
    assert_eq!(
        send(&mut s, T0, &with(discover(C), id(2))),
        Err(DhcpDrop::MacLeaseCap)
    );
    // Once the offer lapses, the place is free.
    let (_, offer) = exchange(&mut s, T0 + OFFER_HOLD_SECS + 1, &with(discover(C), id(2)));
    assert_eq!(kind(&offer), MessageType::Offer);
}
