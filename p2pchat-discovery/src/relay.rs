//! Relays: the connections of two peers that cannot dial each other, paired by a token and
//! spliced byte for byte, within the server's relay limits.
//!
//! ```text
//! alice (session): Relay { bob }          ─▶ server: a token, a slot in the limits
//! server ─▶ alice: Reply::Relay(ticket)      server ─▶ bob (push): RelayOffer { alice, ticket }
//! alice (new connection): RelayJoin{token}   bob (new connection): RelayJoin{token}
//! server ─▶ both: Relayed, then every byte of one to the other
//! ```
//!
//! The peers then run their own handshake and exchange Fernet tokens end to end: the relay
//! carries sealed frames it cannot open, and cannot pose as either side (the handshake signs
//! with keys it does not have). What it sees is who talks to whom, when, and how much.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use p2pchat_core::protocol::discovery::{RELAY_JOIN_TIMEOUT, RELAY_TOKEN_LEN, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A relay's secret: pairs its two connections.
pub(crate) type Token = [u8; RELAY_TOKEN_LEN];

/// Bytes read from one side before they are written to the other. Default: 16 KiB.
const RELAY_CHUNK: usize = 16 << 10;

/// One side of a relay: its bytes in (what was read ahead first) and out.
pub(crate) struct Leg {
    pub(crate) reader: Box<dyn AsyncRead + Send + Unpin>,
    pub(crate) writer: Box<dyn AsyncWrite + Send + Unpin>,
}

/// What the side that joins second hands the first: its leg, the relay's place in the
/// limits, and a signal whose drop (when the splice ends) lets its own task end.
pub(crate) struct Handoff {
    pub(crate) leg: Leg,
    pub(crate) slot: Slot,
    pub(crate) done: oneshot::Sender<()>,
}

/// How a join went.
pub(crate) enum Joined {
    /// First here: wait for the other side's handoff.
    First(oneshot::Receiver<Handoff>),
    /// Second: hand the leg to the first side, which splices.
    Second(oneshot::Sender<Handoff>, Slot),
    /// No such relay (never opened, expired, or that side joined already).
    Unknown,
}

/// The two secrets of a relay: one for each side, so neither can join in the other's place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tokens {
    /// The side that asked for it.
    pub(crate) opener: Token,
    /// The side it was offered to.
    pub(crate) target: Token,
}

/// Which side of a relay a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Opener,
    Target,
}

/// The relays of one server instance: those waiting for their sides, and the counts the
/// limits apply to.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    /// Relays waiting for their sides, by their opener's token.
    pending: HashMap<Token, Pending>,
    /// Every token of a pending relay → its opener's token and its side.
    sides: HashMap<Token, (Token, Side)>,
    /// Each open relay's (opener, other side) → what ends it early.
    pairs: HashMap<(String, String), Opened>,
    per_user: HashMap<String, usize>,
    open: usize,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("pending", &self.pending.len())
            .field("open", &self.open)
            .finish()
    }
}

/// What the table keeps of an open relay to end it early.
struct Opened {
    token: Token,
    stop: CancellationToken,
    /// Its place in the counts was given back already.
    released: Arc<AtomicBool>,
}

struct Pending {
    slot: Slot,
    target: Token,
    expires: Instant,
    /// The side that joined first, waiting.
    first: Option<(Side, oneshot::Sender<Handoff>)>,
}

/// One open relay's place in the limits, given back when dropped (never under the
/// table's lock).
pub(crate) struct Slot {
    table: Weak<Mutex<Table>>,
    pair: (String, String),
    token: Token,
    /// Cancelled when a newer relay of the same pair replaces this one.
    pub(crate) stop: CancellationToken,
    released: Arc<AtomicBool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(table) = self.table.upgrade() else {
            return;
        };
        let mut t = table.lock();
        if !self.released.swap(true, Ordering::AcqRel) {
            t.release(&self.pair);
        }
        if t.pairs
            .get(&self.pair)
            .is_some_and(|o| o.token == self.token)
        {
            t.pairs.remove(&self.pair);
        }
    }
}

/// The limits a new relay is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayLimits {
    pub(crate) total: usize,
    pub(crate) per_user: usize,
}

impl Table {
    /// Gives a relay's place in the counts back.
    fn release(&mut self, pair: &(String, String)) {
        self.open = self.open.saturating_sub(1);
        for user in [&pair.0, &pair.1] {
            if let Some(n) = self.per_user.get_mut(user.as_str()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(user.as_str());
                }
            }
        }
    }

    /// Takes a pending relay out, with its tokens (to be dropped after the lock).
    fn take(&mut self, opener: &Token) -> Option<Pending> {
        let pending = self.pending.remove(opener)?;
        self.sides.remove(opener);
        self.sides.remove(&pending.target);
        Some(pending)
    }

    /// Takes out the relays nobody joined in time (to be dropped after the lock).
    fn expire(&mut self, now: Instant, dropped: &mut Vec<Pending>) {
        let expired: Vec<Token> = self
            .pending
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            dropped.extend(self.take(&token));
        }
    }
}

impl Relays {
    /// Opens a relay from `a` to `b`: its two tokens, or why not (a limit). A relay `a`
    /// opened to `b` before that is still open ends once this one is admitted: the newer one
    /// replaces it.
    pub(crate) fn open(&self, a: &str, b: &str, limits: RelayLimits) -> Result<Tokens, WireError> {
        let mut dropped = Vec::new();
        let result = {
            let mut t = self.table.lock();
            let now = Instant::now();
            t.expire(now, &mut dropped);
            // One relay per direction: two peers that dial each other at once get two (the
            // nodes keep one), and a user cannot hold more than one of another's slots.
            let pair = (a.to_owned(), b.to_owned());
            // The one this replaces does not count against it.
            let replaced = t
                .pairs
                .get(&pair)
                .is_some_and(|o| !o.released.load(Ordering::Acquire));
            let discount = usize::from(replaced);
            let count = |user: &str| t.per_user.get(user).copied().unwrap_or(0) - discount;
            if t.open - discount >= limits.total {
                Err(WireError::LimitExceeded(format!(
                    "the server relays at most {} connections at once",
                    limits.total
                )))
            } else if count(a) >= limits.per_user || count(b) >= limits.per_user {
                Err(WireError::LimitExceeded(format!(
                    "at most {} relays per user at once",
                    limits.per_user
                )))
            } else {
                if let Some(old) = t.pairs.remove(&pair) {
                    // The older relay ends now, and stops counting now.
                    old.stop.cancel();
                    if !old.released.swap(true, Ordering::AcqRel) {
                        t.release(&pair);
                    }
                    dropped.extend(t.take(&old.token));
                }
                let tokens = Tokens {
                    opener: rand::random(),
                    target: rand::random(),
                };
                let stop = CancellationToken::new();
                let released = Arc::new(AtomicBool::new(false));
                t.open += 1;
                for user in [a, b] {
                    *t.per_user.entry(user.to_owned()).or_default() += 1;
                }
                t.pairs.insert(
                    pair.clone(),
                    Opened {
                        token: tokens.opener,
                        stop: stop.clone(),
                        released: released.clone(),
                    },
                );
                let slot = Slot {
                    table: Arc::downgrade(&self.table),
                    pair,
                    token: tokens.opener,
                    stop,
                    released,
                };
                t.sides.insert(tokens.opener, (tokens.opener, Side::Opener));
                t.sides.insert(tokens.target, (tokens.opener, Side::Target));
                let earlier = t.pending.insert(
                    tokens.opener,
                    Pending {
                        slot,
                        target: tokens.target,
                        expires: now + RELAY_JOIN_TIMEOUT,
                        first: None,
                    },
                );
                // 128 random bits do not repeat; were they to, the older entry would be
                // dropped after the lock, like every other.
                dropped.extend(earlier);
                Ok(tokens)
            }
        };
        drop(dropped);
        result
    }

    /// Forgets a relay that will not be joined (its offer could not be delivered, or its
    /// first side gave up waiting), by either of its tokens.
    pub(crate) fn cancel(&self, token: &Token) {
        let dropped = {
            let mut t = self.table.lock();
            match t.sides.get(token) {
                Some(&(opener, _)) => t.take(&opener),
                None => None,
            }
        };
        drop(dropped);
    }

    /// A side joins the relay `token` names.
    pub(crate) fn join(&self, token: &Token) -> Joined {
        let mut dropped = Vec::new();
        let joined = {
            let mut t = self.table.lock();
            t.expire(Instant::now(), &mut dropped);
            let Some(&(opener, side)) = t.sides.get(token) else {
                return Joined::Unknown;
            };
            match t.pending.get_mut(&opener) {
                None => Joined::Unknown,
                Some(p) => match &p.first {
                    None => {
                        let (tx, rx) = oneshot::channel();
                        p.first = Some((side, tx));
                        Joined::First(rx)
                    }
                    // That side is here already: a second connection for it joins nothing.
                    Some((first, _)) if *first == side => Joined::Unknown,
                    Some(_) => match t.take(&opener) {
                        Some(Pending {
                            slot,
                            first: Some((_, first)),
                            ..
                        }) => Joined::Second(first, slot),
                        other => {
                            dropped.extend(other);
                            Joined::Unknown
                        }
                    },
                },
            }
        };
        drop(dropped);
        joined
    }

    /// Relays open now (joined or waiting).
    pub(crate) fn open_count(&self) -> usize {
        self.table.lock().open
    }
}

/// A relay's byte budget: `bytes_per_second` for both directions together, in bursts of
/// one second's worth; `None` when unlimited.
pub(crate) fn limiter(bytes_per_second: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    NonZeroU32::new(bytes_per_second)
        .map(|rate| Arc::new(RateLimiter::direct(Quota::per_second(rate))))
}

/// Carries bytes both ways until one side ends, the relay idles for `idle`, or `stop`.
/// Returns the bytes carried.
pub(crate) async fn splice(
    a: Leg,
    b: Leg,
    bytes_per_second: u32,
    idle: Duration,
    stop: CancellationToken,
) -> u64 {
    let limiter = limiter(bytes_per_second);
    // Never read more than the budget lets through at once.
    let chunk = match bytes_per_second {
        0 => RELAY_CHUNK,
        rate => RELAY_CHUNK.min(rate as usize),
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let carried = AtomicU64::new(0);
    let ab = pump(
        a.reader,
        b.writer,
        chunk,
        limiter.clone(),
        start,
        &last,
        &carried,
    );
    let ba = pump(b.reader, a.writer, chunk, limiter, start, &last, &carried);
    let idle_watch = async {
        let every = (idle / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let quiet = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                tracing::debug!("relay idle; closed");
                return;
            }
        }
    };
    tokio::select! {
        _ = ab => {}
        _ = ba => {}
        () = idle_watch => {}
        () = stop.cancelled() => {}
    }
    carried.load(Ordering::Relaxed)
}

/// Copies `from` to `to` within the budget, noting when bytes last moved; at the end of
/// `from`, ends `to`.
async fn pump(
    mut from: Box<dyn AsyncRead + Send + Unpin>,
    mut to: Box<dyn AsyncWrite + Send + Unpin>,
    chunk: usize,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    start: Instant,
    last: &AtomicU64,
    carried: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; chunk];
    loop {
        let n = from.read(&mut buf).await?;
        let Some(cells) = NonZeroU32::new(n as u32) else {
            return to.shutdown().await;
        };
        if let Some(limiter) = &limiter {
            // `chunk` is within the burst, so this only waits.
            let _ = limiter.until_n_ready(cells).await;
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        carried.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RelayLimits = RelayLimits {
        total: 3,
        per_user: 2,
    };

    fn refused(r: Result<Tokens, WireError>) -> String {
        match r {
            Err(WireError::LimitExceeded(why)) => why,
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn relays_are_counted_per_user_and_in_total_and_given_back_when_they_end() {
        let relays = Relays::default();
        let ab = relays.open("a", "b", LIMITS).unwrap();
        relays.open("a", "c", LIMITS).unwrap();
        // a takes part in two already (as opener); as the other side too.
        assert!(refused(relays.open("a", "d", LIMITS)).contains("per user"));
        assert!(refused(relays.open("d", "a", LIMITS)).contains("per user"));
        relays.open("d", "e", LIMITS).unwrap();
        assert!(refused(relays.open("f", "g", LIMITS)).contains("at most 3"));
        assert_eq!(relays.open_count(), 3);
        // The relay a→b is joined by both sides, then ends: its place is given back.
        let Joined::First(_first) = relays.join(&ab.opener) else {
            panic!("first join")
        };
        assert!(
            matches!(relays.join(&ab.opener), Joined::Unknown),
            "the opener cannot join in the target's place"
        );
        let Joined::Second(_handoff, slot) = relays.join(&ab.target) else {
            panic!("second join")
        };
        for token in [ab.opener, ab.target] {
            assert!(
                matches!(relays.join(&token), Joined::Unknown),
                "a third join"
            );
        }
        assert_eq!(relays.open_count(), 3, "open while spliced");
        drop(slot);
        assert_eq!(relays.open_count(), 2);
        relays.open("a", "d", LIMITS).unwrap();
    }

    #[test]
    fn a_relay_refused_for_a_limit_leaves_the_one_it_would_have_replaced() {
        let relays = Relays::default();
        let limits = RelayLimits {
            total: 10,
            per_user: 1,
        };
        let ab = relays.open("a", "b", limits).unwrap();
        // a's slot is its relay to b, which a newer a→b may replace...
        let again = relays.open("a", "b", limits).unwrap();
        assert!(matches!(relays.join(&ab.opener), Joined::Unknown));
        // ...but a→c is over a's limit, and takes nothing away.
        assert!(refused(relays.open("a", "c", limits)).contains("per user"));
        assert!(matches!(relays.join(&again.opener), Joined::First(_)));
        assert_eq!(relays.open_count(), 1);
    }

    #[test]
    fn a_newer_relay_in_the_same_direction_replaces_the_older_and_the_other_direction_stays() {
        let relays = Relays::default();
        let first = relays.open("a", "b", LIMITS).unwrap();
        let back = relays.open("b", "a", LIMITS).unwrap();
        assert_eq!(relays.open_count(), 2, "one relay per direction");
        let second = relays.open("a", "b", LIMITS).unwrap();
        assert_ne!(first.opener, second.opener);
        for token in [first.opener, first.target] {
            assert!(matches!(relays.join(&token), Joined::Unknown), "replaced");
        }
        assert!(matches!(relays.join(&back.target), Joined::First(_)));
        assert!(matches!(relays.join(&second.opener), Joined::First(_)));
        assert_eq!(relays.open_count(), 2);
    }

    #[test]
    fn a_cancelled_relay_cannot_be_joined_and_frees_its_place() {
        let relays = Relays::default();
        let tokens = relays.open("a", "b", LIMITS).unwrap();
        relays.cancel(&tokens.opener);
        assert!(matches!(relays.join(&tokens.opener), Joined::Unknown));
        assert!(matches!(relays.join(&tokens.target), Joined::Unknown));
        assert_eq!(relays.open_count(), 0);
        assert!(matches!(relays.join(&rand::random()), Joined::Unknown));
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_nobody_joins_expires() {
        let relays = Relays::default();
        let tokens = relays.open("a", "b", LIMITS).unwrap();
        tokio::time::advance(RELAY_JOIN_TIMEOUT).await;
        assert!(matches!(relays.join(&tokens.target), Joined::Unknown));
        assert_eq!(relays.open_count(), 0);
    }

    #[tokio::test]
    async fn a_splice_carries_both_ways_within_the_budget_and_ends_with_either_side() {
        let (a_near, a_far) = tokio::io::duplex(1 << 16);
        let (b_near, b_far) = tokio::io::duplex(1 << 16);
        let leg = |s: tokio::io::DuplexStream| {
            let (r, w) = tokio::io::split(s);
            Leg {
                reader: Box::new(r),
                writer: Box::new(w),
            }
        };
        // 64 KiB/s: 96 KiB takes at least half a second after the first second's burst.
        let spliced = tokio::spawn(splice(
            leg(a_far),
            leg(b_far),
            64 << 10,
            Duration::from_secs(30),
            CancellationToken::new(),
        ));
        let (mut a, mut b) = (a_near, b_near);
        let data = vec![7u8; 96 << 10];
        let started = Instant::now();
        let (_, got) = tokio::join!(async { a.write_all(&data).await.unwrap() }, async {
            let mut got = vec![0u8; data.len()];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        assert_eq!(got, data);
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "the budget held ({:?})",
            started.elapsed()
        );
        b.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        a.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "b sees the end");
        assert_eq!(spliced.await.unwrap(), (96 << 10) + 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_splice_ends() {
        let (_a, a_far) = tokio::io::duplex(64);
        let (_b, b_far) = tokio::io::duplex(64);
        let leg = |s: tokio::io::DuplexStream| {
            let (r, w) = tokio::io::split(s);
            Leg {
                reader: Box::new(r),
                writer: Box::new(w),
            }
        };
        let carried = splice(
            leg(a_far),
            leg(b_far),
            0,
            Duration::from_secs(60),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(carried, 0);
    }
}
