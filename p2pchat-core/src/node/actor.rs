//! The node's actor: directory keep-alive and pushes, the offline mailbox, and accepting
//! peer connections. One `select!` loop owns the timers and the directory event channel.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::handshake::{self, Refusal};
use super::link::Established;
use super::{
    HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_ADDRESS, NodeError,
    Shared,
};
use crate::announce::Announcement;
use crate::crypto::CryptoError;
use crate::discovery::DiscoveryEvent;
use crate::error::chain;
use crate::event::Event;
use crate::identity::PublicKey;
use crate::limits::ConnectionLimits;
use crate::protocol::{ErrorCode, MessageId};
use crate::store::{MAX_FETCH_BATCH, MAX_TOKEN_AHEAD, MailKey};
use crate::transport::Listener;

/// An authentic offline message stamped at most this far ahead of our clock waits in the
/// mailbox for a later drain; further ahead, it is rejected (and removed) so that such
/// messages cannot pile up at the front of the mailbox: [`MAX_TOKEN_AHEAD`], as servers
/// accept them.
const MAX_HELD_AHEAD: std::time::Duration = MAX_TOKEN_AHEAD;

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
                            accept_one(shared, conn, false).await;
                        }.instrument(span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "accepting connections failed");
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
                    link.peer_online();
                }
                self.shared.emit(Event::PeerOnline { username });
            }
            DiscoveryEvent::PeerOffline { username } => {
                self.shared.emit(Event::PeerOffline { username });
            }
            DiscoveryEvent::Announcement(announcement) => self.on_announcement(&announcement),
            DiscoveryEvent::Lost { reason } => {
                self.shared.emit(Event::DirectoryLost { reason });
            }
            DiscoveryEvent::Reconnected => {
                self.shared.emit(Event::DirectoryBack);
                // Lookups and the store were unreachable meanwhile: what waits for a retry
                // goes now, not at the end of its backoff.
                for link in self.shared.all_links() {
                    link.retry_now();
                }
            }
            DiscoveryEvent::SessionEnded { reason } => {
                self.shared.emit(Event::DirectoryEnded { reason });
            }
            DiscoveryEvent::Reachability { dialable } => {
                if self.shared.set_dialable(dialable) != Some(dialable) {
                    tracing::info!(dialable, "reachability");
                    self.shared.emit(Event::Reachability { direct: dialable });
                }
                if dialable {
                    // Relayed peers can now dial us (we ask them to).
                    for link in self.shared.all_links() {
                        link.upgrade();
                    }
                }
            }
            DiscoveryEvent::ConnectBack { username } => {
                // The server passes these on only from users whose addresses its probe
                // verified. A stranger's request (no pinned key, no link) costs a lookup, so
                // it spends the strangers' budget; beyond it, the stranger relays instead.
                let pinned = self.shared.peer_state().pin(&username);
                let known = pinned.is_some() || self.shared.existing_link(&username).is_some();
                if self.shared.peer_state().is_blocked(&username)
                    || (!known && !self.shared.stranger_lookup_allowed())
                {
                    tracing::debug!(peer = %username, "connect-back request ignored");
                    return;
                }
                match self.shared.link(&username, pinned) {
                    Ok(link) => link.connect_now(),
                    Err(e) => {
                        tracing::debug!(peer = %username, error = %chain(&e), "no connect-back")
                    }
                }
            }
            DiscoveryEvent::RelayOffer { username, ticket } => {
                if self.shared.peer_state().is_blocked(&username) {
                    return;
                }
                let Ok(session) = self.shared.session() else {
                    return;
                };
                let shared = self.shared.clone();
                let span = tracing::debug_span!("relayed", peer = %username);
                self.shared.tasks.clone().spawn(
                    async move {
                        match session.join_relay(&ticket).await {
                            Ok(conn) => accept_one(shared, conn, true).await,
                            Err(e) => tracing::debug!(error = %chain(&e), "cannot join the relay"),
                        }
                    }
                    .instrument(span),
                );
            }
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

/// Drains the mailbox after every notice. A drain that failed (the store or the directory
/// away) is tried again after a growing wait, notice or not: mail already waiting sends no
/// new notice. The first failure of a streak is reported as an event, the rest logged.
async fn drain_on_notice(shared: Arc<Shared>, notice: Arc<tokio::sync::Notify>) {
    loop {
        notice.notified().await;
        let mut backoff = DRAIN_RETRY.build();
        let mut failures = 0u32;
        while let Err(message) = drain(&shared).await {
            if failures == 0 {
                shared.emit(Event::Error {
                    message: message.clone(),
                });
            }
            failures = failures.saturating_add(1);
            let wait = backoff.next().unwrap_or(DRAIN_RETRY_MAX);
            tracing::debug!(%message, failures, ?wait, "the mailbox drain failed; trying again");
            tokio::select! {
                () = notice.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The longest wait before a failed mailbox drain is tried again. Default: 30 s.
const DRAIN_RETRY_MAX: Duration = Duration::from_secs(30);

/// Waits between attempts of a failed mailbox drain: from 250 ms, doubling, jittered, up to
/// [`DRAIN_RETRY_MAX`].
const DRAIN_RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_max_delay(DRAIN_RETRY_MAX)
    .with_jitter()
    .without_max_times();

/// Fetches everything in our mailbox, in order, makes it durable in the inbox, then
/// acknowledges it to the store by sender and id: a crash mid-drain fetches it again, and
/// duplicates are dropped by sender and id. `Err` (why, as a sentence) when the store or
/// the directory failed and mail may still be waiting.
async fn drain(shared: &Arc<Shared>) -> Result<(), String> {
    loop {
        shared.inbox.wait_for_room().await;
        let batch = shared
            .store
            .fetch(shared.me(), MAX_FETCH_BATCH)
            .await
            .map_err(|e| format!("could not fetch offline messages: {}", chain(&e)))?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut processed = Vec::with_capacity(batch.len());
        // Runs of one sender, in mailbox order.
        let mut runs: Vec<(String, Vec<(MessageId, String)>)> = Vec::new();
        for message in batch {
            if message.to != shared.me() || shared.peer_state().is_blocked(&message.from) {
                processed.push(MailKey::of(&message));
                continue;
            }
            match runs.last_mut() {
                Some((from, tokens)) if *from == message.from => {
                    tokens.push((message.id, message.token))
                }
                _ => runs.push((message.from, vec![(message.id, message.token)])),
            }
        }
        let mut failed = None;
        for (from, tokens) in runs {
            match drain_run(shared, &from, tokens).await {
                Ok(done) => processed.extend(done.into_iter().map(|id| MailKey {
                    from: from.clone(),
                    id,
                })),
                Err(e) => {
                    tracing::warn!(%from, error = %chain(&e), "cannot take offline messages yet");
                    failed.get_or_insert_with(|| {
                        format!(
                            "could not take offline messages from {from} yet: {}",
                            chain(&e)
                        )
                    });
                }
            }
        }
        if !processed.is_empty() {
            shared
                .store
                .ack(shared.me(), &processed)
                .await
                .map_err(|e| format!("could not acknowledge offline messages: {}", chain(&e)))?;
        }
        if let Some(failed) = failed {
            return Err(failed);
        }
        if processed.is_empty() {
            // Only messages held for later (sealed ahead of our clock): nothing more now.
            return Ok(());
        }
    }
}

/// Takes one sender's run of offline messages; returns the ids done with (durable, or
/// refused for good), leaving the rest in the mailbox.
async fn drain_run(
    shared: &Arc<Shared>,
    from: &str,
    tokens: Vec<(MessageId, String)>,
) -> Result<Vec<MessageId>, NodeError> {
    // The pinned key if we have one: no directory round trip per message.
    let pinned = shared.peer_state().pin(from);
    let key = match pinned {
        Some(key) => key,
        None => shared.resolve(from).await?.0.public_key,
    };
    let pair = shared.pair_key(&key).map_err(|source| NodeError::PeerKey {
        user: from.to_owned(),
        source,
    })?;
    let by_id: std::collections::HashMap<MessageId, String> = tokens.iter().cloned().collect();
    shared.throttle_all(from, tokens.len()).await;
    let received = shared
        .receive_batch(&pair, from, tokens, true, false)
        .await?;
    shared.inbox.wake_readers();
    let mut done = received.ack;
    for (id, e) in received.refuse {
        if let CryptoError::FromTheFuture { ahead_secs } = e
            && ahead_secs <= MAX_HELD_AHEAD.as_secs()
        {
            // Our clock is behind the sender's: keep it for a later drain.
            shared.emit(Event::Error {
                message: format!("an offline message from {from} waits: {e}"),
            });
            continue;
        }
        shared.emit(Event::Error {
            message: format!("an offline message from {from} was refused: {e}"),
        });
        done.push(id);
    }
    if received.unopenable.is_empty() {
        return Ok(done);
    }
    // Sealed under another key: the sender's key may have changed. Held until trusted.
    let retry: Vec<(MessageId, String)> = received
        .unopenable
        .iter()
        .filter_map(|id| Some((*id, by_id.get(id)?.clone())))
        .collect();
    let (record, changed) = shared.resolve(from).await?;
    let held = match changed {
        Some(old) if record.public_key != key || pinned.is_some() => {
            let new = shared
                .pair_key(&record.public_key)
                .map_err(|source| NodeError::PeerKey {
                    user: from.to_owned(),
                    source,
                })?;
            let again = shared.receive_batch(&new, from, retry, true, true).await?;
            if !again.ack.is_empty() {
                shared.key_changed(from, &old, &record.public_key);
            }
            again
        }
        _ => super::Received {
            unopenable: received.unopenable,
            ..Default::default()
        },
    };
    done.extend(held.ack);
    for id in held
        .unopenable
        .into_iter()
        .chain(held.refuse.into_iter().map(|(id, _)| id))
    {
        shared.emit(Event::Error {
            message: format!("an offline message from {from} could not be opened and was dropped"),
        });
        done.push(id);
    }
    Ok(done)
}

/// Expiry notices for messages we sent, as events.
async fn report_expired(shared: &Shared) {
    match shared.store.take_expired(shared.me()).await {
        Ok(expired) => {
            for e in expired {
                shared.emit(Event::Expired { id: e.id, to: e.to });
            }
        }
        Err(e) => tracing::debug!(error = %chain(&e), "cannot check for expired messages"),
    }
}

/// The periodic work: keep the directory registration alive, collect expiry notices.
async fn housekeep(shared: Arc<Shared>) {
    if let Ok(session) = shared.session()
        && let Err(e) = session.keep_alive().await
    {
        tracing::warn!(error = %chain(&e), "keep-alive failed");
    }
    report_expired(&shared).await;
}

/// Authenticates one incoming connection (or the accepting end of a relay) and hands it to
/// the peer's link. Nothing about the peer is recorded (pinned, reported, held) before it has
/// proved its key: `admit` only reads, and what it found is acted on after the handshake.
async fn accept_one(shared: Arc<Shared>, conn: crate::transport::Connection, relayed: bool) {
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
    let (peer, key, admitted) = match result {
        Ok(Ok(peer)) => peer,
        Ok(Err(e)) => {
            tracing::debug!(error = %chain(&e), "inbound handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("inbound handshake timed out");
            return;
        }
    };
    match admitted {
        Admitted::Pinned => {}
        Admitted::FirstContact => {
            // Pinned now that the key is proved (unless another connection pinned one
            // meanwhile: then it is that key's rules).
            let mut peers = shared.peer_state();
            match peers.pin(&peer) {
                None => {
                    if let Err(e) = peers.set_pin(&peer, key) {
                        tracing::warn!(%peer, error = %chain(&e), "cannot pin the key");
                    }
                }
                Some(pinned) if pinned == key => {}
                Some(pinned) => {
                    drop(peers);
                    key_changed(&shared, &peer, &pinned, &key);
                }
            }
        }
        Admitted::KeyChanged { pinned } => key_changed(&shared, &peer, &pinned, &key),
    }
    let pinned = shared.peer_state().pin(&peer);
    let Ok(link) = shared.link(&peer, pinned.or(Some(key))) else {
        return;
    };
    link.inbound(Established {
        reader,
        writer,
        key,
        relayed,
    });
}

/// A peer proved a key the directory vouches for but the user has not trusted: talk, but
/// hold what it sends (and what we send it) until the user trusts it.
fn key_changed(shared: &Shared, peer: &str, pinned: &PublicKey, key: &PublicKey) {
    shared.key_changed(peer, pinned, key);
    if let Some(link) = shared.existing_link(peer) {
        link.hold();
    }
}

/// What `admit` found out about a dialer, to act on once it has proved its key.
enum Admitted {
    /// It presents the pinned key.
    Pinned,
    /// Nothing is pinned for it; the directory has this key for the name.
    FirstContact,
    /// The directory has this key for the name, but another one is pinned.
    KeyChanged {
        /// The pinned key.
        pinned: PublicKey,
    },
}

/// Whether to talk to `user` presenting `key`: not blocked, and the key is the pinned one
/// (or, on first contact or a key change, the one the directory has for the name). Reads
/// only: a dialer that has not proved its key yet changes nothing here, and costs at most
/// one directory lookup, within the node's budget for strangers.
async fn admit(shared: &Shared, user: &str, key: PublicKey) -> Result<Admitted, Refusal> {
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
    let pinned = shared.peer_state().pin(user);
    if pinned == Some(key) {
        return Ok(Admitted::Pinned);
    }
    if !shared.stranger_lookup_allowed() {
        return Err(refuse(ErrorCode::Refused, "busy; try again later"));
    }
    match shared.lookup(user).await {
        Ok(record) if record.public_key == key => Ok(match pinned {
            None => Admitted::FirstContact,
            Some(pinned) => Admitted::KeyChanged { pinned },
        }),
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
