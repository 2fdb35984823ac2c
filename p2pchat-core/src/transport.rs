//! How peers reach each other: the [`Transport`] trait and its implementations.
//!
//! A transport only moves bytes. Framing, the handshake and encryption sit above it and are
//! the same for every transport, so [`MemoryNetwork`] connections carry exactly the bytes a
//! TCP connection would.

mod memory;
mod tcp;

use std::fmt::Debug;
use std::net::SocketAddr;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use memory::{MEMORY_PIPE_CAPACITY, MemoryNetwork};
pub use tcp::{TCP_CONNECT_TIMEOUT, TcpTransport};

/// The reading half of a connection.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin + 'static>;
/// The writing half of a connection.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin + 'static>;

/// An established connection: a byte stream, already split into halves so that reading and
/// writing proceed independently (for TCP without any lock between them), and the address of
/// the other end.
pub struct Connection {
    /// Bytes from the other end.
    pub reader: ReadHalf,
    /// Bytes to the other end.
    pub writer: WriteHalf,
    /// The other end's address, as this end sees it.
    pub remote: SocketAddr,
}

impl Connection {
    /// Wraps a byte stream, splitting it.
    pub fn new(stream: impl AsyncRead + AsyncWrite + Send + 'static, remote: SocketAddr) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            remote,
        }
    }
}

impl Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Errors opening or accepting connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Nothing listens at the address.
    #[error("connection to {addr} refused: nobody is listening there")]
    ConnectionRefused {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The address is already taken by another listener.
    #[error("address {addr} is already in use")]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Connecting took longer than the transport's connect timeout.
    #[error("connecting to {addr} timed out")]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The listener was closed.
    #[error("listener closed")]
    Closed,
    /// Any other I/O failure.
    #[error("{op} {addr}")]
    Io {
        /// What was being done (`"bind"`, `"dial"`, `"accept"`).
        op: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Opens and accepts byte-stream connections between peers.
///
/// # Contract
/// - [`Transport::bind`] returns a [`Listener`] at the requested address; port 0 picks a free
///   one, which [`Listener::local_addr`] reports. Binding a taken address fails with
///   [`TransportError::AddrInUse`].
/// - [`Transport::dial`] returns a connection to whichever listener is bound at `addr`, or
///   [`TransportError::ConnectionRefused`] if none is. Bytes written on one end arrive in
///   order on the other; dropping one end gives end-of-stream on the other.
/// - Dropping a listener stops it: later dials to its address are refused.
///
/// # Cancel safety
/// Both methods may be cancelled; a cancelled dial leaves no half-open connection behind.
#[async_trait]
pub trait Transport: Debug + Send + Sync + 'static {
    /// Starts listening at `addr`.
    async fn bind(&self, addr: SocketAddr) -> Result<Box<dyn Listener>, TransportError>;
    /// Connects to the listener at `addr`.
    async fn dial(&self, addr: SocketAddr) -> Result<Connection, TransportError>;
}

/// Accepts incoming connections. Returned by [`Transport::bind`].
///
/// # Cancel safety
/// [`Listener::accept`] is cancel safe: a cancelled call loses no connection.
#[async_trait]
pub trait Listener: Debug + Send + 'static {
    /// The address this listener is bound to.
    fn local_addr(&self) -> SocketAddr;
    /// Waits for the next incoming connection.
    async fn accept(&mut self) -> Result<Connection, TransportError>;
}
