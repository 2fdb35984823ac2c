//! The receiving side's memory: ids already received per sender (the dedup windows), the
//! inbox of messages the application has not confirmed, and the messages held under a key
//! the user has not trusted yet. All three live in the node database; a message is
//! acknowledged to its sender (or to the mailbox) only after [`Inbox::accept`] made it
//! durable here.
//!
//! Every [`crate::Events`] stream reads the inbox through a cursor of its own, so messages
//! are never lost to a slow reader: a stream that falls behind reads them later, in order.
//! A message leaves the inbox when the application confirms it ([`Confirm::Explicit`]) or
//! when a stream hands it out ([`Confirm::OnRead`], the default); an unconfirmed message is
//! handed out again after a restart.

use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Notify;

use super::db::{Db, DbError, Table, Written};
use super::history::{History, Pending};
use super::records::{self, InboxRecord, InboxRecordRef, SeenRecord};
use crate::error::chain;
use crate::event::Event;
use crate::protocol::MessageId;

/// How many ids a node remembers per sender to drop duplicates. A token sent before the
/// oldest id remembered for its sender is dropped as a duplicate too, so no sender can
/// flush another's window, and one sender's replays are caught however old. Default: 16,384.
pub const DEDUP_WINDOW: usize = 16_384;

/// Messages the application may leave unconfirmed before the node stops reading from peers
/// and the mailbox (their acknowledgements wait, and so do they). Default: 100,000.
pub const MAX_UNCONFIRMED: usize = 100_000;

/// The most message text one inbox write carries (with its history, twice that): far below
/// a journal segment ([`super::db::SEGMENT_LEN`], 8 MiB), whatever a reader's batch holds.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

/// When a received message leaves the inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Confirm {
    /// When an [`crate::Events`] stream hands it out: what a terminal client needs. A crash
    /// between the stream and the screen can lose what was in hand. The default.
    #[default]
    OnRead,
    /// When the application calls [`crate::ChatNode::confirm`]: until then it is handed out
    /// again by every new stream and after every restart.
    Explicit,
}

/// How an accepted message is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// In the inbox, to show.
    Show,
    /// Not at all (blocked or muted): only its id, so it is not taken again.
    Hide,
    /// Held until the user trusts the sender's new key.
    Hold,
}

/// One message opened and ready to accept.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) id: MessageId,
    pub(crate) sent_at_ms: u64,
    /// The sender's sequence number: the dedup floor is in these terms.
    pub(crate) seq: u64,
    pub(crate) body: String,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Shared by the entries of one sender.
    from: Arc<str>,
    id: MessageId,
    text: String,
    sent_at_ms: u64,
    offline: bool,
    confirmed: bool,
}

impl Entry {
    fn event(&self) -> Event {
        Event::MessageReceived {
            id: self.id,
            from: self.from.to_string(),
            text: self.text.clone(),
            sent_at: UNIX_EPOCH + Duration::from_millis(self.sent_at_ms),
            offline: self.offline,
        }
    }

    /// The event, leaving the entry's text behind empty.
    fn take_event(&mut self) -> Event {
        Event::MessageReceived {
            id: self.id,
            from: self.from.to_string(),
            text: std::mem::take(&mut self.text),
            sent_at: UNIX_EPOCH + Duration::from_millis(self.sent_at_ms),
            offline: self.offline,
        }
    }

    fn record(&self) -> InboxRecordRef<'_> {
        InboxRecordRef::V1 {
            from: &self.from,
            id: *self.id.as_bytes(),
            text: &self.text,
            sent_at_ms: self.sent_at_ms,
            offline: self.offline,
        }
    }

    fn from_record(record: InboxRecord) -> Self {
        let InboxRecord::V1 {
            from,
            id,
            text,
            sent_at_ms,
            offline,
        } = record;
        Self {
            from: Arc::from(from),
            id: MessageId::from_bytes(id),
            text,
            sent_at_ms,
            offline,
            confirmed: false,
        }
    }
}

/// One sender's dedup window: the last [`DEDUP_WINDOW`] ids received from it, kept in the
/// database as a ring of that many slots (see [`SeenRecord`]).
#[derive(Debug, Default)]
struct Window {
    ids: HashSet<MessageId, foldhash::fast::RandomState>,
    /// The ids in the order received, with their sequence numbers.
    order: VecDeque<(MessageId, u64)>,
    /// Tokens numbered below this are older than everything remembered: the highest
    /// number pushed out of the window (the sender's numbers, not its clock, which may
    /// step back).
    floor: u64,
    /// Ids ever recorded for this sender: the next goes to slot `next % DEDUP_WINDOW`.
    next: u64,
}

/// The ring slot of the `n`-th id from a sender.
fn slot(n: u64) -> u16 {
    // DEDUP_WINDOW fits in a u16 (checked below).
    (n % DEDUP_WINDOW as u64) as u16
}

const _: () = assert!(DEDUP_WINDOW <= 1 << 16);

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    entries: BTreeMap<u64, Entry>,
    unconfirmed: usize,
    /// Stream id → the next sequence number it reads.
    cursors: HashMap<u64, u64>,
    next_stream: u64,
    wakers: Vec<Waker>,
    /// Messages were added since the streams were last woken.
    wake_pending: bool,
    windows: HashMap<String, Window>,
    held: BTreeMap<u64, Entry>,
}

/// The inbox, the held messages and the dedup windows. See the module docs.
#[derive(Debug)]
pub(crate) struct Inbox {
    db: Arc<Db>,
    confirm: Confirm,
    /// Where shown messages are recorded, when history is kept.
    history: Option<Arc<History>>,
    state: Mutex<State>,
    room: Notify,
    /// Bumped (under the state lock) whenever messages join the inbox, and whenever the
    /// registered wakers are taken to be woken: a stream that found nothing new, and sees
    /// the same count, has nothing to look for and its waker is still registered. (Counting
    /// only additions lost wake-ups: a stream woken for a message it had already read found
    /// the count unchanged and returned without registering its waker again.)
    added: AtomicU64,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl Inbox {
    /// The inbox as the database holds it.
    pub(crate) fn load(
        db: Arc<Db>,
        confirm: Confirm,
        history: Option<Arc<History>>,
        inbox: BTreeMap<Vec<u8>, Vec<u8>>,
        held: BTreeMap<Vec<u8>, Vec<u8>>,
        seen: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Self {
        let mut state = State::default();
        let rows = |table: BTreeMap<Vec<u8>, Vec<u8>>| {
            table.into_iter().filter_map(|(key, value)| {
                let seq = u64::from_be_bytes(key.as_slice().try_into().ok()?);
                let record = records::decode::<InboxRecord>(&value)?;
                Some((seq, Entry::from_record(record)))
            })
        };
        state.entries = rows(inbox).collect();
        state.held = rows(held).collect();
        state.unconfirmed = state.entries.len();
        state.next_seq = [state.entries.keys().last(), state.held.keys().last()]
            .into_iter()
            .flatten()
            .max()
            .map_or(0, |last| last + 1);
        let mut ids: Vec<(&str, SeenRecord)> = seen
            .iter()
            .filter_map(|(key, value)| {
                let (from, slot_no) = records::split_seen_key(key)?;
                let record = records::decode::<SeenRecord>(value)?;
                let SeenRecord::V1 { n, .. } = record;
                // A record in another slot than its number says is not ours to trust.
                (slot(n) == slot_no).then_some((from, record))
            })
            .collect();
        ids.sort_by_key(|&(from, SeenRecord::V1 { n, .. })| (from, n));
        for (from, SeenRecord::V1 { n, id, seq, floor }) in ids {
            let window = match state.windows.get_mut(from) {
                Some(window) => window,
                None => state.windows.entry(from.to_owned()).or_default(),
            };
            let id = MessageId::from_bytes(id);
            window.ids.insert(id);
            window.order.push_back((id, seq));
            window.floor = window.floor.max(floor);
            window.next = n + 1;
        }
        Self {
            db,
            confirm,
            history,
            state: Mutex::new(state),
            room: Notify::new(),
            added: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Whether `id` from `from` was received already (or is older than its window).
    pub(crate) fn seen(&self, from: &str, id: MessageId) -> bool {
        self.state()
            .windows
            .get(from)
            .is_some_and(|w| w.ids.contains(&id))
    }

    /// Waits while the application leaves [`MAX_UNCONFIRMED`] messages unconfirmed.
    pub(crate) async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            if self.state().unconfirmed < MAX_UNCONFIRMED {
                return;
            }
            notified.await;
        }
    }

    /// Records `messages` from `from` durably as `keep` says, dropping duplicates (by id,
    /// and anything sent before the sender's window). Returns once they are durable; every
    /// message given may then be acknowledged.
    pub(crate) async fn accept(
        &self,
        from: &str,
        messages: Vec<Opened>,
        offline: bool,
        keep: Keep,
    ) -> Result<(), DbError> {
        // In batches of at most WRITE_CHUNK_BYTES of text: a reader's batch of large
        // messages (with their history) stays far below a journal segment. Each batch is
        // atomic; none is acknowledged before the last is durable, so a crash between two
        // has the sender send them all again, and the first ones are dropped as duplicates.
        let mut last = None;
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for message in messages {
            if !chunk.is_empty() && bytes + message.body.len() > WRITE_CHUNK_BYTES {
                let full = std::mem::take(&mut chunk);
                last = self.accept_chunk(from, full, offline, keep)?.or(last);
                bytes = 0;
            }
            bytes += message.body.len();
            chunk.push(message);
        }
        if !chunk.is_empty() {
            last = self.accept_chunk(from, chunk, offline, keep)?.or(last);
        }
        match last {
            Some(written) => self.db.durable(written).await,
            None => Ok(()),
        }
    }

    /// One batch of [`Inbox::accept`]: where its write ended, if it wrote anything.
    fn accept_chunk(
        &self,
        from: &str,
        messages: Vec<Opened>,
        offline: bool,
        keep: Keep,
    ) -> Result<Option<Written>, DbError> {
        let written = {
            let mut state = self.state();
            let state = &mut *state;
            let mut key = Vec::with_capacity(from.len() + 3);
            let mut added = false;
            let mut any = false;
            let sender: Arc<str> = Arc::from(from);
            let State {
                windows,
                next_seq,
                entries,
                held,
                unconfirmed,
                ..
            } = state;
            let window = match windows.get_mut(from) {
                Some(window) => window,
                None => windows.entry(from.to_owned()).or_default(),
            };
            let mut recorded: Vec<Pending> = Vec::new();
            let written = self.db.write_with(|batch| {
                for message in messages {
                    if message.seq < window.floor {
                        if !window.ids.contains(&message.id) {
                            tracing::debug!(%from, id = %message.id, "dropped a message older than the dedup window");
                        }
                        continue;
                    }
                    if !window.ids.insert(message.id) {
                        // A duplicate.
                        continue;
                    }
                    any = true;
                    window.order.push_back((message.id, message.seq));
                    if window.order.len() > DEDUP_WINDOW
                        && let Some((old, at)) = window.order.pop_front()
                    {
                        window.ids.remove(&old);
                        window.floor = window.floor.max(at);
                    }
                    // Overwrites the slot of the id pushed out of the window, if any.
                    let n = window.next;
                    window.next += 1;
                    records::seen_key(&mut key, from, slot(n));
                    batch.put_record(
                        Table::Seen,
                        &key,
                        &SeenRecord::V1 {
                            n,
                            id: *message.id.as_bytes(),
                            seq: message.seq,
                            floor: window.floor,
                        },
                    );
                    if keep == Keep::Hide {
                        continue;
                    }
                    let seq = *next_seq;
                    *next_seq += 1;
                    let table = if keep == Keep::Hold {
                        Table::Held
                    } else {
                        Table::Inbox
                    };
                    batch.put_record(
                        table,
                        &seq_key(seq),
                        &InboxRecordRef::V1 {
                            from,
                            id: *message.id.as_bytes(),
                            text: &message.body,
                            sent_at_ms: message.sent_at_ms,
                            offline,
                        },
                    );
                    if keep == Keep::Show
                        && let Some(history) = &self.history
                    {
                        history.record(
                            batch,
                            &mut recorded,
                            from,
                            message.id,
                            false,
                            &message.body,
                            message.sent_at_ms,
                        );
                    }
                    let entry = Entry {
                        from: sender.clone(),
                        id: message.id,
                        text: message.body,
                        sent_at_ms: message.sent_at_ms,
                        offline,
                        confirmed: false,
                    };
                    if keep == Keep::Hold {
                        held.insert(seq, entry);
                    } else {
                        entries.insert(seq, entry);
                        *unconfirmed += 1;
                        added = true;
                    }
                }
            });
            if !any {
                return Ok(None);
            }
            let written = written?;
            if let Some(history) = &self.history {
                history.keep(recorded);
            }
            if added {
                state.wake_pending = true;
                self.added.fetch_add(1, Ordering::Release);
            }
            written
        };
        Ok(Some(written))
    }

    /// Wakes the streams waiting for messages [`Inbox::accept`] added. Called after the
    /// acknowledgement is on its way, so that the application's task, woken, does not delay
    /// it (a woken task runs next on this worker).
    pub(crate) fn wake_readers(&self) {
        let wakers = {
            let mut state = self.state();
            if !std::mem::take(&mut state.wake_pending) {
                return;
            }
            self.added.fetch_add(1, Ordering::Release);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// The senders of held messages, with how many each, in name order.
    pub(crate) fn held_senders(&self) -> Vec<(String, usize)> {
        let state = self.state();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in state.held.values() {
            *counts.entry(&entry.from).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(from, n)| (from.to_owned(), n))
            .collect()
    }

    /// Whether any message from `from` is held.
    pub(crate) fn holds_from(&self, from: &str) -> bool {
        self.state().held.values().any(|e| *e.from == *from)
    }

    /// Forgets `from`'s held messages (the user blocked them). Their ids stay in the dedup
    /// window: they are not taken again.
    pub(crate) fn discard_held(&self, from: &str) -> Result<(), DbError> {
        let mut state = self.state();
        let held: Vec<u64> = state
            .held
            .iter()
            .filter(|(_, e)| *e.from == *from)
            .map(|(&seq, _)| seq)
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        self.db.write_with(|batch| {
            for seq in &held {
                batch.delete(Table::Held, &seq_key(*seq));
            }
        })?;
        for seq in held {
            state.held.remove(&seq);
        }
        Ok(())
    }

    /// The user trusts `from`'s new key: its held messages join the inbox, in order.
    pub(crate) fn release(&self, from: &str) -> Result<(), DbError> {
        let mut state = self.state();
        let held: Vec<u64> = state
            .held
            .iter()
            .filter(|(_, e)| *e.from == *from)
            .map(|(&seq, _)| seq)
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut moved = Vec::new();
        for old in held {
            let Some(entry) = state.held.remove(&old) else {
                continue;
            };
            let seq = state.next_seq;
            state.next_seq += 1;
            moved.push((old, seq, entry));
        }
        // In batches of at most WRITE_CHUNK_BYTES of text, each atomic: a crash between two
        // leaves the later ones held, as they were.
        let mut moved = moved.into_iter().peekable();
        let mut failed = None;
        while moved.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some((_, _, entry)) = moved.peek() {
                if !chunk.is_empty() && bytes + entry.text.len() > WRITE_CHUNK_BYTES {
                    break;
                }
                bytes += entry.text.len();
                chunk.extend(moved.next());
            }
            let mut recorded = Vec::new();
            let written = self.db.write_with(|batch| {
                for (old, seq, entry) in &chunk {
                    batch.delete(Table::Held, &seq_key(*old));
                    batch.put_record(Table::Inbox, &seq_key(*seq), &entry.record());
                    if let Some(history) = &self.history {
                        history.record(
                            batch,
                            &mut recorded,
                            from,
                            entry.id,
                            false,
                            &entry.text,
                            entry.sent_at_ms,
                        );
                    }
                }
            });
            match written {
                Ok(_) => {
                    if let Some(history) = &self.history {
                        history.keep(recorded);
                    }
                    for (_, seq, entry) in chunk {
                        state.entries.insert(seq, entry);
                        state.unconfirmed += 1;
                    }
                }
                Err(e) => {
                    // Still held, as before: this batch and the ones after it.
                    for (old, _, entry) in chunk.into_iter().chain(moved.by_ref()) {
                        state.held.insert(old, entry);
                    }
                    failed = Some(e);
                }
            }
        }
        self.added.fetch_add(1, Ordering::Release);
        for waker in state.wakers.drain(..) {
            waker.wake();
        }
        failed.map_or(Ok(()), Err)
    }

    /// The application confirms `id` from `from`: it leaves the inbox. `false` if no such
    /// message waits.
    pub(crate) fn confirm(&self, from: &str, id: MessageId) -> Result<bool, DbError> {
        let mut state = self.state();
        let Some(seq) = state
            .entries
            .iter()
            .find(|(_, e)| !e.confirmed && e.id == id && *e.from == *from)
            .map(|(&seq, _)| seq)
        else {
            return Ok(false);
        };
        self.confirm_seq(&mut state, seq)?;
        Ok(true)
    }

    fn confirm_seq(&self, state: &mut State, seq: u64) -> Result<(), DbError> {
        self.db
            .write_with(|batch| batch.delete(Table::Inbox, &seq_key(seq)))?;
        if let Some(entry) = state.entries.get_mut(&seq) {
            entry.confirmed = true;
            state.unconfirmed -= 1;
            if state.unconfirmed + 1 == MAX_UNCONFIRMED {
                self.room.notify_waiters();
            }
        }
        Self::trim(state);
        Ok(())
    }

    /// Forgets confirmed entries every stream has read.
    fn trim(state: &mut State) {
        let oldest_cursor = state.cursors.values().min().copied().unwrap_or(u64::MAX);
        while let Some(entry) = state.entries.first_entry() {
            if entry.get().confirmed && *entry.key() < oldest_cursor {
                entry.remove();
            } else {
                break;
            }
        }
    }

    /// A new reader of the inbox, starting at the oldest unconfirmed message.
    pub(crate) fn open_stream(self: &Arc<Self>) -> InboxStream {
        let mut state = self.state();
        let start = state
            .entries
            .iter()
            .find(|(_, e)| !e.confirmed)
            .map_or(state.next_seq, |(&seq, _)| seq);
        let stream = state.next_stream;
        state.next_stream += 1;
        state.cursors.insert(stream, start);
        InboxStream {
            inbox: self.clone(),
            stream,
            idle: None,
        }
    }
}

/// One stream's cursor over the inbox.
#[derive(Debug)]
pub(crate) struct InboxStream {
    inbox: Arc<Inbox>,
    stream: u64,
    /// The inbox's `added` count when this stream last found nothing, and the waker it left
    /// then: until either changes, there is nothing new to look for.
    idle: Option<(u64, Waker)>,
}

impl InboxStream {
    /// The next message for this stream, or `None` (and a wake-up registered) if there is
    /// none yet.
    pub(crate) fn poll(&mut self, waker: &Waker) -> Option<Event> {
        let inbox = &self.inbox;
        if let Some((added, left)) = &self.idle
            && *added == inbox.added.load(Ordering::Acquire)
            && left.will_wake(waker)
        {
            // Nothing joined since this stream found nothing, and its waker is still the
            // one registered.
            return None;
        }
        let mut state = inbox.state();
        let cursor = state.cursors.get(&self.stream).copied().unwrap_or(0);
        let next = state
            .entries
            .range(cursor..)
            .find(|(_, e)| inbox.confirm == Confirm::OnRead || !e.confirmed)
            .map(|(&seq, e)| (seq, e.confirmed));
        let Some((seq, confirmed)) = next else {
            if !state.wakers.iter().any(|w| w.will_wake(waker)) {
                state.wakers.push(waker.clone());
            }
            self.idle = Some((inbox.added.load(Ordering::Acquire), waker.clone()));
            return None;
        };
        self.idle = None;
        if inbox.confirm == Confirm::OnRead
            && !confirmed
            && let Err(e) = inbox.confirm_seq(&mut state, seq)
        {
            // Not recorded as read (the node stopped): it stays for the next start, and is
            // not handed out now.
            tracing::debug!(error = %chain(&e), "cannot record a message as read");
            return None;
        }
        // Read on read by the only stream, the entry is never handed out again (a new stream
        // starts after it): its text moves into the event rather than being copied.
        let last_reader = inbox.confirm == Confirm::OnRead && state.cursors.len() == 1;
        let event = match state.entries.get_mut(&seq) {
            Some(entry) if last_reader => entry.take_event(),
            Some(entry) => entry.event(),
            None => return None,
        };
        state.cursors.insert(self.stream, seq + 1);
        Inbox::trim(&mut state);
        Some(event)
    }
}

impl Drop for InboxStream {
    fn drop(&mut self) {
        let mut state = self.inbox.state();
        state.cursors.remove(&self.stream);
        Inbox::trim(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;
    use crate::node::Durability;

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn opened(seq: u64) -> Opened {
        Opened {
            id: MessageId::random(),
            sent_at_ms: 1,
            seq,
            body: format!("message {seq}"),
        }
    }

    /// A stream woken for a message it had already taken (it was polled for another reason
    /// in between) must still be woken for the next one: the lost wake-up that left a
    /// reader idle while messages piled up in the inbox.
    #[tokio::test]
    async fn a_stream_woken_for_a_message_it_already_read_is_woken_for_the_next() {
        let (db, _) = Db::open(None, Durability::Process).unwrap();
        let inbox = Arc::new(Inbox::load(
            db,
            Confirm::OnRead,
            None,
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        ));
        let mut stream = inbox.open_stream();
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        assert!(
            stream.poll(&waker).is_none(),
            "empty: the waker is registered"
        );

        inbox
            .accept("alice", vec![opened(1)], false, Keep::Show)
            .await
            .unwrap();
        // Polled (for another event) before the inbox wakes its readers: it takes the
        // message, then finds nothing and registers again.
        assert!(stream.poll(&waker).is_some());
        assert!(stream.poll(&waker).is_none());
        inbox.wake_readers();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        // Woken, it finds nothing new: it must stay registered.
        assert!(stream.poll(&waker).is_none());

        inbox
            .accept("alice", vec![opened(2)], false, Keep::Show)
            .await
            .unwrap();
        inbox.wake_readers();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            2,
            "the stream is woken for the second message"
        );
        assert!(stream.poll(&waker).is_some());
    }
}
