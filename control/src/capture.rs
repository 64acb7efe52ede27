//! `switchyard capture` and `switchyard trace`: drain what a running network captured or
//! traced, a tenth of a second at a time, until a count, a duration or Ctrl-C.

use crate::run;
use datapath::io::capture::{hex, pcap_from_text, unhex};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// The network's control socket.
    pub socket: PathBuf,
    pub port: String,
    /// A file, or `-` for standard output.
    pub write: String,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
}

pub fn capture(opts: &CaptureOptions) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("signals: {e}"))?;
    }
    let mut out: Box<dyn Write> = if opts.write == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&opts.write).map_err(|e| format!("{}: {e}", opts.write))?)
    };
    run::ask(&opts.socket, &format!("capture start {}", opts.port))?;
    eprintln!("switchyard: capturing port {} (Ctrl-C stops)", opts.port);
    let started = Instant::now();
    let mut frames = 0u64;
    let mut header = true;
    let result = loop {
        let done = stop.load(Ordering::SeqCst)
            || opts.count.is_some_and(|n| frames >= n)
            || opts.duration.is_some_and(|d| started.elapsed() >= d);
        let text = match run::ask(&opts.socket, &format!("capture read {}", opts.port)) {
            Ok(text) => text,
            Err(e) => break Err(e),
        };
        let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("dropped")).collect();
        if let Some(n) = opts.count {
            lines.truncate(n.saturating_sub(frames) as usize);
        }
        frames += lines.len() as u64;
        let pcap = pcap_from_text(&lines.join("\n"), header);
        header = false;
        if let Err(e) = out.write_all(&pcap).and_then(|()| out.flush()) {
            break Err(format!("{}: {e}", opts.write));
        }
        if done {
            break Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let summary = run::ask(&opts.socket, &format!("capture stop {}", opts.port));
    eprintln!(
        "switchyard: {frames} frames written; {}",
        summary
            .as_deref()
            .map(str::trim)
            .unwrap_or("capture already ended")
    );
    result
}

/// `switchyard trace`: prints the traces of the next `count` frames entering `port` (any
/// port when `None`) that match `filter` (see [`datapath::trace::Filter`]).
pub fn trace(
    socket: &std::path::Path,
    port: Option<&str>,
    filter: &str,
    count: u64,
    duration: Option<Duration>,
) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("signals: {e}"))?;
    }
    run::ask(
        socket,
        &format!("trace start {} {count} {filter}", port.unwrap_or("any")),
    )?;
    let started = Instant::now();
    let mut trailer = TraceTrailer::default();
    // Prints the traces of a `trace read` (or `trace stop`) answer, keeping its last line.
    let mut show = |text: &str| {
        for line in text.lines() {
            match TraceTrailer::parse(line) {
                Some(read) => trailer = read,
                None if line == "stopped" => {}
                None => println!("{line}"),
            }
        }
        trailer.remaining
    };
    let result = loop {
        let text = match run::ask(socket, "trace read") {
            Ok(text) => text,
            Err(e) => break Err(e),
        };
        let remaining = show(&text);
        let _ = std::io::stdout().flush();
        if remaining == 0
            || stop.load(Ordering::SeqCst)
            || duration.is_some_and(|d| started.elapsed() >= d)
        {
            break Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Ok(text) = run::ask(socket, "trace stop") {
        show(&text);
    }
    if trailer.dropped > 0 {
        eprintln!(
            "switchyard: {} traced frames dropped: this reader fell behind (1000 wait at most)",
            trailer.dropped
        );
    }
    if trailer.missed > 0 {
        eprintln!(
            "switchyard: {} frames a worker's socket NAT took could not be copied for the trace (its hand-over was full); some may not have matched the filter",
            trailer.missed
        );
    }
    result
}

/// The last line of a `trace read` answer: `remaining N dropped M missed K`.
#[derive(Debug, Default, PartialEq, Eq)]
struct TraceTrailer {
    remaining: u64,
    dropped: u64,
    missed: u64,
}

impl TraceTrailer {
    fn parse(line: &str) -> Option<TraceTrailer> {
        let rest = line.strip_prefix("remaining ")?;
        let mut words = rest.split_whitespace();
        let mut trailer = TraceTrailer {
            remaining: words.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            ..TraceTrailer::default()
        };
        while let (Some(name), Some(value)) = (words.next(), words.next()) {
            let value = value.parse().unwrap_or(0);
            match name {
                "dropped" => trailer.dropped = value,
                "missed" => trailer.missed = value,
                _ => {}
            }
        }
        Some(trailer)
    }
}

/// `switchyard trace --inject FILE --port P`: the trace of one frame run through the pipeline
/// without being sent. FILE is hexadecimal bytes (spaces and newlines allowed) or a pcap file,
/// whose first frame is taken.
pub fn inject(
    socket: &std::path::Path,
    port: Option<&str>,
    file: &std::path::Path,
) -> Result<(), String> {
    let port = port.ok_or("--inject needs --port: the port the frame enters")?;
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let frame = match bytes.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1]) => {
            let len = bytes
                .get(24 + 8..24 + 12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("the pcap has no frame")?;
            bytes
                .get(24 + 16..24 + 16 + len)
                .ok_or("the pcap's first frame is cut short")?
                .to_vec()
        }
        _ => {
            let text = String::from_utf8_lossy(&bytes);
            let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            unhex(&digits).ok_or_else(|| {
                format!(
                    "{}: not hexadecimal bytes (nor a pcap file)",
                    file.display()
                )
            })?
        }
    };
    let hex = hex(&frame);
    print!(
        "{}",
        run::ask(socket, &format!("trace inject {port} {hex}"))?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_trailer_gives_what_is_left_dropped_and_missed() {
        assert_eq!(
            TraceTrailer::parse("remaining 3 dropped 2 missed 1"),
            Some(TraceTrailer {
                remaining: 3,
                dropped: 2,
                missed: 1
            })
        );
        // An engine before `missed` was added, and a trace's own line.
        assert_eq!(
            TraceTrailer::parse("remaining 0 dropped 5"),
            Some(TraceTrailer {
                remaining: 0,
                dropped: 5,
                missed: 0
            })
        );
        assert_eq!(TraceTrailer::parse("frame 1:"), None);
    }
}
