//! `switchyard run`: one network in the foreground, ports given on the command line.

use crate::network::{DEFAULT_XML, NetworkDef};
use crate::report;
use datapath::io::{Datapath, Tap, TapSpec};
use datapath::{Config, Engine};
use std::path::PathBuf;
use std::time::Duration;

/// Everything `run` needs, from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub xml: Option<PathBuf>,
    pub taps: Vec<TapSpec>,
    pub fdb_aging: Duration,
    pub fdb_max: usize,
    pub json: bool,
}

/// Reads the network definition, or the embedded default.
pub fn load_network(path: Option<&PathBuf>) -> Result<NetworkDef, String> {
    let (xml, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_XML.to_string(),
            "embedded default network".to_string(),
        ),
    };
    NetworkDef::parse(&xml).map_err(|e| format!("{origin}: {e}"))
}

/// Builds the datapath for `def` with the taps of `taps` attached.
pub fn build(def: &NetworkDef, opts: &RunOptions) -> Result<Datapath, String> {
    let config = Config {
        mtu: def.mtu.unwrap_or(1500),
        fdb_capacity: opts.fdb_max,
        fdb_aging: opts.fdb_aging,
        gateway: def.gateway(),
    };
    let mut dp = Datapath::new(Engine::new(&config)).map_err(|e| format!("poll: {e}"))?;
    for spec in &opts.taps {
        let tap = Tap::open(spec).map_err(|e| format!("tap {spec}: {e}"))?;
        let how = if tap.created { "created" } else { "attached" };
        let name = tap.name.clone();
        let id = dp.add_tap(tap).map_err(|e| format!("tap {spec}: {e}"))?;
        let place = spec
            .netns
            .as_ref()
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        eprintln!("switchyard: port {id}: tap {name} ({how}){place}");
    }
    Ok(dp)
}

pub fn print_stats(dp: &Datapath, json: bool) {
    let stats = dp.engine().stats();
    if json {
        match serde_json::to_string(&stats) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("switchyard: stats: {e}"),
        }
    } else {
        eprint!("{}", report::stats_table(&stats));
    }
}

/// Runs until SIGINT/SIGTERM; SIGUSR1 prints the counters.
pub fn run(opts: &RunOptions) -> Result<(), String> {
    let def = load_network(opts.xml.as_ref())?;
    for line in def.not_yet_implemented() {
        eprintln!("switchyard: note: {line}");
    }
    let mut dp = build(&def, opts)?;
    if let Some(gw) = def.gateway() {
        eprintln!(
            "switchyard: gateway {}/{} at {} (answers ARP and ping)",
            gw.ip, gw.prefix, gw.mac
        );
    }
    dp.install_signal_handlers()
        .map_err(|e| format!("signals: {e}"))?;
    eprintln!(
        "switchyard: network '{}' (switch '{}') running with {} ports; SIGUSR1 prints counters, Ctrl-C stops",
        def.name,
        def.bridge.as_deref().unwrap_or("-"),
        opts.taps.len()
    );
    let json = opts.json;
    dp.run(|engine| {
        let stats = engine.stats();
        if json {
            if let Ok(line) = serde_json::to_string(&stats) {
                println!("{line}");
            }
        } else {
            eprint!("{}", report::stats_table(&stats));
        }
    })
    .map_err(|e| format!("poll loop: {e}"))?;
    eprintln!("switchyard: stopping; removing the taps it created");
    print_stats(&dp, opts.json);
    drop(dp);
    Ok(())
}
