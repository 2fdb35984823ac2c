//! Caps on connections, in total and per address: used by a node for the peer handshakes
//! it accepts, and by the discovery server for its sessions.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// The address a per-address limit counts: an IPv4 address as it is, an IPv6 address by its
/// /64 prefix (one subscriber usually holds a whole /64, so single IPv6 addresses would make
/// the limits meaningless), an IPv4-mapped IPv6 address as its IPv4 address.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Counts open connections; a [`ConnectionPermit`] gives its slot back when dropped.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    /// The per-address cap applies once this many slots are taken in all.
    per_ip_from: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The total cap (the number given) is reached.
    Total(usize),
    /// The cap per address (the number given) is reached for this address.
    PerIp(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total(n) => write!(f, "the maximum of {n} connections is reached"),
            Refused::PerIp(n) => write!(f, "at most {n} connections from one address"),
        }
    }
}

impl ConnectionLimits {
    /// Caps of `max_total` connections in all and `max_per_ip` per address ([`limit_key`]).
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Self::under_pressure(max_total, max_per_ip, 0)
    }

    /// Like [`Self::new`], but the per-address cap applies only once `from_total` slots are
    /// taken in all: many connections from one address (peers behind one NAT, or every test
    /// node on one host) are served while there is room, and a flood from one address still
    /// leaves `max_total - from_total` slots to the others.
    pub fn under_pressure(max_total: usize, max_per_ip: usize, from_total: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            per_ip_from: from_total,
            open: Mutex::new(Open::default()),
        })
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock()
    }

    /// Takes a slot for a connection from `ip`, or says which cap is reached. Never waits.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        let ip = limit_key(ip);
        let mut open = self.open();
        if open.total >= self.max_total {
            return Err(Refused::Total(self.max_total));
        }
        let pressed = open.total >= self.per_ip_from;
        let from_ip = open.per_ip.entry(ip).or_default();
        if pressed && *from_ip >= self.max_per_ip {
            return Err(Refused::PerIp(self.max_per_ip));
        }
        *from_ip += 1;
        open.total += 1;
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open().total
    }
}

/// One open connection's slot, given back when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_pressure_the_per_address_cap_applies_only_past_the_threshold() {
        let limits = ConnectionLimits::under_pressure(6, 2, 4);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..4).map(|_| limits.try_acquire(a).unwrap()).collect();
        assert_eq!(limits.try_acquire(a).unwrap_err(), Refused::PerIp(2));
        let _b1 = limits.try_acquire(b).expect("others still get in");
        let _b2 = limits.try_acquire(b).unwrap();
        assert_eq!(limits.try_acquire(b).unwrap_err(), Refused::Total(6));
        drop(held);
        let _a = limits.try_acquire(a).expect("room again");
    }

    #[test]
    fn connection_slots_are_counted_and_given_back() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limits.try_acquire(a).unwrap();
        let _p2 = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).unwrap_err(), Refused::PerIp(2));
        let _p3 = limits.try_acquire(b).unwrap();
        assert_eq!(limits.try_acquire(b).unwrap_err(), Refused::Total(3));
        drop(p1);
        assert_eq!(limits.open_connections(), 2);
        let _p4 = limits.try_acquire(a).expect("a slot was given back");
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_bit_prefix() {
        let limits = ConnectionLimits::new(10, 2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:1234".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _p1 = limits.try_acquire(a).unwrap();
        let _p2 = limits.try_acquire(b).unwrap();
        assert_eq!(
            limits
                .try_acquire("2001:db8::99".parse().unwrap())
                .unwrap_err(),
            Refused::PerIp(2),
            "one /64 is one address"
        );
        let _p3 = limits.try_acquire(other).expect("another /64");
        assert_eq!(
            limit_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
