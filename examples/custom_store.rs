//! A custom offline store: [`MapStore`], mailboxes in a `BTreeMap` behind a mutex,
//! implementing [`OfflineStore`], checked by the library's store conformance suite, and
//! plugged into two nodes.
//!
//! ```text
//! cargo run -p p2pchat-examples --example custom_store
//! ```
//!
//! The program first runs [`store_conformance`] (from `p2pchat_core::testing`, feature
//! `test-utils`) against `MapStore`: ordering, idempotent puts, acknowledgement by sender and
//! id, each of the [`Quotas`], expiry and its notices, new-mail notices. The suite panics,
//! naming the broken rule, on the first violation. In a project of your own it belongs in a
//! test, with `p2pchat-core = { …, features = ["test-utils"] }` in `[dev-dependencies]`:
//!
//! ```text
//! #[tokio::test]
//! async fn map_store_passes_the_store_suite() {
//!     store_conformance(|quotas| async move { SharedStore::new(MapStore::with_quotas(quotas)) })
//!         .await;
//! }
//! ```
//!
//! Then it starts `alice` and `bob` in this process ([`MemoryDiscovery`], which keeps no
//! mailboxes, so the node needs an offline store: `.offline_store(store.clone())`, and
//! [`MemoryNetwork`]); `bob` shuts down, `alice` writes to him (`Event::StoredOffline`:
//! into the `MapStore`), the program shows what the store holds, and `bob`, back with the
//! same key, is shown the messages as his node drains his mailbox.
//!
//! `MapStore` lives in one process, like [`p2pchat_core::MemoryStore`]; a backend of your
//! own (a database, a queue service) has the same six methods to write, each documented on
//! [`OfflineStore`], and passes the same suite. The trait is declared with
//! `#[async_trait]`, so an implementation needs the `async-trait` crate too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use p2pchat_core::store::{ExpiredMessage, MAX_EXPIRED_BATCH, MailKey, Put, Quotas, Usage};
use p2pchat_core::testing::{SharedStore, store_conformance};
use p2pchat_core::{
    ChatNode, Event, Events, Identity, MemoryDiscovery, MemoryNetwork, MessageId, OfflineStore,
    StoreError, StoredMessage,
};
use tokio::sync::watch;

/// How long to wait for any one event before giving up: the example must end even if
/// something is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The store

/// Offline mailboxes in memory: one ordered map of every waiting message, keyed by
/// recipient and then by arrival, so a mailbox is a range of it. Clones share the
/// mailboxes.
///
/// Simple rather than fast: what waits is counted for the [`Quotas`] by walking the map at
/// each put (a real backend keeps counters), and expired messages are swept out at each
/// call (a real backend sweeps on a timer or indexes expiry times).
#[derive(Debug, Clone, Default)]
pub struct MapStore {
    inner: Arc<Mutex<Mailboxes>>,
}

#[derive(Debug, Default)]
struct Mailboxes {
    quotas: Quotas,
    /// Every waiting message, by (recipient, arrival number).
    mail: BTreeMap<(String, u64), StoredMessage>,
    /// The next arrival number.
    next: u64,
    /// Expiry notices not taken yet, per sender.
    expired: HashMap<String, VecDeque<ExpiredMessage>>,
    /// New-mail signals, per recipient someone subscribed for.
    notices: HashMap<String, watch::Sender<()>>,
}

impl MapStore {
    /// Empty mailboxes under the default [`Quotas`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty mailboxes under `quotas`.
    pub fn with_quotas(quotas: Quotas) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Mailboxes {
                quotas,
                ..Mailboxes::default()
            })),
        }
    }

    /// The mailboxes, swept of what has expired by now. (A panic while the lock was held
    /// left nothing half-changed: every change below is made after its checks.)
    fn lock(&self) -> MutexGuard<'_, Mailboxes> {
        let mut boxes = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        boxes.sweep(SystemTime::now());
        boxes
    }

    /// One put, saying whether the message was there already.
    fn put_one(&self, message: StoredMessage) -> Result<Put, StoreError> {
        let mut boxes = self.lock();
        // Idempotent by (recipient, sender, id): another sender's id is another message.
        if boxes
            .mailbox(&message.to)
            .any(|m| m.from == message.from && m.id == message.id)
        {
            return Ok(Put::Duplicate);
        }
        let (mailbox, sender, pair, total) = boxes.usage(&message);
        boxes.quotas.admit(&message, mailbox, sender, pair, total)?;
        let n = boxes.next;
        boxes.next += 1;
        let to = message.to.clone();
        boxes.mail.insert((to.clone(), n), message);
        if let Some(notice) = boxes.notices.get(&to) {
            notice.send_replace(());
        }
        Ok(Put::Stored)
    }
}

impl Mailboxes {
    /// `recipient`'s waiting messages, oldest first.
    fn mailbox(&self, recipient: &str) -> impl Iterator<Item = &StoredMessage> {
        let range = (recipient.to_owned(), 0)..=(recipient.to_owned(), u64::MAX);
        self.mail.range(range).map(|(_, m)| m)
    }

    /// What waits now for `message`'s recipient, from its sender, from its sender for its
    /// recipient, and in all: what [`Quotas::admit`] weighs it against.
    fn usage(&self, message: &StoredMessage) -> (Usage, Usage, Usage, Usage) {
        let [mut mailbox, mut sender, mut pair, mut total] = [Usage::default(); 4];
        for m in self.mail.values() {
            total = total.plus(m);
            let (to, from) = (m.to == message.to, m.from == message.from);
            if to {
                mailbox = mailbox.plus(m);
            }
            if from {
                sender = sender.plus(m);
            }
            if to && from {
                pair = pair.plus(m);
            }
        }
        (mailbox, sender, pair, total)
    }

    /// Moves every message expired at `now` out of the mailboxes, noting it for its sender.
    fn sweep(&mut self, now: SystemTime) {
        let Self { mail, expired, .. } = self;
        mail.retain(|_, m| {
            let keep = m.expires_at > now;
            if !keep {
                expired
                    .entry(m.from.clone())
                    .or_default()
                    .push_back(ExpiredMessage {
                        id: m.id,
                        to: m.to.clone(),
                    });
            }
            keep
        });
    }
}

#[async_trait]
impl OfflineStore for MapStore {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        self.put_one(message).map(drop)
    }

    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        messages.into_iter().map(|m| self.put_one(m)).collect()
    }

    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self
            .lock()
            .mailbox(recipient)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        let acked: HashSet<&MailKey> = acked.iter().collect();
        let mut boxes = self.lock();
        let range = (recipient.to_owned(), 0)..=(recipient.to_owned(), u64::MAX);
        let gone: Vec<(String, u64)> = boxes
            .mail
            .range(range)
            .filter(|(_, m)| acked.contains(&MailKey::of(m)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            boxes.mail.remove(&key);
        }
        Ok(())
    }

    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        let mut boxes = self.lock();
        let Some(notices) = boxes.expired.get_mut(sender) else {
            return Ok(Vec::new());
        };
        let taken: Vec<ExpiredMessage> = notices
            .drain(..notices.len().min(MAX_EXPIRED_BATCH))
            .collect();
        if notices.is_empty() {
            boxes.expired.remove(sender);
        }
        Ok(taken)
    }

    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        // A watch channel keeps the latest signal only: puts in a burst may arrive as one
        // item, which the contract allows (the node fetches everything waiting).
        let signals = self
            .lock()
            .notices
            .entry(recipient.to_owned())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Ok(futures::stream::unfold(signals, |mut signals| async move {
            signals.changed().await.ok()?;
            Some(((), signals))
        })
        .boxed())
    }
}

// ---------------------------------------------------------------------------------------
// The program

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    store_conformance(|quotas| async move { SharedStore::new(MapStore::with_quotas(quotas)) })
        .await;
    println!("MapStore passes the store conformance suite");

    let (directory, network, store) = (
        MemoryDiscovery::new(),
        MemoryNetwork::new(),
        MapStore::new(),
    );
    let start = |name: &'static str, identity: Identity| {
        ChatNode::builder()
            .username(name)
            .identity(identity)
            .transport(network.clone())
            .discovery(directory.clone())
            .offline_store(store.clone())
            .spawn()
    };
    let alice = start("alice", Identity::generate()).await?;
    let mut alice_events = alice.events();
    let bob_key = Identity::generate();
    let bob = start("bob", bob_key.clone()).await?;
    let mut bob_events = bob.events();

    let id = alice.send("bob", "hi bob").await?;
    show(&mut bob_events, "bob", id).await?;
    println!("    ({})", outcome(&mut alice_events, id).await?);

    bob.shutdown().await.context("shutting bob down")?;
    drop(bob_events);
    println!("bob goes offline");
    let mut waiting = Vec::new();
    for text in ["this waits in a MapStore", "and so does this"] {
        let id = alice.send("bob", text).await?;
        println!("    ({})", outcome(&mut alice_events, id).await?);
        waiting.push(id);
    }
    let mailbox = store.fetch("bob", 100).await?;
    println!("the MapStore holds {} messages for bob:", mailbox.len());
    for message in &mailbox {
        println!(
            "    {} from {}, a {}-byte sealed token",
            message.id,
            message.from,
            message.token.len()
        );
    }

    let bob = start("bob", bob_key).await?;
    let mut bob_events = bob.events();
    println!("bob is back");
    for id in waiting {
        show(&mut bob_events, "bob", id).await?;
    }

    alice.shutdown().await.context("shutting alice down")?;
    bob.shutdown().await.context("shutting bob down")?;
    println!("both nodes shut down");
    Ok(())
}

/// The next event on `events` for which `pick` returns something.
async fn next_matching<T>(
    events: &mut Events,
    mut pick: impl FnMut(Event) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    loop {
        let event = tokio::time::timeout(EVENT_TIMEOUT, events.next())
            .await
            .context("no event in time")?
            .context("the node's event stream ended")?;
        if let Some(found) = pick(event)? {
            return Ok(found);
        }
    }
}

/// Waits until `reader` is shown message `id`, and prints it.
async fn show(events: &mut Events, reader: &str, id: MessageId) -> anyhow::Result<()> {
    let line = next_matching(events, |event| match event {
        Event::MessageReceived {
            id: got,
            from,
            text,
            offline,
            ..
        } if got == id => Ok(Some(if offline {
            format!("[Offline][{from}] {text}")
        } else {
            format!("[{from}] {text}")
        })),
        Event::Error { message } => bail!("{reader}'s node reported an error: {message}"),
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting for {reader} to receive message {id}"))?;
    println!("{reader} sees: {line}");
    Ok(())
}

/// Waits for the sender's outcome of message `id`, described as a sentence.
async fn outcome(events: &mut Events, id: MessageId) -> anyhow::Result<String> {
    next_matching(events, |event| match event {
        Event::Delivered { id: got, to } if got == id => Ok(Some(format!("delivered to {to}"))),
        Event::StoredOffline { id: got, to } if got == id => {
            Ok(Some(format!("{to} is offline: stored in the MapStore")))
        }
        Event::SendFailed {
            id: got,
            to,
            reason,
        } if got == id => bail!("sending to {to} failed: {reason}"),
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting for the outcome of message {id}"))
}
