//! The virtual gateway: the address `virbr0` holds in libvirt's default network
//! (192.168.122.1), served inside the engine.
//!
//! It answers ARP for its address and ICMP echo, rewriting the request into the reply in the
//! frame buffer itself, so answering costs no allocation and no copy. What lies beyond it
//! (routing to NAT, DHCP, DNS) is counted and dropped until those parts exist.

use crate::port::DropReason;
use crate::wire::arp::{self, ArpPacket};
use crate::wire::checksum;
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::{EtherType, MacAddr};
use serde::Serialize;
use std::net::Ipv4Addr;

/// TTL of packets the gateway originates (Linux's default `ip_default_ttl`).
const DEFAULT_TTL: u8 = 64;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The gateway's identity on the network: `<mac address>` and `<ip address prefix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayConfig {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl GatewayConfig {
    /// A stable locally administered MAC for a network without `<mac>`: libvirt's
    /// 52:54:00 prefix with three bytes derived from the network name (FNV-1a), so the
    /// gateway keeps its MAC across restarts and guests' ARP caches stay valid.
    pub fn mac_for_network(name: &str) -> MacAddr {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let b = hash.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[5], b[6], b[7]])
    }
}

/// What the gateway did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The frame was rewritten into a reply: send it back out of the ingress port.
    Reply,
    /// Not addressed to the gateway: switch it as usual.
    Pass,
    Drop(DropReason),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayCounters {
    pub arp_replies: u64,
    pub echo_replies: u64,
}

#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    pub counters: GatewayCounters,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Gateway {
        Gateway {
            config,
            counters: GatewayCounters::default(),
        }
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Handles `frame`, whose Ethernet header is `l3` bytes long. `unicast_to_us` says the
    /// destination MAC is the gateway's; otherwise only a broadcast ARP for the gateway's
    /// address is taken, and everything else passes.
    pub fn handle(
        &mut self,
        frame: &mut [u8],
        l3: usize,
        ethertype: EtherType,
        unicast_to_us: bool,
    ) -> Answer {
        let answer = match ethertype {
            EtherType::ARP => self.handle_arp(frame, l3, unicast_to_us),
            _ if !unicast_to_us => Answer::Pass,
            EtherType::IPV4 => self.handle_ipv4(&mut frame[l3..]),
            _ => Answer::Drop(DropReason::GatewayUnhandled),
        };
        if answer == Answer::Reply {
            // Back to the sender, from the gateway.
            frame.copy_within(6..12, 0);
            frame[6..12].copy_from_slice(&self.config.mac.0);
        }
        answer
    }

    /// RFC 826 "Packet Reception": answer a request for our protocol address.
    fn handle_arp(&mut self, frame: &mut [u8], l3: usize, unicast_to_us: bool) -> Answer {
        let not_ours = if unicast_to_us {
            Answer::Drop(DropReason::GatewayUnhandled)
        } else {
            Answer::Pass
        };
        let Ok(mut arp) = ArpPacket::new_checked(&mut frame[l3..]) else {
            return if unicast_to_us {
                Answer::Drop(DropReason::BadHeader)
            } else {
                Answer::Pass
            };
        };
        if arp.operation() != arp::OP_REQUEST || arp.target_ip() != self.config.ip {
            return not_ours;
        }
        arp.make_reply(self.config.mac, self.config.ip);
        self.counters.arp_replies += 1;
        Answer::Reply
    }

    fn handle_ipv4(&mut self, packet: &mut [u8]) -> Answer {
        let Ok(mut ip) = Ipv4Packet::new_checked(packet) else {
            return Answer::Drop(DropReason::BadHeader);
        };
        if !ip.header_checksum_ok() {
            return Answer::Drop(DropReason::BadChecksum);
        }
        if ip.dst() != self.config.ip {
            // Routing beyond the subnet is NAT's job, which does not exist yet.
            return Answer::Drop(DropReason::NoRoute);
        }
        if ip.protocol() != ipv4::PROTO_ICMP {
            return Answer::Drop(DropReason::GatewayUnhandled);
        }
        if ip.is_fragment() {
            return Answer::Drop(DropReason::Fragment);
        }
        let icmp = ip.payload_mut();
        if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
            return Answer::Drop(DropReason::GatewayUnhandled);
        }
        if checksum::fold(checksum::accumulate(0, icmp)) != 0xffff {
            return Answer::Drop(DropReason::BadChecksum);
        }
        // RFC 792 "Echo or Echo Reply Message": same identifier, sequence and data, type 0;
        // the type/code word changes, so the checksum is updated for that word (RFC 1624).
        let check = u16::from_be_bytes([icmp[2], icmp[3]]);
        icmp[0] = ICMP_ECHO_REPLY;
        let check = checksum::update16(
            check,
            (ICMP_ECHO_REQUEST as u16) << 8,
            (ICMP_ECHO_REPLY as u16) << 8,
        );
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        ip.swap_addresses();
        ip.set_ttl(DEFAULT_TTL);
        self.counters.echo_replies += 1;
        Answer::Reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::HEADER_LEN;

    const GW_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn gateway() -> Gateway {
        Gateway::new(GatewayConfig {
            mac: GW_MAC,
            ip: Ipv4Addr::new(192, 168, 122, 1),
            prefix: 24,
        })
    }

    fn eth(dst: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&GUEST.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
        a.extend_from_slice(&GUEST.0);
        a.extend_from_slice(&[192, 168, 122, 10]);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        eth(MacAddr::BROADCAST, 0x0806, &a)
    }

    fn echo_request(dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01];
        icmp.extend_from_slice(payload);
        let c = checksum::checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 192, 168, 122, 10];
        ip.extend_from_slice(&dst);
        let total = (20 + icmp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&icmp);
        eth(GW_MAC, 0x0800, &ip)
    }

    // RFC 826: a request for our address is answered with our hardware address, to the asker.
    #[test]
    fn answers_arp_for_its_address_only() {
        let mut gw = gateway();
        let mut f = arp_request([192, 168, 122, 1]);
        assert_eq!(
            gw.handle(&mut f, HEADER_LEN, EtherType::ARP, false),
            Answer::Reply
        );
        assert_eq!(&f[0..6], &GUEST.0);
        assert_eq!(&f[6..12], &GW_MAC.0);
        let arp = ArpPacket::new_checked(&f[HEADER_LEN..]).unwrap();
        assert_eq!(arp.operation(), arp::OP_REPLY);
        assert_eq!(arp.sender_mac(), GW_MAC);

        let mut other = arp_request([192, 168, 122, 11]);
        let before = other.clone();
        assert_eq!(
            gw.handle(&mut other, HEADER_LEN, EtherType::ARP, false),
            Answer::Pass
        );
        assert_eq!(other, before, "frames that pass are untouched");
        assert_eq!(gw.counters.arp_replies, 1);
    }

    // RFC 792: the echo reply carries the request's identifier, sequence and data.
    #[test]
    fn answers_ping_with_valid_checksums() {
        let mut gw = gateway();
        let data: Vec<u8> = (0..56).collect();
        let mut f = echo_request([192, 168, 122, 1], &data);
        assert_eq!(
            gw.handle(&mut f, HEADER_LEN, EtherType::IPV4, true),
            Answer::Reply
        );
        let ip = Ipv4Packet::new_checked(&f[HEADER_LEN..]).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(ip.src(), Ipv4Addr::new(192, 168, 122, 1));
        assert_eq!(ip.dst(), Ipv4Addr::new(192, 168, 122, 10));
        let icmp = ip.payload();
        assert_eq!(icmp[0], 0);
        assert_eq!(&icmp[4..8], &[0x12, 0x34, 0x00, 0x01]);
        assert_eq!(&icmp[8..], &data[..]);
        assert_eq!(checksum::fold(checksum::accumulate(0, icmp)), 0xffff);
        assert_eq!(&f[0..6], &GUEST.0);
    }

    #[test]
    fn drops_what_it_cannot_serve_yet_with_a_reason() {
        let mut gw = gateway();
        let mut beyond = echo_request([203, 0, 113, 1], &[0; 8]);
        assert_eq!(
            gw.handle(&mut beyond, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::NoRoute)
        );
        let mut bad_sum = echo_request([192, 168, 122, 1], &[0; 8]);
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0xff;
        assert_eq!(
            gw.handle(&mut bad_sum, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadChecksum)
        );
        let mut bad_ip_sum = echo_request([192, 168, 122, 1], &[0; 8]);
        bad_ip_sum[HEADER_LEN + 8] = 1;
        assert_eq!(
            gw.handle(&mut bad_ip_sum, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadChecksum)
        );
        let mut truncated = echo_request([192, 168, 122, 1], &[0; 8]);
        truncated.truncate(HEADER_LEN + 10);
        assert_eq!(
            gw.handle(&mut truncated, HEADER_LEN, EtherType::IPV4, true),
            Answer::Drop(DropReason::BadHeader)
        );
        let mut v6 = eth(GW_MAC, 0x86dd, &[0; 40]);
        assert_eq!(
            gw.handle(&mut v6, HEADER_LEN, EtherType::IPV6, true),
            Answer::Drop(DropReason::GatewayUnhandled)
        );
    }

    #[test]
    fn generated_mac_is_stable_and_local() {
        let a = GatewayConfig::mac_for_network("default");
        assert_eq!(a, GatewayConfig::mac_for_network("default"));
        assert_ne!(a, GatewayConfig::mac_for_network("other"));
        assert!(a.is_valid_source());
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
    }
}
