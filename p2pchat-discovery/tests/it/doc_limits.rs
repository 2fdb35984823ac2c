//! The server's limits table in docs/ARCHITECTURE.md says what the code does (see the
//! core's `doc_limits` test for how).

use std::path::Path;

use p2pchat_core::testing::doc_limits::{assert_table, count, hours, secs};
use p2pchat_discovery::{config, storage};

#[test]
fn the_server_limits_table_matches_the_constants() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md");
    let actual = [
        (
            "config::DEFAULT_LISTEN_ADDR",
            format!("`{}`", config::DEFAULT_LISTEN_ADDR),
        ),
        (
            "config::MAX_CONNECTIONS",
            count(config::MAX_CONNECTIONS as u64),
        ),
        (
            "config::MAX_CONNECTIONS_PER_IP",
            count(config::MAX_CONNECTIONS_PER_IP as u64),
        ),
        (
            "config::REGISTRATIONS_PER_SECOND_PER_IP",
            count(config::REGISTRATIONS_PER_SECOND_PER_IP),
        ),
        (
            "config::DEPOSITS_PER_SECOND_PER_USER",
            count(config::DEPOSITS_PER_SECOND_PER_USER),
        ),
        ("config::DEPOSIT_BURST", count(config::DEPOSIT_BURST)),
        (
            "config::NEW_CLAIMS_PER_HOUR_PER_IP",
            count(config::NEW_CLAIMS_PER_HOUR_PER_IP),
        ),
        (
            "config::LOOKUPS_PER_SECOND_PER_SESSION",
            count(config::LOOKUPS_PER_SECOND_PER_SESSION),
        ),
        (
            "config::LOOKUPS_PER_SECOND_PER_IP",
            count(config::LOOKUPS_PER_SECOND_PER_IP),
        ),
        (
            "config::MAX_TOTAL_WATCHES",
            count(config::MAX_TOTAL_WATCHES as u64),
        ),
        ("config::HANDSHAKE_TIMEOUT", secs(config::HANDSHAKE_TIMEOUT)),
        (
            "config::SESSION_PUSH_CAPACITY",
            count(config::SESSION_PUSH_CAPACITY as u64),
        ),
        ("config::SHUTDOWN_GRACE", secs(config::SHUTDOWN_GRACE)),
        ("config::PROBE_TIMEOUT", secs(config::PROBE_TIMEOUT)),
        (
            "config::MAX_PROBES_IN_FLIGHT",
            count(config::MAX_PROBES_IN_FLIGHT as u64),
        ),
        ("config::MAX_RELAYS", count(config::MAX_RELAYS as u64)),
        (
            "config::MAX_RELAYS_PER_USER",
            count(config::MAX_RELAYS_PER_USER as u64),
        ),
        (
            "config::RELAY_BYTES_PER_SECOND",
            count(config::RELAY_BYTES_PER_SECOND),
        ),
        (
            "config::RELAY_IDLE_TIMEOUT",
            secs(config::RELAY_IDLE_TIMEOUT),
        ),
        (
            "config::REACH_REQUESTS_PER_SECOND_PER_USER",
            count(config::REACH_REQUESTS_PER_SECOND_PER_USER),
        ),
        (
            "storage::SIGNAL_FEED_CAPACITY",
            count(storage::SIGNAL_FEED_CAPACITY as u64),
        ),
        (
            "storage::PRESENCE_FEED_CAPACITY",
            count(storage::PRESENCE_FEED_CAPACITY as u64),
        ),
        (
            "storage::ANNOUNCEMENT_FEED_CAPACITY",
            count(storage::ANNOUNCEMENT_FEED_CAPACITY as u64),
        ),
        (
            "storage::CLAIM_TOUCH_INTERVAL",
            hours(storage::CLAIM_TOUCH_INTERVAL),
        ),
        (
            "storage::DEFAULT_KEY_PREFIX",
            format!("`{}`", storage::DEFAULT_KEY_PREFIX),
        ),
        (
            "MAX_IN_FLIGHT",
            count(p2pchat_discovery::MAX_IN_FLIGHT as u64),
        ),
        (
            "operator::RELAY_TIMEOUT",
            secs(p2pchat_discovery::operator::RELAY_TIMEOUT),
        ),
    ];
    assert_table(&doc, "In `p2pchat-discovery`", &actual);
}
