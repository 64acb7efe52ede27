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
        /// Control socket (default /run/switchyard/NETWORK.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Where the DHCP lease file NETWORK.leases is kept (default /var/lib/switchyard as
        /// root, else $XDG_STATE_HOME/switchyard).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The resolver configuration whose nameservers are the DNS upstreams when the network
        /// has no <forwarder> (re-read when it changes).
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
    },
    /// List the DHCP leases of a running network, like `virsh net-dhcp-leases NAME`.
    NetDhcpLeases {
        /// The network's name.
        name: Option<String>,
        /// The control socket itself.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// JSON instead of virsh's table.
        #[arg(long)]
        json: bool,
    },
    /// List NAT's connections of a running network, like `conntrack -L`.
    Conntrack {
        #[command(flatten)]
        target: Target,
        /// JSON instead of conntrack's text layout.
        #[arg(long)]
        json: bool,
    },
    /// Show the uplink's ARP cache (next hops) of a running network.
    Neighbors {
        #[command(flatten)]
        target: Target,
    },
    /// Print the counters of a running network as JSON.
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Build guests in fresh network namespaces, switch them, and show what happens.
    Demo {
        /// Leave the namespaces and the switch up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

/// Which running network to ask.
#[derive(clap::Args, Debug)]
struct Target {
    /// The network's name (its control socket is /run/switchyard/NAME.sock).
    #[arg(long, default_value = "default")]
    network: String,
    /// The control socket itself.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Target {
    fn ask(&self, request: &str) -> Result<(), String> {
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| run::default_control_socket(&self.network));
        print!("{}", run::ask(&socket, request)?);
        Ok(())
    }
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
            control,
            state_dir,
            resolv_conf,
        } => run::run(&RunOptions {
            xml,
            taps,
            fdb_aging: Duration::from_secs(fdb_aging),
            fdb_max,
            json,
            control,
            state_dir,
            resolv_conf,
        }),
        Command::NetDhcpLeases { name, socket, json } => Target {
            network: name.unwrap_or_else(|| "default".into()),
            socket,
        }
        .ask(if json { "leases json" } else { "leases" }),
        Command::Conntrack { target, json } => {
            target.ask(if json { "conntrack json" } else { "conntrack" })
        }
        Command::Neighbors { target } => target.ask("neighbors"),
        Command::Stats { target } => target.ask("stats"),
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
