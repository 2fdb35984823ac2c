//! The inputs kept under `fuzz/regressions/discovery_protocol/` (crashes the fuzz target
//! found, and seeds), replayed through the same check the `cargo fuzz` target runs.

use p2pchat_core::testing::fuzz::replay_regressions;

#[test]
fn discovery_protocol_regressions_pass() {
    replay_regressions(
        "discovery_protocol",
        p2pchat_discovery::fuzz::discovery_protocol,
    );
}
