//! # p2pchat-core
//!
//! Peer-to-peer chat with end-to-end encryption, as a library. A [`ChatNode`] registers its
//! name and key with a directory ([`Discovery`]), keeps one persistent connection per peer
//! ([`Transport`]), seals every message as a Fernet token under a key only the two peers can
//! derive, and falls back to an [`OfflineStore`] when a peer cannot be reached. Everything
//! that happens is reported on an [`Events`] stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use p2pchat_core::{ChatNode, Event, MemoryDiscovery, MemoryNetwork, MemoryStore};
//!
//! let (directory, network, store) = (MemoryDiscovery::new(), MemoryNetwork::new(), MemoryStore::new());
//! let alice = ChatNode::builder()
//!     .username("alice")
//!     .transport(network.clone())
//!     .discovery(directory.clone())
//!     .offline_store(store.clone())
//!     .spawn()
//!     .await?;
//! let bob = ChatNode::builder()
//!     .username("bob")
//!     .transport(network)
//!     .discovery(directory)
//!     .offline_store(store)
//!     .spawn()
//!     .await?;
//! let mut events = bob.events();
//! alice.send("bob", "hi").await?;
//! while let Some(event) = events.next().await {
//!     if let Event::MessageReceived { from, text, .. } = event {
//!         println!("[{from}] {text}");
//!         break;
//!     }
//! }
//! alice.shutdown().await?;
//! bob.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! ## Layers, bottom first (each module uses only those above it in this list)
//! - [`error`]: [`Cause`], the failure underneath a public error, kept as its source.
//! - [`limits`]: connection caps in total and per address (node listener and server).
//! - [`identity`]: Ed25519 identity keys, storage, fingerprints.
//! - [`protocol`]: wire types and the frame codec (no I/O, no API types), limits.
//! - [`crypto`]: pairwise keys (X25519 + HKDF-SHA256), sealing and opening Fernet tokens.
//! - [`announce`]: signed operator announcements and the guard against forgeries and replays.
//! - `transport`: the [`Transport`] trait, [`TcpTransport`], [`MemoryNetwork`].
//! - [`store`]: the [`OfflineStore`] trait and [`MemoryStore`]; `store::RedisStore`
//!   (feature `redis`, on by default): offline mailboxes in Redis streams, shared by every
//!   node and server using the same Redis, and the Redis connection they share.
//! - `discovery`: the [`Discovery`] trait, [`DiscoveryClient`], [`MemoryDiscovery`], and
//!   [`MailboxStore`], the server's mailbox reached over the client's session.
//! - `event`: [`Event`], what a node reports (on its [`Events`] stream).
//! - `node`: [`ChatNode`], its builder and errors; the actor, per-peer links (each driven
//!   by a pure outbox state machine) and readers; the node database (outbox, inbox, dedup
//!   windows, block/mute/pins) in a memory-mapped journal compacted into redb.
//! - `testing` (feature `test-utils`): conformance suites every backend must pass, and the
//!   check that keeps these layers one way.
//!
//! ## Features
//! - `node` (default): the node and everything only it needs (`transport`, `discovery`,
//!   `event`, `node`). Without it the crate is the protocol, keys, crypto, announcements and
//!   stores: what the discovery server builds on.
//! - `redis` (default): [`RedisStore`](store::RedisStore).
//! - `test-utils`: `testing`.

pub mod announce;
pub mod crypto;
#[cfg(feature = "node")]
pub mod discovery;
pub mod error;
#[cfg(feature = "node")]
pub mod event;
pub mod identity;
pub mod limits;
#[cfg(feature = "node")]
pub mod node;
pub mod protocol;
pub mod store;
#[cfg(feature = "test-utils")]
pub mod testing;
#[cfg(feature = "node")]
pub mod transport;

pub use announce::Announcement;
#[cfg(feature = "node")]
pub use discovery::MailboxStore;
#[cfg(feature = "node")]
pub use discovery::{
    Discovery, DiscoveryClient, DiscoveryError, DiscoverySession, MemoryDiscovery, PeerRecord,
};
pub use error::Cause;
#[cfg(feature = "node")]
pub use event::Event;
pub use identity::{Fingerprint, Identity, PublicKey};
#[cfg(feature = "node")]
pub use node::{
    ChatNode, ChatNodeBuilder, Confirm, DbError, Durability, Events, HistoryEntry, MessageRequest,
    NodeError, OutboxEntry, OutboxState, PeerPath, SafetyCodes, SpawnError,
};
pub use protocol::MessageId;
#[cfg(feature = "redis")]
pub use store::{DEFAULT_ANNOUNCEMENT_CHANNEL, RedisStore, RedisStoreConfig};
pub use store::{MemoryStore, OfflineStore, StoreError, StoredMessage};
#[cfg(feature = "node")]
pub use transport::{MemoryNetwork, TcpTransport, Transport, TransportError};
