//! Ports and their counters.
//!
//! Every frame a port receives is either forwarded or dropped for a named reason; the
//! counters here are how a user sees which (`switchyard stats`), so each drop site in the
//! engine and the I/O edge increments exactly one of them.

use serde::Serialize;
use std::fmt;

/// Index of a port in the engine. Stable for the port's lifetime; reused after removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortId(pub u16);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

macro_rules! drop_reasons {
    ($($variant:ident => $name:literal, $doc:literal;)*) => {
        /// Why a frame was dropped. Each has a counter per port.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason {
            $(#[doc = $doc] $variant,)*
        }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// The counter's name as shown by `switchyard stats`.
            pub fn name(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }
        }
    };
}

drop_reasons! {
    Runt => "runt", "Shorter than an Ethernet header (or its announced 802.1Q tag).";
    Oversize => "oversize", "Longer than the network MTU allows for a frame that is not GSO.";
    InvalidSource => "invalid_source_mac", "Source MAC is multicast, broadcast or all zeros.";
    SamePort => "same_port", "Destination was learned on the ingress port: it is already there.";
    SpoofedGatewayMac => "spoofed_gateway_mac", "Source MAC is the gateway's own.";
    BadHeader => "bad_header", "An IPv4 or ARP header addressed to the gateway is truncated or lies about its length.";
    BadChecksum => "bad_checksum", "An IPv4 header or ICMP checksum addressed to the gateway, or of an ICMP error NAT would translate, does not verify.";
    Fragment => "fragment", "A fragment addressed to the gateway (reassembly is not implemented).";
    NoRoute => "no_route", "Addressed to the gateway for a destination it does not route: no uplink, a source outside the network, multicast or broadcast.";
    TtlExceeded => "ttl_exceeded", "The TTL ran out at the gateway (an ICMP time-exceeded went back, rate permitting).";
    NeedsFragmentation => "needs_fragmentation", "Larger than the egress MTU: DF set (ICMP fragmentation-needed went back) or fragmentation not supported.";
    NatNoFlow => "nat_no_flow", "Reached the external address but matches no connection (or the filtering policy refused it).";
    NatTableFull => "nat_table_full", "A new connection when the connection table is at its cap.";
    NatGuestLimit => "nat_guest_limit", "A new connection from a guest already at its per-guest cap.";
    NatPortsExhausted => "nat_ports_exhausted", "A new connection when no external port is free in the range.";
    NatUnsupported => "nat_unsupported", "A packet NAT cannot translate: unknown ICMP type, TCP without SYN for a new flow, unmatched fragment.";
    NotForUs => "not_for_us", "Seen on the uplink (promiscuous) but addressed to another host.";
    NeighborUnresolved => "neighbor_unresolved", "The next hop did not answer ARP (or its queue of waiting packets was full).";
    GatewayUnhandled => "gateway_unhandled", "Addressed to the gateway for a service it does not offer (yet): only ARP, ping and DHCP are answered.";
    DnsRejected => "dns_rejected", "A DNS message to the gateway that the forwarder dropped (not even answerable with FORMERR); the dns counters say why.";
    DhcpRejected => "dhcp_rejected", "A DHCP message to the gateway that the server dropped (malformed, not a request, not for this server); the dhcp counters say why.";
    RingTruncated => "ring_truncated", "The uplink's receive ring cut the frame short (it was larger than a ring block).";
    Truncated => "truncated", "An AF_PACKET port's frame was longer than the read buffer (a GRO super-frame past 64 KiB, as BIG TCP makes) and arrived cut short.";
    BadVnetHeader => "bad_vnet_header", "The virtio-net header is truncated or inconsistent.";
    OffloadUnsupported => "offload_unsupported", "A GSO frame the egress cannot take and software cannot segment.";
    GsoToService => "gso_to_service", "A UDP super-frame (USO, virtio GSO_UDP_L4) for the gateway's DHCP or DNS service, which read one datagram per frame.";
    TxError => "tx_error", "The egress write failed (queue full, interface down).";
    HandoverFull => "handover_full", "A fast-path worker's frame for the engine found its hand-over queue full.";
    SpoofedMac => "spoofed_mac", "clean-traffic: a source MAC (or ARP sender MAC) other than the port's own.";
    SpoofedIp => "spoofed_ip", "clean-traffic: an IPv4 source (or ARP sender address) the port's MAC does not hold.";
    RogueServer => "rogue_server", "clean-traffic: a guest answering as a DHCP or DHCPv6 server, or sending router advertisements.";
    StormControl => "storm_control", "A broadcast or multicast frame beyond the port's broadcast-per-second.";
    DhcpRateLimited => "dhcp_rate_limited", "A DHCP message beyond the port's dhcp-per-second.";
    DnsRateLimited => "dns_rate_limited", "A DNS query beyond the port's dns-per-second.";
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Traffic counters of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    drops: [u64; DropReason::COUNT],
}

// By hand: std derives `Default` for arrays of at most 32 elements.
impl Default for PortCounters {
    fn default() -> Self {
        PortCounters {
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

impl PortCounters {
    pub fn record_rx(&mut self, bytes: usize) {
        self.rx_packets += 1;
        self.rx_bytes += bytes as u64;
    }

    pub fn record_tx(&mut self, packets: u64, bytes: usize) {
        self.tx_packets += packets;
        self.tx_bytes += bytes as u64;
    }

    pub fn record_drop(&mut self, reason: DropReason) {
        self.record_drops(reason, 1);
    }

    pub fn record_drops(&mut self, reason: DropReason, count: u64) {
        self.drops[reason as usize] += count;
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Non-zero drop counters by name.
    pub fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

impl Serialize for PortCounters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("rx_packets", &self.rx_packets)?;
        map.serialize_entry("rx_bytes", &self.rx_bytes)?;
        map.serialize_entry("tx_packets", &self.tx_packets)?;
        map.serialize_entry("tx_bytes", &self.tx_bytes)?;
        for reason in DropReason::ALL {
            map.serialize_entry(&format!("drop_{}", reason.name()), &self.drops(*reason))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let mut c = PortCounters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                c.record_drop(*r);
            }
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(c.drops(*r), i as u64 + 1, "{r}");
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
