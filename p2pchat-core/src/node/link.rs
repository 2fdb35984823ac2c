//! One link per peer: the task that performs what the peer's outbox ([`PeerOutbox`], a pure
//! state machine) decides, owns the single connection to the peer, and runs the reader of
//! each connection.
//!
//! The link task owns the write half and seals and writes messages. Dials and store calls
//! run beside its loop (a dial that waits on a directory or a handshake never stalls
//! writes, acknowledgements or shutdown). A reader task per connection reads frames, hands
//! incoming messages to the node's inbox, and settles acknowledgements itself: the outbox
//! is shared by the link and its reader under a lock never held across an `.await`, so an
//! acknowledgement costs no hand-off to the link. A link blocked writing never stops
//! acknowledgements from being read: two links writing to each other cannot deadlock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::handshake::{self, FrameReader, FrameWriter};
use super::outbox::{Action, Input, Millis, Outcome, PeerOutbox, State, StoreResult};
use super::{HANDSHAKE_TIMEOUT, OutboxEntry, OutboxState, SHUTDOWN_GRACE, Shared, lock};
use crate::crypto::{PairKey, PayloadRef};
use crate::event::Event;
use crate::identity::PublicKey;
use crate::protocol::{MAX_ACK_BATCH, MessageId, PeerFrame};
use crate::store::{StoreError, StoredMessage};

pub use super::outbox::MAX_IN_FLIGHT;

/// Commands queued for one link before `send` waits. Default: 1024.
pub const LINK_QUEUE_CAPACITY: usize = 1024;

/// Frames a reader processes before recording them and acknowledging. Default: 256.
const READ_BATCH: usize = 256;

/// Commands a link takes before flushing. Default: 256.
const WRITE_BATCH: usize = 256;

/// An idle connection is probed this often. Default: 15 s.
const PING_INTERVAL: Duration = Duration::from_secs(15);

/// Longest a store call may take before it counts as failed (and is retried). Default: 30 s.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a link is asked to do.
#[derive(Debug)]
pub(crate) enum LinkCmd {
    /// A message, already durable in the outbox.
    Send(Outgoing),
    /// An authenticated connection the peer opened to us.
    Inbound(Established),
    /// The directory says the peer is online: dialing is worth trying again.
    PeerOnline,
    /// The peer's key changed: hold messages until trusted.
    Hold,
    /// The user trusts this new key.
    Trusted(PublicKey),
    /// Drop the connection (the peer was blocked).
    Disconnect,
    /// Cancel a message not yet sent; answers whether it was.
    Cancel(MessageId, oneshot::Sender<bool>),
    /// The messages waiting for this peer.
    List(oneshot::Sender<Vec<OutboxEntry>>),
    /// Send what is queued, wait a little for acks, store the rest, stop.
    Shutdown(oneshot::Sender<()>),
}

/// A message for the link, as the outbox holds it.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) id: MessageId,
    pub(crate) body: String,
    pub(crate) sent_at_ms: u64,
    /// Wall-clock Unix milliseconds when it expires undelivered.
    pub(crate) expires_at_ms: u64,
    /// Wall-clock Unix milliseconds when `send` queued it.
    pub(crate) queued_at_ms: u64,
}

pub(crate) struct Established {
    pub(crate) reader: FrameReader,
    pub(crate) writer: FrameWriter,
    /// The key the peer proved in the handshake.
    pub(crate) key: PublicKey,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Established")
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LinkHandle {
    tx: mpsc::Sender<LinkCmd>,
}

impl LinkHandle {
    pub(crate) async fn send(&self, cmd: LinkCmd) -> Result<(), LinkCmd> {
        self.tx.send(cmd).await.map_err(|e| e.0)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn try_send(&self, cmd: LinkCmd) -> bool {
        self.tx.try_send(cmd).is_ok()
    }
}

/// What the link keeps with each message in the outbox.
#[derive(Debug)]
struct Payload {
    body: String,
    sent_at_ms: u64,
    queued_at_ms: u64,
    expires_at_ms: u64,
    /// Sealed on first use, kept for resends and the store; dropped when the key changes.
    token: Option<String>,
}

type Outbox = Arc<Mutex<PeerOutbox<Payload>>>;

/// What a reader tells its link.
#[derive(Debug)]
enum FromReader {
    /// The peer refused this one (authenticated).
    Rejected(MessageId, String),
    /// We made these durable in our inbox; acknowledge them.
    AckThese(u64, Vec<MessageId>),
    /// We could not accept this one, for a reason the peer's own message caused; tell it.
    RejectThis(u64, MessageId, String),
    Ping(u64, u64),
    Pong(u64),
    Closed(u64, String),
}

/// Why a dial did not give a connection.
struct DialFailure {
    reason: String,
    /// The directory says nobody has the name.
    unknown: bool,
    /// The directory has another key than the pinned one: (pinned, new).
    key_changed: Option<(PublicKey, PublicKey)>,
}

struct Conn {
    id: u64,
    /// The pair key of the key this connection's peer proved: acknowledgements and
    /// refusals on it are tagged with it (it differs from the link's while untrusted).
    pair: PairKey,
    writer: FrameWriter,
    _reader: AbortOnDropHandle<()>,
    dialed_by_me: bool,
    ping: Option<(u64, Instant)>,
    last_ping: Instant,
}

type StoreJob = futures::future::BoxFuture<'static, (Vec<MessageId>, Vec<Result<(), StoreError>>)>;

struct Link {
    shared: Arc<Shared>,
    peer: String,
    /// The pinned key; `None` until the directory has told us (a first message queued
    /// while it was unreachable).
    key: Option<PublicKey>,
    pair: Option<PairKey>,
    outbox: Outbox,
    /// Set by a reader that settled something the link waits for.
    wake: Arc<Notify>,
    conn: Option<Conn>,
    next_conn: u64,
    dial: Option<AbortOnDropHandle<Result<Established, DialFailure>>>,
    stores: FuturesUnordered<StoreJob>,
    reader_tx: mpsc::UnboundedSender<FromReader>,
    reader_rx: mpsc::UnboundedReceiver<FromReader>,
    cmds: mpsc::Receiver<LinkCmd>,
    closing: Option<oneshot::Sender<()>>,
    /// The link's clock starts here (the outbox counts milliseconds from it).
    epoch: Instant,
    actions: Vec<Action>,
}

/// Starts the link to `peer`, whose pinned key is `key` (if known yet).
pub(crate) fn spawn(shared: Arc<Shared>, peer: String, key: Option<PublicKey>) -> LinkHandle {
    let (tx, cmds) = mpsc::channel(LINK_QUEUE_CAPACITY);
    let (reader_tx, reader_rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("link", me = %shared.me(), peer = %peer);
    let pair = key.and_then(|key| shared.pair_key(&key).ok());
    let outbox = PeerOutbox::new(shared.config.ack_timeout);
    let actions = Vec::new();
    let link = Link {
        shared: shared.clone(),
        peer,
        key,
        pair,
        outbox: Arc::new(Mutex::new(outbox)),
        wake: Arc::new(Notify::new()),
        conn: None,
        next_conn: 0,
        dial: None,
        stores: FuturesUnordered::new(),
        reader_tx,
        reader_rx,
        cmds,
        closing: None,
        epoch: Instant::now(),
        actions,
    };
    shared.spawn(link.run().instrument(span));
    LinkHandle { tx }
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

impl Link {
    fn now(&self) -> Millis {
        self.epoch
            .elapsed()
            .as_millis()
            .try_into()
            .unwrap_or(Millis::MAX)
    }

    /// The outbox's milliseconds for a wall-clock Unix time.
    fn mono(&self, unix_ms: u64) -> Millis {
        let wall = super::unix_ms_now();
        self.now()
            .saturating_add(unix_ms.saturating_sub(wall))
            .saturating_sub(wall.saturating_sub(unix_ms))
    }

    fn handle(&mut self, input: Input) {
        let now = self.now();
        lock(&self.outbox).handle(now, input, &mut self.actions);
    }

    async fn run(mut self) {
        let halt = self.shared.halt.clone();
        let mut ping = tokio::time::interval(PING_INTERVAL / 3);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let can_take = self.closing.is_none() && lock(&self.outbox).has_room();
            let deadline = lock(&self.outbox)
                .next_deadline()
                .map(|at| self.epoch + Duration::from_millis(at));
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.max(Instant::now())).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = halt.cancelled() => return,
                Some(ev) = self.reader_rx.recv() => self.on_reader(ev).await,
                _ = self.wake.notified() => self.handle(Input::Settled),
                cmd = self.cmds.recv(), if can_take => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    // Every handle is gone and the node is not shutting us down.
                    None => self.start_closing(None),
                },
                dialed = join_opt(&mut self.dial) => self.on_dialed(dialed).await,
                Some((ids, results)) = self.stores.next() => self.on_stored(ids, results),
                _ = sleep => self.handle(Input::Tick),
                _ = ping.tick() => self.on_ping().await,
            }
            self.perform().await;
            self.flush().await;
            if self.closing.is_some() && lock(&self.outbox).is_stopped() {
                if let Some(done) = self.closing.take() {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    fn start_closing(&mut self, done: Option<oneshot::Sender<()>>) {
        let (tx, _) = oneshot::channel();
        self.closing = Some(done.unwrap_or(tx));
        // Messages queued behind the shutdown are stored with the rest.
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                LinkCmd::Send(msg) => self.queue(msg),
                LinkCmd::Shutdown(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
        self.dial = None;
        if lock(&self.outbox)
            .entries()
            .any(|e| e.state == State::Queued)
        {
            // An aborted dial: the outbox waits for its answer.
            self.handle(Input::DialFailed {
                reason: "the node is shutting down".into(),
                unknown: false,
            });
        }
        let deadline = self.now().saturating_add(SHUTDOWN_GRACE.as_millis() as u64);
        self.handle(Input::Shutdown { deadline });
    }

    fn queue(&mut self, msg: Outgoing) {
        let expires_at = self.mono(msg.expires_at_ms);
        let now = self.now();
        lock(&self.outbox).queue(
            now,
            msg.id,
            expires_at,
            Payload {
                body: msg.body,
                sent_at_ms: msg.sent_at_ms,
                queued_at_ms: msg.queued_at_ms,
                expires_at_ms: msg.expires_at_ms,
                token: None,
            },
            &mut self.actions,
        );
    }

    async fn on_cmd(&mut self, cmd: LinkCmd) {
        match cmd {
            LinkCmd::Send(msg) => {
                self.queue(msg);
                // Pipeline: take what else is queued before writing and flushing once.
                let mut n = 1;
                while n < WRITE_BATCH && lock(&self.outbox).has_room() {
                    match self.cmds.try_recv() {
                        Ok(LinkCmd::Send(msg)) => self.queue(msg),
                        Ok(other) => {
                            self.perform().await;
                            Box::pin(self.on_cmd(other)).await;
                            break;
                        }
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            LinkCmd::Inbound(est) => self.adopt(est, false),
            LinkCmd::PeerOnline => self.handle(Input::PeerOnline),
            LinkCmd::Hold => self.handle(Input::Hold),
            LinkCmd::Trusted(key) => {
                self.key = Some(key);
                self.drop_conn();
                match self.shared.pair_key(&key) {
                    Ok(pair) => {
                        self.pair = Some(pair);
                        // Tokens sealed under the old key are of no use to the peer now.
                        for payload in lock(&self.outbox).payloads_mut() {
                            payload.token = None;
                        }
                        self.handle(Input::Trusted);
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, error = %e, "cannot use the trusted key")
                    }
                }
            }
            LinkCmd::Disconnect => self.drop_conn(),
            LinkCmd::Cancel(id, reply) => {
                let cancelled = lock(&self.outbox).cancel(id, &mut self.actions);
                let _ = reply.send(cancelled);
            }
            LinkCmd::List(reply) => {
                let list = lock(&self.outbox)
                    .entries()
                    .map(|e| OutboxEntry {
                        id: e.id,
                        to: self.peer.clone(),
                        state: match e.state {
                            State::Queued => OutboxState::Queued,
                            State::InFlight { .. } => OutboxState::Sent,
                            State::Storing => OutboxState::Storing,
                        },
                        attempts: e.attempts,
                        queued_at: std::time::UNIX_EPOCH
                            + Duration::from_millis(e.payload.queued_at_ms),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            LinkCmd::Shutdown(done) => self.start_closing(Some(done)),
        }
    }

    /// Drops the connection; what it had in flight waits again.
    fn drop_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.handle(Input::ConnectionLost { conn: conn.id });
        }
    }

    /// Performs the outbox's actions.
    async fn perform(&mut self) {
        while !self.actions.is_empty() {
            let actions = std::mem::take(&mut self.actions);
            for action in actions {
                match action {
                    Action::Dial => self.start_dial(),
                    Action::Write { conn, ids } => self.write_messages(conn, ids).await,
                    Action::Close { conn } => {
                        if self.conn.as_ref().is_some_and(|c| c.id == conn) {
                            tracing::debug!(peer = %self.peer, "no acknowledgement in time; closing");
                            self.conn = None;
                        }
                    }
                    Action::Store(ids) => self.start_store(ids),
                    Action::Done { ids, outcome } => {
                        self.shared.settle_sent(&self.peer, &ids, outcome)
                    }
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
    }

    /// Seals (once) and writes messages on the current connection, in order.
    async fn write_messages(&mut self, conn: u64, ids: Vec<MessageId>) {
        if self.conn.as_ref().is_none_or(|c| c.id != conn) {
            // The connection is gone already: its loss re-queued them.
            return;
        }
        let frames: Vec<PeerFrame> = self
            .sealed(&ids)
            .into_iter()
            .map(|(id, token, _)| PeerFrame::Message { id, token })
            .collect();
        for id in &ids {
            self.shared.emit(Event::Sent {
                id: *id,
                to: self.peer.clone(),
            });
        }
        let timeout = self.shared.config.ack_timeout;
        for frame in &frames {
            let Some(c) = &mut self.conn else { return };
            if let Err(e) = feed(c, frame, timeout).await {
                self.lost(&e);
                return;
            }
        }
    }

    /// The tokens of these messages (sealed once, kept for resends and the store) with
    /// their expiry; none before the peer's key is known.
    fn sealed(&self, ids: &[MessageId]) -> Vec<(MessageId, String, u64)> {
        let Some(pair) = self.pair.as_ref() else {
            return Vec::new();
        };
        let mut outbox = lock(&self.outbox);
        ids.iter()
            .filter_map(|&id| {
                let payload = outbox.payload_mut(id)?;
                let token = seal(&self.shared, pair, &self.peer, id, payload);
                Some((id, token, payload.expires_at_ms))
            })
            .collect()
    }

    fn start_store(&mut self, ids: Vec<MessageId>) {
        let sealed = self.sealed(&ids);
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
        self.stores.push(
            async move {
                let n = messages.len();
                let results =
                    match tokio::time::timeout(STORE_TIMEOUT, store.put_many(messages)).await {
                        Ok(results) => results,
                        Err(_) => vec![
                            Err(StoreError::Unavailable(
                                "the offline store did not answer in time".into()
                            ));
                            n
                        ],
                    };
                let mut results = results;
                results.extend(unsealed.iter().map(|_| {
                    Err(StoreError::Unavailable(
                        "the peer's key is not known yet".into(),
                    ))
                }));
                ids.extend(unsealed);
                (ids, results)
            }
            .boxed(),
        );
    }

    fn on_stored(&mut self, ids: Vec<MessageId>, results: Vec<Result<(), StoreError>>) {
        let mut stored = Vec::new();
        let mut retry: Vec<(MessageId, StoreError)> = Vec::new();
        let mut refused: Vec<(MessageId, StoreError)> = Vec::new();
        for (i, id) in ids.into_iter().enumerate() {
            match results
                .get(i)
                .cloned()
                .unwrap_or_else(|| Err(StoreError::Unavailable("the store gave no answer".into())))
            {
                Ok(()) => stored.push(id),
                Err(e @ (StoreError::Unavailable(_) | StoreError::QuotaExceeded { .. })) => {
                    retry.push((id, e))
                }
                Err(e) => refused.push((id, e)),
            }
        }
        if !stored.is_empty() {
            self.handle(Input::Stored {
                ids: stored,
                result: StoreResult::Stored,
            });
        }
        if let Some((_, e)) = retry.first() {
            let reason = format!(
                "{} cannot be reached and the offline store failed ({e}); will retry",
                self.peer
            );
            self.handle(Input::Stored {
                ids: retry.iter().map(|(id, _)| *id).collect(),
                result: StoreResult::Retry(reason),
            });
        }
        for (id, e) in refused {
            self.handle(Input::Stored {
                ids: vec![id],
                result: StoreResult::Refused(format!("the offline store refused the message: {e}")),
            });
        }
    }

    /// Starts a dial beside the loop: look the peer up, dial its addresses, handshake.
    fn start_dial(&mut self) {
        if self.shared.peer_state().is_blocked(&self.peer) {
            self.handle(Input::DialFailed {
                reason: format!("{} is blocked", self.peer),
                unknown: false,
            });
            return;
        }
        let shared = self.shared.clone();
        let peer = self.peer.clone();
        let pinned = self.key;
        let task = async move {
            let record = match shared.resolve(&peer).await {
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
                        reason: format!("cannot look {peer} up: {e}"),
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
            let mut last = format!("{peer} announces no address");
            for addr in record.addrs {
                let attempt = async {
                    let conn = shared
                        .transport
                        .dial(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    let (mut reader, mut writer) = handshake::frames(conn);
                    handshake::dial(
                        &mut reader,
                        &mut writer,
                        &shared.identity,
                        shared.me(),
                        &peer,
                        &key,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    Ok::<_, String>(Established {
                        reader,
                        writer,
                        key,
                    })
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
                    Ok(Ok(est)) => return Ok(est),
                    Ok(Err(e)) => last = format!("dialing {peer} at {addr} failed: {e}"),
                    Err(_) => last = format!("dialing {peer} at {addr} timed out"),
                }
            }
            Err(DialFailure {
                reason: last,
                unknown: false,
                key_changed: None,
            })
        };
        self.dial = Some(AbortOnDropHandle::new(tokio::spawn(task.in_current_span())));
    }

    async fn on_dialed(&mut self, dialed: Option<Result<Established, DialFailure>>) {
        match dialed {
            Some(Ok(est)) => self.adopt(est, true),
            Some(Err(failure)) => {
                tracing::debug!(peer = %self.peer, reason = %failure.reason, "dial failed");
                if let Some((pinned, new)) = failure.key_changed {
                    self.shared.key_changed(&self.peer, &pinned, &new);
                    self.handle(Input::Hold);
                }
                self.handle(Input::DialFailed {
                    reason: failure.reason,
                    unknown: failure.unknown,
                });
            }
            None => self.handle(Input::DialFailed {
                reason: "the dial was cancelled".into(),
                unknown: false,
            }),
        }
    }

    /// Takes a new authenticated connection. With one already open, both ends keep the one
    /// dialed by the side with the smaller key (or the newer, if one side dialed both), so
    /// simultaneous dials converge on one connection per pair.
    fn adopt(&mut self, est: Established, dialed_by_me: bool) {
        if self.key.is_none() {
            // First sight (the directory had been unreachable when the message was queued).
            self.key = Some(est.key);
            self.pair = self.shared.pair_key(&est.key).ok();
        }
        // A key the user has not trusted (it changed): talk, but hold both ways.
        let untrusted = self.key != Some(est.key);
        let pair = match self.shared.pair_key(&est.key) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "unusable key");
                return;
            }
        };
        if untrusted {
            self.handle(Input::Hold);
        }
        if let Some(existing) = &self.conn {
            let me_smaller = self.shared.identity.public_key().to_bytes() < est.key.to_bytes();
            let keep_existing =
                existing.dialed_by_me != dialed_by_me && existing.dialed_by_me == me_smaller;
            if keep_existing {
                return;
            }
        }
        self.next_conn += 1;
        let id = self.next_conn;
        let reader = self.shared.spawn(
            read_loop(
                ReadSide {
                    shared: self.shared.clone(),
                    pair: pair.clone(),
                    peer: self.peer.clone(),
                    conn: id,
                    hold: untrusted,
                    outbox: self.outbox.clone(),
                    wake: self.wake.clone(),
                    to_link: self.reader_tx.clone(),
                },
                est.reader,
            )
            .in_current_span(),
        );
        self.conn = Some(Conn {
            id,
            pair: pair.clone(),
            writer: est.writer,
            _reader: AbortOnDropHandle::new(reader),
            dialed_by_me,
            ping: None,
            last_ping: Instant::now(),
        });
        // Whatever was in flight on an old connection goes again on this one; the peer
        // drops what it already has by id.
        self.handle(Input::Connected { conn: id });
    }

    async fn flush(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let timeout = self.shared.config.ack_timeout;
        match tokio::time::timeout(timeout, SinkExt::<&PeerFrame>::flush(&mut conn.writer)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.lost(&format!("write failed: {e}")),
            Err(_) => self.lost("the peer stopped reading"),
        }
        // A loss re-queues; write those again at once (on a new connection, or store them).
        if !self.actions.is_empty() {
            Box::pin(self.perform()).await;
        }
    }

    fn lost(&mut self, reason: &str) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!(peer = %self.peer, %reason, "connection lost");
            self.handle(Input::ConnectionLost { conn: conn.id });
        }
    }

    async fn write(&mut self, frame: PeerFrame) {
        let Some(conn) = &mut self.conn else { return };
        if let Err(e) = feed(conn, &frame, self.shared.config.ack_timeout).await {
            self.lost(&e);
        }
    }

    async fn on_reader(&mut self, ev: FromReader) {
        let current = self.conn.as_ref().map(|c| c.id);
        match ev {
            FromReader::Rejected(id, reason) => self.handle(Input::Rejected {
                id,
                reason: format!("{} refused the message: {reason}", self.peer),
            }),
            FromReader::AckThese(conn, ids) if Some(conn) == current => {
                for chunk in ids.chunks(MAX_ACK_BATCH) {
                    let tag = match &self.conn {
                        Some(conn) => conn.pair.ack_tag(self.shared.me(), chunk),
                        None => return,
                    };
                    self.write(PeerFrame::Ack {
                        ids: chunk.to_vec(),
                        tag,
                    })
                    .await;
                }
            }
            FromReader::RejectThis(conn, id, detail) if Some(conn) == current => {
                let Some(conn) = &self.conn else { return };
                let tag = conn.pair.reject_tag(self.shared.me(), id, &detail);
                self.write(PeerFrame::Reject { id, detail, tag }).await;
            }
            FromReader::Ping(conn, n) if Some(conn) == current => {
                self.write(PeerFrame::Pong(n)).await;
            }
            FromReader::Pong(n) => {
                if let Some(conn) = &mut self.conn
                    && conn.ping.is_some_and(|(sent, _)| sent == n)
                {
                    conn.ping = None;
                }
            }
            FromReader::Closed(conn, reason) if Some(conn) == current => self.lost(&reason),
            // About a connection that is no longer current.
            _ => {}
        }
    }

    async fn on_ping(&mut self) {
        let now = Instant::now();
        let timeout = self.shared.config.ack_timeout;
        let idle = lock(&self.outbox)
            .entries()
            .all(|e| !matches!(e.state, State::InFlight { .. }));
        let Some(conn) = &mut self.conn else { return };
        if let Some((_, sent)) = conn.ping {
            if now.duration_since(sent) >= timeout {
                self.lost("no answer to ping");
            }
        } else if idle && now.duration_since(conn.last_ping) >= PING_INTERVAL {
            let n: u64 = rand::random();
            conn.ping = Some((n, now));
            conn.last_ping = now;
            self.write(PeerFrame::Ping(n)).await;
        }
    }
}

/// The message's token under `pair`, sealed on first use and kept.
fn seal(
    shared: &Shared,
    pair: &PairKey,
    peer: &str,
    id: MessageId,
    payload: &mut Payload,
) -> String {
    payload
        .token
        .get_or_insert_with(|| {
            pair.seal_ref(&PayloadRef {
                id,
                from: shared.me(),
                to: peer,
                sent_at_ms: payload.sent_at_ms,
                body: &payload.body,
            })
        })
        .clone()
}

/// Feeds one frame, giving up after `timeout`: a peer that stops reading cannot block the
/// link forever.
async fn feed(conn: &mut Conn, frame: &PeerFrame, timeout: Duration) -> Result<(), String> {
    // Usually the write buffer has room and this completes at once, without arming a timer.
    if let Some(done) = conn.writer.feed(frame).now_or_never() {
        return done.map_err(|e| format!("write failed: {e}"));
    }
    match tokio::time::timeout(timeout, conn.writer.feed(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("the peer stopped reading".into()),
    }
}

/// What a reader works with besides the connection.
struct ReadSide {
    shared: Arc<Shared>,
    pair: PairKey,
    peer: String,
    /// Which of the link's connections this is.
    conn: u64,
    /// Messages on this connection wait for the user to trust the peer's new key.
    hold: bool,
    outbox: Outbox,
    wake: Arc<Notify>,
    to_link: mpsc::UnboundedSender<FromReader>,
}

/// Reads one connection until it closes. Processes frames in batches: open each message and
/// make the batch durable in the inbox, then acknowledge the batch.
async fn read_loop(side: ReadSide, mut reader: FrameReader) {
    let ReadSide {
        shared,
        pair,
        peer,
        conn,
        hold,
        outbox,
        wake,
        to_link,
    } = side;
    let halt = shared.halt.clone();
    let mut batch = Vec::with_capacity(READ_BATCH);
    let mut messages = Vec::with_capacity(READ_BATCH);
    let reason = loop {
        // The application is far behind: stop reading (the peer's acknowledgements wait).
        shared.inbox.wait_for_room().await;
        let first = tokio::select! {
            _ = halt.cancelled() => return,
            next = reader.next() => next,
        };
        let mut end = match first {
            None => Some("the peer closed the connection".to_owned()),
            Some(Err(e)) => Some(format!("bad frame: {e}")),
            Some(Ok(frame)) => {
                batch.push(frame);
                None
            }
        };
        while end.is_none() && batch.len() < READ_BATCH {
            match reader.next().now_or_never() {
                Some(Some(Ok(frame))) => batch.push(frame),
                Some(Some(Err(e))) => end = Some(format!("bad frame: {e}")),
                Some(None) => end = Some("the peer closed the connection".to_owned()),
                None => break,
            }
        }
        for frame in batch.drain(..) {
            match frame {
                PeerFrame::Message { id, token } => messages.push((id, token)),
                PeerFrame::Ack { ids, tag } => {
                    if !pair.verify_ack(&peer, &ids, &tag) {
                        end = Some("forged acknowledgement".into());
                        break;
                    }
                    let delivered = {
                        let mut outbox = lock(&outbox);
                        let delivered = outbox.settle(&ids);
                        if outbox.take_link_waiting() {
                            wake.notify_one();
                        }
                        delivered
                    };
                    shared.settle_sent(&peer, &delivered, Outcome::Delivered);
                }
                PeerFrame::Reject { id, detail, tag } => {
                    if !pair.verify_reject(&peer, id, &detail, &tag) {
                        end = Some("forged refusal".into());
                        break;
                    }
                    let _ = to_link.send(FromReader::Rejected(id, detail));
                }
                PeerFrame::Ping(n) => {
                    let _ = to_link.send(FromReader::Ping(conn, n));
                }
                PeerFrame::Pong(n) => {
                    let _ = to_link.send(FromReader::Pong(n));
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
        if !messages.is_empty() {
            let received = shared
                .receive_batch(&pair, &peer, messages.drain(..), false, hold)
                .await;
            match received {
                Ok(received) => {
                    for (id, e) in received.refuse {
                        tracing::warn!(peer = %peer, error = %e, "refused a message");
                        shared.emit(Event::Error {
                            message: format!("a message from {peer} was refused: {e}"),
                        });
                        let _ = to_link.send(FromReader::RejectThis(conn, id, e.to_string()));
                    }
                    if !received.ack.is_empty() {
                        let _ = to_link.send(FromReader::AckThese(conn, received.ack));
                    }
                    shared.inbox.wake_readers();
                    if !received.unopenable.is_empty() {
                        // A token that does not authenticate: drop the connection without
                        // a refusal (anyone on the path can alter a token); the genuine
                        // sender resends on a new one.
                        end.get_or_insert_with(|| "a token did not authenticate".into());
                    }
                }
                Err(e) => {
                    // Not durable, so not acknowledged: the sender resends.
                    tracing::warn!(peer = %peer, error = %e, "cannot record received messages");
                    end.get_or_insert_with(|| format!("cannot record messages: {e}"));
                }
            }
        }
        if let Some(reason) = end {
            break reason;
        }
    };
    let _ = to_link.send(FromReader::Closed(conn, reason));
}
