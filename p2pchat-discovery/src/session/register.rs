//! Registration: the challenge, the signed claim, the name's key, the presence lease.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use p2pchat_core::PublicKey;
use p2pchat_core::limits::limit_key;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, MAX_ANNOUNCED_ADDRS, Push, Registered, ServerFrame, WireError,
    probe_transcript, register_reachable_transcript, register_transcript,
};
use p2pchat_core::protocol::{FrameCodec, NONCE_LEN, PeerFrame, validate_username};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::connection::{Reader, Writer, decode_error};
use super::{Opening, Session, announce};
use crate::config::SESSION_PUSH_CAPACITY;
use crate::directory::Directory;
use crate::mail::storage_error;
use crate::storage::{Lease, SessionId};

/// Challenge, verify, claim, go online (or relay an announcement). `Err(None)`: the
/// connection failed, say nothing.
pub(super) async fn apply<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    directory: &Arc<Directory>,
    reader: &mut Reader<R>,
    writer: &mut Writer<W>,
    peer: SocketAddr,
) -> Result<Opening, Option<WireError>> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    writer
        .send(&ServerFrame::Challenge { nonce })
        .await
        .map_err(|_| None)?;
    // The claim, its signature, and (from nodes that take part in reachability) whether
    // the node says it can be dialed.
    let (claim, signature, reach): (Claim, [u8; 64], Option<bool>) = match reader.next().await {
        Some(Ok(ClientFrame::Register(request))) => (request.claim, request.signature, None),
        Some(Ok(ClientFrame::RegisterReachable(request))) => {
            (request.claim, request.signature, Some(request.dialable))
        }
        Some(Ok(ClientFrame::Announce(announcement))) => {
            return announce::apply(directory, writer, &announcement).await;
        }
        Some(Ok(ClientFrame::RelayJoin { token })) => return Ok(Opening::Relay(token)),
        Some(Ok(_)) => {
            return Err(Some(WireError::BadFrame(
                "the first frame must be a registration".into(),
            )));
        }
        Some(Err(e)) => return Err(decode_error(e)),
        None => return Err(None),
    };
    if !directory.registrations.allow(&limit_key(peer.ip())) {
        return Err(Some(WireError::RateLimited));
    }
    let claim = &claim;
    validate_username(&claim.username)
        .map_err(|_| Some(WireError::InvalidUsername(claim.username.clone())))?;
    if claim.announce.len() > MAX_ANNOUNCED_ADDRS {
        return Err(Some(WireError::LimitExceeded(format!(
            "at most {MAX_ANNOUNCED_ADDRS} announced addresses"
        ))));
    }
    let transcript = match reach {
        None => register_transcript(&nonce, claim),
        Some(dialable) => register_reachable_transcript(&nonce, claim, dialable),
    };
    if !claim.public_key.verify(&transcript, &signature) {
        return Err(Some(WireError::BadSignature));
    }
    let storage = &directory.storage;
    let config = &directory.config;
    // A name that is not this key's yet costs one of the address's new claims per hour;
    // renewing one's own claim costs nothing.
    if config.new_claims_per_hour_per_ip > 0 {
        let current = storage
            .claim_of(&claim.username)
            .await
            .map_err(|e| Some(storage_error(e)))?;
        let renewal = current.is_some_and(|c| c.public_key == claim.public_key);
        if !renewal && !directory.new_claims.allow(&limit_key(peer.ip())) {
            return Err(Some(WireError::LimitExceeded(format!(
                "at most {} new names per hour from one address",
                config.new_claims_per_hour_per_ip
            ))));
        }
    }
    storage
        .claim(&claim.username, &claim.public_key, config.claim_lapse)
        .await
        .map_err(|e| Some(storage_error(e)))?;
    let addrs = if claim.announce.is_empty() {
        vec![SocketAddr::new(peer.ip(), claim.listen_port)]
    } else {
        claim.announce.clone()
    };
    // Only addresses other nodes may be sent to dial (and the probe to try).
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| {
            let ok = publishable(*a, peer.ip());
            if !ok {
                tracing::debug!(addr = %a, observed = %peer.ip(), "not published");
            }
            ok
        })
        .collect();
    // A node that takes part in reachability is published only at the addresses where the
    // probe reached it (none if it says it cannot be dialed); an older node, as it says.
    let addrs = match reach {
        None => addrs,
        Some(false) => Vec::new(),
        Some(true) if config.probe_timeout.is_zero() => addrs,
        Some(true) => {
            let limit = config.probe_timeout;
            probe(&directory.probes, &addrs, &claim.public_key, limit).await
        }
    };
    let lease = Lease {
        username: claim.username.clone(),
        public_key: claim.public_key,
        addrs: addrs.clone(),
        session: SessionId::random(),
    };
    storage
        .set_online(&lease, config.presence_ttl)
        .await
        .map_err(|e| Some(storage_error(e)))?;
    let mail = directory
        .mail
        .subscribe(&lease.username)
        .await
        .map_err(Some)?;
    let (pushes, push_rx) = mpsc::channel(SESSION_PUSH_CAPACITY);
    let check = directory.add_session(
        &lease.username,
        lease.session,
        pushes.clone(),
        reach.is_some(),
    );
    let session = Session {
        directory: directory.clone(),
        lease,
        since: Instant::now(),
        check,
        pushes,
        push_rx,
        watching: HashSet::new(),
        handed_out: Vec::new(),
        probed: reach == Some(true) && !config.probe_timeout.is_zero(),
        peer: limit_key(peer.ip()),
        lookups: None,
    };
    let confirmation = ServerFrame::Registered(Box::new(Registered {
        observed: peer,
        addrs,
        presence_ttl_ms: config.presence_ttl.as_millis() as u64,
        operator_key: directory.operator_key,
    }));
    let mut sent = writer.send(&confirmation).await;
    if reach.is_some() && sent.is_ok() {
        let dialable = !session.lease.addrs.is_empty();
        sent = writer
            .send(&ServerFrame::Push(Push::Reachability { dialable }))
            .await;
    }
    if sent.is_err() {
        session.end(false).await;
        return Err(None);
    }
    tracing::debug!(user = %session.lease.username, "registered");
    Ok(Opening::Session(Box::new(session), mail))
}

/// The addresses among `addrs` where the node holding `key` answers the probe within
/// `limit`, tried at once (each holding one of the server's `probes` permits).
async fn probe(
    probes: &tokio::sync::Semaphore,
    addrs: &[SocketAddr],
    key: &PublicKey,
    limit: Duration,
) -> Vec<SocketAddr> {
    let mut unique = addrs.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let tries = unique.into_iter().map(|addr| async move {
        let reached = tokio::time::timeout(limit, async {
            let Ok(_permit) = probes.acquire().await else {
                return false;
            };
            probe_one(addr, key).await
        })
        .await
        .unwrap_or(false);
        tracing::debug!(%addr, reached, "reachability probe");
        reached.then_some(addr)
    });
    futures::future::join_all(tries)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Dials `addr`, sends a fresh nonce, and checks the answer is signed by `key`.
async fn probe_one(addr: SocketAddr, key: &PublicKey) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, FrameCodec::<PeerFrame>::default());
    let nonce: [u8; NONCE_LEN] = rand::random();
    if futures::SinkExt::send(&mut framed, PeerFrame::Probe { nonce })
        .await
        .is_err()
    {
        return false;
    }
    match framed.next().await {
        Some(Ok(PeerFrame::ProbeOk { signature })) => {
            key.verify(&probe_transcript(&nonce), &signature)
        }
        _ => false,
    }
}

/// Whether `addr` may be published for a node the server sees connecting from `observed`:
/// a real port on a unicast address; a loopback address only for a node connecting over
/// loopback; a private or link-local one (IPv4 10/8, 172.16/12, 192.168/16, 169.254/16,
/// 100.64/10; IPv6 fc00::/7, fe80::/10) only for a node the server sees on a loopback or
/// private address itself. So a registration cannot offer remote peers targets inside
/// their own networks (a database port, an SSH daemon) that are not where its node is.
pub(crate) fn publishable(addr: SocketAddr, observed: IpAddr) -> bool {
    let ip = addr.ip().to_canonical();
    let observed = observed.to_canonical();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return false;
    }
    if ip.is_loopback() {
        return observed.is_loopback();
    }
    if is_local(ip) {
        return observed.is_loopback() || is_local(observed);
    }
    true
}

/// A private, shared (CGNAT) or link-local address.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || v4.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(addr: &str, observed: &str) -> bool {
        publishable(addr.parse().unwrap(), observed.parse().unwrap())
    }

    #[test]
    fn public_addresses_are_published_from_anywhere() {
        for observed in ["203.0.113.9", "10.1.2.3", "127.0.0.1", "2001:db8::1"] {
            assert!(ok("198.51.100.7:6000", observed), "{observed}");
            assert!(ok("[2001:db8::7]:6000", observed), "{observed}");
        }
    }

    #[test]
    fn loopback_only_for_a_node_on_loopback() {
        assert!(ok("127.0.0.1:22", "127.0.0.1"));
        assert!(ok("[::1]:22", "::1"));
        assert!(ok("127.0.0.1:22", "::ffff:127.0.0.1"));
        assert!(!ok("127.0.0.1:22", "203.0.113.9"));
        assert!(!ok("127.0.0.1:22", "10.0.0.9"));
        assert!(!ok("[::1]:22", "2001:db8::1"));
        assert!(!ok("[::ffff:127.0.0.1]:22", "203.0.113.9"));
    }

    #[test]
    fn private_and_link_local_only_for_a_node_on_a_local_network() {
        for target in [
            "10.0.0.5:6379",
            "172.16.3.4:5432",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "[fd00::5]:6379",
            "[fe80::1]:22",
        ] {
            assert!(!ok(target, "203.0.113.9"), "{target} from a public address");
            assert!(!ok(target, "2001:db8::1"), "{target} from a public address");
            assert!(ok(target, "10.9.9.9"), "{target} from a private address");
            assert!(ok(target, "127.0.0.1"), "{target} from loopback");
        }
        assert!(ok("172.32.0.1:80", "203.0.113.9"), "just outside 172.16/12");
        assert!(
            ok("100.128.0.1:80", "203.0.113.9"),
            "just outside 100.64/10"
        );
    }

    #[test]
    fn no_port_zero_unspecified_multicast_or_broadcast() {
        for target in [
            "198.51.100.7:0",
            "0.0.0.0:6000",
            "[::]:6000",
            "224.0.0.1:6000",
            "[ff02::1]:6000",
            "255.255.255.255:6000",
        ] {
            assert!(!ok(target, "127.0.0.1"), "{target}");
        }
    }
}
