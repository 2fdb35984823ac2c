//! `cargo +nightly fuzz run handshake`: the input format and the checks are documented on
//! `p2pchat_core::testing::fuzz::handshake`. Inputs worth keeping go in
//! `fuzz/regressions/handshake/`, which the normal test suite replays.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2pchat_core::testing::fuzz::handshake(data));
