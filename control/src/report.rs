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
    }
    let e = &stats.engine;
    let _ = writeln!(
        out,
        "switch: {} forwarded, {} flooded; fdb: {} entries, {} learned, {} moved, {} aged, {} not learned (table full)",
        e.forwarded,
        e.flooded,
        stats.fdb_entries,
        e.fdb.learned,
        e.fdb.moved,
        e.fdb.aged,
        e.fdb.full
    );
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
