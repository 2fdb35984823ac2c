//! The shared `Discovery` conformance suite through the real client and server, and the
//! `Storage` conformance suite, each on redb and on Redis.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use p2pchat_core::Identity;
use p2pchat_core::discovery::MAX_PAGE_SIZE;
use p2pchat_core::testing::discovery_conformance;
use p2pchat_discovery::Storage;
use p2pchat_discovery::storage::{Lease, PresenceChange, SessionId, StorageError};
use tokio::sync::broadcast;

use super::util::*;

#[tokio::test]
async fn client_and_server_on_redb_pass_the_discovery_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let client = server.client();
    discovery_conformance(|| async { client.clone() }, TTL).await;
    server.stop().await;
}

#[tokio::test]
async fn client_and_server_on_redis_pass_the_discovery_suite() {
    let redis = redis();
    let server = TestServer::start(fast_config(), redis_storage(&redis.url()).await).await;
    let client = server.client();
    discovery_conformance(|| async { client.clone() }, TTL).await;
    server.stop().await;
}

#[tokio::test]
async fn redb_storage_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    storage_conformance(redb(dir.path())).await;
}

#[tokio::test]
async fn redis_storage_passes_the_storage_suite() {
    let redis = redis();
    storage_conformance(redis_storage(&redis.url()).await).await;
}

#[tokio::test]
async fn ten_thousand_online_users_are_listed_page_by_page_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    listing_of_ten_thousand(redb(dir.path())).await;
}

#[tokio::test]
async fn ten_thousand_online_users_are_listed_page_by_page_on_redis() {
    let redis = redis();
    listing_of_ten_thousand(redis_storage(&redis.url()).await).await;
}

fn lease(name: &str, key: &Identity, session: SessionId) -> Lease {
    Lease {
        username: name.to_owned(),
        public_key: key.public_key(),
        addrs: vec!["127.0.0.1:7000".parse().unwrap()],
        session,
    }
}

async fn next_change(feed: &mut broadcast::Receiver<PresenceChange>) -> PresenceChange {
    tokio::time::timeout(WAIT, feed.recv())
        .await
        .expect("a presence change in time")
        .expect("feed open")
}

/// Every online user is listed once, in order, through the real wire (the original
/// truncated its reply at 4 KiB, about 160 users).
async fn listing_of_ten_thousand(storage: Arc<dyn Storage>) {
    const USERS: usize = 10_000;
    let key = Identity::generate();
    let long = Duration::from_secs(600);
    let mut config = fast_config();
    config.presence_ttl = long;
    config.idle_timeout = long;
    for i in 0..USERS {
        storage
            .set_online(&lease(&format!("u{i:05}"), &key, SessionId::random()), long)
            .await
            .unwrap();
    }
    let server = TestServer::start(config, storage).await;
    let (session, _rx) = register(&server.client(), &Identity::generate(), "zz-lister").await;
    let mut names = Vec::new();
    let mut after = None;
    loop {
        let page = session
            .list_online(after.take(), MAX_PAGE_SIZE)
            .await
            .unwrap();
        assert!(page.users.len() <= MAX_PAGE_SIZE);
        names.extend(page.users.into_iter().map(|u| u.username));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..USERS)
        .map(|i| format!("u{i:05}"))
        .chain(["zz-lister".to_owned()])
        .collect();
    assert_eq!(names, expected, "every user once, in name order");
    server.stop().await;
}

/// The `Storage` contract, on any backend.
async fn storage_conformance(s: Arc<dyn Storage>) {
    let hour = Duration::from_secs(3600);
    let (k1, k2) = (Identity::generate(), Identity::generate());

    // Claims.
    s.claim("carol", &k1.public_key(), hour).await.unwrap();
    assert_eq!(
        s.claim_of("carol").await.unwrap().map(|c| c.public_key),
        Some(k1.public_key())
    );
    assert_eq!(s.claim_of("nobody").await.unwrap(), None);
    s.claim("carol", &k1.public_key(), hour)
        .await
        .expect("the owner claims again");
    assert!(matches!(
        s.claim("carol", &k2.public_key(), hour).await,
        Err(StorageError::NameTaken(name)) if name == "carol"
    ));
    s.touch("carol", &k2.public_key()).await.unwrap();
    assert_eq!(
        s.claim_of("carol").await.unwrap().map(|c| c.public_key),
        Some(k1.public_key()),
        "touch by another key changes nothing"
    );
    // A lapsed claim of an offline owner may be taken; an online owner's may not.
    s.claim("carol", &k2.public_key(), Duration::ZERO)
        .await
        .expect("lapsed claim is taken");
    assert_eq!(
        s.claim_of("carol").await.unwrap().map(|c| c.public_key),
        Some(k2.public_key())
    );
    let mut feed = s.presence_changes();
    let carol = lease("carol", &k2, SessionId::random());
    s.set_online(&carol, hour).await.unwrap();
    assert_eq!(
        next_change(&mut feed).await,
        PresenceChange::Online {
            username: "carol".into(),
            session: carol.session
        }
    );
    assert!(matches!(
        s.claim("carol", &k1.public_key(), Duration::ZERO).await,
        Err(StorageError::NameTaken(_))
    ));

    // Racing claims of a free name: exactly one wins.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            let key = Identity::generate().public_key();
            tokio::spawn(async move { s.claim("race", &key, hour).await.is_ok() })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += usize::from(r.await.unwrap());
    }
    assert_eq!(winners, 1, "one claim wins a race");

    // Leases: only the holder refreshes or ends one; a new session replaces it.
    assert_eq!(s.online("carol").await.unwrap(), Some(carol.clone()));
    assert!(s.refresh("carol", carol.session, hour).await.unwrap());
    let other = SessionId::random();
    assert!(!s.refresh("carol", other, hour).await.unwrap());
    assert!(!s.set_offline("carol", other).await.unwrap());
    let carol2 = lease("carol", &k2, SessionId::random());
    s.set_online(&carol2, hour).await.unwrap();
    assert_eq!(
        next_change(&mut feed).await,
        PresenceChange::Online {
            username: "carol".into(),
            session: carol2.session
        }
    );
    assert!(!s.set_offline("carol", carol.session).await.unwrap());
    assert_eq!(s.online("carol").await.unwrap(), Some(carol2.clone()));
    assert!(s.set_offline("carol", carol2.session).await.unwrap());
    assert_eq!(
        next_change(&mut feed).await,
        PresenceChange::Offline {
            username: "carol".into()
        }
    );
    assert_eq!(s.online("carol").await.unwrap(), None);

    // Expiry: a lease not refreshed goes offline, published once by the sweep.
    let dave = lease("dave", &k1, SessionId::random());
    s.set_online(&dave, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(matches!(
        next_change(&mut feed).await,
        PresenceChange::Online { .. }
    ));
    let sweeper = {
        let s = s.clone();
        tokio::spawn(async move {
            loop {
                s.sweep().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    assert_eq!(
        next_change(&mut feed).await,
        PresenceChange::Offline {
            username: "dave".into()
        }
    );
    sweeper.abort();
    assert_eq!(s.online("dave").await.unwrap(), None);
    assert!(!s.refresh("dave", dave.session, hour).await.unwrap());
    s.sweep().await.unwrap();
    assert!(feed.try_recv().is_err(), "an expiry is published once");

    // Reviving an expired lease works only while nobody else holds the name.
    assert!(s.revive(&dave, hour).await.unwrap(), "dave comes back");
    assert!(matches!(
        next_change(&mut feed).await,
        PresenceChange::Online { .. }
    ));
    let dave2 = lease("dave", &k1, SessionId::random());
    s.set_online(&dave2, hour).await.unwrap();
    assert!(matches!(
        next_change(&mut feed).await,
        PresenceChange::Online { .. }
    ));
    assert!(
        !s.revive(&dave, hour).await.unwrap(),
        "a newer registration is not overwritten"
    );
    assert_eq!(s.online("dave").await.unwrap(), Some(dave2.clone()));
    assert!(s.set_offline("dave", dave2.session).await.unwrap());
    assert!(matches!(
        next_change(&mut feed).await,
        PresenceChange::Offline { .. }
    ));

    // Listing: online users after a name, in order, bounded.
    let names: Vec<String> = (0..25).map(|i| format!("user{i:02}")).collect();
    for n in &names {
        s.set_online(&lease(n, &k1, SessionId::random()), hour)
            .await
            .unwrap();
    }
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list_online(after.as_deref(), 10).await.unwrap();
        assert!(page.len() <= 10);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|l| l.username.clone());
        listed.extend(page.into_iter().map(|l| l.username));
    }
    assert_eq!(listed, names);
    let unique: HashSet<_> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len());
}

/// Registration through the server refuses another key and keeps the owner's.
#[tokio::test]
async fn a_name_is_bound_to_the_first_key_across_a_restart_of_the_embedded_server() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, mallory) = (Identity::generate(), Identity::generate());
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (session, _rx) = register(&server.client(), &alice, "alice").await;
    session.deregister().await.unwrap();
    drop(session);
    server.stop().await;

    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    use p2pchat_core::Discovery;
    let refused = server
        .client()
        .register(&mallory, registration("alice", 7001), tx)
        .await;
    assert!(
        matches!(refused, Err(p2pchat_core::DiscoveryError::NameTaken { ref username }) if username == "alice"),
        "the claim survived the restart: {refused:?}"
    );
    let (session, _rx) = register(&server.client(), &alice, "alice").await;
    let record = session.lookup("alice").await.unwrap().expect("alice");
    assert_eq!(record.public_key, alice.public_key());
    assert!(record.online);
    drop(session);
    server.stop().await;
}
