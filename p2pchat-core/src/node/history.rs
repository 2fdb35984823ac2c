//! Conversation history: the messages this node sent and the ones it showed, per peer, kept
//! in the node database (table `History`) for as long as the application asked
//! ([`crate::ChatNodeBuilder::history`]). Off by default: a library's application usually
//! keeps its own.
//!
//! A received message enters the history when it enters the inbox to be shown (a muted or
//! blocked sender's never do; a request or a message under an untrusted key does when it is
//! released); a sent one when `send` queues it, in the same database write. Each peer keeps
//! at most [`HISTORY_PER_PEER`] entries (older ones are deleted as new ones come), and
//! entries older than the retention are deleted when the node starts and not returned.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::db::{Batch, Db, DbError, Table};
use super::records::{self, HistoryRecord, HistoryRecordRef};
use crate::protocol::MessageId;

/// The most history entries kept per peer; older ones are deleted as new ones come.
/// Default: 10,000.
pub const HISTORY_PER_PEER: usize = 10_000;

/// One message of a conversation, from [`crate::ChatNode::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// The message's id.
    pub id: MessageId,
    /// The other side of the conversation.
    pub peer: String,
    /// `true`: this node sent it to `peer`; `false`: `peer` sent it.
    pub outgoing: bool,
    /// The text.
    pub text: String,
    /// When the sender sent it (the sender's clock).
    pub sent_at: SystemTime,
}

#[derive(Debug)]
struct Kept {
    /// Database key: peer, 0, sequence number (big-endian).
    key: Vec<u8>,
    entry: HistoryEntry,
}

/// The history of every peer, in memory and in the database.
#[derive(Debug)]
pub(crate) struct History {
    retention: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    peers: HashMap<String, VecDeque<Kept>>,
    next_seq: u64,
}

fn key(peer: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(peer.len() + 9);
    key.extend_from_slice(peer.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

impl History {
    /// The history the database holds, keeping what is younger than `retention` (`None`:
    /// history is off, and whatever an earlier run kept is deleted).
    pub(crate) fn load(
        db: &Db,
        retention: Option<Duration>,
        rows: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Option<Arc<Self>>, DbError> {
        let cutoff =
            retention.map(|r| unix_ms(SystemTime::now().checked_sub(r).unwrap_or(UNIX_EPOCH)));
        let mut state = State::default();
        let mut stale = Vec::new();
        for (key, value) in rows {
            let seq = key
                .len()
                .checked_sub(8)
                .and_then(|at| key[at..].try_into().ok())
                .map(u64::from_be_bytes);
            let record = records::decode::<HistoryRecord>(&value);
            let (
                Some(seq),
                Some(HistoryRecord::V1 {
                    peer,
                    id,
                    outgoing,
                    text,
                    sent_at_ms,
                }),
                Some(cutoff),
            ) = (seq, record, cutoff)
            else {
                stale.push(key);
                continue;
            };
            state.next_seq = state.next_seq.max(seq + 1);
            if sent_at_ms < cutoff {
                stale.push(key);
                continue;
            }
            state
                .peers
                .entry(peer.clone())
                .or_default()
                .push_back(Kept {
                    key,
                    entry: HistoryEntry {
                        id: MessageId::from_bytes(id),
                        peer,
                        outgoing,
                        text,
                        sent_at: UNIX_EPOCH + Duration::from_millis(sent_at_ms),
                    },
                });
        }
        // Keys are in recording order per peer.
        for kept in state.peers.values_mut() {
            while kept.len() > HISTORY_PER_PEER {
                if let Some(old) = kept.pop_front() {
                    stale.push(old.key);
                }
            }
        }
        if !stale.is_empty() {
            db.write_with(|batch| {
                for key in &stale {
                    batch.delete(Table::History, key);
                }
            })?;
        }
        Ok(retention.map(|retention| {
            Arc::new(Self {
                retention,
                state: Mutex::new(state),
            })
        }))
    }

    /// Adds an entry to `batch` (and, once the batch is written, to memory: call
    /// [`History::keep`] with what this returns).
    pub(crate) fn record(
        &self,
        batch: &mut Batch,
        peer: &str,
        id: MessageId,
        outgoing: bool,
        text: &str,
        sent_at_ms: u64,
    ) -> Pending {
        let mut state = self.state.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        let key = key(peer, seq);
        batch.put_record(
            Table::History,
            &key,
            &HistoryRecordRef::V1 {
                peer,
                id: *id.as_bytes(),
                outgoing,
                text,
                sent_at_ms,
            },
        );
        // The entry pushed out by this one goes in the same batch.
        let evicted = state
            .peers
            .get(peer)
            .filter(|kept| kept.len() >= HISTORY_PER_PEER)
            .and_then(|kept| kept.front())
            .map(|old| old.key.clone());
        if let Some(old) = &evicted {
            batch.delete(Table::History, old);
        }
        Pending {
            kept: Kept {
                key,
                entry: HistoryEntry {
                    id,
                    peer: peer.to_owned(),
                    outgoing,
                    text: text.to_owned(),
                    sent_at: UNIX_EPOCH + Duration::from_millis(sent_at_ms),
                },
            },
            evicted: evicted.is_some(),
        }
    }

    /// Keeps in memory entries whose batch was written.
    pub(crate) fn keep(&self, written: impl IntoIterator<Item = Pending>) {
        let mut state = self.state.lock();
        for pending in written {
            let kept = state
                .peers
                .entry(pending.kept.entry.peer.clone())
                .or_default();
            if pending.evicted {
                kept.pop_front();
            }
            kept.push_back(pending.kept);
        }
    }

    /// The last `limit` entries with `peer`, oldest first, younger than the retention.
    pub(crate) fn with(&self, peer: &str, limit: usize) -> Vec<HistoryEntry> {
        let cutoff = SystemTime::now()
            .checked_sub(self.retention)
            .unwrap_or(UNIX_EPOCH);
        let state = self.state.lock();
        let Some(kept) = state.peers.get(peer) else {
            return Vec::new();
        };
        let mut entries: Vec<HistoryEntry> = kept
            .iter()
            .rev()
            .filter(|k| k.entry.sent_at >= cutoff)
            .take(limit)
            .map(|k| k.entry.clone())
            .collect();
        entries.reverse();
        entries
    }

    /// The peers with history, in name order.
    pub(crate) fn peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self
            .state
            .lock()
            .peers
            .iter()
            .filter(|(_, kept)| !kept.is_empty())
            .map(|(peer, _)| peer.clone())
            .collect();
        peers.sort();
        peers
    }
}

/// An entry recorded in a batch, kept in memory once the batch is written.
#[derive(Debug)]
pub(crate) struct Pending {
    kept: Kept,
    evicted: bool,
}
