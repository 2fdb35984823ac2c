//! `cargo +nightly fuzz run token_open`: the input format and the checks are documented on
//! `p2pchat_core::testing::fuzz::token_open`. Inputs worth keeping go in
//! `fuzz/regressions/token_open/`, which the normal test suite replays.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2pchat_core::testing::fuzz::token_open(data));
