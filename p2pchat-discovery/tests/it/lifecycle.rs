//! Sessions over time: replacement, reconnection after a server restart, nodes chatting
//! through the real directory, instances sharing Redis, and key changes after a claim lapses.

use std::sync::Arc;
use std::time::Duration;

use p2pchat_core::{
    ChatNode, DiscoveryClient, DiscoveryError, Event, Events, Identity, MemoryStore, TcpTransport,
};
use p2pchat_discovery::Storage;

use super::util::*;

async fn node(name: &str, directory: DiscoveryClient, store: &MemoryStore) -> ChatNode {
    node_with(name, Identity::generate(), directory, store).await
}

async fn node_with(
    name: &str,
    identity: Identity,
    directory: DiscoveryClient,
    store: &MemoryStore,
) -> ChatNode {
    ChatNode::builder()
        .identity(identity)
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(directory)
        .offline_store(store.clone())
        .keep_alive_interval(TTL / 4)
        .spawn()
        .await
        .unwrap_or_else(|e| panic!("{name} starts: {e}"))
}

async fn received(events: &mut Events) -> (String, String) {
    match wait_event(events, |e| matches!(e, Event::MessageReceived { .. })).await {
        Event::MessageReceived { from, text, .. } => (from, text),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn registering_again_elsewhere_replaces_the_old_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let alice = Identity::generate();
    let (watcher, mut pushes) = register(&server.client(), &Identity::generate(), "watcher").await;
    // alice's name is held (only held names can be watched); she is away.
    let (away, _w) = register(&server.client(), &alice, "alice").await;
    away.deregister().await.unwrap();
    watcher.watch("alice").await.unwrap();
    let (old, mut old_events) = register(&server.client(), &alice, "alice").await;
    expect_presence(&mut pushes, "alice", true).await;
    let (new, _rx2) = register(&server.client(), &alice, "alice").await;
    expect_presence(&mut pushes, "alice", true).await;
    // The old session's owner is told, not left guessing.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let p2pchat_core::discovery::DiscoveryEvent::SessionEnded { reason } =
                old_events.recv().await.expect("events open")
            {
                return reason;
            }
        }
    })
    .await
    .expect("the replaced session reports its end");
    assert!(ended.contains("registered again elsewhere"), "{ended}");
    // The old session learns it was replaced and stops; it does not fight back.
    tokio::time::timeout(WAIT, async {
        while !matches!(old.keep_alive().await, Err(DiscoveryError::Closed)) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the replaced session closes");
    new.keep_alive().await.expect("the new session lives");
    drop(old);
    assert!(watcher.lookup("alice").await.unwrap().unwrap().online);
    assert_eq!(server.server.registered_sessions(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_client_re_registers_and_re_watches_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let storage = redb(dir.path());
    let server = TestServer::start(fast_config(), storage.clone()).await;
    let addr = server.addr;
    let (alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    let (bob, mut bob_pushes) = register(&server.client(), &Identity::generate(), "bob").await;
    // carol's name is held (only held names can be watched); she is away.
    let carol_id = Identity::generate();
    let (carol, _c) = register(&server.client(), &carol_id, "carol").await;
    carol.deregister().await.unwrap();
    bob.watch("carol").await.unwrap();
    server.stop().await;
    assert!(matches!(
        alice.lookup("bob").await,
        Err(DiscoveryError::Unreachable { .. })
    ));
    drop(storage);

    let server = TestServer::start_at(addr, fast_config(), redb(dir.path())).await;
    let (observer, _o) = register(&server.client(), &Identity::generate(), "observer").await;
    until_online(observer.as_ref(), "alice", true).await;
    until_online(observer.as_ref(), "bob", true).await;
    // bob's watch came back with him.
    tokio::time::timeout(WAIT, async {
        loop {
            let (carol, _c) = register(&server.client(), &carol_id, "carol").await;
            let pushed = tokio::time::timeout(Duration::from_millis(500), async {
                expect_presence(&mut bob_pushes, "carol", true).await
            })
            .await;
            carol.deregister().await.unwrap();
            if pushed.is_ok() {
                return;
            }
        }
    })
    .await
    .expect("bob re-watched carol");
    alice
        .keep_alive()
        .await
        .expect("alice's session works again");
    server.stop().await;
}

#[tokio::test]
async fn nodes_find_each_other_through_the_server_and_keep_chatting_while_it_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let store = MemoryStore::new();
    let alice = node("alice", server.client(), &store).await;
    let bob = node("bob", server.client(), &store).await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    alice
        .send("bob", "hello through the directory")
        .await
        .unwrap();
    assert_eq!(
        received(&mut bob_events).await,
        ("alice".into(), "hello through the directory".into())
    );
    let online: Vec<String> = alice
        .peers()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.username)
        .collect();
    assert!(online.contains(&"bob".to_owned()), "{online:?}");

    let addr = server.addr;
    server.stop().await;
    // The peer connection does not need the directory.
    let id = bob
        .send("alice", "still here without the server")
        .await
        .unwrap();
    assert_eq!(
        received(&mut alice_events).await,
        ("bob".into(), "still here without the server".into())
    );
    assert_eq!(
        wait_event(&mut bob_events, |e| matches!(e, Event::Delivered { .. })).await,
        Event::Delivered {
            id,
            to: "alice".into()
        }
    );

    // Both come back on their own when the server does.
    let server = TestServer::start_at(addr, fast_config(), redb(dir.path())).await;
    let (observer, _o) = register(&server.client(), &Identity::generate(), "observer").await;
    until_online(observer.as_ref(), "alice", true).await;
    until_online(observer.as_ref(), "bob", true).await;
    alice.shutdown().await.unwrap();
    until_online(observer.as_ref(), "alice", false).await;
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_new_key_on_a_lapsed_name_raises_key_changed_and_holds_messages_until_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.claim_lapse = Duration::ZERO; // any offline owner's claim has lapsed
    let server = TestServer::start(config, redb(dir.path())).await;
    let store = MemoryStore::new();
    let alice = node("alice", server.client(), &store).await;
    let mut alice_events = alice.events();
    let bob = node("bob", server.client(), &store).await;
    alice.send("bob", "hi first bob").await.unwrap();
    wait_event(&mut alice_events, |e| matches!(e, Event::Delivered { .. })).await;
    let pinned = alice.fingerprint("bob").await.unwrap();
    bob.shutdown().await.unwrap();

    let new_bob = node("bob", server.client(), &store).await;
    let mut new_bob_events = new_bob.events();
    // alice watches bob since she wrote to him: the new registration is pushed to her.
    wait_event(
        &mut alice_events,
        |e| matches!(e, Event::PeerOnline { username } if username == "bob"),
    )
    .await;
    let id = alice.send("bob", "is that you?").await.unwrap();
    match wait_event(&mut alice_events, |e| matches!(e, Event::KeyChanged { .. })).await {
        Event::KeyChanged { username, old, new } => {
            assert_eq!(username, "bob");
            assert_eq!(old, pinned);
            assert_eq!(new, new_bob.public_key().fingerprint());
        }
        _ => unreachable!(),
    }
    alice.trust("bob").await.unwrap();
    assert_eq!(
        wait_event(&mut alice_events, |e| matches!(
            e,
            Event::Delivered { .. } | Event::StoredOffline { .. }
        ))
        .await,
        Event::Delivered {
            id,
            to: "bob".into()
        }
    );
    assert_eq!(
        received(&mut new_bob_events).await,
        ("alice".into(), "is that you?".into())
    );
    alice.shutdown().await.unwrap();
    new_bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn two_instances_sharing_redis_behave_as_one() {
    let redis = redis();
    let prefix = format!("scale{:08x}", rand::random::<u32>());
    let storage = |p: String| {
        let url = redis.url();
        async move {
            Arc::new(
                p2pchat_discovery::RedisStorage::connect_with_prefix(&url, &p)
                    .await
                    .unwrap(),
            ) as Arc<dyn Storage>
        }
    };
    let one = TestServer::start(fast_config(), storage(prefix.clone()).await).await;
    let two = TestServer::start(fast_config(), storage(prefix.clone()).await).await;
    let store = MemoryStore::new();

    // bob (on instance two) watches alice, whose name is held, before she comes online on
    // instance one.
    let alice_id = Identity::generate();
    let (away, _w) = register(&one.client(), &alice_id, "alice").await;
    away.deregister().await.unwrap();
    let (bob_dir, mut bob_pushes) = register(&two.client(), &Identity::generate(), "bob").await;
    bob_dir.watch("alice").await.unwrap();
    let alice = node_with("alice", alice_id.clone(), one.client(), &store).await;
    expect_presence(&mut bob_pushes, "alice", true).await;
    let record = bob_dir
        .lookup("alice")
        .await
        .unwrap()
        .expect("alice is known on two");
    assert_eq!(record.public_key, alice_id.public_key());
    assert!(record.online);

    // The name is taken on both instances.
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    use p2pchat_core::Discovery;
    assert!(matches!(
        two.client()
            .register(&Identity::generate(), registration("alice", 7002), tx)
            .await,
        Err(DiscoveryError::NameTaken { .. })
    ));

    // A node on instance two messages alice on instance one.
    let carol = node("carol", two.client(), &store).await;
    let mut alice_events = alice.events();
    carol.send("alice", "hello across instances").await.unwrap();
    assert_eq!(
        received(&mut alice_events).await,
        ("carol".into(), "hello across instances".into())
    );
    let listed: Vec<String> = carol
        .peers()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.username)
        .collect();
    for who in ["alice", "bob", "carol"] {
        assert!(listed.contains(&who.to_owned()), "{who} in {listed:?}");
    }

    // alice leaving instance one is pushed to bob on instance two.
    alice.shutdown().await.unwrap();
    expect_presence(&mut bob_pushes, "alice", false).await;
    carol.shutdown().await.unwrap();
    one.stop().await;
    two.stop().await;
}

/// Two registrations of one key racing: the storage's last lease wins, the other session
/// closes, and never both.
async fn racing_registrations(server: &TestServer) {
    let alice = Identity::generate();
    let client = server.client();
    let (observer, _o) = register(&client, &Identity::generate(), "observer").await;
    for round in 0..10 {
        let ((a, _ra), (b, _rb)) = tokio::join!(
            register(&client, &alice, "alice"),
            register(&client, &alice, "alice")
        );
        tokio::time::timeout(WAIT, async {
            loop {
                match (a.keep_alive().await, b.keep_alive().await) {
                    (Ok(()), Err(DiscoveryError::Closed))
                    | (Err(DiscoveryError::Closed), Ok(())) => {
                        return;
                    }
                    (Ok(()), Ok(())) => tokio::time::sleep(Duration::from_millis(5)).await,
                    other => panic!("round {round}: {other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: both sessions stayed"));
        assert!(
            observer.lookup("alice").await.unwrap().unwrap().online,
            "round {round}"
        );
        drop((a, b));
    }
}

#[tokio::test]
async fn racing_registrations_of_one_key_leave_exactly_one_session_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    racing_registrations(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn racing_registrations_of_one_key_leave_exactly_one_session_on_redis() {
    let redis = redis();
    let server = TestServer::start(fast_config(), redis_storage(&redis.url()).await).await;
    racing_registrations(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn the_published_address_is_the_observed_ip_with_the_listen_port_unless_announced() {
    use p2pchat_core::Discovery;
    use p2pchat_core::discovery::Registration;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (observer, _o) = register(&server.client(), &Identity::generate(), "observer").await;
    let (plain, _p) = register(&server.client(), &Identity::generate(), "plain").await;
    let announced: Vec<std::net::SocketAddr> = vec![
        "192.0.2.7:6000".parse().unwrap(),
        "[2001:db8::7]:6000".parse().unwrap(),
    ];
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let with_addrs = server
        .client()
        .register(
            &Identity::generate(),
            Registration {
                username: "announcer".into(),
                listen_port: 6000,
                announce: announced.clone(),
                dialable: true,
            },
            tx,
        )
        .await
        .unwrap();
    let record = observer.lookup("plain").await.unwrap().unwrap();
    assert_eq!(record.addrs, vec!["127.0.0.1:7000".parse().unwrap()]);
    let record = observer.lookup("announcer").await.unwrap().unwrap();
    assert_eq!(record.addrs, announced);
    // Pages are capped whatever the client asks for.
    let page = observer.list_online(None, 100_000).await.unwrap();
    assert_eq!(page.users.len(), 3);
    drop((plain, with_addrs));
    server.stop().await;
}
