//! `cargo +nightly fuzz run discovery_protocol`: the input format and the checks are
//! documented on `p2pchat_discovery::fuzz::discovery_protocol`. Inputs worth keeping go in
//! `fuzz/regressions/discovery_protocol/`, which the normal test suite replays.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2pchat_discovery::fuzz::discovery_protocol(data));
