//! The switchyard engine.
//!
//! Everything that decides what happens to a frame lives in sans-IO modules ([`switch`],
//! [`engine`], [`wire`]): they take bytes and the current time and return what to send, so the
//! same code is unit-tested with byte fixtures, benched with criterion and traced frame by frame.
//! Only [`io`] touches the operating system, and only `io::sys` holds `unsafe` code.
#![deny(unsafe_code)]

pub mod dhcp;
pub mod dns;
pub mod dns_tcp;
pub mod engine;
pub mod gateway;
pub mod guard;
pub mod io;
pub mod nat;
pub mod port;
pub mod socket_nat;
pub mod stack;
pub mod switch;
pub mod trace;
pub mod uplink;
pub mod wire;

pub use engine::{Config, Engine, Verdict};
pub use port::{DropReason, PortId};
pub use wire::MacAddr;
