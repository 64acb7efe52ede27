//! Packet capture on any port: frames as they enter (before the pipeline: NAT has not yet
//! rewritten them) and as they leave (after it), in a bounded buffer that `switchyard
//! capture` drains into a pcap file tcpdump and Wireshark read.
//!
//! The datapath never waits for the reader: when the buffer is full, frames are dropped and
//! counted. With no capture running, the cost is one check of an empty list per frame.

use crate::port::PortId;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::SystemTime;

/// The gateway's own "port": a capture of it holds the frames the engine answers or keeps
/// (ARP, ping, DHCP, DNS, as they came in), its answers, and every frame it originates.
pub const GATEWAY: PortId = PortId(u16::MAX);

/// Bytes a capture may hold before frames are dropped.
pub const BUFFER: usize = 4 << 20;
/// Frames are cut to this many bytes (the whole of a 64 KiB GSO frame fits).
pub const SNAPLEN: usize = 65535;

#[derive(Debug)]
struct Captured {
    /// Microseconds since the Unix epoch.
    at_us: u64,
    original_len: usize,
    data: Vec<u8>,
}

/// A running capture on one port.
#[derive(Debug)]
pub struct Capture {
    pub port: PortId,
    frames: VecDeque<Captured>,
    bytes: usize,
    pub captured: u64,
    pub dropped: u64,
}

impl Capture {
    pub fn new(port: PortId) -> Capture {
        Capture {
            port,
            frames: VecDeque::new(),
            bytes: 0,
            captured: 0,
            dropped: 0,
        }
    }

    /// Keeps a copy of `frame`, unless the buffer is full.
    pub fn record(&mut self, frame: &[u8]) {
        let data = &frame[..frame.len().min(SNAPLEN)];
        if self.bytes + data.len() > BUFFER {
            self.dropped += 1;
            return;
        }
        let at_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.bytes += data.len();
        self.captured += 1;
        self.frames.push_back(Captured {
            at_us,
            original_len: frame.len(),
            data: data.to_vec(),
        });
    }

    /// Takes what was captured, as text lines `SECONDS MICROSECONDS ORIGINAL_LEN HEX`, then
    /// a last line `dropped N`.
    pub fn drain_text(&mut self) -> String {
        let mut out = String::new();
        while let Some(f) = self.frames.pop_front() {
            let _ = write!(
                out,
                "{} {} {} ",
                f.at_us / 1_000_000,
                f.at_us % 1_000_000,
                f.original_len
            );
            out.push_str(&hex(&f.data));
            out.push('\n');
        }
        self.bytes = 0;
        let _ = writeln!(out, "dropped {}", self.dropped);
        out
    }
}

/// A pcap file (the classic format, microsecond timestamps, Ethernet) from the lines of
/// [`Capture::drain_text`]: the global header first when `header`, then one record per line.
pub fn pcap_from_text(text: &str, header: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if header {
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(SNAPLEN as u32).to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    }
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(sec), Some(usec), Some(len), Some(hex)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let (Ok(sec), Ok(usec), Ok(len)) =
            (sec.parse::<u32>(), usec.parse::<u32>(), len.parse::<u32>())
        else {
            continue;
        };
        let Some(data) = unhex(hex) else {
            continue;
        };
        out.extend_from_slice(&sec.to_le_bytes());
        out.extend_from_slice(&usec.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// `bytes` as lowercase hexadecimal, two digits a byte: how frames cross the control socket.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The bytes of [`hex`]'s text; `None` for an odd length or a non-hexadecimal digit.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_frames_become_pcap_records() {
        let mut c = Capture::new(PortId(3));
        c.record(&[1, 2, 3]);
        c.record(&[0xff; 70]);
        let text = c.drain_text();
        assert!(text.ends_with("dropped 0\n"), "{text}");
        let pcap = pcap_from_text(&text, true);
        assert_eq!(&pcap[..4], &0xa1b2_c3d4u32.to_le_bytes());
        // Header, then two records of 16 bytes of header each and their data.
        assert_eq!(pcap.len(), 24 + 16 + 3 + 16 + 70);
        assert_eq!(&pcap[24 + 8..24 + 12], &3u32.to_le_bytes());
        assert_eq!(&pcap[40..43], &[1, 2, 3]);
        assert!(c.drain_text() == "dropped 0\n");
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é0"), None);
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let mut c = Capture::new(PortId(0));
        let big = vec![0u8; SNAPLEN];
        for _ in 0..(BUFFER / SNAPLEN + 3) {
            c.record(&big);
        }
        assert!(c.dropped >= 3, "{}", c.dropped);
        assert_eq!(c.captured as usize, BUFFER / SNAPLEN);
    }
}
