//! What the node database stores: versioned record types of their own, apart from the wire
//! and API types, so that a change to either cannot silently change the disk format. Each
//! record is a postcard enum whose variant is its version; a golden-bytes test pins each
//! encoding.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A message in the outbox (table `Outbox`, key: the message id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum OutboxRecord {
    V1 {
        /// Order among everything the node queued.
        seq: u64,
        to: String,
        body: String,
        sent_at_ms: u64,
        queued_at_ms: u64,
        expires_at_ms: u64,
    },
}

/// A received message the application has not confirmed (table `Inbox`, key: sequence
/// number) or one held under a key not yet trusted (table `Held`, same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum InboxRecord {
    V1 {
        from: String,
        id: [u8; 16],
        text: String,
        sent_at_ms: u64,
        offline: bool,
    },
}

/// One message of a conversation (table `History`, key: the peer, 0, a sequence number,
/// big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum HistoryRecord {
    V1 {
        peer: String,
        id: [u8; 16],
        outgoing: bool,
        text: String,
        /// The sender's time, as shown.
        sent_at_ms: u64,
        /// This node's time when it recorded the entry: retention counts from it (not from
        /// the sender's clock, which a peer controls).
        at_ms: u64,
    },
}

/// [`HistoryRecord`] encoded from borrowed fields: the same bytes (tested).
#[derive(Debug, Serialize)]
pub(crate) enum HistoryRecordRef<'a> {
    V1 {
        peer: &'a str,
        id: [u8; 16],
        outgoing: bool,
        text: &'a str,
        sent_at_ms: u64,
        at_ms: u64,
    },
}

/// One id received from a sender (table `Seen`, key: [`seen_key`]). A sender's ids are kept
/// in a ring of [`crate::node::DEDUP_WINDOW`] slots: the `n`-th id received from a sender
/// goes to slot `n % DEDUP_WINDOW`, so recording an id overwrites the one it pushes out of
/// the window, and nothing is ever deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SeenRecord {
    V1 {
        /// Which id from this sender this was, counting from 0.
        n: u64,
        id: [u8; 16],
        /// Its sequence number ([`crate::crypto::Payload::seq`]).
        seq: u64,
        /// The sender's dedup floor when it was recorded: tokens numbered below it are
        /// older than every id remembered.
        floor: u64,
    },
}

/// Block and mute lists, pins, the operator pin and announcement ids (table `Meta`, key
/// [`PEERS_KEY`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PeersRecord {
    #[default]
    Empty,
    V1 {
        blocked: BTreeSet<String>,
        /// Username → end of the mute, Unix milliseconds.
        muted: BTreeMap<String, u64>,
        pins: BTreeMap<String, [u8; 32]>,
        operator: Option<[u8; 32]>,
        /// Announcement id → when it was issued, Unix milliseconds.
        announcements: BTreeMap<String, u64>,
    },
    /// V1 and the contacts: the users written to or accepted (what contacts-only mode lets
    /// through).
    V2 {
        blocked: BTreeSet<String>,
        /// Username → end of the mute, Unix milliseconds.
        muted: BTreeMap<String, u64>,
        pins: BTreeMap<String, [u8; 32]>,
        operator: Option<[u8; 32]>,
        /// Announcement id → when it was issued, Unix milliseconds.
        announcements: BTreeMap<String, u64>,
        contacts: BTreeSet<String>,
    },
}

/// Key in table `Meta` of the node's sequence number reservation (u64 big-endian): every
/// number handed out is below it (see `SeqClock`).
pub(crate) const SEQ_KEY: &[u8] = b"seq";

/// Key of the [`PeersRecord`] in table `Meta`.
pub(crate) const PEERS_KEY: &[u8] = b"peers";

/// Encodes a record (postcard cannot fail into a `Vec`).
pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    postcard::to_stdvec(record).unwrap_or_default()
}

/// Decodes a record; `None` for bytes that are not one (a newer version, corruption).
pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

/// [`OutboxRecord`] encoded from borrowed fields: the same bytes (tested), without copying
/// the message first.
#[derive(Debug, Serialize)]
pub(crate) enum OutboxRecordRef<'a> {
    V1 {
        seq: u64,
        to: &'a str,
        body: &'a str,
        sent_at_ms: u64,
        queued_at_ms: u64,
        expires_at_ms: u64,
    },
}

/// [`InboxRecord`] encoded from borrowed fields: the same bytes (tested).
#[derive(Debug, Serialize)]
pub(crate) enum InboxRecordRef<'a> {
    V1 {
        from: &'a str,
        id: [u8; 16],
        text: &'a str,
        sent_at_ms: u64,
        offline: bool,
    },
}

/// Writes the `Seen` key of slot `slot` of `from`'s ring into `key`: the sender, 0, the
/// slot (big-endian).
pub(crate) fn seen_key(key: &mut Vec<u8>, from: &str, slot: u16) {
    key.clear();
    key.extend_from_slice(from.as_bytes());
    key.push(0);
    key.extend_from_slice(&slot.to_be_bytes());
}

/// Splits a `Seen` key into sender and slot.
pub(crate) fn split_seen_key(key: &[u8]) -> Option<(&str, u16)> {
    let split = key.len().checked_sub(3)?;
    if key[split] != 0 {
        return None;
    }
    let from = std::str::from_utf8(&key[..split]).ok()?;
    Some((from, u16::from_be_bytes(key[split + 1..].try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The disk format: these bytes must never change for a version already released.
    #[test]
    fn record_encodings_are_pinned() {
        let outbox = OutboxRecord::V1 {
            seq: 1,
            to: "bob".into(),
            body: "hi".into(),
            sent_at_ms: 2,
            queued_at_ms: 3,
            expires_at_ms: 4,
        };
        assert_eq!(
            encode(&outbox),
            [0, 1, 3, b'b', b'o', b'b', 2, b'h', b'i', 2, 3, 4]
        );
        let inbox = InboxRecord::V1 {
            from: "al".into(),
            id: [7; 16],
            text: "x".into(),
            sent_at_ms: 5,
            offline: true,
        };
        let mut expected = vec![0, 2, b'a', b'l'];
        expected.extend_from_slice(&[7; 16]);
        expected.extend_from_slice(&[1, b'x', 5, 1]);
        assert_eq!(encode(&inbox), expected);
        let seen = SeenRecord::V1 {
            n: 2,
            id: [7; 16],
            seq: 300,
            floor: 1,
        };
        let mut expected = vec![0, 2];
        expected.extend_from_slice(&[7; 16]);
        expected.extend_from_slice(&[0xac, 0x02, 1]);
        assert_eq!(encode(&seen), expected);
        let peers = PeersRecord::V1 {
            blocked: ["m".to_owned()].into(),
            muted: BTreeMap::new(),
            pins: BTreeMap::new(),
            operator: None,
            announcements: BTreeMap::new(),
        };
        assert_eq!(encode(&peers), [1, 1, 1, b'm', 0, 0, 0, 0]);
        let peers = PeersRecord::V2 {
            blocked: ["m".to_owned()].into(),
            muted: BTreeMap::new(),
            pins: BTreeMap::new(),
            operator: None,
            announcements: BTreeMap::new(),
            contacts: ["c".to_owned()].into(),
        };
        assert_eq!(encode(&peers), [2, 1, 1, b'm', 0, 0, 0, 0, 1, 1, b'c']);
        assert_eq!(decode::<OutboxRecord>(&encode(&outbox)), Some(outbox));
    }

    #[test]
    fn borrowed_records_encode_as_the_owned_ones() {
        let history = HistoryRecordRef::V1 {
            peer: "bob",
            id: [3; 16],
            outgoing: true,
            text: "hi",
            sent_at_ms: 9,
            at_ms: 10,
        };
        let owned = HistoryRecord::V1 {
            peer: "bob".into(),
            id: [3; 16],
            outgoing: true,
            text: "hi".into(),
            sent_at_ms: 9,
            at_ms: 10,
        };
        assert_eq!(encode(&history), encode(&owned));
        let mut golden = vec![0, 3, b'b', b'o', b'b'];
        golden.extend([3; 16]);
        golden.extend([1, 2, b'h', b'i', 9, 10]);
        assert_eq!(encode(&owned), golden);
        assert_eq!(decode::<HistoryRecord>(&golden), Some(owned));
        let outbox = OutboxRecordRef::V1 {
            seq: 1,
            to: "bob",
            body: "hi",
            sent_at_ms: 2,
            queued_at_ms: 3,
            expires_at_ms: 4,
        };
        assert_eq!(
            encode(&outbox),
            encode(&OutboxRecord::V1 {
                seq: 1,
                to: "bob".into(),
                body: "hi".into(),
                sent_at_ms: 2,
                queued_at_ms: 3,
                expires_at_ms: 4,
            })
        );
        let inbox = InboxRecordRef::V1 {
            from: "al",
            id: [7; 16],
            text: "x",
            sent_at_ms: 5,
            offline: true,
        };
        assert_eq!(
            encode(&inbox),
            encode(&InboxRecord::V1 {
                from: "al".into(),
                id: [7; 16],
                text: "x".into(),
                sent_at_ms: 5,
                offline: true,
            })
        );
    }

    #[test]
    fn seen_keys_split_back() {
        let mut key = Vec::new();
        seen_key(&mut key, "bob", 515);
        assert_eq!(key, b"bob\0\x02\x03");
        assert_eq!(split_seen_key(&key), Some(("bob", 515)));
        assert_eq!(split_seen_key(b"ab"), None);
        assert_eq!(split_seen_key(b"bob\x01\x02\x03"), None);
    }
}
