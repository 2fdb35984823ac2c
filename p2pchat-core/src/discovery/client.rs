//! [`DiscoveryClient`]: the directory kept by a `p2pchat-discovery` server, reached over one
//! persistent session connection that reconnects and re-registers by itself.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use super::mailbox::MailboxStore;
use super::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySession, MAX_PAGE_SIZE, Page, PeerRecord,
    Registration, RelayTicket,
};
use crate::error::{Cause, chain};
use crate::identity::{Identity, PublicKey};
use crate::protocol::discovery::{
    Claim, ClientFrame, MAX_ANNOUNCED_ADDRS, Push, RELAY_JOIN_TIMEOUT, RegisterReachableRequest,
    RegisterRequest, Registered, Reply, Request, ServerFrame, WireError, WirePage, WirePeer,
    WireRelayTicket, register_reachable_transcript, register_transcript,
};
use crate::protocol::{FrameCodec, NONCE_LEN, ProtocolError, validate_username};
use crate::store::OfflineStore;
use crate::transport::Connection;

pub use crate::protocol::discovery::DEFAULT_DISCOVERY_ADDR;

/// How long connecting and registering may take. Default: 5 s.
pub const DISCOVERY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server may take to answer a request before the connection is considered
/// dead and re-established. Default: 10 s.
pub const DISCOVERY_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest wait between reconnection attempts (doubling, with jitter).
/// Default: 250 ms to 30 s.
pub const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_secs(30));

/// Requests queued to a session's connection task. Default: 64.
const SESSION_QUEUE_CAPACITY: usize = 64;

/// New-mail notices buffered for the session's mailbox subscribers (a lagging subscriber
/// still gets a notice). Default: 16.
const MAIL_NOTICE_CAPACITY: usize = 16;

type Reader = FramedRead<OwnedReadHalf, FrameCodec<ServerFrame>>;
type Writer = FramedWrite<OwnedWriteHalf, FrameCodec<ClientFrame>>;

/// A [`Discovery`] backed by a `p2pchat-discovery` server.
///
/// Each registration holds one TCP connection to the server. Requests are pipelined on it and
/// presence changes of watched users are pushed on it. When the connection is lost the
/// session reconnects with backoff, registers again with the same key, and re-watches; while
/// it is away, requests fail fast with [`DiscoveryError::Unreachable`], and connections to
/// peers already made keep working.
#[derive(Debug, Clone)]
pub struct DiscoveryClient {
    addr: String,
    request_timeout: Duration,
    backoff: (Duration, Duration),
}

impl Default for DiscoveryClient {
    /// A client of the server at [`DEFAULT_DISCOVERY_ADDR`].
    fn default() -> Self {
        Self::new(DEFAULT_DISCOVERY_ADDR)
    }
}

impl DiscoveryClient {
    /// A client of the server at `addr` (`host:port`; host names are resolved at each
    /// connection attempt).
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            request_timeout: DISCOVERY_REQUEST_TIMEOUT,
            backoff: RECONNECT_BACKOFF,
        }
    }

    /// The server address this client dials.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How long to wait for an answer before the connection is considered dead.
    /// By default, [`DISCOVERY_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The first and the longest wait between reconnection attempts.
    /// By default, [`RECONNECT_BACKOFF`].
    pub fn reconnect_backoff(mut self, first: Duration, longest: Duration) -> Self {
        self.backoff = (first, longest.max(first));
        self
    }

    fn unreachable(&self, source: Cause) -> DiscoveryError {
        DiscoveryError::Unreachable {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Connects and reads the server's challenge.
    async fn open(&self) -> Result<(Reader, Writer, [u8; NONCE_LEN]), DiscoveryError> {
        self.open_at(&self.addr).await
    }

    /// Connects to the server instance at `addr` and reads its challenge.
    async fn open_at(
        &self,
        addr: &str,
    ) -> Result<(Reader, Writer, [u8; NONCE_LEN]), DiscoveryError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| self.unreachable(Cause::new(e)))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::<ServerFrame>::default());
        let writer = FramedWrite::new(write, FrameCodec::<ClientFrame>::default());
        match self.next_frame(&mut reader).await? {
            ServerFrame::Challenge { nonce } => Ok((reader, writer, nonce)),
            ServerFrame::Error(e) => Err(e.into()),
            other => Err(unexpected(&other)),
        }
    }

    /// `attempt`, failing with `Unreachable` after [`DISCOVERY_CONNECT_TIMEOUT`].
    async fn bounded<T>(
        &self,
        attempt: impl Future<Output = Result<T, DiscoveryError>>,
    ) -> Result<T, DiscoveryError> {
        tokio::time::timeout(DISCOVERY_CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(self.unreachable(Cause::new(format!(
                    "no answer within {} s",
                    DISCOVERY_CONNECT_TIMEOUT.as_secs()
                ))))
            })
    }

    /// Connects, answers the challenge, and waits for the verdict. `true` with it when the
    /// server took part in reachability (`RegisterReachable`); a server from before that
    /// refuses the frame, and is registered with again the older way.
    async fn establish(
        &self,
        identity: &Identity,
        registration: &Registration,
    ) -> Result<(Reader, Writer, Registered, bool), DiscoveryError> {
        let attempt = async {
            match self.register_once(identity, registration, true).await? {
                Ok((reader, writer, registered)) => Ok((reader, writer, registered, true)),
                Err(WireError::BadFrame(why)) => {
                    tracing::info!(server = %self.addr, %why, "the server does not know reachability; registering the older way");
                    match self.register_once(identity, registration, false).await? {
                        Ok((reader, writer, registered)) => Ok((reader, writer, registered, false)),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e.into()),
            }
        };
        self.bounded(attempt).await
    }

    /// One registration attempt on a new connection: `RegisterReachable` or the older
    /// `Register`. The server's refusal is handed back as it came.
    async fn register_once(
        &self,
        identity: &Identity,
        registration: &Registration,
        reachable: bool,
    ) -> Result<Result<(Reader, Writer, Registered), WireError>, DiscoveryError> {
        let (mut reader, mut writer, nonce) = self.open().await?;
        let claim = Claim {
            username: registration.username.clone(),
            public_key: identity.public_key(),
            listen_port: registration.listen_port,
            announce: registration.announce.clone(),
        };
        let frame = if reachable {
            let dialable = registration.dialable;
            let signature = identity.sign(&register_reachable_transcript(&nonce, &claim, dialable));
            ClientFrame::RegisterReachable(Box::new(RegisterReachableRequest {
                claim,
                dialable,
                signature,
            }))
        } else {
            let signature = identity.sign(&register_transcript(&nonce, &claim));
            ClientFrame::Register(Box::new(RegisterRequest { claim, signature }))
        };
        writer
            .send(frame)
            .await
            .map_err(|e| self.unreachable(Cause::new(e)))?;
        match self.next_frame(&mut reader).await? {
            ServerFrame::Registered(registered) => Ok(Ok((reader, writer, *registered))),
            ServerFrame::Error(e) => Ok(Err(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// Joins the relay `ticket` names: a new connection to the server instance, the token,
    /// and the wait for the other side. What follows on the connection is the other side's.
    async fn join(&self, ticket: &WireRelayTicket) -> Result<Connection, DiscoveryError> {
        let addr = ticket
            .addr
            .map_or_else(|| self.addr.clone(), |a| a.to_string());
        let attempt = async {
            let (mut reader, mut writer, _) = self.open_at(&addr).await?;
            writer
                .send(ClientFrame::RelayJoin {
                    token: ticket.token,
                })
                .await
                .map_err(|e| self.unreachable(Cause::new(e)))?;
            match self.next_frame(&mut reader).await? {
                ServerFrame::Relayed => {}
                ServerFrame::Error(e) => return Err(e.into()),
                other => return Err(unexpected(&other)),
            }
            let remote = reader
                .get_ref()
                .peer_addr()
                .map_err(|e| self.unreachable(Cause::new(e)))?;
            // Bytes of the other side that came with `Relayed` are read first.
            let parts = reader.into_parts();
            let early = std::io::Cursor::new(parts.read_buf.freeze());
            Ok(Connection {
                reader: Box::new(tokio::io::AsyncReadExt::chain(early, parts.io)),
                writer: Box::new(writer.into_inner()),
                remote,
            })
        };
        // The other side is told and must connect too.
        tokio::time::timeout(DISCOVERY_CONNECT_TIMEOUT + RELAY_JOIN_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(self.unreachable(Cause::new("the relay was not joined in time")))
            })
    }

    async fn next_frame(&self, reader: &mut Reader) -> Result<ServerFrame, DiscoveryError> {
        match reader.next().await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => Err(self.unreachable(Cause::new(e))),
            None => Err(self.unreachable(Cause::new("the server closed the connection"))),
        }
    }
}

fn unexpected(frame: &ServerFrame) -> DiscoveryError {
    DiscoveryError::Protocol(format!("unexpected frame from the server: {frame:?}"))
}

#[async_trait]
impl Discovery for DiscoveryClient {
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        validate_username(&registration.username)?;
        if registration.announce.len() > MAX_ANNOUNCED_ADDRS {
            return Err(DiscoveryError::LimitExceeded(format!(
                "at most {MAX_ANNOUNCED_ADDRS} announced addresses"
            )));
        }
        let (reader, writer, registered, reach) = self.establish(identity, &registration).await?;
        let reach = Arc::new(AtomicBool::new(reach));
        tracing::debug!(server = %self.addr, addrs = ?registered.addrs, "registered");
        let (cmds_tx, cmds) = mpsc::channel(SESSION_QUEUE_CAPACITY);
        let mail_notices = broadcast::channel(MAIL_NOTICE_CAPACITY).0;
        let mailbox = MailboxStore::new(
            registration.username.clone(),
            self.addr.clone(),
            cmds_tx.downgrade(),
            mail_notices.clone(),
        );
        let span = tracing::info_span!("discovery", user = %registration.username);
        let task = SessionTask {
            client: self.clone(),
            identity: identity.clone(),
            registration,
            events,
            cmds,
            mail_notices,
            watching: BTreeSet::new(),
            next_id: 0,
            pending: VecDeque::new(),
            last_heard: Instant::now(),
            reach: reach.clone(),
        };
        tokio::spawn(task.run(reader, writer).instrument(span));
        Ok(Box::new(ClientSession {
            client: self.clone(),
            addr: self.addr.clone(),
            cmds: cmds_tx,
            mailbox: Arc::new(mailbox),
            operator_key: registered.operator_key,
            reach,
        }))
    }
}

/// Why a call failed: the server's answer (kept whole, so each caller maps it to its own
/// error type), or the session itself.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server refused the request.
    Wire(WireError),
    /// The session could not ask (closed, reconnecting, timed out).
    Session(DiscoveryError),
}

impl From<WireError> for DiscoveryError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::NameTaken { username } => DiscoveryError::NameTaken { username },
            WireError::InvalidUsername(name) => match validate_username(&name) {
                Err(e) => DiscoveryError::InvalidUsername(e),
                Ok(()) => DiscoveryError::Protocol(format!("the server refused the name {name}")),
            },
            WireError::BadSignature => DiscoveryError::BadSignature,
            WireError::RateLimited => DiscoveryError::RateLimited,
            WireError::LimitExceeded(what) => DiscoveryError::LimitExceeded(what),
            WireError::Backend(what) => DiscoveryError::Backend(what),
            WireError::ShuttingDown => DiscoveryError::Closed,
            WireError::Forbidden(why) => DiscoveryError::Refused(why),
            e @ (WireError::BadFrame(_)
            | WireError::UnsupportedVersion(_)
            | WireError::QuotaExceeded { .. }
            | WireError::MailQuota { .. }) => DiscoveryError::Protocol(e.to_string()),
        }
    }
}

/// The API's record of a user, from the wire's.
fn peer_record(peer: WirePeer) -> PeerRecord {
    PeerRecord {
        username: peer.username,
        public_key: peer.public_key,
        addrs: peer.addrs,
        online: peer.online,
        last_seen: std::time::UNIX_EPOCH + Duration::from_millis(peer.last_seen_ms),
    }
}

/// The API's page, from the wire's.
fn page(page: WirePage) -> Page {
    Page {
        users: page.users.into_iter().map(peer_record).collect(),
        next: page.next,
    }
}

impl From<Failure> for DiscoveryError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Wire(e) => e.into(),
            Failure::Session(e) => e,
        }
    }
}

type Answer = Result<Reply, Failure>;

/// A request for the session's connection task, with where to send the answer.
pub(crate) struct Call {
    request: Request,
    reply: oneshot::Sender<Answer>,
}

/// Sends `request` through a session's connection task and waits for the answer.
pub(crate) async fn call(cmds: &mpsc::Sender<Call>, request: Request) -> Answer {
    let (reply, answer) = oneshot::channel();
    cmds.send(Call { request, reply })
        .await
        .map_err(|_| Failure::Session(DiscoveryError::Closed))?;
    answer
        .await
        .map_err(|_| Failure::Session(DiscoveryError::Closed))?
}

#[derive(Debug)]
struct ClientSession {
    client: DiscoveryClient,
    addr: String,
    /// The only strong sender: dropping the session ends its connection task.
    cmds: mpsc::Sender<Call>,
    mailbox: Arc<MailboxStore>,
    operator_key: Option<PublicKey>,
    /// The server takes part in reachability (connect-back, relays): as of the last
    /// registration.
    reach: Arc<AtomicBool>,
}

impl ClientSession {
    /// Fails unless the server offers connect-back and relays: a server from before them
    /// would close the session on the request.
    fn check_reach(&self, what: &str) -> Result<(), DiscoveryError> {
        if self.reach.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(DiscoveryError::Unsupported(format!(
                "{what}: the server at {} is older than relays",
                self.addr
            )))
        }
    }

    async fn call(&self, request: Request) -> Result<Reply, DiscoveryError> {
        call(&self.cmds, request)
            .await
            .map_err(DiscoveryError::from)
    }
}

fn wrong_reply(reply: Reply) -> DiscoveryError {
    DiscoveryError::Protocol(format!("unexpected reply from the server: {reply:?}"))
}

#[async_trait]
impl DiscoverySession for ClientSession {
    async fn keep_alive(&self) -> Result<(), DiscoveryError> {
        match self.call(Request::KeepAlive).await? {
            Reply::Done => Ok(()),
            other => Err(wrong_reply(other)),
        }
    }

    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError> {
        if validate_username(username).is_err() {
            // Nobody can hold a name the rules refuse.
            return Ok(None);
        }
        match self
            .call(Request::Lookup {
                username: username.to_owned(),
            })
            .await?
        {
            Reply::Record(record) => Ok(record.map(|r| peer_record(*r))),
            other => Err(wrong_reply(other)),
        }
    }

    async fn list_online(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Page, DiscoveryError> {
        let limit = limit.clamp(1, MAX_PAGE_SIZE) as u32;
        match self.call(Request::ListOnline { after, limit }).await? {
            Reply::Page(wire) => Ok(page(wire)),
            other => Err(wrong_reply(other)),
        }
    }

    async fn watch(&self, username: &str) -> Result<(), DiscoveryError> {
        validate_username(username)?;
        match self
            .call(Request::Watch {
                username: username.to_owned(),
            })
            .await?
        {
            Reply::Done => Ok(()),
            other => Err(wrong_reply(other)),
        }
    }

    async fn deregister(&self) -> Result<(), DiscoveryError> {
        match self.call(Request::Deregister).await {
            Ok(Reply::Done) => Ok(()),
            Ok(other) => Err(wrong_reply(other)),
            // Not connected, or already ended by the server (replaced): the server already
            // counts this session as gone.
            Err(DiscoveryError::Unreachable { .. } | DiscoveryError::Closed) => {
                tracing::debug!(server = %self.addr, "deregistered while disconnected");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn mailbox(&self) -> Option<Arc<dyn OfflineStore>> {
        Some(self.mailbox.clone())
    }

    fn operator_key(&self) -> Option<PublicKey> {
        self.operator_key
    }

    async fn connect_back(&self, username: &str) -> Result<(), DiscoveryError> {
        validate_username(username)?;
        self.check_reach("connect-back")?;
        let request = Request::ConnectBack {
            username: username.to_owned(),
        };
        match self.call(request).await? {
            Reply::Done => Ok(()),
            other => Err(wrong_reply(other)),
        }
    }

    async fn relay(&self, username: &str) -> Result<Connection, DiscoveryError> {
        validate_username(username)?;
        self.check_reach("a relay")?;
        let request = Request::Relay {
            username: username.to_owned(),
        };
        match self.call(request).await? {
            Reply::Relay(ticket) => self.client.join(&ticket).await,
            other => Err(wrong_reply(other)),
        }
    }

    async fn join_relay(&self, ticket: &RelayTicket) -> Result<Connection, DiscoveryError> {
        self.client
            .join(&WireRelayTicket {
                token: ticket.token,
                addr: ticket.addr,
            })
            .await
    }
}

/// A request sent and not yet answered. Re-watches after a reconnection have no caller.
struct Pending {
    id: u64,
    sent: Instant,
    deregister: bool,
    reply: Option<oneshot::Sender<Answer>>,
}

/// Why a request could not be written to the session's connection.
#[derive(Debug, thiserror::Error)]
enum WriteFailed {
    /// The connection failed.
    #[error("writing to the server failed")]
    Connection(#[source] ProtocolError),
    /// The server read nothing for the request timeout.
    #[error("the server stopped reading")]
    Stalled,
}

/// Why a connection ended.
enum Ended {
    /// The handle was dropped, the session deregistered, or it was replaced: stop for good.
    Finished,
    /// The connection broke: reconnect.
    Lost(Cause),
}

/// Owns the session connection: writes requests, matches responses (they come in request
/// order), forwards pushes, and reconnects.
struct SessionTask {
    client: DiscoveryClient,
    identity: Identity,
    registration: Registration,
    events: mpsc::Sender<DiscoveryEvent>,
    cmds: mpsc::Receiver<Call>,
    /// Where new-mail pushes go (and a notice after every reconnection: mail may have come
    /// while away).
    mail_notices: broadcast::Sender<()>,
    /// Re-watched after every reconnection.
    watching: BTreeSet<String>,
    next_id: u64,
    pending: VecDeque<Pending>,
    /// When the server last sent a frame: a request waits its turn behind those before it,
    /// so its deadline counts from the later of this and its sending.
    last_heard: Instant,
    /// Shared with the handle: whether the server took the last registration as
    /// `RegisterReachable`.
    reach: Arc<AtomicBool>,
}

/// How long the session waits for room to pass on an event the node must not miss (the
/// connection lost, back, or ended for good); other pushes are dropped when the node is
/// behind.
const IMPORTANT_EVENT_WAIT: Duration = Duration::from_secs(5);

impl SessionTask {
    /// Passes on an event the node must not miss, waiting (bounded) for room.
    async fn important(&self, event: DiscoveryEvent) {
        if let Err(e) = self.events.send_timeout(event, IMPORTANT_EVENT_WAIT).await {
            tracing::warn!("a directory event was not passed on: {e}");
        }
    }

    async fn run(mut self, reader: Reader, writer: Writer) {
        let mut conn = Some((reader, writer));
        while let Some((reader, writer)) = conn.take() {
            match self.serve(reader, writer).await {
                Ended::Finished => break,
                Ended::Lost(reason) => {
                    tracing::info!(server = %self.client.addr, reason = %chain(&reason), "lost the discovery server; reconnecting");
                    self.important(DiscoveryEvent::Lost {
                        reason: chain(&reason).to_string(),
                    })
                    .await;
                    for p in self.pending.drain(..) {
                        if let Some(reply) = p.reply {
                            let _ = reply.send(Err(Failure::Session(
                                self.client.unreachable(reason.clone()),
                            )));
                        }
                    }
                    conn = self.reconnect().await;
                }
            }
        }
        for p in self.pending.drain(..) {
            if let Some(reply) = p.reply {
                let _ = reply.send(Err(Failure::Session(DiscoveryError::Closed)));
            }
        }
    }

    async fn send(&mut self, writer: &mut Writer, request: Request) -> Result<u64, WriteFailed> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame::Request { id, request };
        match within(self.client.request_timeout, writer.send(frame)).await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => Err(WriteFailed::Connection(e)),
            Err(_) => Err(WriteFailed::Stalled),
        }
    }

    async fn serve(&mut self, mut reader: Reader, mut writer: Writer) -> Ended {
        // The deadline timer is set when a request waits and the timer is not set to go off
        // before the deadline: it may go off early (then it is set again), never late. So a
        // stream of quick answers moves no timer at all.
        let timer = tokio::time::sleep(self.client.request_timeout);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            // No answer for the request timeout while one waits, counting from the later
            // of its sending and the last frame heard: a long pipeline of deposits that the
            // server is answering is progress, not a dead connection.
            let deadline = self
                .pending
                .front()
                .map(|p| p.sent.max(self.last_heard) + self.client.request_timeout);
            if let Some(due) = deadline
                && armed.is_none_or(|at| at > due)
            {
                timer.as_mut().reset(due);
                armed = Some(due);
            }
            tokio::select! {
                call = self.cmds.recv() => {
                    let Some(Call { request, reply }) = call else { return Ended::Finished };
                    match &request {
                        Request::Watch { username } => { self.watching.insert(username.clone()); }
                        Request::Unwatch { username } => { self.watching.remove(username); }
                        _ => {}
                    }
                    let deregister = matches!(request, Request::Deregister);
                    match self.send(&mut writer, request).await {
                        Ok(id) => self.pending.push_back(Pending { id, sent: Instant::now(), deregister, reply: Some(reply) }),
                        Err(e) => {
                            let reason = Cause::new(e);
                            let _ = reply.send(Err(Failure::Session(self.client.unreachable(reason.clone()))));
                            return Ended::Lost(reason);
                        }
                    }
                }
                frame = reader.next() => match frame {
                    Some(Ok(ServerFrame::Response { id, result })) => {
                        self.last_heard = Instant::now();
                        let Some(p) = self.pending.pop_front().filter(|p| p.id == id) else {
                            return Ended::Lost(Cause::new(format!("response {id} answers no pending request")));
                        };
                        let done = p.deregister && result.is_ok();
                        if let Some(reply) = p.reply {
                            let _ = reply.send(result.map_err(Failure::Wire));
                        }
                        if done {
                            return Ended::Finished;
                        }
                    }
                    Some(Ok(ServerFrame::Push(push))) => match push {
                        Push::PeerOnline { username } => {
                            let _ = self.events.try_send(DiscoveryEvent::PeerOnline { username });
                        }
                        Push::PeerOffline { username } => {
                            let _ = self.events.try_send(DiscoveryEvent::PeerOffline { username });
                        }
                        Push::Replaced => {
                            tracing::warn!("this user registered again elsewhere; this discovery session is over");
                            self.important(DiscoveryEvent::SessionEnded {
                                reason: format!(
                                    "{} registered again elsewhere with the same key; this session is no longer listed",
                                    self.registration.username
                                ),
                            })
                            .await;
                            return Ended::Finished;
                        }
                        Push::NewMail => {
                            let _ = self.mail_notices.send(());
                        }
                        Push::Announcement(announcement) => {
                            let _ = self.events.try_send(DiscoveryEvent::Announcement(announcement));
                        }
                        Push::Reachability { dialable } => {
                            let _ = self.events.try_send(DiscoveryEvent::Reachability { dialable });
                        }
                        Push::ConnectBack { username } => {
                            let _ = self.events.try_send(DiscoveryEvent::ConnectBack { username });
                        }
                        Push::RelayOffer { username, ticket } => {
                            let ticket = RelayTicket { token: ticket.token, addr: ticket.addr };
                            let _ = self.events.try_send(DiscoveryEvent::RelayOffer { username, ticket });
                        }
                    },
                    Some(Ok(ServerFrame::Error(e))) => return Ended::Lost(Cause::new(e)),
                    Some(Ok(other)) => return Ended::Lost(Cause::new(format!("unexpected frame {other:?}"))),
                    Some(Err(e)) => return Ended::Lost(Cause::new(e)),
                    None => return Ended::Lost(Cause::new("the server closed the connection")),
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    if deadline.is_some_and(|due| due <= Instant::now()) {
                        return Ended::Lost(Cause::new(format!(
                            "no answer within {} ms", self.client.request_timeout.as_millis()
                        )));
                    }
                }
            }
        }
    }

    /// Waits with backoff and registers again, answering requests meanwhile with
    /// `Unreachable`. `None` when the session is over (handle dropped, or the server refuses
    /// the registration for good).
    async fn reconnect(&mut self) -> Option<(Reader, Writer)> {
        let (first, longest) = self.client.backoff;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(longest)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let wake = Instant::now() + delays.next().unwrap_or(longest);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    call = self.cmds.recv() => match call {
                        None => return None,
                        Some(Call { request: Request::Deregister, reply }) => {
                            // Offline already; nothing to tell the server.
                            let _ = reply.send(Ok(Reply::Done));
                            return None;
                        }
                        Some(Call { reply, .. }) => {
                            let _ = reply.send(Err(Failure::Session(self.client.unreachable(Cause::new("reconnecting")))));
                        }
                    },
                }
            }
            match self
                .client
                .establish(&self.identity, &self.registration)
                .await
            {
                Ok((reader, mut writer, _, reach)) => {
                    self.reach.store(reach, Ordering::Release);
                    tracing::info!(server = %self.client.addr, "registered again");
                    let _ = self.mail_notices.send(());
                    self.important(DiscoveryEvent::Reconnected).await;
                    let names: Vec<String> = self.watching.iter().cloned().collect();
                    for username in names {
                        match self.send(&mut writer, Request::Watch { username }).await {
                            Ok(id) => self.pending.push_back(Pending {
                                id,
                                sent: Instant::now(),
                                deregister: false,
                                reply: None,
                            }),
                            Err(_) => break,
                        }
                    }
                    return Some((reader, writer));
                }
                Err(
                    e @ (DiscoveryError::NameTaken { .. }
                    | DiscoveryError::BadSignature
                    | DiscoveryError::InvalidUsername(_)),
                ) => {
                    tracing::error!(error = %chain(&e), "the discovery server refuses this registration; giving up");
                    self.important(DiscoveryEvent::SessionEnded {
                        reason: format!(
                            "the discovery server no longer accepts this registration: {}",
                            chain(&e)
                        ),
                    })
                    .await;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %chain(&e), "reconnection failed");
                }
            }
        }
    }
}

/// `fut` within `limit`, starting the timer only if `fut` is not done at once (a write to
/// a socket with room in its buffer): most calls then cost no timer.
async fn within<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    if let std::task::Poll::Ready(out) = futures::poll!(fut.as_mut()) {
        return Ok(out);
    }
    tokio::time::timeout(limit, fut).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_errors_map_to_typed_discovery_errors() {
        assert!(matches!(
            DiscoveryError::from(WireError::NameTaken {
                username: "bob".into()
            }),
            DiscoveryError::NameTaken { username } if username == "bob"
        ));
        assert!(matches!(
            DiscoveryError::from(WireError::InvalidUsername("Bad Name".into())),
            DiscoveryError::InvalidUsername(_)
        ));
        assert!(matches!(
            DiscoveryError::from(WireError::BadFrame("x".into())),
            DiscoveryError::Protocol(_)
        ));
    }
}
