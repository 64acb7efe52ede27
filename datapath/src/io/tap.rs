//! Tap ports: a guest's (or a namespace's) Ethernet link, one fd per port.
//!
//! Opened with `IFF_VNET_HDR` and offloads on, so the kernel hands over TCP super-frames with
//! partial checksums, and the switch passes them to the other taps as they are.

use super::netlink::{self, LinkChange};
use super::{netns, sys};
use crate::wire::{MacAddr, vnet};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which tap, where its kernel side lives, and how to set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub name: String,
    /// `/run/netns/NAME` or `/proc/PID/ns/net`; `None` for the engine's own namespace.
    pub netns: Option<PathBuf>,
    /// MAC address for the kernel side.
    pub mac: Option<MacAddr>,
    pub mtu: Option<u32>,
    /// `,filter=clean-traffic` or `,filter=none`: this port's clean-traffic, over the
    /// network's `<sy:guard clean-traffic>` (as libvirt puts a `<filterref>` on one
    /// interface); `None` follows the network.
    pub clean_traffic: Option<bool>,
}

/// A malformed `--tap` argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid tap spec {spec:?}: {why} (expected NAME[@NETNS][=MAC][,filter=clean-traffic|none])"
)]
pub struct TapSpecError {
    spec: String,
    why: &'static str,
}

impl FromStr for TapSpec {
    type Err = TapSpecError;

    /// `NAME[@NETNS][=MAC][,filter=clean-traffic|none]`, as `switchyard run --tap` takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| TapSpecError {
            spec: s.to_string(),
            why,
        };
        let (head, clean_traffic) = match s.split_once(',') {
            Some((head, "filter=clean-traffic")) => (head, Some(true)),
            Some((head, "filter=none")) => (head, Some(false)),
            Some(_) => {
                return Err(err(
                    "the only option is filter=clean-traffic or filter=none",
                ));
            }
            None => (s, None),
        };
        let (rest, mac) = match head.split_once('=') {
            Some((rest, mac)) => (rest, Some(mac.parse().map_err(|_| err("bad MAC"))?)),
            None => (head, None),
        };
        let (name, netns) = match rest.split_once('@') {
            Some((name, ns)) if !ns.is_empty() => (name, Some(netns::netns_path(ns))),
            Some(_) => return Err(err("empty namespace")),
            None => (rest, None),
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ']) {
            return Err(err("bad interface name"));
        }
        Ok(TapSpec {
            name: name.to_string(),
            netns,
            mac,
            mtu: None,
            clean_traffic,
        })
    }
}

impl fmt::Display for TapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(ns) = &self.netns {
            write!(f, "@{}", ns.display())?;
        }
        Ok(())
    }
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    pub(crate) file: File,
    /// Queues beyond the first, when the tap is multi-queue: one per fast-path worker.
    pub(crate) queues: Vec<File>,
    pub name: String,
    pub netns: Option<PathBuf>,
    /// The MAC set on the kernel side, if one was asked for.
    pub mac: Option<MacAddr>,
    /// The port's own clean-traffic setting ([`TapSpec::clean_traffic`]).
    pub clean_traffic: Option<bool>,
    /// The tap did not exist before: it goes away when this is dropped. An attached
    /// (persistent) tap is left as it was found.
    pub created: bool,
    /// The namespace's identity when the tap was opened ([`netns::identity`]).
    pub netns_id: Option<(u64, u64)>,
}

impl Tap {
    /// Creates the tap in its namespace (or attaches to an existing one there), sets its MAC
    /// and MTU if asked, and brings its link up.
    ///
    /// A new tap for another namespace is made here and then moved there, so that its fd
    /// belongs to the engine's namespace: a tap fd opened inside a namespace holds that
    /// namespace alive, and `ip netns del` of the guest would then not end the port. Only
    /// a tap that already exists there (persistent, made by someone else) is attached from
    /// inside, and a rootless engine, which may not move links, has a helper create it inside.
    pub fn open(spec: &TapSpec) -> io::Result<Tap> {
        Tap::open_queues(spec, 1)
    }

    /// [`Tap::open`] with `queues` queues (`IFF_MULTI_QUEUE`) when it creates the tap, or
    /// attaches to a multi-queue one. An existing single-queue tap, or one a rootless helper
    /// opens, has one queue whatever is asked.
    pub fn open_queues(spec: &TapSpec, queues: usize) -> io::Result<Tap> {
        let TapSpec {
            name,
            netns,
            mac,
            mtu,
            clean_traffic: _,
        } = spec.clone();
        let (mut fds, name, created) = match &netns {
            None => create_here(&name, mac, mtu, queues)?,
            // One trip into the namespace: an existing tap is attached there.
            Some(path) => match netns::run_in(Some(path), {
                let name = name.clone();
                move || attach_here(&name, mac, mtu, queues)
            }) {
                Ok(Some(attached)) => attached,
                Ok(None) => (create_and_move(&name, mac, mtu, path, queues)?, name, true),
                // Not allowed to join the namespace from here: it belongs to a user
                // namespace of ours (`unshare --user --net`, a rootless container), which only
                // a single-threaded process may enter. A helper process does.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    let (fd, name, created) = netns::open_tap_via_helper(path, &name, mac, mtu)?;
                    (vec![fd], name, created)
                }
                Err(e) => return Err(e),
            },
        };
        let first = fds.remove(0);
        Ok(Tap {
            file: File::from(first),
            queues: fds.into_iter().map(File::from).collect(),
            name,
            netns: spec.netns.clone(),
            mac: spec.mac,
            clean_traffic: spec.clean_traffic,
            created,
            netns_id: spec.netns.as_deref().and_then(netns::identity),
        })
    }
}

/// The tap `name` of the calling thread's namespace, set up as [`create_here`] does, if an
/// interface of that name exists there; `None` if not.
fn attach_here(
    name: &str,
    mac: Option<MacAddr>,
    mtu: Option<u32>,
    queues: usize,
) -> io::Result<Option<(Vec<OwnedFd>, String, bool)>> {
    if sys::if_nametoindex(name).is_none() {
        return Ok(None);
    }
    create_here(name, mac, mtu, queues).map(Some)
}

/// Opens `queues` queues of the tap `name` (created if need be): multi-queue when more than
/// one is asked. A tap that exists with the other queueing (the kernel says EINVAL) is
/// opened its way, with one queue.
fn open_queues(name: &str, queues: usize) -> io::Result<(Vec<OwnedFd>, String)> {
    let multi = queues > 1;
    let (first, name, multi) = match sys::open_tap(name, vnet::LEN, multi) {
        Ok((fd, name)) => (fd, name, multi),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let (fd, name) = sys::open_tap(name, vnet::LEN, !multi)?;
            (fd, name, false)
        }
        Err(e) => return Err(e),
    };
    let mut fds = vec![first];
    if multi {
        for _ in 1..queues {
            fds.push(sys::open_tap(&name, vnet::LEN, true)?.0);
        }
    }
    Ok((fds, name))
}

/// Creates the tap `name` in the calling thread's namespace under a temporary name, moves it
/// into the namespace at `netns`, and there renames it and brings it up.
fn create_and_move(
    name: &str,
    mac: Option<MacAddr>,
    mtu: Option<u32>,
    netns: &Path,
    queues: usize,
) -> io::Result<Vec<OwnedFd>> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = format!("sy{:x}t{n}", std::process::id() & 0xff_ffff);
    let (fds, temporary) = open_queues(&temporary, queues)?;
    let index = sys::if_nametoindex(&temporary)
        .ok_or_else(|| io::Error::other(format!("tap {temporary} vanished")))?;
    let ns = File::open(netns).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", netns.display()),
        )
    })?;
    netlink::set_link(
        index,
        &LinkChange {
            mac,
            mtu,
            netns_fd: Some(ns.as_raw_fd()),
            ..LinkChange::default()
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("moving {name} into its namespace: {e}")))?;
    let name = name.to_string();
    netns::run_in(Some(netns), move || {
        let index = sys::if_nametoindex(&temporary)
            .ok_or_else(|| io::Error::other(format!("tap {temporary} vanished")))?;
        for change in [
            LinkChange {
                name: Some(name.clone()),
                ..LinkChange::default()
            },
            LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        ] {
            netlink::set_link(index, &change)
                .map_err(|e| io::Error::new(e.kind(), format!("configuring {name}: {e}")))?;
        }
        Ok(())
    })?;
    Ok(fds)
}

/// Opens (creating if needed) the tap `name` in the calling thread's namespace, sets its MAC
/// and MTU if asked and brings it up: the fd, the name the kernel used, and whether it was
/// created.
pub fn create_here(
    name: &str,
    mac: Option<MacAddr>,
    mtu: Option<u32>,
    queues: usize,
) -> io::Result<(Vec<OwnedFd>, String, bool)> {
    let existed = sys::if_nametoindex(name).is_some();
    let (fds, name) = open_queues(name, queues)?;
    let index = sys::if_nametoindex(&name)
        .ok_or_else(|| io::Error::other(format!("tap {name} vanished")))?;
    netlink::set_link(
        index,
        &LinkChange {
            up: Some(true),
            mac,
            mtu,
            ..LinkChange::default()
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("configuring {name}: {e}")))?;
    Ok((fds, name, !existed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tap_specs() {
        let t: TapSpec = "vm1".parse().unwrap();
        assert_eq!((t.name.as_str(), t.netns, t.mac), ("vm1", None, None));
        let t: TapSpec = "vm1@ns1=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(t.netns, Some(PathBuf::from("/run/netns/ns1")));
        assert_eq!(t.mac, Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])));
        let t: TapSpec = "vm1@/proc/1/ns/net".parse().unwrap();
        assert_eq!(t.netns, Some(PathBuf::from("/proc/1/ns/net")));
        assert_eq!(t.clean_traffic, None);
        let t: TapSpec = "vm1@ns1=52:54:00:00:00:01,filter=clean-traffic"
            .parse()
            .unwrap();
        assert_eq!((t.mac.is_some(), t.clean_traffic), (true, Some(true)));
        let t: TapSpec = "vm1,filter=none".parse().unwrap();
        assert_eq!((t.name.as_str(), t.clean_traffic), ("vm1", Some(false)));
        for bad in [
            "vm1,filter=other",
            "vm1,",
            "",
            "@ns",
            "vm1@",
            "vm1=zz",
            "a-name-that-is-too-long",
            "vm 1",
        ] {
            assert!(bad.parse::<TapSpec>().is_err(), "{bad}");
        }
    }
}
