//! Golden bytes: every frame kind on both wires, and the payload inside a token, with the
//! exact bytes it encodes to (length prefix and version byte included). A change to the
//! protocol shows up here as a deliberate diff; the round-trip property tests in
//! `wire_props` cannot catch one, because both sides change together.
//!
//! When a format changes on purpose, the failure message prints the new bytes to paste.

use std::net::SocketAddr;

use bytes::BytesMut;
use p2pchat_core::crypto::Payload;
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, DepositOutcome, Push, RegisterReachableRequest, RegisterRequest,
    Registered, Reply, Request, ServerFrame, WireError, WireExpired, WireMailKey, WireMessage,
    WirePage, WirePeer, WireQuota, WireRelayTicket,
};
use p2pchat_core::protocol::{ErrorCode, FrameCodec, Hello, MessageId, PeerFrame};
use p2pchat_core::{Announcement, PublicKey};
use serde::Serialize;
use tokio_util::codec::Encoder;

fn key() -> PublicKey {
    // The Ed25519 base point: a valid key with recognisable bytes.
    let mut bytes = [0x66u8; 32];
    bytes[0] = 0x58;
    PublicKey::from_bytes(&bytes).expect("a valid point")
}

fn id(byte: u8) -> MessageId {
    MessageId::from_bytes([byte; 16])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("an address")
}

fn announcement() -> Announcement {
    Announcement {
        id: "00112233445566778899aabbccddeeff".into(),
        issued_at_ms: 1_700_000_000_000,
        text: "hi".into(),
        signature: "ab".into(),
    }
}

fn wire_message() -> WireMessage {
    WireMessage {
        id: id(1),
        from: "alice".into(),
        to: "bob".into(),
        token: "gA".into(),
        expires_at_ns: 1_700_000_000_000_000_000,
    }
}

fn wire_peer() -> WirePeer {
    WirePeer {
        username: "bob".into(),
        public_key: key(),
        addrs: vec![addr("127.0.0.1:7000"), addr("[::1]:7001")],
        online: true,
        last_seen_ms: 1_700_000_000_000,
    }
}

/// The frame's bytes on the wire, as hex.
fn frame<T: Serialize>(value: &T) -> String {
    let mut out = BytesMut::new();
    FrameCodec::<T>::default()
        .encode(value, &mut out)
        .expect("encodes");
    hex::encode(out)
}

/// Checks every `(name, actual, expected)`, reporting all mismatches at once.
fn pin(cases: Vec<(&str, String, &str)>) {
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, actual, expected)| actual != expected)
        .map(|(name, actual, expected)| {
            format!("{name}:\n  expected {expected}\n  now      {actual}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} encoding(s) changed; if on purpose, paste the new bytes:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_peer_frame_kind_has_these_bytes() {
    let hello = Hello {
        username: "alice".into(),
        peer: "bob".into(),
        public_key: key(),
        nonce: [7; 32],
    };
    pin(vec![
        (
            "Hello",
            frame(&PeerFrame::Hello(Box::new(hello))),
            "0000004e010005616c69636503626f62205866666666666666666666666666666666666666666666666666666666666666200707070707070707070707070707070707070707070707070707070707070707",
        ),
        (
            "Auth",
            frame(&PeerFrame::Auth { signature: [9; 64] }),
            "0000004301014009090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909",
        ),
        (
            "Message",
            frame(&PeerFrame::Message {
                id: id(1),
                token: "gAAAAAB".into(),
            }),
            "0000001a0102010101010101010101010101010101010767414141414142",
        ),
        (
            "Reject",
            frame(&PeerFrame::Reject {
                id: id(2),
                detail: "expired".into(),
                tag: [3; 32],
            }),
            "0000003b0103020202020202020202020202020202020765787069726564200303030303030303030303030303030303030303030303030303030303030303",
        ),
        (
            "Ack",
            frame(&PeerFrame::Ack {
                ids: vec![id(1), id(2)],
                tag: [4; 32],
            }),
            "000000440104020101010101010101010101010101010102020202020202020202020202020202200404040404040404040404040404040404040404040404040404040404040404",
        ),
        ("Ping", frame(&PeerFrame::Ping(300)), "000000040105ac02"),
        ("Pong", frame(&PeerFrame::Pong(300)), "000000040106ac02"),
        (
            "Error",
            frame(&PeerFrame::Error {
                code: ErrorCode::Refused,
                detail: "no".into(),
            }),
            "00000006010704026e6f",
        ),
        (
            "Probe",
            frame(&PeerFrame::Probe { nonce: [5; 32] }),
            "000000230108200505050505050505050505050505050505050505050505050505050505050505",
        ),
        (
            "ProbeOk",
            frame(&PeerFrame::ProbeOk { signature: [6; 64] }),
            "0000004301094006060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606060606",
        ),
    ]);
}

#[test]
fn the_payload_inside_a_token_has_these_bytes() {
    let payload = Payload {
        id: id(5),
        from: "alice".into(),
        to: "bob".into(),
        sent_at_ms: 1_700_000_000_000,
        seq: 42,
        body: "hello".into(),
    };
    pin(vec![(
        "Payload",
        hex::encode(postcard::to_stdvec(&payload).unwrap()),
        "0505050505050505050505050505050505616c69636503626f6280d095ffbc312a0568656c6c6f",
    )]);
}

#[test]
fn every_client_frame_and_request_kind_has_these_bytes() {
    let request = |request| frame(&ClientFrame::Request { id: 7, request });
    let claim = Claim {
        username: "alice".into(),
        public_key: key(),
        listen_port: 7000,
        announce: vec![addr("192.0.2.1:7000")],
    };
    pin(vec![
        (
            "Register",
            frame(&ClientFrame::Register(Box::new(RegisterRequest {
                claim,
                signature: [1; 64],
            }))),
            "00000074010005616c696365205866666666666666666666666666666666666666666666666666666666666666d8360100c0000201d8364001010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101",
        ),
        (
            "Announce",
            frame(&ClientFrame::Announce(Box::new(announcement()))),
            "0000002f010220303031313232333334343535363637373838393961616262636364646565666680d095ffbc31026869026162",
        ),
        ("KeepAlive", request(Request::KeepAlive), "0000000401010700"),
        (
            "Lookup",
            request(Request::Lookup {
                username: "bob".into(),
            }),
            "000000080101070103626f62",
        ),
        (
            "ListOnline",
            request(Request::ListOnline {
                after: Some("bob".into()),
                limit: 50,
            }),
            "0000000a010107020103626f6232",
        ),
        (
            "Watch",
            request(Request::Watch {
                username: "bob".into(),
            }),
            "000000080101070303626f62",
        ),
        (
            "Unwatch",
            request(Request::Unwatch {
                username: "bob".into(),
            }),
            "000000080101070403626f62",
        ),
        (
            "Deregister",
            request(Request::Deregister),
            "0000000401010705",
        ),
        (
            "Deposit",
            request(Request::Deposit(Box::new(wire_message()))),
            "0000002a010107060101010101010101010101010101010105616c69636503626f620267418080a8b1e39fe7cb17",
        ),
        (
            "FetchMail",
            request(Request::FetchMail { limit: 100 }),
            "000000050101070764",
        ),
        (
            "AckMail",
            request(Request::AckMail { ids: vec![id(1)] }),
            "00000015010107080101010101010101010101010101010101",
        ),
        (
            "TakeExpired",
            request(Request::TakeExpired),
            "0000000401010709",
        ),
        (
            "DepositBatch",
            request(Request::DepositBatch(vec![wire_message()])),
            "0000002b0101070a010101010101010101010101010101010105616c69636503626f620267418080a8b1e39fe7cb17",
        ),
        (
            "AckMailFrom",
            request(Request::AckMailFrom {
                acked: vec![WireMailKey {
                    from: "alice".into(),
                    id: id(1),
                }],
            }),
            "0000001b0101070b0105616c69636501010101010101010101010101010101",
        ),
        (
            "RegisterReachable",
            frame(&ClientFrame::RegisterReachable(Box::new(
                RegisterReachableRequest {
                    claim: Claim {
                        username: "bob".into(),
                        public_key: key(),
                        listen_port: 7000,
                        announce: Vec::new(),
                    },
                    dialable: false,
                    signature: [1; 64],
                },
            ))),
            "0000006c010303626f62205866666666666666666666666666666666666666666666666666666666666666d83600004001010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101",
        ),
        (
            "RelayJoin",
            frame(&ClientFrame::RelayJoin { token: [8; 16] }),
            "0000001301041008080808080808080808080808080808",
        ),
        (
            "ConnectBack",
            request(Request::ConnectBack {
                username: "bob".into(),
            }),
            "000000080101070c03626f62",
        ),
        (
            "Relay",
            request(Request::Relay {
                username: "bob".into(),
            }),
            "000000080101070d03626f62",
        ),
    ]);
}

#[test]
fn every_server_frame_reply_push_and_error_kind_has_these_bytes() {
    let reply = |result| frame(&ServerFrame::Response { id: 7, result });
    let error = |e: WireError| frame(&ServerFrame::Error(e));
    pin(vec![
        (
            "Challenge",
            frame(&ServerFrame::Challenge { nonce: [2; 32] }),
            "000000230100200202020202020202020202020202020202020202020202020202020202020202",
        ),
        (
            "Registered",
            frame(&ServerFrame::Registered(Box::new(Registered {
                observed: addr("203.0.113.5:40000"),
                addrs: vec![addr("203.0.113.5:7000")],
                presence_ttl_ms: 30_000,
                operator_key: Some(key()),
            }))),
            "00000037010100cb007105c0b8020100cb007105d836b0ea0101205866666666666666666666666666666666666666666666666666666666666666",
        ),
        (
            "Announced",
            frame(&ServerFrame::Announced { sessions: 3 }),
            "00000003010503",
        ),
        ("Reply::Done", reply(Ok(Reply::Done)), "000000050102070000"),
        (
            "Reply::Record",
            reply(Ok(Reply::Record(Some(Box::new(wire_peer()))))),
            "0000004d01020700010103626f6220586666666666666666666666666666666666666666666666666666666666666602007f000001d8360100000000000000000000000000000001d9360180d095ffbc31",
        ),
        (
            "Reply::Record(None)",
            reply(Ok(Reply::Record(None))),
            "00000006010207000100",
        ),
        (
            "Reply::Page",
            reply(Ok(Reply::Page(WirePage {
                users: vec![wire_peer()],
                next: Some("bob".into()),
            }))),
            "0000005201020700020103626f6220586666666666666666666666666666666666666666666666666666666666666602007f000001d8360100000000000000000000000000000001d9360180d095ffbc310103626f62",
        ),
        (
            "Reply::Mail",
            reply(Ok(Reply::Mail(vec![wire_message()]))),
            "0000002c0102070003010101010101010101010101010101010105616c69636503626f620267418080a8b1e39fe7cb17",
        ),
        (
            "Reply::Expired",
            reply(Ok(Reply::Expired(vec![WireExpired {
                id: id(1),
                to: "bob".into(),
            }]))),
            "0000001a0102070004010101010101010101010101010101010103626f62",
        ),
        (
            "Reply::Deposited",
            reply(Ok(Reply::Deposited(vec![
                DepositOutcome::Stored,
                DepositOutcome::Duplicate,
                DepositOutcome::Refused(WireError::RateLimited),
            ]))),
            "0000000a01020700050300010203",
        ),
        (
            "Response error",
            reply(Err(WireError::RateLimited)),
            "000000050102070103",
        ),
        (
            "Push::PeerOnline",
            frame(&ServerFrame::Push(Push::PeerOnline {
                username: "bob".into(),
            })),
            "0000000701030003626f62",
        ),
        (
            "Push::PeerOffline",
            frame(&ServerFrame::Push(Push::PeerOffline {
                username: "bob".into(),
            })),
            "0000000701030103626f62",
        ),
        (
            "Push::Replaced",
            frame(&ServerFrame::Push(Push::Replaced)),
            "00000003010302",
        ),
        (
            "Push::NewMail",
            frame(&ServerFrame::Push(Push::NewMail)),
            "00000003010303",
        ),
        (
            "Push::Announcement",
            frame(&ServerFrame::Push(Push::Announcement(Box::new(
                announcement(),
            )))),
            "0000003001030420303031313232333334343535363637373838393961616262636364646565666680d095ffbc31026869026162",
        ),
        (
            "NameTaken",
            error(WireError::NameTaken {
                username: "bob".into(),
            }),
            "0000000701040003626f62",
        ),
        (
            "InvalidUsername",
            error(WireError::InvalidUsername("B".into())),
            "000000050104010142",
        ),
        (
            "BadSignature",
            error(WireError::BadSignature),
            "00000003010402",
        ),
        (
            "RateLimited",
            error(WireError::RateLimited),
            "00000003010403",
        ),
        (
            "LimitExceeded",
            error(WireError::LimitExceeded("x".into())),
            "000000050104040178",
        ),
        (
            "BadFrame",
            error(WireError::BadFrame("x".into())),
            "000000050104050178",
        ),
        (
            "UnsupportedVersion",
            error(WireError::UnsupportedVersion("x".into())),
            "000000050104060178",
        ),
        (
            "Backend",
            error(WireError::Backend("x".into())),
            "000000050104070178",
        ),
        (
            "ShuttingDown",
            error(WireError::ShuttingDown),
            "00000003010408",
        ),
        (
            "QuotaExceeded",
            error(WireError::QuotaExceeded {
                recipient: "bob".into(),
                quota: 1000,
            }),
            "0000000901040903626f62e807",
        ),
        (
            "MailQuota",
            error(WireError::MailQuota {
                recipient: "bob".into(),
                limit: WireQuota::PairMessages,
                quota: 1000,
            }),
            "0000000a01040b03626f6204e807",
        ),
        (
            "Forbidden",
            error(WireError::Forbidden("x".into())),
            "0000000501040a0178",
        ),
        ("Relayed", frame(&ServerFrame::Relayed), "000000020106"),
        (
            "Reply::Relay",
            reply(Ok(Reply::Relay(WireRelayTicket {
                token: [8; 16],
                addr: None,
            }))),
            "000000170102070006100808080808080808080808080808080800",
        ),
        (
            "Push::Reachability",
            frame(&ServerFrame::Push(Push::Reachability { dialable: true })),
            "0000000401030501",
        ),
        (
            "Push::ConnectBack",
            frame(&ServerFrame::Push(Push::ConnectBack {
                username: "alice".into(),
            })),
            "0000000901030605616c696365",
        ),
        (
            "Push::RelayOffer",
            frame(&ServerFrame::Push(Push::RelayOffer {
                username: "alice".into(),
                ticket: Box::new(WireRelayTicket {
                    token: [8; 16],
                    addr: Some(addr("192.0.2.7:5001")),
                }),
            })),
            "0000002201030705616c69636510080808080808080808080808080808080100c00002078927",
        ),
    ]);
}

#[test]
fn an_announcement_as_json_has_this_text() {
    // The Redis announcement channel carries this JSON.
    assert_eq!(
        announcement().to_json(),
        r#"{"id":"00112233445566778899aabbccddeeff","issued_at_ms":1700000000000,"text":"hi","signature":"ab"}"#
    );
}
