//! Attacks on what the server keeps for everyone, through the real server on 127.0.0.1: a
//! registered user (or one address) trying to exhaust names, watches or lookups. Each is
//! refused with a typed error naming the limit, and a legitimate user is served meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use p2pchat_core::discovery::DiscoveryError;
use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::MessageId;
use p2pchat_core::protocol::discovery::MAX_DEPOSIT_BATCH;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, RegisterRequest, ServerFrame, WireError, register_transcript,
};
use p2pchat_core::store::{
    DEFAULT_MESSAGE_TTL, DEFAULT_PAIR_QUOTA, MailKey, Quota, Quotas, StoreError, StoredMessage,
};
use p2pchat_core::testing::{fernet, shaped_token};
use p2pchat_core::{DiscoverySession, Identity};
use p2pchat_discovery::Config;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::util::*;

/// Registers `name` with `identity` over a pipe, as a client the server sees at `observed`:
/// the server's verdict (the registration is then dropped).
async fn register_from(
    server: &TestServer,
    observed: SocketAddr,
    identity: &Identity,
    name: &str,
) -> Result<(), WireError> {
    let (client, server_end) = tokio::io::duplex(64 << 10);
    let (read, write) = tokio::io::split(server_end);
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(p2pchat_discovery::serve_connection(
        server.server.clone(),
        read,
        write,
        observed,
        stop.clone(),
    ));
    let (r, w) = tokio::io::split(client);
    let mut reader = FramedRead::new(r, FrameCodec::<ServerFrame>::default());
    let mut writer = FramedWrite::new(w, FrameCodec::<ClientFrame>::default());
    let Some(Ok(ServerFrame::Challenge { nonce })) = reader.next().await else {
        panic!("a challenge first")
    };
    let claim = Claim {
        username: name.into(),
        public_key: identity.public_key(),
        listen_port: 7000,
        announce: Vec::new(),
    };
    let signature = identity.sign(&register_transcript(&nonce, &claim));
    writer
        .send(ClientFrame::Register(Box::new(RegisterRequest {
            claim,
            signature,
        })))
        .await
        .unwrap();
    let verdict = match reader.next().await {
        Some(Ok(ServerFrame::Registered(_))) => Ok(()),
        Some(Ok(ServerFrame::Error(e))) => Err(e),
        other => panic!("unexpected {other:?}"),
    };
    // The client hangs up; the session ends with it.
    drop((reader, writer));
    let _ = serving.await;
    verdict
}

#[tokio::test]
async fn new_names_from_one_address_are_limited_per_hour_and_renewals_are_free() {
    const PER_HOUR: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        new_claims_per_hour_per_ip: PER_HOUR,
        ..fast_config()
    };
    let server = TestServer::start(config, redb(dir.path())).await;
    let squatter: SocketAddr = "203.0.113.9:40000".parse().unwrap();
    let ids: Vec<Identity> = (0..PER_HOUR).map(|_| Identity::generate()).collect();
    for (i, id) in ids.iter().enumerate() {
        register_from(&server, squatter, id, &format!("name{i}"))
            .await
            .unwrap_or_else(|e| panic!("name{i}: {e}"));
    }
    let started = Instant::now();
    let mut refused = 0;
    for i in PER_HOUR..PER_HOUR + 20 {
        match register_from(
            &server,
            squatter,
            &Identity::generate(),
            &format!("name{i}"),
        )
        .await
        {
            Err(WireError::LimitExceeded(why)) => {
                assert!(why.contains("new names per hour"), "{why}");
                refused += 1;
            }
            other => panic!("name{i} from the same address: {other:?}"),
        }
    }
    println!(
        "new claims: {PER_HOUR} claimed, then 20 more refused in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(refused, 20);
    // Renewing one's own name is not a new claim.
    for (i, id) in ids.iter().enumerate() {
        register_from(&server, squatter, id, &format!("name{i}"))
            .await
            .unwrap_or_else(|e| panic!("renewing name{i}: {e}"));
    }
    // Another address is served meanwhile.
    let neighbour: SocketAddr = "198.51.100.20:40000".parse().unwrap();
    register_from(&server, neighbour, &Identity::generate(), "newcomer")
        .await
        .expect("another address claims a name");
}

#[tokio::test]
async fn watches_on_unclaimed_names_are_refused_and_the_server_wide_cap_holds() {
    const CAP: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_total_watches: CAP,
        ..fast_config()
    };
    let server = TestServer::start(config, redb(dir.path())).await;
    let client = server.client();
    let mut held = Vec::new();
    for i in 0..=CAP {
        held.push(register(&client, &Identity::generate(), &format!("user{i}")).await);
    }
    let (mallory, _m) = register(&client, &Identity::generate(), "mallory").await;
    // Names nobody holds cost nothing to refuse.
    for i in 0..1_000 {
        match mallory.watch(&format!("ghost{i}")).await {
            Err(DiscoveryError::Refused(why)) => assert!(why.contains("nobody has the name")),
            other => panic!("a watch on an unclaimed name: {other:?}"),
        }
    }
    assert_eq!(server.server.watches(), 0);
    for i in 0..CAP {
        mallory.watch(&format!("user{i}")).await.unwrap();
    }
    match mallory.watch(&format!("user{CAP}")).await {
        Err(DiscoveryError::LimitExceeded(why)) => assert!(why.contains("watches"), "{why}"),
        other => panic!("a watch beyond the cap: {other:?}"),
    }
    assert_eq!(server.server.watches(), CAP);
    // mallory leaves: the watches are given back, and a legitimate user can watch.
    mallory.deregister().await.unwrap();
    drop(mallory);
    let (alice, _a) = register(&client, &Identity::generate(), "alice").await;
    tokio::time::timeout(WAIT, async {
        loop {
            match alice.watch("user0").await {
                Ok(()) => return,
                Err(DiscoveryError::LimitExceeded(_)) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the watches come back when their session ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_flood_on_one_session_is_throttled_and_another_session_is_served() {
    const FLOOD: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        lookups_per_second_per_session: 50,
        ..fast_config()
    };
    let server = TestServer::start(config, redb(dir.path())).await;
    let client = server.client();
    let (_bob, _b) = register(&client, &Identity::generate(), "bob").await;
    let (mallory, _m) = register(&client, &Identity::generate(), "mallory").await;
    let mallory: std::sync::Arc<dyn DiscoverySession> = std::sync::Arc::from(mallory);
    let started = Instant::now();
    let answers = futures::future::join_all((0..FLOOD).map(|_| {
        let mallory = mallory.clone();
        async move { mallory.lookup("bob").await }
    }))
    .await;
    let secs = started.elapsed().as_secs_f64();
    let served = answers.iter().filter(|a| matches!(a, Ok(Some(_)))).count();
    let limited = answers
        .iter()
        .filter(|a| matches!(a, Err(DiscoveryError::RateLimited)))
        .count();
    println!(
        "lookups: {FLOOD} on one session in {secs:.2} s: {served} answered, {limited} refused"
    );
    assert_eq!(served + limited, FLOOD, "nothing else happened");
    assert!(
        (served as f64) <= 100.0 + 50.0 * secs + 1.0,
        "{served} answered in {secs:.2} s"
    );
    // Another session (same address) is served meanwhile.
    let (alice, _a) = register(&client, &Identity::generate(), "alice").await;
    assert!(alice.lookup("bob").await.unwrap().is_some());
}

// ---------------------------------------------------------------------------------------
// Mailboxes and the disk (issue 16, item 1)

/// A message from `from` to `to` with a token shaped like a Fernet token holding `text`.
fn mail(from: &str, to: &str, text: &str) -> StoredMessage {
    StoredMessage {
        id: MessageId::random(),
        from: from.to_owned(),
        to: to.to_owned(),
        token: shaped_token(text.as_bytes()),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    }
}

/// What the attack of the review did to bob's mailbox (10,000 junk deposits, which filled
/// it in 6.0 s on redb, 2.9 s on Redis, after which alice's message failed with
/// `QuotaExceeded`): now mallory's first `DEFAULT_PAIR_QUOTA` are stored and the rest
/// refused as `PairMessages`, and alice's message still goes in. Junk that is not a Fernet
/// token (the 90 KiB deposits the review made) is refused whatever its size, and so is a
/// token older than the message TTL; an expiry asked 30 days out is cut to the TTL from the
/// token's timestamp.
async fn one_sender_cannot_fill_a_mailbox(storage: Arc<dyn p2pchat_discovery::Storage>) {
    let server = TestServer::start(fast_config(), storage).await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    let (mallory, _m) = register(&server.client(), &Identity::generate(), "mallory").await;
    let flood = mallory.mailbox().unwrap();
    let (mut stored, mut refused) = (0, 0);
    for round in 0..10_000 / MAX_DEPOSIT_BATCH + 1 {
        let batch = (0..MAX_DEPOSIT_BATCH)
            .map(|i| mail("mallory", "bob", &format!("junk {round} {i}")))
            .collect();
        for outcome in flood.put_many(batch).await {
            match outcome {
                Ok(_) => stored += 1,
                Err(StoreError::QuotaExceeded { limit, quota, .. }) => {
                    assert_eq!((limit, quota), (Quota::PairMessages, DEFAULT_PAIR_QUOTA));
                    refused += 1;
                }
                Err(e) => panic!("a deposit failed with {e}, not the pair quota"),
            }
        }
    }
    assert_eq!(stored, DEFAULT_PAIR_QUOTA, "mallory's deposits stored");
    assert!(refused >= 9_000, "{refused} refused");
    let sent = mail("alice", "bob", "hello bob");
    alice.mailbox().unwrap().put(sent.clone()).await.unwrap();
    let waiting = bob.mailbox().unwrap().fetch("bob", 256).await.unwrap();
    assert_eq!(
        waiting.len(),
        256,
        "bob's mailbox holds mallory's first ones"
    );

    // Not a Fernet token: refused, whatever its size.
    let junk_store = mallory.mailbox().unwrap();
    for junk in [
        "x".repeat(90 * 1024),
        "gAAAAA-junk".to_owned(),
        String::new(),
    ] {
        let mut m = mail("mallory", "alice", "");
        m.token = junk;
        match junk_store.put(m).await {
            Err(StoreError::Forbidden(why)) => assert!(why.contains("Fernet"), "{why}"),
            other => panic!("junk must be refused, got {other:?}"),
        }
    }
    // A token sealed 8 days ago: older than the message TTL (7 days).
    let mut old = mail("mallory", "alice", "");
    let eight_days_ago = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    let stamp = eight_days_ago.duration_since(UNIX_EPOCH).unwrap().as_secs();
    old.token = fernet::seal(&[1; fernet::KEY_LEN], stamp, [2; fernet::IV_LEN], b"old");
    assert!(matches!(
        junk_store.put(old).await,
        Err(StoreError::Forbidden(_))
    ));
    // A sender's clock may run ahead: 10 minutes is taken, 2 hours is not.
    for (ahead, taken) in [(600, true), (7200, false)] {
        let mut m = mail("mallory", "alice", "");
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + ahead;
        m.token = fernet::seal(&[1; fernet::KEY_LEN], stamp, [2; fernet::IV_LEN], b"soon");
        let result = junk_store.put(m).await;
        assert_eq!(result.is_ok(), taken, "{ahead} s ahead: {result:?}");
    }
    // An expiry 30 days out is cut to 7 days from the token's timestamp.
    let mut far = mail("alice", "carol", "see you in a month");
    far.expires_at = SystemTime::now() + Duration::from_secs(30 * 24 * 3600);
    let (carol, _c) = register(&server.client(), &Identity::generate(), "carol").await;
    alice.mailbox().unwrap().put(far).await.unwrap();
    let got = carol.mailbox().unwrap().fetch("carol", 1).await.unwrap();
    let cap = SystemTime::now() + DEFAULT_MESSAGE_TTL;
    assert!(got[0].expires_at <= cap, "expiry not cut to the TTL");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_cannot_fill_a_mailbox_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    one_sender_cannot_fill_a_mailbox(redb(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_cannot_fill_a_mailbox_on_redis() {
    let redis = redis();
    let settings = p2pchat_discovery::storage::RedisStorageConfig {
        prefix: redis.unique_prefix("pair-flood"),
        ..Default::default()
    };
    let storage = p2pchat_discovery::RedisStorage::connect_with(&redis.url(), settings)
        .await
        .unwrap();
    one_sender_cannot_fill_a_mailbox(Arc::new(storage)).await;
}

/// The review's disk attack: a user depositing into mailboxes of names it holds, which
/// never drain. Each name's deposits are bounded per sender; with several senders, the
/// server's byte budget (1 MiB here) refuses the deposit that would pass it as
/// `TotalBytes`, while lookups and registrations go on; once the mail is fetched and
/// acknowledged, deposits are taken again.
async fn the_server_byte_budget_holds(storage: Arc<dyn p2pchat_discovery::Storage>) {
    let server = TestServer::start(fast_config(), storage).await;
    let client = server.client();
    let (sink, _s) = register(&client, &Identity::generate(), "sink").await;
    let (mut stored, mut total_refusal) = (0u64, None);
    let mut senders = Vec::new();
    for s in 0..40 {
        if total_refusal.is_some() {
            break;
        }
        let name = format!("flood{s}");
        let (session, rx) = register(&client, &Identity::generate(), &name).await;
        let store = session.mailbox().unwrap();
        senders.push((session, rx));
        // 4 KiB a message: 64 per sender are within the defaults. The client sends a batch
        // in several requests, which the server may store in any order: every outcome of
        // the batch counts.
        let batch = (0..MAX_DEPOSIT_BATCH)
            .map(|i| mail(&name, "sink", &format!("{i:04096}")))
            .collect();
        for outcome in store.put_many(batch).await {
            match outcome {
                Ok(_) => stored += 1,
                Err(StoreError::QuotaExceeded {
                    limit: Quota::TotalBytes,
                    quota,
                    ..
                }) => total_refusal = Some(quota),
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(total_refusal, Some(1 << 20), "the budget refused a deposit");
    let size = mail("flood0", "sink", &format!("{:04096}", 0)).charged_bytes();
    assert_eq!(stored, (1 << 20) / size, "deposits stored up to the budget");
    // The server serves everyone else meanwhile.
    let (alice, _a) = register(&client, &Identity::generate(), "alice").await;
    assert!(alice.lookup("sink").await.unwrap().is_some());
    // Drained, the budget takes deposits again.
    let inbox = sink.mailbox().unwrap();
    loop {
        let got = inbox.fetch("sink", 256).await.unwrap();
        if got.is_empty() {
            break;
        }
        let keys: Vec<MailKey> = got.iter().map(MailKey::of).collect();
        for chunk in keys.chunks(p2pchat_core::protocol::MAX_ACK_BATCH) {
            inbox.ack("sink", chunk).await.unwrap();
        }
    }
    alice
        .mailbox()
        .unwrap()
        .put(mail("alice", "sink", "room again"))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_byte_budget_holds_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let mut quotas = Quotas::default();
    quotas.total_bytes = 1 << 20;
    let storage = p2pchat_discovery::RedbStorage::open_with_quotas(dir.path(), quotas).unwrap();
    the_server_byte_budget_holds(Arc::new(storage)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_byte_budget_holds_on_redis() {
    let redis = redis();
    let mut quotas = Quotas::default();
    quotas.total_bytes = 1 << 20;
    let settings = p2pchat_discovery::storage::RedisStorageConfig {
        prefix: redis.unique_prefix("byte-budget"),
        quotas,
        ..Default::default()
    };
    let storage = p2pchat_discovery::RedisStorage::connect_with(&redis.url(), settings)
        .await
        .unwrap();
    the_server_byte_budget_holds(Arc::new(storage)).await;
}
