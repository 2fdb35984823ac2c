//! Crashes and shutdowns lose nothing and show nothing twice.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use p2pchat_core::store::Quotas;
use p2pchat_core::{Event, Identity, MemoryStore, MessageId, TcpTransport};

use super::util::{World, buffered, wait_for};

const COUNT: usize = 6_000;

/// Shown message ids (and whether each was marked offline) from `events` until `n` have
/// arrived or the stream ends.
async fn shown_until(
    events: &mut p2pchat_core::Events,
    n: usize,
    into: &mut Vec<(MessageId, bool)>,
) {
    while into.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Ok(Some(Event::MessageReceived { id, offline, .. })) => into.push((id, offline)),
            Ok(Some(Event::Lagged { .. })) => panic!("events lagged"),
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(_) => panic!("messages stopped arriving"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_receiver_mid_stream_loses_nothing_and_shows_each_message_once() {
    let mut world = World::new();
    // What follows the crash all goes to the mailbox: more than the default per-pair quota.
    world.store = MemoryStore::with_quotas(Quotas::unlimited());
    let dir = tempfile::tempdir().expect("tempdir");
    let bob_id = Identity::generate();
    let bob = world
        .builder("bob", bob_id.clone(), Some(dir.path()), TcpTransport::new())
        .spawn()
        .await
        .expect("bob");
    let alice = world
        .builder("alice", Identity::generate(), None, TcpTransport::new())
        .ack_timeout(Duration::from_secs(2))
        .spawn()
        .await
        .expect("alice");
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();

    let (first_delivered, mut some_delivered) = tokio::sync::watch::channel(false);
    let outcomes = tokio::spawn(async move {
        let (mut delivered, mut stored) = (HashSet::new(), HashSet::new());
        while delivered.len() + stored.len() < COUNT {
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
                Event::Delivered { id, .. } => {
                    assert!(delivered.insert(id));
                    let _ = first_delivered.send(true);
                }
                Event::StoredOffline { id, .. } => assert!(stored.insert(id)),
                other => panic!("a message failed: {other:?}"),
            }
        }
        (delivered, stored)
    });
    // The sender sends half, waits for the crash, then sends the rest: the crash comes
    // mid-stream however fast bob's node takes messages in, and what follows it cannot be
    // acknowledged by bob.
    let (half_sent, mut halfway) = tokio::sync::watch::channel(false);
    let (crashed, mut after_crash) = tokio::sync::watch::channel(false);
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(COUNT);
            for i in 0..COUNT {
                if i == COUNT / 2 {
                    let _ = half_sent.send(true);
                    let _ = after_crash.wait_for(|c| *c).await;
                }
                ids.push(alice.send("bob", &format!("m{i}")).await.expect("send"));
            }
            ids
        })
    };
    let mut shown = Vec::new();
    // Crash once the stream is well under way: some messages shown and acknowledged.
    shown_until(&mut bob_events, COUNT / 6, &mut shown).await;
    tokio::time::timeout(Duration::from_secs(30), some_delivered.wait_for(|d| *d))
        .await
        .expect("acknowledgements arrive")
        .expect("outcome task alive");
    tokio::time::timeout(Duration::from_secs(30), halfway.wait_for(|h| *h))
        .await
        .expect("the sender gets halfway")
        .expect("sender alive");
    bob.simulate_crash().await;
    let _ = crashed.send(true);
    // The crashed node's stream ends; what it had not handed out stays in its inbox.
    while let Some(event) = bob_events.next().await {
        if let Event::MessageReceived { id, offline, .. } = event {
            shown.push((id, offline));
        }
    }
    let before_crash = shown.len();
    let sent = sender.await.expect("sender");
    let (delivered, stored) = outcomes.await.expect("outcomes");
    eprintln!(
        "crash test: {} shown before the crash, {} delivered, {} stored offline",
        before_crash,
        delivered.len(),
        stored.len()
    );
    assert!(!stored.is_empty(), "the crash left messages unacknowledged");
    assert!(
        !delivered.is_empty(),
        "some messages were acknowledged before the crash"
    );
    assert!(delivered.is_disjoint(&stored), "an outcome per message");

    // Bob comes back with the same identity and data directory and drains his mailbox.
    let bob = world
        .builder("bob", bob_id, Some(dir.path()), TcpTransport::new())
        .spawn()
        .await
        .expect("bob returns");
    let mut bob_events = bob.events();
    let expected_after = COUNT - before_crash;
    shown_until(&mut bob_events, COUNT, &mut shown).await;
    let ids: Vec<MessageId> = shown.iter().map(|(id, _)| *id).collect();
    let unique: HashSet<MessageId> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no message shown twice");
    assert_eq!(
        unique,
        sent.iter().copied().collect::<HashSet<_>>(),
        "every message shown"
    );
    assert!(before_crash < COUNT, "the crash came mid-stream");
    // After the restart: what bob had made durable but not yet handed out comes from his
    // inbox, marked live (every message alice saw acknowledged is among them, unless it was
    // shown before the crash); what the crash left unacknowledged comes from the offline
    // store, marked offline (unless bob's inbox had it already).
    let shown_before: HashSet<MessageId> =
        shown[..before_crash].iter().map(|(id, _)| *id).collect();
    let live_after: HashSet<MessageId> = shown[before_crash..]
        .iter()
        .filter(|(_, offline)| !*offline)
        .map(|(id, _)| *id)
        .collect();
    for (id, offline) in &shown[before_crash..] {
        assert!(
            !*offline || stored.contains(id),
            "only messages alice stored come from the offline store: {id:?}"
        );
    }
    for id in &delivered {
        assert!(
            shown_before.contains(id) || live_after.contains(id),
            "an acknowledged message waited in bob's inbox and is shown live: {id:?}"
        );
    }
    assert_eq!(shown.len() - before_crash, expected_after);
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing more is shown"
    );
}

#[tokio::test]
async fn shutdown_reports_an_outcome_for_every_message_in_flight() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let mut alice_events = alice.events();
    let mut sent = HashSet::new();
    for i in 0..1000 {
        sent.insert(alice.send("bob", &format!("m{i}")).await.expect("send"));
    }
    alice.shutdown().await.expect("shutdown");
    let mut outcomes = HashSet::new();
    while let Some(event) = alice_events.next().await {
        match event {
            Event::Delivered { id, .. } | Event::StoredOffline { id, .. } => {
                assert!(outcomes.insert(id), "one outcome per message");
            }
            Event::SendFailed { .. } | Event::Lagged { .. } => panic!("{event:?}"),
            other => eprintln!("{other:?}"),
        }
    }
    assert_eq!(
        outcomes.len(),
        sent.len(),
        "every message delivered or stored before shutdown returned"
    );
    assert_eq!(outcomes, sent);
    bob.shutdown().await.expect("shutdown");
}
