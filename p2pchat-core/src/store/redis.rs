//! [`RedisStore`]: offline mailboxes in Redis, shared by every node and server that uses the
//! same Redis (and key prefix).
//!
//! # Keys (under a prefix, [`DEFAULT_REDIS_PREFIX`] unless configured)
//! - `{prefix}:mbox:{user}`: a stream, `user`'s mailbox. One entry per waiting message, in
//!   the order put, with the fields `id` (the [`MessageId`], hex), `from`, `to`, `token` (the
//!   Fernet token, as sealed by the sender), `exp` (`expires_at`, Unix milliseconds) and
//!   `exp_ns` (the nanoseconds within that millisecond, so `expires_at` comes back exactly).
//!   Deleted when its last entry goes.
//! - `{prefix}:mbox-ids:{user}`: hash `{from}\n{id}` (sender, message id in hex) → stream
//!   entry id. It makes `put` idempotent per sender and lets `ack` (which names sender and
//!   id, a [`MailKey`]) find the entries. A message id alone names nothing: ids are chosen
//!   by senders and travel in the clear, so another sender's message with the same id is
//!   another message, and neither hides nor removes the first.
//! - `{prefix}:mbox-expiry`: sorted set of every waiting message, member
//!   `{user}\n{from}\n{id}`, score its `exp`: what the sweep scans for expired messages.
//! - `{prefix}:expired:{sender}`: list of expiry notices `{id}\n{recipient}` for `sender`,
//!   emptied by [`take_expired`](OfflineStore::take_expired).
//! - `{prefix}:mbox-usage`: hash of what is waiting, for the [`Quotas`]: messages (`…m`)
//!   and bytes (`…b`) per recipient (`to\n{user}\n`), sender (`from\n{user}\n`) and pair
//!   (`pair\n{from}\n{to}\n`), and the store's bytes (`total\nb`); charged by `put`,
//!   uncharged by `ack` and the sweep, each field deleted when it reaches zero. Entries
//!   charged there carry the field `q`; mail stored before the hash existed has none, is
//!   not counted, and is not uncharged when it leaves (so it cannot cancel newer charges).
//! - `{prefix}:mail:{user}`: the pub/sub channel on which every `put` for `user` publishes
//!   (the message id), feeding [`subscribe`](OfflineStore::subscribe).
//!
//! Entries written before mail was keyed by sender have the hash field `{id}` and the
//! expiry member `{user}\n{id}`; `put`, `ack` and the sweep still find them (`put` and
//! `ack` only when the entry's sender is the one named). A process of that earlier layout
//! acknowledges by id alone and does not find the new fields: every process sharing a
//! prefix must run this layout (upgrade them together), or the old ones' acknowledgements
//! leave their mail in place until it expires.
//!
//! Nothing but tokens and routing metadata (ids, usernames, expiry times) is ever written:
//! the plaintext of a message never reaches Redis.
//!
//! # Why streams, and why no consumer groups
//! A stream is an ordered log with stable entry ids, cheap range reads (`XRANGE`) and removal
//! of single entries anywhere (`XDEL`): exactly a mailbox read oldest-first and acknowledged
//! out of order. Consumer groups would add a pending-entries list and claim/ownership
//! bookkeeping, but a mailbox has exactly one reader (its owner's node), which acknowledges
//! explicitly by sender and message id; so a plain `XRANGE` is the read.
//!
//! # At least once
//! [`fetch`](OfflineStore::fetch) never removes anything: an entry stays in the stream,
//! and is returned by every fetch, until [`ack`](OfflineStore::ack) deletes it. A reader that
//! crashes (or loses Redis) between fetching and acknowledging simply gets the same entries
//! again from its next fetch. Nothing is acknowledged by Redis on the reader's behalf, and
//! only expiry removes an unacknowledged entry, reporting it to the sender.
//!
//! # Transitions
//! Every transition touching several keys is one Lua script, so it is atomic across processes:
//! - put: the sender's id already in the ids hash (or an entry of the old layout with this
//!   id from this sender) → done (idempotent); a message that would pass one of the
//!   [`Quotas`] (messages in the mailbox by `XLEN`, the rest from the usage hash
//!   `{prefix}:mbox-usage`) → [`StoreError::QuotaExceeded`] naming it; else `XADD`, `HSET`
//!   the id, `ZADD` the expiry, charge the usage hash and `PUBLISH` the new-mail notice.
//! - ack: per (sender, id), the entry found through the ids hash is `XDEL`ed, its field
//!   `HDEL`ed, its expiry member `ZREM`ed and its usage uncharged. Unknown keys are ignored.
//! - sweep (run by `fetch` and `take_expired`, and by `put` only when the mailbox looks full,
//!   since expired entries count against the quota until swept; at most [`SWEEP_BATCH`]
//!   messages per call): lists the expiry members whose score is not after "now", then per member a script
//!   re-checks the score and removes the member, the id and the entry (uncharging its usage), pushing the notice to
//!   the sender's list (the sender is read from the entry). Whoever removes the member
//!   reports the expiry, so each is reported exactly once even with many processes sweeping.
//!
//! "Now" is always the Redis server's clock (`TIME`), so the processes' clocks do not matter.
//! A message put already expired is stored and then reported by the next sweep; a fetch
//! skips any expired entry a sweep has not reached yet.
//!
//! # Connection
//! One [`ConnectionManager`] in RESP3 mode carries the commands and the subscriptions (whose
//! messages arrive as pushes on the same connection). It reconnects by itself when Redis goes
//! away and comes back, and subscribes again. Requests made while Redis is unreachable fail
//! with [`StoreError::Unavailable`]; later ones succeed once it is back, on the same
//! `RedisStore`. A background task dispatches the pushes to the subscribers and, after a
//! disconnection, pings until the connection (and with it the subscriptions) is back even
//! when no request comes in; then it sends one notice to every mail subscriber, because mail
//! may have been put while the notices were lost (spurious notices are allowed, missed ones
//! are not).
//!
//! Each channel is subscribed once, however many streams listen to it; the last stream
//! dropped unsubscribes.
//!
//! Needs Redis 6.2 or later (exclusive `XRANGE` bounds). Every key a script touches is
//! under the prefix, but the expiry script derives the sender's list from the entry it
//! removes, so the layout assumes one Redis, not a Redis Cluster.
//!
//! # Defaults
//! Key prefix [`DEFAULT_REDIS_PREFIX`] (`p2pchat`), the default [`Quotas`] (10,000
//! messages per mailbox, and the rest), operator announcements on [`DEFAULT_ANNOUNCEMENT_CHANNEL`]
//! (`special`). Each connection attempt gives up after 3 s, a request without a reply after
//! 5 s; a reconnection makes 5 attempts, 100 ms to 1 s apart, before the waiting requests
//! fail.

use parking_lot::{Mutex, MutexGuard};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::Stream;
use futures::stream::{BoxStream, StreamExt};
use redis::aio::ConnectionManager;
use redis::{Msg, RedisError, Script, Value};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::redis_conn::{PushHandler, connection, script_with_now, spawn_push_feed};
use super::{ExpiredMessage, MailKey, OfflineStore, Put, Quota, Quotas, StoreError, StoredMessage};
use crate::error::Cause;
use crate::protocol::MessageId;

/// Prefix of every key and mail channel, unless configured. Default: `p2pchat`.
pub const DEFAULT_REDIS_PREFIX: &str = "p2pchat";

/// The Redis channel operators publish (signed) announcements on. Default: `special`.
pub const DEFAULT_ANNOUNCEMENT_CHANNEL: &str = "special";

/// Most expired messages one sweep handles.
const SWEEP_BATCH: usize = 256;
/// Announcements buffered for a slow reader before newer ones are dropped.
const ANNOUNCEMENT_BUFFER: usize = 256;

/// Lua shared by the scripts that add and remove messages: the usage hash (`KEYS[4]` of
/// each) holds, per recipient (`to\n{user}\n…`), sender (`from\n{user}\n…`) and pair
/// (`pair\n{from}\n{to}\n…`), the messages (`…m`) and bytes (`…b`) waiting, and the
/// store's bytes (`total\nb`). A message's bytes are its token, sender and recipient plus
/// `MESSAGE_OVERHEAD_BYTES`, as [`StoredMessage::charged_bytes`] counts them.
const USAGE_LUA: &str = "
local function usage_fields(from, to)
  return { 'to\\n' .. to .. '\\n', 'from\\n' .. from .. '\\n',
    'pair\\n' .. from .. '\\n' .. to .. '\\n' }
end
local function charge(u, from, to, size, sign)
  for _, f in ipairs(usage_fields(from, to)) do
    if redis.call('HINCRBY', u, f .. 'm', sign) <= 0 then redis.call('HDEL', u, f .. 'm') end
    if redis.call('HINCRBY', u, f .. 'b', sign * size) <= 0 then redis.call('HDEL', u, f .. 'b') end
  end
  if redis.call('HINCRBY', u, 'total\\nb', sign * size) <= 0 then redis.call('HDEL', u, 'total\\nb') end
end
local function uncharge_entry(u, fields)
  local from, to, token, charged = nil, nil, nil, false
  for j = 1, #fields - 1, 2 do
    local k, v = fields[j], fields[j + 1]
    if k == 'from' then from = v elseif k == 'to' then to = v elseif k == 'token' then token = v
    elseif k == 'q' then charged = true end
  end
  if charged and from and to and token then
    charge(u, from, to, #token + #from + #to + OVERHEAD, -1)
  end
end
";

/// KEYS: mailbox, ids, expiry, usage. ARGV: id, from, to, token, exp ms, exp ns, (unused),
/// expiry member, channel, then the limits in the order [`Quotas::admit`] checks them
/// (mailbox messages, mailbox bytes, pair messages, pair bytes, sender messages, sender
/// bytes, total bytes: [`Quotas::in_order`]). 0: stored, 1: already there, 2 + k: the k-th limit refused it. An
/// entry from before mail was keyed by sender (field `{id}`) is the same message when its
/// sender is this one. The mailbox's messages are counted by `XLEN`, so mail stored before
/// the usage hash existed counts; the other limits count from the usage hash.
const PUT: &str = "
local field = ARGV[2] .. '\\n' .. ARGV[1]
if redis.call('HEXISTS', KEYS[2], field) == 1 then return 1 end
local legacy = redis.call('HGET', KEYS[2], ARGV[1])
if legacy then
  local found = redis.call('XRANGE', KEYS[1], legacy, legacy)[1]
  if found then
    for j = 1, #found[2] - 1, 2 do
      if found[2][j] == 'from' and found[2][j + 1] == ARGV[2] then return 1 end
    end
  end
end
local size = #ARGV[4] + #ARGV[2] + #ARGV[3] + OVERHEAD
local f = usage_fields(ARGV[2], ARGV[3])
local function used(name) return tonumber(redis.call('HGET', KEYS[4], name) or '0') end
local checks = {
  { redis.call('XLEN', KEYS[1]), 1 }, { used(f[1] .. 'b'), size },
  { used(f[3] .. 'm'), 1 }, { used(f[3] .. 'b'), size },
  { used(f[2] .. 'm'), 1 }, { used(f[2] .. 'b'), size },
  { used('total\\nb'), size },
}
for k, c in ipairs(checks) do
  if c[1] + c[2] > tonumber(ARGV[9 + k]) then return 1 + k end
end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'from', ARGV[2], 'to', ARGV[3],
  'token', ARGV[4], 'exp', ARGV[5], 'exp_ns', ARGV[6], 'q', '1')
redis.call('HSET', KEYS[2], field, entry)
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[8])
charge(KEYS[4], ARGV[2], ARGV[3], size, 1)
redis.call('PUBLISH', ARGV[9], ARGV[1])
return 0
";

/// KEYS: mailbox, ids, expiry, usage. ARGV: user, then (from, id) pairs. Returns how many were
/// removed. An entry from before mail was keyed by sender (field `{id}`) is removed only
/// when its sender is the one named.
const ACK: &str = "
local removed = 0
for i = 2, #ARGV - 1, 2 do
  local from, id = ARGV[i], ARGV[i + 1]
  local field = from .. '\\n' .. id
  local member = ARGV[1] .. '\\n' .. field
  local entry = redis.call('HGET', KEYS[2], field)
  if not entry then
    local legacy = redis.call('HGET', KEYS[2], id)
    if legacy then
      local found = redis.call('XRANGE', KEYS[1], legacy, legacy)[1]
      local sender = nil
      if found then
        for j = 1, #found[2] - 1, 2 do
          if found[2][j] == 'from' then sender = found[2][j + 1] end
        end
      end
      if sender == from or not found then
        entry, field, member = legacy, id, ARGV[1] .. '\\n' .. id
      end
    end
  end
  if entry then
    local found = redis.call('XRANGE', KEYS[1], entry, entry)[1]
    if found then uncharge_entry(KEYS[4], found[2]) end
    redis.call('XDEL', KEYS[1], entry)
    redis.call('HDEL', KEYS[2], field)
    redis.call('ZREM', KEYS[3], member)
    removed = removed + 1
  end
end
if removed > 0 and redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return removed
";

/// KEYS: expiry. ARGV: batch size. Returns { now, expired members }.
const SWEEP_LIST: &str = "
return { now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1])) }
";

/// KEYS: expiry, mailbox, ids, usage. ARGV: member, ids-hash field, recipient, expired-list key
/// prefix, id.
/// 1: expired and reported, 0: nothing to do (not expired, or another process did it).
const SWEEP_ONE: &str = "
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
local entry = redis.call('HGET', KEYS[3], ARGV[2])
if not entry then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
local found = redis.call('XRANGE', KEYS[2], entry, entry)
redis.call('XDEL', KEYS[2], entry)
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
local item = found[1]
if not item then return 0 end
local fields = item[2]
uncharge_entry(KEYS[4], fields)
local from = nil
for i = 1, #fields - 1, 2 do
  if fields[i] == 'from' then from = fields[i + 1] end
end
if not from then return 0 end
redis.call('RPUSH', ARGV[4] .. from, ARGV[5] .. '\\n' .. ARGV[3])
return 1
";

/// KEYS: expired list. Returns its notices and deletes it.
const TAKE_EXPIRED: &str = "
local n = tonumber(ARGV[1])
local notices = redis.call('LRANGE', KEYS[1], 0, n - 1)
redis.call('LTRIM', KEYS[1], n, -1)
return notices
";

/// How a [`RedisStore`] lays out and limits its mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Prefix of every key and mail channel; everything sharing mailboxes must use the same.
    /// Default: [`DEFAULT_REDIS_PREFIX`].
    pub prefix: String,
    /// What may wait: per mailbox, sender, pair and in all. Default: [`Quotas::default`].
    pub quotas: Quotas,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            quotas: Quotas::default(),
        }
    }
}

/// Offline mailboxes in Redis, shared by every process using the same Redis and prefix.
/// Cheap to clone: clones share the connection and the subscriptions.
///
/// Each mailbox is a stream `{prefix}:mbox:{user}` (one entry per message: id, sender,
/// recipient, token, expiry), read with `XRANGE` and trimmed only by
/// [`ack`](OfflineStore::ack) or expiry, so an unacknowledged message is fetched again:
/// delivery is at least once. A hash of (sender, message id) makes `put` idempotent per
/// sender, a sorted set of expiry times feeds the sweep that reports expired messages to
/// their senders (lists `{prefix}:expired:{sender}`), and every `put` publishes on
/// `{prefix}:mail:{user}`, which [`subscribe`](OfflineStore::subscribe) listens to. Multi-key changes are Lua scripts
/// timed by the Redis clock. Only tokens and routing metadata are ever written.
///
/// One RESP3 connection carries commands and subscriptions and comes back by itself after
/// Redis restarts: requests fail with [`StoreError::Unavailable`] meanwhile, and every mail
/// subscriber gets a notice once the connection is back.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: ConnectionManager,
    keys: Keys,
    quotas: Quotas,
    scripts: Scripts,
    /// Who listens to which channel (read by the feed task for every push).
    listeners: Mutex<Listeners>,
    /// The channels subscribed on the connection. Held across `SUBSCRIBE`/`UNSUBSCRIBE` so
    /// those commands go out in the order the listener counts changed.
    subscribed: tokio::sync::Mutex<HashSet<String>>,
    /// Hands the pushes to `listeners`; stops when the store goes.
    _feed: AbortOnDropHandle<()>,
}

#[derive(Debug)]
struct Scripts {
    put: Script,
    ack: Script,
    sweep_list: Script,
    sweep_one: Script,
    take_expired: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_now = script_with_now;
        let with_usage = |body: &str| {
            format!("{USAGE_LUA}{body}")
                .replace("OVERHEAD", &super::MESSAGE_OVERHEAD_BYTES.to_string())
        };
        Self {
            put: Script::new(&with_usage(PUT)),
            ack: Script::new(&with_usage(ACK)),
            sweep_list: with_now(SWEEP_LIST),
            sweep_one: with_now(&with_usage(SWEEP_ONE)),
            take_expired: Script::new(TAKE_EXPIRED),
        }
    }
}

/// Key and channel names under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn mailbox(&self, user: &str) -> String {
        format!("{}:mbox:{user}", self.prefix)
    }
    fn ids(&self, user: &str) -> String {
        format!("{}:mbox-ids:{user}", self.prefix)
    }
    fn expiry(&self) -> String {
        format!("{}:mbox-expiry", self.prefix)
    }
    fn usage(&self) -> String {
        format!("{}:mbox-usage", self.prefix)
    }
    fn expired_prefix(&self) -> String {
        format!("{}:expired:", self.prefix)
    }
    fn expired(&self, sender: &str) -> String {
        format!("{}{sender}", self.expired_prefix())
    }
    fn mail_channel(&self, user: &str) -> String {
        format!("{}:mail:{user}", self.prefix)
    }
}

/// The ids hash field of `from`'s message `id`.
fn id_field(from: &str, id: &MessageId) -> String {
    format!("{from}\n{id}")
}

/// The expiry set's member for `user`'s message `id` from `from`.
fn expiry_member(user: &str, from: &str, id: &MessageId) -> String {
    format!("{user}\n{}", id_field(from, id))
}

/// An expiry set member: the recipient, the ids hash field and the message id. Members
/// written before mail was keyed by sender are `{user}\n{id}`, with the field `{id}`.
fn parse_member(member: &str) -> Option<(&str, &str, &str)> {
    let (user, field) = member.split_once('\n')?;
    let id = field.rsplit_once('\n').map_or(field, |(_, id)| id);
    Some((user, field, id))
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::unavailable(e)
}

/// `t` as Unix milliseconds and the nanoseconds within that millisecond (0 before 1970).
fn split_time(t: SystemTime) -> (u64, u32) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    (ms, since.subsec_nanos() % 1_000_000)
}

// ---------------------------------------------------------------------------------------
// Subscriptions

/// Where the messages of one channel go for one listener.
#[derive(Debug)]
enum Sink {
    /// New-mail notices: a full buffer already holds a pending notice, which is enough.
    Mail(mpsc::Sender<()>),
    /// Payloads as text (announcements): a full buffer drops the newest.
    Text(mpsc::Sender<String>),
}

#[derive(Debug, Default)]
struct Listeners {
    next_id: u64,
    channels: HashMap<String, Vec<(u64, Sink)>>,
}

impl Listeners {
    fn add(&mut self, channel: &str, sink: Sink) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.channels
            .entry(channel.to_owned())
            .or_default()
            .push((id, sink));
        id
    }

    /// Removes listener `id`; `true` when nobody listens to `channel` any more.
    fn remove(&mut self, channel: &str, id: u64) -> bool {
        let Some(list) = self.channels.get_mut(channel) else {
            return true;
        };
        list.retain(|(other, _)| *other != id);
        if list.is_empty() {
            self.channels.remove(channel);
            return true;
        }
        false
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let Some(list) = self.channels.get(channel) else {
            return;
        };
        for (_, sink) in list {
            match sink {
                // Full: a notice is already pending. Closed: the listener is going away.
                Sink::Mail(tx) => {
                    let _ = tx.try_send(());
                }
                Sink::Text(tx) => match std::str::from_utf8(payload) {
                    Ok(text) => {
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            tx.try_send(text.to_owned())
                        {
                            tracing::warn!(%channel, "a slow reader misses a message");
                        }
                    }
                    Err(_) => tracing::debug!(%channel, "ignoring a message that is not UTF-8"),
                },
            }
        }
    }

    /// One notice to every mail listener.
    fn notify_all_mail(&self) {
        for sink in self.channels.values().flatten().map(|(_, sink)| sink) {
            if let Sink::Mail(tx) = sink {
                let _ = tx.try_send(());
            }
        }
    }
}

/// Keeps one listener registered; dropping it unregisters, and unsubscribes the channel
/// when it was the last listener.
#[derive(Debug)]
struct Listening {
    inner: Arc<Inner>,
    channel: String,
    id: u64,
}

impl Drop for Listening {
    fn drop(&mut self) {
        if !self.inner.listeners().remove(&self.channel, self.id) {
            return;
        }
        // Without a runtime the subscription lingers, harmlessly, until the connection goes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let channel = std::mem::take(&mut self.channel);
        runtime.spawn(async move {
            let mut subscribed = inner.subscribed.lock().await;
            // Someone may have started listening again meanwhile.
            if inner.listeners().channels.contains_key(&channel) || !subscribed.remove(&channel) {
                return;
            }
            if let Err(e) = inner.conn().unsubscribe(&channel).await {
                tracing::debug!(%channel, error = %e, "cannot unsubscribe");
            }
        });
    }
}

/// A stream of what one listener receives.
struct Listener<T> {
    rx: mpsc::Receiver<T>,
    _listening: Listening,
}

impl<T> Stream for Listener<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

impl PushHandler for Inner {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn message(&self, msg: Msg) {
        self.listeners()
            .dispatch(msg.get_channel_name(), msg.get_payload_bytes());
    }

    fn reconnected(&self) {
        // Mail put while the subscriptions were down went unannounced.
        self.listeners().notify_all_mail();
    }
}

// ---------------------------------------------------------------------------------------
// The store

impl Inner {
    /// A handle on the shared connection (commands need `&mut`).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn listeners(&self) -> MutexGuard<'_, Listeners> {
        self.listeners.lock()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`) with the
    /// default [`RedisStoreConfig`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisStoreConfig::default()).await
    }

    /// Connects to the Redis at `url` with `config`.
    pub async fn connect_with(url: &str, config: RedisStoreConfig) -> Result<Self, StoreError> {
        let (conn, push_rx) = connection(url).await.map_err(unavailable)?;

        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let feed = spawn_push_feed(push_rx, weak.clone());
            Inner {
                conn,
                keys: Keys {
                    prefix: config.prefix,
                },
                quotas: config.quotas,
                scripts: Scripts::new(),
                listeners: Mutex::default(),
                subscribed: tokio::sync::Mutex::default(),
                _feed: feed,
            }
        });
        Ok(Self { inner })
    }

    /// The payloads published on the Redis channel `channel` from now on, as text (payloads
    /// that are not UTF-8 are skipped). Operators publish signed announcements on
    /// [`DEFAULT_ANNOUNCEMENT_CHANNEL`]; checking their signatures is up to the reader.
    ///
    /// Like any pub/sub, what is published while the connection is down is lost; a reader
    /// more than 256 payloads behind misses the newer ones.
    pub async fn announcements(
        &self,
        channel: &str,
    ) -> Result<BoxStream<'static, String>, StoreError> {
        let (tx, rx) = mpsc::channel(ANNOUNCEMENT_BUFFER);
        let listening = self.listen(channel, Sink::Text(tx)).await?;
        Ok(Listener {
            rx,
            _listening: listening,
        }
        .boxed())
    }

    /// Registers `sink` for `channel`, subscribing the connection to it if nobody listened.
    async fn listen(&self, channel: &str, sink: Sink) -> Result<Listening, StoreError> {
        let mut subscribed = self.inner.subscribed.lock().await;
        // Registered before subscribing, so nothing published after the subscription is lost.
        let listening = Listening {
            inner: self.inner.clone(),
            channel: channel.to_owned(),
            id: self.inner.listeners().add(channel, sink),
        };
        if !subscribed.contains(channel) {
            self.inner
                .conn()
                .subscribe(channel)
                .await
                .map_err(unavailable)?;
            subscribed.insert(channel.to_owned());
        }
        Ok(listening)
    }

    /// Expires at most [`SWEEP_BATCH`] messages whose time has come, reporting each to its
    /// sender. Returns "now" on the Redis server, in Unix milliseconds.
    async fn sweep(&self) -> Result<u64, StoreError> {
        let keys = &self.inner.keys;
        let (now, members): (u64, Vec<String>) = self
            .inner
            .scripts
            .sweep_list
            .key(keys.expiry())
            .arg(SWEEP_BATCH)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        for member in members {
            let Some((user, field, id)) = parse_member(&member) else {
                tracing::warn!(%member, "removing a malformed expiry entry");
                let _: i64 = redis::cmd("ZREM")
                    .arg(keys.expiry())
                    .arg(&member)
                    .query_async(&mut self.inner.conn())
                    .await
                    .map_err(unavailable)?;
                continue;
            };
            let _: i64 = self
                .inner
                .scripts
                .sweep_one
                .key(keys.expiry())
                .key(keys.mailbox(user))
                .key(keys.ids(user))
                .key(keys.usage())
                .arg(&member)
                .arg(field)
                .arg(user)
                .arg(keys.expired_prefix())
                .arg(id)
                .invoke_async(&mut self.inner.conn())
                .await
                .map_err(unavailable)?;
        }
        Ok(now)
    }
}

/// A stream entry's fields, as read back.
type Entry = (String, HashMap<String, Vec<u8>>);

fn parse_entries(recipient: &str, reply: Value) -> Result<Vec<Entry>, StoreError> {
    redis::from_redis_value(reply).map_err(|e| StoreError::Corrupt {
        what: format!("the mailbox of '{recipient}'"),
        source: Some(Cause::new(e)),
    })
}

/// The message in one entry, with its expiry in Unix milliseconds.
fn decode_entry(recipient: &str, entry: &Entry) -> Result<(StoredMessage, u64), StoreError> {
    let (entry_id, fields) = entry;
    let corrupt = |what: &str| {
        StoreError::corrupt(format!(
            "entry {entry_id} of the mailbox of '{recipient}': {what}"
        ))
    };
    let text = |name: &str| -> Result<String, StoreError> {
        let bytes = fields
            .get(name)
            .ok_or_else(|| corrupt(&format!("no '{name}'")))?;
        String::from_utf8(bytes.clone()).map_err(|_| corrupt(&format!("'{name}' is not UTF-8")))
    };
    let id = text("id")?
        .parse::<MessageId>()
        .map_err(|_| corrupt("bad 'id'"))?;
    let exp_ms = text("exp")?
        .parse::<u64>()
        .map_err(|_| corrupt("bad 'exp'"))?;
    // Absent in entries written without it: whole milliseconds.
    let exp_ns = match fields.get("exp_ns") {
        Some(_) => text("exp_ns")?
            .parse::<u32>()
            .ok()
            .filter(|ns| *ns < 1_000_000)
            .ok_or_else(|| corrupt("bad 'exp_ns'"))?,
        None => 0,
    };
    let expires_at = SystemTime::UNIX_EPOCH
        + Duration::from_millis(exp_ms)
        + Duration::from_nanos(u64::from(exp_ns));
    Ok((
        StoredMessage {
            id,
            from: text("from")?,
            to: text("to")?,
            token: text("token")?,
            expires_at,
        },
        exp_ms,
    ))
}

fn parse_notice(sender: &str, notice: &str) -> Result<ExpiredMessage, StoreError> {
    let corrupt = || StoreError::corrupt(format!("an expiry notice for '{sender}': {notice:?}"));
    let (id, to) = notice.split_once('\n').ok_or_else(corrupt)?;
    Ok(ExpiredMessage {
        id: id.parse().map_err(|_| corrupt())?,
        to: to.to_owned(),
    })
}

/// What one put script did.
enum PutOutcome {
    /// Stored now, or already there.
    Done(Put),
    /// Refused by this limit, of this value.
    Full(Quota, u64),
}

impl RedisStore {
    async fn put_once(&self, message: &StoredMessage) -> Result<PutOutcome, StoreError> {
        let keys = &self.inner.keys;
        let to = message.to.as_str();
        let id = message.id.to_string();
        let (exp_ms, exp_ns) = split_time(message.expires_at);
        let outcome: i64 = self
            .inner
            .scripts
            .put
            .key(keys.mailbox(to))
            .key(keys.ids(to))
            .key(keys.expiry())
            .key(keys.usage())
            .arg(&id)
            .arg(&message.from)
            .arg(to)
            .arg(&message.token)
            .arg(exp_ms)
            .arg(exp_ns)
            .arg(0)
            .arg(expiry_member(to, &message.from, &message.id))
            .arg(keys.mail_channel(to))
            .arg(&self.inner.quotas.in_order().map(|(_, limit)| limit))
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(match outcome {
            0 => PutOutcome::Done(Put::Stored),
            1 => PutOutcome::Done(Put::Duplicate),
            k => {
                let (limit, quota) = usize::try_from(k - 2)
                    .ok()
                    .and_then(|k| self.inner.quotas.in_order().get(k).copied())
                    .ok_or_else(|| StoreError::corrupt(format!("a put script answered {k}")))?;
                PutOutcome::Full(limit, quota)
            }
        })
    }

    /// [`OfflineStore::put`], saying whether the message was there already.
    async fn put_one(&self, message: StoredMessage) -> Result<Put, StoreError> {
        // Expired messages count against the quotas until swept: sweep only when a limit
        // refuses (a sweep per put would double the round trips of every put).
        match self.put_once(&message).await? {
            PutOutcome::Done(put) => Ok(put),
            PutOutcome::Full(..) => {
                self.sweep().await?;
                match self.put_once(&message).await? {
                    PutOutcome::Done(put) => Ok(put),
                    PutOutcome::Full(limit, quota) => Err(StoreError::QuotaExceeded {
                        recipient: message.to.clone(),
                        limit,
                        quota,
                    }),
                }
            }
        }
    }
}

#[async_trait]
impl OfflineStore for RedisStore {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        self.put_one(message).await.map(drop)
    }

    /// Every put in flight at once on the one multiplexed connection: the commands are
    /// pipelined in order, one round trip for the batch instead of one per message.
    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        futures::future::join_all(messages.into_iter().map(|m| self.put_one(m))).await
    }

    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let now = self.sweep().await?;
        let mailbox = self.inner.keys.mailbox(recipient);
        let mut messages = Vec::new();
        let mut start = "-".to_owned();
        // Expired entries the sweep has not reached yet are skipped: read on past them.
        while messages.len() < limit {
            let want = limit - messages.len();
            let reply: Value = redis::cmd("XRANGE")
                .arg(&mailbox)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(want)
                .query_async(&mut self.inner.conn())
                .await
                .map_err(unavailable)?;
            let entries = parse_entries(recipient, reply)?;
            for entry in &entries {
                let (message, exp_ms) = decode_entry(recipient, entry)?;
                if exp_ms > now {
                    messages.push(message);
                }
            }
            match entries.last() {
                Some((last, _)) if entries.len() == want => start = format!("({last}"),
                _ => break,
            }
        }
        Ok(messages)
    }

    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        if acked.is_empty() {
            return Ok(());
        }
        let keys = &self.inner.keys;
        let mut invocation = self.inner.scripts.ack.key(keys.mailbox(recipient));
        invocation
            .key(keys.ids(recipient))
            .key(keys.expiry())
            .key(keys.usage())
            .arg(recipient);
        for key in acked {
            invocation.arg(&key.from).arg(key.id.to_string());
        }
        let _: i64 = invocation
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        self.sweep().await?;
        let notices: Vec<String> = self
            .inner
            .scripts
            .take_expired
            .key(self.inner.keys.expired(sender))
            .arg(super::MAX_EXPIRED_BATCH)
            .invoke_async(&mut self.inner.conn())
            .await
            .map_err(unavailable)?;
        notices
            .iter()
            .map(|notice| parse_notice(sender, notice))
            .collect()
    }

    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        let (tx, rx) = mpsc::channel(1);
        let channel = self.inner.keys.mail_channel(recipient);
        let listening = self.listen(&channel, Sink::Mail(tx)).await?;
        Ok(Listener {
            rx,
            _listening: listening,
        }
        .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_milliseconds_and_nanoseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let (ms, ns) = split_time(t);
        assert_eq!((ms, ns), (1_700_000_000_123, 456_789));
        let entry: Entry = (
            "1-0".to_owned(),
            [
                ("id", MessageId::random().to_string()),
                ("from", "alice".to_owned()),
                ("to", "bob".to_owned()),
                ("token", "gAAAA".to_owned()),
                ("exp", ms.to_string()),
                ("exp_ns", ns.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_bytes()))
            .collect(),
        );
        let (message, exp) = decode_entry("bob", &entry).expect("decodes");
        assert_eq!((message.expires_at, exp), (t, ms));
        assert_eq!(
            split_time(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            (0, 0)
        );
    }

    #[test]
    fn corrupt_entries_and_notices_are_reported_as_corrupt() {
        let entry: Entry = ("1-0".to_owned(), HashMap::new());
        assert!(matches!(
            decode_entry("bob", &entry),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            parse_notice("alice", "no newline"),
            Err(StoreError::Corrupt { .. })
        ));
        let id = MessageId::random();
        assert_eq!(
            parse_notice("alice", &format!("{id}\nbob")).expect("parses"),
            ExpiredMessage {
                id,
                to: "bob".to_owned()
            }
        );
    }
}
