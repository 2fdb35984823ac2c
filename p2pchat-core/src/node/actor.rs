//! The node's actor: directory keep-alive and pushes, the offline mailbox, and accepting
//! peer connections. One `select!` loop owns the timers and the directory event channel.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::handshake::{self, Refusal};
use super::link::{Established, LinkCmd};
use super::{
    Disposition, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_ADDRESS,
    Shared,
};
use crate::announce::Announcement;
use crate::crypto::CryptoError;
use crate::discovery::DiscoveryEvent;
use crate::event::Event;
use crate::limits::ConnectionLimits;
use crate::protocol::ErrorCode;
use crate::store::MAX_FETCH_BATCH;
use crate::transport::Listener;

/// An authentic offline message stamped at most this far ahead of our clock waits in the
/// mailbox for a later drain; further ahead, it is rejected (and removed) so that such
/// messages cannot pile up at the front of the mailbox. Default: 1 hour.
const MAX_HELD_AHEAD: std::time::Duration = std::time::Duration::from_secs(3600);

/// Commands the handle sends the actor. Capacity of its channel: 16.
pub(crate) const ACTOR_QUEUE_CAPACITY: usize = 16;

#[derive(Debug)]
pub(crate) enum Command {
    /// Close the listener; reply when no new connection can arrive.
    StopAccepting(oneshot::Sender<()>),
}

pub(crate) struct Actor {
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) discovery_events: mpsc::Receiver<DiscoveryEvent>,
    pub(crate) listener: Box<dyn Listener>,
    pub(crate) mail: BoxStream<'static, ()>,
    /// Announcement JSON from a feed given to the builder (a Redis channel), if any.
    pub(crate) announcements: Option<BoxStream<'static, String>>,
}

impl Actor {
    pub(crate) async fn run(mut self) {
        let shared = self.shared.clone();
        let halt = shared.halt.clone();
        // The per-address cap applies once half the slots are taken: peers behind one address
        // are not turned away while there is room, and a flood from one address leaves half.
        let handshakes = ConnectionLimits::under_pressure(
            MAX_PENDING_HANDSHAKES,
            MAX_PENDING_HANDSHAKES_PER_ADDRESS,
            MAX_PENDING_HANDSHAKES / 2,
        );
        let mut keep_alive = tokio::time::interval(shared.config.keep_alive);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut accepting = true;
        // The mailbox is drained in a task of its own, once now and once more after every
        // notice (a notice during a drain leaves a permit for one more): a drain waiting on
        // the store or on a directory lookup must not stall accepting peers.
        let mail_waiting = Arc::new(tokio::sync::Notify::new());
        mail_waiting.notify_one();
        shared.spawn(drain_on_notice(shared.clone(), mail_waiting.clone()));
        // Expiry notices from before we started, in the background as every store call.
        let mut housekeeping: Option<tokio::task::JoinHandle<()>> = Some(shared.spawn({
            let shared = shared.clone();
            async move { report_expired(&shared).await }
        }));
        loop {
            tokio::select! {
                _ = halt.cancelled() => return,
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::StopAccepting(done) => {
                        accepting = false;
                        let _ = done.send(());
                    }
                },
                accepted = self.listener.accept(), if accepting => match accepted {
                    Ok(conn) => {
                        // Never wait for a slot here: the actor also serves the directory, the
                        // mailbox and shutdown. Beyond the caps a connection is closed at once,
                        // so silent connections from one address cannot crowd out the others.
                        let permit = match handshakes.try_acquire(conn.remote.ip()) {
                            Ok(permit) => permit,
                            Err(refused) => {
                                tracing::debug!(remote = %conn.remote, %refused, "refused a connection");
                                continue;
                            }
                        };
                        let shared = shared.clone();
                        let span = tracing::debug_span!("inbound", remote = %conn.remote);
                        shared.tasks.clone().spawn(async move {
                            let _permit = permit;
                            accept_one(shared, conn).await;
                        }.instrument(span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting connections failed");
                        accepting = false;
                    }
                },
                Some(event) = self.discovery_events.recv() => self.on_discovery(event).await,
                Some(()) = self.mail.next() => mail_waiting.notify_one(),
                Some(json) = next_announcement(&mut self.announcements) => {
                    match Announcement::from_json(&json) {
                        Ok(announcement) => self.on_announcement(&announcement),
                        Err(e) => tracing::debug!(reason = %e, "dropped a malformed announcement"),
                    }
                }
                _ = keep_alive.tick() => {
                    // In its own task: a directory that accepts but does not answer must not
                    // stall accepting peers or shutting down. One at a time.
                    if housekeeping.as_ref().is_none_or(|h| h.is_finished()) {
                        housekeeping = Some(shared.spawn(housekeep(shared.clone())));
                    }
                }
            }
        }
    }

    async fn on_discovery(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::PeerOnline { username } => {
                if let Some(link) = self.shared.existing_link(&username) {
                    // A hint only: never let a busy link stall the actor.
                    let _ = link.try_send(LinkCmd::PeerOnline);
                }
                self.shared.emit(Event::PeerOnline { username });
            }
            DiscoveryEvent::PeerOffline { username } => {
                self.shared.emit(Event::PeerOffline { username });
            }
            DiscoveryEvent::Announcement(announcement) => self.on_announcement(&announcement),
            DiscoveryEvent::SessionEnded { reason } => self.shared.emit(Event::Error {
                message: format!("lost the directory: {reason}"),
            }),
        }
    }

    /// Shows an announcement signed by the pinned operator key, fresh and not seen before;
    /// drops anything else.
    fn on_announcement(&self, announcement: &Announcement) {
        let admitted = self.shared.peer_state().admit_announcement(announcement);
        match admitted {
            Ok(()) => self.shared.emit(Event::Announcement {
                text: announcement.text.clone(),
            }),
            Err(e) => {
                tracing::debug!(reason = %e, id = %announcement.id, "dropped an announcement")
            }
        }
    }
}

async fn drain_on_notice(shared: Arc<Shared>, notice: Arc<tokio::sync::Notify>) {
    loop {
        notice.notified().await;
        drain(&shared).await;
    }
}

/// Fetches and shows everything in our mailbox, in order, acknowledging each batch only
/// after its ids are recorded: a crash mid-drain redelivers, and duplicates are dropped.
async fn drain(shared: &Arc<Shared>) {
    loop {
        let batch = match shared.store.fetch(shared.me(), MAX_FETCH_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                shared.emit(Event::Error {
                    message: format!("could not fetch offline messages: {e}"),
                });
                return;
            }
        };
        if batch.is_empty() {
            return;
        }
        let mut shown = Vec::new();
        let mut recorded = Vec::new();
        let mut processed = Vec::with_capacity(batch.len());
        for message in batch {
            processed.push(message.id);
            if message.to != shared.me() || shared.peer_state().is_blocked(&message.from) {
                continue;
            }
            // The pinned key if we have one: no directory round trip per message.
            let pinned = shared.peer_state().pin(&message.from);
            let key = match pinned {
                Some(key) => key,
                None => match shared.resolve(&message.from).await {
                    Ok((record, _)) => record.public_key,
                    Err(e) => {
                        // Leave it in the mailbox: the sender may be resolvable later.
                        tracing::warn!(from = %message.from, error = %e, "cannot open offline message yet");
                        processed.pop();
                        continue;
                    }
                },
            };
            let pair = shared.pair_key(&key);
            let disposition = match pair {
                Ok(pair) => shared.receive(&pair, &message.from, message.id, &message.token, true),
                Err(e) => Disposition::Reject(e),
            };
            match disposition {
                Disposition::Show(event) => {
                    shown.push(event);
                    recorded.push((message.from, message.id));
                }
                Disposition::Hide => recorded.push((message.from, message.id)),
                Disposition::Drop => {}
                Disposition::Reject(e @ CryptoError::FromTheFuture { ahead_secs })
                    if ahead_secs <= MAX_HELD_AHEAD.as_secs() =>
                {
                    // Our clock is behind the sender's: keep it for a later drain.
                    processed.pop();
                    shared.emit(Event::Error {
                        message: format!("an offline message from {} waits: {e}", message.from),
                    });
                }
                Disposition::Reject(e) => shared.emit(Event::Error {
                    message: format!("an offline message from {} was rejected: {e}", message.from),
                }),
            }
        }
        shared.commit_seen(recorded.iter().map(|(from, id)| (from.as_str(), *id)));
        for event in shown {
            shared.emit(event);
        }
        if processed.is_empty() {
            return;
        }
        if let Err(e) = shared.store.ack(shared.me(), &processed).await {
            shared.emit(Event::Error {
                message: format!("could not acknowledge offline messages: {e}"),
            });
            return;
        }
    }
}

/// Expiry notices for messages we sent, as events.
async fn report_expired(shared: &Shared) {
    match shared.store.take_expired(shared.me()).await {
        Ok(expired) => {
            for e in expired {
                shared.emit(Event::Expired { id: e.id, to: e.to });
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot check for expired messages"),
    }
}

/// The periodic work: keep the directory registration alive, collect expiry notices.
async fn housekeep(shared: Arc<Shared>) {
    if let Ok(session) = shared.session()
        && let Err(e) = session.keep_alive().await
    {
        tracing::warn!(error = %e, "keep-alive failed");
    }
    report_expired(&shared).await;
}

/// Authenticates one incoming connection and hands it to the peer's link.
async fn accept_one(shared: Arc<Shared>, conn: crate::transport::Connection) {
    let (mut reader, mut writer) = handshake::frames(conn);
    let admit = |user: String, key| {
        let shared = shared.clone();
        async move { admit(&shared, &user, key).await }
    };
    let result = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::accept(
            &mut reader,
            &mut writer,
            &shared.identity,
            shared.me(),
            admit,
        ),
    )
    .await;
    let (peer, key) = match result {
        Ok(Ok(peer)) => peer,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "inbound handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("inbound handshake timed out");
            return;
        }
    };
    let Ok(link) = shared.link(&peer, key) else {
        return;
    };
    let _ = link
        .send(LinkCmd::Inbound(Established { reader, writer }))
        .await;
}

/// Whether to talk to `user` presenting `key`: not blocked, and the key is the pinned one
/// (or, on first contact, the one the directory has for the name).
async fn admit(
    shared: &Shared,
    user: &str,
    key: crate::identity::PublicKey,
) -> Result<(), Refusal> {
    let refuse = |code, detail: &str| Refusal {
        code,
        detail: detail.to_owned(),
    };
    if shared.peer_state().is_blocked(user) {
        return Err(refuse(
            ErrorCode::Refused,
            "not accepting connections from you",
        ));
    }
    if shared.peer_state().pin(user) == Some(key) {
        return Ok(());
    }
    match shared.resolve(user).await {
        Ok((record, None)) if record.public_key == key => Ok(()),
        Ok((record, Some(pinned))) if record.public_key == key => {
            shared.key_changed(user, &pinned, &key);
            Err(refuse(
                ErrorCode::AuthenticationFailed,
                "your key changed; waiting for the user to trust it",
            ))
        }
        Ok(_) => Err(refuse(
            ErrorCode::AuthenticationFailed,
            "your key is not the one registered for your name",
        )),
        Err(_) => Err(refuse(ErrorCode::AuthenticationFailed, "unknown user")),
    }
}

/// The next item of an optional feed; pending forever without one (or once it ends).
async fn next_announcement(feed: &mut Option<BoxStream<'static, String>>) -> Option<String> {
    match feed {
        Some(stream) => match stream.next().await {
            Some(item) => Some(item),
            None => {
                *feed = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
