//! The inputs kept under `fuzz/regressions/discovery_protocol/` (crashes the fuzz target
//! found, and seeds), replayed through the same check the `cargo fuzz` target runs.

use std::path::Path;

use p2pchat_core::testing::fuzz::replay_regressions;

#[test]
fn discovery_protocol_regressions_pass() {
    // At the root of the workspace: part of the repository, not of the published crate.
    replay_regressions(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/discovery_protocol"),
        p2pchat_discovery::fuzz::discovery_protocol,
    );
}
