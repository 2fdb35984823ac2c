//! Direct messaging between nodes: pipelining, order, acknowledgements, offline fallback,
//! block and mute.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use p2pchat_core::node::NodeError;
use p2pchat_core::protocol::MAX_BODY_LEN;
use p2pchat_core::store::Quotas;
use p2pchat_core::{ChatNode, Event, Identity, MemoryStore, MessageId, TcpTransport};

use super::util::{World, buffered, outcome, receive_n, wait_for};

const N: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pipelined_messages_arrive_once_in_order_each_acknowledged() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();

    let started = Instant::now();
    let receiver = tokio::spawn(async move {
        let got = receive_n(&mut bob_events, N).await;
        (got, bob_events)
    });
    let delivered = tokio::spawn(async move {
        let mut ids = HashSet::new();
        while ids.len() < N {
            match wait_for(&mut alice_events, |e| {
                matches!(
                    e,
                    Event::Delivered { .. }
                        | Event::StoredOffline { .. }
                        | Event::SendFailed { .. }
                )
            })
            .await
            {
                Event::Delivered { id, to } => {
                    assert_eq!(to, "bob");
                    assert!(ids.insert(id), "one delivered event per message");
                }
                other => panic!("message not delivered directly: {other:?}"),
            }
        }
        ids
    });
    let mut sent = Vec::with_capacity(N);
    for i in 0..N {
        sent.push(
            alice
                .send("bob", &format!("message {i}"))
                .await
                .expect("send"),
        );
    }
    let (got, mut bob_events) = receiver.await.expect("receiver");
    let delivered = delivered.await.expect("delivered");
    let elapsed = started.elapsed();
    eprintln!("10,000 pipelined messages over TCP, all acknowledged, in {elapsed:?}");

    let expected: Vec<(String, bool)> = (0..N).map(|i| (format!("message {i}"), false)).collect();
    assert_eq!(
        got, expected,
        "every message once, in order, none marked offline"
    );
    assert_eq!(
        delivered,
        sent.iter().copied().collect::<HashSet<MessageId>>()
    );
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "no message is shown twice"
    );
}

#[tokio::test]
async fn both_directions_share_the_conversation() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();
    alice.send("bob", "hi bob").await.expect("send");
    let Event::MessageReceived {
        from,
        text,
        offline,
        ..
    } = wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (from.as_str(), text.as_str(), offline),
        ("alice", "hi bob", false)
    );
    bob.send("alice", "hi alice").await.expect("send");
    let Event::MessageReceived { from, text, .. } = wait_for(&mut alice_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!((from.as_str(), text.as_str()), ("bob", "hi alice"));
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn message_to_an_offline_user_is_stored_and_shown_marked_offline_when_they_return() {
    let world = World::new();
    let bob_identity = Identity::generate();
    let bob = world
        .node_with("bob", bob_identity.clone(), None, TcpTransport::new())
        .await;
    bob.shutdown().await.expect("bob leaves");
    let alice = world.tcp_node("alice").await;
    let mut alice_events = alice.events();
    let id = alice.send("bob", "while you were out").await.expect("send");
    let event = wait_for(&mut alice_events, outcome).await;
    assert_eq!(
        event,
        Event::StoredOffline {
            id,
            to: "bob".into()
        }
    );

    let bob = world
        .builder("bob", bob_identity, None, TcpTransport::new())
        .spawn();
    // Subscribe before the node drains: events() is only available after spawn, so the
    // drain must not be lost either way; spawn delivers after the handle exists.
    let bob = bob.await.expect("bob returns");
    let mut bob_events = bob.events();
    let got = receive_n(&mut bob_events, 1).await;
    assert_eq!(got, vec![("while you were out".to_owned(), true)]);
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// A message the offline store refuses under one of its quotas is not lost: it waits in the
/// sender's outbox, reported `Queued` with the sentence naming the limit, and reaches bob
/// when he comes back, after the two the store took, each shown once.
#[tokio::test]
async fn a_message_over_a_store_quota_waits_with_a_sentence_naming_it() {
    let mut world = World::new();
    let mut quotas = Quotas::default();
    quotas.pair_messages = 2;
    world.store = MemoryStore::with_quotas(quotas);
    let bob_identity = Identity::generate();
    let bob = world
        .node_with("bob", bob_identity.clone(), None, TcpTransport::new())
        .await;
    bob.shutdown().await.expect("bob leaves");
    let alice = world.tcp_node("alice").await;
    let mut alice_events = alice.events();
    for text in ["one", "two"] {
        alice.send("bob", text).await.expect("send");
        assert!(matches!(
            wait_for(&mut alice_events, outcome).await,
            Event::StoredOffline { .. }
        ));
    }
    let third = alice.send("bob", "three").await.expect("send");
    match wait_for(&mut alice_events, |e| {
        matches!(e, Event::Queued { retry: Some(_), .. })
    })
    .await
    {
        Event::Queued { id, retry, .. } => {
            assert_eq!(id, third);
            let reason = retry.unwrap_or_default();
            assert!(
                reason.contains("you already have 2 messages waiting for bob"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let bob = world
        .node_with("bob", bob_identity, None, TcpTransport::new())
        .await;
    let mut bob_events = bob.events();
    let mut got = receive_n(&mut bob_events, 3).await;
    got.sort();
    assert_eq!(
        got.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["one", "three", "two"]
    );
    let outcome = wait_for(&mut alice_events, |e| {
        matches!(e, Event::Delivered { id, .. } | Event::StoredOffline { id, .. } if *id == third)
    })
    .await;
    assert!(matches!(
        outcome,
        Event::Delivered { .. } | Event::StoredOffline { .. }
    ));
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_sends_fail_at_once_with_clear_errors() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    assert!(matches!(
        alice.send("nobody", "hi").await,
        Err(NodeError::UnknownUser(name)) if name == "nobody"
    ));
    assert!(matches!(
        alice.send("Bad Name", "hi").await,
        Err(NodeError::InvalidUsername(_))
    ));
    assert!(matches!(
        alice.send("alice", "hi").await,
        Err(NodeError::SendToSelf)
    ));
    let _bob = world.tcp_node("bob").await;
    let long = "x".repeat(MAX_BODY_LEN + 1);
    assert!(matches!(
        alice.send("bob", &long).await,
        Err(NodeError::MessageTooLong { .. })
    ));
    alice.shutdown().await.expect("shutdown");
    alice.shutdown().await.expect("shutdown is idempotent");
    assert!(matches!(
        alice.send("bob", "hi").await,
        Err(NodeError::ShutDown)
    ));
}

#[tokio::test]
async fn blocked_users_are_not_shown_live_or_offline_and_cannot_be_sent_to() {
    let world = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let bob_identity = Identity::generate();
    let alice = world.tcp_node("alice").await;
    let mut alice_events = alice.events();
    let bob = world
        .node_with(
            "bob",
            bob_identity.clone(),
            Some(dir.path()),
            TcpTransport::new(),
        )
        .await;
    let mut bob_events = bob.events();

    alice.send("bob", "before the block").await.expect("send");
    receive_n(&mut bob_events, 1).await;
    bob.block("alice").await.expect("block");
    assert!(matches!(
        bob.send("alice", "hi").await,
        Err(NodeError::Blocked(name)) if name == "alice"
    ));
    let id = alice.send("bob", "while blocked").await.expect("send");
    let outcome = wait_for(&mut alice_events, |e| match e {
        Event::Delivered { id: got, .. } | Event::StoredOffline { id: got, .. } => *got == id,
        _ => false,
    })
    .await;
    assert!(
        matches!(outcome, Event::StoredOffline { .. }),
        "a blocked peer refuses the connection: {outcome:?}"
    );

    // The block persists across a restart, and the stored message is dropped at delivery.
    bob.shutdown().await.expect("shutdown");
    let bob = world
        .builder(
            "bob",
            bob_identity.clone(),
            Some(dir.path()),
            TcpTransport::new(),
        )
        .spawn()
        .await
        .expect("restart");
    let mut bob_events = bob.events();
    assert_eq!(bob.blocked(), vec!["alice".to_owned()]);
    bob.unblock("alice").await.expect("unblock");
    alice.send("bob", "after unblock").await.expect("send");
    let got = receive_n(&mut bob_events, 1).await;
    assert_eq!(
        got[0].0, "after unblock",
        "the message sent while blocked is never shown"
    );
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn muted_users_are_hidden_until_the_mute_expires() {
    let world = World::new();
    let alice = world.memory_node("alice").await;
    let bob = world.memory_node("bob").await;
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();

    bob.mute("alice", Duration::from_secs(60))
        .await
        .expect("mute");
    assert!(bob.is_muted("alice"));
    let hidden = alice.send("bob", "you cannot see me").await.expect("send");
    let outcome = wait_for(&mut alice_events, |e| {
        matches!(e, Event::Delivered { .. } | Event::StoredOffline { .. })
    })
    .await;
    assert_eq!(
        outcome,
        Event::Delivered {
            id: hidden,
            to: "bob".into()
        },
        "muted messages are still acknowledged"
    );

    for _ in 0..61 {
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
    }
    assert!(!bob.is_muted("alice"), "the mute expired");
    alice.send("bob", "now you can").await.expect("send");
    let got = receive_n(&mut bob_events, 1).await;
    assert_eq!(
        got[0].0, "now you can",
        "only the message after the mute is shown"
    );

    bob.mute("alice", Duration::from_secs(3600))
        .await
        .expect("mute");
    bob.unmute("alice").await.expect("unmute");
    alice.send("bob", "unmuted early").await.expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, "unmuted early");
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_changed_key_holds_messages_until_trusted() {
    let world = World {
        directory: p2pchat_core::MemoryDiscovery::with_timeouts(
            Duration::from_secs(30),
            Duration::from_secs(60),
        ),
        ..World::new()
    };
    let alice = world.memory_node("alice").await;
    let mut alice_events = alice.events();
    let bob = world.memory_node("bob").await;
    alice.send("bob", "hello first bob").await.expect("send");
    wait_for(&mut alice_events, |e| matches!(e, Event::Delivered { .. })).await;
    let first_fingerprint = alice.fingerprint("bob").await.expect("fingerprint");
    bob.shutdown().await.expect("first bob leaves");

    // The claim lapses; someone else registers "bob" with another key.
    for _ in 0..120 {
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
    }
    let new_bob = world.memory_node("bob").await;
    let mut new_bob_events = new_bob.events();
    let id = alice.send("bob", "are you still you?").await.expect("send");
    let Event::KeyChanged { username, old, new } =
        wait_for(&mut alice_events, |e| matches!(e, Event::KeyChanged { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(username, "bob");
    assert_eq!(old, first_fingerprint);
    assert_eq!(new, new_bob.public_key().fingerprint());
    assert_eq!(
        alice.fingerprint("bob").await.expect("fingerprint"),
        first_fingerprint,
        "the pin stays until trusted"
    );
    // Held: neither delivered nor stored.
    tokio::task::yield_now().await;
    assert!(
        !buffered(&mut alice_events)
            .iter()
            .any(|e| matches!(e, Event::Delivered { .. } | Event::StoredOffline { .. })),
        "messages to a changed key are held"
    );
    alice.trust("bob").await.expect("trust");
    let outcome = wait_for(&mut alice_events, |e| {
        matches!(e, Event::Delivered { .. } | Event::StoredOffline { .. })
    })
    .await;
    assert_eq!(
        outcome,
        Event::Delivered {
            id,
            to: "bob".into()
        }
    );
    assert_eq!(
        receive_n(&mut new_bob_events, 1).await[0].0,
        "are you still you?"
    );
    let mut stream = alice.events();
    alice.shutdown().await.expect("shutdown");
    new_bob.shutdown().await.expect("shutdown");
    assert!(
        stream.next().await.is_none(),
        "the event stream ends at shutdown"
    );
}

/// Dropping every handle of a node without `shutdown()` shuts it down in the background as
/// `shutdown()` would: its event streams end and it leaves the directory. Held back by one
/// clone, it keeps running.
#[tokio::test]
async fn dropping_the_last_handle_shuts_the_node_down_in_the_background() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let mut events = alice.events();
    let clone = alice.clone();
    drop(alice);
    let online = |bob: &ChatNode| {
        let bob = bob.clone();
        async move {
            bob.peers()
                .await
                .unwrap()
                .iter()
                .any(|p| p.username == "alice")
        }
    };
    assert!(online(&bob).await, "a clone keeps the node running");
    drop(clone);
    tokio::time::timeout(Duration::from_secs(30), async {
        while events.next().await.is_some() {}
    })
    .await
    .expect("the event stream ends once the node has shut down");
    assert!(!online(&bob).await, "the node left the directory");
}
