//! Guards against hostile guests, per port: a guest is untrusted, and nothing it sends may
//! pose as another host or crowd out the other guests.
//!
//! - **clean-traffic** (opt-in, as libvirt's filter of that name): a port sends only from one
//!   MAC (the one its tap was given, else the first it used), only from the IPv4 address DHCP
//!   leased that MAC or its `<host>` reservation names (on a network without DHCP, the first
//!   it used), ARP only about itself; and no guest answers as a DHCP server or sends router
//!   advertisements to the others.
//! - **rate caps** (each off until configured): DHCP messages, DNS queries and
//!   broadcast/multicast frames per second per port, as token buckets with a one-second
//!   burst, so a storm from one port costs the others nothing.
//!
//! Ports that are not guests (a host NIC in bridge mode, the uplink) are trusted and pass.

use crate::port::DropReason;
use crate::wire::ipv4::PROTO_UDP;
use crate::wire::{EtherType, MacAddr};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How often a cap that is dropping says so in the log.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(10);
const ICMPV6: u8 = 58;
const ROUTER_ADVERTISEMENT: u8 = 134;
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_TARGET_PORT: u16 = 67;
const DHCPV6_SERVER_PORT: u16 = 547;

/// `<sy:guard clean-traffic dhcp-per-second dns-per-second broadcast-per-second>`; a rate of
/// 0 is no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardConfig {
    pub clean_traffic: bool,
    pub dhcp_per_second: u32,
    pub dns_per_second: u32,
    pub broadcast_per_second: u32,
}

impl GuardConfig {
    pub fn is_active(&self) -> bool {
        self.clean_traffic
            || self.dhcp_per_second > 0
            || self.dns_per_second > 0
            || self.broadcast_per_second > 0
    }
}

/// A token bucket refilled at `rate` per second, holding at most `rate` (one second's worth).
#[derive(Debug, Clone, Default)]
struct Bucket {
    tokens: u32,
    refilled: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: u32) -> bool {
        if rate == 0 {
            return true;
        }
        match self.refilled {
            None => {
                self.tokens = rate;
                self.refilled = Some(now);
            }
            Some(at) => {
                let elapsed = now.saturating_duration_since(at);
                let earned = (elapsed.as_micros() * u128::from(rate) / 1_000_000) as u64;
                if earned > 0 {
                    self.tokens = (u64::from(self.tokens) + earned).min(u64::from(rate)) as u32;
                    // Keep the remainder of a partly earned token.
                    let spent = Duration::from_micros(earned * 1_000_000 / u64::from(rate));
                    self.refilled = Some(at + spent);
                }
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Which cap a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Dhcp,
    Dns,
    Broadcast,
    CleanTraffic,
}

/// One port's guard state.
#[derive(Debug, Clone, Default)]
pub struct PortGuard {
    /// Not a guest (a host NIC): never filtered or capped.
    pub trusted: bool,
    /// clean-traffic for this port alone, over the network's setting; `None` follows it.
    pub clean_traffic: Option<bool>,
    /// The one MAC the port may send from.
    pub mac: Option<MacAddr>,
    /// The address last confirmed as the port's own.
    ip: Option<Ipv4Addr>,
    dhcp: Bucket,
    dns: Bucket,
    broadcast: Bucket,
    /// When each cap last put a notice in the log.
    noticed: [Option<Instant>; 4],
}

/// What a frame's addresses must be checked against.
pub trait Addresses {
    /// Whether `ip` is leased to, or reserved for, `mac`.
    fn holds(&self, mac: MacAddr, ip: Ipv4Addr) -> bool;
    /// Whether the network hands out addresses (else a port keeps the first it uses).
    fn assigns(&self) -> bool;
}

impl PortGuard {
    /// A port whose guest was given `mac` (its tap's kernel side), if known.
    pub fn bind_mac(&mut self, mac: MacAddr) {
        self.mac = Some(mac);
    }

    /// The port's address went away (its lease was released or expired).
    pub fn forget_ip(&mut self, ip: Ipv4Addr) {
        if self.ip == Some(ip) {
            self.ip = None;
        }
    }

    /// clean-traffic's verdict on a frame from this port: `src` its source MAC, `l3` what
    /// follows the Ethernet header. `None`: it passes.
    pub fn check_clean(
        &mut self,
        src: MacAddr,
        ethertype: EtherType,
        l3: &[u8],
        addresses: &impl Addresses,
    ) -> Option<DropReason> {
        if self.trusted {
            return None;
        }
        match self.mac {
            None => self.mac = Some(src),
            Some(mac) if mac != src => return Some(DropReason::SpoofedMac),
            Some(_) => {}
        }
        match ethertype {
            EtherType::ARP => {
                // RFC 826: sender hardware and protocol address are the sender's own.
                if l3.len() < 28 || MacAddr::from_slice(&l3[8..14]) != src {
                    return Some(DropReason::SpoofedMac);
                }
                let sender = Ipv4Addr::new(l3[14], l3[15], l3[16], l3[17]);
                (!sender.is_unspecified() && !self.owns(src, sender, addresses))
                    .then_some(DropReason::SpoofedIp)
            }
            EtherType::IPV4 => self.check_ipv4(src, l3, addresses),
            EtherType::IPV6 => check_ipv6(l3),
            _ => None,
        }
    }

    fn check_ipv4(
        &mut self,
        src: MacAddr,
        ip: &[u8],
        addresses: &impl Addresses,
    ) -> Option<DropReason> {
        if ip.len() < 20 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let udp_ports = (ip[9] == PROTO_UDP && ip.len() >= ihl + 4).then(|| {
            (
                u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
                u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
            )
        });
        // RFC 2131 4.1: servers send from port 67; a guest doing so is a rogue server.
        if udp_ports.is_some_and(|(sport, _)| sport == DHCP_SERVER_PORT) {
            return Some(DropReason::RogueServer);
        }
        // RFC 2131 2: chaddr is the client's hardware address. A guest asking for leases for
        // other hardware addresses would drain the pool for everyone else.
        if udp_ports.is_some_and(|(_, dport)| dport == DHCP_CLIENT_TARGET_PORT)
            && let Some(chaddr) = ip.get(ihl + 8 + 28..ihl + 8 + 34)
            && chaddr != src.0
        {
            return Some(DropReason::SpoofedMac);
        }
        let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        if source.is_unspecified() {
            // RFC 2131 4.1: a client without an address yet asks from 0.0.0.0.
            return udp_ports
                .is_none_or(|(_, dport)| dport != DHCP_CLIENT_TARGET_PORT)
                .then_some(DropReason::SpoofedIp);
        }
        (!self.owns(src, source, addresses)).then_some(DropReason::SpoofedIp)
    }

    fn owns(&mut self, mac: MacAddr, ip: Ipv4Addr, addresses: &impl Addresses) -> bool {
        if self.ip == Some(ip) {
            return true;
        }
        let owned = if addresses.assigns() {
            addresses.holds(mac, ip)
        } else {
            self.ip.is_none()
        };
        if owned {
            self.ip = Some(ip);
        }
        owned
    }

    /// Whether a DHCP message from this port is within its rate.
    pub fn allow_dhcp(&mut self, now: Instant, config: &GuardConfig) -> bool {
        self.trusted || self.dhcp.take(now, config.dhcp_per_second)
    }

    /// Whether a DNS query from this port is within its rate.
    pub fn allow_dns(&mut self, now: Instant, config: &GuardConfig) -> bool {
        self.trusted || self.dns.take(now, config.dns_per_second)
    }

    /// Whether a broadcast or multicast frame from this port is within its rate.
    pub fn allow_broadcast(&mut self, now: Instant, config: &GuardConfig) -> bool {
        self.trusted || self.broadcast.take(now, config.broadcast_per_second)
    }

    /// Whether a drop by `cap` should be logged now (once per [`NOTICE_INTERVAL`]).
    pub fn should_notice(&mut self, now: Instant, cap: Cap) -> bool {
        let slot = &mut self.noticed[cap as usize];
        if slot.is_some_and(|at| now.saturating_duration_since(at) < NOTICE_INTERVAL) {
            return false;
        }
        *slot = Some(now);
        true
    }
}

/// IPv6 from a guest: no router advertisements (RFC 4861 4.2) and no DHCPv6 server answers
/// (RFC 8415 7.2), which would make the guest the others' router or server.
fn check_ipv6(ip: &[u8]) -> Option<DropReason> {
    if ip.len() < 44 {
        return None;
    }
    match ip[6] {
        ICMPV6 if ip[40] == ROUTER_ADVERTISEMENT => Some(DropReason::RogueServer),
        PROTO_UDP if u16::from_be_bytes([ip[40], ip[41]]) == DHCPV6_SERVER_PORT => {
            Some(DropReason::RogueServer)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    const LEASED: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);

    struct Leases;
    impl Addresses for Leases {
        fn holds(&self, mac: MacAddr, ip: Ipv4Addr) -> bool {
            mac == MAC && ip == LEASED
        }
        fn assigns(&self) -> bool {
            true
        }
    }

    struct NoDhcp;
    impl Addresses for NoDhcp {
        fn holds(&self, _: MacAddr, _: Ipv4Addr) -> bool {
            false
        }
        fn assigns(&self) -> bool {
            false
        }
    }

    fn ipv4(src: Ipv4Addr, proto: u8, ports: (u16, u16)) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[20..22].copy_from_slice(&ports.0.to_be_bytes());
        p[22..24].copy_from_slice(&ports.1.to_be_bytes());
        p
    }

    fn arp(sender_mac: MacAddr, sender_ip: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0u8; 28];
        a[8..14].copy_from_slice(&sender_mac.0);
        a[14..18].copy_from_slice(&sender_ip.octets());
        a
    }

    #[test]
    fn a_port_keeps_its_first_mac_and_its_leased_address() {
        let mut g = PortGuard::default();
        let ok = ipv4(LEASED, 6, (40000, 80));
        assert_eq!(g.check_clean(MAC, EtherType::IPV4, &ok, &Leases), None);
        assert_eq!(
            g.check_clean(OTHER, EtherType::IPV4, &ok, &Leases),
            Some(DropReason::SpoofedMac)
        );
        let spoofed = ipv4(Ipv4Addr::new(192, 168, 122, 99), 6, (40000, 80));
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &spoofed, &Leases),
            Some(DropReason::SpoofedIp)
        );
    }

    /// A DHCP request from `chaddr` (RFC 2131 2: at offset 28 of the message).
    fn dhcp_request(chaddr: MacAddr) -> Vec<u8> {
        let mut p = ipv4(Ipv4Addr::UNSPECIFIED, PROTO_UDP, (68, 67));
        p.resize(20 + 8 + 240, 0);
        p[20 + 8 + 28..20 + 8 + 34].copy_from_slice(&chaddr.0);
        p
    }

    #[test]
    fn dhcp_requests_for_another_hardware_address_are_spoofs() {
        let mut g = PortGuard::default();
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &dhcp_request(OTHER), &Leases),
            Some(DropReason::SpoofedMac)
        );
    }

    // RFC 2131 4.1: 0.0.0.0 is a source only for a client's DHCP to port 67.
    #[test]
    fn the_unspecified_source_is_for_dhcp_requests_only() {
        let mut g = PortGuard::default();
        let discover = dhcp_request(MAC);
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &discover, &Leases),
            None
        );
        let other = ipv4(Ipv4Addr::UNSPECIFIED, PROTO_UDP, (68, 53));
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &other, &Leases),
            Some(DropReason::SpoofedIp)
        );
    }

    #[test]
    fn rogue_dhcp_servers_and_router_advertisements_are_dropped() {
        let mut g = PortGuard::default();
        let offer = ipv4(LEASED, PROTO_UDP, (67, 68));
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &offer, &Leases),
            Some(DropReason::RogueServer)
        );
        let mut ra = vec![0u8; 56];
        ra[6] = ICMPV6;
        ra[40] = ROUTER_ADVERTISEMENT;
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV6, &ra, &Leases),
            Some(DropReason::RogueServer)
        );
        let mut solicitation = ra.clone();
        solicitation[40] = 133;
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV6, &solicitation, &Leases),
            None
        );
    }

    // RFC 826: an ARP about another host's address, or from another MAC, is a spoof.
    #[test]
    fn arp_speaks_only_for_the_port_itself() {
        let mut g = PortGuard::default();
        assert_eq!(
            g.check_clean(MAC, EtherType::ARP, &arp(MAC, LEASED), &Leases),
            None
        );
        assert_eq!(
            g.check_clean(
                MAC,
                EtherType::ARP,
                &arp(MAC, Ipv4Addr::UNSPECIFIED),
                &Leases
            ),
            None,
            "a probe (RFC 5227) has no sender address"
        );
        assert_eq!(
            g.check_clean(
                MAC,
                EtherType::ARP,
                &arp(MAC, Ipv4Addr::new(192, 168, 122, 1)),
                &Leases
            ),
            Some(DropReason::SpoofedIp)
        );
        assert_eq!(
            g.check_clean(MAC, EtherType::ARP, &arp(OTHER, LEASED), &Leases),
            Some(DropReason::SpoofedMac)
        );
    }

    #[test]
    fn without_dhcp_the_first_address_used_is_the_ports() {
        let mut g = PortGuard::default();
        let first = ipv4(Ipv4Addr::new(10, 0, 0, 5), 6, (1, 2));
        let second = ipv4(Ipv4Addr::new(10, 0, 0, 6), 6, (1, 2));
        assert_eq!(g.check_clean(MAC, EtherType::IPV4, &first, &NoDhcp), None);
        assert_eq!(
            g.check_clean(MAC, EtherType::IPV4, &second, &NoDhcp),
            Some(DropReason::SpoofedIp)
        );
    }

    #[test]
    fn trusted_ports_pass_everything() {
        let mut g = PortGuard {
            trusted: true,
            ..PortGuard::default()
        };
        let offer = ipv4(LEASED, PROTO_UDP, (67, 68));
        assert_eq!(g.check_clean(OTHER, EtherType::IPV4, &offer, &Leases), None);
        let config = GuardConfig {
            broadcast_per_second: 1,
            ..GuardConfig::default()
        };
        let now = Instant::now();
        assert!((0..10).all(|_| g.allow_broadcast(now, &config)));
    }

    #[test]
    fn buckets_allow_a_second_of_burst_then_the_rate() {
        let config = GuardConfig {
            dhcp_per_second: 10,
            ..GuardConfig::default()
        };
        let mut g = PortGuard::default();
        let t0 = Instant::now();
        let passed = (0..50).filter(|_| g.allow_dhcp(t0, &config)).count();
        assert_eq!(passed, 10);
        let t1 = t0 + Duration::from_millis(500);
        let passed = (0..50).filter(|_| g.allow_dhcp(t1, &config)).count();
        assert_eq!(passed, 5);
        let t2 = t1 + Duration::from_secs(60);
        let passed = (0..50).filter(|_| g.allow_dhcp(t2, &config)).count();
        assert_eq!(passed, 10, "never more than one second's burst");
        assert!(g.allow_dns(t2, &config), "an uncapped kind always passes");
    }

    #[test]
    fn notices_come_once_per_interval() {
        let mut g = PortGuard::default();
        let t0 = Instant::now();
        assert!(g.should_notice(t0, Cap::Broadcast));
        assert!(!g.should_notice(t0 + Duration::from_secs(1), Cap::Broadcast));
        assert!(g.should_notice(t0 + Duration::from_secs(1), Cap::Dns));
        assert!(g.should_notice(t0 + NOTICE_INTERVAL, Cap::Broadcast));
    }
}
