//! The Redis plumbing every p2pchat component on Redis shares: [`RedisStore`](super::RedisStore)
//! here and the discovery server's storage.
//!
//! - [`connection`]: one RESP3 [`ConnectionManager`] that carries commands and
//!   subscriptions, with its pushes on a channel;
//! - [`spawn_push_feed`]: the task that hands those pushes to their owner (a
//!   [`PushHandler`]) while it lives, and after a disconnection keeps asking until the
//!   connection is back;
//! - [`LUA_NOW`] / [`script_with_now`]: "now" by the Redis server's clock in every script,
//!   so the instances sharing a Redis agree on time.

use std::sync::Weak;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Msg, ProtocolVersion, PushInfo, PushKind, RedisError, Script};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// Each attempt to (re)connect to Redis gives up after this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// A request without a reply after this long fails (and the connection is re-established).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection attempts per outage before requests fail; the delay grows from
/// [`RECONNECT_MIN_DELAY`] up to [`RECONNECT_MAX_DELAY`].
const RECONNECT_RETRIES: usize = 5;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// After a disconnection, how often the feed task pings until the connection is back.
const FEED_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// "Now" on the Redis server, in Unix milliseconds, as the Lua local `now`: the prelude of
/// every script that needs the time.
pub const LUA_NOW: &str = "local t = redis.call('TIME')\n\
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// A script whose `body` can read `now` (see [`LUA_NOW`]).
pub fn script_with_now(body: &str) -> Script {
    Script::new(&format!("{LUA_NOW}{body}"))
}

/// Opens the Redis connection every p2pchat component uses: RESP3 (so subscriptions share
/// the connection), pushes delivered on the returned channel, subscriptions restored after a
/// reconnection, bounded connection and response times, a few retries per outage.
pub async fn connection(
    url: &str,
) -> Result<(ConnectionManager, mpsc::UnboundedReceiver<PushInfo>), RedisError> {
    let info = url.into_connection_info()?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let config = ConnectionManagerConfig::new()
        .set_push_sender(push_tx)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_RETRIES)
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY);
    let conn = ConnectionManager::new_with_config(client, config).await?;
    Ok((conn, push_rx))
}

/// After a `Disconnection` push: pings until the connection is back. The manager reconnects
/// (and resubscribes) on its own, but gives up after a few attempts until the next request,
/// so a component that makes no requests must keep asking. `conn` gives the connection while
/// its owner lives; `false` when the owner is gone.
pub async fn until_reconnected(conn: impl Fn() -> Option<ConnectionManager>) -> bool {
    loop {
        let Some(mut conn) = conn() else {
            return false;
        };
        if redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .is_ok()
        {
            tracing::info!("reconnected to Redis");
            return true;
        }
        drop(conn);
        tokio::time::sleep(FEED_RECONNECT_INTERVAL).await;
    }
}

/// What the owner of a connection does with its pushes (see [`spawn_push_feed`]).
pub trait PushHandler: Send + Sync + 'static {
    /// A handle on the connection the pushes come from.
    fn conn(&self) -> ConnectionManager;
    /// A message published on a subscribed channel.
    fn message(&self, msg: Msg);
    /// The connection came back after a disconnection (subscriptions restored); whatever was
    /// published meanwhile is lost.
    fn reconnected(&self) {}
}

/// Spawns the task that hands the pushes of a connection to `owner` while it lives, until the
/// push channel closes. Dropping the returned handle stops the task at once (an owner keeps
/// it, so the feed ends with the owner).
pub fn spawn_push_feed<H: PushHandler>(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    owner: Weak<H>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(push) = pushes.recv().await {
            match push.kind {
                PushKind::Message => {
                    let Some(msg) = Msg::from_push_info(push) else {
                        continue;
                    };
                    let Some(owner) = owner.upgrade() else {
                        return;
                    };
                    owner.message(msg);
                }
                PushKind::Disconnection => {
                    tracing::warn!("lost the connection to Redis; reconnecting");
                    if !until_reconnected(|| owner.upgrade().map(|o| o.conn())).await {
                        return;
                    }
                    // The subscriptions are back: the manager resubscribes before it hands
                    // out the new connection.
                    let Some(owner) = owner.upgrade() else {
                        return;
                    };
                    owner.reconnected();
                }
                _ => {}
            }
        }
    }))
}
