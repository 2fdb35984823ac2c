//! Reachability on the in-memory directory and network: peers that cannot be dialed are
//! reached by connect-back or through the directory's relay, and a relayed connection
//! becomes direct without losing or repeating a message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use p2pchat_core::discovery::{Discovery, DiscoveryEvent, Registration};
use p2pchat_core::testing::connection_conformance;
use p2pchat_core::{ChatNode, Event, Identity, MessageId, PeerPath};
use tokio::sync::mpsc;

use super::util::{World, outcome, receive_n, wait_for};

/// A node on the in-memory network that says nobody can dial it.
async fn undialable(world: &World, name: &str) -> ChatNode {
    world
        .builder(name, Identity::generate(), None, world.network.clone())
        .dialable(false)
        .spawn()
        .await
        .expect("node starts")
}

/// Sends `text` and waits for its outcome: `true` when delivered directly.
async fn delivered(from: &ChatNode, events: &mut p2pchat_core::Events, to: &str, text: &str) {
    let id = from.send(to, text).await.expect("send");
    match wait_for(events, outcome).await {
        Event::Delivered { id: got, .. } => assert_eq!(got, id),
        other => panic!("{text:?} was not delivered directly: {other:?}"),
    }
}

#[tokio::test]
async fn a_node_learns_whether_it_can_be_dialed() {
    let world = World::new();
    let alice = world.memory_node("alice").await;
    let bob = undialable(&world, "bob").await;
    let mut a = alice.events();
    let mut b = bob.events();
    assert_eq!(
        wait_for(&mut a, |e| matches!(e, Event::Reachability { .. })).await,
        Event::Reachability { direct: true }
    );
    assert_eq!(
        wait_for(&mut b, |e| matches!(e, Event::Reachability { .. })).await,
        Event::Reachability { direct: false }
    );
    assert_eq!(alice.dialable(), Some(true));
    assert_eq!(bob.dialable(), Some(false));
}

#[tokio::test]
async fn an_undialable_peer_is_reached_by_connect_back() {
    let world = World::new();
    let alice = world.memory_node("alice").await;
    let bob = undialable(&world, "bob").await;
    let mut a = alice.events();
    let mut b = bob.events();
    wait_for(&mut a, |e| matches!(e, Event::Reachability { .. })).await;
    delivered(&alice, &mut a, "bob", "can you hear me").await;
    assert_eq!(
        receive_n(&mut b, 1).await,
        [("can you hear me".into(), false)]
    );
    // Bob dialed Alice back: a direct connection, no relay.
    assert_eq!(alice.path("bob"), Some(PeerPath::Direct));
    assert_eq!(bob.path("alice"), Some(PeerPath::Direct));
    delivered(&bob, &mut b, "alice", "loud and clear").await;
    assert_eq!(
        receive_n(&mut a, 1).await,
        [("loud and clear".into(), false)]
    );
}

#[tokio::test]
async fn two_undialable_peers_chat_through_the_relay() {
    let world = World::new();
    let alice = undialable(&world, "alice").await;
    let bob = undialable(&world, "bob").await;
    let mut a = alice.events();
    let mut b = bob.events();
    delivered(&alice, &mut a, "bob", "hello through the relay").await;
    assert_eq!(
        receive_n(&mut b, 1).await,
        [("hello through the relay".into(), false)]
    );
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    assert_eq!(bob.path("alice"), Some(PeerPath::Relayed));
    delivered(&bob, &mut b, "alice", "and back").await;
    assert_eq!(receive_n(&mut a, 1).await, [("and back".into(), false)]);
}

/// Counts what `to` was shown, by text.
fn tally(got: &[(String, bool)]) -> HashMap<&str, usize> {
    let mut seen = HashMap::new();
    for (text, _) in got {
        *seen.entry(text.as_str()).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_chat_becomes_direct_without_losing_or_repeating_a_message() {
    const N: usize = 2_000;
    let world = World::new();
    let alice = undialable(&world, "alice").await;
    let bob = undialable(&world, "bob").await;
    let mut a = alice.events();
    let mut b = bob.events();
    delivered(&alice, &mut a, "bob", "first").await;
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    receive_n(&mut b, 1).await;

    let receiver = tokio::spawn(async move { receive_n(&mut b, N).await });
    let mut sent: Vec<MessageId> = Vec::with_capacity(N);
    for i in 0..N {
        sent.push(alice.send("bob", &format!("m{i}")).await.expect("send"));
        if i == N / 4 {
            // Bob becomes dialable mid-stream (a port forward appears): Alice hears he is
            // online at an address and switches to it.
            assert!(world.directory.publish("bob", vec![bob.local_addr()]));
        }
    }
    let got = receiver.await.expect("receiver");
    let seen = tally(&got);
    let lost = (0..N)
        .filter(|i| !seen.contains_key(format!("m{i}").as_str()))
        .count();
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "relay→direct switch: sent {N}, shown {}, lost {lost}, duplicated {duplicated}",
        got.len()
    );
    assert_eq!((lost, duplicated), (0, 0));
    // Every message ends delivered, directly.
    let mut done = 0;
    while done < N {
        match wait_for(&mut a, outcome).await {
            Event::Delivered { .. } => done += 1,
            Event::Reachability { .. } => {}
            other => panic!("a message did not end delivered: {other:?}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while alice.path("bob") != Some(PeerPath::Direct) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection became direct");
}

#[tokio::test]
async fn a_relayed_connection_is_a_transport_connection() {
    let world = World::new();
    let identity = Identity::generate();
    let (alice_events, _a) = mpsc::channel(64);
    let alice = world
        .directory
        .register(&identity, registration("alice"), alice_events)
        .await
        .expect("alice registers");
    let (bob_events, b) = mpsc::channel(64);
    let _bob = world
        .directory
        .register(&Identity::generate(), registration("bob"), bob_events)
        .await
        .expect("bob registers");
    let (alice, bob) = (Arc::new(alice), Arc::new(_bob));
    let offers = Arc::new(tokio::sync::Mutex::new(b));
    connection_conformance(|| {
        let (alice, bob, offers) = (alice.clone(), bob.clone(), offers.clone());
        async move {
            let dialed = alice.relay("bob").await.expect("relay opens");
            let ticket = loop {
                match offers.lock().await.recv().await.expect("bob's events") {
                    DiscoveryEvent::RelayOffer { username, ticket } => {
                        assert_eq!(username, "alice");
                        break ticket;
                    }
                    _ => continue,
                }
            };
            let accepted = bob.join_relay(&ticket).await.expect("bob joins");
            (dialed, accepted)
        }
    })
    .await;
}

fn registration(name: &str) -> Registration {
    Registration {
        username: name.into(),
        listen_port: 0,
        announce: Vec::new(),
        dialable: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_chat_becomes_direct_when_the_sender_becomes_dialable_losing_nothing() {
    const N: usize = 2_000;
    let world = World::new();
    let alice = undialable(&world, "alice").await;
    let bob = undialable(&world, "bob").await;
    let mut a = alice.events();
    let mut b = bob.events();
    delivered(&alice, &mut a, "bob", "first").await;
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    receive_n(&mut b, 1).await;

    let receiver = tokio::spawn(async move { receive_n(&mut b, N).await });
    for i in 0..N {
        alice.send("bob", &format!("m{i}")).await.expect("send");
        if i == N / 4 {
            // alice becomes dialable: she asks bob to dial her back beside the relay, and
            // his direct connection replaces it.
            assert!(world.directory.publish("alice", vec![alice.local_addr()]));
        }
    }
    let got = receiver.await.expect("receiver");
    let seen = tally(&got);
    let lost = (0..N)
        .filter(|i| !seen.contains_key(format!("m{i}").as_str()))
        .count();
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "relay→direct (connect-back) switch: sent {N}, shown {}, lost {lost}, duplicated {duplicated}",
        got.len()
    );
    assert_eq!((lost, duplicated), (0, 0));
    let mut done = 0;
    while done < N {
        match wait_for(&mut a, outcome).await {
            Event::Delivered { .. } => done += 1,
            other => panic!("a message did not end delivered: {other:?}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while alice.path("bob") != Some(PeerPath::Direct)
            || bob.path("alice") != Some(PeerPath::Direct)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection became direct at both ends");
}
