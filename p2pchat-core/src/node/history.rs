//! Conversation history: the messages this node sent and the ones it showed, per peer, kept
//! in the node database (table `History`) for as long as the application asked
//! ([`crate::ChatNodeBuilder::history`]). Off by default: a library's application usually
//! keeps its own.
//!
//! A received message enters the history when it enters the inbox to be shown (a muted or
//! blocked sender's never do; a request or a message under an untrusted key does when it is
//! released); a sent one when `send` queues it, in the same database write. Each peer keeps
//! at most [`HISTORY_PER_PEER`] entries (older ones are deleted as new ones come), and
//! entries recorded longer ago than the retention (by this node's clock, not the sender's)
//! are deleted when the node starts and not returned.

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
    /// When this node recorded it: the retention counts from here.
    at_ms: u64,
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
                    at_ms,
                }),
                Some(cutoff),
            ) = (seq, record, cutoff)
            else {
                stale.push(key);
                continue;
            };
            state.next_seq = state.next_seq.max(seq + 1);
            if at_ms < cutoff {
                stale.push(key);
                continue;
            }
            state
                .peers
                .entry(peer.clone())
                .or_default()
                .push_back(Kept {
                    key,
                    at_ms,
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

    /// Adds an entry to `batch`, and to `pending` (kept in memory by [`History::keep`] once
    /// the batch is written). An entry that pushes the peer's history past
    /// [`HISTORY_PER_PEER`] deletes the oldest in the same batch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        batch: &mut Batch,
        pending: &mut Vec<Pending>,
        peer: &str,
        id: MessageId,
        outgoing: bool,
        text: &str,
        sent_at_ms: u64,
    ) {
        let at_ms = unix_ms(SystemTime::now());
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
                at_ms,
            },
        );
        // Entries of this peer already added to the batch, and how many of them evict.
        let (earlier, evicting) = pending
            .iter()
            .filter(|p| p.kept.entry.peer == peer)
            .fold((0, 0), |(n, e), p| (n + 1, e + usize::from(p.evicted)));
        let kept = state.peers.get(peer).map_or(0, VecDeque::len);
        let evicted = if kept + earlier >= HISTORY_PER_PEER {
            state
                .peers
                .get(peer)
                .and_then(|k| k.get(evicting))
                .map(|old| old.key.clone())
        } else {
            None
        };
        if let Some(old) = &evicted {
            batch.delete(Table::History, old);
        }
        pending.push(Pending {
            kept: Kept {
                key,
                at_ms,
                entry: HistoryEntry {
                    id,
                    peer: peer.to_owned(),
                    outgoing,
                    text: text.to_owned(),
                    sent_at: UNIX_EPOCH + Duration::from_millis(sent_at_ms),
                },
            },
            evicted: evicted.is_some(),
        });
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
        let cutoff = unix_ms(
            SystemTime::now()
                .checked_sub(self.retention)
                .unwrap_or(UNIX_EPOCH),
        );
        let state = self.state.lock();
        let Some(kept) = state.peers.get(peer) else {
            return Vec::new();
        };
        let mut entries: Vec<HistoryEntry> = kept
            .iter()
            .rev()
            .filter(|k| k.at_ms >= cutoff)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::db::Durability;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_oldest_go_in_the_batch_that_adds_past_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, mut snapshot) = Db::open(Some(dir.path()), Durability::Process).expect("open");
        let history = History::load(&db, Some(DAY), snapshot.take(Table::History))
            .expect("load")
            .expect("on");
        let now = unix_ms(SystemTime::now());
        let total = HISTORY_PER_PEER + 300;
        let mut n = 0;
        while n < total {
            let mut pending = Vec::new();
            db.write_with(|batch| {
                for _ in 0..100 {
                    history.record(
                        batch,
                        &mut pending,
                        "bob",
                        MessageId::random(),
                        false,
                        &n.to_string(),
                        now,
                    );
                    n += 1;
                }
                history.record(
                    batch,
                    &mut pending,
                    "carol",
                    MessageId::random(),
                    true,
                    "hi",
                    now,
                );
            })
            .expect("write");
            history.keep(pending);
        }
        let bob = history.with("bob", usize::MAX);
        assert_eq!(bob.len(), HISTORY_PER_PEER);
        assert_eq!(bob[0].text, (total - HISTORY_PER_PEER).to_string());
        assert_eq!(bob.last().map(|e| e.text.as_str()), Some("10299"));
        assert_eq!(history.with("carol", usize::MAX).len(), total / 100);
        db.close();
        drop(db);
        // On disk too: the rows pushed out were deleted, not left for the next start.
        let (_db, mut snapshot) = Db::open(Some(dir.path()), Durability::Process).expect("open");
        let rows = snapshot.take(Table::History);
        assert_eq!(rows.len(), HISTORY_PER_PEER + total / 100);
    }
}
