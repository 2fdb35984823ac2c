//! The inputs kept under `fuzz/regressions/<target>/` (crashes the fuzz targets found, and
//! seeds), replayed through the same checks the `cargo fuzz` targets run.

use std::path::{Path, PathBuf};

use p2pchat_core::testing::fuzz;

/// The inputs kept for fuzz target `target`: `fuzz/regressions/<target>/` at the root of the
/// workspace (part of the repository, not of the published crate).
pub fn kept_inputs(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target)
}

#[test]
fn frame_decoder_regressions_pass() {
    fuzz::replay_regressions(kept_inputs("frame_decoder"), fuzz::frame_decoder);
}

#[test]
fn handshake_regressions_pass() {
    fuzz::replay_regressions(kept_inputs("handshake"), fuzz::handshake);
}

#[test]
fn token_open_regressions_pass() {
    fuzz::replay_regressions(kept_inputs("token_open"), fuzz::token_open);
}
