//! Where the datapath's threads run: pinned to CPUs (`--cpus`) and under the real-time
//! scheduler (`--realtime`), for hosts with cores to give the datapath.
//!
//! Why: the kernel's bridge and NAT forward in softirq context, ahead of every process, on
//! whichever CPU the sender ran. Switchyard's threads are ordinary ones by default and wait
//! for a CPU like the endpoints they carry: on a loaded host a frame waits a scheduler
//! slice. `SCHED_RR` gives them the softirqs' place; pinning keeps a thread's caches and
//! its tap queues on one CPU and lets an operator keep the datapath off the cores of other
//! work (as VPP's `main-core`/`corelist-workers` and OVS's `pmd-cpu-mask` do). Both are off
//! by default: on a host whose cores are all busy with the endpoints (the benchmarks' 2-core
//! machine), a real-time datapath takes their CPU when it has work, which helps some loads and
//! hurts others (`benches/RESULTS.md`, session 10).
//!
//! Thread 0 is the engine's, thread k worker k's. Each applies its own placement when it
//! starts: the engine's after it started the control thread (which stays an ordinary thread
//! on any CPU), and with `SCHED_RESET_ON_FORK`, so threads and processes a datapath thread
//! starts later (a tap opener in another namespace, the rootless helper) run under the
//! normal scheduler; they do inherit its CPU, and are short-lived. With `switchyard daemon`,
//! every network's threads take the same list unless its `<sy:datapath cpus>` says
//! otherwise.

use super::sys;
use std::io;

/// `--cpus` and `--realtime`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The CPU of each datapath thread in turn (the engine's first), the list taken again
    /// from its start if shorter; empty: any CPU.
    pub cpus: Vec<usize>,
    /// `SCHED_RR` priority (1-99) of every datapath thread; `None`: the normal scheduler.
    pub realtime: Option<u8>,
}

impl Placement {
    /// Whether it changes nothing.
    pub fn is_default(&self) -> bool {
        self.cpus.is_empty() && self.realtime.is_none()
    }

    /// The CPU thread `thread` runs on, if pinned.
    pub fn cpu_of(&self, thread: usize) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[thread % self.cpus.len()])
    }

    /// Places the calling thread as datapath thread `thread`: pinned first, so a thread
    /// that cannot be is not left real-time wherever it happens to run.
    pub fn apply(&self, thread: usize) -> io::Result<()> {
        if let Some(cpu) = self.cpu_of(thread) {
            sys::pin_this_thread(cpu)
                .map_err(|e| io::Error::new(e.kind(), format!("pinning to CPU {cpu}: {e}")))?;
        }
        if let Some(priority) = self.realtime {
            sys::set_this_thread_realtime(priority).map_err(|e| {
                io::Error::new(e.kind(), format!("real-time priority {priority}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Checks, before the datapath starts, that its threads can be placed so: every CPU is
    /// one this process may run on, and (tried on a scratch thread) it may use `SCHED_RR`
    /// at that priority.
    pub fn check(&self) -> Result<(), String> {
        if !self.cpus.is_empty() {
            let allowed = sys::allowed_cpus().map_err(|e| format!("--cpus: {e}"))?;
            if let Some(cpu) = self.cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(format!(
                    "--cpus: CPU {cpu} is not one this process may run on ({})",
                    format_cpus(&allowed)
                ));
            }
        }
        if let Some(priority) = self.realtime {
            std::thread::spawn(move || sys::set_this_thread_realtime(priority))
                .join()
                .map_err(|_| "--realtime: the check's thread panicked".to_string())?
                .map_err(|e| {
                    format!(
                        "--realtime {priority}: {e} (needs CAP_SYS_NICE, or an RLIMIT_RTPRIO of at least {priority})"
                    )
                })?;
        }
        Ok(())
    }

    /// What the placement is, for the log.
    pub fn describe(&self) -> String {
        let cpus = if self.cpus.is_empty() {
            "any CPU".to_string()
        } else {
            format!("CPUs {} (engine first)", format_cpus(&self.cpus))
        };
        match self.realtime {
            Some(priority) => format!("{cpus}, SCHED_RR priority {priority}"),
            None => format!("{cpus}, normal scheduling"),
        }
    }
}

/// `--cpus`: CPU numbers and ranges, comma-separated, in thread order (`1,0`, `2-3`).
pub fn parse_cpus(text: &str) -> Result<Vec<usize>, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&cpu| cpu < libc::CPU_SETSIZE as usize)
            .ok_or_else(|| format!("{s:?} is not a CPU number"))
    };
    let mut cpus = Vec::new();
    for item in text.split(',') {
        match item.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(format!("{item:?}: a range runs upwards"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(number(item)?),
        }
    }
    Ok(cpus)
}

fn format_cpus(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_numbers_and_ranges_in_thread_order() {
        assert_eq!(parse_cpus("1,0"), Ok(vec![1, 0]));
        assert_eq!(parse_cpus("2-4,0"), Ok(vec![2, 3, 4, 0]));
        assert_eq!(parse_cpus(" 3 "), Ok(vec![3]));
        for bad in ["", "a", "1,", "-1", "3-1", "1-", "99999"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn threads_take_the_list_in_turn() {
        let placement = Placement {
            cpus: vec![1, 0],
            realtime: None,
        };
        let cpus: Vec<_> = (0..4).map(|t| placement.cpu_of(t)).collect();
        assert_eq!(cpus, [Some(1), Some(0), Some(1), Some(0)]);
        assert_eq!(Placement::default().cpu_of(3), None);
        assert!(Placement::default().is_default());
    }

    #[test]
    fn a_cpu_the_process_may_not_use_is_refused_up_front() {
        let allowed = sys::allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let ok = Placement {
            cpus: allowed.clone(),
            realtime: None,
        };
        assert_eq!(ok.check(), Ok(()));
        let outside = (0..).find(|c| !allowed.contains(c)).unwrap();
        let err = Placement {
            cpus: vec![outside],
            realtime: None,
        }
        .check()
        .unwrap_err();
        assert!(err.contains(&format!("CPU {outside} is not one")), "{err}");
    }

    #[test]
    fn a_pinned_thread_runs_where_it_was_put() {
        let allowed = sys::allowed_cpus().unwrap();
        let cpu = *allowed.last().unwrap();
        let placement = Placement {
            cpus: vec![cpu],
            realtime: None,
        };
        let seen = std::thread::spawn(move || {
            placement.apply(0).unwrap();
            sys::allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [cpu]);
    }
}
