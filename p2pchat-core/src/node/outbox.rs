//! The outbox of one peer as a pure state machine: inputs in, actions out, no sockets, no
//! clock, no store. The link task (`link.rs`) feeds it what happened (a message queued, a
//! connection up or lost, an acknowledgement, a dial or store result, a tick) with the time,
//! and performs the actions it returns (dial, write, store, report an outcome). This split is
//! iroh-gossip's `proto` beside `net`: every decision about retries, order and expiry is
//! here and is tested without I/O (unit and property tests at the bottom).
//!
//! # Rules
//! - Messages leave in the order they were queued. A message written on a connection stays
//!   *in flight* until acknowledged; when the connection is lost it becomes *queued* again,
//!   in its place, and is written again on the next connection (the receiver drops what it
//!   already has by id).
//! - With no connection, queued messages cause a dial. A failed dial (or a failed dial
//!   within [`DIAL_BACKOFF`] before) sends them to the offline store, in order, as one batch.
//! - A store that fails leaves the messages queued; they are retried (dial first, then
//!   store) after a backoff with jitter that grows to [`MAX_RETRY_DELAY`], reset by success.
//! - A message whose expiry passes before it is delivered or stored leaves as expired; a
//!   message the peer refused (authenticated) leaves as failed. Nothing else ends a message.
//! - An acknowledgement that does not come within the ack timeout counts as a lost
//!   connection.
//! - Held (the peer's key changed and is not trusted): nothing is written, dialed or stored.

use std::collections::VecDeque;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::protocol::MessageId;

/// After a failed dial, messages go straight to the offline store for this long, unless the
/// directory says the peer came online. Default: 2 s.
pub(crate) const DIAL_BACKOFF: Duration = Duration::from_secs(2);

/// The first retry after a failure waits about this long (with jitter). Default: 200 ms.
pub(crate) const MIN_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Retries after repeated failures wait at most this long (with jitter). Default: 30 s.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Messages sent to one peer and not yet acknowledged before the link stops writing more.
/// Default: 4096.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Most messages in one store batch. Default: 256.
pub(crate) const STORE_BATCH: usize = 256;

/// Milliseconds on the caller's monotonic clock.
pub(crate) type Millis = u64;

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Waiting to be written or stored.
    Queued,
    /// Written on connection `conn`, not yet acknowledged.
    InFlight {
        /// The connection.
        conn: u64,
        /// When it was written.
        at: Millis,
    },
    /// Handed to the offline store, no answer yet.
    Storing,
}

/// How a message left the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The peer acknowledged it.
    Delivered,
    /// The offline store holds it.
    StoredOffline,
    /// Its expiry passed first.
    Expired,
    /// It cannot be delivered, for this reason (a sentence).
    Failed(String),
    /// The application cancelled it.
    Cancelled,
}

/// What the link must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Open a connection to the peer (look it up, dial, handshake), beside the loop; report
    /// [`Input::Connected`] or [`Input::DialFailed`].
    Dial,
    /// Write these messages on connection `conn`, in this order.
    Write {
        /// The connection.
        conn: u64,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Close connection `conn`: it stopped acknowledging.
    Close {
        /// The connection.
        conn: u64,
    },
    /// Put these messages in the offline store, in this order; report [`Input::Stored`].
    Store(Vec<MessageId>),
    /// These messages left the outbox so.
    Done {
        /// The messages.
        ids: Vec<MessageId>,
        /// How.
        outcome: Outcome,
    },
    /// These messages wait again, after a failure; they will be retried.
    Retrying {
        /// The messages.
        ids: Vec<MessageId>,
        /// What failed, as a sentence.
        reason: String,
    },
}

/// What a store attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreResult {
    /// All stored.
    Stored,
    /// Try again later (the store is unreachable, the mailbox is full).
    Retry(String),
    /// The store will never take them (it refuses this sender).
    Refused(String),
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// A connection is up and is now the current one.
    Connected {
        /// Its number (increasing).
        conn: u64,
    },
    /// Connection `conn` is gone.
    ConnectionLost {
        /// Its number.
        conn: u64,
    },
    /// A dial failed. `unknown` when the directory says nobody has the name.
    DialFailed {
        /// Why, as a sentence.
        reason: String,
        /// The name is not registered.
        unknown: bool,
    },
    /// The peer refused this message (an authenticated refusal).
    Rejected {
        /// The message.
        id: MessageId,
        /// Why.
        reason: String,
    },
    /// The answer to an [`Action::Store`].
    Stored {
        /// The messages of that action.
        ids: Vec<MessageId>,
        /// How it went.
        result: StoreResult,
    },
    /// The directory says the peer is online: dialing is worth trying now.
    PeerOnline,
    /// The peer asked to be dialed (connect-back): open a connection even with nothing
    /// queued, unless one is up or being opened.
    ConnectWanted,
    /// The peer's key changed: hold everything.
    Hold,
    /// The user trusts the peer's key: go on.
    Trusted,
    /// Time passed (the caller calls this at [`PeerOutbox::next_deadline`]).
    Tick,
    /// A reader settled acknowledgements ([`PeerOutbox::settle`]) while the link waited for
    /// room: write what waits.
    Settled,
    /// The node is stopping: no new dials; write what is queued on a live connection, and
    /// at `deadline` (or once nothing is in flight) store whatever is left.
    Shutdown {
        /// When to stop waiting for acknowledgements.
        deadline: Millis,
    },
}

/// One message in the outbox.
#[derive(Debug)]
pub(crate) struct Entry<P> {
    pub(crate) id: MessageId,
    pub(crate) expires_at: Millis,
    pub(crate) state: State,
    /// Times written to a connection or handed to the store.
    pub(crate) attempts: u32,
    /// What the link keeps with it (body, token, database key).
    pub(crate) payload: P,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    None,
    Dialing,
    Up(u64),
}

/// The outbox of one peer. `P` is what the link keeps with each message.
#[derive(Debug)]
pub(crate) struct PeerOutbox<P> {
    entries: VecDeque<Entry<P>>,
    conn: Conn,
    ack_timeout: Millis,
    /// Until then, queued messages are stored rather than dialed for.
    dial_after: Millis,
    /// After a failure, nothing is retried before this.
    retry_at: Millis,
    backoff: ExponentialBackoff,
    /// Consecutive failures since the last success.
    failures: u32,
    /// Something was acknowledged on the current connection.
    conn_useful: bool,
    held: bool,
    closing: Option<Millis>,
    /// Closing, a store attempt failed: what is queued stays for the next start.
    gave_up: bool,
    in_flight: usize,
    /// No entry before this index is queued: writes and expiry look from here, so a long
    /// outbox costs nothing per message.
    first_queued: usize,
    /// Entries being stored.
    storing: usize,
    /// Set when the last free in-flight slot was taken or when closing waits: a settled
    /// acknowledgement should wake the link.
    link_waiting: bool,
    /// A connection is wanted with nothing queued (connect-back); cleared by the next dial.
    connect_wanted: bool,
}

fn new_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(MIN_RETRY_DELAY)
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

fn ms(d: Duration) -> Millis {
    d.as_millis().try_into().unwrap_or(Millis::MAX)
}

impl<P> PeerOutbox<P> {
    /// An empty outbox whose connections time out after `ack_timeout` without an
    /// acknowledgement.
    pub(crate) fn new(ack_timeout: Duration) -> Self {
        Self {
            entries: VecDeque::new(),
            conn: Conn::None,
            ack_timeout: ms(ack_timeout).max(1),
            dial_after: 0,
            retry_at: 0,
            backoff: new_backoff(),
            failures: 0,
            conn_useful: false,
            held: false,
            closing: None,
            gave_up: false,
            in_flight: 0,
            first_queued: 0,
            storing: 0,
            link_waiting: false,
            connect_wanted: false,
        }
    }

    /// Adds a message, durable in the outbox and expiring at `expires_at`, with what the
    /// link keeps with it.
    pub(crate) fn queue(
        &mut self,
        now: Millis,
        id: MessageId,
        expires_at: Millis,
        payload: P,
        out: &mut Vec<Action>,
    ) {
        self.entries.push_back(Entry {
            id,
            expires_at,
            state: State::Queued,
            attempts: 0,
            payload,
        });
        self.progress(now, out);
    }

    /// The messages, oldest first.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry<P>> {
        self.entries.iter()
    }

    /// One message's payload.
    pub(crate) fn payload_mut(&mut self, id: MessageId) -> Option<&mut P> {
        self.position(id).map(|i| &mut self.entries[i].payload)
    }

    /// Every payload, for the link to rework (new tokens after a key change).
    pub(crate) fn payloads_mut(&mut self) -> impl Iterator<Item = &mut P> {
        self.entries.iter_mut().map(|e| &mut e.payload)
    }

    /// Messages written and not yet acknowledged.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages waiting to be written or stored.
    pub(crate) fn queued(&self) -> usize {
        self.entries.len() - self.in_flight - self.storing
    }

    /// Whether the link waits for an acknowledgement; clears the flag.
    pub(crate) fn take_link_waiting(&mut self) -> bool {
        std::mem::take(&mut self.link_waiting)
    }

    /// The shutdown is over: nothing is in flight or being stored (what is left stays in the
    /// outbox for the next start).
    pub(crate) fn is_stopped(&self) -> bool {
        self.closing.is_some()
            && self.conn != Conn::Dialing
            && (self.entries.is_empty()
                || (self.gave_up && self.entries.iter().all(|e| e.state == State::Queued)))
    }

    /// Cancels a message that has not left: `false` if it is in flight or being stored (or
    /// unknown).
    pub(crate) fn cancel(&mut self, id: MessageId, out: &mut Vec<Action>) -> bool {
        match self.position(id) {
            Some(i) if self.entries[i].state == State::Queued => {
                self.remove(i);
                out.push(Action::Done {
                    ids: vec![id],
                    outcome: Outcome::Cancelled,
                });
                true
            }
            _ => false,
        }
    }

    /// When to call [`Input::Tick`] next, if anything is time-dependent. Looks at the
    /// first queued and the oldest in-flight message only (messages are queued with
    /// expiries, and written, in order); a tick re-checks everything.
    pub(crate) fn next_deadline(&mut self) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut at = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        let first = self.first_queued();
        if let Some(i) = first {
            at(self.entries[i].expires_at);
            if !self.held && self.retry_at > 0 {
                at(self.retry_at);
            }
        }
        if let Some(State::InFlight { at: written, .. }) = self
            .entries
            .iter()
            .map(|e| e.state)
            .find(|s| matches!(s, State::InFlight { .. }))
        {
            at(written.saturating_add(self.ack_timeout));
        }
        if let Some(deadline) = self.closing {
            at(deadline);
        }
        next
    }

    /// The index of the first queued entry, if any.
    fn first_queued(&mut self) -> Option<usize> {
        while self.first_queued < self.entries.len()
            && self.entries[self.first_queued].state != State::Queued
        {
            self.first_queued += 1;
        }
        (self.first_queued < self.entries.len()).then_some(self.first_queued)
    }

    fn position(&self, id: MessageId) -> Option<usize> {
        // Acknowledgements mostly come oldest first; writes are of the newest.
        if self.entries.front().is_some_and(|e| e.id == id) {
            return Some(0);
        }
        self.entries.iter().rposition(|e| e.id == id)
    }

    fn remove(&mut self, i: usize) -> Option<Entry<P>> {
        let entry = self.entries.remove(i)?;
        if i < self.first_queued {
            self.first_queued -= 1;
        }
        if matches!(entry.state, State::InFlight { .. }) {
            self.in_flight -= 1;
        }
        Some(entry)
    }

    fn fail(&mut self, now: Millis) {
        if self.retry_at > now {
            // This round's failure is counted already: another of its batches failing must
            // not grow the backoff.
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.next().unwrap_or(MAX_RETRY_DELAY);
        self.retry_at = now.saturating_add(ms(delay)).max(1);
    }

    fn succeed(&mut self) {
        if self.failures > 0 {
            self.failures = 0;
            self.backoff = new_backoff();
        }
        self.retry_at = 0;
    }

    /// Everything in flight on `conn` waits again, in its place.
    fn requeue(&mut self, conn: u64) {
        self.first_queued = 0;
        for e in &mut self.entries {
            if matches!(e.state, State::InFlight { conn: c, .. } if c == conn) {
                e.state = State::Queued;
                self.in_flight -= 1;
            }
        }
    }

    /// Handles one input at time `now`, appending what to do to `out`.
    pub(crate) fn handle(&mut self, now: Millis, input: Input, out: &mut Vec<Action>) {
        match input {
            Input::Connected { conn } => {
                if let Conn::Up(old) = self.conn {
                    self.requeue(old);
                }
                self.conn = Conn::Up(conn);
                self.conn_useful = false;
                self.dial_after = 0;
            }
            Input::ConnectionLost { conn } => {
                if self.conn == Conn::Up(conn) {
                    self.conn = Conn::None;
                    self.requeue(conn);
                    // Dial again at once, once; if that fails the messages are stored. A
                    // peer that keeps accepting and dropping us is retried with backoff.
                    self.dial_after = 0;
                    if !self.conn_useful && self.entries.iter().any(|e| e.state == State::Queued) {
                        self.fail(now);
                    }
                }
            }
            Input::DialFailed { reason, unknown } => {
                if self.conn == Conn::Dialing {
                    self.conn = Conn::None;
                }
                self.dial_after = now.saturating_add(ms(DIAL_BACKOFF));
                if unknown {
                    let ids = self.take_queued();
                    if !ids.is_empty() {
                        out.push(Action::Done {
                            ids,
                            outcome: Outcome::Failed(reason),
                        });
                    }
                }
            }
            Input::Rejected { id, reason } => {
                if let Some(i) = self.position(id)
                    && matches!(self.entries[i].state, State::InFlight { .. })
                {
                    self.remove(i);
                    out.push(Action::Done {
                        ids: vec![id],
                        outcome: Outcome::Failed(reason),
                    });
                }
            }
            Input::Stored { ids, result } => self.on_stored(now, ids, result, out),
            Input::PeerOnline => {
                self.dial_after = 0;
                if self.retry_at > now {
                    self.retry_at = now.max(1);
                }
            }
            Input::ConnectWanted => self.connect_wanted = true,
            Input::Hold => self.held = true,
            Input::Trusted => {
                self.held = false;
                self.dial_after = 0;
                self.retry_at = 0;
            }
            Input::Settled => {}
            Input::Tick => {
                self.expire(now, out);
                if let Conn::Up(conn) = self.conn {
                    let overdue = self.entries.iter().any(|e| {
                        matches!(e.state, State::InFlight { conn: c, at }
                            if c == conn && now >= at.saturating_add(self.ack_timeout))
                    });
                    if overdue {
                        out.push(Action::Close { conn });
                        self.conn = Conn::None;
                        self.requeue(conn);
                        self.dial_after = 0;
                        self.fail(now);
                    }
                }
            }
            Input::Shutdown { deadline } => {
                self.closing = Some(deadline);
                self.link_waiting = true;
            }
        }
        self.progress(now, out);
    }

    /// Takes acknowledged messages out of flight; returns those that were in flight (an
    /// unknown id, acknowledged twice after a resend, is ignored). For a reader settling
    /// acknowledgements itself, beside the link.
    pub(crate) fn settle(&mut self, ids: &[MessageId]) -> Vec<MessageId> {
        let mut delivered = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(i) = self.position(id)
                && matches!(self.entries[i].state, State::InFlight { .. })
            {
                self.remove(i);
                delivered.push(id);
            }
        }
        if !delivered.is_empty() {
            self.conn_useful = true;
            self.succeed();
        }
        delivered
    }

    fn take_queued(&mut self) -> Vec<MessageId> {
        let mut ids = Vec::new();
        self.first_queued = 0;
        self.entries.retain(|e| {
            let queued = e.state == State::Queued;
            if queued {
                ids.push(e.id);
            }
            !queued
        });
        ids
    }

    fn on_stored(
        &mut self,
        now: Millis,
        ids: Vec<MessageId>,
        result: StoreResult,
        out: &mut Vec<Action>,
    ) {
        let mut mine = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(i) = self.position(id)
                && self.entries[i].state == State::Storing
            {
                mine.push((i, id));
            }
        }
        if mine.is_empty() {
            return;
        }
        self.storing -= mine.len();
        self.first_queued = 0;
        let done: std::collections::HashSet<MessageId> = mine.iter().map(|&(_, id)| id).collect();
        match result {
            StoreResult::Stored => {
                let ids: Vec<MessageId> = mine.iter().map(|&(_, id)| id).collect();
                self.entries
                    .retain(|e| !(e.state == State::Storing && done.contains(&e.id)));
                self.succeed();
                out.push(Action::Done {
                    ids,
                    outcome: Outcome::StoredOffline,
                });
            }
            StoreResult::Retry(reason) => {
                for &(i, _) in &mine {
                    self.entries[i].state = State::Queued;
                }
                self.fail(now);
                self.gave_up = self.closing.is_some();
                out.push(Action::Retrying {
                    ids: mine.into_iter().map(|(_, id)| id).collect(),
                    reason,
                });
            }
            StoreResult::Refused(reason) => {
                let ids: Vec<MessageId> = mine.iter().map(|&(_, id)| id).collect();
                self.entries
                    .retain(|e| !(e.state == State::Storing && done.contains(&e.id)));
                out.push(Action::Done {
                    ids,
                    outcome: Outcome::Failed(reason),
                });
            }
        }
    }

    /// Moves things along: expiry, then writes, dials or stores as the state allows.
    fn progress(&mut self, now: Millis, out: &mut Vec<Action>) {
        let first = self.first_queued();
        if first.is_some_and(|i| self.entries[i].expires_at <= now) {
            self.expire(now, out);
        }
        if self.held {
            return;
        }
        let first = self.first_queued();
        let queued = first.is_some();
        match self.conn {
            Conn::Up(conn) => {
                self.connect_wanted = false;
                let mut ids = Vec::new();
                // Order: nothing overtakes a message the store may hand back.
                let start = if self.storing > 0 {
                    0
                } else {
                    first.unwrap_or(self.entries.len())
                };
                for i in start..self.entries.len() {
                    if self.in_flight >= MAX_IN_FLIGHT {
                        self.link_waiting = true;
                        break;
                    }
                    let e = &mut self.entries[i];
                    if e.state == State::Storing {
                        break;
                    }
                    if e.state == State::Queued {
                        e.state = State::InFlight { conn, at: now };
                        e.attempts = e.attempts.saturating_add(1);
                        self.in_flight += 1;
                        ids.push(e.id);
                    }
                }
                if !ids.is_empty() {
                    out.push(Action::Write { conn, ids });
                }
                if let Some(deadline) = self.closing
                    && (self.in_flight == 0 || now >= deadline)
                {
                    // Done waiting: what is still unacknowledged goes to the store.
                    self.conn = Conn::None;
                    out.push(Action::Close { conn });
                    self.requeue(conn);
                    self.store_queued(out);
                }
            }
            Conn::Dialing => {}
            Conn::None if !queued && self.connect_wanted && self.closing.is_none() => {
                // Asked for by the peer, not for a message: no backoff applies.
                self.connect_wanted = false;
                self.conn = Conn::Dialing;
                out.push(Action::Dial);
            }
            Conn::None if !queued => {}
            Conn::None if self.closing.is_some() => {
                if !self.gave_up {
                    self.store_queued(out);
                }
            }
            Conn::None if now < self.retry_at && !self.connect_wanted => {}
            Conn::None => {
                // The wait after a failure (if any) is over.
                self.retry_at = 0;
                if now >= self.dial_after || std::mem::take(&mut self.connect_wanted) {
                    self.connect_wanted = false;
                    self.conn = Conn::Dialing;
                    out.push(Action::Dial);
                } else {
                    self.store_queued(out);
                }
            }
        }
    }

    /// Every queued message whose expiry has passed leaves.
    fn expire(&mut self, now: Millis, out: &mut Vec<Action>) {
        let expired: Vec<MessageId> = self
            .entries
            .iter()
            .filter(|e| e.state == State::Queued && e.expires_at <= now)
            .map(|e| e.id)
            .collect();
        if !expired.is_empty() {
            self.first_queued = 0;
            self.entries
                .retain(|e| !(e.state == State::Queued && e.expires_at <= now));
            out.push(Action::Done {
                ids: expired,
                outcome: Outcome::Expired,
            });
        }
    }

    /// Hands the next batch of queued messages to the store: one batch at a time, so that a
    /// long outbox does not flood the store (or the session it is reached over).
    fn store_queued(&mut self, out: &mut Vec<Action>) {
        if self.storing > 0 {
            return;
        }
        let mut batch = Vec::new();
        let start = self.first_queued().unwrap_or(self.entries.len());
        for e in self.entries.range_mut(start..) {
            if e.state == State::Queued {
                self.storing += 1;
                e.state = State::Storing;
                e.attempts = e.attempts.saturating_add(1);
                batch.push(e.id);
                if batch.len() == STORE_BATCH {
                    break;
                }
            }
        }
        if !batch.is_empty() {
            out.push(Action::Store(batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    const ACK: Duration = Duration::from_secs(10);
    const TTL: Millis = 60_000;

    /// The link, simulated: what the outbox asked for and has not been answered yet.
    #[derive(Default)]
    struct Harness {
        now: Millis,
        next_conn: u64,
        conn: Option<u64>,
        dialing: bool,
        /// Written on the current connection, not acknowledged, in write order.
        unacked: Vec<MessageId>,
        stores: Vec<Vec<MessageId>>,
        queued: Vec<(MessageId, Millis)>,
        done: HashMap<MessageId, Vec<Outcome>>,
        cancelled: HashSet<MessageId>,
        /// Every write, in order.
        writes: Vec<MessageId>,
    }

    impl Harness {
        fn apply(&mut self, outbox: &mut PeerOutbox<()>, out: Vec<Action>) {
            for action in out {
                match action {
                    Action::Dial => {
                        assert!(!self.dialing, "one dial at a time");
                        self.dialing = true;
                    }
                    Action::Write { conn, ids } => {
                        assert_eq!(Some(conn), self.conn, "writes go to the current connection");
                        for id in ids {
                            self.check_live(id);
                            self.unacked.push(id);
                            self.writes.push(id);
                        }
                    }
                    Action::Close { conn } => {
                        if self.conn == Some(conn) {
                            self.conn = None;
                            self.unacked.clear();
                        }
                    }
                    Action::Store(ids) => {
                        for &id in &ids {
                            self.check_live(id);
                        }
                        self.stores.push(ids);
                    }
                    Action::Done { ids, outcome } => {
                        for id in ids {
                            self.done.entry(id).or_default().push(outcome.clone());
                        }
                    }
                    Action::Retrying { .. } => {}
                }
            }
            let _ = outbox;
        }

        /// Nothing cancelled or expired is written or stored again.
        fn check_live(&self, id: MessageId) {
            assert!(
                !self.cancelled.contains(&id),
                "{id} sent after it was cancelled"
            );
            assert!(
                !self.done.contains_key(&id),
                "{id} sent after it left the outbox"
            );
            let expires = self.queued.iter().find(|(q, _)| *q == id).map(|(_, e)| *e);
            assert!(
                expires.is_some_and(|e| self.now < e),
                "{id} sent after its expiry"
            );
        }

        fn input(&mut self, outbox: &mut PeerOutbox<()>, input: Input) {
            let mut out = Vec::new();
            outbox.handle(self.now, input, &mut out);
            self.apply(outbox, out);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Queue,
        DialOk,
        DialFail,
        Lose,
        Ack(usize),
        StoreOk,
        StoreRetry,
        Reject(usize),
        Advance(u64),
        Cancel(usize),
        PeerOnline,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Queue),
            2 => Just(Op::DialOk),
            2 => Just(Op::DialFail),
            1 => Just(Op::Lose),
            3 => (1usize..8).prop_map(Op::Ack),
            2 => Just(Op::StoreOk),
            2 => Just(Op::StoreRetry),
            1 => (0usize..8).prop_map(Op::Reject),
            3 => (1u64..40_000).prop_map(Op::Advance),
            1 => (0usize..16).prop_map(Op::Cancel),
            1 => Just(Op::PeerOnline),
        ]
    }

    fn run(ops: &[Op]) -> Harness {
        let mut outbox = PeerOutbox::<()>::new(ACK);
        let mut h = Harness::default();
        for op in ops {
            match op.clone() {
                Op::Queue => {
                    let id = MessageId::random();
                    h.queued.push((id, h.now + TTL));
                    let mut out = Vec::new();
                    outbox.queue(h.now, id, h.now + TTL, (), &mut out);
                    h.apply(&mut outbox, out);
                }
                Op::DialOk if h.dialing => {
                    h.dialing = false;
                    h.next_conn += 1;
                    h.conn = Some(h.next_conn);
                    h.unacked.clear();
                    h.input(&mut outbox, Input::Connected { conn: h.next_conn });
                }
                Op::DialFail if h.dialing => {
                    h.dialing = false;
                    h.input(
                        &mut outbox,
                        Input::DialFailed {
                            reason: "down".into(),
                            unknown: false,
                        },
                    );
                }
                Op::Lose => {
                    if let Some(conn) = h.conn.take() {
                        h.unacked.clear();
                        h.input(&mut outbox, Input::ConnectionLost { conn });
                    }
                }
                Op::Ack(n) => {
                    let n = n.min(h.unacked.len());
                    let ids: Vec<MessageId> = h.unacked.drain(..n).collect();
                    let delivered = outbox.settle(&ids);
                    h.apply(
                        &mut outbox,
                        vec![Action::Done {
                            ids: delivered,
                            outcome: Outcome::Delivered,
                        }],
                    );
                    h.input(&mut outbox, Input::Tick);
                }
                Op::StoreOk | Op::StoreRetry if !h.stores.is_empty() => {
                    let ids = h.stores.remove(0);
                    let result = if matches!(op, Op::StoreOk) {
                        StoreResult::Stored
                    } else {
                        StoreResult::Retry("store down".into())
                    };
                    h.input(&mut outbox, Input::Stored { ids, result });
                }
                Op::Reject(i) if i < h.unacked.len() => {
                    let id = h.unacked.remove(i);
                    h.input(
                        &mut outbox,
                        Input::Rejected {
                            id,
                            reason: "refused".into(),
                        },
                    );
                }
                Op::Advance(ms) => {
                    h.now += ms;
                    h.input(&mut outbox, Input::Tick);
                }
                Op::Cancel(i) if i < h.queued.len() => {
                    let id = h.queued[i].0;
                    let mut out = Vec::new();
                    if outbox.cancel(id, &mut out) {
                        h.cancelled.insert(id);
                    }
                    h.apply(&mut outbox, out);
                }
                Op::PeerOnline => h.input(&mut outbox, Input::PeerOnline),
                _ => {}
            }
        }
        // Then the world heals: dials and stores succeed, the peer acknowledges everything.
        for _ in 0..200 {
            if h.dialing {
                h.dialing = false;
                h.next_conn += 1;
                h.conn = Some(h.next_conn);
                h.unacked.clear();
                h.input(&mut outbox, Input::Connected { conn: h.next_conn });
            }
            while !h.stores.is_empty() {
                let ids = h.stores.remove(0);
                h.input(
                    &mut outbox,
                    Input::Stored {
                        ids,
                        result: StoreResult::Stored,
                    },
                );
            }
            let ids: Vec<MessageId> = std::mem::take(&mut h.unacked);
            let delivered = outbox.settle(&ids);
            h.apply(
                &mut outbox,
                vec![Action::Done {
                    ids: delivered,
                    outcome: Outcome::Delivered,
                }],
            );
            h.now += 1_000;
            h.input(&mut outbox, Input::Tick);
            if outbox.entries().next().is_none() {
                break;
            }
        }
        assert!(outbox.entries().next().is_none(), "the outbox drained");
        h
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_message_ends_exactly_once_in_order_and_never_after_cancel_or_expiry(
            ops in proptest::collection::vec(op(), 1..120)
        ) {
            let h = run(&ops);
            for (id, _) in &h.queued {
                let outcomes = h.done.get(id).cloned().unwrap_or_default();
                prop_assert_eq!(outcomes.len(), 1, "one outcome for {}: {:?}", id, outcomes);
                if h.cancelled.contains(id) {
                    prop_assert_eq!(&outcomes[0], &Outcome::Cancelled);
                }
            }
            // Order: the first writes of the messages follow the order they were queued in.
            let order: HashMap<MessageId, usize> =
                h.queued.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
            let mut seen = HashSet::new();
            let firsts: Vec<usize> = h
                .writes
                .iter()
                .filter(|id| seen.insert(**id))
                .map(|id| order[id])
                .collect();
            prop_assert!(firsts.windows(2).all(|w| w[0] < w[1]), "first writes in order: {:?}", firsts);
        }
    }

    #[test]
    fn a_failed_dial_stores_and_a_failed_store_retries_after_a_backoff() {
        let mut outbox = PeerOutbox::<()>::new(ACK);
        let mut out = Vec::new();
        let id = MessageId::random();
        outbox.queue(0, id, TTL, (), &mut out);
        assert_eq!(out, [Action::Dial]);
        out.clear();
        outbox.handle(
            5,
            Input::DialFailed {
                reason: "refused".into(),
                unknown: false,
            },
            &mut out,
        );
        assert_eq!(out, [Action::Store(vec![id])]);
        out.clear();
        outbox.handle(
            6,
            Input::Stored {
                ids: vec![id],
                result: StoreResult::Retry("down".into()),
            },
            &mut out,
        );
        assert!(matches!(&out[..], [Action::Retrying { .. }]));
        out.clear();
        let retry_at = outbox.next_deadline().expect("a retry is scheduled");
        assert!(retry_at > 6, "not at once");
        outbox.handle(retry_at, Input::Tick, &mut out);
        assert!(
            matches!(&out[..], [Action::Dial] | [Action::Store(_)]),
            "tried again: {out:?}"
        );
    }

    #[test]
    fn an_unacknowledged_connection_is_closed_and_its_messages_written_again() {
        let mut outbox = PeerOutbox::<()>::new(ACK);
        let mut out = Vec::new();
        let (a, b) = (MessageId::random(), MessageId::random());
        outbox.queue(0, a, TTL, (), &mut out);
        outbox.handle(1, Input::Connected { conn: 1 }, &mut out);
        outbox.queue(2, b, TTL, (), &mut out);
        out.clear();
        outbox.handle(2 + ms(ACK), Input::Tick, &mut out);
        assert!(out.contains(&Action::Close { conn: 1 }), "{out:?}");
        out.clear();
        let at = outbox.next_deadline().expect("retry");
        outbox.handle(at, Input::Tick, &mut out);
        assert_eq!(out, [Action::Dial]);
        out.clear();
        outbox.handle(at, Input::Connected { conn: 2 }, &mut out);
        assert_eq!(
            out,
            [Action::Write {
                conn: 2,
                ids: vec![a, b]
            }],
            "in order"
        );
    }

    #[test]
    fn nothing_moves_while_held_and_everything_after_trust() {
        let mut outbox = PeerOutbox::<()>::new(ACK);
        let mut out = Vec::new();
        outbox.handle(0, Input::Hold, &mut out);
        let id = MessageId::random();
        outbox.queue(0, id, TTL, (), &mut out);
        assert!(out.is_empty(), "{out:?}");
        outbox.handle(1, Input::Trusted, &mut out);
        assert_eq!(out, [Action::Dial]);
    }

    #[test]
    fn beyond_the_in_flight_window_writing_resumes_as_acknowledgements_settle() {
        let mut outbox = PeerOutbox::<()>::new(ACK);
        let mut out = Vec::new();
        outbox.handle(0, Input::Connected { conn: 1 }, &mut out);
        let ids: Vec<MessageId> = (0..MAX_IN_FLIGHT + 10)
            .map(|_| MessageId::random())
            .collect();
        for &id in &ids {
            outbox.queue(0, id, TTL, (), &mut out);
        }
        let written = |out: &[Action]| -> usize {
            out.iter()
                .map(|a| match a {
                    Action::Write { ids, .. } => ids.len(),
                    _ => 0,
                })
                .sum()
        };
        assert_eq!(written(&out), MAX_IN_FLIGHT);
        assert!(outbox.take_link_waiting(), "the link waits for room");
        out.clear();
        assert_eq!(outbox.settle(&ids[..4]).len(), 4);
        outbox.handle(1, Input::Settled, &mut out);
        assert_eq!(
            out,
            [Action::Write {
                conn: 1,
                ids: ids[MAX_IN_FLIGHT..MAX_IN_FLIGHT + 4].to_vec()
            }]
        );
    }
}
