//! The `switchyard` command: configuration, commands, and wiring the engine to its ports.
#![forbid(unsafe_code)]

pub mod capture;
pub mod daemon;
pub mod demo;
pub mod network;
pub mod report;
pub mod run;
pub mod state;
