//! [`RedbMailbox`]: the server's offline mailboxes in the embedded redb file, as an
//! [`OfflineStore`].
//!
//! Tables (in `directory.redb`, beside the claims):
//! - `mail`: (recipient, seq) → the message (a `MailRecordV1`), in deposit order;
//! - `mail_keys`: (recipient, sender, message id) → seq, for idempotent deposits and acks
//!   by sender and id. An id alone names nothing (senders choose ids, and they travel in the
//!   clear): another sender's message with the same id is another message. Files written
//!   before this table keyed ids by (recipient, id) in `mail_ids`, which opening moves over
//!   (reading each sender from its message) and deletes;
//! - `mail_expiry`: (expires-at ms, seq) → recipient, so expiry is found without a scan;
//! - `mail_expired`: (sender, seq) → the expiry notice (an `ExpiredRecordV1`) waiting for
//!   the sender;
//! - `mail_usage`: what is waiting, for the [`Quotas`]: (messages, bytes) per recipient
//!   (`to\n{user}`), sender (`from\n{user}`) and pair (`pair\n{from}\n{to}`), and in all
//!   (`total`); rows at zero are deleted. Files written before it (with a `mail_count` of
//!   messages per recipient) get it computed from `mail` when opened;
//! - `mail_meta`: the next sequence number, and `usage` once `mail_usage` is complete.
//!
//! Every change is committed durably before it is answered: a deposit the server confirmed
//! survives a crash. Deposits go through one writer thread that commits whatever deposits
//! are waiting together (group commit), so concurrent senders share one fsync. A message
//! leaves only when its recipient acknowledges it, or when it expires, which is recorded for
//! its sender in the same transaction.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use ::redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use p2pchat_core::MessageId;
use p2pchat_core::store::{
    ExpiredMessage, MAX_EXPIRED_BATCH, MailKey, OfflineStore, Put, Quotas, StoreError,
    StoredMessage, Usage,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::BroadcastStream;

use super::record::{ExpiredRecordV1, MailRecordV1};
use super::unix_ms;

const MAIL: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("mail");
const MAIL_KEYS: TableDefinition<'_, (&str, &str, u128), u64> = TableDefinition::new("mail_keys");
/// `mail_keys` before mail was keyed by sender: (recipient, id) → seq. Moved over on open.
const MAIL_IDS_V1: TableDefinition<'_, (&str, u128), u64> = TableDefinition::new("mail_ids");
const MAIL_EXPIRY: TableDefinition<'_, (u64, u64), &str> = TableDefinition::new("mail_expiry");
const MAIL_EXPIRED: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("mail_expired");
/// Messages per recipient, before `mail_usage`: replaced by it on open.
const MAIL_COUNT_V1: TableDefinition<'_, &str, u64> = TableDefinition::new("mail_count");
const MAIL_USAGE: TableDefinition<'_, &str, (u64, u64)> = TableDefinition::new("mail_usage");
const MAIL_META: TableDefinition<'_, &str, u64> = TableDefinition::new("mail_meta");

/// Expired messages moved per sweep transaction.
const SWEEP_BATCH: usize = 1000;

/// New-mail notices buffered per recipient (a lagging subscriber still gets one).
const NOTICE_CAPACITY: usize = 8;

/// Offline mailboxes in redb. Clones share the database and the notice registry.
#[derive(Debug, Clone)]
pub struct RedbMailbox {
    db: Arc<Database>,
    /// recipient → its notice channel, created by the first subscriber.
    notices: Arc<Mutex<HashMap<String, broadcast::Sender<()>>>>,
    /// To the writer thread, which commits concurrent deposits together.
    deposits: mpsc::Sender<Deposit>,
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable(e)
}

fn id_key(id: &MessageId) -> u128 {
    u128::from_be_bytes(*id.as_bytes())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::corrupt(format!("a stored {what} cannot be read"))
}

impl RedbMailbox {
    /// The mailboxes in `db`, under `quotas`.
    pub(crate) fn open(db: Arc<Database>, quotas: Quotas) -> Result<Self, StoreError> {
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(MAIL).map_err(unavailable)?;
        txn.open_table(MAIL_KEYS).map_err(unavailable)?;
        migrate_ids_v1(&txn)?;
        txn.open_table(MAIL_EXPIRY).map_err(unavailable)?;
        txn.open_table(MAIL_EXPIRED).map_err(unavailable)?;
        txn.open_table(MAIL_META).map_err(unavailable)?;
        account_v1(&txn)?;
        txn.commit().map_err(unavailable)?;
        let (deposits, queue) = mpsc::channel(DEPOSIT_QUEUE);
        let writer_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("mailbox-writer".into())
            .spawn(move || write_deposits(writer_db, quotas, queue))
            .map_err(unavailable)?;
        Ok(Self {
            db,
            notices: Arc::new(Mutex::new(HashMap::new())),
            deposits,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    /// Hands `messages` to the writer thread and waits for their commit; notifies each
    /// recipient who got new mail.
    async fn deposit(&self, messages: Vec<StoredMessage>) -> Vec<Result<bool, StoreError>> {
        let n = messages.len();
        let recipients: Vec<String> = messages.iter().map(|m| m.to.clone()).collect();
        let (reply, answer) = oneshot::channel();
        let stopped = || vec![Err(StoreError::unavailable("the mailbox writer stopped")); n];
        if self
            .deposits
            .send(Deposit { messages, reply })
            .await
            .is_err()
        {
            return stopped();
        }
        let Ok(outcomes) = answer.await else {
            return stopped();
        };
        let mut notified: Vec<&str> = Vec::new();
        for (recipient, outcome) in recipients.iter().zip(&outcomes) {
            if matches!(outcome, Ok(true)) && !notified.contains(&recipient.as_str()) {
                notified.push(recipient);
                self.notify(recipient);
            }
        }
        outcomes
    }

    fn notify(&self, recipient: &str) {
        let mut notices = self.notices.lock();
        if let Some(tx) = notices.get(recipient)
            && tx.send(()).is_err()
        {
            // Every subscriber is gone.
            notices.remove(recipient);
        }
    }
}

/// Deposits waiting for the writer thread (one put, or one `put_many`'s messages, committed
/// together), and where their outcomes go, in order (`true`: stored now, `false`: it was
/// already there).
struct Deposit {
    messages: Vec<StoredMessage>,
    reply: oneshot::Sender<Vec<Result<bool, StoreError>>>,
}

/// Deposits waiting for the writer. Default: 1024.
const DEPOSIT_QUEUE: usize = 1024;

/// Messages the writer takes into one commit, at least (a deposit is never split). Default:
/// 256.
const DEPOSIT_BATCH: usize = 256;

/// The writer thread: takes every deposit waiting (until [`DEPOSIT_BATCH`] messages),
/// applies them in one write transaction and commits once, so concurrent deposits share one
/// durable commit (one fsync) instead of paying one each. Each message still gets its own
/// outcome; nobody is answered before the commit that holds their message. Ends when every
/// mailbox handle is gone. It holds the database weakly, so closing the storage closes the
/// file at once.
fn write_deposits(db: Weak<Database>, quotas: Quotas, mut queue: mpsc::Receiver<Deposit>) {
    while let Some(first) = queue.blocking_recv() {
        let Some(db) = db.upgrade() else { return };
        let mut taken = first.messages.len();
        let mut batch = vec![first];
        while taken < DEPOSIT_BATCH {
            match queue.try_recv() {
                Ok(next) => {
                    taken += next.messages.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let outcomes = (|| {
            let txn = db.begin_write().map_err(unavailable)?;
            sweep(&txn, now_ms())?;
            let mut tables = MailTables::open(&txn)?;
            let outcomes: Vec<Vec<Result<bool, StoreError>>> = batch
                .iter()
                .map(|d| d.messages.iter().map(|m| tables.put(m, &quotas)).collect())
                .collect();
            tables.finish()?;
            // A quota refuses one message and changes nothing; any other failure may
            // have left a message half written, so nothing in the batch is committed.
            if let Some(Err(e)) = outcomes
                .iter()
                .flatten()
                .find(|o| matches!(o, Err(e) if !matches!(e, StoreError::QuotaExceeded { .. })))
            {
                return Err(e.clone());
            }
            txn.commit().map_err(unavailable)?;
            Ok::<_, StoreError>(outcomes)
        })();
        // Let go of the database before answering: whoever is answered may close it next.
        drop(db);
        match outcomes {
            Ok(outcomes) => {
                for (deposit, outcomes) in batch.into_iter().zip(outcomes) {
                    let _ = deposit.reply.send(outcomes);
                }
            }
            Err(e) => {
                for deposit in batch {
                    let _ = deposit
                        .reply
                        .send(vec![Err(e.clone()); deposit.messages.len()]);
                }
            }
        }
    }
}

/// The tables a deposit writes, opened once per write transaction (opening a table costs
/// more than an insert), and the next sequence number, written back once by
/// [`MailTables::finish`].
struct MailTables<'txn> {
    mail: ::redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    keys: ::redb::Table<'txn, (&'static str, &'static str, u128), u64>,
    expiry: ::redb::Table<'txn, (u64, u64), &'static str>,
    usage: ::redb::Table<'txn, &'static str, (u64, u64)>,
    meta: ::redb::Table<'txn, &'static str, u64>,
    next: u64,
}

impl<'txn> MailTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        let meta = txn.open_table(MAIL_META).map_err(unavailable)?;
        let next = meta.get("next").map_err(unavailable)?.map(|v| v.value());
        Ok(Self {
            mail: txn.open_table(MAIL).map_err(unavailable)?,
            keys: txn.open_table(MAIL_KEYS).map_err(unavailable)?,
            expiry: txn.open_table(MAIL_EXPIRY).map_err(unavailable)?,
            usage: txn.open_table(MAIL_USAGE).map_err(unavailable)?,
            meta,
            next: next.unwrap_or(0),
        })
    }

    /// Adds one message: `Ok(false)` if the same sender's message with its id is there
    /// already.
    fn put(&mut self, message: &StoredMessage, quotas: &Quotas) -> Result<bool, StoreError> {
        let to = message.to.as_str();
        let key = (to, message.from.as_str(), id_key(&message.id));
        if self.keys.get(key).map_err(unavailable)?.is_some() {
            return Ok(false);
        }
        let accounts = accounts(message);
        let mut used = [Usage::default(); 4];
        for (usage, account) in used.iter_mut().zip(&accounts) {
            *usage = read_usage(&self.usage, account)?;
        }
        let [mailbox, sender, pair, total] = used;
        quotas.admit(message, mailbox, sender, pair, total)?;
        let seq = self.next;
        self.next += 1;
        let bytes = MailRecordV1::encode(message);
        self.mail
            .insert((to, seq), bytes.as_slice())
            .map_err(unavailable)?;
        self.keys.insert(key, seq).map_err(unavailable)?;
        self.expiry
            .insert((unix_ms(message.expires_at), seq), to)
            .map_err(unavailable)?;
        for (usage, account) in used.iter().zip(&accounts) {
            write_usage(&mut self.usage, account, usage.plus(message))?;
        }
        Ok(true)
    }

    /// Writes the next sequence number back.
    fn finish(mut self) -> Result<(), StoreError> {
        self.meta.insert("next", self.next).map_err(unavailable)?;
        Ok(())
    }
}

/// Moves up to [`SWEEP_BATCH`] expired messages to their senders' expiry notices.
fn sweep(txn: &WriteTransaction, now_ms: u64) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(MAIL_EXPIRY).map_err(unavailable)?;
    let due: Vec<((u64, u64), String)> = expiry
        .range((0, 0)..=(now_ms, u64::MAX))
        .map_err(unavailable)?
        .take(SWEEP_BATCH)
        .map(|row| {
            row.map(|(k, v)| (k.value(), v.value().to_owned()))
                .map_err(unavailable)
        })
        .collect::<Result<_, _>>()?;
    if due.is_empty() {
        return Ok(());
    }
    let mut mail = txn.open_table(MAIL).map_err(unavailable)?;
    let mut keys = txn.open_table(MAIL_KEYS).map_err(unavailable)?;
    let mut usage = txn.open_table(MAIL_USAGE).map_err(unavailable)?;
    let mut expired = txn.open_table(MAIL_EXPIRED).map_err(unavailable)?;
    for ((at, seq), recipient) in due {
        expiry.remove((at, seq)).map_err(unavailable)?;
        let Some(bytes) = mail
            .remove((recipient.as_str(), seq))
            .map_err(unavailable)?
            .map(|v| v.value().to_vec())
        else {
            continue;
        };
        let message = MailRecordV1::decode(&bytes).ok_or_else(|| corrupt("message"))?;
        keys.remove((
            recipient.as_str(),
            message.from.as_str(),
            id_key(&message.id),
        ))
        .map_err(unavailable)?;
        uncharge(&mut usage, &message)?;
        let notice = ExpiredMessage {
            id: message.id,
            to: message.to,
        };
        let notice = ExpiredRecordV1::encode(&notice);
        expired
            .insert((message.from.as_str(), seq), notice.as_slice())
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Moves the (recipient, id) → seq rows of a file written before mail was keyed by sender
/// into `mail_keys`, reading each message's sender from the message, and deletes the old
/// table. Nothing to do in a newer file.
fn migrate_ids_v1(txn: &WriteTransaction) -> Result<(), StoreError> {
    let present = txn
        .list_tables()
        .map_err(unavailable)?
        .any(|t| t.name() == MAIL_IDS_V1.name());
    if !present {
        return Ok(());
    }
    {
        let old = txn.open_table(MAIL_IDS_V1).map_err(unavailable)?;
        let mail = txn.open_table(MAIL).map_err(unavailable)?;
        let mut keys = txn.open_table(MAIL_KEYS).map_err(unavailable)?;
        let mut moved = 0usize;
        for row in old.iter().map_err(unavailable)? {
            let (k, seq) = row.map_err(unavailable)?;
            let ((to, id), seq) = (k.value(), seq.value());
            // A row whose message is gone named nothing: it is dropped.
            let Some(bytes) = mail.get((to, seq)).map_err(unavailable)? else {
                continue;
            };
            // One unreadable message must not keep the server from starting: it stays where
            // it is (a fetch reports it), unkeyed.
            let Some(message) = MailRecordV1::decode(bytes.value()) else {
                tracing::warn!(recipient = %to, seq, "an unreadable message is not keyed by sender");
                continue;
            };
            keys.insert((to, message.from.as_str(), id), seq)
                .map_err(unavailable)?;
            moved += 1;
        }
        tracing::info!(moved, "mailbox ids now keyed by sender");
    }
    txn.delete_table(MAIL_IDS_V1).map_err(unavailable)?;
    Ok(())
}

/// The `mail_usage` rows `message` counts in: its recipient's, its sender's, the pair's and
/// the total, in the order [`Quotas::admit`] takes them.
fn accounts(message: &StoredMessage) -> [String; 4] {
    [
        format!("to\n{}", message.to),
        format!("from\n{}", message.from),
        format!("pair\n{}\n{}", message.from, message.to),
        "total".to_owned(),
    ]
}

type UsageTable<'txn> = ::redb::Table<'txn, &'static str, (u64, u64)>;

fn read_usage(table: &UsageTable<'_>, account: &str) -> Result<Usage, StoreError> {
    Ok(table
        .get(account)
        .map_err(unavailable)?
        .map(|v| {
            let (messages, bytes) = v.value();
            Usage { messages, bytes }
        })
        .unwrap_or_default())
}

fn write_usage(table: &mut UsageTable<'_>, account: &str, usage: Usage) -> Result<(), StoreError> {
    if usage.messages == 0 {
        table.remove(account).map_err(unavailable)?;
    } else {
        table
            .insert(account, (usage.messages, usage.bytes))
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Takes `message` out of the usage it was counted in (it left: acknowledged or expired).
fn uncharge(table: &mut UsageTable<'_>, message: &StoredMessage) -> Result<(), StoreError> {
    for account in accounts(message) {
        let usage = read_usage(table, &account)?;
        write_usage(table, &account, usage.minus(message))?;
    }
    Ok(())
}

/// Computes `mail_usage` from `mail` in a file written before it (or one where it was never
/// completed), and deletes the old `mail_count`. Nothing to do once `usage` is in the meta
/// table.
fn account_v1(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(MAIL_META).map_err(unavailable)?;
    if meta.get("usage").map_err(unavailable)?.is_some() {
        return Ok(());
    }
    let mail = txn.open_table(MAIL).map_err(unavailable)?;
    let mut usage = txn.open_table(MAIL_USAGE).map_err(unavailable)?;
    usage.retain(|_, _| false).map_err(unavailable)?;
    let mut counted = 0usize;
    for row in mail.iter().map_err(unavailable)? {
        let (_, bytes) = row.map_err(unavailable)?;
        // An unreadable message is reported by the fetch that meets it; it counts for nothing.
        let Some(message) = MailRecordV1::decode(bytes.value()) else {
            continue;
        };
        for account in accounts(&message) {
            let used = read_usage(&usage, &account)?;
            write_usage(&mut usage, &account, used.plus(&message))?;
        }
        counted += 1;
    }
    meta.insert("usage", 1).map_err(unavailable)?;
    let old = txn
        .list_tables()
        .map_err(unavailable)?
        .any(|t| t.name() == MAIL_COUNT_V1.name());
    drop((mail, usage, meta));
    if old {
        txn.delete_table(MAIL_COUNT_V1).map_err(unavailable)?;
    }
    if counted > 0 {
        tracing::info!(counted, "mailbox usage computed");
    }
    Ok(())
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Whether any message is due to expire (a read, so fetches write only when needed).
fn expiry_due(db: &Database, now_ms: u64) -> Result<bool, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let expiry = txn.open_table(MAIL_EXPIRY).map_err(unavailable)?;
    let first = expiry.first().map_err(unavailable)?;
    Ok(first.is_some_and(|(k, _)| k.value().0 <= now_ms))
}

fn sweep_if_due(db: &Database) -> Result<(), StoreError> {
    let now = now_ms();
    if expiry_due(db, now)? {
        let txn = db.begin_write().map_err(unavailable)?;
        sweep(&txn, now)?;
        txn.commit().map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait]
impl OfflineStore for RedbMailbox {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        let mut outcome = self.deposit(vec![message]).await;
        outcome
            .pop()
            .unwrap_or_else(|| Err(StoreError::unavailable("no answer")))?;
        Ok(())
    }

    /// The messages in one commit (with whatever other deposits are waiting).
    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        self.deposit(messages)
            .await
            .into_iter()
            .map(|outcome| outcome.map(|stored| if stored { Put::Stored } else { Put::Duplicate }))
            .collect()
    }

    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let recipient = recipient.to_owned();
        self.blocking(move |db| {
            sweep_if_due(db)?;
            let now = SystemTime::now();
            let txn = db.begin_read().map_err(unavailable)?;
            let mail = txn.open_table(MAIL).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in mail
                .range((recipient.as_str(), 0)..=(recipient.as_str(), u64::MAX))
                .map_err(unavailable)?
            {
                if out.len() >= limit {
                    break;
                }
                let (_, bytes) = row.map_err(unavailable)?;
                let message =
                    MailRecordV1::decode(bytes.value()).ok_or_else(|| corrupt("message"))?;
                if message.expires_at > now {
                    out.push(message);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        let recipient = recipient.to_owned();
        let acked = acked.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let to = recipient.as_str();
                let mut keys = txn.open_table(MAIL_KEYS).map_err(unavailable)?;
                let mut mail = txn.open_table(MAIL).map_err(unavailable)?;
                let mut expiry = txn.open_table(MAIL_EXPIRY).map_err(unavailable)?;
                let mut usage = txn.open_table(MAIL_USAGE).map_err(unavailable)?;
                for key in &acked {
                    let Some(seq) = keys
                        .remove((to, key.from.as_str(), id_key(&key.id)))
                        .map_err(unavailable)?
                        .map(|v| v.value())
                    else {
                        continue;
                    };
                    let removed = mail
                        .remove((to, seq))
                        .map_err(unavailable)?
                        .map(|v| v.value().to_vec());
                    if let Some(bytes) = removed {
                        let message =
                            MailRecordV1::decode(&bytes).ok_or_else(|| corrupt("message"))?;
                        expiry
                            .remove((unix_ms(message.expires_at), seq))
                            .map_err(unavailable)?;
                        uncharge(&mut usage, &message)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        let sender = sender.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            sweep(&txn, now_ms())?;
            let mut out = Vec::new();
            {
                let mut expired = txn.open_table(MAIL_EXPIRED).map_err(unavailable)?;
                let keys: Vec<(u64, Vec<u8>)> = expired
                    .range((sender.as_str(), 0)..=(sender.as_str(), u64::MAX))
                    .map_err(unavailable)?
                    .take(MAX_EXPIRED_BATCH)
                    .map(|row| {
                        row.map(|(k, v)| (k.value().1, v.value().to_vec()))
                            .map_err(unavailable)
                    })
                    .collect::<Result<_, _>>()?;
                for (seq, bytes) in keys {
                    expired
                        .remove((sender.as_str(), seq))
                        .map_err(unavailable)?;
                    out.push(
                        ExpiredRecordV1::decode(&bytes).ok_or_else(|| corrupt("expiry notice"))?,
                    );
                }
            }
            txn.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }

    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        let mut notices = self.notices.lock();
        // Forget channels nobody listens to any more, now and then (amortized).
        if notices.len() >= 64 && notices.len().is_power_of_two() {
            notices.retain(|_, tx| tx.receiver_count() > 0);
        }
        let rx = notices
            .entry(recipient.to_owned())
            .or_insert_with(|| broadcast::channel(NOTICE_CAPACITY).0)
            .subscribe();
        drop(notices);
        // A lagged receiver missed notices: that is still "mail may have arrived".
        Ok(BroadcastStream::new(rx).map(|_| ()).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redb::ReadableTableMetadata;
    use std::time::Duration;

    fn message(from: &str, to: &str, id: MessageId) -> StoredMessage {
        StoredMessage {
            id,
            from: from.to_owned(),
            to: to.to_owned(),
            token: format!("token-of-{from}"),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    /// Writes `message` as a server did before mail was keyed by sender.
    fn put_v1(db: &Database, message: &StoredMessage, seq: u64) {
        let txn = db.begin_write().unwrap();
        {
            let to = message.to.as_str();
            let bytes = MailRecordV1::encode(message);
            let mut mail = txn.open_table(MAIL).unwrap();
            mail.insert((to, seq), bytes.as_slice()).unwrap();
            let mut ids = txn.open_table(MAIL_IDS_V1).unwrap();
            ids.insert((to, id_key(&message.id)), seq).unwrap();
            let mut expiry = txn.open_table(MAIL_EXPIRY).unwrap();
            expiry
                .insert((unix_ms(message.expires_at), seq), to)
                .unwrap();
            let mut counts = txn.open_table(MAIL_COUNT_V1).unwrap();
            let n = counts.get(to).unwrap().map_or(0, |v| v.value());
            counts.insert(to, n + 1).unwrap();
            let mut meta = txn.open_table(MAIL_META).unwrap();
            meta.insert("next", seq + 1).unwrap();
        }
        txn.commit().unwrap();
    }

    /// A file from before mail was keyed by sender opens with its mail intact and keyed by
    /// sender: the old ids move over (a row whose message is gone is dropped), the same
    /// sender's id is still a duplicate, another sender's is not, and acks by sender and id
    /// find the old messages.
    #[tokio::test]
    async fn mail_written_keyed_by_id_alone_is_keyed_by_sender_after_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directory.redb");
        let (x, y) = (MessageId::random(), MessageId::random());
        let old = [message("alice", "bob", x), message("carol", "bob", y)];
        {
            let db = Database::create(&path).unwrap();
            put_v1(&db, &old[0], 0);
            put_v1(&db, &old[1], 1);
            // A dangling id row, as a crash between tables cannot leave but a hand edit can,
            // and an unreadable message in another mailbox: neither stops the opening.
            let txn = db.begin_write().unwrap();
            let mut ids = txn.open_table(MAIL_IDS_V1).unwrap();
            ids.insert(("bob", id_key(&MessageId::random())), 9)
                .unwrap();
            ids.insert(("zed", id_key(&MessageId::random())), 10)
                .unwrap();
            drop(ids);
            txn.open_table(MAIL)
                .unwrap()
                .insert(("zed", 10), b"not a record".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let db = Arc::new(Database::create(&path).unwrap());
        let mailbox = RedbMailbox::open(db.clone(), Quotas::mailbox(100)).unwrap();
        {
            let txn = db.begin_read().unwrap();
            assert!(
                txn.open_table(MAIL_IDS_V1).is_err(),
                "the old table is gone"
            );
            let keys = txn.open_table(MAIL_KEYS).unwrap();
            assert_eq!(
                keys.len().unwrap(),
                2,
                "both live rows moved, the dangling and unreadable ones not"
            );
        }
        assert_eq!(mailbox.fetch("bob", 10).await.unwrap(), old.to_vec());

        let outcomes = mailbox
            .put_many(vec![old[0].clone(), message("mallory", "bob", x)])
            .await;
        assert!(
            matches!(outcomes[..], [Ok(Put::Duplicate), Ok(Put::Stored)]),
            "alice's id is hers alone: {outcomes:?}"
        );
        mailbox
            .ack(
                "bob",
                &[
                    MailKey::of(&old[0]),
                    MailKey {
                        from: "alice".to_owned(),
                        id: y,
                    },
                ],
            )
            .await
            .unwrap();
        let left = mailbox.fetch("bob", 10).await.unwrap();
        assert_eq!(
            left.iter().map(MailKey::of).collect::<Vec<_>>(),
            vec![
                MailKey::of(&old[1]),
                MailKey {
                    from: "mallory".to_owned(),
                    id: x
                }
            ],
            "the ack took alice's message only"
        );
        drop(mailbox);

        // Opening again finds nothing to move and keeps what is there.
        let mailbox = RedbMailbox::open(db, Quotas::mailbox(100)).unwrap();
        assert_eq!(mailbox.fetch("bob", 10).await.unwrap(), left);
    }
}
