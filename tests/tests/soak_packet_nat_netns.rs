//! Soak of the default network's shape with packet NAT through an uplink, two workers
//! translating established connections beside the engine (the shared body is in `soak/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod soak;

#[test]
fn a_mixed_load_through_packet_nat_on_two_threads_levels_off() {
    let stats = soak::soak(
        "<forward mode='nat' dev='eth0'>\
           <nat><address start='203.0.113.2' end='203.0.113.2'/></nat>\
         </forward>\
         <sy:uplink prefix='24' gateway='203.0.113.1'/>",
    );
    let engine = &stats["engine"];
    let by_worker = engine["worker_forwarded"].as_u64().unwrap();
    eprintln!(
        "the worker forwarded {by_worker}; NAT translated {} out, {} in",
        engine["nat"]["translated_out"], engine["nat"]["translated_in"]
    );
    assert!(by_worker > 0, "the worker translated nothing: {stats}");
}
