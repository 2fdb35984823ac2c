//! [`TcpTransport`]: plain TCP with `TCP_NODELAY`.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::{TcpListener, TcpStream};

use super::{Connection, Listener, Transport, TransportError};

/// How long a dial may take before it fails with [`TransportError::Timeout`].
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP over the operating system's sockets. Nagle's algorithm is off on every connection:
/// the node batches writes itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

impl TcpTransport {
    /// A TCP transport.
    pub fn new() -> Self {
        Self
    }
}

fn map_io(op: &'static str, addr: SocketAddr, source: std::io::Error) -> TransportError {
    match source.kind() {
        std::io::ErrorKind::ConnectionRefused => TransportError::ConnectionRefused { addr },
        std::io::ErrorKind::AddrInUse => TransportError::AddrInUse { addr },
        _ => TransportError::Io { op, addr, source },
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn bind(&self, addr: SocketAddr) -> Result<Box<dyn Listener>, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| map_io("bind", addr, e))?;
        let local = listener.local_addr().map_err(|e| map_io("bind", addr, e))?;
        Ok(Box::new(TcpListenerImpl { listener, local }))
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let stream = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| TransportError::Timeout { addr })?
            .map_err(|e| map_io("dial", addr, e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| map_io("dial", addr, e))?;
        Ok(tcp_connection(stream, addr))
    }
}

fn tcp_connection(stream: TcpStream, remote: SocketAddr) -> Connection {
    let (reader, writer) = stream.into_split();
    Connection {
        reader: Box::new(reader),
        writer: Box::new(writer),
        remote,
    }
}

#[derive(Debug)]
struct TcpListenerImpl {
    listener: TcpListener,
    local: SocketAddr,
}

#[async_trait]
impl Listener for TcpListenerImpl {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        loop {
            match self.listener.accept().await {
                Ok((stream, remote)) => {
                    // A peer that resets before we set the option is just a lost connection.
                    if stream.set_nodelay(true).is_err() {
                        continue;
                    }
                    return Ok(tcp_connection(stream, remote));
                }
                // Per-connection failures (the peer reset before accept) do not stop the
                // listener.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(map_io("accept", self.local, e)),
            }
        }
    }
}
