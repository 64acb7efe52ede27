//! Tables a person reads: per-port counters and the forwarding database.

use datapath::engine::Stats;
use datapath::switch::FdbRow;
use std::fmt::Write;

/// `switchyard stats`: one row per port, then drops by reason and switch-wide counters.
pub fn stats_table(stats: &Stats) -> String {
    let mut out = String::new();
    let w = stats
        .ports
        .iter()
        .map(|(_, p)| p.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        out,
        "{:<5} {:<w$} {:>10} {:>14} {:>10} {:>14} {:>8}",
        "PORT", "NAME", "RX_PKTS", "RX_BYTES", "TX_PKTS", "TX_BYTES", "DROPS"
    );
    for (id, port) in &stats.ports {
        let c = &port.counters;
        let _ = writeln!(
            out,
            "{:<5} {:<w$} {:>10} {:>14} {:>10} {:>14} {:>8}",
            id.0,
            port.name,
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            c.total_drops()
        );
    }
    for (id, port) in &stats.ports {
        let drops: Vec<String> = port
            .counters
            .drop_counts()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        if !drops.is_empty() {
            let _ = writeln!(
                out,
                "drops on port {} ({}): {}",
                id.0,
                port.name,
                drops.join(" ")
            );
        }
        if let Some(k) = port.kernel {
            let _ = writeln!(
                out,
                "port {} ({}), its guest's kernel: {} frames sent, {} of them dropped before switchyard read them (the tap's queue full, or no reader); {} dropped on arrival",
                id.0, port.name, k.guest_sent, k.guest_sent_dropped, k.guest_received_dropped
            );
        }
    }
    let e = &stats.engine;
    let _ = writeln!(
        out,
        "switch: {} forwarded ({} by workers, {} handed by workers to the engine), {} flooded; fdb: {} entries, {} learned, {} moved, {} aged, {} not learned (table full)",
        e.forwarded,
        e.worker_forwarded,
        e.worker_handed_over,
        e.flooded,
        stats.fdb_entries,
        e.fdb.learned,
        e.fdb.moved,
        e.fdb.aged,
        e.fdb.full
    );
    for w in &stats.workers {
        let _ = writeln!(
            out,
            "worker {}: {} frames in ({} bytes), {} out; {} forwarded ({} translated), {} handed to the engine; socket NAT {} connections opened, {} open",
            w.queue,
            w.rx_packets,
            w.rx_bytes,
            w.tx_packets,
            w.forwarded,
            w.translated,
            w.handed_over,
            w.socket_nat_connects,
            w.socket_nat_flows
        );
    }
    out
}

/// `switchyard fdb`, like `brctl showmacs`.
pub fn fdb_table(rows: &[FdbRow], port_name: impl Fn(u16) -> String) -> String {
    let mut out = String::new();
    let w = rows
        .iter()
        .map(|r| port_name(r.port.0).len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        out,
        "{:<5} {:<w$} {:<17} {:>5} {:>9}",
        "PORT", "NAME", "MAC", "VLAN", "AGE(s)"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{:<5} {:<w$} {:<17} {:>5} {:>9.2}",
            row.port.0,
            port_name(row.port.0),
            row.mac,
            row.vlan,
            row.age_ms as f64 / 1000.0
        );
    }
    out
}

/// The counters in Prometheus' text format (version 0.0.4): engine-wide counters as
/// `switchyard_<path>`, per-port ones with a `port` label, each worker's with a `worker` label
/// (its queue), and the table sizes as gauges.
pub fn prometheus(network: &str, stats: &Stats) -> String {
    let mut out = String::new();
    let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let net = label(network);
    let mut engine = Vec::new();
    if let Ok(value) = serde_json::to_value(&stats.engine) {
        datapath::trace::flatten("", &value, &mut engine);
    }
    for (name, value) in engine {
        let metric = format!("switchyard_{}_total", name.replace('.', "_"));
        let _ = writeln!(out, "# TYPE {metric} counter");
        let _ = writeln!(out, "{metric}{{network=\"{net}\"}} {value}");
    }
    let mut per_port: std::collections::BTreeMap<String, Vec<(String, u64)>> = Default::default();
    for (_, port) in &stats.ports {
        let mut values = Vec::new();
        if let Ok(value) = serde_json::to_value(&port.counters) {
            datapath::trace::flatten("", &value, &mut values);
        }
        // A tap's counters as its guest's kernel keeps them: `kernel_guest_sent_dropped`...
        if let Some(Ok(value)) = port.kernel.map(serde_json::to_value) {
            datapath::trace::flatten("kernel", &value, &mut values);
        }
        for (name, value) in values {
            per_port
                .entry(name.replace('.', "_"))
                .or_default()
                .push((label(&port.name), value));
        }
    }
    for (name, ports) in per_port {
        let metric = format!("switchyard_port_{name}_total");
        let _ = writeln!(out, "# TYPE {metric} counter");
        for (port, value) in ports {
            let _ = writeln!(out, "{metric}{{network=\"{net}\",port=\"{port}\"}} {value}");
        }
    }
    let mut per_worker: std::collections::BTreeMap<String, Vec<(usize, u64)>> = Default::default();
    for worker in &stats.workers {
        let mut values = Vec::new();
        if let Ok(value) = serde_json::to_value(worker) {
            datapath::trace::flatten("", &value, &mut values);
        }
        for (name, value) in values.into_iter().filter(|(name, _)| name != "queue") {
            per_worker
                .entry(name)
                .or_default()
                .push((worker.queue, value));
        }
    }
    for (name, workers) in per_worker {
        // Not `switchyard_worker_*`: `engine.worker_forwarded` and friends are named so.
        let (metric, kind) = match name.as_str() {
            "socket_nat_flows" => (format!("switchyard_worker_thread_{name}"), "gauge"),
            _ => (format!("switchyard_worker_thread_{name}_total"), "counter"),
        };
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        for (queue, value) in workers {
            let _ = writeln!(
                out,
                "{metric}{{network=\"{net}\",worker=\"{queue}\"}} {value}"
            );
        }
    }
    for (name, value) in [
        ("fdb_entries", stats.fdb_entries),
        ("nat_flows", stats.nat_flows),
        ("dhcp_leases", stats.dhcp_leases),
        ("ports", stats.ports.len()),
    ] {
        let _ = writeln!(out, "# TYPE switchyard_{name} gauge");
        let _ = writeln!(out, "switchyard_{name}{{network=\"{net}\"}} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapath::engine::{EngineCounters, WorkerStats};

    #[test]
    fn each_worker_has_its_lines_with_a_worker_label() {
        let stats = Stats {
            ports: Vec::new(),
            engine: EngineCounters::default(),
            fdb_entries: 0,
            nat_flows: 0,
            dhcp_leases: 0,
            workers: vec![WorkerStats {
                queue: 1,
                forwarded: 5,
                socket_nat_flows: 2,
                ..Default::default()
            }],
        };
        let text = prometheus("lab", &stats);
        assert!(text.contains("# TYPE switchyard_worker_thread_forwarded_total counter\n"));
        assert!(text.contains(
            "switchyard_worker_thread_forwarded_total{network=\"lab\",worker=\"1\"} 5\n"
        ));
        assert!(text.contains("# TYPE switchyard_worker_thread_socket_nat_flows gauge\n"));
        assert!(text.contains(
            "switchyard_worker_thread_socket_nat_flows{network=\"lab\",worker=\"1\"} 2\n"
        ));
        // Prometheus refuses a scrape that declares a metric twice.
        let mut declared: Vec<&str> = (text.lines())
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        let all = declared.len();
        declared.sort_unstable();
        declared.dedup();
        assert_eq!(declared.len(), all, "{text}");
        assert!(!text.contains("worker_queue"), "{text}");
        let table = stats_table(&stats);
        assert!(
            table.contains("worker 1: 0 frames in (0 bytes), 0 out; 5 forwarded"),
            "{table}"
        );
    }
}
