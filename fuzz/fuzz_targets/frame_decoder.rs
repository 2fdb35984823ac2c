//! `cargo +nightly fuzz run frame_decoder`: the input format and the checks are documented on
//! `p2pchat_core::testing::fuzz::frame_decoder`. Inputs worth keeping go in
//! `fuzz/regressions/frame_decoder/`, which the normal test suite replays.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2pchat_core::testing::fuzz::frame_decoder(data));
