//! Offline delivery: the [`OfflineStore`] trait, [`MemoryStore`] and (feature `redis`)
//! `RedisStore`.
//!
//! A message whose recipient cannot be reached directly is put in the recipient's mailbox as
//! the same Fernet token that would have crossed the wire: a store never sees plaintext.

mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub mod redis_conn;

use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Cause;
use crate::protocol::MessageId;
use crate::protocol::discovery::{WireExpired, WireMailKey, WireMessage, WireQuota};

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::{DEFAULT_ANNOUNCEMENT_CHANNEL, DEFAULT_REDIS_PREFIX, RedisStore, RedisStoreConfig};

/// Most messages waiting for one recipient. Default: 10,000.
pub const DEFAULT_MAILBOX_QUOTA: usize = 10_000;

/// Most bytes (as [`StoredMessage::charged_bytes`] counts them) waiting for one recipient.
/// Default: 64 MiB.
pub const DEFAULT_MAILBOX_BYTES: u64 = 64 << 20;

/// Most messages one sender may have waiting, in all mailboxes together. Default: 10,000.
pub const DEFAULT_SENDER_QUOTA: u64 = 10_000;

/// Most bytes one sender may have waiting, in all mailboxes together. Default: 64 MiB.
pub const DEFAULT_SENDER_BYTES: u64 = 64 << 20;

/// Most messages one sender may have waiting for one recipient: what keeps a single sender
/// from filling someone's mailbox. Default: 1,000.
pub const DEFAULT_PAIR_QUOTA: u64 = 1_000;

/// Most bytes one sender may have waiting for one recipient. Default: 16 MiB.
pub const DEFAULT_PAIR_BYTES: u64 = 16 << 20;

/// Most bytes waiting in the whole store, all mailboxes together: what keeps the disk (or
/// Redis's memory) from filling. Default: 2 GiB.
pub const DEFAULT_TOTAL_BYTES: u64 = 2 << 30;

/// What a stored message costs beyond its token, sender and recipient: the id, the expiry
/// and the indexes a backend keeps beside it. Part of [`StoredMessage::charged_bytes`].
pub const MESSAGE_OVERHEAD_BYTES: u64 = 64;

/// How long a message waits for its recipient before it expires undelivered. Default: 7 days.
pub const DEFAULT_MESSAGE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Most messages one [`OfflineStore::fetch`] returns. Default: 256.
pub const MAX_FETCH_BATCH: usize = 256;

/// Most expiry notices one [`OfflineStore::take_expired`] returns; the rest wait for the
/// next call. Default: 1024.
pub const MAX_EXPIRED_BATCH: usize = 1024;

/// The longest a message may wait in a mailbox, whatever its sender asks: later expiry
/// times are cut to this. Default: 30 days.
pub const MAX_MESSAGE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How far ahead of a clock an offline message's token may be stamped: the sender's clock
/// may run ahead. A server takes such a deposit, and a recipient keeps it in the mailbox
/// until its clock catches up; further ahead, it is refused (it would sit at the front of
/// the mailbox). Default: 1 hour.
pub const MAX_TOKEN_AHEAD: Duration = Duration::from_secs(3600);

/// A sealed message waiting in a mailbox. Only routing metadata is in the clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message id (also inside the token).
    pub id: MessageId,
    /// Sender's username.
    pub from: String,
    /// Recipient's username: whose mailbox this is.
    pub to: String,
    /// The Fernet token sealed under the sender–recipient pair key.
    pub token: String,
    /// When the message expires undelivered.
    pub expires_at: SystemTime,
}

impl StoredMessage {
    /// The bytes this message counts for against the byte quotas: its token, sender and
    /// recipient, plus [`MESSAGE_OVERHEAD_BYTES`]. Every backend counts the same way.
    pub fn charged_bytes(&self) -> u64 {
        (self.token.len() + self.from.len() + self.to.len()) as u64 + MESSAGE_OVERHEAD_BYTES
    }
}

/// One of the limits of [`Quotas`]: what a [`StoreError::QuotaExceeded`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Quota {
    /// Messages waiting for the recipient.
    MailboxMessages,
    /// Bytes waiting for the recipient.
    MailboxBytes,
    /// Messages the sender has waiting anywhere.
    SenderMessages,
    /// Bytes the sender has waiting anywhere.
    SenderBytes,
    /// Messages the sender has waiting for this recipient.
    PairMessages,
    /// Bytes the sender has waiting for this recipient.
    PairBytes,
    /// Bytes waiting in the whole store.
    TotalBytes,
}

impl Quota {
    /// The sentence a refusal under this limit reads as: `recipient` is whose mailbox,
    /// `limit` the limit's value.
    pub fn sentence(self, recipient: &str, limit: u64) -> String {
        match self {
            Self::MailboxMessages => {
                format!("{recipient}'s mailbox is full ({limit} messages waiting)")
            }
            Self::MailboxBytes => format!("{recipient}'s mailbox is full ({limit} bytes waiting)"),
            Self::SenderMessages => format!(
                "you already have {limit} messages waiting in mailboxes, the most one sender may"
            ),
            Self::SenderBytes => format!(
                "you already have {limit} bytes waiting in mailboxes, the most one sender may"
            ),
            Self::PairMessages => format!(
                "you already have {limit} messages waiting for {recipient}, the most one sender \
                 may leave one recipient"
            ),
            Self::PairBytes => format!(
                "you already have {limit} bytes waiting for {recipient}, the most one sender \
                 may leave one recipient"
            ),
            Self::TotalBytes => {
                format!("the server's mail store is full ({limit} bytes waiting)")
            }
        }
    }
}

/// What one party has waiting in a store: messages and bytes (as
/// [`StoredMessage::charged_bytes`] counts them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Messages waiting.
    pub messages: u64,
    /// Bytes waiting.
    pub bytes: u64,
}

impl Usage {
    /// `self` with `message` added.
    pub fn plus(self, message: &StoredMessage) -> Self {
        Self {
            messages: self.messages.saturating_add(1),
            bytes: self.bytes.saturating_add(message.charged_bytes()),
        }
    }

    /// `self` with `message` taken away (never below zero: counters from before the
    /// accounting existed may be short).
    pub fn minus(self, message: &StoredMessage) -> Self {
        Self {
            messages: self.messages.saturating_sub(1),
            bytes: self.bytes.saturating_sub(message.charged_bytes()),
        }
    }
}

/// The limits a store puts on what waits in it, each bounding a different party: the
/// recipient's mailbox, the sender (all its mail anywhere), the sender→recipient pair, and
/// the whole store. A put that would take any of them past its limit is refused with
/// [`StoreError::QuotaExceeded`] naming it, and changes nothing. Defaults: the `DEFAULT_*`
/// constants of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quotas {
    /// Most messages waiting for one recipient. Default: [`DEFAULT_MAILBOX_QUOTA`].
    pub mailbox_messages: u64,
    /// Most bytes waiting for one recipient. Default: [`DEFAULT_MAILBOX_BYTES`].
    pub mailbox_bytes: u64,
    /// Most messages one sender has waiting. Default: [`DEFAULT_SENDER_QUOTA`].
    pub sender_messages: u64,
    /// Most bytes one sender has waiting. Default: [`DEFAULT_SENDER_BYTES`].
    pub sender_bytes: u64,
    /// Most messages one sender has waiting for one recipient. Default:
    /// [`DEFAULT_PAIR_QUOTA`].
    pub pair_messages: u64,
    /// Most bytes one sender has waiting for one recipient. Default: [`DEFAULT_PAIR_BYTES`].
    pub pair_bytes: u64,
    /// Most bytes waiting in the whole store. Default: [`DEFAULT_TOTAL_BYTES`].
    pub total_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            mailbox_messages: DEFAULT_MAILBOX_QUOTA as u64,
            mailbox_bytes: DEFAULT_MAILBOX_BYTES,
            sender_messages: DEFAULT_SENDER_QUOTA,
            sender_bytes: DEFAULT_SENDER_BYTES,
            pair_messages: DEFAULT_PAIR_QUOTA,
            pair_bytes: DEFAULT_PAIR_BYTES,
            total_bytes: DEFAULT_TOTAL_BYTES,
        }
    }
}

impl Quotas {
    /// No limit at all (every field `u64::MAX`): for tests and benchmarks that fill stores.
    pub fn unlimited() -> Self {
        Self {
            mailbox_messages: u64::MAX,
            mailbox_bytes: u64::MAX,
            sender_messages: u64::MAX,
            sender_bytes: u64::MAX,
            pair_messages: u64::MAX,
            pair_bytes: u64::MAX,
            total_bytes: u64::MAX,
        }
    }

    /// The defaults with `quota` messages per mailbox (what `with_quota` constructors take).
    pub fn mailbox(quota: usize) -> Self {
        Self {
            mailbox_messages: quota as u64,
            ..Self::default()
        }
    }

    /// Every limit with its value, in the order [`Quotas::admit`] checks them (and the
    /// Redis store's put script, which takes them in this order).
    pub fn in_order(&self) -> [(Quota, u64); 7] {
        [
            (Quota::MailboxMessages, self.mailbox_messages),
            (Quota::MailboxBytes, self.mailbox_bytes),
            (Quota::PairMessages, self.pair_messages),
            (Quota::PairBytes, self.pair_bytes),
            (Quota::SenderMessages, self.sender_messages),
            (Quota::SenderBytes, self.sender_bytes),
            (Quota::TotalBytes, self.total_bytes),
        ]
    }

    /// Whether `message` may join what is waiting: `mailbox` for its recipient, `sender`
    /// for its sender, `pair` for the two, `total` in the store. The first limit it would
    /// pass is the refusal.
    pub fn admit(
        &self,
        message: &StoredMessage,
        mailbox: Usage,
        sender: Usage,
        pair: Usage,
        total: Usage,
    ) -> Result<(), StoreError> {
        let bytes = message.charged_bytes();
        let used = [
            (mailbox.messages, 1),
            (mailbox.bytes, bytes),
            (pair.messages, 1),
            (pair.bytes, bytes),
            (sender.messages, 1),
            (sender.bytes, bytes),
            (total.bytes, bytes),
        ];
        let checks = self
            .in_order()
            .into_iter()
            .zip(used)
            .map(|((limit, quota), (used, add))| (limit, used.saturating_add(add) > quota, quota));
        match checks.into_iter().find(|(_, over, _)| *over) {
            Some((limit, _, quota)) => Err(StoreError::QuotaExceeded {
                recipient: message.to.clone(),
                limit,
                quota,
            }),
            None => Ok(()),
        }
    }
}

/// What names one message in a mailbox: its sender and its id. Ids are chosen by senders
/// and travel in the clear, so an id alone names nothing: another sender may use the same
/// one, and must neither hide nor remove the first sender's message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MailKey {
    /// The sender's username.
    pub from: String,
    /// The id the sender gave the message.
    pub id: MessageId,
}

impl MailKey {
    /// The key of `message`.
    pub fn of(message: &StoredMessage) -> Self {
        Self {
            from: message.from.clone(),
            id: message.id,
        }
    }
}

/// A message that expired before its recipient fetched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredMessage {
    /// The expired message's id.
    pub id: MessageId,
    /// The recipient who never fetched it.
    pub to: String,
}

// The wire's mail types, converted here so both ends of a discovery session (the client's
// `MailboxStore` and the server) agree: expiry times travel as Unix nanoseconds.

impl From<StoredMessage> for WireMessage {
    fn from(m: StoredMessage) -> Self {
        let since_epoch = m.expires_at.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            id: m.id,
            from: m.from,
            to: m.to,
            token: m.token,
            expires_at_ns: since_epoch.as_nanos().try_into().unwrap_or(u64::MAX),
        }
    }
}

impl From<WireMessage> for StoredMessage {
    fn from(m: WireMessage) -> Self {
        Self {
            id: m.id,
            from: m.from,
            to: m.to,
            token: m.token,
            expires_at: UNIX_EPOCH + Duration::from_nanos(m.expires_at_ns),
        }
    }
}

impl From<Quota> for WireQuota {
    fn from(q: Quota) -> Self {
        match q {
            Quota::MailboxMessages => Self::MailboxMessages,
            Quota::MailboxBytes => Self::MailboxBytes,
            Quota::SenderMessages => Self::SenderMessages,
            Quota::SenderBytes => Self::SenderBytes,
            Quota::PairMessages => Self::PairMessages,
            Quota::PairBytes => Self::PairBytes,
            Quota::TotalBytes => Self::TotalBytes,
        }
    }
}

impl From<WireQuota> for Quota {
    fn from(q: WireQuota) -> Self {
        match q {
            WireQuota::MailboxMessages => Self::MailboxMessages,
            WireQuota::MailboxBytes => Self::MailboxBytes,
            WireQuota::SenderMessages => Self::SenderMessages,
            WireQuota::SenderBytes => Self::SenderBytes,
            WireQuota::PairMessages => Self::PairMessages,
            WireQuota::PairBytes => Self::PairBytes,
            WireQuota::TotalBytes => Self::TotalBytes,
        }
    }
}

impl From<ExpiredMessage> for WireExpired {
    fn from(n: ExpiredMessage) -> Self {
        Self { id: n.id, to: n.to }
    }
}

impl From<WireExpired> for ExpiredMessage {
    fn from(n: WireExpired) -> Self {
        Self { id: n.id, to: n.to }
    }
}

impl From<MailKey> for WireMailKey {
    fn from(k: MailKey) -> Self {
        Self {
            from: k.from,
            id: k.id,
        }
    }
}

impl From<WireMailKey> for MailKey {
    fn from(k: WireMailKey) -> Self {
        Self {
            from: k.from,
            id: k.id,
        }
    }
}

/// What a put did with a message it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Put {
    /// The message is in the mailbox now.
    Stored,
    /// The same sender's message with the same id was in the mailbox already: it is kept
    /// once.
    Duplicate,
}

/// Errors from an offline store.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Storing the message would pass one of the store's [`Quotas`]: nothing was stored.
    #[error("{}", limit.sentence(recipient, *quota))]
    QuotaExceeded {
        /// Whose mailbox the message was for.
        recipient: String,
        /// Which limit.
        limit: Quota,
        /// The limit's value.
        quota: u64,
    },
    /// The store cannot be reached now; the operation may succeed later.
    #[error("the offline store is unavailable")]
    Unavailable(#[source] Cause),
    /// The caller may not read this mailbox (or deposit in this name); why, as a sentence.
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// The store holds or returned data it cannot interpret.
    #[error("offline store data is corrupt: {what}")]
    Corrupt {
        /// What could not be read.
        what: String,
        /// Why, where a decoder said so.
        #[source]
        source: Option<Cause>,
    },
}

impl StoreError {
    /// [`StoreError::Unavailable`] for `cause` (an error, or a sentence).
    pub fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(Cause::new(cause))
    }

    /// [`StoreError::Corrupt`] with nothing underneath.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            source: None,
        }
    }
}

/// Per-recipient mailboxes of sealed messages, delivered at least once.
///
/// # Contract
/// - [`put`](OfflineStore::put) appends to `message.to`'s mailbox. It is idempotent by
///   `(to, from, id)`: putting the same message twice stores it once, while another
///   sender's message with the same id is a different message, stored beside it. A message
///   that would pass one of the store's [`Quotas`] is refused with
///   [`StoreError::QuotaExceeded`] naming the limit, and nothing is stored.
/// - [`fetch`](OfflineStore::fetch) returns the oldest unacknowledged messages, in the
///   order they were put, without removing them: a message is returned by every fetch until
///   it is [`ack`](OfflineStore::ack)ed by its [`MailKey`] (sender and id). Expired
///   messages are never returned.
/// - A message not acknowledged before `expires_at` leaves the mailbox and is reported once
///   to its sender by [`take_expired`](OfflineStore::take_expired).
/// - [`subscribe`](OfflineStore::subscribe) yields an item whenever mail may have arrived
///   for the recipient (spurious items are allowed; missed ones are not, while subscribed).
///
/// # Cancel safety
/// Every method may be cancelled; a cancelled `ack` may or may not have removed the messages,
/// which only means they may be fetched again.
#[async_trait]
pub trait OfflineStore: Debug + Send + Sync + 'static {
    /// Stores a message for `message.to`.
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError>;
    /// Stores several messages, in order, answering for each: [`Put::Stored`], or
    /// [`Put::Duplicate`] where the backend can tell. By default one
    /// [`put`](OfflineStore::put) after another, each answered `Stored`; a backend that can
    /// do better (one round trip, one transaction) overrides it.
    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.put(message).await.map(|()| Put::Stored));
        }
        results
    }
    /// Up to `limit` of `recipient`'s oldest waiting messages, left in place.
    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
    /// Removes processed messages from `recipient`'s mailbox, each named by its sender and
    /// id. Unknown keys are ignored.
    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError>;
    /// Expiry notices for messages `sender` sent, each returned once, at most
    /// [`MAX_EXPIRED_BATCH`] per call (the rest on later calls).
    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError>;
    /// New-mail notices for `recipient`.
    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError>;
}

/// A shared store is a store: lets an `Arc<dyn OfflineStore>` (such as
/// [`crate::DiscoverySession::mailbox`]) be handed to
/// [`crate::ChatNodeBuilder::offline_store`].
#[async_trait]
impl<T: OfflineStore + ?Sized> OfflineStore for std::sync::Arc<T> {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        (**self).put(message).await
    }
    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        (**self).put_many(messages).await
    }
    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        (**self).fetch(recipient, limit).await
    }
    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        (**self).ack(recipient, acked).await
    }
    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        (**self).take_expired(sender).await
    }
    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        (**self).subscribe(recipient).await
    }
}
