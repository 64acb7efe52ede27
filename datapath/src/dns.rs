//! The gateway's DNS service: guests' queries to UDP port 53 of the gateway go to the sans-IO
//! forwarder of [`dhcp_dns::dns`]; its answers are framed from the gateway, and its upstream
//! queries are handed to the I/O edge, which sends them from host sockets of the engine's
//! process (so DNS works without privileges and in every forward mode).
//!
//! Like the DHCP service it answers only on guest ports: the uplink side never reaches it, so
//! switchyard is not an open resolver. Names follow the DHCP leases: the engine feeds lease
//! events in as they happen.

use crate::dns_tcp::DnsTcp;
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
    tcp: Option<DnsTcp>,
    pub upstream_dropped: u64,
}

impl DnsService {
    pub fn new(server: DnsServer, gateway_mac: MacAddr, gateway_ip: Ipv4Addr) -> DnsService {
        DnsService {
            server,
            gateway_mac,
            gateway_ip,
            upstream: VecDeque::new(),
            tcp: None,
            upstream_dropped: 0,
        }
    }

    /// Also answers over TCP (RFC 7766) on the gateway's address, whose network has `prefix`
    /// and `mtu`; `now` is the TCP stack's time origin.
    pub fn with_tcp(mut self, prefix: u8, mtu: usize, now: Instant) -> DnsService {
        self.tcp = Some(DnsTcp::new(
            self.gateway_ip,
            prefix,
            self.gateway_mac,
            mtu,
            now,
        ));
        self
    }

    pub fn tcp(&self) -> Option<&DnsTcp> {
        self.tcp.as_ref()
    }

    /// Whether `packet` (IPv4 to the gateway) is a TCP segment for port 53 that is served.
    pub fn wants_tcp(&self, packet: &[u8]) -> bool {
        self.tcp.is_some() && DnsTcp::wants(packet, self.gateway_ip)
    }

    /// A TCP segment for port 53 from guest `src_mac` on `ingress` (the whole frame).
    pub fn handle_tcp_segment(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        frame: (&VnetHdr, &[u8]),
        ready: &mut VecDeque<Outgoing>,
    ) {
        if let Some(tcp) = &mut self.tcp {
            tcp.handle_segment(now, ingress, src_mac, frame, &mut self.server);
        }
        self.drain(now, ready, true);
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
        self.drain(now, ready, false);
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
        self.drain(now, ready, false);
    }

    /// The next query for a host socket to send upstream.
    pub fn poll_upstream(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.upstream.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let tcp = self.tcp.as_ref().and_then(DnsTcp::poll_at);
        self.server.poll_timeout().into_iter().chain(tcp).min()
    }

    pub fn handle_timeout(&mut self, now: Instant, ready: &mut VecDeque<Outgoing>) {
        self.server.handle_timeout(now);
        let tcp_due = self
            .tcp
            .as_ref()
            .and_then(DnsTcp::poll_at)
            .is_some_and(|t| t <= now);
        self.drain(now, ready, tcp_due);
    }

    /// Moves the forwarder's output to where it goes: UDP answers framed into `ready`, TCP
    /// answers into their connection, upstream queries to the queue of the I/O edge; then
    /// lets the TCP stack send. A TCP poll may complete more queries, whose local answers
    /// come out at once: a few rounds settle it.
    /// `poll_tcp`: the TCP stack has input or timers due; otherwise it runs only when an
    /// answer went into one of its connections (a UDP query never touches it).
    fn drain(&mut self, now: Instant, ready: &mut VecDeque<Outgoing>, mut poll_tcp: bool) {
        for _ in 0..4 {
            let mut moved = 0;
            while let Some(output) = self.server.poll_output() {
                moved += 1;
                match output {
                    Output::ToClient(client, answer) => {
                        poll_tcp |= client.transport == Transport::Tcp;
                        self.answer(&client, &answer, ready);
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
            if let Some(tcp) = self.tcp.as_mut().filter(|_| poll_tcp) {
                tcp.poll_egress(now, &mut self.server, ready);
                poll_tcp = false;
                continue;
            }
            if moved == 0 {
                break;
            }
        }
    }

    fn answer(&mut self, client: &Client, answer: &[u8], ready: &mut VecDeque<Outgoing>) {
        match (client.transport, client.addr) {
            (Transport::Tcp, _) => {
                if let Some(tcp) = &mut self.tcp {
                    tcp.deliver(client, answer);
                }
            }
            (Transport::Udp, SocketAddr::V4(to)) => {
                let (port, mac) = untoken(client.token);
                ready.push_back(Outgoing {
                    port,
                    vnet: VnetHdr::default(),
                    frame: udp_frame(
                        (mac, self.gateway_mac),
                        (self.gateway_ip, PORT),
                        (*to.ip(), to.port()),
                        answer,
                    ),
                });
            }
            (Transport::Udp, SocketAddr::V6(_)) => {}
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
