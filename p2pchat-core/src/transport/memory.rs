//! [`MemoryNetwork`]: an in-process network of pipes, for tests and embedding.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Connection, Listener, Transport, TransportError};

/// Bytes buffered in each direction of an in-memory connection before writes wait.
pub const MEMORY_PIPE_CAPACITY: usize = 256 * 1024;

/// Connections waiting to be accepted by one in-memory listener.
const MEMORY_ACCEPT_BACKLOG: usize = 128;

/// An in-process network: listeners bind addresses in a private table, dials create
/// in-memory pipes. Clones share the same network; separate `MemoryNetwork::new()`s are
/// separate networks (there is no global state).
#[derive(Debug, Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    listeners: HashMap<SocketAddr, mpsc::Sender<Connection>>,
    next_port: u16,
}

impl Table {
    fn fresh_addr(&mut self) -> SocketAddr {
        loop {
            self.next_port = self.next_port.checked_add(1).unwrap_or(1024).max(1024);
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.next_port);
            if !self.listeners.contains_key(&addr) {
                return addr;
            }
        }
    }
}

impl MemoryNetwork {
    /// A new, empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> parking_lot::MutexGuard<'_, Table> {
        // The table holds no invariants a panic could break half-way.
        self.inner.lock()
    }
}

#[async_trait]
impl Transport for MemoryNetwork {
    async fn bind(&self, addr: SocketAddr) -> Result<Box<dyn Listener>, TransportError> {
        let mut table = self.table();
        let addr = if addr.port() == 0 {
            table.fresh_addr()
        } else {
            addr
        };
        if table.listeners.get(&addr).is_some_and(|tx| !tx.is_closed()) {
            return Err(TransportError::AddrInUse { addr });
        }
        let (tx, rx) = mpsc::channel(MEMORY_ACCEPT_BACKLOG);
        table.listeners.insert(addr, tx);
        Ok(Box::new(MemoryListener {
            addr,
            incoming: rx,
            network: self.clone(),
        }))
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let (tx, local) = {
            let mut table = self.table();
            let tx = table
                .listeners
                .get(&addr)
                .cloned()
                .ok_or(TransportError::ConnectionRefused { addr })?;
            (tx, table.fresh_addr())
        };
        let (ours, theirs) = tokio::io::duplex(MEMORY_PIPE_CAPACITY);
        tx.send(Connection::new(theirs, local))
            .await
            .map_err(|_| TransportError::ConnectionRefused { addr })?;
        Ok(Connection::new(ours, addr))
    }
}

#[derive(Debug)]
struct MemoryListener {
    addr: SocketAddr,
    incoming: mpsc::Receiver<Connection>,
    network: MemoryNetwork,
}

#[async_trait]
impl Listener for MemoryListener {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        self.incoming.recv().await.ok_or(TransportError::Closed)
    }
}

impl Drop for MemoryListener {
    fn drop(&mut self) {
        self.network.table().listeners.remove(&self.addr);
    }
}
