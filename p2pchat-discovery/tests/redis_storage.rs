//! `RedisStorage` beyond the shared storage suite, each test on its own `redis-server`:
//! several instances on one Redis (claims, the presence feed, sweeping once), listing with
//! stale entries, key prefixes, corrupt data, a Redis kill and restart, and dropping.

// Helpers outside `#[test]` functions too: in tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use p2pchat_core::testing::RedisServer;
use p2pchat_core::{Identity, PublicKey};
use p2pchat_discovery::storage::{Lease, PresenceChange, SessionId};
use p2pchat_discovery::{RedisStorage, Storage, StorageError};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

const WAIT: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(3600);

fn key() -> PublicKey {
    Identity::generate().public_key()
}

fn lease(username: &str, key: PublicKey) -> Lease {
    Lease {
        username: username.to_owned(),
        public_key: key,
        addrs: vec!["127.0.0.1:4000".parse().unwrap()],
        session: SessionId::random(),
    }
}

async fn next(rx: &mut broadcast::Receiver<PresenceChange>) -> PresenceChange {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a presence change within 10 s")
        .expect("the feed is open")
}

/// Nothing more arrives within a short while.
async fn quiet(rx: &mut broadcast::Receiver<PresenceChange>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
}

fn online(username: &str, session: SessionId) -> PresenceChange {
    PresenceChange::Online {
        username: username.to_owned(),
        session,
    }
}

fn offline(username: &str) -> PresenceChange {
    PresenceChange::Offline {
        username: username.to_owned(),
    }
}

#[tokio::test]
async fn claims_are_bound_to_keys_and_lapse() {
    let redis = RedisServer::start();
    let storage = RedisStorage::connect(&redis.url()).await.unwrap();
    let (a, b) = (key(), key());

    assert!(storage.claim_of("alice").await.unwrap().is_none());
    let before = SystemTime::now() - Duration::from_secs(1);
    storage.claim("alice", &a, LONG).await.unwrap();
    let claim = storage.claim_of("alice").await.unwrap().unwrap();
    assert_eq!(claim.public_key, a);
    assert!(
        claim.last_seen >= before && claim.last_seen <= SystemTime::now() + Duration::from_secs(1)
    );

    // Renewing by the owner is fine (and writes nothing within the touch interval).
    storage.claim("alice", &a, LONG).await.unwrap();
    assert_eq!(storage.claim_of("alice").await.unwrap().unwrap(), claim);

    // Another key: taken while not lapsed.
    let err = storage.claim("alice", &b, LONG).await.unwrap_err();
    assert!(
        matches!(err, StorageError::NameTaken(ref n) if n == "alice"),
        "{err:?}"
    );

    // Touch by a non-owner changes nothing; by the owner moves last_seen.
    tokio::time::sleep(Duration::from_millis(20)).await;
    storage.touch("alice", &b).await.unwrap();
    assert_eq!(storage.claim_of("alice").await.unwrap().unwrap(), claim);
    storage.touch("alice", &a).await.unwrap();
    let touched = storage.claim_of("alice").await.unwrap().unwrap();
    assert_eq!(touched.public_key, a);
    assert!(touched.last_seen > claim.last_seen);

    // Lapsed and owner offline: another key takes it.
    tokio::time::sleep(Duration::from_millis(60)).await;
    storage
        .claim("alice", &b, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(
        storage.claim_of("alice").await.unwrap().unwrap().public_key,
        b
    );

    // Lapsed but the owner is online: taken.
    let l = lease("alice", b);
    storage.set_online(&l, LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let err = storage
        .claim("alice", &a, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NameTaken(_)), "{err:?}");
    // A lapse of zero: taken over at once once the owner is gone.
    assert!(storage.set_offline("alice", l.session).await.unwrap());
    storage.claim("alice", &a, Duration::ZERO).await.unwrap();
    assert_eq!(
        storage.claim_of("alice").await.unwrap().unwrap().public_key,
        a
    );
}

#[tokio::test]
async fn racing_claims_have_one_winner() {
    let redis = RedisServer::start();
    let one = RedisStorage::connect(&redis.url()).await.unwrap();
    let two = RedisStorage::connect(&redis.url()).await.unwrap();
    for round in 0..20 {
        let name = format!("race{round}");
        let (a, b) = (key(), key());
        let (x, y) = tokio::join!(one.claim(&name, &a, LONG), two.claim(&name, &b, LONG));
        assert!(x.is_ok() != y.is_ok(), "exactly one wins: {x:?} {y:?}");
        let winner = if x.is_ok() { a } else { b };
        assert_eq!(
            one.claim_of(&name).await.unwrap().unwrap().public_key,
            winner
        );
    }
}

#[tokio::test]
async fn presence_and_feed_across_instances() {
    let redis = RedisServer::start();
    let one = RedisStorage::connect(&redis.url()).await.unwrap();
    let two = RedisStorage::connect(&redis.url()).await.unwrap();
    let (mut feed1, mut feed2) = (one.presence_changes(), two.presence_changes());
    let k = key();

    let first = lease("bob", k);
    one.set_online(&first, LONG).await.unwrap();
    assert_eq!(next(&mut feed1).await, online("bob", first.session));
    assert_eq!(next(&mut feed2).await, online("bob", first.session));
    assert_eq!(two.online("bob").await.unwrap(), Some(first.clone()));

    assert!(one.refresh("bob", first.session, LONG).await.unwrap());
    assert!(!one.refresh("bob", SessionId::random(), LONG).await.unwrap());
    assert!(!one.set_offline("bob", SessionId::random()).await.unwrap());
    assert!(!one.refresh("nobody", first.session, LONG).await.unwrap());

    // Another session replaces the first; the old one can no longer touch it.
    let second = lease("bob", k);
    two.set_online(&second, LONG).await.unwrap();
    assert_eq!(next(&mut feed1).await, online("bob", second.session));
    assert_eq!(next(&mut feed2).await, online("bob", second.session));
    assert!(!one.refresh("bob", first.session, LONG).await.unwrap());
    assert!(!one.set_offline("bob", first.session).await.unwrap());
    assert_eq!(one.online("bob").await.unwrap(), Some(second.clone()));

    assert!(one.set_offline("bob", second.session).await.unwrap());
    assert_eq!(next(&mut feed1).await, offline("bob"));
    assert_eq!(next(&mut feed2).await, offline("bob"));
    assert_eq!(one.online("bob").await.unwrap(), None);
    assert!(!one.set_offline("bob", second.session).await.unwrap());
    quiet(&mut feed1).await;
    quiet(&mut feed2).await;
}

#[tokio::test]
async fn expiry_is_swept_once() {
    let redis = RedisServer::start();
    let one = RedisStorage::connect(&redis.url()).await.unwrap();
    let two = RedisStorage::connect(&redis.url()).await.unwrap();
    let mut feed = one.presence_changes();

    let short = lease("carol", key());
    let kept = lease("dave", key());
    one.set_online(&short, Duration::from_millis(200))
        .await
        .unwrap();
    one.set_online(&kept, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(next(&mut feed).await, online("carol", short.session));
    assert_eq!(next(&mut feed).await, online("dave", kept.session));

    // Not expired yet: sweeping changes nothing.
    one.sweep().await.unwrap();
    quiet(&mut feed).await;
    assert!(
        one.online("carol").await.unwrap().is_none(),
        "expired after 300 ms"
    );
    // Expired leases cannot be refreshed back to life.
    assert!(!one.refresh("dave", kept.session, LONG).await.unwrap());
    assert!(one.online("dave").await.unwrap().is_none());

    // Both instances sweep concurrently; each expiry is published once.
    let (x, y) = tokio::join!(one.sweep(), two.sweep());
    x.unwrap();
    y.unwrap();
    let mut gone = vec![next(&mut feed).await, next(&mut feed).await];
    gone.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(gone, vec![offline("carol"), offline("dave")]);
    quiet(&mut feed).await;
    one.sweep().await.unwrap();
    quiet(&mut feed).await;

    // A refreshed lease survives past its first ttl.
    let eve = lease("eve", key());
    one.set_online(&eve, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(next(&mut feed).await, online("eve", eve.session));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            one.refresh("eve", eve.session, Duration::from_millis(300))
                .await
                .unwrap()
        );
        one.sweep().await.unwrap();
    }
    assert_eq!(one.online("eve").await.unwrap(), Some(eve));
    quiet(&mut feed).await;
}

#[tokio::test]
async fn listing_pages_skip_expired() {
    let redis = RedisServer::start();
    let storage = RedisStorage::connect(&redis.url()).await.unwrap();
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    for name in names {
        // b, d and e expire quickly and are not swept.
        let ttl = if matches!(name, "b" | "d" | "e") {
            Duration::from_millis(50)
        } else {
            LONG
        };
        storage.set_online(&lease(name, key()), ttl).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let names_of = |leases: Vec<Lease>| leases.into_iter().map(|l| l.username).collect::<Vec<_>>();

    assert_eq!(
        names_of(storage.list_online(None, 100).await.unwrap()),
        ["a", "c", "f", "g"]
    );
    assert_eq!(
        names_of(storage.list_online(None, 2).await.unwrap()),
        ["a", "c"]
    );
    assert_eq!(
        names_of(storage.list_online(Some("c"), 2).await.unwrap()),
        ["f", "g"]
    );
    assert_eq!(
        names_of(storage.list_online(Some("a"), 1).await.unwrap()),
        ["c"]
    );
    assert_eq!(
        names_of(storage.list_online(Some("g"), 5).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names_of(storage.list_online(Some("0"), 0).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names_of(storage.list_online(Some("bb"), 3).await.unwrap()),
        ["c", "f", "g"]
    );

    storage.sweep().await.unwrap();
    assert_eq!(
        names_of(storage.list_online(None, 100).await.unwrap()),
        ["a", "c", "f", "g"]
    );
}

#[tokio::test]
async fn prefixes_are_separate() {
    let redis = RedisServer::start();
    let one = RedisStorage::connect_with_prefix(&redis.url(), "one")
        .await
        .unwrap();
    let two = RedisStorage::connect_with_prefix(&redis.url(), "two")
        .await
        .unwrap();
    let mut feed2 = two.presence_changes();
    one.claim("frank", &key(), LONG).await.unwrap();
    two.claim("frank", &key(), LONG).await.unwrap();
    one.set_online(&lease("frank", key()), LONG).await.unwrap();
    assert!(two.online("frank").await.unwrap().is_none());
    quiet(&mut feed2).await;
}

#[tokio::test]
async fn corrupt_data_is_reported() {
    let redis = RedisServer::start();
    let storage = RedisStorage::connect(&redis.url()).await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HSET")
        .arg("p2pchat:claim:mallory")
        .arg("key")
        .arg("zz")
        .arg("seen")
        .arg(1)
        .exec_async(&mut conn)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg("p2pchat:presence:mallory")
        .arg("lease")
        .arg("{")
        .exec_async(&mut conn)
        .await
        .unwrap();
    let err = storage.claim_of("mallory").await.unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
    let err = storage.online("mallory").await.unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut redis = RedisServer::start_with_appendonly();
    let one = RedisStorage::connect(&redis.url()).await.unwrap();
    let two = RedisStorage::connect(&redis.url()).await.unwrap();
    let mut feed1 = one.presence_changes();
    let k = key();
    one.claim("grace", &k, LONG).await.unwrap();
    let claim = one.claim_of("grace").await.unwrap();

    redis.kill();
    let started = tokio::time::Instant::now();
    let err = one.claim_of("grace").await.unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    eprintln!("failed after {:?} while Redis was down", started.elapsed());
    // Later requests wait for the reconnection attempts, then fail too.
    let started = tokio::time::Instant::now();
    let err = one.claim_of("grace").await.unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    eprintln!("failed after {:?} while Redis was down", started.elapsed());
    assert!(matches!(err, StorageError::Unavailable(_)), "{err:?}");
    redis.restart();

    // The claim came back from the append-only file; requests work again without help.
    let deadline = tokio::time::Instant::now() + WAIT;
    let back = loop {
        match one.claim_of("grace").await {
            Ok(back) => break back,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("still reconnecting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not reconnected after {WAIT:?}: {e}"),
        }
    };
    assert_eq!(back, claim);

    // The subscription is back too (without `two` making any request first, `one`'s feed
    // task has to reconnect on its own): a change made through `two` reaches `one`.
    let deadline = tokio::time::Instant::now() + WAIT;
    let l = lease("grace", k);
    loop {
        match two.set_online(&l, LONG).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("two still reconnecting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("two not reconnected after {WAIT:?}: {e}"),
        }
    }
    assert_eq!(next(&mut feed1).await, online("grace", l.session));
}

#[tokio::test]
async fn feed_resubscribes_without_requests() {
    let mut redis = RedisServer::start();
    let watcher = RedisStorage::connect(&redis.url()).await.unwrap();
    let mut feed = watcher.presence_changes();
    redis.kill();
    // Long enough for the connection manager's own reconnection attempts to give up.
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.restart();
    // The watcher makes no request at all; its feed must come back by itself. Changes
    // published before it is back are lost, so keep publishing until one arrives.
    let writer = RedisStorage::connect(&redis.url()).await.unwrap();
    let restarted = tokio::time::Instant::now();
    let deadline = restarted + WAIT;
    loop {
        let l = lease("heidi", key());
        writer.set_online(&l, LONG).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(200), feed.recv()).await {
            Ok(change) => {
                assert_eq!(change.unwrap(), online("heidi", l.session));
                break;
            }
            Err(_) if tokio::time::Instant::now() < deadline => {}
            Err(_) => panic!("the feed did not come back within {WAIT:?} of the restart"),
        }
    }
    eprintln!("feed back {:?} after the restart", restarted.elapsed());
}

#[tokio::test]
async fn dropping_the_storage_closes_the_feed() {
    let redis = RedisServer::start();
    let storage = RedisStorage::connect(&redis.url()).await.unwrap();
    let mut feed = storage.presence_changes();
    drop(storage);
    let end = tokio::time::timeout(WAIT, feed.recv())
        .await
        .expect("the feed ends");
    assert_eq!(end, Err(RecvError::Closed));
}
