//! Hostile input against a node's peer listener: slow and silent connections, floods,
//! oversized frames, odd and look-alike usernames, a pinned peer's key changing, and replayed
//! or reflected tokens arriving through the offline mailbox. Each attack is refused or cut
//! off, and the node keeps serving legitimate peers.
//!
//! The node's handshake timeout is the constant [`HANDSHAKE_TIMEOUT`] (5 s): the builder has
//! no setting for it, so the slow-client test runs for about that long.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use p2pchat_core::crypto::{PairKey, Payload};
use p2pchat_core::error::chain;
use p2pchat_core::node::{HANDSHAKE_TIMEOUT, NodeError, SpawnError};
use p2pchat_core::protocol::{
    FrameCodec, Hello, MAX_FRAME_LEN, MAX_USERNAME_LEN, PeerFrame, Role, UsernameError,
    handshake_transcript,
};
use p2pchat_core::testing::RawPeer;
use p2pchat_core::{
    ChatNode, Event, Events, Identity, MemoryDiscovery, MessageId, OfflineStore, PublicKey,
    StoredMessage, TcpTransport,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::{Encoder, FramedRead};

use super::util::{EVENT_TIMEOUT, World, bob_and_raw_alice, buffered, receive_n, wait_for};

type RawReader = FramedRead<OwnedReadHalf, FrameCodec<PeerFrame>>;

/// Sends `text` from `from` to `to` and checks it is acknowledged directly (not stored
/// offline) and shown once by `to`.
async fn delivered_directly(
    from: &ChatNode,
    from_events: &mut Events,
    to: &str,
    to_events: &mut Events,
    text: &str,
) {
    let id = from.send(to, text).await.expect("send");
    let outcome = wait_for(from_events, |e| match e {
        Event::Delivered { id: got, .. }
        | Event::StoredOffline { id: got, .. }
        | Event::SendFailed { id: got, .. } => *got == id,
        _ => false,
    })
    .await;
    assert_eq!(
        outcome,
        Event::Delivered {
            id,
            to: to.to_owned()
        },
        "{text:?} must reach {to} directly"
    );
    assert_eq!(receive_n(to_events, 1).await[0].0, text);
}

/// A sealed message from `from` to `to`, as a peer would put it in a frame.
fn sealed(pair: &PairKey, id: MessageId, from: &str, to: &str, body: &str) -> String {
    pair.seal(&Payload {
        id,
        from: from.into(),
        to: to.into(),
        sent_at_ms: 0,
        seq: 0,
        body: body.into(),
    })
}

fn hello(identity: &Identity, me: &str, peer: &str) -> Hello {
    Hello {
        username: me.into(),
        peer: peer.into(),
        public_key: identity.public_key(),
        nonce: rand::random(),
    }
}

/// One frame as bytes on the wire.
fn encoded(frame: &PeerFrame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::<PeerFrame>::default()
        .encode(frame, &mut buf)
        .expect("encode");
    buf
}

/// Reads until the other end closes (or the connection fails) and returns the frames read
/// meanwhile. Fails the test if the end does not come within `limit`.
async fn frames_until_closed(reader: &mut RawReader, limit: Duration) -> Vec<PeerFrame> {
    tokio::time::timeout(limit, async {
        let mut frames = Vec::new();
        while let Some(Ok(frame)) = reader.next().await {
            frames.push(frame);
        }
        frames
    })
    .await
    .expect("the node closes the connection in time")
}

/// The next frame, failing the test on anything else or after [`EVENT_TIMEOUT`].
async fn next_frame(reader: &mut RawReader) -> PeerFrame {
    tokio::time::timeout(EVENT_TIMEOUT, reader.next())
        .await
        .expect("the listener answers in time")
        .expect("the listener answers")
        .expect("a frame")
}

/// Completes the dialer's side of the handshake by hand over plain TCP, returning the raw
/// halves so that the test can then write anything at all.
async fn handshake_by_hand(
    addr: SocketAddr,
    identity: &Identity,
    me: &str,
    peer: &str,
    peer_key: &PublicKey,
) -> (RawReader, OwnedWriteHalf) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::<PeerFrame>::default());
    let ours = hello(identity, me, peer);
    write
        .write_all(&encoded(&PeerFrame::Hello(Box::new(ours.clone()))))
        .await
        .expect("write hello");
    let PeerFrame::Hello(theirs) = next_frame(&mut reader).await else {
        panic!("expected the listener's hello");
    };
    let PeerFrame::Auth { signature } = next_frame(&mut reader).await else {
        panic!("expected the listener's proof");
    };
    assert!(
        peer_key.verify(
            &handshake_transcript(Role::Listener, &ours, &theirs),
            &signature
        ),
        "the listener proves its key"
    );
    let signature = identity.sign(&handshake_transcript(Role::Dialer, &ours, &theirs));
    write
        .write_all(&encoded(&PeerFrame::Auth { signature }))
        .await
        .expect("write auth");
    (reader, write)
}

/// A dialer trickling its `Hello` one byte every 200 ms (the whole frame would take over
/// ten seconds; checked below) is cut off by the node's handshake timeout. The node's timeout is the constant
/// `HANDSHAKE_TIMEOUT` (5 s) with no builder setting, so this runs for about five seconds
/// rather than one byte a second against a short configured timeout. The listener reveals
/// nothing (no `Hello` of its own) to the slow dialer, and a legitimate peer delivers a
/// message while the trickle goes on.
#[tokio::test]
async fn a_dialer_trickling_its_hello_is_cut_off_by_the_handshake_timeout() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    let frame = encoded(&PeerFrame::Hello(Box::new(hello(
        &Identity::generate(),
        "mallory",
        "bob",
    ))));
    assert!(
        Duration::from_millis(200) * frame.len() as u32 > HANDSHAKE_TIMEOUT * 2,
        "the trickle cannot finish within the timeout"
    );

    let stream = TcpStream::connect(bob.local_addr()).await.expect("connect");
    let started = Instant::now();
    let (read, mut write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::<PeerFrame>::default());
    let trickle = async {
        for byte in frame.iter() {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let cut_off = async {
        tokio::select! {
            _ = trickle => panic!("the node took the whole trickled hello"),
            frames = frames_until_closed(&mut reader, HANDSHAKE_TIMEOUT * 3) => {
                (frames, started.elapsed())
            }
        }
    };
    let legitimate = delivered_directly(
        &alice,
        &mut alice_events,
        "bob",
        &mut bob_events,
        "not held up by the slow dialer",
    );
    let ((frames, elapsed), ()) = tokio::join!(cut_off, legitimate);
    assert!(
        frames.iter().all(|f| matches!(f, PeerFrame::Error { .. })),
        "the listener revealed nothing to the slow dialer: {frames:?}"
    );
    assert!(
        elapsed >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "closed after {elapsed:?}: too early for the handshake timeout"
    );
    assert!(
        elapsed < HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "closed only after {elapsed:?} with a {HANDSHAKE_TIMEOUT:?} handshake timeout"
    );
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// 500 TCP connections from another address (127.0.0.2) that connect and never send a byte
/// must not stop a legitimate peer from reaching the node and delivering a message directly:
/// the address gets `MAX_PENDING_HANDSHAKES_PER_ADDRESS` handshake slots, the rest of its
/// connections are closed at once, and the actor never waits for a slot.
#[tokio::test]
async fn a_flood_of_silent_connections_does_not_stop_a_legitimate_peer() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    let mut flood = Vec::with_capacity(500);
    for _ in 0..500 {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("address"))
            .expect("bind 127.0.0.2");
        flood.push(socket.connect(bob.local_addr()).await.expect("connect"));
    }
    delivered_directly(
        &alice,
        &mut alice_events,
        "bob",
        &mut bob_events,
        "through the flood",
    )
    .await;
    drop(flood);
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// The other side of the per-address cap: 24 peers on one address (every in-memory peer
/// comes from 127.0.0.1, as peers behind one NAT would) dialing one node at the same moment
/// all reach it directly. The cap applies only once half the handshake slots are taken.
#[tokio::test]
async fn a_burst_of_first_contacts_from_one_address_is_served() {
    let world = World::new();
    let hub = world.memory_node("hub").await;
    let mut hub_events = hub.events();
    let mut senders = Vec::new();
    for i in 0..24 {
        let node = world.memory_node(&format!("peer{i}")).await;
        let events = node.events();
        senders.push((node, events));
    }
    let sends = senders.iter().map(|(node, _)| node.send("hub", "hello"));
    let ids: Vec<MessageId> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("send"))
        .collect();
    for ((_, events), id) in senders.iter_mut().zip(&ids) {
        let outcome = wait_for(events, |e| match e {
            Event::Delivered { id: got, .. }
            | Event::StoredOffline { id: got, .. }
            | Event::SendFailed { id: got, .. } => got == id,
            _ => false,
        })
        .await;
        assert!(
            matches!(outcome, Event::Delivered { .. }),
            "every first contact is delivered directly: {outcome:?}"
        );
    }
    assert_eq!(receive_n(&mut hub_events, ids.len()).await.len(), ids.len());
    for (node, _) in senders {
        node.shutdown().await.expect("shutdown");
    }
    hub.shutdown().await.expect("shutdown");
}

/// A length prefix over `MAX_FRAME_LEN` as the first bytes of a connection (including an
/// HTTP request line, read as a 1.2 GB length) is refused at once: the connection is closed
/// well before the handshake timeout, without the listener revealing anything, and the node
/// keeps serving.
#[tokio::test]
async fn an_oversized_length_prefix_closes_the_connection_before_the_handshake() {
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world.tcp_node("bob").await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    let just_over = u32::try_from(MAX_FRAME_LEN + 1)
        .expect("fits")
        .to_be_bytes();
    for prefix in [
        &just_over[..],
        &u32::MAX.to_be_bytes(),
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let stream = TcpStream::connect(bob.local_addr()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::<PeerFrame>::default());
        let started = Instant::now();
        write.write_all(prefix).await.expect("write");
        let frames = frames_until_closed(&mut reader, HANDSHAKE_TIMEOUT * 2).await;
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT - Duration::from_secs(1),
            "refused on the prefix {prefix:?}, not by the timeout"
        );
        assert!(
            frames.iter().all(|f| matches!(f, PeerFrame::Error { .. })),
            "nothing but a refusal: {frames:?}"
        );
    }
    delivered_directly(
        &alice,
        &mut alice_events,
        "bob",
        &mut bob_events,
        "still serving",
    )
    .await;
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// After a genuine handshake, a frame announcing more than `MAX_FRAME_LEN` ends that
/// connection (the bytes after it are never buffered), and the node keeps serving others.
#[tokio::test]
async fn an_oversized_frame_after_the_handshake_closes_only_that_connection() {
    let world = World::new();
    let alice_id = Identity::generate();
    let alice = world
        .node_with("alice", alice_id.clone(), None, TcpTransport::new())
        .await;
    alice
        .shutdown()
        .await
        .expect("the test speaks as alice by hand");
    let bob = world.tcp_node("bob").await;
    let carol = world.tcp_node("carol").await;
    let (mut bob_events, mut carol_events) = (bob.events(), carol.events());

    let (mut reader, mut write) = handshake_by_hand(
        bob.local_addr(),
        &alice_id,
        "alice",
        "bob",
        &bob.public_key(),
    )
    .await;
    // The connection works: a message is acknowledged and shown.
    let pair = PairKey::derive(&alice_id, &bob.public_key()).expect("derive");
    let id = MessageId::random();
    let token = sealed(&pair, id, "alice", "bob", "before the big frame");
    write
        .write_all(&encoded(&PeerFrame::Message { id, token }))
        .await
        .expect("write");
    let ack = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match reader.next().await {
                Some(Ok(PeerFrame::Ack { ids, .. })) => return ids,
                Some(Ok(_)) => continue,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    })
    .await
    .expect("an ack in time");
    assert_eq!(ack, vec![id]);
    assert_eq!(
        receive_n(&mut bob_events, 1).await[0].0,
        "before the big frame"
    );

    let mut big = u32::try_from(MAX_FRAME_LEN + 1)
        .expect("fits")
        .to_be_bytes()
        .to_vec();
    big.extend_from_slice(&[1; 1024]);
    write.write_all(&big).await.expect("write");
    let frames = frames_until_closed(&mut reader, EVENT_TIMEOUT).await;
    assert!(
        frames
            .iter()
            .all(|f| matches!(f, PeerFrame::Error { .. } | PeerFrame::Ping(_))),
        "{frames:?}"
    );
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing from the oversized frame was shown"
    );
    delivered_directly(
        &carol,
        &mut carol_events,
        "bob",
        &mut bob_events,
        "bob still serves carol",
    )
    .await;
    bob.shutdown().await.expect("shutdown");
    carol.shutdown().await.expect("shutdown");
}

/// Usernames a person could not tell apart from a real one, or that would garble a terminal:
/// each with the typed error it must earn.
fn odd_usernames() -> Vec<(String, UsernameError)> {
    use UsernameError::{BadCharacter, Empty, TooLong};
    vec![
        (String::new(), Empty),
        ("a".repeat(MAX_USERNAME_LEN + 1), TooLong),
        ("a".repeat(100_000), TooLong),
        ("ali\0ce".into(), BadCharacter('\0')),
        ("bob\n".into(), BadCharacter('\n')),
        ("bob\r".into(), BadCharacter('\r')),
        ("a\tb".into(), BadCharacter('\t')),
        ("bell\u{7}".into(), BadCharacter('\u{7}')),
        ("del\u{7f}".into(), BadCharacter('\u{7f}')),
        ("red\u{1b}[31m".into(), BadCharacter('\u{1b}')),
        // Cyrillic 'а' (U+0430) and 'е' (U+0435), which look like Latin 'a' and 'e'.
        ("\u{430}lice".into(), BadCharacter('\u{430}')),
        ("bob\u{435}".into(), BadCharacter('\u{435}')),
        // Fullwidth 'ａ'.
        ("\u{ff41}lice".into(), BadCharacter('\u{ff41}')),
        // Invisible: zero-width space, zero-width joiner, soft hyphen.
        ("ali\u{200b}ce".into(), BadCharacter('\u{200b}')),
        ("ali\u{200d}ce".into(), BadCharacter('\u{200d}')),
        ("ali\u{ad}ce".into(), BadCharacter('\u{ad}')),
        // A combining accent, a right-to-left override, a precomposed letter.
        ("alice\u{301}".into(), BadCharacter('\u{301}')),
        ("\u{202e}ecila".into(), BadCharacter('\u{202e}')),
        ("\u{e5}lice".into(), BadCharacter('\u{e5}')),
        ("Alice".into(), BadCharacter('A')),
        ("al ice".into(), BadCharacter(' ')),
        ("-alice".into(), BadCharacter('-')),
        (".alice".into(), BadCharacter('.')),
    ]
}

/// The builder refuses every odd or look-alike username with `SpawnError::InvalidUsername`
/// carrying the precise reason, before registering anything; so do `send`, `block`,
/// `unblock`, `mute`, `unmute`, `fingerprint` and `trust`, with `NodeError::InvalidUsername`.
#[tokio::test]
async fn odd_and_look_alike_usernames_are_refused_with_a_typed_error() {
    let world = World::new();
    let alice = world.memory_node("alice").await;
    for (name, expected) in odd_usernames() {
        let shown = name.escape_debug().to_string();
        let shown = &shown[..shown.len().min(40)];
        let err = world
            .builder(&name, Identity::generate(), None, world.network.clone())
            .spawn()
            .await
            .expect_err("an odd name is refused");
        assert!(
            matches!(&err, SpawnError::InvalidUsername(e) if *e == expected),
            "builder, {shown}: {err}"
        );
        let results = [
            ("send", alice.send(&name, "hi").await.map(|_| ())),
            ("block", alice.block(&name).await),
            ("unblock", alice.unblock(&name).await),
            ("mute", alice.mute(&name, Duration::from_secs(60)).await),
            ("unmute", alice.unmute(&name).await),
            ("fingerprint", alice.fingerprint(&name).await.map(|_| ())),
            ("trust", alice.trust(&name).await),
        ];
        for (call, result) in results {
            assert!(
                matches!(&result, Err(NodeError::InvalidUsername(e)) if *e == expected),
                "{call}, {shown}: {result:?}"
            );
        }
    }
    assert!(alice.blocked().is_empty(), "no odd name was recorded");
    alice.shutdown().await.expect("shutdown");
}

/// The listener refuses a dialer whose `Hello` names an odd or look-alike user (before
/// looking anything up), or is addressed to someone else; then serves the real user.
#[tokio::test]
async fn a_hello_with_an_odd_name_or_for_another_user_is_refused_by_the_listener() {
    let world = World::new();
    let alice_id = Identity::generate();
    let alice = world
        .node_with("alice", alice_id.clone(), None, TcpTransport::new())
        .await;
    let bob = world.tcp_node("bob").await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    for (name, _) in odd_usernames() {
        if name.len() > 1024 {
            continue; // a Hello this long is covered by the frame limit instead
        }
        let err = RawPeer::connect(
            &TcpTransport::new(),
            bob.local_addr(),
            &alice_id,
            &name,
            "bob",
            &bob.public_key(),
        )
        .await
        .expect_err("an odd name is refused");
        let err = chain(&err);
        assert!(
            err.contains("refused") && err.contains("invalid username"),
            "{}: {err}",
            name.escape_debug()
        );
    }
    let err = RawPeer::connect(
        &TcpTransport::new(),
        bob.local_addr(),
        &alice_id,
        "alice",
        "carol",
        &bob.public_key(),
    )
    .await
    .expect_err("a hello for carol is refused by bob");
    let err = chain(&err);
    assert!(err.contains("this is bob"), "{err}");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::KeyChanged { .. } | Event::MessageReceived { .. })),
        "no refused dialer left a trace"
    );
    delivered_directly(
        &alice,
        &mut alice_events,
        "bob",
        &mut bob_events,
        "the real alice",
    )
    .await;
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// A peer whose key the node pinned comes back with another key (its claim lapsed and the
/// name was registered again, so the directory vouches for the new key): its inbound
/// connection is accepted with `Event::KeyChanged` raised and the pin kept; what it sends is
/// acknowledged (durable) but held, and shown only after `trust`.
#[tokio::test(start_paused = true)]
async fn a_pinned_peer_dialing_in_with_a_new_key_is_held_until_trusted() {
    let world = World {
        directory: MemoryDiscovery::with_timeouts(Duration::from_secs(30), Duration::from_secs(60)),
        ..World::new()
    };
    let first_alice = world.memory_node("alice").await;
    let bob = world.memory_node("bob").await;
    let (mut first_events, mut bob_events) = (first_alice.events(), bob.events());
    first_alice
        .send("bob", "from the first alice")
        .await
        .expect("send");
    wait_for(&mut first_events, |e| matches!(e, Event::Delivered { .. })).await;
    assert_eq!(
        receive_n(&mut bob_events, 1).await[0].0,
        "from the first alice"
    );
    let pinned = first_alice.public_key().fingerprint();
    assert_eq!(bob.fingerprint("alice").await.expect("fingerprint"), pinned);
    first_alice.shutdown().await.expect("shutdown");

    // The claim lapses; "alice" is registered again with another key.
    for _ in 0..120 {
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
    }
    let new_id = Identity::generate();
    let new_alice = world
        .node_with("alice", new_id.clone(), None, world.network.clone())
        .await;
    let mut raw = RawPeer::connect(
        &world.network,
        bob.local_addr(),
        &new_id,
        "alice",
        "bob",
        &bob.public_key(),
    )
    .await
    .expect("the new key, vouched for by the directory, is let in");
    let Event::KeyChanged { username, old, new } =
        wait_for(&mut bob_events, |e| matches!(e, Event::KeyChanged { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(username, "alice");
    assert_eq!(old, pinned);
    assert_eq!(new, new_id.public_key().fingerprint());
    assert_eq!(
        bob.fingerprint("alice").await.expect("fingerprint"),
        pinned,
        "the pin stays until the user trusts the new key"
    );

    let pair = PairKey::derive(&new_id, &bob.public_key()).expect("derive");
    let id = MessageId::random();
    raw.send(PeerFrame::Message {
        id,
        token: sealed(&pair, id, "alice", "bob", "it is me, new key"),
    })
    .await
    .expect("send");
    let acked = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match raw.recv().await.expect("the connection stays open") {
                PeerFrame::Ack { ids, .. } => return ids,
                PeerFrame::Ping(n) => raw.send(PeerFrame::Pong(n)).await.expect("pong"),
                _ => {}
            }
        }
    })
    .await
    .expect("the held message is acknowledged");
    assert_eq!(acked, vec![id], "held durably, so acknowledged");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "a message from the untrusted key is not shown"
    );
    assert_eq!(
        bob.fingerprint("alice").await.expect("fingerprint"),
        pinned,
        "still pinned to the old key"
    );

    bob.trust("alice").await.expect("trust");
    assert_eq!(
        bob.fingerprint("alice").await.expect("fingerprint"),
        new_id.public_key().fingerprint(),
        "trust pins the new key"
    );
    let Event::MessageReceived {
        id: shown, text, ..
    } = wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!((shown, text.as_str()), (id, "it is me, new key"));
    drop(raw);
    new_alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// Tokens planted in the node's mailbox (which anyone with access to a shared Redis could
/// do): a replay of a message already shown live is dropped as a duplicate; a token bob
/// sealed for alice reflected back as if from alice, and one alice sealed for carol, are
/// rejected with an error event. None is shown; every one leaves the mailbox; a genuine
/// message behind them is shown, marked offline.
#[tokio::test]
async fn replayed_and_reflected_tokens_in_the_mailbox_are_not_shown() {
    let world = World::new();
    let (bob, mut raw, pair) = bob_and_raw_alice(&world).await;
    let mut bob_events = bob.events();
    let live = MessageId::random();
    let live_token = sealed(&pair, live, "alice", "bob", "shown once");
    raw.send(PeerFrame::Message {
        id: live,
        token: live_token.clone(),
    })
    .await
    .expect("send");
    assert_eq!(receive_n(&mut bob_events, 1).await[0].0, "shown once");

    let stored = |id: MessageId, token: String| StoredMessage {
        id,
        from: "alice".into(),
        to: "bob".into(),
        token,
        expires_at: std::time::SystemTime::now() + Duration::from_secs(3600),
    };
    let reflected = MessageId::random();
    let rerouted = MessageId::random();
    let genuine = MessageId::random();
    let planted = [
        stored(live, live_token),
        stored(
            reflected,
            sealed(&pair, reflected, "bob", "alice", "reflected"),
        ),
        stored(
            rerouted,
            sealed(&pair, rerouted, "alice", "carol", "rerouted"),
        ),
        stored(genuine, sealed(&pair, genuine, "alice", "bob", "genuine")),
    ];
    for message in planted {
        world.store.put(message).await.expect("plant");
    }
    let mut errors = Vec::new();
    let shown = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match bob_events.next().await.expect("events open") {
                Event::MessageReceived {
                    id, text, offline, ..
                } => return (id, text, offline),
                Event::Error { message } => errors.push(message),
                _ => {}
            }
        }
    })
    .await
    .expect("the genuine message in time");
    assert_eq!(
        shown,
        (genuine, "genuine".to_owned(), true),
        "the first message shown is the genuine one"
    );
    // Messages come from the inbox, other events from the event buffer: the second refusal
    // may be reported after the genuine message is shown.
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while errors.len() < 2 {
            match bob_events.next().await.expect("events open") {
                Event::Error { message } => errors.push(message),
                Event::MessageReceived { text, .. } => panic!("{text:?} was shown"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("both refusals are reported: {errors:?}"));
    assert!(
        errors
            .iter()
            .all(|e| e.contains("refused") && e.contains("arrived on")),
        "{errors:?}"
    );
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while !world
            .store
            .fetch("bob", 10)
            .await
            .expect("fetch")
            .is_empty()
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every planted token leaves the mailbox");
    bob.shutdown().await.expect("shutdown");
    let rest = buffered(&mut bob_events);
    assert!(
        !rest
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing else was shown"
    );
    errors.extend(rest.into_iter().filter_map(|e| match e {
        Event::Error { message } => Some(message),
        _ => None,
    }));
    assert_eq!(errors.len(), 2, "one refusal each: {errors:?}");
}

/// Timings a caller might pass by mistake (`Duration::MAX`, zero) are refused by `spawn` with
/// a configuration error instead of overflowing clock arithmetic later; the longest accepted
/// is `MAX_MESSAGE_TTL`.
#[tokio::test]
async fn out_of_range_timings_are_refused_at_spawn() {
    let world = World::new();
    let build = |f: fn(p2pchat_core::ChatNodeBuilder) -> p2pchat_core::ChatNodeBuilder| {
        f(world.builder("alice", Identity::generate(), None, world.network.clone())).spawn()
    };
    for (what, result) in [
        ("ttl max", build(|b| b.message_ttl(Duration::MAX)).await),
        ("ttl zero", build(|b| b.message_ttl(Duration::ZERO)).await),
        ("ack max", build(|b| b.ack_timeout(Duration::MAX)).await),
        ("ack zero", build(|b| b.ack_timeout(Duration::ZERO)).await),
        (
            "keep-alive max",
            build(|b| b.keep_alive_interval(Duration::MAX)).await,
        ),
    ] {
        assert!(
            matches!(result, Err(SpawnError::Config(_))),
            "{what}: {:?}",
            result.map(|_| ())
        );
    }
    let longest = build(|b| b.message_ttl(p2pchat_core::store::MAX_MESSAGE_TTL))
        .await
        .expect("the longest TTL is accepted");
    longest.shutdown().await.expect("shutdown");
}
