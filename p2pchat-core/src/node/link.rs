//! One link per peer: the single connection to it, the unacknowledged messages, and the
//! fallback to the offline store.
//!
//! The link task owns the write half of the connection and sends. A separate reader task per
//! connection reads frames, opens tokens, settles acknowledgements and reports back over an
//! unbounded channel (bounded in practice by the peer's in-flight window), so a link blocked
//! writing never stops acknowledgements from being read: two links writing to each other
//! cannot deadlock. The messages in flight are shared by the link and its readers
//! ([`Unacked`]): a reader takes an acknowledged message out and reports it delivered itself,
//! without a hand-off to the link.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::handshake::{self, FrameReader, FrameWriter};
use super::{Disposition, HANDSHAKE_TIMEOUT, SHUTDOWN_GRACE, Shared, lock};
use crate::crypto::{PairKey, PayloadRef};
use crate::event::Event;
use crate::identity::PublicKey;
use crate::protocol::{MAX_ACK_BATCH, MessageId, PeerFrame};
use crate::store::StoredMessage;

/// Commands queued for one link before `send` waits. Default: 1024.
pub const LINK_QUEUE_CAPACITY: usize = 1024;

/// Messages sent to one peer and not yet acknowledged before the link stops taking more.
/// Default: 4096.
pub const MAX_IN_FLIGHT: usize = 4096;

/// Frames a reader processes before recording them and acknowledging. Default: 256.
const READ_BATCH: usize = 256;

/// Commands a link sends before flushing. Default: 256.
const WRITE_BATCH: usize = 256;

/// After a failed dial, messages go straight to the offline store for this long, unless the
/// directory says the peer came online. Default: 2 s.
const DIAL_BACKOFF: Duration = Duration::from_secs(2);

/// An idle connection is probed this often. Default: 15 s.
const PING_INTERVAL: Duration = Duration::from_secs(15);

/// What a link is asked to do.
#[derive(Debug)]
pub(crate) enum LinkCmd {
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
    /// Send what is queued, wait a little for acks, store the rest, stop.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) id: MessageId,
    pub(crate) body: String,
    pub(crate) sent_at_ms: u64,
}

pub(crate) struct Established {
    pub(crate) reader: FrameReader,
    pub(crate) writer: FrameWriter,
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

    pub(crate) async fn hold(&self) {
        let _ = self.send(LinkCmd::Hold).await;
    }
}

/// What a reader tells its link.
#[derive(Debug)]
enum FromReader {
    /// Acknowledgements took messages out of flight while the link waited for that.
    Settled,
    /// The peer refused this one.
    Rejected(MessageId, String),
    /// We processed these; acknowledge them.
    AckThese(u64, Vec<MessageId>),
    /// We could not accept this one; tell the peer.
    RejectThis(u64, MessageId, String),
    Ping(u64, u64),
    Pong(u64),
    Closed(u64, String),
}

struct InFlight {
    id: MessageId,
    token: String,
    sent_at_ms: u64,
    sent: Instant,
}

/// The messages sent to one peer and not yet acknowledged, oldest first: shared by the link
/// (which adds, times out, resends and stores them) and its readers (which settle
/// acknowledgements). Never held across an `.await`.
#[derive(Default)]
struct Unacked {
    entries: VecDeque<InFlight>,
    /// The link waits for room or, shutting down, for everything to settle: a reader that
    /// settles something tells it.
    link_waiting: bool,
}

impl Unacked {
    fn take(&mut self, id: MessageId) -> Option<InFlight> {
        if self.entries.front().is_some_and(|m| m.id == id) {
            return self.entries.pop_front();
        }
        let i = self.entries.iter().position(|m| m.id == id)?;
        self.entries.remove(i)
    }
}

struct Conn {
    id: u64,
    writer: FrameWriter,
    reader: tokio::task::JoinHandle<()>,
    dialed_by_me: bool,
    ping: Option<(u64, Instant)>,
    last_ping: Instant,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Link {
    shared: Arc<Shared>,
    peer: String,
    key: PublicKey,
    pair: Option<PairKey>,
    held: bool,
    /// Messages waiting while held.
    queue: VecDeque<Outgoing>,
    in_flight: Arc<Mutex<Unacked>>,
    conn: Option<Conn>,
    next_conn: u64,
    reader_tx: mpsc::UnboundedSender<FromReader>,
    reader_rx: mpsc::UnboundedReceiver<FromReader>,
    cmds: mpsc::Receiver<LinkCmd>,
    dial_after: Instant,
    closing: Option<(Instant, oneshot::Sender<()>)>,
}

pub(crate) fn spawn(shared: Arc<Shared>, peer: String, key: PublicKey) -> LinkHandle {
    let (tx, cmds) = mpsc::channel(LINK_QUEUE_CAPACITY);
    let (reader_tx, reader_rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("link", me = %shared.me(), peer = %peer);
    let pair = shared.pair_key(&key).ok();
    let link = Link {
        shared: shared.clone(),
        peer,
        key,
        held: pair.is_none(),
        pair,
        queue: VecDeque::new(),
        in_flight: Arc::default(),
        conn: None,
        next_conn: 0,
        reader_tx,
        reader_rx,
        cmds,
        dial_after: Instant::now(),
        closing: None,
    };
    shared.spawn(link.run().instrument(span));
    LinkHandle { tx }
}

impl Link {
    fn unacked(&self) -> std::sync::MutexGuard<'_, Unacked> {
        lock(&self.in_flight)
    }

    /// Whether another message may go out; if not, a reader wakes the link when one settles.
    fn has_room(&self) -> bool {
        let mut unacked = self.unacked();
        let room = unacked.entries.len() < MAX_IN_FLIGHT;
        unacked.link_waiting |= !room;
        room
    }

    /// Whether nothing is in flight; if something is, a reader wakes the link when it settles.
    fn all_settled(&self) -> bool {
        let mut unacked = self.unacked();
        let settled = unacked.entries.is_empty();
        unacked.link_waiting |= !settled;
        settled
    }

    fn take_all_unacked(&self) -> Vec<InFlight> {
        self.unacked().entries.drain(..).collect()
    }

    async fn run(mut self) {
        let halt = self.shared.halt.clone();
        let tick_every = (self.shared.config.ack_timeout / 4).max(Duration::from_millis(20));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let can_take = self.has_room();
            tokio::select! {
                biased;
                _ = halt.cancelled() => return,
                Some(ev) = self.reader_rx.recv() => self.on_reader(ev).await,
                cmd = self.cmds.recv(), if can_take => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    // Every handle is gone and the node is not shutting us down: settle.
                    None => {
                        self.store_all("the node is stopping").await;
                        return;
                    }
                },
                _ = tick.tick() => self.on_tick().await,
            }
            self.flush().await;
            if let Some((deadline, _)) = &self.closing {
                let settled = self.cmds.is_empty() && self.all_settled();
                if settled || Instant::now() >= *deadline {
                    self.store_all("the node shut down before the peer acknowledged")
                        .await;
                    if let Some((_, done)) = self.closing.take() {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }

    async fn on_cmd(&mut self, cmd: LinkCmd) {
        match cmd {
            LinkCmd::Send(msg) => {
                self.on_send(msg).await;
                // Pipeline: take what else is queued before flushing once.
                let mut n = 1;
                while n < WRITE_BATCH && self.has_room() {
                    match self.cmds.try_recv() {
                        Ok(LinkCmd::Send(msg)) => self.on_send(msg).await,
                        Ok(other) => {
                            self.flush().await;
                            Box::pin(self.on_cmd(other)).await;
                            break;
                        }
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            LinkCmd::Inbound(est) => self.adopt(est, false).await,
            LinkCmd::PeerOnline => {
                self.dial_after = Instant::now();
            }
            LinkCmd::Hold => self.held = true,
            LinkCmd::Trusted(key) => {
                self.key = key;
                if self.conn.take().is_some() {
                    self.resend_or_store().await;
                }
                match self.shared.pair_key(&key) {
                    Ok(pair) => {
                        self.pair = Some(pair);
                        self.held = false;
                        self.dial_after = Instant::now();
                        for msg in std::mem::take(&mut self.queue) {
                            self.on_send(msg).await;
                        }
                    }
                    Err(e) => self.fail_queue(&e.to_string()),
                }
            }
            LinkCmd::Disconnect => {
                // The peer was blocked: what it has not acknowledged waits in the store.
                if self.conn.take().is_some() {
                    self.resend_or_store().await;
                }
            }
            LinkCmd::Shutdown(done) => {
                self.closing = Some((Instant::now() + SHUTDOWN_GRACE, done));
            }
        }
    }

    async fn on_send(&mut self, msg: Outgoing) {
        if self.conn.is_none() && self.closing.is_none() {
            self.connect().await;
        }
        let Some(pair) = self.pair.as_ref().filter(|_| !self.held) else {
            // The peer's key changed: wait for the user to trust the new one.
            self.queue.push_back(msg);
            return;
        };
        let token = pair.seal_ref(&PayloadRef {
            id: msg.id,
            from: self.shared.me(),
            to: &self.peer,
            sent_at_ms: msg.sent_at_ms,
            body: &msg.body,
        });
        let entry = InFlight {
            id: msg.id,
            token,
            sent_at_ms: msg.sent_at_ms,
            sent: Instant::now(),
        };
        if self.conn.is_some() {
            self.transmit(entry).await;
        } else {
            self.store(vec![entry]).await;
        }
    }

    /// Writes a newly sealed message to the connection (not flushed) and tracks it.
    async fn transmit(&mut self, mut entry: InFlight) {
        let Some(conn) = &mut self.conn else {
            self.store(vec![entry]).await;
            return;
        };
        let frame = PeerFrame::Message {
            id: entry.id,
            token: std::mem::take(&mut entry.token),
        };
        let written = feed(conn, &frame, self.shared.config.ack_timeout).await;
        let PeerFrame::Message { token, .. } = frame else {
            unreachable!("constructed above")
        };
        entry.token = token;
        // Only now: `feed` leaves this frame in the write buffer (it flushes only what was
        // there before), so its acknowledgement cannot arrive before the entry is in place.
        self.unacked().entries.push_back(entry);
        if let Err(e) = written {
            self.lost(&e).await;
        }
    }

    async fn flush(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        let timeout = self.shared.config.ack_timeout;
        match tokio::time::timeout(timeout, SinkExt::<&PeerFrame>::flush(&mut conn.writer)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.lost(&format!("write failed: {e}")).await,
            Err(_) => self.lost("the peer stopped reading").await,
        }
    }

    async fn on_reader(&mut self, ev: FromReader) {
        let current = self.conn.as_ref().map(|c| c.id);
        match ev {
            // The select loop re-checks for room and settlement after every event.
            FromReader::Settled => {}
            FromReader::Rejected(id, reason) => {
                let refused = self.unacked().take(id);
                if refused.is_some() {
                    self.shared.emit(Event::SendFailed {
                        id,
                        to: self.peer.clone(),
                        reason: format!("{} refused the message: {reason}", self.peer),
                    });
                }
            }
            FromReader::AckThese(conn, ids) if Some(conn) == current => {
                for chunk in ids.chunks(MAX_ACK_BATCH) {
                    let tag = match &self.pair {
                        Some(pair) => pair.ack_tag(self.shared.me(), chunk),
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
                let Some(pair) = &self.pair else { return };
                let tag = pair.reject_tag(self.shared.me(), id, &detail);
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
            FromReader::Closed(conn, reason) if Some(conn) == current => {
                self.lost(&reason).await;
            }
            // Reports from a connection that has since been replaced.
            _ => {}
        }
    }

    async fn write(&mut self, frame: PeerFrame) {
        let Some(conn) = &mut self.conn else { return };
        if let Err(e) = feed(conn, &frame, self.shared.config.ack_timeout).await {
            self.lost(&e).await;
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let timeout = self.shared.config.ack_timeout;
        let (overdue, idle) = {
            let unacked = self.unacked();
            let oldest = unacked.entries.front();
            (
                oldest.is_some_and(|m| now.duration_since(m.sent) >= timeout),
                oldest.is_none(),
            )
        };
        if overdue {
            self.lost("no acknowledgement in time").await;
            return;
        }
        let Some(conn) = &mut self.conn else { return };
        if let Some((_, sent)) = conn.ping {
            if now.duration_since(sent) >= timeout {
                self.lost("no answer to ping").await;
            }
        } else if idle && now.duration_since(conn.last_ping) >= PING_INTERVAL {
            let n: u64 = rand::random();
            conn.ping = Some((n, now));
            conn.last_ping = now;
            self.write(PeerFrame::Ping(n)).await;
        }
    }

    /// The connection is gone: resend what is unacknowledged over a fresh one, or store it.
    async fn lost(&mut self, reason: &str) {
        if self.conn.take().is_none() {
            return;
        }
        let unacked = self.unacked().entries.len();
        tracing::debug!(peer = %self.peer, %reason, unacked, "connection lost");
        self.resend_or_store().await;
    }

    async fn resend_or_store(&mut self) {
        if self.unacked().entries.is_empty() {
            return;
        }
        if self.closing.is_none() {
            self.connect().await;
        }
        if self.conn.is_some() {
            Box::pin(self.resend_unacked()).await;
        } else {
            let pending = self.take_all_unacked();
            self.store(pending).await;
        }
    }

    /// Writes every unacknowledged message again on the current connection, leaving each in
    /// flight meanwhile: an acknowledgement read on the old connection while this runs still
    /// settles it. Their `sent` stays the first transmission, so a peer that keeps accepting
    /// and dropping the connection cannot keep a message from timing out into the offline
    /// store.
    async fn resend_unacked(&mut self) {
        let frames: Vec<PeerFrame> = self
            .unacked()
            .entries
            .iter()
            .map(|m| PeerFrame::Message {
                id: m.id,
                token: m.token.clone(),
            })
            .collect();
        let timeout = self.shared.config.ack_timeout;
        for frame in &frames {
            let Some(conn) = &mut self.conn else { return };
            if let Err(e) = feed(conn, frame, timeout).await {
                // Resends (or stores) everything still in flight, on a fresh connection.
                self.lost(&e).await;
                return;
            }
        }
    }

    /// Tries to open a connection, unless a recent attempt failed.
    async fn connect(&mut self) {
        if Instant::now() < self.dial_after
            || self.held
            || self.shared.peer_state().is_blocked(&self.peer)
        {
            return;
        }
        self.dial_after = Instant::now() + DIAL_BACKOFF;
        let record = match self.shared.resolve(&self.peer).await {
            Ok((record, None)) => record,
            Ok((record, Some(pinned))) => {
                self.shared
                    .key_changed(&self.peer, &pinned, &record.public_key);
                self.held = true;
                return;
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "lookup failed");
                return;
            }
        };
        if !record.online {
            return;
        }
        for addr in record.addrs {
            let attempt = async {
                let conn = self
                    .shared
                    .transport
                    .dial(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let (mut reader, mut writer) = handshake::frames(conn);
                handshake::dial(
                    &mut reader,
                    &mut writer,
                    &self.shared.identity,
                    self.shared.me(),
                    &self.peer,
                    &self.key,
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok::<_, String>(Established { reader, writer })
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
                Ok(Ok(est)) => {
                    self.adopt(est, true).await;
                    return;
                }
                Ok(Err(e)) => tracing::debug!(peer = %self.peer, %addr, error = %e, "dial failed"),
                Err(_) => tracing::debug!(peer = %self.peer, %addr, "dial timed out"),
            }
        }
    }

    /// Takes a new authenticated connection. With one already open, both ends keep the one
    /// dialed by the side with the smaller key (or the newer, if one side dialed both), so
    /// simultaneous dials converge on one connection per pair.
    async fn adopt(&mut self, est: Established, dialed_by_me: bool) {
        let Some(pair) = self.pair.clone() else {
            return;
        };
        if let Some(existing) = &self.conn {
            let me_smaller = self.shared.identity.public_key().to_bytes() < self.key.to_bytes();
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
                    pair,
                    peer: self.peer.clone(),
                    conn: id,
                    unacked: self.in_flight.clone(),
                    to_link: self.reader_tx.clone(),
                },
                est.reader,
            )
            .in_current_span(),
        );
        let replaced = self.conn.replace(Conn {
            id,
            writer: est.writer,
            reader,
            dialed_by_me,
            ping: None,
            last_ping: Instant::now(),
        });
        if replaced.is_some() {
            // Whatever was unacknowledged on the old connection goes again on the new one;
            // the peer drops what it already has by id.
            Box::pin(self.resend_unacked()).await;
        }
    }

    async fn store(&mut self, entries: Vec<InFlight>) {
        let ttl = self.shared.config.message_ttl;
        for entry in entries {
            let message = StoredMessage {
                id: entry.id,
                from: self.shared.me().to_owned(),
                to: self.peer.clone(),
                token: entry.token,
                expires_at: UNIX_EPOCH + Duration::from_millis(entry.sent_at_ms) + ttl,
            };
            let event = match self.shared.store.put(message).await {
                Ok(()) => Event::StoredOffline {
                    id: entry.id,
                    to: self.peer.clone(),
                },
                Err(e) => Event::SendFailed {
                    id: entry.id,
                    to: self.peer.clone(),
                    reason: format!(
                        "{} is unreachable and the offline store failed: {e}",
                        self.peer
                    ),
                },
            };
            self.shared.emit(event);
        }
    }

    /// Stores everything unacknowledged or queued; used when the link stops.
    async fn store_all(&mut self, reason: &str) {
        self.conn = None;
        let pending = self.take_all_unacked();
        self.store(pending).await;
        // Close first: a send racing the stop is either queued here or refused to its caller.
        self.cmds.close();
        while let Some(cmd) = self.cmds.recv().await {
            match cmd {
                LinkCmd::Send(msg) => self.queue.push_back(msg),
                LinkCmd::Shutdown(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
        if self.held || self.pair.is_none() {
            self.fail_queue(reason);
            return;
        }
        for msg in std::mem::take(&mut self.queue) {
            self.on_send(msg).await;
        }
    }

    fn fail_queue(&mut self, reason: &str) {
        for msg in std::mem::take(&mut self.queue) {
            self.shared.emit(Event::SendFailed {
                id: msg.id,
                to: self.peer.clone(),
                reason: format!("not sent ({reason}); the peer's key changed and was not trusted"),
            });
        }
    }
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
    unacked: Arc<Mutex<Unacked>>,
    to_link: mpsc::UnboundedSender<FromReader>,
}

/// Takes the acknowledged messages out of flight and reports each delivered, once: an id no
/// longer in flight (acknowledged twice after a resend, or already stored) is ignored.
/// Returns whether the link waits to hear of it.
fn settle(shared: &Shared, peer: &str, unacked: &Mutex<Unacked>, ids: &[MessageId]) -> bool {
    let mut delivered = Vec::with_capacity(ids.len());
    let wake_link = {
        let mut unacked = lock(unacked);
        delivered.extend(ids.iter().filter_map(|&id| unacked.take(id).map(|m| m.id)));
        !delivered.is_empty() && std::mem::take(&mut unacked.link_waiting)
    };
    for id in delivered {
        shared.emit(Event::Delivered {
            id,
            to: peer.to_owned(),
        });
    }
    wake_link
}

/// Reads one connection until it closes. Processes frames in batches: open and record each
/// message, make the batch's ids durable, emit the events, then acknowledge the batch.
async fn read_loop(side: ReadSide, mut reader: FrameReader) {
    let ReadSide {
        shared,
        pair,
        peer,
        conn,
        unacked,
        to_link,
    } = side;
    let halt = shared.halt.clone();
    let mut batch = Vec::with_capacity(READ_BATCH);
    let mut acks = Vec::with_capacity(READ_BATCH);
    let mut shown = Vec::with_capacity(READ_BATCH);
    let mut recorded = Vec::with_capacity(READ_BATCH);
    let reason = loop {
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
                PeerFrame::Message { id, token } => {
                    match shared.receive(&pair, &peer, id, &token, false) {
                        Disposition::Show(event) => {
                            shown.push(event);
                            recorded.push(id);
                            acks.push(id);
                        }
                        Disposition::Hide => {
                            recorded.push(id);
                            acks.push(id);
                        }
                        Disposition::Drop => acks.push(id),
                        Disposition::Reject(e) => {
                            tracing::warn!(peer = %peer, error = %e, "rejected a message");
                            shared.emit(Event::Error {
                                message: format!("a message from {peer} was rejected: {e}"),
                            });
                            let _ = to_link.send(FromReader::RejectThis(conn, id, e.to_string()));
                        }
                    }
                }
                PeerFrame::Ack { ids, tag } => {
                    if !pair.verify_ack(&peer, &ids, &tag) {
                        end = Some("forged acknowledgement".into());
                        break;
                    }
                    let wake_link = settle(&shared, &peer, &unacked, &ids);
                    if wake_link {
                        let _ = to_link.send(FromReader::Settled);
                    }
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
        if !acks.is_empty() {
            shared.commit_seen(recorded.drain(..).map(|id| (peer.as_str(), id)));
            for event in shown.drain(..) {
                shared.emit(event);
            }
            let _ = to_link.send(FromReader::AckThese(conn, std::mem::take(&mut acks)));
        }
        if let Some(reason) = end {
            break reason;
        }
    };
    let _ = to_link.send(FromReader::Closed(conn, reason));
}
