//! One client connection: the registration handshake, then requests, pushes and presence.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::BoxStream;
use p2pchat_core::discovery::{MAX_PAGE_SIZE, Page, PeerRecord};
use p2pchat_core::limits::limit_key;
use p2pchat_core::protocol::discovery::{
    ClientFrame, MAX_ANNOUNCED_ADDRS, MAX_WATCHES, Push, RegisterRequest, Registered, Reply,
    Request, ServerFrame, WireError, register_transcript,
};
use p2pchat_core::protocol::{
    FrameCodec, MAX_ACK_BATCH, MAX_TOKEN_LEN, NONCE_LEN, PROTOCOL_VERSION, ProtocolError,
    validate_username,
};
use p2pchat_core::store::{MAX_FETCH_BATCH, MAX_MESSAGE_TTL, StoreError, StoredMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::server::{SESSION_PUSH_CAPACITY, Server};
use crate::storage::{Lease, SessionId, StorageError, touch_interval};

/// Initial read buffer of a session; it grows for a larger frame. Small, because most
/// sessions are idle. Default: 256 bytes.
const READ_BUFFER: usize = 256;

/// A write buffer grown past this (by a large listing page) is released after the write.
const KEEP_WRITE_BUFFER: usize = 4096;

/// How long one frame may take to write before the client is considered stuck. Default: 10 s.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Reader<R> = FramedRead<R, FrameCodec<ClientFrame>>;

/// Writes whole frames, with a deadline, through a small reused buffer.
struct Writer<W> {
    half: W,
    codec: FrameCodec<ServerFrame>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), ProtocolError> {
        self.buf.clear();
        self.codec.encode(frame, &mut self.buf)?;
        match tokio::time::timeout(WRITE_TIMEOUT, self.half.write_all(&self.buf)).await {
            Ok(written) => written?,
            Err(_) => {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client does not read",
                )));
            }
        }
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = BytesMut::new();
        }
        Ok(())
    }
}

/// How long a closing connection's incoming bytes are still read (and dropped) after the
/// server's last frame: closing with unread bytes would reset the connection, and the client
/// might never read why it was closed. Default: 1 s.
const LINGER: Duration = Duration::from_secs(1);

/// Closes the connection: our side first, then waits (bounded) for the client's end.
async fn close<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut writer: Writer<W>,
    reader: Reader<R>,
) {
    let _ = writer.half.shutdown().await;
    let mut read = reader.into_inner();
    let mut sink = [0u8; 512];
    let drained = async { while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// Sends a last error frame, best effort, and closes.
async fn refuse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut writer: Writer<W>,
    reader: Reader<R>,
    error: WireError,
) {
    tracing::debug!(%error, "closing the connection");
    let _ = writer.send(&ServerFrame::Error(error)).await;
    close(writer, reader).await;
}

/// The wire error a decoding failure earns, or `None` when the connection itself failed.
fn decode_error(e: ProtocolError) -> Option<WireError> {
    match e {
        ProtocolError::UnsupportedVersion { got } => Some(WireError::UnsupportedVersion(format!(
            "this server speaks version {PROTOCOL_VERSION}, the frame has {got}"
        ))),
        e @ ProtocolError::FrameTooLarge { .. } => Some(WireError::LimitExceeded(e.to_string())),
        ProtocolError::Io(_) => None,
        e => Some(WireError::BadFrame(e.to_string())),
    }
}

fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::QuotaExceeded { recipient, quota } => WireError::QuotaExceeded {
            recipient,
            quota: quota as u64,
        },
        StoreError::Forbidden(what) => WireError::Forbidden(what),
        e => {
            tracing::warn!(error = %e, "mailbox failed");
            WireError::Backend(e.to_string())
        }
    }
}

fn backend(e: StorageError) -> WireError {
    match e {
        StorageError::NameTaken(username) => WireError::NameTaken { username },
        e => {
            tracing::warn!(error = %e, "storage failed");
            WireError::Backend(e.to_string())
        }
    }
}

/// Handles one accepted connection from start to end.
pub(crate) async fn run(
    server: Arc<Server>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    serve_connection(server, read, write, peer, stop).await;
}

/// [`run`] over any byte stream, split into its halves: `peer` is the address the client is
/// taken to connect from.
pub(crate) async fn serve_connection<R, W>(
    server: Arc<Server>,
    read: R,
    write: W,
    peer: SocketAddr,
    stop: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FramedRead::with_capacity(read, FrameCodec::default(), READ_BUFFER);
    let mut writer = Writer {
        half: write,
        codec: FrameCodec::default(),
        buf: BytesMut::new(),
    };
    let _permit = match server.connections.try_acquire(peer.ip()) {
        Ok(permit) => permit,
        Err(refused) => {
            tracing::info!(%refused, "connection refused");
            refuse(
                writer,
                reader,
                WireError::LimitExceeded(refused.to_string()),
            )
            .await;
            return;
        }
    };
    let limit = server.config.handshake_timeout;
    let registered = tokio::select! {
        _ = stop.cancelled() => Err(Some(WireError::ShuttingDown)),
        outcome = tokio::time::timeout(limit, register(&server, &mut reader, &mut writer, peer)) => {
            outcome.unwrap_or_else(|_| Err(Some(WireError::LimitExceeded(format!(
                "registration must complete within {} ms", limit.as_millis()
            )))))
        }
    };
    match registered {
        Ok(Opening::Session(session, mail)) => session.serve(reader, writer, mail, stop).await,
        Ok(Opening::Announced) => close(writer, reader).await,
        Err(Some(error)) => refuse(writer, reader, error).await,
        Err(None) => {}
    }
}

/// What a connection turned out to be.
enum Opening {
    /// A registered session, and its new-mail notices.
    Session(Box<Session>, BoxStream<'static, ()>),
    /// An operator's announcement, relayed and answered.
    Announced,
}

/// Relays a signed announcement (through the storage, so every instance sharing it relays it
/// too) and answers how many sessions this instance has.
async fn announce<W: AsyncWrite + Unpin>(
    server: &Arc<Server>,
    writer: &mut Writer<W>,
    announcement: &p2pchat_core::Announcement,
) -> Result<Opening, Option<WireError>> {
    server.admit_announcement(announcement).map_err(Some)?;
    server
        .storage
        .publish_announcement(announcement)
        .await
        .map_err(|e| Some(backend(e)))?;
    let sessions = server.registered_sessions() as u64;
    tracing::info!(id = %announcement.id, sessions, "announcement accepted");
    writer
        .send(&ServerFrame::Announced { sessions })
        .await
        .map_err(|_| None)?;
    Ok(Opening::Announced)
}

/// Challenge, verify, claim, go online (or relay an announcement). `Err(None)`: the
/// connection failed, say nothing.
async fn register<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    server: &Arc<Server>,
    reader: &mut Reader<R>,
    writer: &mut Writer<W>,
    peer: SocketAddr,
) -> Result<Opening, Option<WireError>> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    writer
        .send(&ServerFrame::Challenge { nonce })
        .await
        .map_err(|_| None)?;
    let request: Box<RegisterRequest> = match reader.next().await {
        Some(Ok(ClientFrame::Register(request))) => request,
        Some(Ok(ClientFrame::Announce(announcement))) => {
            return announce(server, writer, &announcement).await;
        }
        Some(Ok(_)) => {
            return Err(Some(WireError::BadFrame(
                "the first frame must be a registration".into(),
            )));
        }
        Some(Err(e)) => return Err(decode_error(e)),
        None => return Err(None),
    };
    if !server.registrations.allow(&limit_key(peer.ip())) {
        return Err(Some(WireError::RateLimited));
    }
    let claim = &request.claim;
    validate_username(&claim.username)
        .map_err(|_| Some(WireError::InvalidUsername(claim.username.clone())))?;
    if claim.announce.len() > MAX_ANNOUNCED_ADDRS {
        return Err(Some(WireError::LimitExceeded(format!(
            "at most {MAX_ANNOUNCED_ADDRS} announced addresses"
        ))));
    }
    if !claim
        .public_key
        .verify(&register_transcript(&nonce, claim), &request.signature)
    {
        return Err(Some(WireError::BadSignature));
    }
    let storage = &server.storage;
    let config = &server.config;
    storage
        .claim(&claim.username, &claim.public_key, config.claim_lapse)
        .await
        .map_err(|e| Some(backend(e)))?;
    let addrs = if claim.announce.is_empty() {
        vec![SocketAddr::new(peer.ip(), claim.listen_port)]
    } else {
        claim.announce.clone()
    };
    let lease = Lease {
        username: claim.username.clone(),
        public_key: claim.public_key,
        addrs: addrs.clone(),
        session: SessionId::random(),
    };
    storage
        .set_online(&lease, config.presence_ttl)
        .await
        .map_err(|e| Some(backend(e)))?;
    let mail = storage
        .mailbox()
        .subscribe(&lease.username)
        .await
        .map_err(|e| Some(WireError::Backend(e.to_string())))?;
    let (pushes, push_rx) = mpsc::channel(SESSION_PUSH_CAPACITY);
    let check = server.add_session(&lease.username, lease.session, pushes.clone());
    let session = Session {
        server: server.clone(),
        lease,
        since: Instant::now(),
        check,
        pushes,
        push_rx,
        watching: HashSet::new(),
    };
    let confirmation = ServerFrame::Registered(Box::new(Registered {
        observed: peer,
        addrs,
        presence_ttl_ms: config.presence_ttl.as_millis() as u64,
        operator_key: server.operator_key,
    }));
    if writer.send(&confirmation).await.is_err() {
        session.end(false).await;
        return Err(None);
    }
    tracing::debug!(user = %session.lease.username, "registered");
    Ok(Opening::Session(Box::new(session), mail))
}

/// A registered session.
struct Session {
    server: Arc<Server>,
    lease: Lease,
    since: Instant,
    /// Woken when another registration of the same user may have replaced this one.
    check: Arc<Notify>,
    pushes: mpsc::Sender<Push>,
    push_rx: mpsc::Receiver<Push>,
    watching: HashSet<String>,
}

/// What to do after answering a request.
enum Then {
    Continue,
    Close,
    Replaced,
}

impl Session {
    async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        mut self,
        mut reader: Reader<R>,
        mut writer: Writer<W>,
        mut mail: BoxStream<'static, ()>,
        stop: CancellationToken,
    ) {
        let idle = self.server.config.idle_timeout;
        let mut last_frame = Instant::now();
        let replaced = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = writer.send(&ServerFrame::Error(WireError::ShuttingDown)).await;
                    break false;
                }
                _ = self.check.notified() => {
                    if self.is_replaced().await {
                        break true;
                    }
                }
                Some(push) = self.push_rx.recv() => {
                    if writer.send(&ServerFrame::Push(push)).await.is_err() {
                        break false;
                    }
                }
                Some(()) = mail.next() => {
                    if writer.send(&ServerFrame::Push(Push::NewMail)).await.is_err() {
                        break false;
                    }
                }
                frame = tokio::time::timeout_at(last_frame + idle, reader.next()) => {
                    let frame = match frame {
                        Err(_) => {
                            tracing::debug!("idle session closed");
                            break false;
                        }
                        Ok(None) => break false,
                        Ok(Some(frame)) => frame,
                    };
                    last_frame = Instant::now();
                    match frame {
                        Ok(ClientFrame::Request { id, request }) => {
                            let (result, then) = self.handle(request).await;
                            if writer.send(&ServerFrame::Response { id, result }).await.is_err() {
                                break false;
                            }
                            match then {
                                Then::Continue => {}
                                Then::Close => break false,
                                Then::Replaced => break true,
                            }
                        }
                        Ok(_) => {
                            let _ = writer.send(&ServerFrame::Error(WireError::BadFrame(
                                "this session is already registered".into(),
                            ))).await;
                            break false;
                        }
                        Err(e) => {
                            if let Some(error) = decode_error(e) {
                                tracing::debug!(%error, "bad frame");
                                let _ = writer.send(&ServerFrame::Error(error)).await;
                            }
                            break false;
                        }
                    }
                }
            }
        };
        if replaced {
            tracing::debug!(user = %self.lease.username, "replaced by a newer registration");
            let _ = writer.send(&ServerFrame::Push(Push::Replaced)).await;
        }
        self.end(replaced).await;
        close(writer, reader).await;
    }

    /// Whether the storage's lease for this user now names another session.
    async fn is_replaced(&self) -> bool {
        match self.server.storage.online(&self.lease.username).await {
            Ok(Some(current)) => current.session != self.lease.session,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the lease; keeping the session");
                false
            }
        }
    }

    /// Takes the session out of every table and, unless it was replaced, offline.
    async fn end(self, replaced: bool) {
        let server = &self.server;
        let lease = &self.lease;
        for target in &self.watching {
            server.unwatch(target, lease.session);
        }
        server.remove_session(&lease.username, lease.session);
        if !replaced
            && let Err(e) = server
                .storage
                .set_offline(&lease.username, lease.session)
                .await
        {
            tracing::warn!(user = %lease.username, error = %e, "cannot mark offline; the lease will expire");
        }
        // The claim's inactivity clock starts when its owner leaves; short sessions are
        // already covered by the registration's own touch.
        if self.since.elapsed() >= touch_interval(server.config.claim_lapse)
            && let Err(e) = server
                .storage
                .touch(&lease.username, &lease.public_key)
                .await
        {
            tracing::warn!(user = %lease.username, error = %e, "cannot record last seen");
        }
    }

    async fn handle(&mut self, request: Request) -> (Result<Reply, WireError>, Then) {
        let storage = &self.server.storage;
        let config = &self.server.config;
        let lease = &self.lease;
        match request {
            Request::KeepAlive => {
                match storage
                    .refresh(&lease.username, lease.session, config.presence_ttl)
                    .await
                {
                    Ok(true) => (Ok(Reply::Done), Then::Continue),
                    Ok(false) => match storage.online(&lease.username).await {
                        Ok(Some(current)) if current.session != lease.session => {
                            (Ok(Reply::Done), Then::Replaced)
                        }
                        // Missed its keep-alives but is still here: online again, unless a
                        // newer registration took the name meanwhile (then that one wins).
                        Ok(_) => match storage.revive(lease, config.presence_ttl).await {
                            Ok(true) => (Ok(Reply::Done), Then::Continue),
                            Ok(false) => (Ok(Reply::Done), Then::Replaced),
                            Err(e) => (Err(backend(e)), Then::Continue),
                        },
                        Err(e) => (Err(backend(e)), Then::Continue),
                    },
                    Err(e) => (Err(backend(e)), Then::Continue),
                }
            }
            Request::Lookup { username } => (self.lookup(&username).await, Then::Continue),
            Request::ListOnline { after, limit } => {
                let limit = (limit as usize).clamp(1, MAX_PAGE_SIZE);
                let listed = storage.list_online(after.as_deref(), limit + 1).await;
                let result = listed.map_err(backend).map(|leases| {
                    let now = SystemTime::now();
                    let mut users: Vec<PeerRecord> =
                        leases.into_iter().map(|l| online_record(l, now)).collect();
                    let next = (users.len() > limit).then(|| {
                        users.truncate(limit);
                        users.last().map(|u| u.username.clone())
                    });
                    Reply::Page(Page {
                        users,
                        next: next.flatten(),
                    })
                });
                (result, Then::Continue)
            }
            Request::Watch { username } => {
                if validate_username(&username).is_err() {
                    return (Err(WireError::InvalidUsername(username)), Then::Continue);
                }
                if !self.watching.contains(&username) {
                    if self.watching.len() >= MAX_WATCHES {
                        let error = WireError::LimitExceeded(format!(
                            "a session may watch at most {MAX_WATCHES} users"
                        ));
                        return (Err(error), Then::Continue);
                    }
                    self.server
                        .watch(&username, lease.session, self.pushes.clone());
                    self.watching.insert(username);
                }
                (Ok(Reply::Done), Then::Continue)
            }
            Request::Unwatch { username } => {
                if self.watching.remove(&username) {
                    self.server.unwatch(&username, lease.session);
                }
                (Ok(Reply::Done), Then::Continue)
            }
            Request::Deregister => {
                // `end` takes the session offline once the answer is written.
                (Ok(Reply::Done), Then::Close)
            }
            Request::Deposit(message) => (self.deposit(*message).await, Then::Continue),
            Request::FetchMail { limit } => {
                let limit = (limit as usize).clamp(1, MAX_FETCH_BATCH);
                let fetched = storage
                    .mailbox()
                    .fetch(&lease.username, limit)
                    .await
                    .map(within_reply_budget);
                (fetched.map_err(store_error), Then::Continue)
            }
            Request::AckMail { ids } => {
                if ids.len() > MAX_ACK_BATCH {
                    let error = WireError::LimitExceeded(format!(
                        "at most {MAX_ACK_BATCH} ids per acknowledgement"
                    ));
                    return (Err(error), Then::Continue);
                }
                let acked = storage.mailbox().ack(&lease.username, &ids).await;
                (
                    acked.map(|()| Reply::Done).map_err(store_error),
                    Then::Continue,
                )
            }
            Request::TakeExpired => {
                let taken = storage.mailbox().take_expired(&lease.username).await;
                (
                    taken.map(Reply::Expired).map_err(store_error),
                    Then::Continue,
                )
            }
            other => (
                Err(WireError::BadFrame(format!(
                    "unsupported request {other:?}"
                ))),
                Then::Continue,
            ),
        }
    }

    /// Leaves a message in its recipient's mailbox: in this user's name only, for a claimed
    /// name only, within the deposit rate.
    async fn deposit(&self, mut message: StoredMessage) -> Result<Reply, WireError> {
        let me = &self.lease.username;
        if message.token.len() > MAX_TOKEN_LEN {
            return Err(WireError::LimitExceeded(format!(
                "a stored message is at most {MAX_TOKEN_LEN} bytes"
            )));
        }
        // Nobody's mail waits longer than the longest TTL, whatever the sender asked.
        let latest = SystemTime::now() + MAX_MESSAGE_TTL;
        message.expires_at = message.expires_at.min(latest);
        if message.from != *me {
            return Err(WireError::Forbidden(format!(
                "{me} may not deposit mail in {}'s name",
                message.from
            )));
        }
        if validate_username(&message.to).is_err() {
            return Err(WireError::InvalidUsername(message.to));
        }
        if !self.server.deposits.allow(me) {
            return Err(WireError::RateLimited);
        }
        let storage = &self.server.storage;
        if storage
            .claim_of(&message.to)
            .await
            .map_err(backend)?
            .is_none()
        {
            return Err(WireError::Forbidden(format!(
                "there is no user named {}",
                message.to
            )));
        }
        storage
            .mailbox()
            .put(message)
            .await
            .map(|()| Reply::Done)
            .map_err(store_error)
    }

    async fn lookup(&self, username: &str) -> Result<Reply, WireError> {
        if validate_username(username).is_err() {
            return Ok(Reply::Record(None));
        }
        let storage = &self.server.storage;
        let Some(claim) = storage.claim_of(username).await.map_err(backend)? else {
            return Ok(Reply::Record(None));
        };
        if let Some(lease) = storage.online(username).await.map_err(backend)? {
            return Ok(Reply::Record(Some(Box::new(online_record(
                lease,
                SystemTime::now(),
            )))));
        }
        let lapsed = SystemTime::now()
            .duration_since(claim.last_seen)
            .is_ok_and(|age| age >= self.server.config.claim_lapse);
        Ok(Reply::Record((!lapsed).then(|| {
            Box::new(PeerRecord {
                username: username.to_owned(),
                public_key: claim.public_key,
                addrs: Vec::new(),
                online: false,
                last_seen: claim.last_seen,
            })
        })))
    }
}

/// Mail tokens one reply may carry, in bytes: the reply must fit in a frame. Default: 192 KiB.
const MAIL_REPLY_BUDGET: usize = 192 * 1024;

/// The oldest messages of `mail` whose tokens fit in [`MAIL_REPLY_BUDGET`] (at least one,
/// which always fits: tokens are at most [`MAX_TOKEN_LEN`]). The rest come with the next
/// fetch.
fn within_reply_budget(mut mail: Vec<StoredMessage>) -> Reply {
    let mut used = 0;
    let keep = mail
        .iter()
        .take_while(|m| {
            used += m.token.len() + m.from.len() + m.to.len() + 64;
            used <= MAIL_REPLY_BUDGET
        })
        .count()
        .max(1);
    mail.truncate(keep);
    Reply::Mail(mail)
}

fn online_record(lease: Lease, now: SystemTime) -> PeerRecord {
    PeerRecord {
        username: lease.username,
        public_key: lease.public_key,
        addrs: lease.addrs,
        online: true,
        last_seen: now,
    }
}
