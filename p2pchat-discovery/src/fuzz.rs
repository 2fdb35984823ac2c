//! The check behind the `discovery_protocol` fuzz target (feature `test-utils`), in one
//! place: the target in `fuzz/` calls it with the fuzzer's bytes, and the regression test
//! replays every input kept under `fuzz/regressions/discovery_protocol/` through it
//! (`p2pchat_core::testing::fuzz::replay_regressions`) in the normal suite.
//!
//! It drives one real [`Directory`] per process, over [`RedbStorage`] on a database held in
//! memory ([`RedbStorage::in_memory_with_quota`]: the same tables, transactions and commits as
//! on a file, without the writes and syncs a file costs every commit), on one current-thread
//! runtime. Each input is one client connection over an in-memory pipe.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use p2pchat_core::Identity;
use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, RegisterRequest, ServerFrame, register_transcript,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::session;
use crate::storage::RedbStorage;
use crate::{Config, Directory};

/// The user the check registers as, in mode 1.
pub const USERNAME: &str = "fuzz";

/// [`USERNAME`]'s secret key.
pub const USER_SECRET: [u8; 32] = [0xf0; 32];

/// The server's operator key (so announcements are checked, not refused outright).
pub const OPERATOR_SECRET: [u8; 32] = [0x0e; 32];

/// Messages each mailbox holds: deposits pile up across inputs, so keep them few.
const MAILBOX_QUOTA: usize = 32;

/// How long one connection may take before it counts as hung: the client closes its end as
/// soon as it has written its bytes, so the session never has to wait for the network.
const SESSION_LIMIT: Duration = Duration::from_secs(5);

/// The address the client is taken to connect from.
const PEER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)),
    40_000,
);

struct Harness {
    runtime: tokio::runtime::Runtime,
    server: Arc<Directory>,
    user: Identity,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        // In memory: nothing to leave behind, and no file writes and syncs on every commit.
        let storage = {
            let _guard = runtime.enter();
            RedbStorage::in_memory_with_quota(MAILBOX_QUOTA).expect("the storage opens")
        };
        let config = Config {
            registrations_per_second_per_ip: 0,
            new_claims_per_hour_per_ip: 0,
            deposits_per_second_per_user: 0,
            operator: Some(Identity::from_secret_bytes(&OPERATOR_SECRET)),
            ..Config::default()
        };
        Harness {
            runtime,
            server: Directory::new(config, storage),
            user: Identity::from_secret_bytes(&USER_SECRET),
        }
    })
}

/// One client connection to the discovery server, sending arbitrary bytes.
///
/// Input: a mode byte, then the client's bytes. Mode even: the bytes are all the client
/// sends, from the start (where only a registration or an announcement is accepted). Mode
/// odd: the client first registers as [`USERNAME`] properly (signing the server's
/// challenge), then sends the bytes (requests on a registered session). Either way it then
/// closes its end and reads until the server closes.
///
/// Checks: no panic, no hang; everything the server writes is well-formed frames, starting
/// with its challenge; the bytes alone never register anyone (they cannot sign the fresh
/// challenge); once the connection ends, no session is left registered and [`USERNAME`] is
/// offline.
pub fn discovery_protocol(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let h = harness();
    h.runtime.block_on(async {
        tokio::time::timeout(SESSION_LIMIT, connection(h, mode % 2 == 1, bytes))
            .await
            .expect("the session did not end after the client closed");
        assert_eq!(
            h.server.registered_sessions(),
            0,
            "a session stayed registered after its connection ended"
        );
        let online = h.server.storage.online(USERNAME).await.expect("storage");
        assert!(online.is_none(), "{USERNAME} stayed online: {online:?}");
    });
}

async fn connection(h: &Harness, register: bool, bytes: &[u8]) {
    let (client, server_end) = tokio::io::duplex(64 * 1024);
    let (read, write) = tokio::io::split(server_end);
    let session = session::serve_connection(
        h.server.clone(),
        read,
        write,
        PEER,
        CancellationToken::new(),
    );
    let client = async {
        let (read, mut write) = tokio::io::split(client);
        let mut frames = FramedRead::new(read, FrameCodec::<ServerFrame>::default());
        let nonce = match frames.next().await {
            Some(Ok(ServerFrame::Challenge { nonce })) => nonce,
            other => panic!("the server opened with {other:?}, not a challenge"),
        };
        if register {
            let claim = Claim {
                username: USERNAME.into(),
                public_key: h.user.public_key(),
                listen_port: 7000,
                announce: Vec::new(),
            };
            let signature = h.user.sign(&register_transcript(&nonce, &claim));
            let mut buf = BytesMut::new();
            FrameCodec::<ClientFrame>::default()
                .encode(
                    &ClientFrame::Register(Box::new(RegisterRequest { claim, signature })),
                    &mut buf,
                )
                .expect("a registration encodes");
            write
                .write_all(&buf)
                .await
                .expect("sending the registration");
            match frames.next().await {
                Some(Ok(ServerFrame::Registered(_))) => {}
                other => panic!("a proper registration got {other:?}"),
            }
        }
        let send = async {
            // The server may close first (a bad frame): what it did not read is dropped.
            let _ = write.write_all(bytes).await;
            let _ = write.shutdown().await;
        };
        let receive = async {
            while let Some(frame) = frames.next().await {
                let frame = frame.expect("the server wrote a malformed frame");
                if !register && matches!(frame, ServerFrame::Registered(_)) {
                    panic!("arbitrary bytes registered a session");
                }
            }
        };
        tokio::join!(send, receive);
    };
    tokio::join!(session, client);
}
