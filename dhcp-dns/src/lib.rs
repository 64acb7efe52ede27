//! DHCP and DNS for the virtual gateway, sans-IO.
//!
//! Not implemented yet: the DHCP and DNS issues build this crate. It exists now so the
//! workspace has its final shape.
#![forbid(unsafe_code)]
