//! Doing things inside another network namespace without moving the whole process.
//!
//! A tap is created directly in the namespace its guest lives in: a short-lived thread joins
//! that namespace (`setns` changes only the calling thread), opens the tap and configures the
//! link there, and hands the fd back. The fd keeps working from any namespace. Creating in
//! place, rather than create-and-move, needs no privilege over the engine's own namespace, so
//! the same code serves a rootless user inside a user namespace.

use super::sys;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
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
    let Some(path) = netns else {
        return f();
    };
    let ns = File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
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
}
