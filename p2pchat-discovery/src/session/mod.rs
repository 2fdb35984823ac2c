//! One client connection, in rooms: `connection` (frames in and out, closing),
//! `register` (the handshake), `announce` (a connection that announces instead), and one file
//! per request kind under `request/`. The session here reads requests, answers them in
//! order, and forwards pushes.

mod announce;
mod connection;
mod register;
mod relay_leg;
mod request;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesOrdered};
use futures::{FutureExt, StreamExt};
use p2pchat_core::error::chain;
use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::discovery::{ClientFrame, Push, Request, ServerFrame, WireError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

pub use connection::WRITE_TIMEOUT;
use connection::{READ_BUFFER, Reader, Writer, close, decode_error, refuse};
use request::{Answer, Then};

use crate::directory::Directory;
use crate::storage::{Lease, touch_interval};

/// Deposits one session runs at once; reading waits while this many are under way.
/// Default: 64.
pub const MAX_IN_FLIGHT: usize = 64;

/// Handles one accepted connection from start to end.
pub(crate) async fn run(
    directory: Arc<Directory>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    serve_connection(directory, read, write, peer, stop).await;
}

/// [`run`] over any byte stream, split into its halves: `peer` is the address the client is
/// taken to connect from.
pub(crate) async fn serve_connection<R, W>(
    directory: Arc<Directory>,
    read: R,
    write: W,
    peer: SocketAddr,
    stop: CancellationToken,
) where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let mut reader = FramedRead::with_capacity(read, FrameCodec::default(), READ_BUFFER);
    let mut writer = Writer::new(write);
    let _permit = match directory.connections.try_acquire(peer.ip()) {
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
    let limit = directory.config.handshake_timeout;
    let registered = tokio::select! {
        _ = stop.cancelled() => Err(Some(WireError::ShuttingDown)),
        // Boxed, as the request handlers below: what only a registration or a request needs
        // is held only while it runs, so an idle session's task stays small.
        outcome = tokio::time::timeout(limit, Box::pin(register::apply(&directory, &mut reader, &mut writer, peer))) => {
            outcome.unwrap_or_else(|_| Err(Some(WireError::LimitExceeded(format!(
                "registration must complete within {} ms", limit.as_millis()
            )))))
        }
    };
    match registered {
        Ok(Opening::Session(session, mail)) => session.serve(reader, writer, mail, stop).await,
        Ok(Opening::Announced) => close(writer, reader).await,
        // Boxed: a relay's state (two legs, the splice) would otherwise be part of every
        // session's task.
        Ok(Opening::Relay(token)) => {
            Box::pin(relay_leg::serve(
                directory.clone(),
                token,
                reader,
                writer,
                stop,
            ))
            .await;
        }
        Err(Some(error)) => refuse(writer, reader, error).await,
        Err(None) => {}
    }
}

/// What a connection turned out to be.
pub(super) enum Opening {
    /// A registered session, and its new-mail notices.
    Session(Box<Session>, BoxStream<'static, ()>),
    /// An operator's announcement, relayed and answered.
    Announced,
    /// One side of the relay this token names.
    Relay(crate::relay::Token),
}

/// A registered session.
pub(super) struct Session {
    directory: Arc<Directory>,
    lease: Lease,
    since: Instant,
    /// Woken when another registration of the same user may have replaced this one.
    check: Arc<Notify>,
    pushes: mpsc::Sender<Push>,
    push_rx: mpsc::Receiver<Push>,
    watching: HashSet<String>,
    /// The (sender, id) of the messages this session's fetches handed out and that were not
    /// acknowledged yet, at most [`HANDED_OUT`], for nodes that acknowledge by id alone
    /// (`AckMail`); emptied by the first `AckMailFrom`.
    handed_out: Vec<p2pchat_core::store::MailKey>,
    /// Its published addresses answered the reachability probe (not merely claimed).
    probed: bool,
    /// The address it connected from, as the per-address limits key it.
    peer: std::net::IpAddr,
    /// Its lookups and listing pages: made at the first one (most sessions never look
    /// anything up, and a limiter with its clock costs about a kilobyte).
    lookups: Option<Box<governor::DefaultDirectRateLimiter>>,
}

impl Session {
    /// Takes one lookup or listing page from this session's allowance and its address's;
    /// `RateLimited` when either is spent.
    fn allow_lookup(&mut self) -> Result<(), WireError> {
        let per_session = self.directory.config.lookups_per_second_per_session;
        if self.lookups.is_none()
            && let Some(rate) = std::num::NonZeroU32::new(per_session)
        {
            let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
            self.lookups = Some(Box::new(governor::RateLimiter::direct(
                governor::Quota::per_second(rate).allow_burst(burst),
            )));
        }
        let session = self.lookups.as_ref().is_none_or(|l| l.check().is_ok());
        if session && self.directory.lookups.allow(&self.peer) {
            Ok(())
        } else {
            Err(WireError::RateLimited)
        }
    }
}

/// Most (sender, id) pairs a session remembers handing out: a few fetches' worth.
pub(super) const HANDED_OUT: usize = 4 * p2pchat_core::store::MAX_FETCH_BATCH;

impl Session {
    async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        mut self,
        mut reader: Reader<R>,
        mut writer: Writer<W>,
        mut mail: BoxStream<'static, ()>,
        stop: CancellationToken,
    ) {
        let idle = self.directory.config.idle_timeout;
        let mut last_frame = Instant::now();
        // Deposits under way, answered in the order they came.
        let mut in_flight: FuturesOrdered<BoxFuture<'static, (u64, Answer)>> =
            FuturesOrdered::new();
        // The waits that outlive one request are made once, not once per frame (each new one
        // is a timer or a waiter-list entry to add and remove): the idle timer is moved on
        // only when it fires early, the stop and replacement signals stay registered.
        let idle_timer = tokio::time::sleep_until(last_frame + idle);
        let stopped = stop.cancelled();
        let check = self.check.clone();
        let checked = check.notified();
        tokio::pin!(idle_timer, stopped, checked);
        let replaced = loop {
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    let _ = writer.send(&ServerFrame::Error(WireError::ShuttingDown)).await;
                    break false;
                }
                _ = &mut checked => {
                    checked.set(check.notified());
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
                Some((id, (result, _))) = in_flight.next(), if !in_flight.is_empty() => {
                    if writer.send(&ServerFrame::Response { id, result }).await.is_err() {
                        break false;
                    }
                }
                frame = reader.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                    let Some(frame) = frame else { break false };
                    last_frame = Instant::now();
                    match frame {
                        Ok(ClientFrame::Request { id, request }) => {
                            let request = match self.detach(request) {
                                Ok(answer) => {
                                    in_flight.push_back(answer.map(move |a| (id, a)).boxed());
                                    continue;
                                }
                                Err(request) => request,
                            };
                            // Anything else waits for the deposits before it, in order.
                            let mut written = true;
                            while let Some((id, (result, _))) = in_flight.next().await {
                                written = writer.send(&ServerFrame::Response { id, result }).await.is_ok();
                                if !written {
                                    break;
                                }
                            }
                            if !written {
                                break false;
                            }
                            let (result, then) = Box::pin(self.handle(request)).await;
                            if writer.send(&ServerFrame::Response { id, result }).await.is_err() {
                                break false;
                            }
                            // Time spent answering is not the client's silence.
                            last_frame = Instant::now();
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
                // After the reader: a frame already waiting is read, not cut off.
                () = &mut idle_timer => {
                    // Quiet for the idle timeout, with nothing under way: closed.
                    let (due, now) = (last_frame + idle, Instant::now());
                    if due > now {
                        idle_timer.as_mut().reset(due);
                    } else if in_flight.is_empty() {
                        tracing::debug!("idle session closed");
                        break false;
                    } else {
                        // Deposits still under way: not idle; look again later.
                        idle_timer.as_mut().reset(now + idle);
                    }
                }
            }
        };
        if replaced {
            tracing::debug!(user = %self.lease.username, "replaced by a newer registration");
            let _ = writer.send(&ServerFrame::Push(Push::Replaced)).await;
        }
        Box::pin(self.end(replaced)).await;
        Box::pin(close(writer, reader)).await;
    }

    /// Whether the storage's lease for this user now names another session.
    async fn is_replaced(&self) -> bool {
        match self.directory.storage.online(&self.lease.username).await {
            Ok(Some(current)) => current.session != self.lease.session,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot check the lease; keeping the session");
                false
            }
        }
    }

    /// Takes the session out of every table and, unless it was replaced, offline.
    async fn end(self, replaced: bool) {
        let directory = &self.directory;
        let lease = &self.lease;
        for target in &self.watching {
            directory.unwatch(target, lease.session);
        }
        directory.remove_session(&lease.username, lease.session);
        if !replaced
            && let Err(e) = directory
                .storage
                .set_offline(&lease.username, lease.session)
                .await
        {
            tracing::warn!(user = %lease.username, error = %chain(&e), "cannot mark offline; the lease will expire");
        }
        // The claim's inactivity clock starts when its owner leaves; short sessions are
        // already covered by the registration's own touch.
        if self.since.elapsed() >= touch_interval(directory.config.claim_lapse)
            && let Err(e) = directory
                .storage
                .touch(&lease.username, &lease.public_key)
                .await
        {
            tracing::warn!(user = %lease.username, error = %chain(&e), "cannot record last seen");
        }
    }

    /// A request that depends on nothing else the session does (a deposit), as a future of
    /// its own to run beside others; any other request back.
    fn detach(&self, request: Request) -> Result<BoxFuture<'static, Answer>, Request> {
        let (directory, me) = (self.directory.clone(), self.lease.username.clone());
        match request {
            Request::Deposit(message) => {
                Ok(request::deposit::apply(directory, me, *message).boxed())
            }
            Request::DepositBatch(batch) => {
                Ok(request::deposit::batch(directory, me, batch).boxed())
            }
            other => Err(other),
        }
    }

    /// Answers one request: each kind is a file of `request/`.
    async fn handle(&mut self, request: Request) -> Answer {
        let request = match self.detach(request) {
            Ok(deposit) => return deposit.await,
            Err(request) => request,
        };
        match request {
            Request::KeepAlive => request::keep_alive::apply(self).await,
            Request::Lookup { .. } | Request::ListOnline { .. }
                if let Err(e) = self.allow_lookup() =>
            {
                (Err(e), Then::Continue)
            }
            Request::Lookup { username } => request::lookup::apply(self, &username).await,
            Request::ListOnline { after, limit } => {
                request::list_online::apply(self, after.as_deref(), limit).await
            }
            Request::Watch { username } => request::watch::watch(self, username).await,
            Request::Unwatch { username } => request::watch::unwatch(self, &username),
            Request::Deregister => request::deregister::apply(),
            Request::FetchMail { limit } => request::fetch_mail::apply(self, limit).await,
            Request::AckMail { ids } => request::ack_mail::by_id(self, &ids).await,
            Request::AckMailFrom { acked } => request::ack_mail::apply(self, acked).await,
            Request::TakeExpired => request::take_expired::apply(self).await,
            Request::ConnectBack { username } => {
                request::reach::connect_back(self, &username).await
            }
            Request::Relay { username } => request::reach::relay(self, &username).await,
            other => (
                Err(WireError::BadFrame(format!(
                    "unsupported request {other:?}"
                ))),
                Then::Continue,
            ),
        }
    }
}
