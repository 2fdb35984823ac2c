//! Send-to-delivered between two `ChatNode`s, over `MemoryNetwork` and over TCP on
//! 127.0.0.1: one message at a time (the round trip: sealed, sent, opened, acknowledged,
//! reported `Delivered`), and 1,000 pipelined.
//!
//! ```text
//! cargo bench -p p2pchat-benches --bench node
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use p2pchat_core::{
    ChatNode, Event, Events, MemoryDiscovery, MemoryNetwork, MemoryStore, TcpTransport, Transport,
};
use tokio::sync::Mutex;

/// Two nodes and the sender's event stream.
struct Pair {
    alice: ChatNode,
    events: Events,
    _bob: ChatNode,
    _bob_events: Events,
}

impl Pair {
    async fn start(transport: impl Transport + Clone) -> Self {
        let (directory, store) = (MemoryDiscovery::new(), MemoryStore::new());
        let node = |name: &str| {
            ChatNode::builder()
                .username(name)
                .listen("127.0.0.1:0".parse().expect("address"))
                .transport(transport.clone())
                .discovery(directory.clone())
                .offline_store(store.clone())
                .event_capacity(1 << 16)
                .spawn()
        };
        let alice = node("alice").await.expect("alice starts");
        let bob = node("bob").await.expect("bob starts");
        let mut pair = Self {
            events: alice.events(),
            _bob_events: bob.events(),
            alice,
            _bob: bob,
        };
        pair.send_and_wait(1, "warm up").await;
        pair
    }

    /// Sends `n` messages (pipelined) and waits until all are delivered.
    async fn send_and_wait(&mut self, n: usize, body: &str) {
        for _ in 0..n {
            self.alice.send("bob", body).await.expect("send");
        }
        let mut delivered = 0;
        while delivered < n {
            match self.events.next().await.expect("events open") {
                Event::Delivered { .. } => delivered += 1,
                Event::StoredOffline { .. } | Event::SendFailed { .. } => {
                    panic!("a message was not delivered directly")
                }
                _ => {}
            }
        }
    }
}

fn send_to_delivered(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pairs: Vec<(&str, Arc<Mutex<Pair>>)> = rt.block_on(async {
        vec![
            (
                "memory",
                Arc::new(Mutex::new(Pair::start(MemoryNetwork::new()).await)),
            ),
            (
                "tcp",
                Arc::new(Mutex::new(Pair::start(TcpTransport::new()).await)),
            ),
        ]
    });
    let body = "x".repeat(64);
    for (n, label) in [(1usize, "one at a time"), (1000, "1000 pipelined")] {
        let mut group = c.benchmark_group(format!("send_to_delivered/{label}"));
        group.throughput(Throughput::Elements(n as u64));
        for (name, pair) in &pairs {
            group.bench_function(BenchmarkId::new("64B", name), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let pair = pair.clone();
                    let body = body.clone();
                    async move {
                        let mut pair = pair.lock().await;
                        let started = Instant::now();
                        for _ in 0..iters {
                            pair.send_and_wait(n, &body).await;
                        }
                        started.elapsed()
                    }
                })
            });
        }
        group.finish();
    }
}

/// The criterion entry points. `criterion_group!` declares an undocumented `pub fn`.
#[allow(missing_docs)]
mod group {
    use super::*;

    criterion_group! {
        name = benches;
        config = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(20)
            .without_plots();
        targets = send_to_delivered
    }
}
criterion_main!(group::benches);
