//! Books for the fault tests: which messages were sent, what outcome each sender was told
//! (and which attempts failed and were retried), and how often each was shown, fed by the
//! nodes' event streams; the counts every fault test prints (`sent`, `shown`, `lost`,
//! `duplicated`) and asserts. A failed attempt (`Event::Queued` with a retry reason) is not
//! an outcome: the message stays in the outbox and is retried until delivered or stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use p2pchat_core::{Event, Events, MessageId};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Stored,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Showing {
    pub by: String,
    pub from: String,
    pub offline: bool,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Accepted by `send`: id → (sender, recipient).
    pub sent: HashMap<MessageId, (String, String)>,
    /// Every outcome reported, in order.
    pub outcomes: HashMap<MessageId, Vec<Outcome>>,
    /// Why each failed attempt failed (`Event::Queued` with a retry reason), in order.
    pub retries: HashMap<MessageId, Vec<String>>,
    /// Every showing, in order.
    pub shown: HashMap<MessageId, Vec<Showing>>,
    pub lagged: u64,
}

impl Ledger {
    pub fn outcome(&self, id: &MessageId) -> Option<&Outcome> {
        self.outcomes.get(id).and_then(|o| o.first())
    }

    /// Whether a failed attempt of `id` was reported (it waits to be retried).
    pub fn retried(&self, id: &MessageId) -> bool {
        self.retries.contains_key(id)
    }

    pub fn shown_count(&self, id: &MessageId) -> usize {
        self.shown.get(id).map_or(0, Vec::len)
    }

    /// Shown to `who` so far (showings, duplicates included).
    pub fn shown_to(&self, who: &str) -> usize {
        self.shown
            .values()
            .flatten()
            .filter(|s| s.by == who)
            .count()
    }

    /// Every message sent has an outcome.
    pub fn all_settled(&self) -> bool {
        self.sent.keys().all(|id| self.outcomes.contains_key(id))
    }

    /// Every message sent has an outcome, and each one delivered or stored was shown.
    pub fn all_shown(&self) -> bool {
        self.sent.keys().all(|id| match self.outcome(id) {
            None => false,
            Some(Outcome::Failed(_)) => true,
            Some(_) => self.shown.contains_key(id),
        })
    }

    pub fn counts(&self) -> Counts {
        self.counts_to(|_| true)
    }

    /// The counts of the messages to recipients `to` accepts (and of unknown messages shown
    /// to them).
    pub fn counts_to(&self, to: impl Fn(&str) -> bool) -> Counts {
        let mut c = Counts::default();
        for (id, _) in self.sent.iter().filter(|(_, (_, r))| to(r)) {
            c.sent += 1;
            if self.retried(id) {
                c.retried += 1;
            }
            let shown = self.shown_count(id);
            match self.outcome(id) {
                Some(Outcome::Delivered) => c.delivered += 1,
                Some(Outcome::Stored) => c.stored += 1,
                Some(Outcome::Failed(_)) => {
                    c.failed += 1;
                    if shown > 0 {
                        c.failed_but_shown += 1;
                    }
                }
                None => c.no_outcome += 1,
            }
            if shown > 0 {
                c.shown += 1;
            } else if !matches!(self.outcome(id), Some(Outcome::Failed(_))) {
                c.lost += 1;
            }
        }
        for (id, showings) in &self.shown {
            let recipient = self
                .sent
                .get(id)
                .map_or(showings[0].by.as_str(), |(_, r)| r);
            if !to(recipient) {
                continue;
            }
            c.duplicated += showings.len().saturating_sub(1);
            c.shown_offline += showings.iter().filter(|s| s.offline).count();
            match self.sent.get(id) {
                None => c.unknown_shown += 1,
                Some((from, to)) => {
                    if showings.iter().any(|s| &s.by != to || &s.from != from) {
                        c.misrouted += 1;
                    }
                }
            }
        }
        c.extra_outcomes = self
            .outcomes
            .iter()
            .filter(|(id, _)| self.sent.get(*id).is_none_or(|(_, r)| to(r)))
            .map(|(_, o)| o.len().saturating_sub(1))
            .sum();
        c.lagged = self.lagged;
        c
    }
}

/// The figures each fault test prints and asserts on. `lost`: accepted by `send`, not
/// reported failed to the sender, and never shown. `duplicated`: showings beyond the first.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub sent: usize,
    pub shown: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub delivered: usize,
    pub stored: usize,
    pub failed: usize,
    pub failed_but_shown: usize,
    pub no_outcome: usize,
    pub extra_outcomes: usize,
    /// Messages with at least one failed attempt, retried.
    pub retried: usize,
    pub shown_offline: usize,
    pub unknown_shown: usize,
    pub misrouted: usize,
    pub lagged: u64,
}

impl Counts {
    pub fn print(&self, prefix: &str) {
        println!(
            "{prefix}: sent={} shown={} lost={} duplicated={} (delivered={} stored={} failed={} \
             failed_but_shown={} no_outcome={} extra_outcomes={} retried={} shown_offline={} \
             unknown_shown={} misrouted={} lagged={})",
            self.sent,
            self.shown,
            self.lost,
            self.duplicated,
            self.delivered,
            self.stored,
            self.failed,
            self.failed_but_shown,
            self.no_outcome,
            self.extra_outcomes,
            self.retried,
            self.shown_offline,
            self.unknown_shown,
            self.misrouted,
            self.lagged
        );
    }

    /// Nothing lost, nothing shown twice, nothing shown that was not sent or to the wrong
    /// node, one outcome per message, no lagging reader.
    pub fn assert_exactly_once(&self) {
        assert_eq!(self.lost, 0, "lost messages: {self:?}");
        assert_eq!(self.duplicated, 0, "messages shown twice: {self:?}");
        assert_eq!(self.unknown_shown, 0, "{self:?}");
        assert_eq!(self.misrouted, 0, "{self:?}");
        assert_eq!(self.no_outcome, 0, "{self:?}");
        assert_eq!(self.extra_outcomes, 0, "{self:?}");
        assert_eq!(self.lagged, 0, "{self:?}");
    }
}

/// A ledger shared by the test and the tasks reading the nodes' events.
#[derive(Clone, Default)]
pub struct Book {
    ledger: Arc<Mutex<Ledger>>,
    changed: Arc<Notify>,
}

impl Book {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    pub fn sent(&self, id: MessageId, from: &str, to: &str) {
        self.ledger()
            .sent
            .insert(id, (from.to_owned(), to.to_owned()));
        self.changed.notify_waiters();
    }

    pub fn counts(&self) -> Counts {
        self.ledger().counts()
    }

    /// Records `me`'s events (its messages' outcomes and what it shows) until its stream
    /// ends, i.e. until the node has stopped and every event it emitted was read.
    pub fn collect(&self, me: &str, mut events: Events) -> JoinHandle<()> {
        let book = self.clone();
        let me = me.to_owned();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                {
                    let mut l = book.ledger();
                    match event {
                        Event::MessageReceived {
                            id, from, offline, ..
                        } => l.shown.entry(id).or_default().push(Showing {
                            by: me.clone(),
                            from,
                            offline,
                        }),
                        Event::Delivered { id, .. } => {
                            l.outcomes.entry(id).or_default().push(Outcome::Delivered)
                        }
                        Event::StoredOffline { id, .. } => {
                            l.outcomes.entry(id).or_default().push(Outcome::Stored)
                        }
                        Event::SendFailed { id, reason, .. } => l
                            .outcomes
                            .entry(id)
                            .or_default()
                            .push(Outcome::Failed(reason)),
                        Event::Queued {
                            id,
                            retry: Some(why),
                            ..
                        } => l.retries.entry(id).or_default().push(why),
                        Event::Lagged { missed } => l.lagged += missed,
                        _ => {}
                    }
                }
                book.changed.notify_waiters();
            }
        })
    }

    /// Waits until `cond` holds, re-checking after every recorded event.
    pub async fn until(&self, what: &str, within: Duration, cond: impl Fn(&Ledger) -> bool) {
        let waited = tokio::time::timeout(within, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if cond(&self.ledger()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if waited.is_err() {
            panic!("{what}: not within {within:?}; {:?}", self.counts());
        }
    }
}
