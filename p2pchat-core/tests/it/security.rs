//! What an attacker on the network, or a misbehaving peer, can and cannot do.

use std::time::Duration;

use p2pchat_core::crypto::{CryptoError, PairKey, Payload};
use p2pchat_core::error::chain;
use p2pchat_core::protocol::PeerFrame;
use p2pchat_core::testing::{RawPeer, RecordingTransport};
use p2pchat_core::{Event, Identity, MessageId, OfflineStore, TcpTransport};

use super::util::{World, bob_and_raw_alice, buffered, receive_n, wait_for};

#[tokio::test]
async fn a_third_identity_cannot_open_the_pairs_tokens() {
    let world = World::new();
    let alice_id = Identity::generate();
    let bob_id = Identity::generate();
    let bob = world
        .node_with("bob", bob_id.clone(), None, TcpTransport::new())
        .await;
    bob.shutdown().await.expect("bob goes offline");
    let alice = world
        .node_with("alice", alice_id.clone(), None, TcpTransport::new())
        .await;
    let mut events = alice.events();
    alice.send("bob", "for bob only").await.expect("send");
    wait_for(&mut events, |e| matches!(e, Event::StoredOffline { .. })).await;

    let stored = world.store.fetch("bob", 10).await.expect("fetch");
    assert_eq!(stored.len(), 1);
    let token = &stored[0].token;
    assert!(!token.contains("for bob only"));
    let ttl = Duration::from_secs(3600);
    let carol = Identity::generate();
    for key in [
        PairKey::derive(&carol, &alice_id.public_key()).expect("derive"),
        PairKey::derive(&carol, &bob_id.public_key()).expect("derive"),
    ] {
        assert_eq!(
            key.open(token, "alice", "bob", ttl),
            Err(CryptoError::Tampered)
        );
    }
    let bobs = PairKey::derive(&bob_id, &alice_id.public_key()).expect("derive");
    assert_eq!(
        bobs.open(token, "alice", "bob", ttl)
            .expect("bob opens")
            .body,
        "for bob only"
    );
    alice.shutdown().await.expect("shutdown");
}

fn payload(id: MessageId, from: &str, to: &str, body: &str) -> Payload {
    Payload {
        id,
        from: from.into(),
        to: to.into(),
        sent_at_ms: 0,
        seq: 0,
        body: body.into(),
    }
}

async fn next_reply(raw: &mut RawPeer) -> PeerFrame {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), raw.recv()).await {
            Ok(Some(PeerFrame::Ping(_) | PeerFrame::Pong(_))) => continue,
            Ok(Some(frame)) => return frame,
            Ok(None) => panic!("connection closed"),
            Err(_) => panic!("no reply in time"),
        }
    }
}

#[tokio::test]
async fn a_replayed_token_is_shown_once_and_acknowledged_each_time() {
    let world = World::new();
    let (bob, mut raw, pair) = bob_and_raw_alice(&world).await;
    let mut bob_events = bob.events();
    let id = MessageId::random();
    let token = pair.seal(&payload(id, "alice", "bob", "only once"));
    for _ in 0..3 {
        raw.send(PeerFrame::Message {
            id,
            token: token.clone(),
        })
        .await
        .expect("send");
        match next_reply(&mut raw).await {
            PeerFrame::Ack { ids, tag } => {
                assert_eq!(ids, vec![id]);
                assert!(pair.verify_ack("bob", &ids, &tag), "acks are authenticated");
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let got = receive_n(&mut bob_events, 1).await;
    assert_eq!(got[0].0, "only once");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "the replays are not shown"
    );
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_reflected_or_rerouted_token_is_rejected_and_a_swapped_id_closes_the_connection() {
    let world = World::new();
    let (bob, mut raw, pair) = bob_and_raw_alice(&world).await;
    let mut bob_events = bob.events();
    // A token bob sealed for alice, sent back to bob on alice's connection.
    let reflected = MessageId::random();
    let token = pair.seal(&payload(reflected, "bob", "alice", "reflected"));
    raw.send(PeerFrame::Message {
        id: reflected,
        token,
    })
    .await
    .expect("send");
    match next_reply(&mut raw).await {
        PeerFrame::Reject { id, detail, .. } => {
            assert_eq!(id, reflected);
            assert!(detail.contains("arrived on"), "{detail}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A token naming another recipient.
    let rerouted = MessageId::random();
    let token = pair.seal(&payload(rerouted, "alice", "carol", "rerouted"));
    raw.send(PeerFrame::Message {
        id: rerouted,
        token,
    })
    .await
    .expect("send");
    assert!(matches!(next_reply(&mut raw).await, PeerFrame::Reject { id, .. } if id == rerouted));
    for _ in 0..2 {
        let error = wait_for(&mut bob_events, |e| matches!(e, Event::Error { .. })).await;
        assert!(
            matches!(&error, Event::Error { message } if message.contains("from alice was refused")),
            "{error:?}"
        );
    }

    // An id in the frame that differs from the one sealed inside: the frame's id is not
    // authenticated (anyone on the path could have changed it), so bob gives no
    // authenticated refusal; he hangs up and the genuine sender resends on a new connection.
    let inner = MessageId::random();
    let token = pair.seal(&payload(inner, "alice", "bob", "swapped id"));
    let outer = MessageId::random();
    raw.send(PeerFrame::Message { id: outer, token })
        .await
        .expect("send");
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = raw.recv().await {
            match frame {
                PeerFrame::Ping(_) | PeerFrame::Pong(_) => {}
                other => panic!("expected the connection to close, got {other:?}"),
            }
        }
    })
    .await
    .expect("bob hangs up on a token that does not match its frame");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing was shown"
    );
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_forged_acknowledgement_closes_the_connection() {
    let world = World::new();
    let (bob, mut raw, _pair) = bob_and_raw_alice(&world).await;
    raw.send(PeerFrame::Ack {
        ids: vec![MessageId::random()],
        tag: [0; 32],
    })
    .await
    .expect("send");
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while raw.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "bob hangs up on a forged ack");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_impostor_cannot_connect_as_a_registered_user() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let mallory = Identity::generate();
    let result = RawPeer::connect(
        &TcpTransport::new(),
        bob.local_addr(),
        &mallory,
        "alice",
        "bob",
        &bob.public_key(),
    )
    .await;
    let err = result.expect_err("the handshake must fail");
    let err = chain(&err);
    assert!(err.contains("refused"), "{err}");
    // Nor can someone who is not in the directory at all.
    let err = RawPeer::connect(
        &TcpTransport::new(),
        bob.local_addr(),
        &mallory,
        "mallory",
        "bob",
        &bob.public_key(),
    )
    .await
    .expect_err("unknown users are refused");
    let err = chain(&err);
    assert!(err.contains("refused"), "{err}");
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_bytes_on_the_wire_never_contain_the_plaintext() {
    let world = World::new();
    let wire = RecordingTransport::new(TcpTransport::new());
    let alice = world
        .node_with("alice", Identity::generate(), None, wire.clone())
        .await;
    let bob = world
        .node_with("bob", Identity::generate(), None, wire.clone())
        .await;
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();
    let secret = "the eagle lands at midnight 7f3a";
    alice.send("bob", secret).await.expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, secret);
    bob.send("alice", secret).await.expect("send");
    assert_eq!(receive_n(&mut alice_events, 1).await[0].0, secret);
    let recorded = wire.recorded();
    let contains = |needle: &[u8]| recorded.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"alice"), "the recording saw the handshake");
    assert!(recorded.len() > 200, "the recording saw the messages");
    assert!(!contains(secret.as_bytes()), "plaintext crossed the wire");
    assert!(
        !contains(b"eagle"),
        "part of the plaintext crossed the wire"
    );
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// A refusal makes the sender give up on a message only if it carries the pair's tag: a
/// forged one (anyone on the path could write it) closes the connection instead, and the
/// message goes on to the offline store.
#[tokio::test]
async fn a_refusal_counts_only_with_the_pairs_tag() {
    let world = World::new();
    let (bob, mut raw, pair) = bob_and_raw_alice(&world).await;
    let mut events = bob.events();
    let genuine = bob.send("alice", "first").await.expect("send");
    assert!(matches!(next_reply(&mut raw).await, PeerFrame::Message { id, .. } if id == genuine));
    raw.send(PeerFrame::Reject {
        id: genuine,
        detail: "no thanks".into(),
        tag: pair.reject_tag("alice", genuine, "no thanks"),
    })
    .await
    .expect("send");
    let failed = wait_for(
        &mut events,
        |e| matches!(e, Event::SendFailed { id, .. } if *id == genuine),
    )
    .await;
    assert!(matches!(failed, Event::SendFailed { reason, .. } if reason.contains("no thanks")));

    let forged = bob.send("alice", "second").await.expect("send");
    assert!(matches!(next_reply(&mut raw).await, PeerFrame::Message { id, .. } if id == forged));
    raw.send(PeerFrame::Reject {
        id: forged,
        detail: "forged".into(),
        tag: pair.reject_tag("alice", forged, "something else"),
    })
    .await
    .expect("send");
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while raw.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "bob hangs up on a forged refusal");
    let outcome = wait_for(&mut events, |e| {
        matches!(e, Event::SendFailed { id, .. } | Event::StoredOffline { id, .. } if *id == forged)
    })
    .await;
    assert!(
        matches!(outcome, Event::StoredOffline { .. }),
        "the message was not given up: {outcome:?}"
    );
    bob.shutdown().await.expect("shutdown");
}
