//! Operator announcements: relayed by the server (and across instances sharing Redis),
//! published on a Redis channel for nodes listening there, and dropped when unsigned, forged
//! or replayed.

use std::sync::Arc;

use futures::StreamExt;
use p2pchat_core::store::{RedisStore, RedisStoreConfig};
use p2pchat_core::{Announcement, ChatNode, DiscoveryClient, Event, Events, Identity};
use p2pchat_discovery::{Config, RedisStorage, RelayError, Storage};

use super::util::*;

fn config_with(operator: &Identity) -> Config {
    Config {
        operator: Some(operator.clone()),
        ..fast_config()
    }
}

async fn node(name: &str, directory: DiscoveryClient) -> ChatNode {
    ChatNode::builder()
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(directory)
        .keep_alive_interval(TTL / 4)
        .spawn()
        .await
        .unwrap_or_else(|e| panic!("{name} starts: {e}"))
}

/// The next announcement text shown on `events`.
async fn next_announcement(events: &mut Events) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Announcement { text } = events.next().await.expect("events open") {
                return text;
            }
        }
    })
    .await
    .expect("an announcement in time")
}

#[tokio::test]
async fn a_signed_announcement_is_relayed_to_every_online_node_and_forgeries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Identity::generate();
    let server = TestServer::start(config_with(&operator), redb(dir.path())).await;
    let alice = node("alice", server.client()).await;
    let bob = node("bob", server.client()).await;
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());

    let forged = Announcement::sign(&Identity::generate(), "free coins").unwrap();
    assert!(matches!(
        server.announce(&forged).await,
        Err(RelayError::Refused(_))
    ));
    let real = Announcement::sign(&operator, "maintenance at noon").unwrap();
    let sessions = server.announce(&real).await.unwrap();
    assert_eq!(sessions, 2);
    assert_eq!(
        next_announcement(&mut alice_events).await,
        "maintenance at noon"
    );
    assert_eq!(
        next_announcement(&mut bob_events).await,
        "maintenance at noon"
    );
    // The same announcement again is a replay.
    assert!(matches!(
        server.announce(&real).await,
        Err(RelayError::Refused(_))
    ));
    let next = Announcement::sign(&operator, "back to normal").unwrap();
    server.announce(&next).await.unwrap();
    assert_eq!(
        next_announcement(&mut bob_events).await,
        "back to normal",
        "nothing in between: the forgery and the replay were never shown"
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_announcement_to_one_instance_reaches_nodes_on_another_sharing_redis() {
    let redis = redis();
    let operator = Identity::generate();
    let prefix = format!("ann{:08x}", rand::random::<u32>());
    let channel = format!("special-{prefix}");
    let storage = |prefix: String, channel: String| {
        let url = redis.url();
        async move {
            let settings = p2pchat_discovery::storage::RedisStorageConfig {
                prefix,
                announcement_channel: channel,
                ..Default::default()
            };
            Arc::new(RedisStorage::connect_with(&url, settings).await.unwrap()) as Arc<dyn Storage>
        }
    };
    let one = TestServer::start(
        config_with(&operator),
        storage(prefix.clone(), channel.clone()).await,
    )
    .await;
    let two = TestServer::start(
        config_with(&operator),
        storage(prefix.clone(), channel.clone()).await,
    )
    .await;
    let carol = node("carol", two.client()).await;
    let mut events = carol.events();
    let real = Announcement::sign(&operator, "hello from instance one").unwrap();
    one.announce(&real).await.unwrap();
    assert_eq!(
        next_announcement(&mut events).await,
        "hello from instance one"
    );
    carol.shutdown().await.unwrap();
    one.stop().await;
    two.stop().await;
}

/// Publishes `payload` with the real `redis-cli`, as an operator (or an attacker) would.
fn redis_cli_publish(url: &str, channel: &str, payload: &str) {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", url, "PUBLISH", channel, payload])
        .output()
        .expect("redis-cli runs (it comes with redis-server)");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn nodes_listening_on_the_redis_channel_drop_forged_and_replayed_announcements() {
    let redis = redis();
    let dir = tempfile::tempdir().unwrap();
    let operator = Identity::generate();
    // The node pins the operator key at registration with the server…
    let server = TestServer::start(config_with(&operator), redb(dir.path())).await;
    // …and takes announcements from the Redis channel, as the original's nodes did.
    let channel = format!("special-{:08x}", rand::random::<u32>());
    let store = RedisStore::connect_with(
        &redis.url(),
        RedisStoreConfig {
            prefix: format!("n{:08x}", rand::random::<u32>()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let feed = store.announcements(&channel).await.unwrap();
    let bob = ChatNode::builder()
        .username("bob")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(server.client())
        .offline_store(store)
        .announcements(feed)
        .spawn()
        .await
        .unwrap();
    let mut events = bob.events();
    let url = redis.url();

    let forged = Announcement::sign(&Identity::generate(), "send me your password").unwrap();
    redis_cli_publish(&url, &channel, &forged.to_json());
    redis_cli_publish(&url, &channel, "{\"text\":\"unsigned\"}");
    let mut tampered = Announcement::sign(&operator, "maintenance at noon").unwrap();
    tampered.text = "maintenance now, log out".into();
    redis_cli_publish(&url, &channel, &tampered.to_json());
    let real = Announcement::sign(&operator, "maintenance at noon").unwrap();
    redis_cli_publish(&url, &channel, &real.to_json());
    assert_eq!(
        next_announcement(&mut events).await,
        "maintenance at noon",
        "the forged, unsigned and tampered ones before it were dropped"
    );
    // A replay of the real one, then a new one: only the new one shows.
    redis_cli_publish(&url, &channel, &real.to_json());
    let next = Announcement::sign(&operator, "all done").unwrap();
    redis_cli_publish(&url, &channel, &next.to_json());
    assert_eq!(next_announcement(&mut events).await, "all done");
    bob.shutdown().await.unwrap();
    server.stop().await;
}

/// The announcements pushed to a session (not a node: the node's own guard would hide what
/// the server let through), until `marker`.
async fn pushed_until(
    events: &mut tokio::sync::mpsc::Receiver<p2pchat_core::discovery::DiscoveryEvent>,
    marker: &str,
) -> Vec<String> {
    use p2pchat_core::discovery::DiscoveryEvent;
    tokio::time::timeout(WAIT, async {
        let mut texts = Vec::new();
        loop {
            if let DiscoveryEvent::Announcement(a) = events.recv().await.expect("events open") {
                if a.text == marker {
                    return texts;
                }
                texts.push(a.text.clone());
            }
        }
    })
    .await
    .expect("the marker in time")
}

#[tokio::test]
async fn the_server_relays_nothing_stale_or_replayed_from_the_redis_channel() {
    let redis = redis();
    let operator = Identity::generate();
    let prefix = format!("ann{:08x}", rand::random::<u32>());
    let channel = format!("special-{prefix}");
    let settings = p2pchat_discovery::storage::RedisStorageConfig {
        prefix,
        announcement_channel: channel.clone(),
        ..Default::default()
    };
    let storage = RedisStorage::connect_with(&redis.url(), settings)
        .await
        .unwrap();
    let server = TestServer::start(config_with(&operator), Arc::new(storage)).await;
    let (_watcher, mut pushed) = register(&server.client(), &Identity::generate(), "watcher").await;
    let publisher = redis::Client::open(redis.url()).unwrap();
    let mut conn = publisher.get_multiplexed_async_connection().await.unwrap();
    let mut publish = async |a: &Announcement| {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(a.to_json())
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    // A day old, properly signed: published three times.
    let mut stale = Announcement::sign(&operator, "yesterday's news").unwrap();
    stale.issued_at_ms -= 24 * 3600 * 1000;
    stale.signature = hex::encode(operator.sign(&stale.transcript()));
    stale
        .verify(&operator.public_key())
        .expect("properly signed");
    let fresh = Announcement::sign(&operator, "once only").unwrap();
    for _ in 0..3 {
        publish(&stale).await;
        publish(&fresh).await;
    }
    let marker = Announcement::sign(&operator, "marker").unwrap();
    publish(&marker).await;
    assert_eq!(pushed_until(&mut pushed, "marker").await, ["once only"]);
}

#[tokio::test]
async fn a_restarted_server_does_not_relay_an_announcement_again() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Identity::generate();
    let server = TestServer::start(config_with(&operator), redb(dir.path())).await;
    let addr = server.addr;
    let (_w, mut pushed) = register(&server.client(), &Identity::generate(), "watcher").await;
    let a = Announcement::sign(&operator, "maintenance at noon").unwrap();
    server.announce(&a).await.unwrap();
    let first = Announcement::sign(&operator, "first marker").unwrap();
    server.announce(&first).await.unwrap();
    assert_eq!(
        pushed_until(&mut pushed, "first marker").await,
        ["maintenance at noon"]
    );
    server.stop().await;

    let server = TestServer::start_at(addr, config_with(&operator), redb(dir.path())).await;
    let (_w, mut pushed) = register(&server.client(), &Identity::generate(), "watcher2").await;
    assert!(
        matches!(server.announce(&a).await, Err(RelayError::Refused(_))),
        "a replay after the restart"
    );
    let second = Announcement::sign(&operator, "second marker").unwrap();
    server.announce(&second).await.unwrap();
    assert!(pushed_until(&mut pushed, "second marker").await.is_empty());
}
