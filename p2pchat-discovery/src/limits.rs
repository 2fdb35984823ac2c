//! The per-address registration rate and the per-user deposit rate. The connection caps are
//! [`p2pchat_core::limits`], shared with the node.

use std::hash::Hash;
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A rate per key (registrations per IP address, deposits per user), with bursts.
pub(crate) struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedRate<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRate")
            .field("limited", &self.limiter.is_some())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    /// `per_second == 0` means unlimited; the burst is at least the rate.
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate).max(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { limiter }
    }

    /// `per_hour == 0` means unlimited; bursts of `per_hour`.
    pub(crate) fn per_hour(per_hour: u32) -> Self {
        let limiter = NonZeroU32::new(per_hour).map(|n| RateLimiter::keyed(Quota::per_hour(n)));
        Self { limiter }
    }

    /// Takes one from `key`'s allowance; `false` when it is spent.
    pub(crate) fn allow(&self, key: &K) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|l| l.check_key(key).is_ok())
    }

    /// Forgets addresses whose allowance is full again (bounds the limiter's memory).
    pub(crate) fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn rates_are_limited_per_key_with_bursts() {
        let rate = KeyedRate::new(5, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let allowed = (0..100).filter(|_| rate.allow(&a)).count();
        assert!((10..=11).contains(&allowed), "a burst of 10, got {allowed}");
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(rate.allow(&b), "other keys unaffected");
        let unlimited = KeyedRate::new(0, 0);
        assert!((0..1000).all(|_| unlimited.allow(&a)));
    }
}
