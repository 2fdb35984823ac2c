//! The accept loop: [`serve`] a [`Directory`] on a listener until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::SHUTDOWN_GRACE;
use crate::directory::Directory;
use crate::session;

/// Wait after a failed `accept` (out of descriptors, say) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves one connection over any byte stream (a TLS stream, a stream behind a proxy that
/// tells the client's address, a test's pipe) as if `peer` had connected: registration,
/// requests, pushes, or one side of a relay, under the same limits as [`serve`]'s. Returns
/// when the connection ends or `stop` is cancelled. The dispatcher and sweeper run in
/// [`serve`]; without it, presence pushes and expiry do not happen.
pub async fn serve_connection<R, W>(
    directory: Arc<Directory>,
    read: R,
    write: W,
    peer: std::net::SocketAddr,
    stop: CancellationToken,
) where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
    W: tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    session::serve_connection(directory, read, write, peer, stop).await;
}

/// Serves discovery sessions on `listener` until `shutdown` completes.
///
/// On shutdown it stops accepting, tells every session the server is going away (each
/// marks its user offline), and waits up to [`SHUTDOWN_GRACE`] for them to finish.
pub async fn serve(
    listener: TcpListener,
    directory: Arc<Directory>,
    shutdown: impl Future<Output = ()>,
) {
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    // What was relayed before the last stop is not relayed again.
    directory.load_announced().await;
    // Subscribe before the first session can register, so no change is missed.
    let feed = directory.storage.presence_changes();
    let announcements = directory.storage.announcements();
    let signals = directory.storage.signals();
    tasks.spawn(
        directory
            .clone()
            .dispatch_loop(feed, announcements, signals, stop.clone()),
    );
    tasks.spawn(directory.clone().sweep_loop(stop.clone()));
    if let Ok(addr) = listener.local_addr() {
        directory.set_listen_addr(addr);
        tracing::info!(%addr, "serving discovery sessions");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("session", %peer);
                    tasks.spawn(session::run(directory.clone(), stream, peer, stop.clone()).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!("shutting down");
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after the shutdown grace period");
    }
}
