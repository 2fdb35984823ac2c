//! # p2pchat-discovery
//!
//! The discovery server of p2pchat, as a library: a directory binding usernames to identity
//! keys, with presence kept alive over one persistent session per node and pushed to the
//! nodes that watch it. The `p2pchat-discovery` binary is a thin `main` over [`serve`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
//!
//! let storage = RedbStorage::open(std::path::Path::new("/var/lib/p2pchat-discovery"))?;
//! let directory = Directory::new(Config::default(), storage);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:5001").await?;
//! serve(listener, directory, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! ## How a session goes
//! The server sends a challenge; the client answers with a claim (name, key, listen port,
//! announced addresses) signed over the challenge. The first registration of a name claims
//! it for its key; a different key is refused while the claim stands ([`Config::claim_lapse`]
//! of inactivity). The user is online until the session deregisters, closes, or misses
//! keep-alives for [`Config::presence_ttl`]. The wire types are shared with the client in
//! [`p2pchat_core::protocol::discovery`].
//!
//! ## Modules, top to bottom (each uses only those below it)
//! - [`server`]: [`serve`], the accept loop.
//! - `session`: one connection, in rooms: the connection's frames, the registration (with
//!   the reachability probe), an announcement, one side of a relay, and one file per request
//!   kind.
//! - [`directory`]: [`Directory`], the state the sessions share, behind methods; the relay
//!   of presence changes and announcements.
//! - `relay`: relays between peers that cannot dial each other: pairing two connections by
//!   a token within the relay limits, and splicing them.
//! - `mail`: the mailboxes as sessions use them, with the deposit rules beside them.
//! - [`storage`]: the [`Storage`] trait, [`RedbStorage`] and [`RedisStorage`]; the redb
//!   mailbox and its versioned records.
//! - [`config`]: [`Config`] and the named defaults; `limits`: the per-key rates (connection
//!   caps: `p2pchat_core::limits`).
//! - [`operator`]: [`relay_announcement`], the operator's side of an announcement (a client
//!   of the server; uses nothing above).
//! - `testing` (feature `test-utils`): `DiscoveryProcess`, the real binary for tests and
//!   load programs.
//! - `fuzz` (feature `test-utils`): the check behind the `discovery_protocol` fuzz target.

pub mod config;
pub mod directory;
#[cfg(feature = "test-utils")]
pub mod fuzz;
mod limits;
mod mail;
pub mod operator;
mod relay;
pub mod server;
mod session;
pub mod storage;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use config::Config;
pub use directory::Directory;
pub use operator::{RelayError, relay_announcement};
pub use server::{serve, serve_connection};
pub use session::{MAX_IN_FLIGHT, WRITE_TIMEOUT};
pub use storage::{RedbStorage, RedisStorage, Storage, StorageError};
