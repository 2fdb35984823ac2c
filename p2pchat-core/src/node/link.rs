//! One link per peer: the peer's outbox ([`PeerOutbox`], a pure state machine), the single
//! connection to the peer, and the task that does what cannot be done at once.
//!
//! The link's state sits under one lock (never held across an `.await`), and whoever has
//! something to tell the outbox performs its answer there and then: `send` queues a message
//! and frames it into the connection's write buffer, a connection's reader settles
//! acknowledgements and frames its own acknowledgements, refusals and pongs. Nobody hands a
//! message to another task on the way to the socket. What takes time is left to the link's
//! task: dials and store calls (beside its loop, so a dial waiting on the directory or a
//! handshake never stalls anything), a flush the socket would make wait, timers (expiry,
//! acknowledgement timeouts, pings) and closing.
//!
//! Writes are buffered: a frame is encoded into the connection's buffer, and the buffer is
//! written when the writer has nothing more at hand (the reader at the end of a batch, the
//! task once `send`s stop coming), without waiting: whatever the socket does not take at
//! once, the task writes as it drains. So a burst of sends costs one system call per
//! buffer, and one message alone is on the wire at the task's next turn.

use parking_lot::{Mutex, MutexGuard};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Encoder;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::handshake::{self, FrameReader, FrameWriter};
use super::outbox::{Action, Input, Millis, Outcome, PeerOutbox, State as EntryState, StoreResult};
use super::{HANDSHAKE_TIMEOUT, OutboxEntry, OutboxState, SHUTDOWN_GRACE, Shared};
use crate::crypto::{PairKey, PayloadRef};
use crate::discovery::{DiscoverySession, PeerRecord};
use crate::error::{Cause, chain};
use crate::event::Event;
use crate::identity::PublicKey;
use crate::protocol::{FrameCodec, MAX_ACK_BATCH, MessageFrame, MessageId, PeerFrame};
use crate::store::{StoreError, StoredMessage};
use crate::transport::WriteHalf;

pub use super::outbox::MAX_IN_FLIGHT;

/// Messages queued for one peer, beyond the [`MAX_IN_FLIGHT`] unacknowledged ones, before
/// `send` waits for the peer to catch up. Default: 1024.
pub const LINK_QUEUE_CAPACITY: usize = 1024;

/// Frames a reader processes before recording them and acknowledging. Default: 256.
const READ_BATCH: usize = 256;

/// An idle connection is probed this often. Default: 15 s.
const PING_INTERVAL: Duration = Duration::from_secs(15);

/// Longest a store call may take before it counts as failed (and is retried). Default: 30 s.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// A `send` that finds this much in the write buffer writes it itself rather than leave it
/// for the link's task: a fast sender fills a buffer faster than a task hand-off per buffer
/// pays. Default: 32 KiB.
const WRITE_NOW: usize = 32 << 10;

/// A connection's write buffer larger than this is released once it is written out, so a
/// burst does not pin its memory. Default: 256 KiB.
const KEEP_WRITE_BUFFER: usize = 256 << 10;

/// A message for the link, as the outbox holds it.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) id: MessageId,
    pub(crate) body: String,
    pub(crate) sent_at_ms: u64,
    /// The sender's sequence number ([`crate::crypto::Payload::seq`]).
    pub(crate) seq: u64,
    /// Wall-clock Unix milliseconds when it expires undelivered.
    pub(crate) expires_at_ms: u64,
    /// Wall-clock Unix milliseconds when `send` queued it.
    pub(crate) queued_at_ms: u64,
}

/// An authenticated connection, fresh from its handshake.
pub(crate) struct Established {
    pub(crate) reader: FrameReader,
    pub(crate) writer: FrameWriter,
    /// The key the peer proved in the handshake.
    pub(crate) key: PublicKey,
    /// Through the directory's relay, not direct.
    pub(crate) relayed: bool,
}

/// How long a node that asked a peer to dial it back waits for the connection before it
/// tries the directory's relay. Default: 2 s.
pub const CONNECT_BACK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a dial came to.
enum Dialed {
    /// A connection we opened (direct or relayed).
    Opened(Box<Established>),
    /// The peer connected to us meanwhile (connect-back): it is adopted already.
    CameIn,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Established")
    }
}

/// A cheap handle to one peer's link.
#[derive(Debug, Clone)]
pub(crate) struct LinkHandle {
    core: Arc<Core>,
}

/// What the link keeps with each message in the outbox.
#[derive(Debug)]
struct Payload {
    body: String,
    sent_at_ms: u64,
    seq: u64,
    queued_at_ms: u64,
    expires_at_ms: u64,
    /// Sealed on first use, kept for resends and the store; dropped when the key changes.
    token: Option<String>,
}

/// Why a dial did not give a connection.
struct DialFailure {
    reason: String,
    /// The directory says nobody has the name.
    unknown: bool,
    /// The directory has another key than the pinned one: (pinned, new).
    key_changed: Option<(PublicKey, PublicKey)>,
}

type StoreJob = futures::future::BoxFuture<'static, (Vec<MessageId>, Vec<Result<(), StoreError>>)>;

/// The connection to the peer: its write side, and its reader's task.
struct Conn {
    id: u64,
    io: WriteHalf,
    /// Encoded frames the socket has not taken yet.
    buf: BytesMut,
    codec: FrameCodec<PeerFrame>,
    /// Since when the buffer has waited for the socket.
    blocked_since: Option<Instant>,
    _reader: AbortOnDropHandle<()>,
    dialed_by_me: bool,
    relayed: bool,
    ping: Option<(u64, Instant)>,
    last_ping: Instant,
}

impl Conn {
    /// Encodes a frame into the write buffer.
    fn feed(&mut self, frame: &PeerFrame) {
        if let Err(e) = self.codec.encode(frame, &mut self.buf) {
            // Our own frames always fit (tokens and ack batches are bounded).
            tracing::warn!(error = %chain(&e), "cannot encode a frame");
        }
    }

    /// Encodes a message frame with its (kept) token into the write buffer.
    fn feed_message(&mut self, id: MessageId, token: &str) {
        let frame = MessageFrame::Message { id, token };
        if let Err(e) = self.codec.encode(&frame, &mut self.buf) {
            tracing::warn!(error = %chain(&e), "cannot encode a message frame");
        }
    }

    /// Writes the buffer until it is empty (ready) or the socket would wait (pending, the
    /// waker registered).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.buf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.buf.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.blocked_since.get_or_insert_with(Instant::now);
                    return Poll::Pending;
                }
            }
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                self.blocked_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
        }
        self.blocked_since = None;
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// The link's state: everything under the lock.
struct State {
    outbox: PeerOutbox<Payload>,
    /// The pinned key; `None` until the directory has told us (a first message queued
    /// while it was unreachable).
    key: Option<PublicKey>,
    pair: Option<PairKey>,
    conn: Option<Conn>,
    next_conn: u64,
    /// Dials and stores the outbox asked for, for the task to start, in order.
    deferred: Vec<Action>,
    /// The write buffer holds frames for the task to write (the socket would have waited,
    /// or nobody else is about to write).
    flush_wanted: bool,
    /// The outbox deadline the task sleeps until.
    armed: Option<Millis>,
    /// `shutdown` calls waiting for the link to close.
    closers: Vec<oneshot::Sender<()>>,
    /// Closing was asked for and the task has not started it yet.
    close_requested: bool,
    /// The task has started closing.
    closing: bool,
    /// A `send` waits for the backlog to shrink.
    send_waiting: bool,
}

impl State {
    /// Whether a `send` must wait: the peer has [`MAX_IN_FLIGHT`] unacknowledged messages
    /// and [`LINK_QUEUE_CAPACITY`] more queued behind them.
    fn full(&self) -> bool {
        self.outbox.in_flight() >= MAX_IN_FLIGHT && self.outbox.queued() >= LINK_QUEUE_CAPACITY
    }
}

/// What the handle, the readers and the task share.
struct Core {
    shared: Arc<Shared>,
    peer: String,
    /// The link's clock starts here (the outbox counts milliseconds from it).
    epoch: Instant,
    state: Mutex<State>,
    /// Wakes the task: something only it can do (a dial, a store, a flush, a new deadline,
    /// closing).
    wake: Notify,
    /// Wakes `send`s waiting for room.
    room: Notify,
    /// The task has ended: messages queued from now on wait in the database for the next
    /// start.
    stopped: AtomicBool,
    /// The id of the latest adopted connection: a dial that asked the peer to connect back
    /// waits for it to change.
    adopted: tokio::sync::watch::Sender<u64>,
    /// An attempt to replace a relayed connection by a direct one.
    upgrade: Mutex<Option<AbortOnDropHandle<()>>>,
    span: tracing::Span,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Starts the link to `peer`, whose pinned key is `key` (if known yet).
pub(crate) fn spawn(shared: Arc<Shared>, peer: String, key: Option<PublicKey>) -> LinkHandle {
    let span = tracing::info_span!("link", me = %shared.me(), peer = %peer);
    let pair = key.and_then(|key| shared.pair_key(&key).ok());
    let outbox = PeerOutbox::new(shared.config.ack_timeout);
    let core = Arc::new(Core {
        shared: shared.clone(),
        peer,
        epoch: Instant::now(),
        state: Mutex::new(State {
            outbox,
            key,
            pair,
            conn: None,
            next_conn: 0,
            deferred: Vec::new(),
            flush_wanted: false,
            armed: None,
            closers: Vec::new(),
            close_requested: false,
            closing: false,
            send_waiting: false,
        }),
        wake: Notify::new(),
        room: Notify::new(),
        stopped: AtomicBool::new(false),
        adopted: tokio::sync::watch::Sender::new(0),
        upgrade: Mutex::new(None),
        span: span.clone(),
    });
    shared.spawn(run(core.clone()).instrument(span));
    LinkHandle { core }
}

impl LinkHandle {
    /// Whether the link has stopped (the node is shutting down).
    pub(crate) fn is_closed(&self) -> bool {
        self.core.stopped.load(Ordering::Acquire)
    }

    /// Queues a message, durable in the outbox already, and writes it if a connection is
    /// up. Waits while the peer is [`LINK_QUEUE_CAPACITY`] messages behind its in-flight
    /// window.
    pub(crate) async fn queue(&self, msg: Outgoing) {
        let core = &self.core;
        loop {
            let room = core.room.notified();
            tokio::pin!(room);
            {
                let mut st = core.lock();
                if !st.full() || core.stopped.load(Ordering::Acquire) {
                    core.push(&mut st, msg, true);
                    break;
                }
                st.send_waiting = true;
                room.as_mut().enable();
            }
            room.await;
        }
        // A long run of sends yields now and then, so the task (and the peer's reader, on
        // this worker) get their turn.
        tokio::task::consume_budget().await;
    }

    /// Queues a message without waiting (messages restored at start).
    pub(crate) fn queue_now(&self, msg: Outgoing) {
        let mut st = self.core.lock();
        self.core.push(&mut st, msg, false);
    }

    /// An authenticated connection the peer opened to us.
    pub(crate) fn inbound(&self, est: Established) {
        let core = &self.core;
        let mut st = core.lock();
        core.adopt(&mut st, est, false);
        core.after(&mut st);
    }

    /// The directory says the peer is online (perhaps at a new address): dialing is worth
    /// trying again, and a relayed connection may become direct.
    pub(crate) fn peer_online(&self) {
        self.core.input(Input::PeerOnline);
        self.upgrade();
    }

    /// How the link is connected now.
    pub(crate) fn path(&self) -> Option<super::PeerPath> {
        self.core.lock().conn.as_ref().map(|c| {
            if c.relayed {
                super::PeerPath::Relayed
            } else {
                super::PeerPath::Direct
            }
        })
    }

    /// The peer asks us to dial it (it cannot be dialed; connect-back): a connection is
    /// opened even with nothing to send.
    pub(crate) fn connect_now(&self) {
        let core = &self.core;
        let mut st = core.lock();
        match st.conn.as_ref().map(|c| (c.id, c.relayed)) {
            // The peer asks while it has a relayed connection to us: it wants a direct one
            // beside it, which replaces the relay once it is up.
            Some((_, true)) => {
                drop(st);
                core.start_upgrade_dial();
                return;
            }
            // It asks only when it has no direct connection to us: one we still hold is
            // dead on its side.
            Some((id, false)) => core.lost(&mut st, id, "the peer asked to be dialed back"),
            None => {}
        }
        core.handle(&mut st, Input::ConnectWanted);
        core.after(&mut st);
    }

    /// If the connection is relayed, tries to open a direct one beside it (dialing the
    /// peer, or asking it to dial us back); the direct one replaces it, and what was in
    /// flight on the relay is written again on it (the peer drops what it has by id).
    pub(crate) fn upgrade(&self) {
        let core = &self.core;
        if !core.lock().conn.as_ref().is_some_and(|c| c.relayed) {
            return;
        }
        core.start_upgrade(upgrade_task(core.clone()));
    }

    /// The directory is back after an outage: what waits for a retry goes now (a dial, or
    /// the store).
    pub(crate) fn retry_now(&self) {
        self.core.input(Input::PeerOnline);
    }

    /// The peer's key changed: hold messages until trusted.
    pub(crate) fn hold(&self) {
        self.core.input(Input::Hold);
    }

    /// The user trusts this new key.
    pub(crate) fn trusted(&self, key: PublicKey) {
        let core = &self.core;
        let pair = match core.shared.pair_key(&key) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(peer = %core.peer, error = %e, "cannot use the trusted key");
                return;
            }
        };
        let mut st = core.lock();
        st.key = Some(key);
        core.drop_conn(&mut st);
        st.pair = Some(pair);
        // Tokens sealed under the old key are of no use to the peer now.
        for payload in st.outbox.payloads_mut() {
            payload.token = None;
        }
        core.handle(&mut st, Input::Trusted);
        core.after(&mut st);
    }

    /// Drops the connection (the peer was blocked).
    pub(crate) fn disconnect(&self) {
        let core = &self.core;
        let mut st = core.lock();
        core.drop_conn(&mut st);
        core.after(&mut st);
    }

    /// Cancels a message not yet sent; whether it was.
    pub(crate) fn cancel(&self, id: MessageId) -> bool {
        let core = &self.core;
        let mut st = core.lock();
        let mut actions = Vec::new();
        let cancelled = st.outbox.cancel(id, &mut actions);
        core.perform(&mut st, actions);
        core.after(&mut st);
        cancelled
    }

    /// The messages waiting for this peer.
    pub(crate) fn list(&self) -> Vec<OutboxEntry> {
        let st = self.core.lock();
        st.outbox
            .entries()
            .map(|e| OutboxEntry {
                id: e.id,
                to: self.core.peer.clone(),
                state: match e.state {
                    EntryState::Queued => OutboxState::Queued,
                    EntryState::InFlight { .. } => OutboxState::Sent,
                    EntryState::Storing => OutboxState::Storing,
                },
                attempts: e.attempts,
                queued_at: std::time::UNIX_EPOCH + Duration::from_millis(e.payload.queued_at_ms),
            })
            .collect()
    }

    /// Sends what is queued, waits a little for acknowledgements, stores the rest offline,
    /// and stops the link.
    pub(crate) async fn shutdown(&self) {
        let core = &self.core;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = core.lock();
            if core.stopped.load(Ordering::Acquire) {
                return;
            }
            st.closers.push(tx);
            st.close_requested = true;
        }
        core.wake.notify_one();
        let _ = rx.await;
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn now(&self) -> Millis {
        self.epoch
            .elapsed()
            .as_millis()
            .try_into()
            .unwrap_or(Millis::MAX)
    }

    /// The outbox's milliseconds at `wall_ms` after `now` (wall-clock Unix milliseconds at
    /// `now`) for a wall-clock Unix time.
    fn mono(now: Millis, wall_ms: u64, unix_ms: u64) -> Millis {
        now.saturating_add(unix_ms.saturating_sub(wall_ms))
            .saturating_sub(wall_ms.saturating_sub(unix_ms))
    }

    /// One input, performed at once.
    fn input(&self, input: Input) {
        let mut st = self.lock();
        self.handle(&mut st, input);
        self.after(&mut st);
    }

    /// Queues a message in the outbox and performs what follows. `fresh`: `send` queued it
    /// just now (its queued-at time is the wall clock's now).
    fn push(&self, st: &mut State, msg: Outgoing, fresh: bool) {
        let now = self.now();
        let wall_ms = if fresh {
            msg.queued_at_ms
        } else {
            super::unix_ms_now()
        };
        let expires_at = Self::mono(now, wall_ms, msg.expires_at_ms);
        // Nothing unacknowledged: nothing else is on its way either, so this message goes
        // out at once (Nagle's rule); otherwise it joins the buffer the task writes.
        let idle = st.outbox.in_flight() == 0;
        let mut actions = Vec::new();
        st.outbox.queue(
            now,
            msg.id,
            expires_at,
            Payload {
                body: msg.body,
                sent_at_ms: msg.sent_at_ms,
                seq: msg.seq,
                queued_at_ms: msg.queued_at_ms,
                expires_at_ms: msg.expires_at_ms,
                token: None,
            },
            &mut actions,
        );
        self.perform(st, actions);
        let full = st.conn.as_ref().is_some_and(|c| c.buf.len() >= WRITE_NOW);
        if idle || full {
            self.write_now(st);
        }
        // Otherwise the task writes the buffer at its next turn, by which time more sends
        // may have joined it.
        self.after(st);
    }

    /// Feeds the outbox an input and performs its answer.
    fn handle(&self, st: &mut State, input: Input) {
        let mut actions = Vec::new();
        st.outbox.handle(self.now(), input, &mut actions);
        self.perform(st, actions);
    }

    /// Performs the outbox's actions: writes, outcomes and closes at once, dials and stores
    /// left to the task.
    fn perform(&self, st: &mut State, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Dial | Action::Store(_) => st.deferred.push(action),
                Action::Write { conn, ids } => self.write_messages(st, conn, &ids),
                Action::Close { conn } => {
                    if st.conn.as_ref().is_some_and(|c| c.id == conn) {
                        tracing::debug!(peer = %self.peer, "no acknowledgement in time; closing");
                        st.conn = None;
                    }
                }
                Action::Done { ids, outcome } => self.shared.settle_sent(&self.peer, &ids, outcome),
                Action::Retrying { ids, reason } => {
                    for id in ids {
                        self.shared.emit(Event::Queued {
                            id,
                            to: self.peer.clone(),
                            retry: Some(reason.clone()),
                        });
                    }
                }
            }
        }
    }

    /// After a change: lets waiting `send`s go on if there is room, and wakes the task if it
    /// has something to do (a dial or a store, frames to write, an earlier deadline, the
    /// end of closing).
    fn after(&self, st: &mut State) {
        if st.send_waiting && !st.full() {
            st.send_waiting = false;
            self.room.notify_waiters();
        }
        let deadline = st.outbox.next_deadline();
        let earlier = match (deadline, st.armed) {
            (Some(at), Some(armed)) => at < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let has_frames = st.conn.as_ref().is_some_and(|c| !c.buf.is_empty());
        let flush = has_frames && !st.flush_wanted;
        st.flush_wanted |= has_frames;
        if flush
            || earlier
            || !st.deferred.is_empty()
            || st.close_requested
            || (st.closing && st.outbox.is_stopped())
        {
            if earlier {
                st.armed = deadline;
            }
            self.wake.notify_one();
        }
    }

    /// Writes the buffer without waiting, now: the reader, at the end of a batch. What the
    /// socket does not take is left to the task.
    fn write_now(&self, st: &mut State) {
        let Some(conn) = st.conn.as_mut() else {
            return;
        };
        if conn.buf.is_empty() {
            return;
        }
        let id = conn.id;
        match conn.poll_write_out(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => self.lost(st, id, &format!("write failed: {}", chain(&e))),
            // The no-op waker took the socket's wake-up: the task polls again with its own
            // (`after` wakes it, since the buffer is not empty).
            Poll::Pending => st.flush_wanted = false,
        }
    }

    /// Seals (once) and frames messages on connection `conn`, in order.
    fn write_messages(&self, st: &mut State, conn: u64, ids: &[MessageId]) {
        let State {
            outbox,
            conn: c,
            pair,
            ..
        } = st;
        let (Some(c), Some(pair)) = (c.as_mut(), pair.as_ref()) else {
            return;
        };
        if c.id != conn {
            // The connection is gone already: its loss re-queued them.
            return;
        }
        for &id in ids {
            let Some(payload) = outbox.payload_mut(id) else {
                continue;
            };
            let token = seal(&self.shared, pair, &self.peer, id, payload);
            c.feed_message(id, token);
        }
        self.shared.emit_all(ids.iter().map(|&id| Event::Sent {
            id,
            to: self.peer.clone(),
        }));
    }

    /// The tokens of these messages (sealed once, kept for resends and the store) with
    /// their expiry; none before the peer's key is known.
    fn sealed(&self, st: &mut State, ids: &[MessageId]) -> Vec<(MessageId, String, u64)> {
        let Some(pair) = st.pair.as_ref() else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|&id| {
                let payload = st.outbox.payload_mut(id)?;
                let token = seal(&self.shared, pair, &self.peer, id, payload).to_owned();
                Some((id, token, payload.expires_at_ms))
            })
            .collect()
    }

    /// Connection `conn` is gone (if it is still the current one); what it had in flight
    /// waits again.
    fn lost(&self, st: &mut State, conn: u64, reason: &str) {
        if st.conn.as_ref().is_some_and(|c| c.id == conn) {
            tracing::debug!(peer = %self.peer, %reason, "connection lost");
            st.conn = None;
            st.flush_wanted = false;
            self.handle(st, Input::ConnectionLost { conn });
        }
    }

    /// Drops the connection; what it had in flight waits again.
    fn drop_conn(&self, st: &mut State) {
        if let Some(id) = st.conn.as_ref().map(|c| c.id) {
            self.lost(st, id, "dropped");
        }
    }

    /// Takes a new authenticated connection. With one already open, both ends keep the one
    /// dialed by the side with the smaller key (or the newer, if one side dialed both), so
    /// simultaneous dials converge on one connection per pair.
    fn adopt(self: &Arc<Self>, st: &mut State, est: Established, dialed_by_me: bool) {
        if st.key.is_none() {
            // First sight (the directory had been unreachable when the message was queued).
            st.key = Some(est.key);
            st.pair = self.shared.pair_key(&est.key).ok();
        }
        // A key the user has not trusted (it changed): talk, but hold both ways.
        let untrusted = st.key != Some(est.key);
        let pair = match self.shared.pair_key(&est.key) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "unusable key");
                return;
            }
        };
        if untrusted {
            self.handle(st, Input::Hold);
        }
        if let Some(existing) = &st.conn {
            let me_smaller = self.shared.identity.public_key().to_bytes() < est.key.to_bytes();
            // One side opened both: the newer wins (that side found the older one dead). One
            // each (both dialed at once, or the one who could not dial was dialed back): a
            // direct one over a relayed one, else the one dialed by the smaller key. Both
            // ends choose the same.
            let keep_existing = if existing.dialed_by_me == dialed_by_me {
                false
            } else if existing.relayed != est.relayed {
                !existing.relayed
            } else {
                existing.dialed_by_me == me_smaller
            };
            if keep_existing {
                return;
            }
        }
        st.next_conn += 1;
        let id = st.next_conn;
        // Frames the handshake left unwritten (none, normally) go first.
        let buf = BytesMut::from(&est.writer.write_buffer()[..]);
        let io = est.writer.into_inner();
        // The reader tags acknowledgements and refusals with the pair key of the key this
        // connection's peer proved (it differs from the link's while untrusted).
        let reader = self.shared.spawn(
            read_loop(self.clone(), id, pair, untrusted, est.reader).instrument(self.span.clone()),
        );
        st.conn = Some(Conn {
            id,
            io,
            buf,
            codec: FrameCodec::default(),
            blocked_since: None,
            _reader: AbortOnDropHandle::new(reader),
            dialed_by_me,
            relayed: est.relayed,
            ping: None,
            last_ping: Instant::now(),
        });
        // Whatever was in flight on an old connection goes again on this one; the peer
        // drops what it already has by id.
        self.handle(st, Input::Connected { conn: id });
        self.adopted.send_replace(id);
        tracing::debug!(conn = id, relayed = est.relayed, dialed_by_me, "connected");
    }

    /// Writes the buffer for the task: ready when it is empty (or there is no connection).
    fn poll_write_out(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        let Some(conn) = st.conn.as_mut() else {
            st.flush_wanted = false;
            return Poll::Ready(());
        };
        let id = conn.id;
        match conn.poll_write_out(cx) {
            Poll::Ready(Ok(())) => st.flush_wanted = false,
            Poll::Ready(Err(e)) => {
                self.lost(&mut st, id, &format!("write failed: {}", chain(&e)));
                self.after(&mut st);
            }
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(())
    }

    fn on_dialed(self: &Arc<Self>, dialed: Option<Result<Dialed, DialFailure>>) {
        let mut st = self.lock();
        match dialed {
            Some(Ok(Dialed::Opened(est))) => self.adopt(&mut st, *est, true),
            Some(Ok(Dialed::CameIn)) if st.conn.is_some() => {}
            Some(Ok(Dialed::CameIn)) => self.handle(
                &mut st,
                Input::DialFailed {
                    reason: format!("{}'s connection back closed at once", self.peer),
                    unknown: false,
                },
            ),
            Some(Err(failure)) => {
                tracing::debug!(peer = %self.peer, reason = %failure.reason, "dial failed");
                if let Some((pinned, new)) = failure.key_changed {
                    self.shared.key_changed(&self.peer, &pinned, &new);
                    self.handle(&mut st, Input::Hold);
                }
                self.handle(
                    &mut st,
                    Input::DialFailed {
                        reason: failure.reason,
                        unknown: failure.unknown,
                    },
                );
            }
            None => self.handle(
                &mut st,
                Input::DialFailed {
                    reason: "the dial was cancelled".into(),
                    unknown: false,
                },
            ),
        }
        self.after(&mut st);
    }

    fn on_stored(&self, ids: Vec<MessageId>, results: Vec<Result<(), StoreError>>) {
        let mut stored = Vec::new();
        let mut retry: Vec<(MessageId, StoreError)> = Vec::new();
        let mut refused: Vec<(MessageId, StoreError)> = Vec::new();
        for (i, id) in ids.into_iter().enumerate() {
            match results
                .get(i)
                .cloned()
                .unwrap_or_else(|| Err(StoreError::unavailable("the store gave no answer")))
            {
                Ok(()) => stored.push(id),
                // A quota refusal is not final: the message waits in our outbox (on our
                // disk, not the server's), the sender is told which limit (`Queued` with
                // the sentence), and it goes when the recipient has drained or comes
                // online, or expires. Nothing is lost to a full mailbox.
                Err(e @ (StoreError::Unavailable(_) | StoreError::QuotaExceeded { .. })) => {
                    retry.push((id, e))
                }
                Err(e) => refused.push((id, e)),
            }
        }
        let mut st = self.lock();
        if !stored.is_empty() {
            self.handle(
                &mut st,
                Input::Stored {
                    ids: stored,
                    result: StoreResult::Stored,
                },
            );
        }
        if let Some((_, e)) = retry.first() {
            let reason = format!(
                "{} cannot be reached and the offline store failed ({}); will retry",
                self.peer,
                chain(e)
            );
            self.handle(
                &mut st,
                Input::Stored {
                    ids: retry.iter().map(|(id, _)| *id).collect(),
                    result: StoreResult::Retry(reason),
                },
            );
        }
        for (id, e) in refused {
            self.handle(
                &mut st,
                Input::Stored {
                    ids: vec![id],
                    result: StoreResult::Refused(format!(
                        "the offline store refused the message: {}",
                        chain(&e)
                    )),
                },
            );
        }
        self.after(&mut st);
    }

    /// Probes an idle connection, and gives up on one whose probe went unanswered.
    fn on_ping(&self) {
        let now = Instant::now();
        let timeout = self.shared.config.ack_timeout;
        let mut st = self.lock();
        let idle = st
            .outbox
            .entries()
            .all(|e| !matches!(e.state, EntryState::InFlight { .. }));
        let Some(conn) = st.conn.as_mut() else {
            return;
        };
        if let Some((_, sent)) = conn.ping {
            if now.duration_since(sent) >= timeout {
                let id = conn.id;
                self.lost(&mut st, id, "no answer to ping");
            }
        } else if idle && now.duration_since(conn.last_ping) >= PING_INTERVAL {
            let n: u64 = rand::random();
            conn.ping = Some((n, now));
            conn.last_ping = now;
            conn.feed(&PeerFrame::Ping(n));
        }
        self.after(&mut st);
    }

    /// Starts closing: no new dials; what is queued is written or stored.
    fn start_closing(&self, dial: &mut Option<AbortOnDropHandle<Result<Dialed, DialFailure>>>) {
        let mut st = self.lock();
        st.close_requested = false;
        if st.closing {
            return;
        }
        st.closing = true;
        *dial = None;
        if st.outbox.entries().any(|e| e.state == EntryState::Queued) {
            // An aborted dial: the outbox waits for its answer.
            self.handle(
                &mut st,
                Input::DialFailed {
                    reason: "the node is shutting down".into(),
                    unknown: false,
                },
            );
        }
        let deadline = self.now().saturating_add(SHUTDOWN_GRACE.as_millis() as u64);
        self.handle(&mut st, Input::Shutdown { deadline });
        self.after(&mut st);
    }

    /// Starts a dial beside the loop: look the peer up, dial its addresses and handshake;
    /// when it has none that answer, ask it to dial us back (if we can be dialed), then
    /// open a relay through the directory and handshake over that.
    fn start_dial(self: &Arc<Self>) -> Option<AbortOnDropHandle<Result<Dialed, DialFailure>>> {
        if self.shared.peer_state().is_blocked(&self.peer) {
            self.input(Input::DialFailed {
                reason: format!("{} is blocked", self.peer),
                unknown: false,
            });
            return None;
        }
        let core = self.clone();
        let task = async move {
            let (record, key) = core.resolve().await?;
            let mut last = match direct(&core.shared, &core.peer, &key, &record.addrs).await {
                Ok(est) => return Ok(Dialed::Opened(Box::new(est))),
                Err(reason) => reason,
            };
            // Nothing to dial directly (the directory found the peer undialable, or its
            // addresses do not answer us).
            let session = core.shared.session().map_err(|e| DialFailure {
                reason: chain(&e),
                unknown: false,
                key_changed: None,
            })?;
            if core.lock().conn.is_some() {
                // The peer connected to us meanwhile.
                return Ok(Dialed::CameIn);
            }
            if core.shared.dialable() == Some(true) {
                match core.connect_back(&*session).await {
                    Ok(()) => return Ok(Dialed::CameIn),
                    Err(reason) => last = reason,
                }
            }
            match relayed(&core.shared, &*session, &core.peer, &key).await {
                Ok(est) => Ok(Dialed::Opened(Box::new(est))),
                Err(reason) => Err(DialFailure {
                    reason: format!("{last}; {reason}"),
                    unknown: false,
                    key_changed: None,
                }),
            }
        };
        Some(AbortOnDropHandle::new(tokio::spawn(task.in_current_span())))
    }

    /// Starts `task` (an upgrade of a relayed connection) unless one is under way. It runs
    /// among the node's tasks: stopped by a shutdown or a crash.
    fn start_upgrade(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut upgrade = self.upgrade.lock();
        if upgrade.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = self.shared.spawn(task.instrument(self.span.clone()));
        *upgrade = Some(AbortOnDropHandle::new(task));
    }

    /// Dials the peer directly beside a relayed connection (it asked us to connect back).
    fn start_upgrade_dial(self: &Arc<Self>) {
        let core = self.clone();
        self.start_upgrade(async move {
            let Ok((record, key)) = core.resolve().await else {
                return;
            };
            match direct(&core.shared, &core.peer, &key, &record.addrs).await {
                Ok(est) => {
                    let mut st = core.lock();
                    core.adopt(&mut st, est, true);
                    core.after(&mut st);
                }
                Err(reason) => tracing::debug!(%reason, "still relayed"),
            }
        });
    }

    /// The peer's directory record, online, and the key to expect (the pinned one).
    async fn resolve(&self) -> Result<(PeerRecord, PublicKey), DialFailure> {
        let peer = &self.peer;
        let pinned = self.lock().key;
        let record = match self.shared.resolve(peer).await {
            Ok((record, None)) => record,
            Ok((record, Some(pinned))) => {
                return Err(DialFailure {
                    reason: format!("{peer}'s key changed"),
                    unknown: false,
                    key_changed: Some((pinned, record.public_key)),
                });
            }
            Err(super::NodeError::UnknownUser(_)) => {
                return Err(DialFailure {
                    reason: format!("unknown user '{peer}': nobody has registered that name"),
                    unknown: true,
                    key_changed: None,
                });
            }
            Err(e) => {
                return Err(DialFailure {
                    reason: format!("cannot look {peer} up: {}", chain(&e)),
                    unknown: false,
                    key_changed: None,
                });
            }
        };
        if !record.online {
            return Err(DialFailure {
                reason: format!("{peer} is offline"),
                unknown: false,
                key_changed: None,
            });
        }
        let key = pinned.unwrap_or(record.public_key);
        Ok((record, key))
    }

    /// Asks the peer (through the directory) to dial us, and waits for its connection to
    /// be adopted, within [`CONNECT_BACK_TIMEOUT`].
    async fn connect_back(&self, session: &dyn DiscoverySession) -> Result<(), String> {
        let peer = &self.peer;
        let mut adopted = self.adopted.subscribe();
        adopted.mark_unchanged();
        session
            .connect_back(peer)
            .await
            .map_err(|e| format!("{peer} could not be asked to connect back: {}", chain(&e)))?;
        match tokio::time::timeout(CONNECT_BACK_TIMEOUT, adopted.changed()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(format!(
                "{peer} did not connect back within {} ms",
                CONNECT_BACK_TIMEOUT.as_millis()
            )),
        }
    }

    /// Starts a store call beside the loop.
    fn start_store(&self, ids: Vec<MessageId>) -> StoreJob {
        let sealed = self.sealed(&mut self.lock(), &ids);
        // What could not be sealed (the peer's key is not known yet) waits for a retry.
        let unsealed: Vec<MessageId> = ids
            .iter()
            .filter(|id| !sealed.iter().any(|(s, _, _)| s == *id))
            .copied()
            .collect();
        let mut ids: Vec<MessageId> = sealed.iter().map(|(id, _, _)| *id).collect();
        let messages: Vec<StoredMessage> = sealed
            .into_iter()
            .map(|(id, token, expires_at_ms)| StoredMessage {
                id,
                from: self.shared.me().to_owned(),
                to: self.peer.clone(),
                token,
                expires_at: std::time::UNIX_EPOCH + Duration::from_millis(expires_at_ms),
            })
            .collect();
        let store = self.shared.store.clone();
        async move {
            let n = messages.len();
            let mut results =
                match tokio::time::timeout(STORE_TIMEOUT, store.put_many(messages)).await {
                    // Stored now or already there: either way the store has it.
                    Ok(results) => results.into_iter().map(|r| r.map(drop)).collect(),
                    Err(_) => vec![
                        Err(StoreError::unavailable(
                            "the offline store did not answer in time"
                        ));
                        n
                    ],
                };
            results.extend(
                unsealed
                    .iter()
                    .map(|_| Err(StoreError::unavailable("the peer's key is not known yet"))),
            );
            ids.extend(unsealed);
            (ids, results)
        }
        .boxed()
    }
}

/// Dials `addrs` in turn and runs the handshake, expecting `key`: the first that works, or
/// why none did.
async fn direct(
    shared: &Arc<Shared>,
    peer: &str,
    key: &PublicKey,
    addrs: &[std::net::SocketAddr],
) -> Result<Established, String> {
    let mut last = format!("{peer} cannot be dialed directly (no published address)");
    for &addr in addrs {
        let attempt = async {
            let conn = shared.transport.dial(addr).await.map_err(Cause::new)?;
            let (mut reader, mut writer) = handshake::frames(conn);
            handshake::dial(
                &mut reader,
                &mut writer,
                &shared.identity,
                shared.me(),
                peer,
                key,
            )
            .await
            .map_err(Cause::new)?;
            Ok::<_, Cause>(Established {
                reader,
                writer,
                key: *key,
                relayed: false,
            })
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok(est)) => return Ok(est),
            Ok(Err(e)) => last = format!("dialing {peer} at {addr} failed: {}", chain(&e)),
            Err(_) => last = format!("dialing {peer} at {addr} timed out"),
        }
    }
    Err(last)
}

/// Opens a relay to `peer` through the directory and runs the dialer's handshake over it:
/// end to end, as on a direct connection, so the relay sees only sealed frames.
async fn relayed(
    shared: &Arc<Shared>,
    session: &dyn DiscoverySession,
    peer: &str,
    key: &PublicKey,
) -> Result<Established, String> {
    let attempt = async {
        let conn = session.relay(peer).await.map_err(Cause::new)?;
        let (mut reader, mut writer) = handshake::frames(conn);
        handshake::dial(
            &mut reader,
            &mut writer,
            &shared.identity,
            shared.me(),
            peer,
            key,
        )
        .await
        .map_err(Cause::new)?;
        Ok::<_, Cause>(Established {
            reader,
            writer,
            key: *key,
            relayed: true,
        })
    };
    let limit = HANDSHAKE_TIMEOUT + crate::protocol::discovery::RELAY_JOIN_TIMEOUT;
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(est)) => Ok(est),
        Ok(Err(e)) => Err(format!("relaying to {peer} failed: {}", chain(&e))),
        Err(_) => Err(format!("relaying to {peer} timed out")),
    }
}

/// Replaces a relayed connection by a direct one if the peer can now be dialed, or asks it
/// to dial us if we can be. Gives up quietly: the relay stays.
async fn upgrade_task(core: Arc<Core>) {
    let Ok((record, key)) = core.resolve().await else {
        return;
    };
    if !record.addrs.is_empty() {
        match direct(&core.shared, &core.peer, &key, &record.addrs).await {
            Ok(est) => {
                let mut st = core.lock();
                core.adopt(&mut st, est, true);
                core.after(&mut st);
                return;
            }
            Err(reason) => tracing::debug!(%reason, "still relayed"),
        }
    }
    if core.shared.dialable() == Some(true)
        && let Ok(session) = core.shared.session()
        && let Err(reason) = core.connect_back(&*session).await
    {
        tracing::debug!(%reason, "still relayed");
    }
}

/// Marks the link stopped when its task ends, however it ends.
struct StopGuard(Arc<Core>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let core = &self.0;
        let closers = {
            let mut st = core.lock();
            core.stopped.store(true, Ordering::Release);
            std::mem::take(&mut st.closers)
        };
        for done in closers {
            let _ = done.send(());
        }
        core.room.notify_waiters();
    }
}

/// Waits for an optional task; pending forever without one.
async fn join_opt<T: Send + 'static>(task: &mut Option<AbortOnDropHandle<T>>) -> Option<T> {
    match task {
        Some(handle) => {
            let result = handle.await.ok();
            *task = None;
            result
        }
        None => std::future::pending().await,
    }
}

/// The link's task: starts dials and stores, writes what the socket did not take at once,
/// keeps the timers, and closes the link.
async fn run(core: Arc<Core>) {
    let _guard = StopGuard(core.clone());
    let halt = core.shared.halt.clone();
    let timeout = core.shared.config.ack_timeout;
    let mut dial: Option<AbortOnDropHandle<Result<Dialed, DialFailure>>> = None;
    let mut stores: FuturesUnordered<StoreJob> = FuturesUnordered::new();
    let mut ping = tokio::time::interval(PING_INTERVAL / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (close, deferred) = {
            let mut st = core.lock();
            (st.close_requested, std::mem::take(&mut st.deferred))
        };
        if close {
            core.start_closing(&mut dial);
        }
        for action in deferred {
            match action {
                Action::Dial => {
                    if core.lock().closing {
                        core.input(Input::DialFailed {
                            reason: "the node is shutting down".into(),
                            unknown: false,
                        });
                    } else {
                        dial = core.start_dial();
                    }
                }
                Action::Store(ids) => stores.push(core.start_store(ids)),
                _ => {}
            }
        }
        let (deadline, flush, blocked_since, done) = {
            let mut st = core.lock();
            if !st.deferred.is_empty() {
                // Starting those asked for more (a blocked peer's dial failed at once).
                continue;
            }
            st.armed = st.outbox.next_deadline();
            let blocked = st.conn.as_ref().and_then(|c| c.blocked_since);
            let done = st.closing && st.outbox.is_stopped();
            (st.armed, st.flush_wanted, blocked, done)
        };
        if done {
            return;
        }
        let sleep = async {
            match deadline {
                Some(at) => {
                    let at = core.epoch + Duration::from_millis(at);
                    tokio::time::sleep_until(at.max(Instant::now())).await
                }
                None => std::future::pending().await,
            }
        };
        let write_timeout = async {
            match blocked_since {
                Some(since) => tokio::time::sleep_until(since + timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = halt.cancelled() => return,
            () = std::future::poll_fn(|cx| core.poll_write_out(cx)), if flush => {}
            _ = core.wake.notified() => {}
            dialed = join_opt(&mut dial) => core.on_dialed(dialed),
            Some((ids, results)) = stores.next() => core.on_stored(ids, results),
            _ = write_timeout => {
                let mut st = core.lock();
                if let Some(id) = st.conn.as_ref().map(|c| c.id) {
                    core.lost(&mut st, id, "the peer stopped reading");
                    core.after(&mut st);
                }
            }
            _ = sleep => core.input(Input::Tick),
            _ = ping.tick() => core.on_ping(),
        }
    }
}

/// The message's token under `pair`, sealed on first use and kept.
fn seal<'p>(
    shared: &Shared,
    pair: &PairKey,
    peer: &str,
    id: MessageId,
    payload: &'p mut Payload,
) -> &'p str {
    payload.token.get_or_insert_with(|| {
        pair.seal_ref(&PayloadRef {
            id,
            from: shared.me(),
            to: peer,
            sent_at_ms: payload.sent_at_ms,
            seq: payload.seq,
            body: &payload.body,
        })
    })
}

/// Reads one connection until it closes. Processes frames in batches: open each message and
/// make the batch durable in the inbox, then acknowledge the batch, on the same connection.
async fn read_loop(core: Arc<Core>, conn: u64, pair: PairKey, hold: bool, mut reader: FrameReader) {
    let shared = &core.shared;
    let peer = core.peer.as_str();
    let halt = shared.halt.clone();
    let mut batch = Vec::with_capacity(READ_BATCH);
    let mut messages = Vec::with_capacity(READ_BATCH);
    let reason = loop {
        // The application is far behind: stop reading (the peer's acknowledgements wait).
        shared.inbox.wait_for_room().await;
        // Messages left over by the sender's rate (below) are taken first, without waiting
        // for the peer to send more.
        // Nothing more is read while a round's worth waits: the socket backs up and TCP flow
        // control holds the sender (memory stays bounded whatever the peer sends).
        let first = if messages.is_empty() {
            Some(tokio::select! {
                _ = halt.cancelled() => return,
                next = reader.next() => next,
            })
        } else if messages.len() < READ_BATCH {
            reader.next().now_or_never()
        } else {
            None
        };
        let mut end = match first {
            None => None,
            Some(None) => Some("the peer closed the connection".to_owned()),
            Some(Some(Err(e))) => Some(format!("bad frame: {}", chain(&e))),
            Some(Some(Ok(frame))) => {
                batch.push(frame);
                None
            }
        };
        while end.is_none() && batch.len() + messages.len() < READ_BATCH {
            match reader.next().now_or_never() {
                Some(Some(Ok(frame))) => batch.push(frame),
                Some(Some(Err(e))) => end = Some(format!("bad frame: {}", chain(&e))),
                Some(None) => end = Some("the peer closed the connection".to_owned()),
                None => break,
            }
        }
        let mut replies = Vec::new();
        for frame in batch.drain(..) {
            match frame {
                PeerFrame::Message { id, token } => messages.push((id, token)),
                PeerFrame::Ack { ids, tag } => {
                    if !pair.verify_ack(peer, &ids, &tag) {
                        end = Some("forged acknowledgement".into());
                        break;
                    }
                    let delivered = {
                        let mut st = core.lock();
                        let delivered = st.outbox.settle(&ids);
                        if st.outbox.take_link_waiting() {
                            // Room in flight: what waits goes now.
                            core.handle(&mut st, Input::Settled);
                        }
                        core.after(&mut st);
                        delivered
                    };
                    shared.settle_sent(peer, &delivered, Outcome::Delivered);
                }
                PeerFrame::Reject { id, detail, tag } => {
                    if !pair.verify_reject(peer, id, &detail, &tag) {
                        end = Some("forged refusal".into());
                        break;
                    }
                    core.input(Input::Rejected {
                        id,
                        reason: format!("{peer} refused the message: {detail}"),
                    });
                }
                PeerFrame::Ping(n) => replies.push(PeerFrame::Pong(n)),
                PeerFrame::Pong(n) => {
                    let mut st = core.lock();
                    if let Some(c) = st.conn.as_mut()
                        && c.id == conn
                        && c.ping.is_some_and(|(sent, _)| sent == n)
                    {
                        c.ping = None;
                    }
                }
                PeerFrame::Error { detail, .. } => {
                    end = Some(format!("the peer reported an error: {detail}"));
                    break;
                }
                _ => {
                    end = Some("unexpected frame after the handshake".into());
                    break;
                }
            }
        }
        batch.clear();
        let mut ack = Vec::new();
        if !messages.is_empty() {
            // Past the sender's rate this waits, and so does reading from it (see above).
            // What the rate does not let in now stays for the next round.
            let take = shared.throttle(peer, messages.len()).await;
            let received = shared
                .receive_batch(&pair, peer, messages.drain(..take), false, hold)
                .await;
            match received {
                Ok(received) => {
                    for (id, e) in received.refuse {
                        tracing::warn!(peer = %peer, error = %e, "refused a message");
                        shared.emit(Event::Error {
                            message: format!("a message from {peer} was refused: {e}"),
                        });
                        let detail = e.to_string();
                        let tag = pair.reject_tag(shared.me(), id, &detail);
                        replies.push(PeerFrame::Reject { id, detail, tag });
                    }
                    ack = received.ack;
                    if !received.unopenable.is_empty() {
                        // A token that does not authenticate: drop the connection without
                        // a refusal (anyone on the path can alter a token); the genuine
                        // sender resends on a new one.
                        end.get_or_insert_with(|| "a token did not authenticate".into());
                    }
                }
                Err(e) => {
                    // Not durable, so not acknowledged: the sender resends.
                    tracing::warn!(peer = %peer, error = %chain(&e), "cannot record received messages");
                    end.get_or_insert_with(|| format!("cannot record messages: {}", chain(&e)));
                }
            }
        }
        {
            // Acknowledge (and answer) on this connection, and write at once: what we made
            // durable is acknowledged before the application is woken to read it.
            let mut st = core.lock();
            if let Some(c) = st.conn.as_mut().filter(|c| c.id == conn) {
                for chunk in ack.chunks(MAX_ACK_BATCH) {
                    let tag = pair.ack_tag(shared.me(), chunk);
                    c.feed(&PeerFrame::Ack {
                        ids: chunk.to_vec(),
                        tag,
                    });
                }
                for reply in &replies {
                    c.feed(reply);
                }
            }
            core.write_now(&mut st);
            if let Some(reason) = &end {
                core.lost(&mut st, conn, reason);
            }
            core.after(&mut st);
        }
        shared.inbox.wake_readers();
        if let Some(reason) = end {
            break reason;
        }
    };
    tracing::debug!(peer = %peer, %reason, "reader stopped");
}
