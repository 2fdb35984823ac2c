//! # p2pchat-discovery
//!
//! The discovery server of p2pchat, as a library: a directory binding usernames to identity
//! keys, with presence kept alive over one persistent session per node and pushed to the
//! nodes that watch it. The `p2pchat-discovery` binary is a thin `main` over [`serve`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use p2pchat_discovery::{Config, RedbStorage, Server, serve};
//!
//! let storage = RedbStorage::open(std::path::Path::new("/var/lib/p2pchat-discovery"))?;
//! let server = Server::new(Config::default(), storage);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:5001").await?;
//! serve(listener, server, async { let _ = tokio::signal::ctrl_c().await; }).await;
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
//! ## Modules
//! - [`server`]: [`Config`], [`Server`] (shared state) and [`serve`] (the accept loop).
//! - `session`: one connection: handshake, requests, pushes.
//! - [`storage`]: the [`Storage`] trait, [`RedbStorage`] and [`RedisStorage`].
//! - `limits`: the registration and deposit rates (connection caps: `p2pchat_core::limits`).
//! - `fuzz` (feature `test-utils`): the check behind the `discovery_protocol` fuzz target.

#[cfg(feature = "test-utils")]
pub mod fuzz;
mod limits;
pub mod server;
mod session;
pub mod storage;

pub use server::{Config, Server, serve};
pub use session::WRITE_TIMEOUT;
pub use storage::{RedbStorage, RedisStorage, Storage, StorageError};
