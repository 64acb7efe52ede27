//! Soak of the default network's shape with packet NAT through an uplink, two workers
//! translating established connections beside the engine (the shared body is in `soak/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod soak;

#[test]
fn a_mixed_load_through_packet_nat_on_two_threads_levels_off() {
    // The churning guest closes first, so each connection leaves a TIME_WAIT socket in the
    // guest for 60 s: at packet NAT's pace its 28,232 ephemeral ports run out within a
    // minute (connect fails with EADDRNOTAVAIL, through the kernel alike). Reusing them, as
    // busy clients are set up to, also sends NAT new SYNs on tuples it holds in TIME_WAIT.
    let stats = soak::soak(
        "<forward mode='nat' dev='eth0'>\
           <nat><address start='203.0.113.2' end='203.0.113.2'/></nat>\
         </forward>\
         <sy:uplink prefix='24' gateway='203.0.113.1'/>",
        true,
    );
    let engine = &stats["engine"];
    let by_worker = engine["worker_forwarded"].as_u64().unwrap();
    let nat = &engine["nat"];
    let translated =
        nat["translated_out"].as_u64().unwrap() + nat["translated_in"].as_u64().unwrap();
    eprintln!("the worker forwarded {by_worker}; NAT translated {translated}");
    // Half the flows hash to the worker's queue or socket; established ones it translates.
    assert!(
        by_worker * 100 >= translated,
        "the worker forwarded {by_worker} of {translated}: {stats}"
    );
}
