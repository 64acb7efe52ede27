//! `switchyard`: a userspace virtual switch and NAT for libvirt-style networks.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use control::run::{self, RunOptions};
use datapath::io::TapSpec;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "A userspace virtual switch and NAT for libvirt-style networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one network in the foreground from a libvirt network XML file (default: libvirt's
    /// default network, embedded).
    Run {
        /// libvirt network XML; omitted = the embedded default.xml
        xml: Option<PathBuf>,
        /// A tap port: NAME[@NETNS][=MAC]. NETNS is an `ip netns` name or a path such as
        /// /proc/PID/ns/net; MAC is set on the kernel side. Repeat for more ports.
        #[arg(long = "tap", value_name = "NAME[@NETNS][=MAC]")]
        taps: Vec<TapSpec>,
        /// Seconds before an idle MAC is forgotten (the Linux bridge's ageing_time).
        #[arg(long, default_value_t = 300)]
        fdb_aging: u64,
        /// Largest number of MACs the switch learns.
        #[arg(long, default_value_t = datapath::switch::DEFAULT_CAPACITY)]
        fdb_max: usize,
        /// Print counters as JSON lines on stdout instead of tables on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Build guests in fresh network namespaces, switch them, and show what happens.
    Demo {
        /// Leave the namespaces and the switch up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            xml,
            taps,
            fdb_aging,
            fdb_max,
            json,
        } => run::run(&RunOptions {
            xml,
            taps,
            fdb_aging: Duration::from_secs(fdb_aging),
            fdb_max,
            json,
        }),
        Command::Demo { keep } => control::demo::demo(keep),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: error: {e}");
            ExitCode::FAILURE
        }
    }
}
