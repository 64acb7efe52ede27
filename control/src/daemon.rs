//! `switchyard daemon`: hosts every started network, each with its own engine on a thread of
//! its own, and answers the virsh-style commands on a unix socket.
//!
//! Protocol: one JSON request per connection, one line, `{"v":1,"cmd":"net-start","name":..}`;
//! one JSON answer line, `{"v":1,"ok":true,"data":..}` or `{"v":1,"ok":false,"error":".."}`.
//! The version lets a newer CLI refuse an older daemon plainly. Each running network also
//! listens on its own socket (`net-NAME.sock` beside the daemon's) for `conntrack`, `stats`,
//! leases and the rest, exactly as `switchyard run` does, so those commands work the same
//! against either.

use crate::network::NetworkDef;
use crate::run::{self, RunOptions};
use crate::state::StateDir;
use datapath::io::Handle;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub resolv_conf: PathBuf,
    /// Each network thread's seccomp allow-list (the control thread is not confined).
    pub seccomp: datapath::io::seccomp::SeccompMode,
    /// Threads per network for its taps' frames (`run --workers`).
    pub workers: usize,
    /// Where each network's threads run (`run --cpus`, `--realtime`).
    pub placement: datapath::io::Placement,
}

/// The daemon's socket: `$SWITCHYARD_SOCKET`, else `daemon.sock` in the run directory
/// (`/run/switchyard` as root, `$XDG_RUNTIME_DIR/switchyard` otherwise).
pub fn default_socket() -> PathBuf {
    match std::env::var_os("SWITCHYARD_SOCKET") {
        Some(path) => PathBuf::from(path),
        None => run::run_dir().join("daemon.sock"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    NetDefine {
        xml: String,
    },
    NetUndefine {
        name: String,
    },
    NetStart {
        name: String,
    },
    NetDestroy {
        name: String,
    },
    NetAutostart {
        name: String,
        #[serde(default)]
        disable: bool,
    },
    NetList {
        #[serde(default)]
        all: bool,
    },
    NetInfo {
        name: String,
    },
    NetDumpxml {
        name: String,
        /// The stored definition (what the next start uses) rather than the running one.
        #[serde(default)]
        inactive: bool,
    },
    /// A tap for `network`: live (now), config (from the next start), or both.
    AttachInterface {
        network: String,
        target: String,
        #[serde(default)]
        netns: Option<String>,
        #[serde(default)]
        mac: Option<String>,
        /// `clean-traffic` or `none`: the port's own filter, over the network's.
        #[serde(default)]
        filter: Option<String>,
        live: bool,
        config: bool,
    },
    /// A VM port for `network`: a unix stream socket at `socket` (QEMU's stream netdev).
    AttachStream {
        network: String,
        socket: String,
        live: bool,
        config: bool,
    },
    /// Removes the tap `target` (a name or a MAC) from `network`: live, config, or both.
    DetachInterface {
        network: String,
        target: String,
        live: bool,
        config: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRow {
    pub name: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub uuid: Option<String>,
    pub active: bool,
    pub persistent: bool,
    pub autostart: bool,
    pub bridge: Option<String>,
    /// The network's own control socket while it runs.
    pub socket: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    v: u32,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A started network: its engine's thread and what it was started from.
struct Running {
    handle: Handle,
    thread: std::thread::JoinHandle<()>,
    def: NetworkDef,
    xml: String,
    socket: PathBuf,
}

struct Daemon {
    opts: DaemonOptions,
    state: StateDir,
    running: BTreeMap<String, Running>,
}

/// Runs the daemon until SIGTERM or SIGINT: starts the autostart networks, then answers
/// requests; on the way out it stops every network cleanly.
pub fn daemon(opts: &DaemonOptions) -> Result<(), String> {
    // CAP_SYS_NICE for any network's `<sy:datapath realtime>`, defined later.
    run::drop_privileges(true)?;
    opts.placement.check()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("signals: {e}"))?;
    }
    let listener = bind(&opts.socket)?;
    let mut daemon = Daemon {
        opts: opts.clone(),
        state: StateDir::new(&opts.state_dir),
        running: BTreeMap::new(),
    };
    eprintln!(
        "switchyard daemon: socket {}, state {}",
        opts.socket.display(),
        opts.state_dir.display()
    );
    for name in daemon.state.names() {
        if daemon.state.autostart(&name) {
            match daemon.start(&name) {
                Ok(()) => eprintln!("switchyard daemon: autostarted network '{name}'"),
                Err(e) => eprintln!("switchyard daemon: autostart of '{name}' failed: {e}"),
            }
        }
    }
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) if !datapath::io::sys::peer_may_control(stream.as_fd()) => {
                // Read the request first, so the refusal is not lost to a reset.
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let mut line = String::new();
                let _ = BufReader::new(&stream).take(4096).read_line(&mut line);
                let _ = (&stream).write_all(b"{\"error\":\"permission denied: another user\"}\n");
            }
            Ok((stream, _)) => daemon.serve(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: {e}", opts.socket.display())),
        }
        daemon.reap();
    }
    eprintln!(
        "switchyard daemon: stopping {} networks",
        daemon.running.len()
    );
    let names: Vec<String> = daemon.running.keys().cloned().collect();
    for name in names {
        daemon.destroy(&name)?;
    }
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    datapath::io::bind_unix(path, Some(0o600)).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(
                "{}: a switchyard daemon already answers there",
                path.display()
            )
        }
        _ => format!("{}: {e}", path.display()),
    })
}

impl Daemon {
    fn serve(&mut self, stream: std::os::unix::net::UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        // A definition is small; 4 MiB bounds a hostile client.
        if BufReader::new(&stream)
            .take(4 << 20)
            .read_line(&mut line)
            .is_err()
        {
            return;
        }
        let reply = match serde_json::from_str::<serde_json::Value>(&line) {
            Err(e) => failure(format!("bad request: {e}")),
            Ok(value) => match value.get("v").and_then(serde_json::Value::as_u64) {
                Some(v) if v == u64::from(VERSION) => {
                    match serde_json::from_value::<Request>(value) {
                        Ok(request) => match self.handle(request) {
                            Ok(data) => Reply {
                                v: VERSION,
                                ok: true,
                                data: Some(data),
                                error: None,
                            },
                            Err(e) => failure(e),
                        },
                        Err(e) => failure(format!("bad request: {e}")),
                    }
                }
                other => failure(format!(
                    "protocol version {other:?} not spoken here (this daemon speaks {VERSION})"
                )),
            },
        };
        if let Ok(mut text) = serde_json::to_string(&reply) {
            text.push('\n');
            let _ = (&stream).write_all(text.as_bytes());
        }
    }

    fn handle(&mut self, request: Request) -> Result<serde_json::Value, String> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| e.to_string());
        match request {
            Request::NetDefine { xml } => {
                let (def, _) = self.state.define(&xml)?;
                Ok(serde_json::Value::String(def.name))
            }
            Request::NetUndefine { name } => {
                self.state.undefine(&name)?;
                Ok(serde_json::Value::Null)
            }
            Request::NetStart { name } => {
                self.start(&name)?;
                Ok(serde_json::Value::Null)
            }
            Request::NetDestroy { name } => {
                self.destroy(&name)?;
                Ok(serde_json::Value::Null)
            }
            Request::NetAutostart { name, disable } => {
                self.state.set_autostart(&name, !disable)?;
                Ok(serde_json::Value::Null)
            }
            Request::NetList { all } => json(serde_json::to_value(self.list(all))),
            Request::NetInfo { name } => json(serde_json::to_value(self.info(&name)?)),
            Request::AttachInterface {
                network,
                target,
                netns,
                mac,
                filter,
                live,
                config,
            } => self.attach_interface(
                &network,
                &target,
                (netns.as_deref(), mac.as_deref(), filter.as_deref()),
                (live, config),
            ),
            Request::AttachStream {
                network,
                socket,
                live,
                config,
            } => self.attach_stream(&network, &socket, (live, config)),
            Request::DetachInterface {
                network,
                target,
                live,
                config,
            } => self.detach_interface(&network, &target, (live, config)),
            Request::NetDumpxml { name, inactive } => {
                Ok(serde_json::Value::String(match self.running.get(&name) {
                    Some(r) if !inactive || !self.state.is_defined(&name) => r.xml.clone(),
                    _ => self.state.xml(&name)?,
                }))
            }
        }
    }

    /// `attach-interface`: `live` attaches to the running network, `config` adds a
    /// `<sy:port>` to its definition; the live part goes first, so a tap that cannot be opened
    /// is not recorded.
    fn attach_interface(
        &mut self,
        network: &str,
        target: &str,
        (netns, mac, filter): (Option<&str>, Option<&str>, Option<&str>),
        (live, config): (bool, bool),
    ) -> Result<serde_json::Value, String> {
        let mut spec = target.to_string();
        if let Some(ns) = netns {
            spec.push_str(&format!("@{ns}"));
        }
        if let Some(mac) = mac {
            spec.push_str(&format!("={mac}"));
        }
        if let Some(filter) = filter {
            spec.push_str(&format!(",filter={filter}"));
        }
        let parsed: datapath::io::TapSpec = spec.parse().map_err(|e| format!("{e}"))?;
        let new_xml = if config {
            let xml = self.state.xml(network)?;
            let def = NetworkDef::parse(&xml).map_err(|e| e.to_string())?;
            if def
                .sy_ports
                .iter()
                .any(|p| p.name == parsed.name && p.netns == parsed.netns)
            {
                return Err(format!(
                    "interface {spec} is already in the configuration of '{network}'"
                ));
            }
            Some(crate::network::add_port_xml(
                &xml, target, netns, mac, filter,
            ))
        } else {
            None
        };
        if live {
            self.ask_network(network, &format!("attach tap {spec}"))?;
        }
        if let Some(xml) = new_xml {
            self.state.define(&xml)?;
        }
        Ok(serde_json::Value::Null)
    }

    /// `attach-interface --type stream`: the socket QEMU connects to, now and/or at every
    /// start (`<sy:port type='stream' socket=...>`).
    fn attach_stream(
        &mut self,
        network: &str,
        socket: &str,
        (live, config): (bool, bool),
    ) -> Result<serde_json::Value, String> {
        if !socket.starts_with('/') && !socket.starts_with("tcp:") {
            return Err(format!(
                "--socket {socket}: give an absolute path (or tcp:127.0.0.1:PORT)"
            ));
        }
        let new_xml = if config {
            let xml = self.state.xml(network)?;
            let def = NetworkDef::parse(&xml).map_err(|e| e.to_string())?;
            if def.sy_streams.iter().any(|p| p == socket) {
                return Err(format!(
                    "stream {socket} is already in the configuration of '{network}'"
                ));
            }
            Some(crate::network::add_stream_xml(&xml, socket))
        } else {
            None
        };
        if live {
            self.ask_network(network, &format!("attach stream {socket}"))?;
        }
        if let Some(xml) = new_xml {
            self.state.define(&xml)?;
        }
        Ok(serde_json::Value::Null)
    }

    /// `detach-interface`: by tap name or MAC, live and/or from the definition.
    fn detach_interface(
        &mut self,
        network: &str,
        target: &str,
        (live, config): (bool, bool),
    ) -> Result<serde_json::Value, String> {
        let new_xml = if config {
            let xml = self.state.xml(network)?;
            Some(
                crate::network::remove_port_xml(&xml, target).ok_or_else(|| {
                    format!("no interface {target} in the configuration of '{network}'")
                })?,
            )
        } else {
            None
        };
        if live {
            self.ask_network(network, &format!("detach {target}"))?;
        }
        if let Some(xml) = new_xml {
            self.state.define(&xml)?;
        }
        Ok(serde_json::Value::Null)
    }

    /// Sends a request line to running network `name`'s own socket.
    fn ask_network(&self, name: &str, request: &str) -> Result<String, String> {
        let running = self
            .running
            .get(name)
            .ok_or_else(|| format!("network '{name}' is not active"))?;
        run::ask(&running.socket, request)
    }

    /// Forgets networks whose engine stopped on its own (a fatal I/O error).
    fn reap(&mut self) {
        let dead: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.thread.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in dead {
            if let Some(r) = self.running.remove(&name) {
                let _ = r.thread.join();
                eprintln!("switchyard daemon: network '{name}' stopped on its own");
            }
        }
    }

    fn start(&mut self, name: &str) -> Result<(), String> {
        if self.running.contains_key(name) {
            return Err(format!("network '{name}' is already active"));
        }
        let xml = self.state.xml(name)?;
        let def = NetworkDef::parse(&xml).map_err(|e| e.to_string())?;
        let socket = network_socket(&self.opts.socket, name);
        let opts = RunOptions {
            xml: None,
            taps: def.sy_ports.clone(),
            streams: def.sy_streams.clone(),
            fdb_aging: datapath::switch::DEFAULT_AGING,
            fdb_max: datapath::switch::DEFAULT_CAPACITY,
            json: false,
            control: Some(socket.clone()),
            state_dir: Some(self.opts.state_dir.clone()),
            resolv_conf: self.opts.resolv_conf.clone(),
            metrics: None,
            seccomp: self.opts.seccomp,
            busy_poll: std::time::Duration::ZERO,
            workers: self.opts.workers,
            placement: self.opts.placement.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_def = def.clone();
        let thread = std::thread::Builder::new()
            .name(format!("net-{name}"))
            .spawn(move || match run::start(&thread_def, &opts) {
                Ok(mut dp) => {
                    if let Err(e) = run::confine(opts.seccomp) {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    let _ = tx.send(Ok(dp.handle()));
                    if let Err(e) = dp.run(|_| {}, run::answer) {
                        eprintln!("switchyard daemon: network '{}': {e}", thread_def.name);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| format!("thread: {e}"))?;
        let handle = match rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(format!("network '{name}' failed to start: {e}"));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(format!("network '{name}' failed to start"));
            }
        };
        eprintln!("switchyard daemon: network '{name}' started");
        self.running.insert(
            name.to_string(),
            Running {
                handle,
                thread,
                def,
                xml,
                socket,
            },
        );
        Ok(())
    }

    fn destroy(&mut self, name: &str) -> Result<(), String> {
        let running = self
            .running
            .remove(name)
            .ok_or_else(|| format!("network '{name}' is not active"))?;
        running.handle.shutdown();
        running
            .thread
            .join()
            .map_err(|_| format!("network '{name}': its engine panicked"))?;
        eprintln!("switchyard daemon: network '{name}' destroyed");
        Ok(())
    }

    fn list(&self, all: bool) -> Vec<ListRow> {
        let mut names: Vec<String> = self.state.names();
        names.extend(self.running.keys().cloned());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| ListRow {
                active: self.running.contains_key(&name),
                autostart: self.state.autostart(&name),
                persistent: self.state.is_defined(&name),
                name,
            })
            .filter(|row| all || row.active)
            .collect()
    }

    fn info(&self, name: &str) -> Result<Info, String> {
        let running = self.running.get(name);
        let def = match running {
            Some(r) => r.def.clone(),
            None => NetworkDef::parse(&self.state.xml(name)?).map_err(|e| e.to_string())?,
        };
        Ok(Info {
            name: def.name.clone(),
            uuid: def.uuid.clone(),
            active: running.is_some(),
            persistent: self.state.is_defined(name),
            autostart: self.state.autostart(name),
            bridge: def.bridge.clone(),
            socket: running.map(|r| r.socket.display().to_string()),
        })
    }
}

fn failure(error: String) -> Reply {
    Reply {
        v: VERSION,
        ok: false,
        data: None,
        error: Some(error),
    }
}

/// The control socket of network `name` hosted by the daemon listening on `daemon_socket`.
pub fn network_socket(daemon_socket: &Path, name: &str) -> PathBuf {
    daemon_socket
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("net-{name}.sock"))
}

/// Sends `request` to the daemon at `socket`; its data, or its error as one line.
pub fn request(socket: &Path, request: &Request) -> Result<serde_json::Value, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the switchyard daemon at {}: {e} (is `switchyard daemon` running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(&Envelope {
        v: VERSION,
        body: request,
    })
    .map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| format!("{}: unreadable answer: {e}", socket.display()))?;
    if reply.ok {
        Ok(reply.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(reply.error.unwrap_or_else(|| "failed".into()))
    }
}

/// `virsh net-list` layout.
pub fn list_table(rows: &[ListRow]) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        " {:<width$}   {:<8}   {:<9}   {}\n",
        "Name", "State", "Autostart", "Persistent"
    );
    out.push_str(&format!("{}\n", "-".repeat(width + 38)));
    for r in rows {
        out.push_str(&format!(
            " {:<width$}   {:<8}   {:<9}   {}\n",
            r.name,
            if r.active { "active" } else { "inactive" },
            yes(r.autostart),
            yes(r.persistent)
        ));
    }
    out
}

/// `virsh net-info` layout.
pub fn info_text(info: &Info) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!(
        "Name:           {}\nUUID:           {}\nActive:         {}\nPersistent:     {}\n\
         Autostart:      {}\nBridge:         {}\n",
        info.name,
        info.uuid.as_deref().unwrap_or("-"),
        yes(info.active),
        yes(info.persistent),
        yes(info.autostart),
        info.bridge.as_deref().unwrap_or("-")
    )
}
