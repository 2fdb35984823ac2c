//! The discovery session protocol, spoken between [`crate::discovery::DiscoveryClient`] and
//! the `p2pchat-discovery` server over one persistent TCP connection, in the same frames as
//! peer connections ([`super::FrameCodec`]).
//!
//! ```text
//! server: Challenge { nonce }
//! client: Register { claim, signature over register_transcript(nonce, claim) }
//! server: Registered { .. }        or  Error { .. } and close
//! client: Request { id, .. } ...   server: Response { id, .. } (in request order)
//!                                  server: Push(..) at any time
//! ```
//!
//! A frame the server cannot decode, an unknown request, or a failed registration gets a
//! [`ServerFrame::Error`] and the connection is closed; nothing else is affected. New
//! request and push kinds are only ever appended to their enums, so postcard indices of the
//! existing ones never change.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::announcement::Announcement;
use super::{MessageId, NONCE_LEN};
use crate::identity::PublicKey;

/// The port `p2pchat-discovery` listens on unless told otherwise (as the original).
pub const DEFAULT_DISCOVERY_PORT: u16 = 5001;

/// Where a client looks for the server unless told otherwise: a local `p2pchat-discovery`
/// on [`DEFAULT_DISCOVERY_PORT`].
pub const DEFAULT_DISCOVERY_ADDR: &str = "127.0.0.1:5001";
const _: () = assert!(DEFAULT_DISCOVERY_PORT == 5001);

/// Most addresses a node may announce. Default: 8.
pub const MAX_ANNOUNCED_ADDRS: usize = 8;

/// Most users one session may watch (each costs the server a table entry). Default: 256.
pub const MAX_WATCHES: usize = 256;

/// How long a user stays online without a keep-alive (as the original: 30 s).
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(30);

/// How long a name stays bound to its key after its owner was last seen. Default: 180 days.
pub const DEFAULT_CLAIM_LAPSE: Duration = Duration::from_secs(180 * 24 * 3600);

/// Most users in one page of the online list. Default: 100.
pub const MAX_PAGE_SIZE: usize = 100;

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServerFrame {
    /// The first frame on every connection: the client signs it to register.
    Challenge {
        /// Fresh randomness, never reused.
        #[serde(with = "serde_bytes")]
        nonce: [u8; NONCE_LEN],
    },
    /// The registration was accepted; the session is online.
    Registered(Box<Registered>),
    /// The answer to the request with the same id. Responses come in request order.
    Response {
        /// The request's id.
        id: u64,
        /// Its outcome.
        result: Result<Reply, WireError>,
    },
    /// Something the session asked to be told about.
    Push(Push),
    /// A refusal after which the server closes the connection.
    Error(WireError),
    /// The answer to [`ClientFrame::Announce`]: relayed to this many sessions of this
    /// instance (and published to the other instances, if any); the server then closes.
    Announced {
        /// Sessions of this instance that were sent the announcement.
        sessions: u64,
    },
    /// The answer to [`ClientFrame::RelayJoin`]: the other side has joined. Every byte after
    /// this frame is the other side's, as it wrote it (a peer connection: its handshake
    /// first).
    Relayed,
}

/// What the server confirms at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The address the server sees the client connecting from.
    pub observed: SocketAddr,
    /// The addresses now published for the user.
    pub addrs: Vec<SocketAddr>,
    /// How long the session stays online without a keep-alive, in milliseconds.
    pub presence_ttl_ms: u64,
    /// The key that signs this server's operator announcements, if it has one.
    pub operator_key: Option<PublicKey>,
}

/// Frames the client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientFrame {
    /// Registers the user; the only frame accepted before `Registered`.
    Register(Box<RegisterRequest>),
    /// A request on a registered session.
    Request {
        /// Chosen by the client; echoed by the response.
        id: u64,
        /// What is asked.
        request: Request,
    },
    /// Instead of registering: an operator announcement to relay to every online node. It
    /// must be signed by this server's operator key.
    Announce(Box<Announcement>),
    /// Registers the user, as [`ClientFrame::Register`], from a node that takes part in
    /// reachability: the server checks whether the node can be dialed (unless it says it
    /// cannot), publishes its addresses only if so, and may push it
    /// [`Push::Reachability`], [`Push::ConnectBack`] and [`Push::RelayOffer`].
    RegisterReachable(Box<RegisterReachableRequest>),
    /// Instead of registering: this connection is one side of the relay the token names.
    /// Answered with [`ServerFrame::Relayed`] once the other side joins, or an error.
    RelayJoin {
        /// The token from [`Reply::Relay`] or [`Push::RelayOffer`].
        #[serde(with = "serde_bytes")]
        token: [u8; RELAY_TOKEN_LEN],
    },
}

/// Bytes in a relay token. Default: 16 (128 random bits).
pub const RELAY_TOKEN_LEN: usize = 16;

/// How long the server keeps a relay open for its sides to join, and one side waits for
/// the other. Default: 5 s.
pub const RELAY_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A signed [`Claim`] with the node's word on whether it can be dialed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReachableRequest {
    /// The claim.
    pub claim: Claim,
    /// `false`: the node says nobody can dial it (behind a NAT, say), so the server does not
    /// probe it and publishes no address for it.
    pub dialable: bool,
    /// Ed25519 signature by `claim.public_key` over [`register_reachable_transcript`].
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

/// The bytes a [`RegisterReachableRequest`] signs: as [`register_transcript`], under its own
/// label, with the `dialable` word.
pub fn register_reachable_transcript(
    nonce: &[u8; NONCE_LEN],
    claim: &Claim,
    dialable: bool,
) -> Vec<u8> {
    let mut out = b"p2pchat/1 register-reachable\0".to_vec();
    out.extend_from_slice(nonce);
    let bytes = postcard::to_stdvec(claim).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(&bytes);
    out.push(u8::from(dialable));
    out
}

/// The bytes a node signs to answer the server's reachability probe
/// ([`crate::protocol::PeerFrame::Probe`]): a label and the server's nonce.
pub fn probe_transcript(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = b"p2pchat/1 probe\0".to_vec();
    out.extend_from_slice(nonce);
    out
}

/// Where and how to join a relay: handed to both sides of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRelayTicket {
    /// The secret that pairs the two sides' connections.
    #[serde(with = "serde_bytes")]
    pub token: [u8; RELAY_TOKEN_LEN],
    /// The server instance to join at; `None`: the one this session is registered with.
    pub addr: Option<SocketAddr>,
}

impl std::fmt::Debug for WireRelayTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireRelayTicket")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What a registration claims: signed, with the server's nonce, by the key it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The name to claim or re-use.
    pub username: String,
    /// The identity key the name is (to be) bound to.
    pub public_key: PublicKey,
    /// The port the node accepts peer connections on.
    pub listen_port: u16,
    /// Explicit addresses to publish instead of the observed one (at most
    /// [`MAX_ANNOUNCED_ADDRS`]).
    pub announce: Vec<SocketAddr>,
}

/// A signed [`Claim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The claim.
    pub claim: Claim,
    /// Ed25519 signature by `claim.public_key` over [`register_transcript`].
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

/// The bytes a registration signs: a domain-separation label, the server's nonce and the
/// claim, so a signature is good for one claim on one connection only.
pub fn register_transcript(nonce: &[u8; NONCE_LEN], claim: &Claim) -> Vec<u8> {
    let mut out = b"p2pchat/1 register\0".to_vec();
    out.extend_from_slice(nonce);
    let bytes = postcard::to_stdvec(claim).expect("serializing to a Vec cannot fail");
    out.extend_from_slice(&bytes);
    out
}

/// Requests on a registered session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Refreshes presence. Answered with [`Reply::Done`].
    KeepAlive,
    /// One user, online or not. Answered with [`Reply::Record`].
    Lookup {
        /// Who.
        username: String,
    },
    /// A page of online users after `after`, in name order. Answered with [`Reply::Page`].
    ListOnline {
        /// Exclusive lower bound.
        after: Option<String>,
        /// Page size, capped at [`MAX_PAGE_SIZE`].
        limit: u32,
    },
    /// Push presence changes of `username` from now on. Answered with [`Reply::Done`].
    Watch {
        /// Who.
        username: String,
    },
    /// Stop pushing presence changes of `username`. Answered with [`Reply::Done`].
    Unwatch {
        /// Who.
        username: String,
    },
    /// Go offline now; the server closes the connection after answering.
    Deregister,
    /// Leave a message in its recipient's mailbox on the server. `message.from` must be this
    /// session's user. Answered with [`Reply::Done`].
    Deposit(Box<WireMessage>),
    /// This session's user's oldest waiting messages, left in place. Answered with
    /// [`Reply::Mail`].
    FetchMail {
        /// At most this many (capped by the server).
        limit: u32,
    },
    /// From nodes before [`Request::AckMailFrom`]: an id alone does not name a message
    /// (another sender may use the same id), so the server reads it as the messages with
    /// these ids that this session's fetches handed out. Answered with [`Reply::Done`].
    AckMail {
        /// The processed ids (at most [`super::MAX_ACK_BATCH`]).
        ids: Vec<MessageId>,
    },
    /// Expiry notices for messages this session's user sent. Answered with
    /// [`Reply::Expired`].
    TakeExpired,
    /// Several [`Request::Deposit`]s in one request (at most [`MAX_DEPOSIT_BATCH`], and
    /// within the frame limit), each under the deposit rules. Answered with
    /// [`Reply::Deposited`], one outcome per message, in order.
    DepositBatch(Vec<WireMessage>),
    /// Removes processed messages from this session's user's mailbox, each named by its
    /// sender and id. Answered with [`Reply::Done`].
    AckMailFrom {
        /// The processed messages (at most [`super::MAX_ACK_BATCH`]).
        acked: Vec<WireMailKey>,
    },
    /// Asks `username` (online, registered with [`ClientFrame::RegisterReachable`]) to dial
    /// this session's user, who can be dialed when it cannot. Answered with [`Reply::Done`]
    /// once the request is on its way ([`Push::ConnectBack`]).
    ConnectBack {
        /// Who should dial.
        username: String,
    },
    /// Opens a relay to `username` through the server, within its relay limits. Answered
    /// with [`Reply::Relay`]; `username` is sent [`Push::RelayOffer`] with the same ticket.
    Relay {
        /// Who to relay to.
        username: String,
    },
}

/// One message of a mailbox, as [`Request::AckMailFrom`] names it: its sender and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMailKey {
    /// The sender's username.
    pub from: String,
    /// The id the sender gave it.
    pub id: MessageId,
}

// A full acknowledgement fits in a frame: a name, its length, an id and its length each.
const _: () = assert!(
    super::MAX_ACK_BATCH * (super::MAX_USERNAME_LEN + 1 + 16 + 1) + 64 <= super::MAX_FRAME_LEN
);

/// Most messages in one [`Request::DepositBatch`]. Default: 64.
pub const MAX_DEPOSIT_BATCH: usize = 64;

/// What became of one message of a [`Request::DepositBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DepositOutcome {
    /// In the mailbox now, durably.
    Stored,
    /// The same sender's message with this id was in the mailbox already: kept once.
    Duplicate,
    /// Refused, and why (quota, rate, no such recipient, not the session's user, …).
    Refused(WireError),
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reply {
    /// Done, nothing to return.
    Done,
    /// A lookup's result (`None`: the name is not claimed).
    Record(Option<Box<WirePeer>>),
    /// A listing page.
    Page(WirePage),
    /// Waiting messages, oldest first.
    Mail(Vec<WireMessage>),
    /// Expiry notices.
    Expired(Vec<WireExpired>),
    /// The outcome of each message of a [`Request::DepositBatch`], in order.
    Deposited(Vec<DepositOutcome>),
    /// A relay is ready to join ([`ClientFrame::RelayJoin`]) on a new connection.
    Relay(WireRelayTicket),
}

/// A user, as the directory describes it on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePeer {
    /// The username.
    pub username: String,
    /// The identity key the name is bound to.
    pub public_key: PublicKey,
    /// Where the user accepts connections (empty when offline).
    pub addrs: Vec<SocketAddr>,
    /// Whether the user is online now.
    pub online: bool,
    /// When the user last registered or kept alive, Unix milliseconds.
    pub last_seen_ms: u64,
}

/// One page of online users, in username order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePage {
    /// The users on this page.
    pub users: Vec<WirePeer>,
    /// The `after` of the next page; `None` on the last page.
    pub next: Option<String>,
}

/// A sealed message for a mailbox, as deposited and fetched: only routing metadata in the
/// clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// The message id (also inside the token).
    pub id: MessageId,
    /// Sender's username.
    pub from: String,
    /// Recipient's username: whose mailbox.
    pub to: String,
    /// The Fernet token.
    pub token: String,
    /// When it expires undelivered, Unix milliseconds.
    pub expires_at_ns: u64,
}

/// A message that expired in its recipient's mailbox, reported to its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireExpired {
    /// The message id.
    pub id: MessageId,
    /// The recipient who never fetched it.
    pub to: String,
}

/// What the server pushes to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Push {
    /// A watched user came online (or re-registered).
    PeerOnline {
        /// Who.
        username: String,
    },
    /// A watched user went offline.
    PeerOffline {
        /// Who.
        username: String,
    },
    /// The same user registered again elsewhere; this session is over and must not
    /// re-register on its own (the two would evict each other forever).
    Replaced,
    /// Mail may have arrived in this session's user's mailbox.
    NewMail,
    /// An operator announcement (the node checks the signature against the key it pinned).
    Announcement(Box<Announcement>),
    /// Whether the server could dial this session's user at the addresses it registered
    /// (sent after a [`ClientFrame::RegisterReachable`]).
    Reachability {
        /// `true`: published and dialable; `false`: no address is published.
        dialable: bool,
    },
    /// `username` cannot be dialed and asks this session's user to dial it (at the
    /// addresses the directory has for it).
    ConnectBack {
        /// Who to dial.
        username: String,
    },
    /// `username` opened a relay to this session's user: join it to talk.
    RelayOffer {
        /// Who is on the other side.
        username: String,
        /// Where and how to join. Boxed: every session's push queue holds a block of
        /// pushes from the start, so each byte of `Push` is paid by every idle session.
        ticket: Box<WireRelayTicket>,
    },
}

// Every server session's push channel allocates a block of 32 `Push`es when it is made:
// a larger `Push` is memory every idle session pays (40 bytes more was 1.3 KiB each).
const _: () = assert!(std::mem::size_of::<Push>() <= 32);

/// Which mail quota a [`WireError::MailQuota`] names (the store's `Quota`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WireQuota {
    /// Messages waiting for the recipient.
    MailboxMessages,
    /// Bytes waiting for the recipient.
    MailboxBytes,
    /// Messages the sender has waiting anywhere.
    SenderMessages,
    /// Bytes the sender has waiting anywhere.
    SenderBytes,
    /// Messages the sender has waiting for this recipient.
    PairMessages,
    /// Bytes the sender has waiting for this recipient.
    PairBytes,
    /// Bytes waiting on the whole server.
    TotalBytes,
}

impl WireQuota {
    /// The limit's name, as logs and flags spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::MailboxMessages => "mailbox messages",
            Self::MailboxBytes => "mailbox bytes",
            Self::SenderMessages => "sender messages",
            Self::SenderBytes => "sender bytes",
            Self::PairMessages => "pair messages",
            Self::PairBytes => "pair bytes",
            Self::TotalBytes => "total bytes",
        }
    }
}

/// Errors carried on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The name is claimed by another key.
    #[error("the name '{username}' is already taken by another key")]
    NameTaken {
        /// The name.
        username: String,
    },
    /// The name breaks the username rules.
    #[error("invalid username: {0}")]
    InvalidUsername(String),
    /// The registration's signature does not verify.
    #[error("the registration's signature does not verify")]
    BadSignature,
    /// Too many requests of this kind (registrations from this address, deposits by this
    /// user); retry later.
    #[error("rate limited by the server (too many registrations or deposits); try again later")]
    RateLimited,
    /// A server limit was reached (connections, watches, addresses, handshake time).
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// A frame could not be decoded, was of an unknown kind, or came out of order.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// The frame's protocol version is not spoken here.
    #[error("unsupported protocol version: {0}")]
    UnsupportedVersion(String),
    /// The server's storage failed; the request may be retried.
    #[error("the server's storage failed: {0}")]
    Backend(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The recipient's mailbox is full (what servers before [`WireError::MailQuota`] sent;
    /// kept, with its encoding, so that old and new peers still understand each other).
    #[error("{recipient}'s mailbox is full ({quota} messages waiting)")]
    QuotaExceeded {
        /// Whose mailbox.
        recipient: String,
        /// The quota.
        quota: u64,
    },
    /// The session may not do this (another user's mailbox, a deposit in someone else's
    /// name, an announcement not signed by the operator).
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// Storing the message would pass one of the server's mail quotas, named: nothing was
    /// stored. (Appended last, so the earlier variants keep their encoding.)
    #[error("{} quota reached for mail to {recipient} (limit {quota})", limit.name())]
    MailQuota {
        /// Whose mailbox the message was for.
        recipient: String,
        /// Which limit.
        limit: WireQuota,
        /// The limit's value.
        quota: u64,
    },
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::identity::Identity;
    use crate::protocol::FrameCodec;

    fn claim() -> Claim {
        Claim {
            username: "alice".into(),
            public_key: Identity::generate().public_key(),
            listen_port: 6000,
            announce: vec!["192.0.2.1:6000".parse().unwrap()],
        }
    }

    fn round_trip<T>(frames: Vec<T>)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut codec = FrameCodec::<T>::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut buf).unwrap();
        }
        for f in &frames {
            assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn discovery_frames_round_trip() {
        let record = WirePeer {
            username: "bob".into(),
            public_key: Identity::generate().public_key(),
            addrs: vec!["127.0.0.1:7000".parse().unwrap()],
            online: true,
            last_seen_ms: 1_234_567,
        };
        round_trip(vec![
            ServerFrame::Challenge { nonce: [3; 32] },
            ServerFrame::Registered(Box::new(Registered {
                observed: "127.0.0.1:5555".parse().unwrap(),
                addrs: vec!["127.0.0.1:6000".parse().unwrap()],
                presence_ttl_ms: 30_000,
                operator_key: Some(Identity::generate().public_key()),
            })),
            ServerFrame::Response {
                id: 7,
                result: Ok(Reply::Record(Some(Box::new(record.clone())))),
            },
            ServerFrame::Response {
                id: 8,
                result: Ok(Reply::Page(WirePage {
                    users: vec![record],
                    next: Some("bob".into()),
                })),
            },
            ServerFrame::Response {
                id: 9,
                result: Err(WireError::NameTaken {
                    username: "bob".into(),
                }),
            },
            ServerFrame::Push(Push::PeerOffline {
                username: "bob".into(),
            }),
            ServerFrame::Push(Push::Replaced),
            ServerFrame::Error(WireError::RateLimited),
        ]);
        round_trip(vec![
            ClientFrame::Register(Box::new(RegisterRequest {
                claim: claim(),
                signature: [5; 64],
            })),
            ClientFrame::Request {
                id: 1,
                request: Request::ListOnline {
                    after: Some("a".into()),
                    limit: 100,
                },
            },
            ClientFrame::Request {
                id: 2,
                request: Request::Watch {
                    username: "bob".into(),
                },
            },
            ClientFrame::Request {
                id: 3,
                request: Request::Deregister,
            },
        ]);
    }

    #[test]
    fn a_registration_signature_is_bound_to_nonce_and_claim() {
        let id = Identity::generate();
        let mut claim = claim();
        claim.public_key = id.public_key();
        let nonce = [1; NONCE_LEN];
        let signature = id.sign(&register_transcript(&nonce, &claim));
        assert!(
            id.public_key()
                .verify(&register_transcript(&nonce, &claim), &signature)
        );
        assert!(
            !id.public_key()
                .verify(&register_transcript(&[2; NONCE_LEN], &claim), &signature),
            "another nonce"
        );
        let mut other = claim.clone();
        other.listen_port += 1;
        assert!(
            !id.public_key()
                .verify(&register_transcript(&nonce, &other), &signature),
            "another claim"
        );
    }
}
