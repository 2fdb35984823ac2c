//! A fault-injecting TCP proxy on 127.0.0.1: it forwards between each client and an upstream
//! and, under test control, delays chunks, cuts connections (both sides at once), or
//! blackholes the traffic (swallows it without closing anything, so each side notices only
//! through its own timeouts).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the proxy does with the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward them at once.
    Forward,
    /// Forward each chunk this long after it was read, in order.
    Delay(Duration),
    /// Read and discard everything, in both directions, and close nothing (an end that
    /// closes is not heard of either). When the blackhole lifts, every connection that lost
    /// bytes or saw an end meanwhile is cut: its byte stream has a hole, and a real
    /// connection would end in a timeout or a reset.
    Blackhole,
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections cut by [`Proxy::cut_all`] or by the end of a blackhole.
    pub cut: u64,
    /// Bytes forwarded (both directions).
    pub forwarded: u64,
    /// Bytes swallowed by a blackhole.
    pub swallowed: u64,
}

struct Conn {
    cut: CancellationToken,
    /// Lost bytes, or an end, to a blackhole.
    holed: Arc<AtomicBool>,
}

struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    mode: watch::Sender<Mode>,
    conns: Mutex<HashMap<u64, Conn>>,
    next: AtomicU64,
    accepted: AtomicU64,
    cut: AtomicU64,
    forwarded: AtomicU64,
    swallowed: AtomicU64,
    /// Woken on every accepted connection.
    accepts: Notify,
}

/// A proxy listening on 127.0.0.1; stops (cutting every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream`, or to nowhere until [`Proxy::set_upstream`] (clients are
    /// closed at once meanwhile).
    pub async fn start(upstream: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            mode: watch::channel(Mode::Forward).0,
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            swallowed: AtomicU64::new(0),
            accepts: Notify::new(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().unwrap() = Some(upstream);
    }

    /// Switches the mode for every connection, open or future. Lifting a blackhole cuts the
    /// connections it holed.
    pub fn set_mode(&self, mode: Mode) {
        let was = self.shared.mode.send_replace(mode);
        if was == Mode::Blackhole && mode != Mode::Blackhole {
            self.cut_where(|c| c.holed.load(Ordering::SeqCst));
        }
    }

    /// Cuts every open connection, both sides at once (bytes in transit are lost). Returns
    /// how many.
    pub fn cut_all(&self) -> usize {
        self.cut_where(|_| true)
    }

    fn cut_where(&self, which: impl Fn(&Conn) -> bool) -> usize {
        let conns = self.shared.conns.lock().unwrap();
        let mut n = 0;
        for conn in conns.values().filter(|c| which(c)) {
            if !conn.cut.is_cancelled() {
                conn.cut.cancel();
                n += 1;
            }
        }
        self.shared.cut.fetch_add(n as u64, Ordering::SeqCst);
        n
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            accepted: s.accepted.load(Ordering::SeqCst),
            cut: s.cut.load(Ordering::SeqCst),
            forwarded: s.forwarded.load(Ordering::SeqCst),
            swallowed: s.swallowed.load(Ordering::SeqCst),
        }
    }

    /// Waits until the proxy has accepted at least `n` connections in all.
    pub async fn accepted_at_least(&self, n: u64, within: Duration) {
        tokio::time::timeout(within, async {
            loop {
                let notified = self.shared.accepts.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.shared.accepted.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the proxy did not accept {n} connections within {within:?}"));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.accepts.notify_waiters();
        tokio::spawn(relay(shared.clone(), client));
    }
}

/// One client connection: connects upstream, then pumps both ways until both directions
/// end or the connection is cut. Dropping the halves closes both sockets.
async fn relay(shared: Arc<Shared>, client: TcpStream) {
    let upstream = *shared.upstream.lock().unwrap();
    let Some(upstream) = upstream else { return };
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = shared.next.fetch_add(1, Ordering::SeqCst);
    let cut = CancellationToken::new();
    let holed = Arc::new(AtomicBool::new(false));
    shared.conns.lock().unwrap().insert(
        id,
        Conn {
            cut: cut.clone(),
            holed: holed.clone(),
        },
    );
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(&shared, client_read, server_write, &cut, &holed),
        pump(&shared, server_read, client_write, &cut, &holed),
    );
    shared.conns.lock().unwrap().remove(&id);
}

/// One direction. Reads chunks and queues them with the time each is due; a writer sends
/// them on when due. An end read here is passed on (after what was queued) as an end
/// written there; an error cuts the whole connection.
async fn pump(
    shared: &Shared,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut: &CancellationToken,
    holed: &AtomicBool,
) {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut modes = shared.mode.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::select! {
                _ = cut.cancelled() => return,
                read = from.read(&mut buf) => read,
            };
            let n = match read {
                Ok(0) => {
                    if *modes.borrow_and_update() == Mode::Blackhole {
                        // Nobody hears of it until the blackhole lifts, and then the
                        // connection is cut.
                        holed.store(true, Ordering::SeqCst);
                        cut.cancelled().await;
                    }
                    return;
                }
                Ok(n) => n,
                Err(_) => {
                    cut.cancel();
                    return;
                }
            };
            let due = match *modes.borrow_and_update() {
                Mode::Blackhole => {
                    holed.store(true, Ordering::SeqCst);
                    shared.swallowed.fetch_add(n as u64, Ordering::SeqCst);
                    continue;
                }
                Mode::Forward => Instant::now(),
                Mode::Delay(d) => Instant::now() + d,
            };
            tokio::select! {
                _ = cut.cancelled() => return,
                sent = queue.send((due, buf[..n].to_vec())) => if sent.is_err() { return },
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = tokio::select! {
            _ = cut.cancelled() => None,
            next = queued.recv() => next,
        } {
            let written = tokio::select! {
                _ = cut.cancelled() => return,
                written = async {
                    tokio::time::sleep_until(due).await;
                    to.write_all(&chunk).await
                } => written,
            };
            if written.is_err() {
                cut.cancel();
                return;
            }
            shared
                .forwarded
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        if !cut.is_cancelled() {
            let _ = to.shutdown().await;
        }
    };
    tokio::join!(reader, writer);
}
