//! Hostile input against the discovery server, beyond `bad_input.rs`: a flood of silent
//! connections, an oversized frame on a registered session, odd and look-alike usernames in
//! every request that names a user, deposits and registrations replayed or made in someone
//! else's name, and a node's pinned operator key changing under it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::StreamExt;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, DepositOutcome, MAX_DEPOSIT_BATCH, RegisterRequest, Reply, Request,
    ServerFrame, WireError, WireMailKey, WireMessage, register_transcript,
};
use p2pchat_core::protocol::{FrameCodec, MAX_FRAME_LEN};
use p2pchat_core::testing::shaped_token;
use p2pchat_core::{
    Announcement, ChatNode, Discovery, DiscoveryError, Event, Identity, MessageId, OfflineStore,
    StoredMessage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Decoder, Encoder};

use super::util::*;

/// A raw client connection from a chosen source address, speaking frames by hand.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    nonce: [u8; 32],
    next_id: u64,
}

impl Raw {
    /// Connects from `source` (any 127.0.0.0/8 address) without reading anything.
    async fn connect_silent(source: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.expect("connect")
    }

    /// Connects from 127.0.0.1 and reads the challenge.
    async fn connect(addr: SocketAddr) -> Self {
        let mut raw = Self {
            stream: Self::connect_silent("127.0.0.1", addr).await,
            buf: BytesMut::new(),
            nonce: [0; 32],
            next_id: 1,
        };
        match raw.frame().await {
            Some(ServerFrame::Challenge { nonce }) => raw.nonce = nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
        raw
    }

    /// The next frame, or `None` at end of stream; fails the test after [`WAIT`].
    async fn frame(&mut self) -> Option<ServerFrame> {
        let mut codec = FrameCodec::<ServerFrame>::default();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(frame) = codec.decode(&mut self.buf).expect("server frames decode") {
                    return Some(frame);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the server answers in time")
    }

    /// Expects an error frame matching `pred`, then the end of the connection.
    async fn expect_refusal(&mut self, pred: impl Fn(&WireError) -> bool) {
        match self.frame().await {
            Some(ServerFrame::Error(e)) => assert!(pred(&e), "unexpected error {e:?}"),
            other => panic!("expected an error frame, got {other:?}"),
        }
        assert_eq!(self.frame().await, None, "the server closes the connection");
    }

    async fn send(&mut self, frame: &ClientFrame) {
        let mut buf = BytesMut::new();
        FrameCodec::<ClientFrame>::default()
            .encode(frame, &mut buf)
            .unwrap();
        self.stream.write_all(&buf).await.unwrap();
    }

    fn register_frame(&self, identity: &Identity, name: &str) -> ClientFrame {
        let claim = Claim {
            username: name.to_owned(),
            public_key: identity.public_key(),
            listen_port: 7000,
            announce: Vec::new(),
        };
        let signature = identity.sign(&register_transcript(&self.nonce, &claim));
        ClientFrame::Register(Box::new(RegisterRequest { claim, signature }))
    }

    /// Registers `name` and expects the server to accept.
    async fn register(&mut self, identity: &Identity, name: &str) -> ClientFrame {
        let frame = self.register_frame(identity, name);
        self.send(&frame).await;
        match self.frame().await {
            Some(ServerFrame::Registered(_)) => frame,
            other => panic!("{name} must register, got {other:?}"),
        }
    }

    /// Sends a request and returns its response, skipping pushes.
    async fn request(&mut self, request: Request) -> Result<Reply, WireError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientFrame::Request { id, request }).await;
        loop {
            match self.frame().await {
                Some(ServerFrame::Response { id: got, result }) if got == id => return result,
                Some(ServerFrame::Push(_)) => continue,
                other => panic!("expected the response to request {id}, got {other:?}"),
            }
        }
    }
}

/// Proves the server still serves a well-behaved client from 127.0.0.1.
async fn still_serving(server: &TestServer) {
    let id = Identity::generate();
    let name = format!("ok{:08x}", rand::random::<u32>());
    let (session, _rx) = register(&server.client(), &id, &name).await;
    let me = session.lookup(&name).await.unwrap().expect("found");
    assert!(me.online);
    session.deregister().await.unwrap();
}

/// Waits until the server holds exactly `n` connections.
async fn until_connections(server: &TestServer, n: usize) {
    tokio::time::timeout(WAIT, async {
        while server.server.open_connections() != n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the server holds {} connections, expected {n}",
            server.server.open_connections()
        )
    });
}

fn message(id: MessageId, from: &str, to: &str) -> WireMessage {
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    WireMessage {
        id,
        from: from.to_owned(),
        to: to.to_owned(),
        token: shaped_token(b"sealed"),
        expires_at_ns: expires_at.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

/// 500 connections from one address (127.0.0.2) that never send a byte: the per-address
/// cap (50 here) admits 50, refuses every other one at once with `LimitExceeded`, and a
/// client from another address registers and looks itself up meanwhile. When the flood
/// goes, every slot is given back, and the flooding address is served again.
#[tokio::test]
async fn a_flood_of_silent_connections_hits_the_per_address_cap_and_others_are_still_served() {
    const FLOOD: usize = 500;
    const CAP: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.max_connections_per_ip = CAP;
    // Long enough that no admitted flood connection times out during the test: the cap,
    // not the timeout, is what holds the flood back.
    config.handshake_timeout = Duration::from_secs(60);
    let server = TestServer::start(config, redb(dir.path())).await;

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(Raw::connect_silent("127.0.0.2", server.addr).await);
    }
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for stream in flood {
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
            nonce: [0; 32],
            next_id: 1,
        };
        match raw.frame().await {
            Some(ServerFrame::Challenge { .. }) => admitted.push(raw),
            Some(ServerFrame::Error(WireError::LimitExceeded(why))) => {
                assert!(why.contains("one address"), "{why}");
                assert_eq!(raw.frame().await, None, "a refused connection is closed");
                refused += 1;
            }
            other => panic!("expected a challenge or a refusal, got {other:?}"),
        }
    }
    assert_eq!(admitted.len(), CAP, "the cap admits exactly {CAP}");
    assert_eq!(refused, FLOOD - CAP);
    until_connections(&server, CAP).await;

    still_serving(&server).await;
    // The flood is still held, and the other client's slot is given back.
    until_connections(&server, CAP).await;

    drop(admitted);
    until_connections(&server, 0).await;
    let mut again = Raw::connect_silent("127.0.0.2", server.addr).await;
    let mut codec = FrameCodec::<ServerFrame>::default();
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(frame) = codec.decode(&mut buf).unwrap() {
                return frame;
            }
            assert!(again.read_buf(&mut buf).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("a frame in time");
    assert!(
        matches!(first, ServerFrame::Challenge { .. }),
        "the flooding address is served again: {first:?}"
    );
    server.stop().await;
}

/// A registered session that announces a frame over `MAX_FRAME_LEN` gets `LimitExceeded`
/// and is closed: its user goes offline at once (watchers are told), its claim survives
/// (another key still cannot take the name), and other sessions carry on.
#[tokio::test]
async fn an_oversized_frame_on_a_registered_session_ends_only_that_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (watcher, mut pushes) = register(&server.client(), &Identity::generate(), "watcher").await;
    let victim = Identity::generate();
    // The victim's name is held (only held names can be watched); it is away.
    let (away, _v) = register(&server.client(), &victim, "victim").await;
    away.deregister().await.unwrap();
    watcher.watch("victim").await.unwrap();
    let mut raw = Raw::connect(server.addr).await;
    raw.register(&victim, "victim").await;
    expect_presence(&mut pushes, "victim", true).await;
    assert_eq!(raw.request(Request::KeepAlive).await, Ok(Reply::Done));

    let mut big = u32::try_from(MAX_FRAME_LEN + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    big.extend_from_slice(&[1; 4096]);
    raw.stream.write_all(&big).await.unwrap();
    raw.expect_refusal(|e| matches!(e, WireError::LimitExceeded(_)))
        .await;
    expect_presence(&mut pushes, "victim", false).await;

    watcher
        .keep_alive()
        .await
        .expect("the other session carries on");
    let record = watcher
        .lookup("victim")
        .await
        .unwrap()
        .expect("still claimed");
    assert!(!record.online);
    assert_eq!(record.public_key, victim.public_key());
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    let hijack = server
        .client()
        .register(&Identity::generate(), registration("victim", 7000), tx)
        .await;
    assert!(
        matches!(hijack, Err(DiscoveryError::NameTaken { .. })),
        "{hijack:?}"
    );
    let (back, _rx) = register(&server.client(), &victim, "victim").await;
    back.keep_alive().await.unwrap();
    server.stop().await;
}

/// Usernames with control characters or that imitate another name, and very long ones.
fn odd_usernames() -> Vec<String> {
    vec![
        String::new(),
        "a".repeat(33),
        "a".repeat(100_000),
        "ali\0ce".into(),
        "a\tb".into(),
        "bob\r".into(),
        "bell\u{7}".into(),
        "red\u{1b}[31m".into(),
        "del\u{7f}".into(),
        "bob\u{435}".into(),    // Cyrillic 'е'
        "\u{ff41}lice".into(),  // fullwidth 'ａ'
        "ali\u{200b}ce".into(), // zero-width space
        "ali\u{200d}ce".into(), // zero-width joiner
        "alice\u{301}".into(),  // combining acute accent
        "\u{202e}ecila".into(), // right-to-left override
        "\u{e5}lice".into(),    // 'å'
        "ALICE".into(),
        ".alice".into(),
    ]
}

/// The server refuses odd and look-alike usernames wherever a client names a user, with a
/// typed error and without touching anything: a registration is refused (`InvalidUsername`)
/// and closed; on a registered session a lookup finds nobody, a watch and a deposit are
/// refused, and the session carries on. The client library refuses the same names itself
/// with `DiscoveryError::InvalidUsername`.
#[tokio::test]
async fn odd_usernames_are_refused_in_every_request_that_names_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let id = Identity::generate();
    let mut session = Raw::connect(server.addr).await;
    session.register(&Identity::generate(), "checker").await;
    for name in odd_usernames() {
        let shown = name.escape_debug().to_string();
        let shown = &shown[..shown.len().min(40)];
        let mut raw = Raw::connect(server.addr).await;
        let frame = raw.register_frame(&id, &name);
        raw.send(&frame).await;
        raw.expect_refusal(|e| matches!(e, WireError::InvalidUsername(n) if *n == name))
            .await;

        assert_eq!(
            session
                .request(Request::Lookup {
                    username: name.clone()
                })
                .await,
            Ok(Reply::Record(None)),
            "lookup {shown}"
        );
        assert_eq!(
            session
                .request(Request::Watch {
                    username: name.clone()
                })
                .await,
            Err(WireError::InvalidUsername(name.clone())),
            "watch {shown}"
        );
        let deposit = message(MessageId::random(), "checker", &name);
        assert_eq!(
            session.request(Request::Deposit(Box::new(deposit))).await,
            Err(WireError::InvalidUsername(name.clone())),
            "deposit for {shown}"
        );

        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let refused = server
            .client()
            .register(&id, registration(&name, 7000), tx)
            .await;
        assert!(
            matches!(refused, Err(DiscoveryError::InvalidUsername(_))),
            "client, {shown}: {refused:?}"
        );
    }
    assert_eq!(session.request(Request::KeepAlive).await, Ok(Reply::Done));
    assert_eq!(
        session.request(Request::FetchMail { limit: 10 }).await,
        Ok(Reply::Mail(Vec::new())),
        "nothing was deposited anywhere"
    );
    still_serving(&server).await;
    server.stop().await;
}

/// Replays and forgeries on a session: a deposit in another user's name is refused by the
/// server itself (not only by the client library); a replayed deposit is stored once; the
/// session's own registration frame sent again is refused and ends the session, which
/// another connection cannot take over with the same frame either.
#[tokio::test]
async fn forged_and_replayed_deposits_and_registrations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (_alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    let mallory_id = Identity::generate();
    let mut mallory = Raw::connect(server.addr).await;
    let registration_frame = mallory.register(&mallory_id, "mallory").await;

    let forged = message(MessageId::random(), "alice", "bob");
    match mallory.request(Request::Deposit(Box::new(forged))).await {
        Err(WireError::Forbidden(why)) => assert!(why.contains("alice"), "{why}"),
        other => panic!("a deposit in alice's name must be forbidden, got {other:?}"),
    }
    let once = message(MessageId::random(), "mallory", "bob");
    for _ in 0..3 {
        assert_eq!(
            mallory
                .request(Request::Deposit(Box::new(once.clone())))
                .await,
            Ok(Reply::Done)
        );
    }
    let ids = |mail: Vec<StoredMessage>| -> Vec<_> {
        mail.into_iter()
            .map(|m| (m.id, m.from, m.to, m.token))
            .collect()
    };
    let mail = bob.mailbox().unwrap().fetch("bob", 10).await.unwrap();
    let once = (once.id, once.from, once.to, once.token);
    assert_eq!(
        ids(mail),
        vec![once.clone()],
        "one message, from mallory, stored once"
    );

    // The registration frame again, on its own session: refused, and the session ends.
    mallory.send(&registration_frame).await;
    mallory
        .expect_refusal(|e| matches!(e, WireError::BadFrame(_)))
        .await;
    // The same frame on a new connection: signed over another nonce, so refused.
    let mut replay = Raw::connect(server.addr).await;
    replay.send(&registration_frame).await;
    replay
        .expect_refusal(|e| *e == WireError::BadSignature)
        .await;
    let record = bob.lookup("mallory").await.unwrap().expect("claimed");
    assert!(!record.online, "no replay brought mallory's session back");
    assert_eq!(
        ids(bob.mailbox().unwrap().fetch("bob", 10).await.unwrap()),
        vec![once]
    );
    server.stop().await;
}

/// A deposit batch is answered per message, in order: stored, a duplicate of one stored
/// before, and refusals (a name nobody holds, another user's name, a token over the limit)
/// that leave the rest of the batch alone. Only the stored ones reach the mailbox, in order.
#[tokio::test]
async fn a_deposit_batch_is_answered_per_message_stored_duplicate_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (_carol, _c) = register(&server.client(), &Identity::generate(), "carol").await;
    let mut alice = Raw::connect(server.addr).await;
    alice.register(&Identity::generate(), "alice").await;

    let first = message(MessageId::random(), "alice", "bob");
    let mut too_big = message(MessageId::random(), "alice", "bob");
    too_big.token = "t".repeat(p2pchat_core::protocol::MAX_TOKEN_LEN + 1);
    let last = message(MessageId::random(), "alice", "bob");
    let batch = vec![
        first.clone(),
        first.clone(),
        message(MessageId::random(), "alice", "nobody"),
        message(MessageId::random(), "carol", "bob"),
        too_big,
        last.clone(),
    ];
    let outcomes = match alice.request(Request::DepositBatch(batch)).await {
        Ok(Reply::Deposited(outcomes)) => outcomes,
        other => panic!("expected an outcome per message, got {other:?}"),
    };
    assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    assert_eq!(outcomes[0], DepositOutcome::Stored);
    assert_eq!(outcomes[1], DepositOutcome::Duplicate);
    assert!(
        matches!(&outcomes[2], DepositOutcome::Refused(WireError::Forbidden(why)) if why.contains("nobody")),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[3], DepositOutcome::Refused(WireError::Forbidden(why)) if why.contains("carol")),
        "{outcomes:?}"
    );
    assert!(
        matches!(
            &outcomes[4],
            DepositOutcome::Refused(WireError::LimitExceeded(_))
        ),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[5], DepositOutcome::Stored);
    let mail = bob.mailbox().unwrap().fetch("bob", 10).await.unwrap();
    let got: Vec<MessageId> = mail.iter().map(|m| m.id).collect();
    assert_eq!(got, vec![first.id, last.id], "the stored ones, in order");

    // Over the batch limit: refused whole, nothing stored.
    let over: Vec<WireMessage> = (0..=MAX_DEPOSIT_BATCH)
        .map(|_| message(MessageId::random(), "alice", "carol"))
        .collect();
    assert!(matches!(
        alice.request(Request::DepositBatch(over)).await,
        Err(WireError::LimitExceeded(_))
    ));
    server.stop().await;
}

/// A batch that crosses the recipient's quota stores up to it and refuses the rest with
/// `QuotaExceeded`, each answered; a later batch for another recipient is unaffected.
#[tokio::test]
async fn a_deposit_batch_over_the_quota_stores_up_to_it_and_refuses_the_rest() {
    const QUOTA: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn p2pchat_discovery::Storage> =
        Arc::new(p2pchat_discovery::RedbStorage::open_with_quota(dir.path(), QUOTA).unwrap());
    let server = TestServer::start(fast_config(), storage).await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (_carol, _c) = register(&server.client(), &Identity::generate(), "carol").await;
    let mut alice = Raw::connect(server.addr).await;
    alice.register(&Identity::generate(), "alice").await;
    let batch: Vec<WireMessage> = (0..QUOTA + 3)
        .map(|_| message(MessageId::random(), "alice", "bob"))
        .collect();
    let outcomes = match alice.request(Request::DepositBatch(batch)).await {
        Ok(Reply::Deposited(outcomes)) => outcomes,
        other => panic!("expected an outcome per message, got {other:?}"),
    };
    assert!(
        outcomes[..QUOTA]
            .iter()
            .all(|o| *o == DepositOutcome::Stored),
        "{outcomes:?}"
    );
    assert!(
        outcomes[QUOTA..].iter().all(|o| matches!(
            o,
            DepositOutcome::Refused(WireError::MailQuota { quota, .. }) if *quota == QUOTA as u64
        )),
        "{outcomes:?}"
    );
    assert_eq!(
        bob.mailbox()
            .unwrap()
            .fetch("bob", 100)
            .await
            .unwrap()
            .len(),
        QUOTA
    );
    let to_carol = vec![message(MessageId::random(), "alice", "carol")];
    assert_eq!(
        alice.request(Request::DepositBatch(to_carol)).await,
        Ok(Reply::Deposited(vec![DepositOutcome::Stored]))
    );
    server.stop().await;
}

/// Requests pipelined on one session are answered in the order they were sent, though the
/// deposits among them run concurrently: a lookup and a fetch after a run of deposits see
/// them done, and every answer carries the id of its request, in sequence.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_while_deposits_run_together() {
    const DEPOSITS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let mut alice = Raw::connect(server.addr).await;
    alice.register(&Identity::generate(), "alice").await;
    let mut sent = Vec::new();
    let mut frames = Vec::new();
    for i in 0..DEPOSITS {
        let request = if i == DEPOSITS / 2 {
            Request::Lookup {
                username: "bob".into(),
            }
        } else if i % 7 == 3 {
            let batch = (0..3)
                .map(|_| message(MessageId::random(), "alice", "bob"))
                .collect::<Vec<_>>();
            sent.extend(batch.iter().map(|m| m.id));
            Request::DepositBatch(batch)
        } else {
            let m = message(MessageId::random(), "alice", "bob");
            sent.push(m.id);
            Request::Deposit(Box::new(m))
        };
        frames.push(ClientFrame::Request {
            id: i as u64 + 1,
            request,
        });
    }
    frames.push(ClientFrame::Request {
        id: DEPOSITS as u64 + 1,
        request: Request::FetchMail { limit: 10 },
    });
    // All at once, then read.
    for frame in &frames {
        alice.send(frame).await;
    }
    let mut answered = Vec::new();
    while answered.len() < frames.len() {
        match alice.frame().await {
            Some(ServerFrame::Response { id, result }) => answered.push((id, result)),
            Some(ServerFrame::Push(_)) => {}
            other => panic!("expected responses, got {other:?}"),
        }
    }
    let ids: Vec<u64> = answered.iter().map(|(id, _)| *id).collect();
    let expected: Vec<u64> = (1..=frames.len() as u64).collect();
    assert_eq!(ids, expected, "answers in request order");
    for (id, result) in &answered {
        match result {
            Ok(Reply::Done | Reply::Deposited(_) | Reply::Record(Some(_)) | Reply::Mail(_)) => {}
            other => panic!("request {id} failed: {other:?}"),
        }
    }
    let mail = bob.mailbox().unwrap().fetch("bob", 1000).await.unwrap();
    let got: Vec<MessageId> = mail.iter().map(|m| m.id).collect();
    let mut want = sent.clone();
    want.sort();
    let mut have = got.clone();
    have.sort();
    assert_eq!(have, want, "every deposit stored once");
    server.stop().await;
}

/// A node pins the operator key of the first server it registers with. Started later
/// against a server with another operator key (a replaced or impostor server), it reports
/// the change with both fingerprints and shows nothing the new key signs, whether the
/// server relays it or it comes from the node's own announcement feed; announcements the
/// pinned key signs still show.
#[tokio::test]
async fn a_changed_operator_key_is_reported_and_what_it_signs_is_dropped() {
    let data = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pinned_operator, new_operator) = (Identity::generate(), Identity::generate());
    let bob_id = Identity::generate();
    let config = |operator: &Identity| p2pchat_discovery::Config {
        operator: Some(operator.clone()),
        ..fast_config()
    };

    let first = TestServer::start(config(&pinned_operator), redb(first_dir.path())).await;
    let bob = ChatNode::builder()
        .identity(bob_id.clone())
        .username("bob")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(first.client())
        .data_dir(data.path())
        .spawn()
        .await
        .unwrap();
    let mut events = bob.events();
    let hello = Announcement::sign(&pinned_operator, "hello from the first server").unwrap();
    assert_eq!(first.announce(&hello).await.unwrap(), 1);
    wait_event(
        &mut events,
        |e| matches!(e, Event::Announcement { text } if text == "hello from the first server"),
    )
    .await;
    bob.shutdown().await.unwrap();
    first.stop().await;

    let second = TestServer::start(config(&new_operator), redb(second_dir.path())).await;
    let (feed_tx, feed) = futures::channel::mpsc::unbounded::<String>();
    let bob = ChatNode::builder()
        .identity(bob_id)
        .username("bob")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(second.client())
        .data_dir(data.path())
        .announcements(feed)
        .spawn()
        .await
        .unwrap();
    let mut events = bob.events();
    match wait_event(&mut events, |e| matches!(e, Event::Error { .. })).await {
        Event::Error { message } => {
            assert!(message.contains("operator key changed"), "{message}");
            let (old, new) = (
                pinned_operator.public_key().fingerprint().to_string(),
                new_operator.public_key().fingerprint().to_string(),
            );
            assert!(
                message.contains(&old) && message.contains(&new),
                "{message}"
            );
        }
        _ => unreachable!(),
    }
    let relayed = Announcement::sign(&new_operator, "relayed under the new key").unwrap();
    assert_eq!(second.announce(&relayed).await.unwrap(), 1);
    let fed = Announcement::sign(&new_operator, "fed under the new key").unwrap();
    let genuine = Announcement::sign(&pinned_operator, "signed by the pinned key").unwrap();
    feed_tx.unbounded_send(fed.to_json()).unwrap();
    feed_tx.unbounded_send(genuine.to_json()).unwrap();
    match wait_event(&mut events, |e| matches!(e, Event::Announcement { .. })).await {
        Event::Announcement { text } => assert_eq!(
            text, "signed by the pinned key",
            "the first announcement shown is the pinned key's"
        ),
        _ => unreachable!(),
    }
    bob.shutdown().await.unwrap();
    let mut rest = Vec::new();
    while let Some(event) = events.next().await {
        rest.push(event);
    }
    assert!(
        !rest.iter().any(|e| matches!(e, Event::Announcement { .. })),
        "nothing the new key signed was shown: {rest:?}"
    );
    second.stop().await;
}

/// The review's attack on the wire: mallory, who saw the id of alice's message go by,
/// deposits junk under it in bob's mailbox first. Alice's deposit is still stored (not
/// "duplicate"), bob fetches both, acknowledging by id alone is refused (it cannot say
/// whose message it means), and acknowledging mallory's message leaves alice's.
async fn another_senders_id_neither_hides_nor_removes_a_message(
    storage: Arc<dyn p2pchat_discovery::Storage>,
) {
    let server = TestServer::start(fast_config(), storage).await;
    let mut bob = Raw::connect(server.addr).await;
    bob.register(&Identity::generate(), "bob").await;
    let mut mallory = Raw::connect(server.addr).await;
    mallory.register(&Identity::generate(), "mallory").await;
    let mut alice = Raw::connect(server.addr).await;
    alice.register(&Identity::generate(), "alice").await;

    let genuine = message(MessageId::random(), "alice", "bob");
    let mut junk = message(genuine.id, "mallory", "bob");
    junk.token = shaped_token(b"junk");
    assert_eq!(
        mallory
            .request(Request::Deposit(Box::new(junk.clone())))
            .await,
        Ok(Reply::Done)
    );
    assert_eq!(
        alice
            .request(Request::DepositBatch(vec![
                genuine.clone(),
                genuine.clone()
            ]))
            .await,
        Ok(Reply::Deposited(vec![
            DepositOutcome::Stored,
            DepositOutcome::Duplicate
        ])),
        "alice's message is stored; only her own repeat is a duplicate"
    );
    assert_eq!(
        bob.request(Request::FetchMail { limit: 10 }).await,
        Ok(Reply::Mail(vec![junk.clone(), genuine.clone()]))
    );
    assert_eq!(
        bob.request(Request::AckMailFrom {
            acked: vec![WireMailKey {
                from: "mallory".into(),
                id: junk.id
            }]
        })
        .await,
        Ok(Reply::Done)
    );
    assert_eq!(
        bob.request(Request::FetchMail { limit: 10 }).await,
        Ok(Reply::Mail(vec![genuine.clone()])),
        "acknowledging mallory's message leaves alice's"
    );

    // A node from before `AckMailFrom` acknowledges by id alone: that means the messages
    // with the id that it was handed, never another one behind them with the same id.
    junk.token = shaped_token(b"junk-again");
    assert_eq!(
        mallory
            .request(Request::Deposit(Box::new(junk.clone())))
            .await,
        Ok(Reply::Done)
    );
    assert_eq!(
        bob.request(Request::FetchMail { limit: 1 }).await,
        Ok(Reply::Mail(vec![genuine.clone()]))
    );
    assert_eq!(
        bob.request(Request::AckMail {
            ids: vec![genuine.id]
        })
        .await,
        Ok(Reply::Done)
    );
    assert_eq!(
        bob.request(Request::FetchMail { limit: 10 }).await,
        Ok(Reply::Mail(vec![junk.clone()])),
        "the acknowledgement by id took the message handed out, not the unseen one"
    );
    assert_eq!(
        bob.request(Request::AckMail { ids: vec![junk.id] }).await,
        Ok(Reply::Done)
    );
    assert_eq!(
        bob.request(Request::FetchMail { limit: 10 }).await,
        Ok(Reply::Mail(vec![])),
        "an old node still empties its mailbox"
    );
    server.stop().await;
}

#[tokio::test]
async fn another_senders_id_neither_hides_nor_removes_a_message_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    another_senders_id_neither_hides_nor_removes_a_message(redb(dir.path())).await;
}

#[tokio::test]
async fn another_senders_id_neither_hides_nor_removes_a_message_on_redis() {
    let redis = redis();
    another_senders_id_neither_hides_nor_removes_a_message(redis_storage(&redis.url()).await).await;
}

/// A registered session that sends nothing for the idle timeout is closed; one that keeps
/// sending (keep-alives well inside the timeout) stays open for several timeouts.
#[tokio::test]
async fn a_quiet_session_is_closed_after_the_idle_timeout_and_a_chatty_one_is_not() {
    let idle = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.idle_timeout = idle;
    let server = TestServer::start(config, redb(dir.path())).await;
    let mut quiet = Raw::connect(server.addr).await;
    quiet.register(&Identity::generate(), "quiet").await;
    let mut chatty = Raw::connect(server.addr).await;
    chatty.register(&Identity::generate(), "chatty").await;
    let started = tokio::time::Instant::now();

    // Four timeouts of keep-alives, a tenth of the timeout apart.
    while started.elapsed() < idle * 4 {
        assert_eq!(chatty.request(Request::KeepAlive).await, Ok(Reply::Done));
        tokio::time::sleep(idle / 10).await;
    }
    // Long closed by now: the server hung up on the quiet one.
    loop {
        match quiet.frame().await {
            None => break,
            Some(ServerFrame::Push(_)) => continue,
            other => panic!("expected the quiet session to be closed, got {other:?}"),
        }
    }
    assert_eq!(
        chatty.request(Request::KeepAlive).await,
        Ok(Reply::Done),
        "the chatty session is still served"
    );
    server.stop().await;
}
