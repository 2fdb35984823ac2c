//! The inputs kept under `fuzz/regressions/<target>/` (crashes the fuzz targets found, and
//! seeds), replayed through the same checks the `cargo fuzz` targets run.

use p2pchat_core::testing::fuzz;

#[test]
fn frame_decoder_regressions_pass() {
    fuzz::replay_regressions("frame_decoder", fuzz::frame_decoder);
}

#[test]
fn handshake_regressions_pass() {
    fuzz::replay_regressions("handshake", fuzz::handshake);
}

#[test]
fn token_open_regressions_pass() {
    fuzz::replay_regressions("token_open", fuzz::token_open);
}
