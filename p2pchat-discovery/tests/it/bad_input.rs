//! Bad input and limits: each misbehaving connection gets a protocol error or is closed, and
//! the server keeps serving everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, RegisterRequest, ServerFrame, WireError, register_transcript,
};
use p2pchat_core::{Discovery, DiscoveryError, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Decoder, FramedRead};

use super::util::*;

/// A raw connection that has read the server's challenge.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    nonce: [u8; 32],
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        Self::connect_from("127.0.0.1", addr).await
    }

    async fn connect_from(source: &str, addr: SocketAddr) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.expect("connect");
        let mut raw = Self {
            stream,
            buf: BytesMut::new(),
            nonce: [0; 32],
        };
        match raw.frame().await {
            Some(ServerFrame::Challenge { nonce }) => raw.nonce = nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
        raw
    }

    /// The next frame, or `None` at end of stream.
    async fn frame(&mut self) -> Option<ServerFrame> {
        read_frame(&mut self.stream, &mut self.buf).await
    }

    /// Expects an error frame matching `pred`, then the end of the connection.
    async fn expect_refusal(&mut self, pred: impl Fn(&WireError) -> bool) {
        match self.frame().await {
            Some(ServerFrame::Error(e)) => assert!(pred(&e), "unexpected error {e:?}"),
            other => panic!("expected an error frame, got {other:?}"),
        }
        assert_eq!(self.frame().await, None, "the server closes the connection");
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, frame: &ClientFrame) {
        let mut buf = BytesMut::new();
        tokio_util::codec::Encoder::encode(
            &mut FrameCodec::<ClientFrame>::default(),
            frame,
            &mut buf,
        )
        .unwrap();
        self.send_raw(&buf).await;
    }

    fn register_frame(&self, signer: &Identity, claimed: &Identity, name: &str) -> ClientFrame {
        let claim = Claim {
            username: name.to_owned(),
            public_key: claimed.public_key(),
            listen_port: 7000,
            announce: Vec::new(),
        };
        let signature = signer.sign(&register_transcript(&self.nonce, &claim));
        ClientFrame::Register(Box::new(RegisterRequest { claim, signature }))
    }
}

/// The next server frame from `reader` (buffered in `buf`), or `None` at end of stream.
async fn read_frame(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Option<ServerFrame> {
    let mut codec = FrameCodec::<ServerFrame>::default();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(frame) = codec.decode(buf).expect("server frames decode") {
                return Some(frame);
            }
            match reader.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server answers in time")
}

/// Proves the server still serves a well-behaved client.
async fn still_serving(server: &TestServer) {
    let id = Identity::generate();
    let name = format!("ok{:08x}", rand::random::<u32>());
    let (session, _rx) = register(&server.client(), &id, &name).await;
    let me = session.lookup(&name).await.unwrap().expect("found");
    assert!(me.online);
    session.deregister().await.unwrap();
}

async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        TestServer::start(fast_config(), redb(dir.path())).await,
        dir,
    )
}

#[tokio::test]
async fn garbage_bytes_get_a_protocol_error_and_a_closed_connection() {
    let (server, _dir) = server().await;
    let mut raw = Raw::connect(server.addr).await;
    // A length that fits, then bytes that are no frame.
    raw.send_raw(&[0, 0, 0, 5, 1, 0xff, 0xff, 0xff, 0xff]).await;
    raw.expect_refusal(|e| matches!(e, WireError::BadFrame(_)))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_without_buffering() {
    let (server, _dir) = server().await;
    let mut raw = Raw::connect(server.addr).await;
    // An HTTP request line read as a length prefix is about 1.2 GB.
    raw.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    raw.expect_refusal(|e| matches!(e, WireError::LimitExceeded(_)))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_protocol_version_is_refused() {
    let (server, _dir) = server().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send_raw(&[0, 0, 0, 2, 99, 0]).await;
    raw.expect_refusal(|e| matches!(e, WireError::UnsupportedVersion(_)))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_registration_signed_by_another_key_is_refused() {
    let (server, _dir) = server().await;
    let (victim, mallory) = (Identity::generate(), Identity::generate());
    let mut raw = Raw::connect(server.addr).await;
    let frame = raw.register_frame(&mallory, &victim, "victim");
    raw.send(&frame).await;
    raw.expect_refusal(|e| *e == WireError::BadSignature).await;
    // A signature over another connection's nonce is no better.
    let mut first = Raw::connect(server.addr).await;
    let replayed = first.register_frame(&victim, &victim, "victim");
    let mut second = Raw::connect(server.addr).await;
    second.send(&replayed).await;
    second
        .expect_refusal(|e| *e == WireError::BadSignature)
        .await;
    first.send(&replayed).await;
    assert!(matches!(
        first.frame().await,
        Some(ServerFrame::Registered(_))
    ));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_requests_and_frames_out_of_order_close_only_that_connection() {
    let (server, _dir) = server().await;
    let id = Identity::generate();
    // A request before registering.
    let mut raw = Raw::connect(server.addr).await;
    raw.send(&ClientFrame::Request {
        id: 1,
        request: p2pchat_core::protocol::discovery::Request::KeepAlive,
    })
    .await;
    raw.expect_refusal(|e| matches!(e, WireError::BadFrame(_)))
        .await;
    // A registered session that sends a request kind the server does not know.
    let mut raw = Raw::connect(server.addr).await;
    let frame = raw.register_frame(&id, &id, "curious");
    raw.send(&frame).await;
    assert!(matches!(
        raw.frame().await,
        Some(ServerFrame::Registered(_))
    ));
    // ClientFrame::Request (variant 1), id 5, request variant 42: postcard varints.
    raw.send_raw(&[0, 0, 0, 4, 1, 1, 5, 42]).await;
    raw.expect_refusal(|e| matches!(e, WireError::BadFrame(_)))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_trickling_one_byte_at_a_time_is_cut_off_by_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.handshake_timeout = Duration::from_millis(500);
    let server = TestServer::start(config, redb(dir.path())).await;
    let raw = Raw::connect(server.addr).await;
    let id = Identity::generate();
    let mut frame = BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut FrameCodec::<ClientFrame>::default(),
        &raw.register_frame(&id, &id, "slow"),
        &mut frame,
    )
    .unwrap();
    // The attacker trickles its registration (one byte per 100 ms: the whole frame would
    // take over ten seconds) while we listen for the server's verdict.
    let Raw {
        mut stream,
        mut buf,
        ..
    } = raw;
    let (mut read, mut write) = stream.split();
    let trickle = async {
        for byte in frame.iter() {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = tokio::time::Instant::now();
    let verdict = tokio::select! {
        _ = trickle => panic!("the server took the whole trickled frame"),
        verdict = read_frame(&mut read, &mut buf) => verdict,
    };
    let elapsed = started.elapsed();
    assert!(
        matches!(
            verdict,
            Some(ServerFrame::Error(WireError::LimitExceeded(_)))
        ),
        "{verdict:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "cut off after {elapsed:?} with a 500 ms handshake timeout"
    );
    assert_eq!(read_frame(&mut read, &mut buf).await, None, "and closed");
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn connection_caps_hold_in_total_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.max_connections = 6;
    config.max_connections_per_ip = 3;
    let server = TestServer::start(config, redb(dir.path())).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::connect(server.addr).await);
    }
    // The fourth from 127.0.0.1 is refused, with a reason.
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut reader = FramedRead::new(stream, FrameCodec::<ServerFrame>::default());
    match tokio::time::timeout(WAIT, reader.next()).await.unwrap() {
        Some(Ok(ServerFrame::Error(WireError::LimitExceeded(why)))) => {
            assert!(why.contains("one address"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another address still gets in, up to the total.
    for _ in 0..3 {
        held.push(Raw::connect_from("127.0.0.2", server.addr).await);
    }
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut reader = FramedRead::new(stream, FrameCodec::<ServerFrame>::default());
    assert!(matches!(
        tokio::time::timeout(WAIT, reader.next()).await.unwrap(),
        Some(Ok(ServerFrame::Error(WireError::LimitExceeded(_))))
    ));
    // Closing one frees its slot.
    drop(held.pop());
    tokio::time::timeout(WAIT, async {
        while server.server.open_connections() > 5 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the slot is given back");
    let _again = Raw::connect_from("127.0.0.2", server.addr).await;
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn registrations_beyond_the_rate_are_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.registrations_per_second_per_ip = 2;
    let server = TestServer::start(config, redb(dir.path())).await;
    let client = server.client();
    let mut outcomes = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..10 {
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        match client
            .register(
                &Identity::generate(),
                registration(&format!("r{i}"), 7000),
                tx,
            )
            .await
        {
            Ok(s) => {
                sessions.push(s);
                outcomes.push(true)
            }
            Err(DiscoveryError::RateLimited) => outcomes.push(false),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let allowed = outcomes.iter().filter(|ok| **ok).count();
    assert!(
        (4..=5).contains(&allowed),
        "a burst of 4 then refusals: {outcomes:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_the_server() {
    let (server, _dir) = server().await;
    // Connect and never read the challenge or anything after.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let (_r, mut w) = silent.into_split();
    let _ = w.write_all(&[0, 0]).await;
    still_serving(&server).await;
    drop(w);
    server.stop().await;
}

#[tokio::test]
async fn usernames_breaking_the_rules_are_refused_by_the_server_too() {
    let (server, _dir) = server().await;
    let id = Identity::generate();
    let long = "a".repeat(33);
    for name in [
        "Bad Name",
        "",
        long.as_str(),
        "ali\u{0441}e",
        "bob\n",
        "-dash",
    ] {
        let mut raw = Raw::connect(server.addr).await;
        let frame = raw.register_frame(&id, &id, name);
        raw.send(&frame).await;
        raw.expect_refusal(|e| matches!(e, WireError::InvalidUsername(n) if n == name))
            .await;
    }
    still_serving(&server).await;
    server.stop().await;
}
