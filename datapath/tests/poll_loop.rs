//! The poll loop's fairness (DESIGN.md principle 3): a port with a deep backlog gets at most
//! `RX_BUDGET` frames per turn, so the other ports are served in the same turn.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use datapath::io::{Datapath, PortCaps, RX_BUDGET};
use datapath::{Config, Engine, MacAddr};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn frame(dst: MacAddr, src: MacAddr) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn attach(dp: &mut Datapath, name: &str) -> UnixDatagram {
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    ours.set_nonblocking(true).unwrap();
    dp.add_fd_port(
        name.into(),
        File::from(OwnedFd::from(theirs)),
        PortCaps::PLAIN,
    )
    .unwrap();
    ours
}

fn count(sock: &UnixDatagram) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sock.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn a_busy_port_does_not_starve_the_others() {
    let mut dp = Datapath::new(Engine::new(&Config::default())).unwrap();
    let (a, b, c) = (
        MacAddr([2, 0, 0, 0, 0, 0xa]),
        MacAddr([2, 0, 0, 0, 0, 0xb]),
        MacAddr([2, 0, 0, 0, 0, 0xc]),
    );
    let busy = attach(&mut dp, "busy");
    let quiet = attach(&mut dp, "quiet");
    let sink = attach(&mut dp, "sink");
    sink.send(&frame(MacAddr::BROADCAST, c)).unwrap();
    dp.turn(Some(Duration::from_millis(10))).unwrap();
    count(&busy);
    count(&quiet);

    let backlog = 4 * RX_BUDGET;
    for _ in 0..backlog {
        busy.send(&frame(c, a)).unwrap();
    }
    quiet.send(&frame(c, b)).unwrap();
    dp.turn(Some(Duration::from_millis(10))).unwrap();
    let first_turn = count(&sink);
    assert!(
        first_turn <= RX_BUDGET + 1,
        "the busy port got more than its budget: {first_turn}"
    );
    let quiet_tx = dp.engine().stats().ports[1].1.counters.rx_packets;
    assert_eq!(quiet_tx, 1, "the quiet port was served in the same turn");

    // The backlog is still drained, without waiting for new readiness events.
    let mut total = first_turn;
    for _ in 0..10 {
        dp.turn(Some(Duration::ZERO)).unwrap();
        total += count(&sink);
    }
    assert_eq!(total, backlog + 1);
}
