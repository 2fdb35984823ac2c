//! Attacks on what the server keeps for everyone, through the real server on 127.0.0.1: a
//! registered user (or one address) trying to exhaust names, watches or lookups. Each is
//! refused with a typed error naming the limit, and a legitimate user is served meanwhile.

use std::net::SocketAddr;
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use p2pchat_core::discovery::DiscoveryError;
use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, RegisterRequest, ServerFrame, WireError, register_transcript,
};
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
