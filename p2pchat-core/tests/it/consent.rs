//! Consent controls: contacts-only mode keeps messages from people the user never wrote to
//! nor accepted as requests, live and offline alike, until `accept` shows them or `block`
//! discards them; contacts survive a restart; the block list exports and imports.

use p2pchat_core::node::NodeError;
use p2pchat_core::{ChatNode, Event, Identity, TcpTransport};

use super::util::{World, buffered, outcome, receive_n, wait_for};

async fn contacts_only_node(
    world: &World,
    name: &str,
    identity: Identity,
    dir: Option<&std::path::Path>,
) -> ChatNode {
    world
        .builder(name, identity, dir, TcpTransport::new())
        .contacts_only(true)
        .spawn()
        .await
        .expect("node starts")
}

fn shown(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::MessageReceived { from, text, .. } => Some((from.clone(), text.clone())),
            _ => None,
        })
        .collect()
}

/// Live: a stranger's messages are delivered (acknowledged) but not shown; bob is told
/// once that carol wrote, `requests` counts them, and `accept` shows them in order, and
/// what she sends after. Someone bob wrote to first is shown at once.
#[tokio::test]
async fn a_strangers_live_messages_wait_as_a_request_until_accepted() {
    let world = World::new();
    let bob = contacts_only_node(&world, "bob", Identity::generate(), None).await;
    let alice = world.tcp_node("alice").await;
    let carol = world.tcp_node("carol").await;
    let mut bob_events = bob.events();
    let mut carol_events = carol.events();

    for text in ["hi bob", "it's carol"] {
        let id = carol.send("bob", text).await.expect("send");
        assert_eq!(
            wait_for(&mut carol_events, outcome).await,
            Event::Delivered {
                id,
                to: "bob".into()
            },
            "a request is delivered: bob's node keeps it"
        );
    }
    assert_eq!(
        wait_for(&mut bob_events, |e| matches!(
            e,
            Event::MessageRequest { .. }
        ))
        .await,
        Event::MessageRequest {
            from: "carol".into()
        }
    );
    // Bob writes to alice: she is a contact, and her answer is shown.
    bob.send("alice", "hello alice").await.expect("send");
    alice.send("bob", "hello bob").await.expect("send");
    let got = wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await;
    assert!(
        matches!(&got, Event::MessageReceived { from, text, .. } if from == "alice" && text == "hello bob"),
        "{got:?}"
    );
    assert!(
        shown(&buffered(&mut bob_events)).is_empty(),
        "nothing of carol's is shown"
    );
    let requests = bob.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].from.as_str(), requests[0].messages),
        ("carol", 2)
    );
    assert_eq!(bob.contacts(), vec!["alice".to_owned()]);

    bob.accept("carol").await.expect("accept");
    let got = receive_n(&mut bob_events, 2).await;
    assert_eq!(
        got,
        vec![
            ("hi bob".to_owned(), false),
            ("it's carol".to_owned(), false)
        ]
    );
    assert!(bob.requests().is_empty());
    carol.send("bob", "thanks").await.expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, "thanks");

    // Writing back to a stranger accepts them: what they sent is shown.
    let dave = world.tcp_node("dave").await;
    dave.send("bob", "hey, dave here").await.expect("send");
    wait_for(
        &mut bob_events,
        |e| matches!(e, Event::MessageRequest { from } if from == "dave"),
    )
    .await;
    bob.send("dave", "hi dave").await.expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, "hey, dave here");
    assert!(bob.requests().is_empty());
    for node in [alice, bob, carol, dave] {
        node.shutdown().await.expect("shutdown");
    }
}

/// Offline: a stranger's mail, drained when bob comes back, is a request too; `block`
/// discards it, and unblocking later does not bring it back. A contact's mail is shown.
/// Bad input to `accept` gets a clear error.
#[tokio::test]
async fn a_strangers_offline_mail_is_a_request_and_block_discards_it() {
    let world = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let bob_id = Identity::generate();
    let bob = contacts_only_node(&world, "bob", bob_id.clone(), Some(dir.path())).await;
    bob.send("alice", "write me while I'm away").await.ok();
    bob.shutdown().await.expect("bob leaves");
    let alice = world.tcp_node("alice").await;
    let dave = world.tcp_node("dave").await;
    let mut dave_events = dave.events();
    for text in ["buy now", "last chance"] {
        dave.send("bob", text).await.expect("send");
        assert!(matches!(
            wait_for(&mut dave_events, outcome).await,
            Event::StoredOffline { .. }
        ));
    }
    let mut alice_events = alice.events();
    alice.send("bob", "welcome back").await.expect("send");
    assert!(matches!(
        wait_for(&mut alice_events, outcome).await,
        Event::StoredOffline { .. }
    ));

    let bob = contacts_only_node(&world, "bob", bob_id, Some(dir.path())).await;
    let mut bob_events = bob.events();
    assert_eq!(
        receive_n(&mut bob_events, 1).await,
        vec![("welcome back".to_owned(), true)]
    );
    wait_for(
        &mut bob_events,
        |e| matches!(e, Event::MessageRequest { from } if from == "dave"),
    )
    .await;
    let requests = bob.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].from.as_str(), requests[0].messages),
        ("dave", 2)
    );

    bob.block("dave").await.expect("block");
    assert!(bob.requests().is_empty(), "blocking discards the requests");
    bob.unblock("dave").await.expect("unblock");
    bob.accept("dave").await.expect("accept");
    assert!(
        shown(&buffered(&mut bob_events)).is_empty(),
        "discarded requests do not come back"
    );
    assert!(matches!(
        bob.accept("not a name").await,
        Err(NodeError::InvalidUsername(_))
    ));
    for node in [alice, bob, dave] {
        node.shutdown().await.expect("shutdown");
    }
}

/// Contacts are kept in the node database: accepted before a restart, shown after it.
#[tokio::test]
async fn contacts_survive_a_restart() {
    let world = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let bob_id = Identity::generate();
    let bob = world
        .builder("bob", bob_id.clone(), Some(dir.path()), TcpTransport::new())
        .contacts_only(true)
        .spawn()
        .await
        .expect("bob");
    bob.accept("erin").await.ok();
    assert_eq!(bob.contacts(), vec!["erin".to_owned()]);
    bob.shutdown().await.expect("shutdown");
    let bob = world
        .builder("bob", bob_id, Some(dir.path()), TcpTransport::new())
        .contacts_only(true)
        .spawn()
        .await
        .expect("bob again");
    let mut bob_events = bob.events();
    let erin = world.tcp_node("erin").await;
    erin.send("bob", "still there?").await.expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, "still there?");
    assert!(bob.requests().is_empty());
    erin.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// The block list goes out as one name per line and comes in the same way (comments and
/// blank lines skipped); an invalid name fails the import before anything is blocked.
#[tokio::test]
async fn the_block_list_exports_and_imports() {
    let world = World::new();
    let first = world.memory_node("first").await;
    first.block("mallory").await.expect("block");
    first.block("eve").await.expect("block");
    let exported = first.export_blocked();
    assert_eq!(exported, "eve\nmallory\n");

    let second = world.memory_node("second").await;
    second.block("eve").await.expect("block");
    assert!(matches!(
        second.import_blocked("trent\nNot A Name\n").await,
        Err(NodeError::InvalidUsername(_))
    ));
    assert_eq!(second.blocked(), vec!["eve".to_owned()], "nothing imported");
    let added = second
        .import_blocked(&format!("# from first\n\n{exported}  trent  \n"))
        .await
        .expect("import");
    assert_eq!(added, 2, "mallory and trent are new, eve was blocked");
    assert_eq!(
        second.blocked(),
        vec!["eve".to_owned(), "mallory".to_owned(), "trent".to_owned()]
    );
    first.shutdown().await.expect("shutdown");
    second.shutdown().await.expect("shutdown");
}

/// The per-sender rate at the recipient (20 a second after a burst of 20 here): a flood from
/// alice is taken in no faster than that, live and from the mailbox, and loses nothing (every
/// message shown once, in order, each `Delivered` or `StoredOffline`); carol, meanwhile, is
/// shown at once. A lower bound on the time taken is what shows the throttle (a slow machine
/// only makes it longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_sender_is_read_at_the_recipients_rate_and_loses_nothing() {
    const FLOOD: usize = 100;
    let world = World::new();
    let bob_id = Identity::generate();
    let limited = |world: &World, id: Identity| {
        world
            .builder("bob", id, None, TcpTransport::new())
            .messages_per_second_per_sender(20)
            .message_burst_per_sender(20)
            .spawn()
    };
    let bob = limited(&world, bob_id.clone()).await.expect("bob");
    let alice = world.tcp_node("alice").await;
    let carol = world.tcp_node("carol").await;
    let mut bob_events = bob.events();
    let mut alice_events = alice.events();

    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        alice.send("bob", &format!("live {i}")).await.expect("send");
    }
    // Once the burst is shown, carol's message overtakes alice's backlog.
    let mut got = Vec::new();
    while got.len() < 20 {
        if let Event::MessageReceived { text, .. } = wait_for(&mut bob_events, |e| {
            matches!(e, Event::MessageReceived { .. })
        })
        .await
        {
            got.push(text);
        }
    }
    carol.send("bob", "carol here").await.expect("send");
    let mut carol_at = None;
    while got.len() < FLOOD + 1 {
        if let Event::MessageReceived { from, text, .. } = wait_for(&mut bob_events, |e| {
            matches!(e, Event::MessageReceived { .. })
        })
        .await
        {
            if from == "carol" {
                carol_at = Some(got.len());
            }
            got.push(text);
        }
    }
    let live_took = started.elapsed();
    let carol_at = carol_at.expect("carol's message shown");
    assert!(
        carol_at < FLOOD / 2,
        "carol waited behind alice: at {carol_at}"
    );
    got.retain(|t| t != "carol here");
    let expected: Vec<String> = (0..FLOOD).map(|i| format!("live {i}")).collect();
    assert_eq!(got, expected, "every message once, in order");
    assert!(
        live_took >= std::time::Duration::from_secs(3),
        "80 messages past the burst at 20/s took only {live_took:?}"
    );
    let mut delivered = 0;
    while delivered < FLOOD {
        if let Event::Delivered { .. } = wait_for(&mut alice_events, outcome).await {
            delivered += 1;
        }
    }

    // Offline: the same flood waits in the mailbox and is drained at the same rate.
    bob.shutdown().await.expect("bob leaves");
    for i in 0..FLOOD {
        alice
            .send("bob", &format!("offline {i}"))
            .await
            .expect("send");
    }
    let mut stored = 0;
    while stored < FLOOD {
        match wait_for(&mut alice_events, outcome).await {
            Event::StoredOffline { .. } => stored += 1,
            other => panic!("{other:?}"),
        }
    }
    let started = std::time::Instant::now();
    let bob = limited(&world, bob_id).await.expect("bob returns");
    let mut bob_events = bob.events();
    let got: Vec<String> = receive_n(&mut bob_events, FLOOD)
        .await
        .into_iter()
        .map(|(text, offline)| {
            assert!(offline);
            text
        })
        .collect();
    let expected: Vec<String> = (0..FLOOD).map(|i| format!("offline {i}")).collect();
    assert_eq!(got, expected, "every message once, in order");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "the drain was not throttled: {:?}",
        started.elapsed()
    );
    for node in [alice, bob, carol] {
        node.shutdown().await.expect("shutdown");
    }
}
