//! [`ChatNodeBuilder`]: every setting of a node, each with a documented default.

use parking_lot::Mutex;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use std::sync::atomic::AtomicUsize;

use super::EventHub;
use super::actor::{ACTOR_QUEUE_CAPACITY, Actor};
use super::db::{Db, Durability, Table};
use super::history::History;
use super::inbox::{Confirm, Inbox};
use super::link::Outgoing;
use super::records::{self, OutboxRecord, PEERS_KEY};
use super::state::PeerState;
use super::{
    ChatNode, Config, DEFAULT_ACK_TIMEOUT, DEFAULT_EVENT_CAPACITY, SeqClock, Shared, SpawnError,
};
use crate::discovery::{DEFAULT_KEEP_ALIVE_INTERVAL, Discovery, DiscoveryClient, Registration};
use crate::event::Event;
use crate::identity::Identity;
use crate::protocol::{MessageId, validate_username};
use crate::store::{DEFAULT_MESSAGE_TTL, MAX_MESSAGE_TTL, OfflineStore};
use crate::transport::{TcpTransport, Transport};

/// Capacity of the channel carrying directory pushes to the actor. Default: 256.
const DISCOVERY_EVENT_CAPACITY: usize = 256;

/// Configures and starts a [`ChatNode`]. Obtain one with [`ChatNode::builder`].
#[derive(Default)]
pub struct ChatNodeBuilder {
    identity: Option<Identity>,
    username: Option<String>,
    listen: Option<SocketAddr>,
    announce: Vec<SocketAddr>,
    not_dialable: bool,
    transport: Option<Arc<dyn Transport>>,
    discovery: Option<Arc<dyn Discovery>>,
    store: Option<Arc<dyn OfflineStore>>,
    data_dir: Option<PathBuf>,
    keep_alive: Option<Duration>,
    ack_timeout: Option<Duration>,
    message_ttl: Option<Duration>,
    event_capacity: Option<usize>,
    durability: Durability,
    confirm: Confirm,
    contacts_only: bool,
    history: Option<Duration>,
    messages_per_second_per_sender: u32,
    message_burst_per_sender: Option<u32>,
    announcements: Option<BoxStream<'static, String>>,
}

impl std::fmt::Debug for ChatNodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatNodeBuilder")
            .field("username", &self.username)
            .field("listen", &self.listen)
            .field("announce", &self.announce)
            .field("transport", &self.transport)
            .field("discovery", &self.discovery)
            .field("store", &self.store)
            .field("data_dir", &self.data_dir)
            .field("announcement_feed", &self.announcements.is_some())
            .finish_non_exhaustive()
    }
}

impl ChatNodeBuilder {
    /// The node's long-term identity.
    ///
    /// By default, a fresh identity is generated (and forgotten at exit unless the
    /// application saves it; see [`Identity::load_or_generate`]).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The username to register. Required: there is no default.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// Where to accept peer connections.
    ///
    /// By default, `0.0.0.0:0`: every interface, a free port.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Addresses to publish in the directory instead of the one it observes (for a node
    /// behind a port forward, say).
    ///
    /// By default, none: peers dial the IP the directory sees this node connect from, at
    /// the port it listens on.
    pub fn announce(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.announce = addrs;
        self
    }

    /// Whether peers can dial this node at all. `false` (behind a NAT without a port
    /// forward, say): the directory publishes no address and does not probe; peers reach
    /// the node by connect-back (it dials them) or through the directory's relay.
    ///
    /// By default, `true`: the directory probes the published address at registration and
    /// the node learns the verdict ([`crate::Event::Reachability`]).
    pub fn dialable(mut self, dialable: bool) -> Self {
        self.not_dialable = !dialable;
        self
    }

    /// How to reach peers.
    ///
    /// By default, [`TcpTransport`].
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The directory to register with. By default, a [`DiscoveryClient`] of a local
    /// `p2pchat-discovery` at [`crate::discovery::DEFAULT_DISCOVERY_ADDR`].
    pub fn discovery(mut self, discovery: impl Discovery) -> Self {
        self.discovery = Some(Arc::new(discovery));
        self
    }

    /// Where messages wait for peers that cannot be reached.
    ///
    /// By default, the directory's own mailbox when it keeps one (a `p2pchat-discovery`
    /// server does: [`crate::MailboxStore`]); a directory without one ([`crate::MemoryDiscovery`])
    /// needs a store given here.
    pub fn offline_store(mut self, store: impl OfflineStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A directory for the node database: the outbox, the inbox, ids of messages already
    /// received, block and mute lists, pinned keys. Created if missing (mode 0700). One
    /// process at a time may use it.
    ///
    /// By default, none: the same database lives in memory and is lost at exit.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// How often to keep the directory registration alive.
    ///
    /// By default, [`DEFAULT_KEEP_ALIVE_INTERVAL`] (10 s).
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive = Some(interval);
        self
    }

    /// How long to wait for a peer's acknowledgement before presuming the connection dead
    /// and storing the unacknowledged messages offline.
    ///
    /// By default, [`DEFAULT_ACK_TIMEOUT`] (10 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// How long a message may wait in the offline store, and the oldest token accepted: more
    /// than zero and at most [`MAX_MESSAGE_TTL`] (30 days); `spawn` refuses anything else.
    /// Tokens carry whole seconds, so a TTL under a second accepts tokens up to about 3 s old.
    ///
    /// By default, [`DEFAULT_MESSAGE_TTL`] (7 days).
    pub fn message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }

    /// How durable a message must be before `send` returns it and before a received message
    /// is acknowledged.
    ///
    /// By default, [`Durability::Process`]: kept across a kill of the process.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Keeps the conversation history ([`crate::ChatNode::history`]) in the node database
    /// for `retention`: what this node sent and what it showed, up to
    /// [`crate::node::HISTORY_PER_PEER`] entries per peer. The text is stored as sent, in the
    /// data directory (0700, files 0600).
    ///
    /// By default, no history is kept (and what an earlier run kept is deleted at start):
    /// an application usually keeps its own.
    pub fn history(mut self, retention: Duration) -> Self {
        self.history = (!retention.is_zero()).then_some(retention);
        self
    }

    /// When a received message counts as taken by the application and leaves the inbox.
    ///
    /// By default, [`Confirm::OnRead`]: when an [`crate::Events`] stream hands it out.
    pub fn confirm(mut self, confirm: Confirm) -> Self {
        self.confirm = confirm;
        self
    }

    /// Contacts-only mode: messages from people this node never wrote to nor accepted, live
    /// or offline, are not shown but kept as requests ([`crate::ChatNode::requests`]) until
    /// [`crate::ChatNode::accept`] shows them or [`crate::ChatNode::block`] discards them;
    /// the first of each sender's is reported as [`crate::Event::MessageRequest`]. Can be
    /// changed later with [`crate::ChatNode::set_contacts_only`].
    ///
    /// By default, off: anyone who knows the name can message this node.
    pub fn contacts_only(mut self, on: bool) -> Self {
        self.contacts_only = on;
        self
    }

    /// Messages per second one sender's messages are taken in at, live and offline, after a
    /// burst of [`super::MESSAGE_BURST_PER_SENDER`]; beyond it the node reads that sender
    /// more slowly (nothing is refused or lost: the sender's node waits). 0: no limit.
    ///
    /// By default, no limit: an embedding application decides (bots and bulk transfers
    /// want none); [`super::MESSAGES_PER_SECOND_PER_SENDER`] (100) is the CLI's.
    pub fn messages_per_second_per_sender(mut self, rate: u32) -> Self {
        self.messages_per_second_per_sender = rate;
        self
    }

    /// Messages one sender may send at once before
    /// [`ChatNodeBuilder::messages_per_second_per_sender`] applies (at least 1).
    ///
    /// By default, [`super::MESSAGE_BURST_PER_SENDER`] (10,000).
    pub fn message_burst_per_sender(mut self, burst: u32) -> Self {
        self.message_burst_per_sender = Some(burst.max(1));
        self
    }

    /// Events buffered for each [`crate::Events`] reader before it lags.
    ///
    /// By default, [`DEFAULT_EVENT_CAPACITY`] (4096).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = Some(capacity);
        self
    }

    /// A feed of operator announcements besides those the directory relays, each item an
    /// announcement's JSON: e.g. `RedisStore::announcements("special")` for nodes that use
    /// Redis directly, as the original did. Only announcements signed by the operator key
    /// pinned at registration, fresh and not seen before are shown ([`Event::Announcement`]).
    ///
    /// By default, none: only the directory's relayed announcements.
    pub fn announcements(mut self, feed: impl Stream<Item = String> + Send + 'static) -> Self {
        self.announcements = Some(feed.boxed());
        self
    }

    /// Binds the listener, registers with the directory and starts the node. Messages
    /// waiting in the offline store are delivered as events right after.
    pub async fn spawn(self) -> Result<ChatNode, SpawnError> {
        let username = self
            .username
            .ok_or_else(|| SpawnError::Config("a username is required".into()))?;
        validate_username(&username)?;
        let discovery = self
            .discovery
            .unwrap_or_else(|| Arc::new(DiscoveryClient::default()));
        let config = Config {
            username,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            announce: self.announce,
            data_dir: self.data_dir,
            keep_alive: self.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE_INTERVAL),
            ack_timeout: self.ack_timeout.unwrap_or(DEFAULT_ACK_TIMEOUT),
            message_ttl: self.message_ttl.unwrap_or(DEFAULT_MESSAGE_TTL),
            event_capacity: self.event_capacity.unwrap_or(DEFAULT_EVENT_CAPACITY).max(1),
            durability: self.durability,
            confirm: self.confirm,
        };
        if config.keep_alive.is_zero() || config.ack_timeout.is_zero() {
            return Err(SpawnError::Config(
                "keep-alive interval and ack timeout must be positive".into(),
            ));
        }
        // Longer would mean nothing useful and overflow clock arithmetic.
        for (what, value) in [
            ("keep-alive interval", config.keep_alive),
            ("ack timeout", config.ack_timeout),
            ("message TTL", config.message_ttl),
        ] {
            if value > MAX_MESSAGE_TTL {
                return Err(SpawnError::Config(format!(
                    "the {what} is {value:?}; at most {} days",
                    MAX_MESSAGE_TTL.as_secs() / 86_400
                )));
            }
        }
        if config.message_ttl.is_zero() {
            return Err(SpawnError::Config(
                "the message TTL must be positive".into(),
            ));
        }
        let identity = self.identity.unwrap_or_else(Identity::generate);
        let (db, mut snapshot) = {
            let dir = config.data_dir.clone();
            let durability = config.durability;
            match tokio::task::spawn_blocking(move || Db::open(dir.as_deref(), durability)).await {
                Ok(opened) => opened?,
                // Only a panic ends the task early; it is a bug, raised here.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        };
        let meta = snapshot.take(Table::Meta);
        let mut peers = PeerState::load(db.clone(), meta.get(PEERS_KEY).map(Vec::as_slice))?;
        let history = History::load(&db, self.history, snapshot.take(Table::History))?;
        let inbox = Arc::new(Inbox::load(
            db.clone(),
            config.confirm,
            history.clone(),
            snapshot.take(Table::Inbox),
            snapshot.take(Table::Held),
            snapshot.take(Table::Seen),
        ));
        let mut pending: Vec<(MessageId, OutboxRecord)> = snapshot
            .take(Table::Outbox)
            .into_iter()
            .filter_map(|(key, value)| {
                let id = MessageId::from_bytes(key.as_slice().try_into().ok()?);
                Some((id, records::decode::<OutboxRecord>(&value)?))
            })
            .collect();
        pending.sort_by_key(|(_, OutboxRecord::V1 { seq, .. })| *seq);
        let reserved = meta
            .get(records::SEQ_KEY)
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        let seq = SeqClock::new(
            reserved,
            pending.last().map(|(_, OutboxRecord::V1 { seq, .. })| *seq),
        );
        let transport = self
            .transport
            .unwrap_or_else(|| Arc::new(TcpTransport::new()));
        let mut listener = transport.bind(config.listen).await?;
        let local_addr = listener.local_addr();
        let (discovery_tx, discovery_events) = mpsc::channel(DISCOVERY_EVENT_CAPACITY);
        // The directory may probe our listener while we register: answer it meanwhile.
        let session = {
            let probes = super::handshake::answer_probes(&mut *listener, &identity);
            let registering = discovery.register(
                &identity,
                Registration {
                    username: config.username.clone(),
                    listen_port: local_addr.port(),
                    announce: config.announce.clone(),
                    dialable: !self.not_dialable,
                },
                discovery_tx,
            );
            tokio::pin!(registering);
            tokio::select! {
                session = &mut registering => session?,
                // The listener failed: register without answering (the node is not dialable).
                () = probes => registering.await?,
            }
        };
        let store = match self.store.or_else(|| session.mailbox()) {
            Some(store) => store,
            None => {
                let _ = session.deregister().await;
                return Err(SpawnError::Config(
                    "an offline store is required: this directory keeps no mailboxes".into(),
                ));
            }
        };
        let mail = store.subscribe(&config.username).await?;
        let operator_changed = match session.operator_key() {
            Some(key) => peers.pin_operator(key)?.map(|pinned| (pinned, key)),
            None => None,
        };
        let events = EventHub::new(config.event_capacity);
        let first_events = events.subscribe();
        let (actor_tx, commands) = mpsc::channel(ACTOR_QUEUE_CAPACITY);
        let span = tracing::info_span!("node", me = %config.username);
        let shared = Arc::new(Shared {
            identity,
            config,
            local_addr,
            events,
            first_events: Mutex::new(Some(first_events)),
            peers: Mutex::new(peers),
            db,
            inbox,
            history,
            seq: Mutex::new(seq),
            outbox_len: AtomicUsize::new(pending.len()),
            links: Mutex::default(),
            pair_keys: Mutex::default(),
            store,
            transport,
            session: Mutex::new(Some(Arc::from(session))),
            reachable: std::sync::atomic::AtomicU8::new(0),
            contacts_only: std::sync::atomic::AtomicBool::new(self.contacts_only),
            requested: Mutex::default(),
            sender_rate: std::num::NonZeroU32::new(self.messages_per_second_per_sender).map(
                |rate| {
                    let burst = self
                        .message_burst_per_sender
                        .unwrap_or(super::MESSAGE_BURST_PER_SENDER)
                        .max(1);
                    let quota = governor::Quota::per_second(rate)
                        .allow_burst(std::num::NonZeroU32::new(burst).unwrap_or(rate));
                    governor::RateLimiter::keyed(quota)
                },
            ),
            stranger_lookups: governor::RateLimiter::direct(
                governor::Quota::per_second(
                    std::num::NonZeroU32::new(super::MAX_STRANGER_LOOKUPS_PER_SECOND)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )
                .allow_burst(
                    std::num::NonZeroU32::new(super::MAX_STRANGER_LOOKUPS_PER_SECOND * 2)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                ),
            ),
            halt: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closing: Mutex::new(false),
            shutdown_done: tokio::sync::Mutex::new(false),
        });
        let actor = Actor {
            shared: shared.clone(),
            commands,
            discovery_events,
            listener,
            mail,
            announcements: self.announcements,
        };
        if let Some((pinned, offered)) = operator_changed {
            shared.emit(Event::Error {
                message: format!(
                    "the directory's operator key changed (pinned {}, now {}): its announcements are ignored",
                    pinned.fingerprint(),
                    offered.fingerprint()
                ),
            });
        }
        shared.spawn(actor.run().instrument(span.clone()));
        // Before `spawn` returns: no message sent from now on can overtake them.
        restore_outbox(&shared, pending);
        Ok(ChatNode::new(shared, actor_tx))
    }
}

/// Hands the messages a previous run left in the outbox to their links, in order.
fn restore_outbox(shared: &Arc<Shared>, pending: Vec<(MessageId, OutboxRecord)>) {
    for (id, record) in pending {
        let OutboxRecord::V1 {
            to,
            body,
            sent_at_ms,
            queued_at_ms,
            expires_at_ms,
            seq,
        } = record;
        let key = shared.peer_state().pin(&to);
        let Ok(link) = shared.link(&to, key) else {
            return;
        };
        shared.emit(Event::Queued {
            id,
            to: to.clone(),
            retry: None,
        });
        link.queue_now(Outgoing {
            id,
            body,
            sent_at_ms,
            seq,
            expires_at_ms,
            queued_at_ms,
        });
    }
}
