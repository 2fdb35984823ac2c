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

use super::{
    DEFAULT_MAILBOX_QUOTA, ExpiredMessage, MailKey, OfflineStore, Put, StoreError, StoredMessage,
};

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
    quota: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Empty mailboxes with the default quota ([`DEFAULT_MAILBOX_QUOTA`]).
    pub fn new() -> Self {
        Self::with_quota(DEFAULT_MAILBOX_QUOTA)
    }

    /// Empty mailboxes holding at most `quota` messages per recipient.
    pub fn with_quota(quota: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Mailboxes {
                boxes: HashMap::new(),
                expired: HashMap::new(),
                quota,
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
        let Self { boxes, expired, .. } = self;
        for queue in boxes.values_mut() {
            queue.retain(|m| {
                let keep = m.expires_at > now;
                if !keep {
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
            let quota = boxes.quota;
            let queue = boxes.boxes.entry(to.clone()).or_default();
            if queue
                .iter()
                .any(|m| m.id == message.id && m.from == message.from)
            {
                return Ok(Put::Duplicate);
            }
            if queue.len() >= quota {
                return Err(StoreError::QuotaExceeded {
                    recipient: to,
                    quota,
                });
            }
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
        if let Some(queue) = boxes.boxes.get_mut(recipient) {
            let acked: std::collections::HashSet<&MailKey> = acked.iter().collect();
            queue.retain(|m| !acked.contains(&MailKey::of(m)));
            if queue.is_empty() {
                boxes.boxes.remove(recipient);
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
