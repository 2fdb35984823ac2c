//! [`RedisStorage`]: claims, presence leases and the presence feed in Redis, shared by every
//! server instance that uses the same Redis (and key prefix).
//!
//! # Keys (under a prefix, [`DEFAULT_KEY_PREFIX`] unless configured)
//! - `{prefix}:claim:{user}`: hash `key` (the owner's public key, hex), `seen` (Unix ms).
//!   Durable: it is up to the Redis deployment to persist it (AOF or snapshots).
//! - `{prefix}:presence:{user}`: hash `session` (the [`SessionId`], hex), `lease` (the
//!   [`Lease`] as JSON), `key` (the lease's public key, hex), expiring (`PEXPIRE`) when the
//!   lease does; reads see it vanish exactly at expiry.
//! - `{prefix}:expiry`: sorted set user → lease expiry (Unix ms), which is what
//!   [`Storage::sweep`] scans to publish expired leases as offline.
//! - `{prefix}:online`: sorted set of the users with a lease, all with score 0, so
//!   `ZRANGEBYLEX` lists them in name order. Members whose presence key already expired are
//!   skipped by the reads and removed by the next sweep.
//! - `{prefix}:presence`: the pub/sub channel carrying every [`PresenceChange`] as JSON.
//! - `{prefix}:signal`: the pub/sub channel carrying [`Signal`]s (connect-back requests and
//!   relay offers for a session on another instance) as JSON.
//!
//! # Transitions
//! Every transition touching several keys is one Lua script, so it is atomic across
//! instances, and takes "now" from the Redis server (`TIME`), so the instances' clocks do not
//! matter:
//! - claim: refused while another key holds the name, unless that claim's `seen` is at least
//!   `lapse` old *and* nobody is online under the name (nor while a lease with another key is
//!   online). The owner's own claim is rewritten only when its `seen` is older than
//!   [`touch_interval`](super::touch_interval)`(lapse)`.
//! - touch: sets `seen` only if the claim is held by the given key.
//! - set_online: replaces the presence hash, sets its expiry, scores both sets and publishes
//!   `Online`.
//! - refresh / set_offline: only while the presence hash names the caller's session.
//! - sweep: lists users whose expiry score has passed, then per user a script re-checks the
//!   score (and that the presence key really is gone) before deleting and publishing
//!   `Offline`, so exactly one instance publishes each expiry.
//!
//! The change payloads are built in Rust (JSON of [`PresenceChange`]) and handed to the
//! scripts, which `PUBLISH` them.
//!
//! # Connection
//! One [`ConnectionManager`] in RESP3 mode carries both the commands and the subscription
//! to `{prefix}:presence` (pushes arrive on the same connection). It reconnects by itself
//! when Redis goes away and comes back, and subscribes again; a background task turns the
//! pushes into [`PresenceChange`]s on a broadcast channel and, after a disconnection, pings
//! until the connection (and with it the subscription) is back even when no request comes
//! in. Changes published while disconnected are lost, as with any pub/sub. Requests made
//! while Redis is unreachable fail with [`StorageError::Unavailable`].

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use p2pchat_core::store::redis_conn::{PushHandler, connection, script_with_now, spawn_push_feed};
use p2pchat_core::store::{
    DEFAULT_ANNOUNCEMENT_CHANNEL, OfflineStore, Quotas, RedisStore, RedisStoreConfig,
};
use p2pchat_core::{Announcement, PublicKey};
use redis::aio::ConnectionManager;
use redis::{Msg, Script};
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;

use super::{
    ANNOUNCEMENT_FEED_CAPACITY, Lease, NameClaim, PRESENCE_FEED_CAPACITY, PresenceChange,
    SIGNAL_FEED_CAPACITY, SessionId, Signal, Storage, StorageError, touch_interval, unix_ms,
};

/// Prefix of every key and channel name, unless configured. Default: `p2pchat`.
pub const DEFAULT_KEY_PREFIX: &str = "p2pchat";

/// How a [`RedisStorage`] uses its Redis.
#[derive(Debug, Clone)]
pub struct RedisStorageConfig {
    /// Prefix of every key (and of the presence channel). Instances sharing a directory use
    /// the same one. By default, [`DEFAULT_KEY_PREFIX`].
    pub prefix: String,
    /// The channel announcements are published on, for the other instances and for nodes
    /// that listen to Redis directly. By default, `special` (as the original).
    pub announcement_channel: String,
    /// What may wait in the mailboxes: per recipient, sender, pair and in all. By default,
    /// [`Quotas::default`].
    pub quotas: Quotas,
}

impl Default for RedisStorageConfig {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_KEY_PREFIX.to_owned(),
            announcement_channel: DEFAULT_ANNOUNCEMENT_CHANNEL.to_owned(),
            quotas: Quotas::default(),
        }
    }
}

/// Expired leases handled per sweep round trip.
const SWEEP_BATCH: usize = 1000;

/// KEYS: claim, presence. ARGV: key, lapse ms, touch interval ms. 1: claimed, 0: taken.
const CLAIM: &str = "
local online = redis.call('EXISTS', KEYS[2]) == 1
local online_key = redis.call('HGET', KEYS[2], 'key')
if online_key and online_key ~= ARGV[1] then return 0 end
local current = redis.call('HMGET', KEYS[1], 'key', 'seen')
local seen = tonumber(current[2]) or 0
if current[1] and current[1] ~= ARGV[1] then
  if online or now - seen < tonumber(ARGV[2]) then return 0 end
elseif current[1] == ARGV[1] and now - seen < tonumber(ARGV[3]) then
  return 1
end
redis.call('HSET', KEYS[1], 'key', ARGV[1], 'seen', now)
return 1
";

/// KEYS: claim. ARGV: key. 1: touched, 0: not the owner.
const TOUCH: &str = "
if redis.call('HGET', KEYS[1], 'key') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'seen', now)
return 1
";

/// KEYS: presence, expiry, online. ARGV: user, session, lease JSON, key, ttl ms, channel,
/// change JSON.
const SET_ONLINE: &str = "
local ttl = tonumber(ARGV[5])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'session', ARGV[2], 'lease', ARGV[3], 'key', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
";

/// KEYS: presence, expiry. ARGV: user, session, ttl ms. 1: refreshed, 0: not the holder.
const REFRESH: &str = "
if redis.call('HGET', KEYS[1], 'session') ~= ARGV[2] then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
return 1
";

/// KEYS: presence, expiry, online. ARGV: user, session, channel, change JSON. 1: ended,
/// 0: not the holder.
const SET_OFFLINE: &str = "
if redis.call('HGET', KEYS[1], 'session') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// KEYS: presence, expiry, online. ARGV: user, channel, change JSON. 1: swept, 2: still live
/// (rescored), 0: nothing to do.
const SWEEP_ONE: &str = "
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > now then return 0 end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then
  redis.call('ZADD', KEYS[2], now + pttl, ARGV[1])
  return 2
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Claims, presence and the change feed in Redis. Cheap to clone (clones share the
/// connection and the feed).
#[derive(Debug, Clone)]
pub struct RedisStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    changes: broadcast::Sender<PresenceChange>,
    announcements: broadcast::Sender<Announcement>,
    announcement_channel: String,
    /// `keys.channel()`, built once: the feed compares every push with it.
    presence_channel: String,
    signals: broadcast::Sender<Signal>,
    /// `keys.signal_channel()`, built once.
    signal_channel: String,
    mailbox: RedisStore,
    /// Turns the pushes into presence changes and announcements; stops when the storage
    /// goes.
    _feed: AbortOnDropHandle<()>,
}

#[derive(Debug)]
struct Scripts {
    claim: Script,
    touch: Script,
    set_online: Script,
    /// SET_ONLINE, only when no lease exists.
    revive: Script,
    refresh: Script,
    set_offline: Script,
    sweep_one: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_now = script_with_now;
        Self {
            claim: with_now(CLAIM),
            touch: with_now(TOUCH),
            set_online: with_now(SET_ONLINE),
            revive: with_now(&format!(
                "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n{SET_ONLINE}"
            )),
            refresh: with_now(REFRESH),
            set_offline: with_now(SET_OFFLINE),
            sweep_one: with_now(SWEEP_ONE),
        }
    }
}

/// Key and channel names under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn claim(&self, user: &str) -> String {
        format!("{}:claim:{user}", self.prefix)
    }
    fn presence(&self, user: &str) -> String {
        format!("{}:presence:{user}", self.prefix)
    }
    fn expiry(&self) -> String {
        format!("{}:expiry", self.prefix)
    }
    fn online(&self) -> String {
        format!("{}:online", self.prefix)
    }
    fn channel(&self) -> String {
        format!("{}:presence", self.prefix)
    }
    fn signal_channel(&self) -> String {
        format!("{}:signal", self.prefix)
    }
    fn announced(&self) -> String {
        format!("{}:announced", self.prefix)
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::unavailable(e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StorageError> {
    serde_json::to_string(value)
        .map_err(|e| StorageError::corrupt("a record to store", Some(e.into())))
}

fn parse_lease(username: &str, json: &str) -> Result<Lease, StorageError> {
    serde_json::from_str(json)
        .map_err(|e| StorageError::corrupt(format!("the lease of '{username}'"), Some(e.into())))
}

impl RedisStorage {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`) with the
    /// [`DEFAULT_KEY_PREFIX`], and subscribes to the presence feed.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        Self::connect_with_prefix(url, DEFAULT_KEY_PREFIX).await
    }

    /// Connects to the Redis at `url`, keeping every key and channel under `prefix`
    /// (instances sharing a directory must use the same prefix), with the default
    /// announcement channel and mailbox quota.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self, StorageError> {
        Self::connect_with(
            url,
            RedisStorageConfig {
                prefix: prefix.to_owned(),
                ..RedisStorageConfig::default()
            },
        )
        .await
    }

    /// Connects to the Redis at `url` with `config`.
    pub async fn connect_with(
        url: &str,
        settings: RedisStorageConfig,
    ) -> Result<Self, StorageError> {
        let prefix = settings.prefix.as_str();
        let mailbox = RedisStore::connect_with(
            url,
            RedisStoreConfig {
                prefix: prefix.to_owned(),
                quotas: settings.quotas,
            },
        )
        .await
        .map_err(unavailable)?;
        let (conn, push_rx) = connection(url).await.map_err(unavailable)?;

        let keys = Keys {
            prefix: prefix.to_owned(),
        };
        let changes = broadcast::channel(PRESENCE_FEED_CAPACITY).0;
        let announcements = broadcast::channel(ANNOUNCEMENT_FEED_CAPACITY).0;
        let announcement_channel = settings.announcement_channel.clone();
        let presence_channel = keys.channel();
        let signal_channel = keys.signal_channel();
        let signals = broadcast::channel(SIGNAL_FEED_CAPACITY).0;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let feed = spawn_push_feed(push_rx, weak.clone());
            Inner {
                conn,
                keys,
                scripts: Scripts::new(),
                changes,
                announcements,
                presence_channel,
                announcement_channel,
                signals,
                signal_channel,
                mailbox,
                _feed: feed,
            }
        });
        inner
            .conn()
            .subscribe(&[
                inner.presence_channel.clone(),
                inner.announcement_channel.clone(),
                inner.signal_channel.clone(),
            ])
            .await
            .map_err(unavailable)?;
        Ok(Self { inner })
    }

    /// Runs SET_ONLINE or REVIVE for `lease`; `true` when the lease was put online.
    async fn put_lease(
        &self,
        script: &Script,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StorageError> {
        let keys = &self.inner.keys;
        let user = lease.username.as_str();
        let change = to_json(&PresenceChange::Online {
            username: lease.username.clone(),
            session: lease.session,
        })?;
        let put: i64 = script
            .key(keys.presence(user))
            .key(keys.expiry())
            .key(keys.online())
            .arg(user)
            .arg(lease.session.to_string())
            .arg(to_json(lease)?)
            .arg(lease.public_key.to_string())
            .arg(millis(ttl))
            .arg(keys.channel())
            .arg(change)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(put == 1)
    }

    async fn server_time_ms(&self) -> Result<u64, StorageError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Ends one expired lease, unless another instance did or it was renewed. `true` when
    /// this call changed something.
    async fn sweep_one(&self, username: &str) -> Result<bool, StorageError> {
        let keys = &self.inner.keys;
        let change = to_json(&PresenceChange::Offline {
            username: username.to_owned(),
        })?;
        let done: i64 = self
            .inner
            .scripts
            .sweep_one
            .key(keys.presence(username))
            .key(keys.expiry())
            .key(keys.online())
            .arg(username)
            .arg(keys.channel())
            .arg(change)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(done != 0)
    }
}

impl Inner {
    /// A handle on the shared connection (commands need `&mut`).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

impl PushHandler for Inner {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn message(&self, msg: Msg) {
        let name = msg.get_channel_name();
        if name == self.announcement_channel {
            // Anyone can publish there: the dispatcher verifies before relaying.
            match std::str::from_utf8(msg.get_payload_bytes())
                .ok()
                .map(Announcement::from_json)
            {
                Some(Ok(a)) => drop(self.announcements.send(a)),
                _ => tracing::debug!(channel = %name, "ignoring a malformed announcement"),
            }
            return;
        }
        if name == self.signal_channel {
            match serde_json::from_slice::<Signal>(msg.get_payload_bytes()) {
                Ok(signal) => drop(self.signals.send(signal)),
                Err(e) => tracing::debug!(channel = %name, "ignoring a malformed signal: {e}"),
            }
            return;
        }
        if name != self.presence_channel {
            return;
        }
        match serde_json::from_slice::<PresenceChange>(msg.get_payload_bytes()) {
            // Nobody listening is fine.
            Ok(change) => drop(self.changes.send(change)),
            Err(e) => tracing::warn!(channel = %name, "ignoring a malformed presence change: {e}"),
        }
    }
}

#[async_trait]
impl Storage for RedisStorage {
    async fn claim(
        &self,
        username: &str,
        key: &PublicKey,
        lapse: Duration,
    ) -> Result<(), StorageError> {
        let keys = &self.inner.keys;
        let claimed: i64 = self
            .inner
            .scripts
            .claim
            .key(keys.claim(username))
            .key(keys.presence(username))
            .arg(key.to_string())
            .arg(millis(lapse))
            .arg(millis(touch_interval(lapse)))
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        if claimed == 0 {
            return Err(StorageError::NameTaken(username.to_owned()));
        }
        Ok(())
    }

    async fn claim_of(&self, username: &str) -> Result<Option<NameClaim>, StorageError> {
        let (key, seen): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.inner.keys.claim(username))
            .arg("key")
            .arg("seen")
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        let Some(key) = key else {
            return Ok(None);
        };
        let corrupt = || StorageError::corrupt(format!("the claim on '{username}'"), None);
        let public_key = key.parse::<PublicKey>().map_err(|_| corrupt())?;
        let seen = seen
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(corrupt)?;
        Ok(Some(NameClaim {
            public_key,
            last_seen: SystemTime::UNIX_EPOCH + Duration::from_millis(seen),
        }))
    }

    async fn touch(&self, username: &str, key: &PublicKey) -> Result<(), StorageError> {
        let _: i64 = self
            .inner
            .scripts
            .touch
            .key(self.inner.keys.claim(username))
            .arg(key.to_string())
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn set_online(&self, lease: &Lease, ttl: Duration) -> Result<(), StorageError> {
        self.put_lease(&self.inner.scripts.set_online, lease, ttl)
            .await
            .map(drop)
    }

    async fn revive(&self, lease: &Lease, ttl: Duration) -> Result<bool, StorageError> {
        self.put_lease(&self.inner.scripts.revive, lease, ttl).await
    }

    async fn refresh(
        &self,
        username: &str,
        session: SessionId,
        ttl: Duration,
    ) -> Result<bool, StorageError> {
        let keys = &self.inner.keys;
        let refreshed: i64 = self
            .inner
            .scripts
            .refresh
            .key(keys.presence(username))
            .key(keys.expiry())
            .arg(username)
            .arg(session.to_string())
            .arg(millis(ttl))
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(refreshed != 0)
    }

    async fn set_offline(&self, username: &str, session: SessionId) -> Result<bool, StorageError> {
        let keys = &self.inner.keys;
        let change = to_json(&PresenceChange::Offline {
            username: username.to_owned(),
        })?;
        let ended: i64 = self
            .inner
            .scripts
            .set_offline
            .key(keys.presence(username))
            .key(keys.expiry())
            .key(keys.online())
            .arg(username)
            .arg(session.to_string())
            .arg(keys.channel())
            .arg(change)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(ended != 0)
    }

    async fn online(&self, username: &str) -> Result<Option<Lease>, StorageError> {
        let lease: Option<String> = redis::cmd("HGET")
            .arg(self.inner.keys.presence(username))
            .arg("lease")
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        lease.map(|json| parse_lease(username, &json)).transpose()
    }

    async fn list_online(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StorageError> {
        let keys = &self.inner.keys;
        let mut leases = Vec::new();
        let mut from = match after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        while leases.len() < limit {
            let want = limit - leases.len();
            let names: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(keys.online())
                .arg(&from)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .query_async(&mut self.inner.conn())
                .await
                .map_err(unavailable)?;
            let Some(last) = names.last() else {
                break;
            };
            let mut pipe = redis::pipe();
            for name in &names {
                pipe.cmd("HGET").arg(keys.presence(name)).arg("lease");
            }
            let found: Vec<Option<String>> = pipe
                .query_async(&mut self.inner.conn())
                .await
                .map_err(unavailable)?;
            for (name, json) in names.iter().zip(found) {
                // No lease: expired, not swept yet.
                if let Some(json) = json {
                    leases.push(parse_lease(name, &json)?);
                }
            }
            if names.len() < want {
                break;
            }
            from = format!("({last}");
        }
        Ok(leases)
    }

    async fn sweep(&self) -> Result<(), StorageError> {
        loop {
            let now = self.server_time_ms().await?;
            let expired: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.inner.keys.expiry())
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut self.inner.conn())
                .await
                .map_err(unavailable)?;
            let mut changed = false;
            for username in &expired {
                changed |= self.sweep_one(username).await?;
            }
            // A short batch was the last one; a batch where nothing changed would come back
            // the same.
            if expired.len() < SWEEP_BATCH || !changed {
                return Ok(());
            }
        }
    }

    fn presence_changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.inner.changes.subscribe()
    }

    fn mailbox(&self) -> Arc<dyn OfflineStore> {
        Arc::new(self.inner.mailbox.clone())
    }

    async fn publish_announcement(&self, announcement: &Announcement) -> Result<(), StorageError> {
        redis::cmd("PUBLISH")
            .arg(&self.inner.announcement_channel)
            .arg(announcement.to_json())
            .query_async::<i64>(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.inner.announcements.subscribe()
    }

    async fn record_announcement(&self, id: &str, issued_at_ms: u64) -> Result<(), StorageError> {
        let key = self.inner.keys.announced();
        let max_age = p2pchat_core::announce::ANNOUNCEMENT_MAX_AGE.as_millis() as u64;
        let oldest = unix_ms(SystemTime::now()).saturating_sub(max_age);
        let _: () = redis::pipe()
            .atomic()
            .zadd(&key, id, issued_at_ms)
            .ignore()
            .zrembyscore(&key, "-inf", format!("({oldest}"))
            .ignore()
            .pexpire(&key, max_age as i64 * 2)
            .ignore()
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn recent_announcements(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, u64)>, StorageError> {
        let recent: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.inner.keys.announced())
            .arg(since_ms)
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(recent)
    }

    async fn publish_signal(&self, signal: &Signal) -> Result<(), StorageError> {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&self.inner.signal_channel)
            .arg(to_json(signal)?)
            .query_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn signals(&self) -> broadcast::Receiver<Signal> {
        self.inner.signals.subscribe()
    }
}
