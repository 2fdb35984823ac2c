//! The limits table of docs/ARCHITECTURE.md says what the code does: each public constant's
//! row is compared with the constant, and a public constant the table names but this list
//! does not check fails too.

use std::path::Path;

use p2pchat_core::testing::doc_limits::{assert_table, count, days, hours, kib, mins, secs};
use p2pchat_core::{announce, crypto, discovery, node, protocol, store, transport};

#[test]
fn the_core_limits_table_matches_the_constants() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md");
    let (first, longest) = discovery::RECONNECT_BACKOFF;
    let actual = [
        (
            "protocol::PROTOCOL_VERSION",
            count(protocol::PROTOCOL_VERSION),
        ),
        ("protocol::MAX_FRAME_LEN", kib(protocol::MAX_FRAME_LEN)),
        ("protocol::MAX_BODY_LEN", kib(protocol::MAX_BODY_LEN)),
        (
            "protocol::MAX_USERNAME_LEN",
            count(protocol::MAX_USERNAME_LEN as u64),
        ),
        (
            "protocol::MAX_ACK_BATCH",
            count(protocol::MAX_ACK_BATCH as u64),
        ),
        ("protocol::NONCE_LEN", count(protocol::NONCE_LEN as u64)),
        ("protocol::MAX_TOKEN_LEN", kib(protocol::MAX_TOKEN_LEN)),
        ("crypto::MAX_CLOCK_SKEW", secs(crypto::MAX_CLOCK_SKEW)),
        (
            "crypto::KEY_DERIVATION_LABEL",
            format!("`{}`", crypto::KEY_DERIVATION_LABEL),
        ),
        ("node::DEFAULT_ACK_TIMEOUT", secs(node::DEFAULT_ACK_TIMEOUT)),
        (
            "node::DEFAULT_EVENT_CAPACITY",
            count(node::DEFAULT_EVENT_CAPACITY as u64),
        ),
        ("node::HANDSHAKE_TIMEOUT", secs(node::HANDSHAKE_TIMEOUT)),
        (
            "node::MAX_PENDING_HANDSHAKES",
            count(node::MAX_PENDING_HANDSHAKES as u64),
        ),
        (
            "node::MAX_PENDING_HANDSHAKES_PER_ADDRESS",
            count(node::MAX_PENDING_HANDSHAKES_PER_ADDRESS as u64),
        ),
        ("node::SHUTDOWN_GRACE", secs(node::SHUTDOWN_GRACE)),
        ("node::DEDUP_WINDOW", count(node::DEDUP_WINDOW as u64)),
        (
            "node::HISTORY_PER_PEER",
            count(node::HISTORY_PER_PEER as u64),
        ),
        (
            "node::LINK_QUEUE_CAPACITY",
            count(node::LINK_QUEUE_CAPACITY as u64),
        ),
        ("node::MAX_IN_FLIGHT", count(node::MAX_IN_FLIGHT as u64)),
        (
            "node::CONNECT_BACK_TIMEOUT",
            secs(node::CONNECT_BACK_TIMEOUT),
        ),
        (
            "node::MESSAGES_PER_SECOND_PER_SENDER",
            count(node::MESSAGES_PER_SECOND_PER_SENDER),
        ),
        (
            "node::MESSAGE_BURST_PER_SENDER",
            count(node::MESSAGE_BURST_PER_SENDER),
        ),
        (
            "node::MAX_STRANGER_LOOKUPS_PER_SECOND",
            count(node::MAX_STRANGER_LOOKUPS_PER_SECOND),
        ),
        (
            "protocol::discovery::RELAY_TOKEN_LEN",
            count(p2pchat_core::protocol::discovery::RELAY_TOKEN_LEN as u64),
        ),
        (
            "protocol::discovery::RELAY_JOIN_TIMEOUT",
            secs(p2pchat_core::protocol::discovery::RELAY_JOIN_TIMEOUT),
        ),
        (
            "discovery::DEFAULT_KEEP_ALIVE_INTERVAL",
            secs(discovery::DEFAULT_KEEP_ALIVE_INTERVAL),
        ),
        (
            "discovery::DEFAULT_PRESENCE_TTL",
            secs(discovery::DEFAULT_PRESENCE_TTL),
        ),
        (
            "discovery::DEFAULT_CLAIM_LAPSE",
            days(discovery::DEFAULT_CLAIM_LAPSE),
        ),
        (
            "discovery::MAX_PAGE_SIZE",
            count(discovery::MAX_PAGE_SIZE as u64),
        ),
        (
            "protocol::discovery::MAX_DEPOSIT_BATCH",
            count(p2pchat_core::protocol::discovery::MAX_DEPOSIT_BATCH as u64),
        ),
        (
            "discovery::DEFAULT_DISCOVERY_ADDR",
            format!("`{}`", discovery::DEFAULT_DISCOVERY_ADDR),
        ),
        (
            "discovery::DISCOVERY_CONNECT_TIMEOUT",
            secs(discovery::DISCOVERY_CONNECT_TIMEOUT),
        ),
        (
            "discovery::DISCOVERY_REQUEST_TIMEOUT",
            secs(discovery::DISCOVERY_REQUEST_TIMEOUT),
        ),
        (
            "discovery::RECONNECT_BACKOFF",
            format!("{} to {}", secs(first), secs(longest)),
        ),
        (
            "protocol::discovery::DEFAULT_DISCOVERY_PORT",
            protocol::discovery::DEFAULT_DISCOVERY_PORT.to_string(),
        ),
        (
            "protocol::discovery::MAX_ANNOUNCED_ADDRS",
            count(protocol::discovery::MAX_ANNOUNCED_ADDRS as u64),
        ),
        (
            "protocol::discovery::MAX_WATCHES",
            count(protocol::discovery::MAX_WATCHES as u64),
        ),
        (
            "store::DEFAULT_MAILBOX_QUOTA",
            count(store::DEFAULT_MAILBOX_QUOTA as u64),
        ),
        ("store::MAX_TOKEN_AHEAD", hours(store::MAX_TOKEN_AHEAD)),
        (
            "store::DEFAULT_MAILBOX_BYTES",
            kib(store::DEFAULT_MAILBOX_BYTES as usize),
        ),
        (
            "store::DEFAULT_SENDER_QUOTA",
            count(store::DEFAULT_SENDER_QUOTA),
        ),
        (
            "store::DEFAULT_SENDER_BYTES",
            kib(store::DEFAULT_SENDER_BYTES as usize),
        ),
        (
            "store::DEFAULT_PAIR_QUOTA",
            count(store::DEFAULT_PAIR_QUOTA),
        ),
        (
            "store::DEFAULT_PAIR_BYTES",
            kib(store::DEFAULT_PAIR_BYTES as usize),
        ),
        (
            "store::DEFAULT_TOTAL_BYTES",
            kib(store::DEFAULT_TOTAL_BYTES as usize),
        ),
        (
            "store::MESSAGE_OVERHEAD_BYTES",
            count(store::MESSAGE_OVERHEAD_BYTES),
        ),
        (
            "store::DEFAULT_MESSAGE_TTL",
            days(store::DEFAULT_MESSAGE_TTL),
        ),
        (
            "store::MAX_FETCH_BATCH",
            count(store::MAX_FETCH_BATCH as u64),
        ),
        (
            "store::MAX_EXPIRED_BATCH",
            count(store::MAX_EXPIRED_BATCH as u64),
        ),
        ("store::MAX_MESSAGE_TTL", days(store::MAX_MESSAGE_TTL)),
        (
            "store::DEFAULT_REDIS_PREFIX",
            format!("`{}`", store::DEFAULT_REDIS_PREFIX),
        ),
        (
            "store::DEFAULT_ANNOUNCEMENT_CHANNEL",
            format!("`{}`", store::DEFAULT_ANNOUNCEMENT_CHANNEL),
        ),
        (
            "announce::MAX_ANNOUNCEMENT_LEN",
            kib(announce::MAX_ANNOUNCEMENT_LEN),
        ),
        (
            "announce::ANNOUNCEMENT_MAX_AGE",
            mins(announce::ANNOUNCEMENT_MAX_AGE),
        ),
        (
            "transport::TCP_CONNECT_TIMEOUT",
            secs(transport::TCP_CONNECT_TIMEOUT),
        ),
        (
            "transport::MEMORY_PIPE_CAPACITY",
            kib(transport::MEMORY_PIPE_CAPACITY),
        ),
    ];
    assert_table(&doc, "In `p2pchat-core`", &actual);
}
