//! Every backend passes its trait's conformance suite.

use std::time::Duration;

use p2pchat_core::testing::{
    SharedStore, discovery_conformance, store_conformance, transport_conformance,
};
use p2pchat_core::{MemoryDiscovery, MemoryNetwork, MemoryStore, TcpTransport};

#[tokio::test]
async fn tcp_transport_conforms() {
    transport_conformance(|| async { TcpTransport::new() }).await;
}

#[tokio::test]
async fn memory_network_conforms() {
    transport_conformance(|| async { MemoryNetwork::new() }).await;
}

#[tokio::test]
async fn memory_discovery_conforms() {
    let ttl = Duration::from_secs(1);
    discovery_conformance(
        || async move { MemoryDiscovery::with_timeouts(ttl, Duration::from_secs(3600)) },
        ttl,
    )
    .await;
}

#[tokio::test]
async fn memory_store_conforms() {
    store_conformance(|quotas| async move { SharedStore::new(MemoryStore::with_quotas(quotas)) })
        .await;
}
