//! The datapath under a seccomp allow-list: once its ports are open, the thread that moves a
//! guest's frames may make only the system calls a switch, NAT and DHCP/DNS server need.
//!
//! Why: the engine parses every byte a hostile guest sends. If a bug ever let a guest steer it,
//! the kernel surface it could reach should be what the datapath uses, not the whole syscall
//! table (the peers' CVEs — libslirp's, VPP's — were all in code like this). The filter is
//! per thread, installed on the datapath thread just before its loop; threads it starts (a
//! tap opened in another namespace) and processes it runs (the rootless tap helper) inherit
//! it. `switchyard daemon`'s control thread is not confined: it defines and starts networks.
//!
//! The list, by what needs it:
//! - the runtime: memory, futexes, signals, clocks, threads (std's `thread::spawn`), exit;
//!   a thread's own CPU affinity and scheduling policy (`--cpus`, `--realtime`);
//! - the poll loop and ports: epoll, eventfd, read/write on taps and sockets, the tap ioctls;
//! - sockets, of the families the engine uses only (unix, IPv4, IPv6, netlink, packet): NAT's
//!   host sockets, DNS upstreams, control and metrics sockets, AF_PACKET uplinks;
//! - files: the lease file written durably (open, write, fsync, rename), `/proc` and
//!   `/run/netns` paths, `/dev/net/tun`;
//! - live attach: `setns` into a network or user namespace only, and the rootless helper
//!   (`execve` of switchyard itself, under no-new-privs, so it gains nothing).
//!
//! Not on it, among others: `mount`, `unshare`, `ptrace`, `bpf`, `perf_event_open`, module
//! and kexec calls, `keyctl`, `io_uring_*`, `userfaultfd`, `process_vm_*`, the set*id family,
//! `chroot`/`pivot_root`, `mknod`, and sockets of any other family (AF_VSOCK, AF_ALG, ...).
//! A call off the list kills the process (`enforce`), so a gap shows as a crash in the tests
//! rather than as a silent error; `log` lets it through and the kernel logs it (audit
//! type 1326, `dmesg`), which is how a missing entry is found.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// `--seccomp`: what a system call off the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kills the process.
    #[default]
    Enforce,
    /// Allowed, and logged by the kernel (audit type 1326).
    Log,
    /// No filter.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("{other}: expected enforce, log or off")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported on {0}")]
    Arch(&'static str),
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // runtime: memory, threads, signals, clocks, exit
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prlimit64,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // the poll loop and ports
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    // sockets (socket() itself is checked by family below)
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    // files: the lease file, /proc, /run/netns, /dev/net/tun
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_umask,
    // the rootless tap helper (a process of switchyard's own, under no-new-privs)
    libc::SYS_execve,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_pidfd_open,
];

/// The same, by their pre-`*at` names, on architectures that still have them.
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_arch_prctl,
    libc::SYS_vfork,
    libc::SYS_epoll_wait,
    libc::SYS_poll,
    libc::SYS_dup2,
    libc::SYS_pipe,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_mkdir,
    libc::SYS_chmod,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[];

/// Socket families the engine opens.
const SOCKET_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
    libc::AF_PACKET,
];

/// Namespaces the datapath may join: a guest's network namespace, and (rootless) the user
/// namespace that owns it.
const SETNS_TYPES: &[libc::c_int] = &[libc::CLONE_NEWNET, libc::CLONE_NEWUSER];

/// `prctl` options: naming threads (std's `thread::Builder::name`).
const PRCTL_OPTIONS: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME];

/// One rule per allowed value of argument `arg`.
fn any_of(arg: u8, values: &[libc::c_int]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            let value = u64::from(v.cast_unsigned());
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
        })
        .collect()
}

/// The allow-list compiled for this machine, `on_mismatch` for every other call.
fn program(on_mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_LEGACY)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    rules.insert(libc::SYS_socket, any_of(0, SOCKET_FAMILIES)?);
    rules.insert(libc::SYS_setns, any_of(1, SETNS_TYPES)?);
    rules.insert(libc::SYS_prctl, any_of(0, PRCTL_OPTIONS)?);
    // `--cpus` and `--realtime` (io/placement.rs): each datapath thread places itself, and
    // only itself (pid 0).
    rules.insert(libc::SYS_sched_setaffinity, any_of(0, &[0])?);
    rules.insert(libc::SYS_sched_setscheduler, any_of(0, &[0])?);
    let filter = SeccompFilter::new(rules, on_mismatch, SeccompAction::Allow, arch)?;
    Ok(filter.try_into()?)
}

/// Confines the calling thread (and what it starts later) to the allow-list. No-new-privs
/// must already be set (`run` and `daemon` set it first), as seccomp requires of a process
/// without CAP_SYS_ADMIN.
pub fn confine_this_thread(mode: SeccompMode) -> Result<(), SeccompError> {
    let on_mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let bpf = program(on_mismatch)?;
    seccompiler::apply_filter(&bpf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        let bpf = program(SeccompAction::KillProcess).unwrap();
        // Well under the kernel's 4096-instruction limit for one filter.
        assert!(bpf.len() < 1024, "{} instructions", bpf.len());
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("strict".parse::<SeccompMode>().is_err());
    }

    /// The filter in a child thread: the calls the engine makes still work, and one off the
    /// list fails (`enforce` would kill the test runner, so an errno action stands in).
    #[test]
    fn a_confined_thread_keeps_its_calls_and_loses_the_rest() {
        std::thread::spawn(|| {
            let bpf = program(SeccompAction::Errno(libc::EPERM.cast_unsigned())).unwrap();
            seccompiler::apply_filter(&bpf).unwrap();
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            assert!(udp.local_addr().is_ok());
            assert!(std::fs::read_to_string("/proc/self/status").is_ok());
            assert!(std::os::unix::net::UnixDatagram::unbound().is_ok());
            std::thread::spawn(|| ()).join().unwrap();
            // A process started from the confined thread (as the rootless tap helper is) runs
            // under the filter from its first instruction: spawning and its start-up are on
            // the list.
            let child = std::process::Command::new("true").status().unwrap();
            assert!(child.success());
            let chroot = std::os::unix::fs::chroot("/");
            assert_eq!(chroot.unwrap_err().raw_os_error(), Some(libc::EPERM));
        })
        .join()
        .unwrap();
    }
}
