//! Packet NAT through the engine: how many packets per second `Engine::handle_frame` routes
//! and translates between a guest and the uplink, on established flows and when every packet
//! opens a new one; and how long the whole life of a short TCP connection takes in it, with
//! the guest at its cap of closed connections (what `nat_vs_masquerade.sh`'s connection rate
//! asks of it once it has run a while).
//!
//! The engine rewrites frames in place (addresses, ports, checksums, TTL), so every timed
//! iteration first copies a pristine template into the working buffer. The copy (106 or 1514
//! bytes) is part of every bench here, so they stay comparable with each other.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datapath::gateway::GatewayConfig;
use datapath::nat::packet::{TCP_ACK, TCP_FIN, TCP_SYN};
use datapath::nat::{DEFAULT_MAX_FLOWS_PER_GUEST, NatConfig};
use datapath::uplink::UplinkConfig;
use datapath::wire::checksum::{accumulate, checksum, fold, pseudo_header_v4, update16};
use datapath::wire::ipv4::{PROTO_TCP, PROTO_UDP};
use datapath::wire::{VnetHdr, arp};
use datapath::{Config, Engine, MacAddr, PortId, Verdict};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use switchyard_benches::bench_frames;

const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 122, 10);
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x0a]);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const UPLINK_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xee, 0x00, 0x02]);
/// The uplink's gateway, and the remote end of every flow here (it is on the uplink's subnet,
/// so it is its own next hop).
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const REMOTE_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xee, 0x00, 0x01]);

/// Where the UDP/TCP header starts in an untagged IPv4 frame with no options.
const L4: usize = 14 + 20;
const TCP_PSH: u8 = 0x08;

/// The default external port range, 1024-65535: one fresh guest port per new flow, each
/// becoming its own external port.
const FIRST_PORT: u16 = 1024;
const NEW_FLOWS_PER_TABLE: u64 = (u16::MAX - FIRST_PORT) as u64 + 1;

#[derive(Debug, Clone, Copy)]
enum Proto {
    Udp,
    Tcp { flags: u8 },
}

/// A UDP datagram or TCP segment of `payload` bytes in an Ethernet frame, with valid IPv4
/// header and L4 checksums (NAT only updates them incrementally).
fn frame(
    (dst_mac, src_mac): (MacAddr, MacAddr),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    proto: Proto,
    payload: usize,
) -> Vec<u8> {
    let (number, l4_header) = match proto {
        Proto::Udp => (PROTO_UDP, 8),
        Proto::Tcp { .. } => (PROTO_TCP, 20),
    };
    let l4_len = l4_header + payload;
    let total = 20 + l4_len;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&[0x08, 0x00]);
    // Version/IHL, TOS, total length, ID, DF, TTL 64, protocol, checksum (below), addresses.
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, number, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    match proto {
        Proto::Udp => {
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        Proto::Tcp { flags } => {
            f.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // sequence number
            f.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // acknowledgment number
            f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        }
    }
    f.extend((0..payload).map(|i| i as u8));
    let ip_check = checksum(&f[14..L4]);
    f[24..26].copy_from_slice(&ip_check.to_be_bytes());
    let sum = pseudo_header_v4(src.octets(), dst.octets(), number, l4_len as u16);
    let l4_check = !fold(accumulate(sum, &f[L4..]));
    let at = l4_checksum_at(proto);
    f[at..at + 2].copy_from_slice(&udp_nonzero(proto, l4_check).to_be_bytes());
    f
}

fn l4_checksum_at(proto: Proto) -> usize {
    match proto {
        Proto::Udp => L4 + 6,
        Proto::Tcp { .. } => L4 + 16,
    }
}

/// RFC 768: a computed UDP checksum of zero is sent as all ones.
fn udp_nonzero(proto: Proto, check: u16) -> u16 {
    match proto {
        Proto::Udp if check == 0 => 0xffff,
        _ => check,
    }
}

/// The UDP/TCP source port of a frame.
fn sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[L4], frame[L4 + 1]])
}

/// An engine set up as `switchyard run` builds one for libvirt's default network with packet
/// NAT, its next hop on the uplink already resolved.
struct Net {
    engine: Engine,
    guest: PortId,
    uplink: PortId,
    gateway_mac: MacAddr,
    now: Instant,
}

impl Net {
    fn new(nat: NatConfig) -> Net {
        let gateway_mac = GatewayConfig::mac_for_network("default");
        let mut engine = Engine::new(&Config {
            gateway: Some(GatewayConfig {
                mac: gateway_mac,
                ip: GATEWAY_IP,
                prefix: 24,
            }),
            nat: Some((
                nat,
                UplinkConfig {
                    mac: UPLINK_MAC,
                    ip: EXTERNAL_IP,
                    prefix: 24,
                    gateway: Some(REMOTE_IP),
                    mtu: 1500,
                },
            )),
            ..Config::default()
        });
        let guest = engine.add_port("guest");
        let uplink = engine.add_uplink("up0").expect("NAT is configured");
        let mut net = Net {
            engine,
            guest,
            uplink,
            gateway_mac,
            now: Instant::now(),
        };
        net.hear_next_hop();
        net
    }

    /// The next hop asks for the external address; the engine learns its MAC from that.
    fn hear_next_hop(&mut self) {
        let who_has = arp::request_frame(REMOTE_MAC, REMOTE_IP, EXTERNAL_IP);
        assert_eq!(self.send(self.uplink, &who_has).0, Verdict::Reply);
    }

    /// An hour later, the timers having swept every flow away: an empty table whose memory is
    /// already in use, as in a switch that has been running for a while. The next hop is heard
    /// from again, its ARP entry having gone stale meanwhile.
    fn an_hour_later(&mut self) {
        self.now += Duration::from_secs(3600);
        while let Some(due) = self.engine.poll_timeout() {
            self.now = self.now.max(due);
            self.engine.handle_timeout(self.now);
        }
        assert_eq!(self.engine.stats().nat_flows, 0);
        self.hear_next_hop();
    }

    fn default_nat() -> NatConfig {
        NatConfig::new(GATEWAY_IP, 24, EXTERNAL_IP)
    }

    /// Hands a copy of `frame` to the engine: the verdict and the frame as rewritten.
    fn send(&mut self, port: PortId, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut f = frame.to_vec();
        let verdict = self
            .engine
            .handle_frame(self.now, port, &VnetHdr::default(), &mut f);
        (verdict, f)
    }

    /// A guest's packet for the remote, sent to the gateway.
    fn outbound(&self, (sport, dport): (u16, u16), proto: Proto, payload: usize) -> Vec<u8> {
        let macs = (self.gateway_mac, GUEST_MAC);
        frame(macs, (GUEST_IP, sport), (REMOTE_IP, dport), proto, payload)
    }

    /// The remote's packet for the external address, arriving on the uplink.
    fn inbound(&self, (sport, dport): (u16, u16), proto: Proto, payload: usize) -> Vec<u8> {
        let macs = (UPLINK_MAC, REMOTE_MAC);
        frame(
            macs,
            (REMOTE_IP, sport),
            (EXTERNAL_IP, dport),
            proto,
            payload,
        )
    }

    /// Sends `template` once untimed and checks the verdict, then benches it.
    fn bench(
        &mut self,
        c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        (port, template): (PortId, &[u8]),
        expect: Verdict,
    ) {
        assert_eq!(self.send(port, template).0, expect, "{name}");
        let (engine, now, hdr) = (&mut self.engine, self.now, VnetHdr::default());
        let mut buf = template.to_vec();
        bench_frames(c, name, || {
            buf.copy_from_slice(template);
            black_box(engine.handle_frame(now, port, &hdr, black_box(&mut buf)))
        });
    }
}

fn nat(c: &mut Criterion) {
    let mut group = c.benchmark_group("nat");
    group.throughput(Throughput::Elements(1));

    // One UDP flow, replied to: both directions are established.
    let mut net = Net::new(Net::default_nat());
    let (guest, uplink) = (net.guest, net.uplink);
    let out = net.outbound((40000, 53), Proto::Udp, 64);
    let (verdict, translated) = net.send(guest, &out);
    assert_eq!(verdict, Verdict::Forward(uplink));
    let mapped = sport(&translated);
    let reply = net.inbound((53, mapped), Proto::Udp, 64);
    assert_eq!(net.send(uplink, &reply).0, Verdict::Forward(guest));
    let forward = Verdict::Forward(uplink);
    net.bench(&mut group, "established_udp_out", (guest, &out), forward);
    let back = Verdict::Forward(guest);
    net.bench(&mut group, "established_udp_in", (uplink, &reply), back);

    // A TCP connection through its handshake, then a full-sized data segment.
    let mut net = Net::new(Net::default_nat());
    let (guest, uplink) = (net.guest, net.uplink);
    let ports = (40001, 80);
    let syn = net.outbound(ports, Proto::Tcp { flags: TCP_SYN }, 0);
    let (verdict, translated) = net.send(guest, &syn);
    assert_eq!(verdict, Verdict::Forward(uplink));
    let syn_ack = Proto::Tcp {
        flags: TCP_SYN | TCP_ACK,
    };
    let syn_ack = net.inbound((80, sport(&translated)), syn_ack, 0);
    assert_eq!(net.send(uplink, &syn_ack).0, Verdict::Forward(guest));
    let ack = net.outbound(ports, Proto::Tcp { flags: TCP_ACK }, 0);
    assert_eq!(net.send(guest, &ack).0, Verdict::Forward(uplink));
    let rows = net.engine.conntrack(net.now);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, "ESTABLISHED");
    let psh_ack = Proto::Tcp {
        flags: TCP_ACK | TCP_PSH,
    };
    let segment = net.outbound(ports, psh_ack, 1460);
    assert_eq!(segment.len(), 1514);
    let forward = Verdict::Forward(uplink);
    net.bench(
        &mut group,
        "established_tcp_out_1500",
        (guest, &segment),
        forward,
    );

    // Every packet opens a UDP flow from a fresh guest port (so it also takes a fresh
    // external port); the per-guest cap is lifted so one guest can use them all. When the
    // ports run out, untimed, the flows expire and are swept away, so the table is reused
    // rather than rebuilt: a fresh engine would put the page faults of its first use of the
    // table's memory in the timing (about as much as the flow setup itself on this VM).
    // Besides the template copy, each iteration writes the port and updates the UDP checksum
    // (RFC 1624).
    let mut net = Net::new(NatConfig {
        max_flows_per_guest: usize::MAX,
        ..Net::default_nat()
    });
    let template = net.outbound((FIRST_PORT, 53), Proto::Udp, 64);
    let check_at = l4_checksum_at(Proto::Udp);
    let check = u16::from_be_bytes([template[check_at], template[check_at + 1]]);
    let mut buf = template.clone();
    let hdr = VnetHdr::default();
    group.bench_function("new_flow_setup", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let flows = left.min(NEW_FLOWS_PER_TABLE);
                net.an_hour_later();
                let forwarded = net.engine.stats().engine.forwarded;
                let (engine, guest, now) = (&mut net.engine, net.guest, net.now);
                let start = Instant::now();
                for i in 0..flows {
                    buf.copy_from_slice(&template);
                    let port = FIRST_PORT + i as u16;
                    buf[L4..L4 + 2].copy_from_slice(&port.to_be_bytes());
                    let new_check = udp_nonzero(Proto::Udp, update16(check, FIRST_PORT, port));
                    buf[check_at..check_at + 2].copy_from_slice(&new_check.to_be_bytes());
                    black_box(engine.handle_frame(now, guest, &hdr, black_box(&mut buf)));
                }
                elapsed += start.elapsed();
                // Every packet made its flow and went out of the uplink.
                let stats = engine.stats();
                assert_eq!(stats.nat_flows as u64, flows);
                assert_eq!(stats.engine.forwarded - forwarded, flows);
                left -= flows;
            }
            elapsed
        })
    });
    group.finish();
}

/// One short connection as `conn_client` makes them (connect, send a byte, the server closes,
/// then the client): its 8 frames, each marked outbound (from the guest) or not.
struct Connection {
    frames: Vec<(bool, Vec<u8>)>,
}

impl Connection {
    fn new(net: &Net, port: u16) -> Connection {
        let tcp = |flags| Proto::Tcp { flags };
        let ports = (port, 80);
        let back = (80, port);
        let frames = vec![
            (true, net.outbound(ports, tcp(TCP_SYN), 0)),
            (false, net.inbound(back, tcp(TCP_SYN | TCP_ACK), 0)),
            (true, net.outbound(ports, tcp(TCP_ACK), 0)),
            (true, net.outbound(ports, tcp(TCP_ACK | TCP_PSH), 1)),
            (false, net.inbound(back, tcp(TCP_ACK | TCP_FIN), 0)),
            (true, net.outbound(ports, tcp(TCP_ACK), 0)),
            (true, net.outbound(ports, tcp(TCP_ACK | TCP_FIN), 0)),
            (false, net.inbound(back, tcp(TCP_ACK), 0)),
        ];
        Connection { frames }
    }

    /// Runs the connection from guest port `port` (the templates' own port changed to it, the
    /// checksum updated, RFC 1624): every frame must be forwarded.
    fn run(&self, net: &mut Net, bufs: &mut [Vec<u8>], port: u16, from: u16) {
        let check_at = l4_checksum_at(Proto::Tcp { flags: 0 });
        for ((out, template), buf) in self.frames.iter().zip(bufs.iter_mut()) {
            buf.copy_from_slice(template);
            // The guest's port is the source going out and the destination coming back: the
            // external port is the guest's own (MASQUERADE keeps it when free).
            let at = if *out { L4 } else { L4 + 2 };
            buf[at..at + 2].copy_from_slice(&port.to_be_bytes());
            let check = u16::from_be_bytes([buf[check_at], buf[check_at + 1]]);
            let check = update16(check, from, port);
            buf[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
            let (ingress, egress) = if *out {
                (net.guest, net.uplink)
            } else {
                (net.uplink, net.guest)
            };
            let hdr = VnetHdr::default();
            let verdict = net
                .engine
                .handle_frame(net.now, ingress, &hdr, black_box(buf));
            debug_assert_eq!(verdict, Verdict::Forward(egress));
            black_box(verdict);
        }
    }
}

fn churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("nat");
    group.throughput(Throughput::Elements(1));
    // Guest ports cycle through 1024-65535, far more than the per-guest cap (8192), so a port
    // comes back long after its connection gave up its entry: every connection is a new flow,
    // and, once the cap is reached (untimed, first), takes the place of the one that closed
    // longest ago. Time moves 100 us per connection, about what one takes end to end.
    let mut net = Net::new(Net::default_nat());
    let conn = Connection::new(&net, FIRST_PORT);
    let mut bufs: Vec<Vec<u8>> = conn.frames.iter().map(|(_, f)| f.clone()).collect();
    let cap = DEFAULT_MAX_FLOWS_PER_GUEST as u64;
    let mut next = 0u64;
    let mut connect = |net: &mut Net, bufs: &mut [Vec<u8>]| {
        let port = FIRST_PORT + (next % NEW_FLOWS_PER_TABLE) as u16;
        next += 1;
        net.now += Duration::from_micros(100);
        conn.run(net, bufs, port, FIRST_PORT);
    };
    for _ in 0..cap + 1 {
        connect(&mut net, &mut bufs);
    }
    let stats = net.engine.stats();
    assert_eq!(stats.nat_flows as u64, cap);
    assert_eq!(stats.engine.nat.flows_evicted, 1);
    assert_eq!(stats.engine.forwarded, 8 * (cap + 1));
    group.bench_function("tcp_connection_churn_8_frames", |b| {
        b.iter(|| connect(&mut net, &mut bufs))
    });
    group.finish();
    let stats = net.engine.stats();
    assert_eq!(
        stats.engine.forwarded,
        8 * next,
        "every frame was forwarded"
    );
    assert_eq!(stats.engine.nat.flows_evicted + cap, next);
}

criterion_group!(benches, nat, churn);
criterion_main!(benches);
