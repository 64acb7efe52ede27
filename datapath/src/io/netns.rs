//! Doing things inside another network namespace without moving the whole process.
//!
//! A tap is created directly in the namespace its guest lives in: a short-lived thread joins
//! that namespace (`setns` changes only the calling thread), opens the tap and configures the
//! link there, and hands the fd back. The fd keeps working from any namespace. Creating in
//! place, rather than create-and-move, needs no privilege over the engine's own namespace, so
//! the same code serves a rootless user inside a user namespace.
//!
//! A namespace that belongs to a user namespace of ours (`unshare --user --map-root-user
//! --net`, a rootless container) can be joined only after joining its user namespace, which
//! the kernel allows only to a single-threaded process and never undoes. So a helper process
//! (this same binary, run as `switchyard __open-tap`) joins both, opens the tap there and
//! passes its fd back over a unix socket (`SCM_RIGHTS`), as slirp4netns does; the engine stays
//! in the host's namespace, where its NAT sockets must be.

use super::sys;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Where `ip netns add NAME` puts its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A namespace named as `ip netns` does (`NAME`) or by path (`/proc/PID/ns/net`).
pub fn netns_path(spec: &str) -> PathBuf {
    if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new(NETNS_RUN_DIR).join(spec)
    }
}

/// Runs `f` with the network namespace at `netns` (or the current one for `None`).
pub fn run_in<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    run_in_same(netns, None, f)
}

/// [`run_in`], only if the namespace at `netns` is still the one of identity `id`
/// ([`identity`]): a path may have come to name another namespace since (`ip netns del` and
/// `add` again, a `/proc/PID` reused).
pub fn run_in_same<T: Send>(
    netns: Option<&Path>,
    id: Option<(u64, u64)>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = netns else {
        return f();
    };
    let ns = File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
    let opened = ns.metadata().map(|m| (m.dev(), m.ino()))?;
    if id.is_some_and(|id| id != opened) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("network namespace {}: another one now", path.display()),
        ));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                sys::setns_net(ns.as_fd())?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
    })
}

/// A namespace file's identity (device and inode of its nsfs file), if it exists.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether any process this user may see is still in the network namespace `id`.
pub fn has_processes(id: (u64, u64)) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| identity(&e.path().join("ns/net")) == Some(id))
}

/// The argument that makes the binary a tap helper (see [`tap_helper_main`]).
pub const TAP_HELPER_ARG: &str = "__open-tap";

/// Opens the tap `name` in the namespace at `netns` through a helper process that joins the
/// namespace's user namespace first: the fd, the name the kernel used, whether it was created.
pub fn open_tap_via_helper(
    netns: &Path,
    name: &str,
    mac: Option<crate::wire::MacAddr>,
    mtu: Option<u32>,
) -> io::Result<(OwnedFd, String, bool)> {
    let (ours, theirs) = UnixStream::pair()?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg(TAP_HELPER_ARG)
        .arg(netns)
        .arg(name)
        .arg(mac.map_or("-".to_string(), |m| m.to_string()))
        .arg(mtu.map_or("-".to_string(), |m| m.to_string()))
        .stdin(OwnedFd::from(theirs))
        .spawn()?;
    ours.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut buf = [0u8; 512];
    let received = sys::recv_with_fd(ours.as_fd(), &mut buf);
    let _ = child.wait();
    let (n, fd) = received?;
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut fields = reply.splitn(3, '\t');
    match (fields.next(), fields.next(), fields.next(), fd) {
        (Some("ok"), Some(name), Some(created), Some(fd)) => {
            Ok((fd, name.to_string(), created == "1"))
        }
        (Some("err"), Some(errno), Some(message), _) => {
            let kind = io::Error::from_raw_os_error(errno.parse().unwrap_or(0)).kind();
            Err(io::Error::new(
                kind,
                format!("{}: {message}", netns.display()),
            ))
        }
        _ => Err(io::Error::other(format!(
            "tap helper for {}: unexpected reply {reply:?}",
            netns.display()
        ))),
    }
}

/// The helper's whole life, given its arguments after [`TAP_HELPER_ARG`] (namespace path,
/// tap name, MAC or `-`, MTU or `-`) and the parent's socket on stdin. Must run before the
/// process starts any thread. Returns the exit code.
pub fn tap_helper_main(args: &[String]) -> i32 {
    let socket = std::io::stdin();
    let reply = match open_in_namespace(args) {
        Ok((fd, name, created)) => {
            let text = format!("ok\t{name}\t{}", u8::from(created));
            sys::send_with_fd(socket.as_fd(), text.as_bytes(), Some(fd.as_fd()))
        }
        Err(e) => {
            let text = format!("err\t{}\t{e}", e.raw_os_error().unwrap_or(0));
            sys::send_with_fd(socket.as_fd(), text.as_bytes(), None)
        }
    };
    i32::from(reply.is_err())
}

fn open_in_namespace(args: &[String]) -> io::Result<(OwnedFd, String, bool)> {
    let [netns, name, mac, mtu] = args else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: NETNS NAME MAC|- MTU|-",
        ));
    };
    let bad = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
    let mac = match mac.as_str() {
        "-" => None,
        m => Some(m.parse().map_err(|_| bad("bad MAC"))?),
    };
    let mtu = match mtu.as_str() {
        "-" => None,
        m => Some(m.parse().map_err(|_| bad("bad MTU"))?),
    };
    let ns = File::open(netns)?;
    let owner = File::from(sys::namespace_owner(ns.as_fd())?);
    let own = std::fs::metadata("/proc/self/ns/user")?;
    let theirs = owner.metadata()?;
    if (theirs.dev(), theirs.ino()) != (own.dev(), own.ino()) {
        sys::setns_user(owner.as_fd())?;
    }
    sys::setns_net(ns.as_fd())?;
    let (mut fds, name, created) = super::tap::create_here(name, mac, mtu, 1)?;
    Ok((fds.remove(0), name, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(netns_path("vm1"), PathBuf::from("/run/netns/vm1"));
        assert_eq!(
            netns_path("/proc/42/ns/net"),
            PathBuf::from("/proc/42/ns/net")
        );
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = run_in(Some(Path::new("/run/netns/switchyard-no-such-ns")), || {
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("switchyard-no-such-ns"), "{err}");
    }

    /// A path that names another namespace than the one a port was opened in is not
    /// entered: its counters would be another guest's.
    #[test]
    fn a_namespace_that_is_another_now_is_not_entered() {
        let path = Path::new("/proc/self/ns/net");
        let (dev, ino) = identity(path).unwrap();
        let err = run_in_same(Some(path), Some((dev, ino + 1)), || -> io::Result<()> {
            panic!("entered another namespace")
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
