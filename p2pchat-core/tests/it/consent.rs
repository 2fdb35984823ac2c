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
    for node in [alice, bob, carol] {
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
