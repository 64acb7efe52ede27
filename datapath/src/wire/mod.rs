//! Byte-level views of the headers the engine reads or rewrites.
//!
//! Views borrow the frame buffer and read fields at fixed offsets; nothing is copied, so the
//! forwarding path stays allocation-free. Untrusted input goes through `new_checked`, which
//! proves the header is present before any getter runs.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod ipv4;
pub mod offload;
pub mod vnet;

pub use ethernet::{EtherType, EthernetFrame, MacAddr};
pub use vnet::VnetHdr;

/// A header was shorter than its fixed part, or a length field pointed past the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated header")]
    Truncated,
    #[error("malformed header")]
    Malformed,
    #[error("unsupported header")]
    Unsupported,
}
