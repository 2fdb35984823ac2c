//! Presence leases held in this process's memory, for a server that is alone on its storage.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Lease, PRESENCE_FEED_CAPACITY, PresenceChange, SessionId};

#[derive(Debug)]
struct Entry {
    lease: Lease,
    expires: Instant,
}

/// Leases by username, expiring on tokio's clock, with the change feed.
#[derive(Debug)]
pub(crate) struct LocalPresence {
    leases: Mutex<BTreeMap<String, Entry>>,
    changes: broadcast::Sender<PresenceChange>,
}

impl LocalPresence {
    pub(crate) fn new() -> Self {
        Self {
            leases: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(PRESENCE_FEED_CAPACITY).0,
        }
    }

    fn leases(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.leases.lock()
    }

    fn publish(&self, change: PresenceChange) {
        // Nobody listening is fine: the change is still applied.
        let _ = self.changes.send(change);
    }

    pub(crate) fn set_online(&self, lease: &Lease, ttl: Duration) {
        self.leases().insert(
            lease.username.clone(),
            Entry {
                lease: lease.clone(),
                expires: Instant::now() + ttl,
            },
        );
        self.publish(PresenceChange::Online {
            username: lease.username.clone(),
            session: lease.session,
        });
    }

    pub(crate) fn revive(&self, lease: &Lease, ttl: Duration) -> bool {
        let now = Instant::now();
        {
            let mut leases = self.leases();
            if leases.get(&lease.username).is_some_and(|e| e.expires > now) {
                return false;
            }
            leases.insert(
                lease.username.clone(),
                Entry {
                    lease: lease.clone(),
                    expires: now + ttl,
                },
            );
        }
        self.publish(PresenceChange::Online {
            username: lease.username.clone(),
            session: lease.session,
        });
        true
    }

    pub(crate) fn refresh(&self, username: &str, session: SessionId, ttl: Duration) -> bool {
        let now = Instant::now();
        match self.leases().get_mut(username) {
            Some(e) if e.lease.session == session && e.expires > now => {
                e.expires = now + ttl;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn set_offline(&self, username: &str, session: SessionId) -> bool {
        let removed = {
            let mut leases = self.leases();
            match leases.get(username) {
                Some(e) if e.lease.session == session => leases.remove(username).is_some(),
                _ => false,
            }
        };
        if removed {
            self.publish(PresenceChange::Offline {
                username: username.to_owned(),
            });
        }
        removed
    }

    pub(crate) fn online(&self, username: &str) -> Option<Lease> {
        let now = Instant::now();
        self.leases()
            .get(username)
            .filter(|e| e.expires > now)
            .map(|e| e.lease.clone())
    }

    pub(crate) fn list_online(&self, after: Option<&str>, limit: usize) -> Vec<Lease> {
        let now = Instant::now();
        let leases = self.leases();
        let lower = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        leases
            .range::<str, _>((lower, Bound::Unbounded))
            .filter(|(_, e)| e.expires > now)
            .take(limit)
            .map(|(_, e)| e.lease.clone())
            .collect()
    }

    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        self.leases().retain(|name, e| {
            let keep = e.expires > now;
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        for username in gone {
            self.publish(PresenceChange::Offline { username });
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.changes.subscribe()
    }
}
