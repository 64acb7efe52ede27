//! DNS over TCP on the gateway (RFC 7766): guests retry truncated answers over TCP, and
//! `dig +tcp` asks that way directly, so the gateway's port 53 must also speak TCP.
//!
//! The gateway exists only inside the engine, so its TCP endpoint is a userspace stack:
//! smoltcp, fed the guests' segments as IP packets (its medium is IP; the Ethernet framing of
//! answers comes from the MAC each guest's segment arrived with) and polled with the engine's
//! time. A fixed pool of listening sockets bounds the connections; each carries
//! length-prefixed messages (RFC 1035 4.2.2) to the forwarder and its answers back.

use crate::engine::Outgoing;
use crate::port::PortId;
use crate::stack::{Clock, Queues};
use crate::wire::{MacAddr, VnetHdr, ethernet, offload};
use dhcp_dns::dns::{Client, DnsServer, Transport};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Connections served at once; more wait in the guest's SYN retries.
pub const CONNECTIONS: usize = 16;
/// A connection idle this long is closed (RFC 7766 6.2.3 leaves it to the server).
const IDLE: Duration = Duration::from_secs(10);
const RX_BUFFER: usize = 4096;
/// Room for one largest answer with its length prefix.
const TX_BUFFER: usize = 65535 + 2;
/// Guests whose MAC is remembered for framing answers.
const MAX_PEERS: usize = 4096;

#[derive(Debug)]
struct Conn {
    handle: SocketHandle,
    /// Bumped each time the socket listens again, so an answer for an earlier connection
    /// never reaches a later one.
    generation: u32,
    /// Bytes received and not yet a whole message.
    inbox: Vec<u8>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DnsTcpCounters {
    pub segments_in: u64,
    /// Connections that ended (closed, reset or timed out).
    pub connections_ended: u64,
    pub queries: u64,
    pub answers: u64,
    /// Answers whose connection had closed or had no room.
    pub answers_lost: u64,
    /// Segments dropped before the stack: GSO super-frames, broken partial checksums.
    pub segments_dropped: u64,
}

/// TCP port 53 of the gateway.
pub struct DnsTcp {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    conns: Vec<Conn>,
    clock: Clock,
    gateway_mac: MacAddr,
    /// Where each guest talking to us is: its port and MAC.
    peers: HashMap<Ipv4Addr, (PortId, MacAddr)>,
    next_poll: Option<Instant>,
    pub counters: DnsTcpCounters,
}

impl std::fmt::Debug for DnsTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsTcp")
            .field("conns", &self.conns)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn token(index: usize, generation: u32) -> u64 {
    ((index as u64) << 32) | u64::from(generation)
}

impl DnsTcp {
    /// Port 53 of `gateway` (with the network's `prefix`) over TCP, framing answers from
    /// `gateway_mac`, with packets of at most `mtu` bytes. `now` is the stack's time origin.
    pub fn new(
        gateway: Ipv4Addr,
        prefix: u8,
        gateway_mac: MacAddr,
        mtu: usize,
        now: Instant,
    ) -> DnsTcp {
        let mut queues = Queues::new(mtu, ethernet::HEADER_LEN, true);
        let mut config = Config::new(HardwareAddress::Ip);
        // Initial sequence numbers: different on each start (RFC 6528 asks for
        // unpredictable ones; these are guests on our own switch).
        config.random_seed = crate::stack::random_seed(gateway);
        let mut iface = Interface::new(config, &mut queues, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), prefix));
        });
        let mut sockets = SocketSet::new(Vec::with_capacity(CONNECTIONS));
        let conns = (0..CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
                );
                socket.set_timeout(Some(smoltcp::time::Duration::from_millis(
                    IDLE.as_millis() as u64
                )));
                // Listening on our own port cannot fail.
                let _ = socket.listen(crate::dns::PORT);
                Conn {
                    handle: sockets.add(socket),
                    generation: 0,
                    inbox: Vec::new(),
                }
            })
            .collect();
        DnsTcp {
            iface,
            sockets,
            queues,
            conns,
            clock: Clock { epoch: now },
            gateway_mac,
            peers: HashMap::new(),
            next_poll: None,
            counters: DnsTcpCounters::default(),
        }
    }

    /// Whether `packet` (IPv4, checked header) is a TCP segment to port 53 of `gateway`.
    pub fn wants(packet: &[u8], gateway: Ipv4Addr) -> bool {
        let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
        packet.len() >= ihl + 20
            && packet[9] == crate::wire::ipv4::PROTO_TCP
            && packet[16..20] == gateway.octets()
            && u16::from_be_bytes([packet[ihl + 2], packet[ihl + 3]]) == crate::dns::PORT
    }

    /// A segment from guest `src_mac` on `ingress`: the whole Ethernet `frame` with its
    /// offload state `vnet`. Queries it completes go to `dns`; answers and acknowledgements
    /// join `ready`.
    pub fn handle_segment(
        &mut self,
        now: Instant,
        ingress: PortId,
        src_mac: MacAddr,
        (vnet, frame): (&VnetHdr, &[u8]),
        dns: &mut DnsServer,
    ) {
        self.counters.segments_in += 1;
        let mut frame = frame.to_vec();
        if vnet.is_gso()
            || (vnet.needs_csum() && offload::complete_checksum(vnet, &mut frame).is_err())
        {
            self.counters.segments_dropped += 1;
            return;
        }
        let packet = frame.split_off(ethernet::HEADER_LEN.min(frame.len()));
        if let Some(src) = packet.get(12..16) {
            let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
            if self.peers.len() < MAX_PEERS || self.peers.contains_key(&src) {
                self.peers.insert(src, (ingress, src_mac));
            }
        }
        self.queues.rx.push_back(packet);
        self.poll(now, dns);
    }

    /// Runs the stack: takes in queued segments, hands whole queries to `dns`, re-arms closed
    /// sockets.
    fn poll(&mut self, now: Instant, dns: &mut DnsServer) {
        let at = self.clock.stack_time(now);
        self.iface.poll(at, &mut self.queues, &mut self.sockets);
        for (index, conn) in self.conns.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.state() == tcp::State::CloseWait {
                // The client is done (RFC 7766 6.2.2: it closes first, as dig does).
                socket.close();
            }
            if !socket.is_open() {
                conn.inbox.clear();
                conn.generation = conn.generation.wrapping_add(1);
                self.counters.connections_ended += 1;
                let _ = socket.listen(crate::dns::PORT);
                continue;
            }
            let mut chunk = [0u8; 1024];
            while socket.can_recv() {
                match socket.recv_slice(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => conn.inbox.extend_from_slice(&chunk[..n]),
                }
            }
            let Some(peer) = socket.remote_endpoint() else {
                continue;
            };
            let IpAddress::Ipv4(peer_ip) = peer.addr;
            let client = Client {
                addr: SocketAddr::V4(SocketAddrV4::new(peer_ip, peer.port)),
                token: token(index, conn.generation),
                transport: Transport::Tcp,
            };
            // RFC 1035 4.2.2: each message is preceded by its two-byte length.
            while conn.inbox.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([conn.inbox[0], conn.inbox[1]]));
                if conn.inbox.len() < 2 + len {
                    break;
                }
                let message: Vec<u8> = conn.inbox.drain(..2 + len).skip(2).collect();
                self.counters.queries += 1;
                let _ = dns.handle_query(now, client, &message);
            }
        }
    }

    /// An answer from the forwarder for a TCP client.
    pub fn deliver(&mut self, client: &Client, answer: &[u8]) {
        let index = (client.token >> 32) as usize;
        let generation = client.token as u32;
        let Some(conn) = self.conns.get(index).filter(|c| c.generation == generation) else {
            self.counters.answers_lost += 1;
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        let Ok(len) = u16::try_from(answer.len()) else {
            self.counters.answers_lost += 1;
            return;
        };
        if !socket.may_send() || socket.send_capacity() - socket.send_queue() < answer.len() + 2 {
            self.counters.answers_lost += 1;
            return;
        }
        let _ = socket.send_slice(&len.to_be_bytes());
        let _ = socket.send_slice(answer);
        self.counters.answers += 1;
    }

    /// Lets the stack send what it has (answers, acknowledgements, retransmissions) and frames
    /// each packet for the guest it goes to.
    pub fn poll_egress(
        &mut self,
        now: Instant,
        dns: &mut DnsServer,
        ready: &mut VecDeque<Outgoing>,
    ) {
        self.poll(now, dns);
        while let Some(mut frame) = self.queues.tx.pop_front() {
            let Some(dst) = frame.get(ethernet::HEADER_LEN + 16..ethernet::HEADER_LEN + 20) else {
                continue;
            };
            let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
            let Some(&(port, mac)) = self.peers.get(&dst) else {
                continue;
            };
            ethernet::write_header(&mut frame, mac, self.gateway_mac);
            ready.push_back(Outgoing {
                port,
                vnet: VnetHdr::default(),
                frame,
            });
        }
        let at = self.clock.stack_time(now);
        let clock = self.clock;
        self.next_poll = self
            .iface
            .poll_at(at, &self.sockets)
            .map(|next| clock.engine_time(next));
    }

    /// When the stack next needs [`Self::poll_egress`] (retransmission, idle timeout).
    pub fn poll_at(&self) -> Option<Instant> {
        self.next_poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dst: [u8; 4], dport: u16, proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[16..20].copy_from_slice(&dst);
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn only_tcp_to_port_53_of_the_gateway_is_taken() {
        let gw = Ipv4Addr::new(192, 168, 122, 1);
        assert!(DnsTcp::wants(&segment(gw.octets(), 53, 6), gw));
        assert!(!DnsTcp::wants(&segment(gw.octets(), 80, 6), gw));
        assert!(!DnsTcp::wants(&segment(gw.octets(), 53, 17), gw));
        assert!(!DnsTcp::wants(&segment([192, 168, 122, 2], 53, 6), gw));
        assert!(!DnsTcp::wants(&segment(gw.octets(), 53, 6)[..30], gw));
    }
}
