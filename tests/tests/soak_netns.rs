//! Soak of the default network's shape with socket NAT (the shared body is in `soak/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod soak;

#[test]
fn a_mixed_load_levels_off_in_memory_and_fds() {
    soak::soak("<forward mode='nat'/>", false);
}
