//! Micro-benchmarks of the per-message work on the send path: sealing and opening a message
//! under a pair key, and framing a message for the wire.
//!
//! ```text
//! cargo bench -p p2pchat-benches --bench core
//! ```
//!
//! Measurement times are kept short so the whole run takes well under a minute on a
//! 2-core machine; pass criterion options after `--` for longer, steadier runs.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use p2pchat_core::crypto::{PairKey, Payload};
use p2pchat_core::protocol::{FrameCodec, PeerFrame};
use p2pchat_core::{Identity, MessageId};
use tokio_util::codec::{Decoder, Encoder};

/// Message body sizes measured, with their labels.
const BODY_SIZES: &[(&str, usize)] = &[("64B", 64), ("1KiB", 1024), ("64KiB", 64 * 1024)];

/// Oldest token `open` accepts: generous, the tokens are sealed moments before.
const TTL: Duration = Duration::from_secs(3600);

/// Alice's key for talking to Bob (derived as Alice), and Bob's (derived as Bob).
fn pair_keys() -> (PairKey, PairKey) {
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let to_bob = PairKey::derive(&alice, &bob.public_key()).expect("fresh keys are not degenerate");
    let to_alice =
        PairKey::derive(&bob, &alice.public_key()).expect("fresh keys are not degenerate");
    (to_bob, to_alice)
}

fn payload(len: usize) -> Payload {
    Payload {
        id: MessageId::random(),
        from: "alice".into(),
        to: "bob".into(),
        sent_at_ms: 1_700_000_000_000,
        seq: 1_700_000_000_000_000,
        body: "x".repeat(len),
    }
}

fn seal_and_open(c: &mut Criterion) {
    let (alice, bob) = pair_keys();
    let reference = fernet::Fernet::new(&fernet::Fernet::generate_key()).expect("a fresh key");
    let mut group = c.benchmark_group("crypto");
    for &(label, len) in BODY_SIZES {
        let payload = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("seal", label), &payload, |b, p| {
            b.iter(|| alice.seal(black_box(p)))
        });
        let token = alice.seal(&payload);
        group.bench_with_input(BenchmarkId::new("open", label), &token, |b, t| {
            b.iter(|| {
                bob.open(black_box(t), "alice", "bob", TTL)
                    .expect("a fresh token opens")
            })
        });
        // The baseline, in the same run: the `fernet` crate on the same plaintext size (the
        // postcard-encoded payload), as the raw ceiling in `compare` uses it.
        let plain = postcard::to_stdvec(&payload).expect("a payload serialises");
        group.bench_with_input(
            BenchmarkId::new("fernet-crate-encrypt", label),
            &plain,
            |b, p| b.iter(|| reference.encrypt(black_box(p))),
        );
        let token = reference.encrypt(&plain);
        group.bench_with_input(
            BenchmarkId::new("fernet-crate-decrypt", label),
            &token,
            |b, t| {
                b.iter(|| {
                    reference
                        .decrypt(black_box(t))
                        .expect("a fresh token decrypts")
                })
            },
        );
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let (alice, _) = pair_keys();
    let mut group = c.benchmark_group("codec");
    for &(label, len) in &BODY_SIZES[..2] {
        let payload = payload(len);
        let frame = PeerFrame::Message {
            id: payload.id,
            token: alice.seal(&payload),
        };
        let mut codec = FrameCodec::<PeerFrame>::default();
        let mut encoded = BytesMut::new();
        codec
            .encode(&frame, &mut encoded)
            .expect("a message frame is within the limits");
        group.throughput(Throughput::Bytes(encoded.len() as u64));

        let mut buf = BytesMut::with_capacity(encoded.len());
        group.bench_with_input(BenchmarkId::new("encode_message", label), &frame, |b, f| {
            b.iter(|| {
                buf.clear();
                codec
                    .encode(black_box(f), &mut buf)
                    .expect("a message frame is within the limits");
            })
        });
        group.bench_function(BenchmarkId::new("decode_message", label), |b| {
            b.iter_batched_ref(
                || encoded.clone(),
                |src| {
                    codec
                        .decode(black_box(src))
                        .expect("a valid frame decodes")
                        .expect("the frame is complete")
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// The criterion entry points. `criterion_group!` declares an undocumented `pub fn`.
#[allow(missing_docs)]
mod group {
    use super::*;

    criterion_group! {
        name = benches;
        config = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20)
            .nresamples(10_000)
            .without_plots();
        targets = seal_and_open, codec
    }
}
criterion_main!(group::benches);
