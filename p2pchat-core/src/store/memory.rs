//! [`MemoryStore`]: mailboxes in memory, shared by every clone.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{ExpiredMessage, MailKey, OfflineStore, Put, Quotas, StoreError, StoredMessage, Usage};

/// Capacity of the new-mail notice channel; a lagging subscriber still gets a notice.
const NOTICE_CAPACITY: usize = 64;

/// Offline mailboxes held in memory. Clones share the mailboxes.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Mailboxes>>,
    notices: broadcast::Sender<String>,
}

#[derive(Debug)]
struct Mailboxes {
    boxes: HashMap<String, VecDeque<StoredMessage>>,
    expired: HashMap<String, Vec<ExpiredMessage>>,
    quotas: Quotas,
    /// What is waiting per recipient, per sender, per (sender, recipient) and in all.
    usage: Accounts,
}

#[derive(Debug, Default)]
struct Accounts {
    mailbox: HashMap<String, Usage>,
    sender: HashMap<String, Usage>,
    pair: HashMap<(String, String), Usage>,
    total: Usage,
}

impl Accounts {
    fn get<K: std::hash::Hash + Eq>(map: &HashMap<K, Usage>, key: &K) -> Usage {
        map.get(key).copied().unwrap_or_default()
    }

    fn admit(&self, quotas: &Quotas, m: &StoredMessage) -> Result<(), StoreError> {
        quotas.admit(
            m,
            Self::get(&self.mailbox, &m.to),
            Self::get(&self.sender, &m.from),
            Self::get(&self.pair, &(m.from.clone(), m.to.clone())),
            self.total,
        )
    }

    fn add(&mut self, m: &StoredMessage) {
        for usage in [
            self.mailbox.entry(m.to.clone()).or_default(),
            self.sender.entry(m.from.clone()).or_default(),
            self.pair.entry((m.from.clone(), m.to.clone())).or_default(),
        ] {
            *usage = usage.plus(m);
        }
        self.total = self.total.plus(m);
    }

    fn remove(&mut self, m: &StoredMessage) {
        fn take<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Usage>, key: K, m: &StoredMessage) {
            if let Some(usage) = map.get_mut(&key) {
                *usage = usage.minus(m);
                if usage.messages == 0 {
                    map.remove(&key);
                }
            }
        }
        take(&mut self.mailbox, m.to.clone(), m);
        take(&mut self.sender, m.from.clone(), m);
        take(&mut self.pair, (m.from.clone(), m.to.clone()), m);
        self.total = self.total.minus(m);
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Empty mailboxes with the default [`Quotas`].
    pub fn new() -> Self {
        Self::with_quotas(Quotas::default())
    }

    /// Empty mailboxes holding at most `quota` messages per recipient (the other
    /// [`Quotas`] at their defaults).
    pub fn with_quota(quota: usize) -> Self {
        Self::with_quotas(Quotas::mailbox(quota))
    }

    /// Empty mailboxes under `quotas`.
    pub fn with_quotas(quotas: Quotas) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Mailboxes {
                boxes: HashMap::new(),
                expired: HashMap::new(),
                quotas,
                usage: Accounts::default(),
            })),
            notices: broadcast::channel(NOTICE_CAPACITY).0,
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Mailboxes> {
        self.inner.lock()
    }
}

impl Mailboxes {
    fn expire(&mut self, now: SystemTime) {
        let Self {
            boxes,
            expired,
            usage,
            ..
        } = self;
        for queue in boxes.values_mut() {
            queue.retain(|m| {
                let keep = m.expires_at > now;
                if !keep {
                    usage.remove(m);
                    expired
                        .entry(m.from.clone())
                        .or_default()
                        .push(ExpiredMessage {
                            id: m.id,
                            to: m.to.clone(),
                        });
                }
                keep
            });
        }
        boxes.retain(|_, q| !q.is_empty());
    }
}

impl MemoryStore {
    /// One put, saying whether the message was there already.
    fn put_one(&self, message: StoredMessage) -> Result<Put, StoreError> {
        let to = message.to.clone();
        {
            let mut boxes = self.lock();
            boxes.expire(SystemTime::now());
            let Mailboxes {
                boxes,
                quotas,
                usage,
                ..
            } = &mut *boxes;
            let queue = boxes.entry(to.clone()).or_default();
            if queue
                .iter()
                .any(|m| m.id == message.id && m.from == message.from)
            {
                return Ok(Put::Duplicate);
            }
            usage.admit(quotas, &message)?;
            usage.add(&message);
            queue.push_back(message);
        }
        let _ = self.notices.send(to);
        Ok(Put::Stored)
    }
}

#[async_trait]
impl OfflineStore for MemoryStore {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        self.put_one(message).map(drop)
    }

    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        messages.into_iter().map(|m| self.put_one(m)).collect()
    }

    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut boxes = self.lock();
        boxes.expire(SystemTime::now());
        Ok(boxes
            .boxes
            .get(recipient)
            .map(|q| q.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        let mut boxes = self.lock();
        let Mailboxes { boxes, usage, .. } = &mut *boxes;
        if let Some(queue) = boxes.get_mut(recipient) {
            let acked: std::collections::HashSet<&MailKey> = acked.iter().collect();
            queue.retain(|m| {
                let keep = !acked.contains(&MailKey::of(m));
                if !keep {
                    usage.remove(m);
                }
                keep
            });
            if queue.is_empty() {
                boxes.remove(recipient);
            }
        }
        Ok(())
    }

    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        let mut boxes = self.lock();
        boxes.expire(SystemTime::now());
        Ok(boxes.expired.remove(sender).unwrap_or_default())
    }

    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        let recipient = recipient.to_owned();
        Ok(BroadcastStream::new(self.notices.subscribe())
            .filter_map(move |notice| {
                // A lagged receiver may have missed a notice for us: report one.
                let hit = match notice {
                    Ok(to) => to == recipient,
                    Err(_) => true,
                };
                futures::future::ready(hit.then_some(()))
            })
            .boxed())
    }
}
