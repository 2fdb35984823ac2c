//! [`RedisStore`] against real `redis-server` processes: the store suite, a Redis restart in
//! the middle of a run, concurrent sweepers, and what an observer of Redis gets to see.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use futures::{FutureExt, StreamExt};
use p2pchat_core::store::{MailKey, Quotas};
use p2pchat_core::testing::{RedisServer, SharedStore, TestRedis, store_conformance};
use p2pchat_core::{
    ChatNode, Event, Identity, MemoryDiscovery, MessageId, OfflineStore, RedisStore,
    RedisStoreConfig, StoreError, StoredMessage, TcpTransport,
};
use redis::Value;

use super::util::wait_for;

/// The longest a test waits for the store to come back after Redis restarts.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

fn message(from: &str, to: &str, n: usize, expires_at: SystemTime) -> StoredMessage {
    StoredMessage {
        id: MessageId::random(),
        from: from.to_owned(),
        to: to.to_owned(),
        token: format!("gAAAAA-token-{n}"),
        expires_at,
    }
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Takes every notice already waiting on `notices`, without waiting.
fn drain_notices(notices: &mut futures::stream::BoxStream<'static, ()>) -> usize {
    let mut n = 0;
    while let Some(Some(())) = notices.next().now_or_never() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn redis_store_passes_the_store_suite() {
    let redis = TestRedis::from_env_or_start();
    let url = redis.url();
    let prefix = redis.unique_prefix("store-suite");
    store_conformance(|quotas| {
        let (url, prefix) = (
            url.clone(),
            format!("{prefix}{:08x}", rand::random::<u32>()),
        );
        async move {
            let config = RedisStoreConfig { prefix, quotas };
            SharedStore::new(RedisStore::connect_with(&url, config).await.unwrap())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_reconnects_after_redis_restarts_and_loses_or_repeats_nothing() {
    let mut server = RedisServer::start_with_appendonly();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut notices = store.subscribe("bob").await.unwrap();
    let messages: Vec<StoredMessage> = (0..500)
        .map(|n| message("alice", "bob", n, in_an_hour()))
        .collect();

    for m in &messages[..250] {
        store.put(m.clone()).await.unwrap();
    }
    // Let the feed task hand over the notices of those puts, then forget them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(drain_notices(&mut notices) > 0, "puts are announced");

    server.kill();
    let mut refused = 0;
    for _ in 0..3 {
        match store.put(messages[250].clone()).await {
            Err(StoreError::Unavailable(_)) => refused += 1,
            other => panic!("a put while Redis is down must be Unavailable, got {other:?}"),
        }
    }
    assert_eq!(refused, 3);
    assert!(matches!(
        store.fetch("bob", 10).await,
        Err(StoreError::Unavailable(_))
    ));

    server.restart();
    // Nothing was put since the restart: this notice is the store saying that mail may have
    // come in while its subscription was down.
    tokio::time::timeout(RECOVERY_TIMEOUT, notices.next())
        .await
        .expect("a notice once Redis is back")
        .expect("the notice stream stays open");

    // The same store, reconnected by itself: the rest goes in, the refused put included.
    for m in &messages[250..] {
        store.put(m.clone()).await.unwrap();
    }
    let fetched = store.fetch("bob", 1000).await.unwrap();
    assert_eq!(
        fetched, messages,
        "every put that returned Ok is there exactly once, in order"
    );

    // Read and acknowledge in batches, as a node drains: each message exactly once.
    let mut seen = Vec::new();
    loop {
        let batch = store.fetch("bob", 256).await.unwrap();
        if batch.is_empty() {
            break;
        }
        let acked: Vec<MailKey> = batch.iter().map(MailKey::of).collect();
        store.ack("bob", &acked).await.unwrap();
        seen.extend(acked.into_iter().map(|k| k.id));
    }
    let sent: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
    assert_eq!(seen, sent, "drained once each, in order");

    // The subscription itself came back, not just the one notice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_notices(&mut notices);
    store
        .put(message("alice", "bob", 500, in_an_hour()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("new mail is announced after the restart")
        .expect("the notice stream stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_sweeping_at_once_report_each_expiry_once() {
    let redis = TestRedis::from_env_or_start();
    let config = RedisStoreConfig {
        prefix: redis.unique_prefix("sweep-race"),
        quotas: Quotas::default(),
    };
    // Two connections, as two processes would have.
    let first = RedisStore::connect_with(&redis.url(), config.clone())
        .await
        .unwrap();
    let second = RedisStore::connect_with(&redis.url(), config)
        .await
        .unwrap();

    // Enough to take several sweeps, all expiring together.
    let expires_at = SystemTime::now() + Duration::from_secs(2);
    let senders = ["erin", "gina"];
    let mut sent = HashSet::new();
    for n in 0..600 {
        let m = message(senders[n % 2], &format!("frank{}", n % 10), n, expires_at);
        sent.insert(m.id);
        first.put(m).await.unwrap();
    }
    let wait = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(500)).await;

    let sweeper = |store: RedisStore| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for round in 0..10 {
                for sender in senders {
                    got.extend(store.take_expired(sender).await.unwrap());
                }
                assert!(
                    store
                        .fetch(&format!("frank{round}"), 100)
                        .await
                        .unwrap()
                        .is_empty(),
                    "expired messages are never fetched"
                );
            }
            got
        })
    };
    let (a, b) = tokio::join!(sweeper(first.clone()), sweeper(second.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    eprintln!(
        "the first client took {} notices, the second {}",
        a.len(),
        b.len()
    );
    let mut reported: Vec<MessageId> = a.iter().chain(&b).map(|e| e.id).collect();
    for sender in senders {
        for store in [&first, &second] {
            reported.extend(
                store
                    .take_expired(sender)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.id),
            );
        }
    }
    assert_eq!(reported.len(), sent.len(), "each expiry is reported once");
    assert_eq!(
        reported.into_iter().collect::<HashSet<_>>(),
        sent,
        "every expiry is reported"
    );
    for n in 0..10 {
        assert!(
            first
                .fetch(&format!("frank{n}"), 100)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// Every byte string in `value`, recursively.
fn strings(value: &Value, out: &mut Vec<Vec<u8>>) {
    match value {
        Value::BulkString(bytes) => out.push(bytes.clone()),
        Value::SimpleString(s) => out.push(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => out.push(text.clone().into_bytes()),
        Value::Int(n) => out.push(n.to_string().into_bytes()),
        Value::Double(d) => out.push(d.to_string().into_bytes()),
        Value::Array(items) | Value::Set(items) => {
            for item in items {
                strings(item, out);
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                strings(k, out);
                strings(v, out);
            }
        }
        Value::Attribute { data, .. } => strings(data, out),
        _ => {}
    }
}

/// Every key in the Redis at `url` with its type and everything it holds.
async fn dump_redis(url: &str) -> Vec<(String, String, Vec<Vec<u8>>)> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut dump = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut command = match kind.as_str() {
            "string" => redis::cmd("GET"),
            "hash" => redis::cmd("HGETALL"),
            "list" => redis::cmd("LRANGE"),
            "set" => redis::cmd("SMEMBERS"),
            "zset" => redis::cmd("ZRANGE"),
            "stream" => redis::cmd("XRANGE"),
            // Gone since the scan.
            "none" => continue,
            other => panic!("unexpected type {other} of {key}"),
        };
        command.arg(&key);
        match kind.as_str() {
            "list" => {
                command.arg(0).arg(-1);
            }
            "zset" => {
                command.arg(0).arg(-1).arg("WITHSCORES");
            }
            "stream" => {
                command.arg("-").arg("+");
            }
            _ => {}
        }
        let value: Value = command.query_async(&mut conn).await.unwrap();
        let mut contents = vec![key.clone().into_bytes()];
        strings(&value, &mut contents);
        dump.push((key, kind, contents));
    }
    dump
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_only_tokens_and_routing_metadata() {
    const MARKER: &str = "the secret plaintext marker 42";
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let directory = MemoryDiscovery::new();
    let bob_dir = tempfile::tempdir().unwrap();
    let bob_identity = Identity::generate();
    let node = |name: &str, identity: Identity| {
        ChatNode::builder()
            .identity(identity)
            .username(name)
            .listen("127.0.0.1:0".parse().unwrap())
            .transport(TcpTransport::new())
            .discovery(directory.clone())
            .offline_store(store.clone())
            .event_capacity(1 << 12)
    };

    let bob = node("bob", bob_identity.clone())
        .data_dir(bob_dir.path())
        .spawn()
        .await
        .unwrap();
    bob.shutdown().await.unwrap();

    let alice = node("alice", Identity::generate()).spawn().await.unwrap();
    let mut alice_events = alice.events();
    let id = alice.send("bob", MARKER).await.unwrap();
    let outcome = wait_for(&mut alice_events, |e| match e {
        Event::Delivered { id: got, .. }
        | Event::StoredOffline { id: got, .. }
        | Event::SendFailed { id: got, .. } => *got == id,
        _ => false,
    })
    .await;
    assert_eq!(
        outcome,
        Event::StoredOffline {
            id,
            to: "bob".into()
        }
    );

    let dump = dump_redis(&server.url()).await;
    assert!(
        dump.iter()
            .any(|(key, kind, _)| key == "p2pchat:mbox:bob" && kind == "stream"),
        "the message waits in bob's mailbox: {:?}",
        dump.iter().map(|(k, t, _)| (k, t)).collect::<Vec<_>>()
    );
    let id_hex = id.to_string();
    assert!(
        dump.iter()
            .flat_map(|(_, _, contents)| contents)
            .any(|s| contains(s, id_hex.as_bytes())),
        "the dump does show the stored message's metadata"
    );
    for (key, kind, contents) in &dump {
        for s in contents {
            assert!(
                !contains(s, MARKER.as_bytes()) && !contains(s, b"secret plaintext"),
                "plaintext found in {kind} {key}: {}",
                String::from_utf8_lossy(s)
            );
        }
    }

    let bob = node("bob", bob_identity)
        .data_dir(bob_dir.path())
        .spawn()
        .await
        .unwrap();
    let mut bob_events = bob.events();
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
        ("alice", MARKER, true)
    );

    // Bob acknowledged it: the mailbox empties.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.fetch("bob", 10).await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "bob's mailbox is emptied by his ack"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
}

/// Mail written before mailboxes were keyed by sender (ids hash field `{id}`, expiry member
/// `{user}\n{id}`) is still fetched, acknowledged only under its own sender, and expired
/// to its sender: an upgrade strands nothing and hands no one else the old ids.
#[tokio::test]
async fn mail_written_keyed_by_id_alone_is_still_acknowledged_and_expired() {
    let redis = TestRedis::from_env_or_start();
    let prefix = redis.unique_prefix("legacy-ids");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (kept, expired) = (MessageId::random(), MessageId::random());
    for (id, from, exp) in [
        (kept, "alice", now_ms + 3_600_000),
        (expired, "erin", now_ms - 1000),
    ] {
        let id = id.to_string();
        let entry: String = redis::cmd("XADD")
            .arg(format!("{prefix}:mbox:bob"))
            .arg("*")
            .arg(&[
                ("id", id.as_str()),
                ("from", from),
                ("to", "bob"),
                ("token", "gAAAAA-old"),
            ])
            .arg("exp")
            .arg(exp)
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{prefix}:mbox-ids:bob"))
            .arg(&id)
            .arg(&entry)
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg(format!("{prefix}:mbox-expiry"))
            .arg(exp)
            .arg(format!("bob\n{id}"))
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let store = RedisStore::connect_with(
        &redis.url(),
        RedisStoreConfig {
            prefix: prefix.clone(),
            quotas: Quotas::mailbox(100),
        },
    )
    .await
    .unwrap();

    let fetched = store.fetch("bob", 10).await.unwrap();
    assert_eq!(
        fetched.iter().map(MailKey::of).collect::<Vec<_>>(),
        vec![MailKey {
            from: "alice".to_owned(),
            id: kept
        }],
        "the old unexpired message is fetched"
    );
    // Put again by its own sender, the old message is a duplicate; by another sender under
    // its id, a message of its own.
    let mut again = fetched[0].clone();
    let outcome = store.put_many(vec![again.clone()]).await;
    assert!(
        matches!(outcome[..], [Ok(p2pchat_core::store::Put::Duplicate)]),
        "{outcome:?}"
    );
    again.from = "mallory".to_owned();
    store.put(again.clone()).await.unwrap();
    assert_eq!(
        store.fetch("bob", 10).await.unwrap(),
        vec![fetched[0].clone(), again.clone()]
    );
    store.ack("bob", &[MailKey::of(&again)]).await.unwrap();
    let notices = store.take_expired("erin").await.unwrap();
    assert_eq!(
        notices
            .iter()
            .map(|n| (n.id, n.to.as_str()))
            .collect::<Vec<_>>(),
        vec![(expired, "bob")],
        "the old expired message is reported to its sender"
    );

    store
        .ack(
            "bob",
            &[MailKey {
                from: "mallory".to_owned(),
                id: kept,
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        store.fetch("bob", 10).await.unwrap(),
        fetched,
        "another sender naming the old id removes nothing"
    );
    store.ack("bob", &[MailKey::of(&fetched[0])]).await.unwrap();
    assert!(store.fetch("bob", 10).await.unwrap().is_empty());
    let left: (i64, i64) = redis::pipe()
        .cmd("HLEN")
        .arg(format!("{prefix}:mbox-ids:bob"))
        .cmd("ZCARD")
        .arg(format!("{prefix}:mbox-expiry"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(left, (0, 0), "no id or expiry entry is left behind");
}
