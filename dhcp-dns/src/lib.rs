//! DHCP and DNS for the virtual gateway, sans-IO.
//!
//! The engine owns the gateway address, so the services a guest expects from libvirt's dnsmasq
//! have to be answered from inside it rather than by a daemon bound to a kernel bridge. Keeping
//! them free of sockets and clocks lets the datapath thread call them with the payload of a
//! frame and the current time, and lets the tests drive whole client conversations with byte
//! fixtures.
//!
//! - [`dhcp`]: the DHCPv4 server (leases, reservations, the dnsmasq lease file).
//! - [`dns`]: the DNS forwarder (local names, cache, strict-order upstreams); its lease names
//!   come from [`dhcp::DhcpServer::poll_event`].
#![forbid(unsafe_code)]

pub mod dhcp;
pub mod dns;
