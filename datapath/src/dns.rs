//! The gateway's DNS service: guests' queries to UDP port 53 of the gateway go to the sans-IO
//! forwarder of [`dhcp_dns::dns`]; its answers are framed from the gateway, and its upstream
//! queries are handed to the I/O edge, which sends them from host sockets of the engine's
//! process (so DNS works without privileges and in every forward mode).
//!
//! Like the DHCP service it answers only on guest ports: the uplink side never reaches it, so
//! switchyard is not an open resolver. Names follow the DHCP leases: the engine feeds lease
//! events in as they happen.

use crate::engine::Outgoing;
use crate::gateway::{self, udp_frame};
use crate::port::PortId;
use crate::wire::{MacAddr, VnetHdr};
use dhcp_dns::dns::{Client, DnsCounters, DnsServer, Output, Transport};
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

pub const PORT: u16 = 53;
/// Upstream queries waiting for the I/O edge; beyond this they are dropped (and counted):
/// the client retries.
const MAX_UPSTREAM_QUEUE: usize = 1024;

/// Where an answer goes back to: the ingress port and the guest's MAC, packed in the opaque
/// token the forwarder hands back.
fn token(port: PortId, mac: MacAddr) -> u64 {
    let m = mac.0;
    (u64::from(port.0) << 48) | u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

fn untoken(token: u64) -> (PortId, MacAddr) {
    let b = token.to_be_bytes();
    (
        PortId((token >> 48) as u16),
        MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]]),
    )
}

#[derive(Debug)]
pub struct DnsService {
    server: DnsServer,
    gateway_mac: MacAddr,
    gateway_ip: Ipv4Addr,
    upstream: VecDeque<(SocketAddr, Vec<u8>)>,
    pub upstream_dropped: u64,
}

impl DnsService {
    pub fn new(server: DnsServer, gateway_mac: MacAddr, gateway_ip: Ipv4Addr) -> DnsService {
        DnsService {
            server,
            gateway_mac,
            gateway_ip,
            upstream: VecDeque::new(),
            upstream_dropped: 0,
        }
    }

    pub fn server(&self) -> &DnsServer {
        &self.server
    }

    pub fn server_mut(&mut self) -> &mut DnsServer {
        &mut self.server
    }

    pub fn counters(&self) -> &DnsCounters {
        self.server.counters()
    }

    /// The client's source port and the query, when `packet` (IPv4, addressed to the
    /// gateway) is a UDP datagram to the DNS port.
    pub fn query_in<'a>(&self, packet: &'a [u8]) -> Option<(u16, &'a [u8])> {
        let dst = packet.get(16..20)?;
        if dst != self.gateway_ip.octets() {
            return None;
        }
        gateway::udp_datagram_to(packet, PORT)
    }

    /// A query from the guest `src_mac` at `src` on port `ingress`. Answers (at once, or
    /// once upstream replies) join `ready`.
    pub fn handle_query(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        src: SocketAddrV4,
        query: &[u8],
        ready: &mut VecDeque<Outgoing>,
    ) -> bool {
        let client = Client {
            addr: SocketAddr::V4(src),
            token: token(ingress, src_mac),
            transport: Transport::Udp,
        };
        let served = self.server.handle_query(now, client, query).is_ok();
        self.drain(ready);
        served
    }

    /// A datagram from upstream `from`, received by a host socket.
    pub fn handle_upstream(
        &mut self,
        now: Instant,
        from: SocketAddr,
        response: &[u8],
        ready: &mut VecDeque<Outgoing>,
    ) {
        self.server.handle_upstream(now, from, response);
        self.drain(ready);
    }

    /// The next query for a host socket to send upstream.
    pub fn poll_upstream(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.upstream.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.server.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant, ready: &mut VecDeque<Outgoing>) {
        self.server.handle_timeout(now);
        self.drain(ready);
    }

    /// Moves the forwarder's output to where it goes: answers framed into `ready`, upstream
    /// queries to the queue of the I/O edge.
    fn drain(&mut self, ready: &mut VecDeque<Outgoing>) {
        while let Some(output) = self.server.poll_output() {
            match output {
                Output::ToClient(client, answer) => {
                    let SocketAddr::V4(to) = client.addr else {
                        continue;
                    };
                    if client.transport != Transport::Udp {
                        continue;
                    }
                    let (port, mac) = untoken(client.token);
                    ready.push_back(Outgoing {
                        port,
                        vnet: VnetHdr::default(),
                        frame: udp_frame(
                            (mac, self.gateway_mac),
                            (self.gateway_ip, PORT),
                            (*to.ip(), to.port()),
                            &answer,
                        ),
                    });
                }
                Output::ToUpstream(server, query) => {
                    if self.upstream.len() >= MAX_UPSTREAM_QUEUE {
                        self.upstream_dropped += 1;
                    } else {
                        self.upstream.push_back((server, query));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_port_and_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(untoken(token(PortId(513), mac)), (PortId(513), mac));
    }
}
