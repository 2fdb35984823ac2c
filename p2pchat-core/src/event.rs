//! What a node reports: [`Event`]. The stream of them is [`crate::node::Events`].

use std::time::SystemTime;

use crate::identity::Fingerprint;
use crate::protocol::MessageId;

/// Something that happened at a node. Every step of a message [`crate::ChatNode::send`]
/// queued is an event carrying the [`MessageId`] that `send` returned: [`Event::Queued`],
/// [`Event::Sent`], then [`Event::Delivered`] or [`Event::StoredOffline`] (then maybe
/// [`Event::Expired`]), or [`Event::SendFailed`] or [`Event::Cancelled`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message for us, to show.
    MessageReceived {
        /// The sender's id for it.
        id: MessageId,
        /// Who sent it.
        from: String,
        /// The text.
        text: String,
        /// When the sender sent it (sender's clock).
        sent_at: SystemTime,
        /// Whether it waited in the offline store.
        offline: bool,
    },
    /// Our message is durable in the outbox and waits to be sent: right after `send`, and at
    /// start for each message an earlier run left in the outbox (`retry: None`), and again
    /// after a failed attempt (`retry` says what failed; it will be retried with backoff
    /// until it is delivered, stored or expires).
    Queued {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
        /// What failed, as a sentence, when this is a retry.
        retry: Option<String>,
    },
    /// Our message was written to a connection to the peer (again, after a reconnection).
    Sent {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
    },
    /// The peer acknowledged our message: it is durable in the peer's inbox.
    Delivered {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
    },
    /// The peer could not be reached; the message waits in the offline store.
    StoredOffline {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
    },
    /// The message waited in the offline store until it expired, undelivered.
    Expired {
        /// Our message.
        id: MessageId,
        /// The recipient who never came back for it.
        to: String,
    },
    /// The application cancelled the message before it was sent.
    Cancelled {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
    },
    /// The message will never be delivered: the peer refused it, the name does not exist,
    /// or the store refuses it.
    SendFailed {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
        /// Why, as a sentence.
        reason: String,
    },
    /// Someone who is not a contact wrote while contacts-only mode is on: their messages
    /// are kept, unshown, until [`crate::ChatNode::accept`] (or discarded by
    /// [`crate::ChatNode::block`]). Reported once per sender per run until then.
    MessageRequest {
        /// Who wrote.
        from: String,
    },
    /// A watched user came online.
    PeerOnline {
        /// Who.
        username: String,
    },
    /// A watched user went offline.
    PeerOffline {
        /// Who.
        username: String,
    },
    /// A peer now presents another key than the one pinned for it. Messages to it are held
    /// until [`crate::ChatNode::trust`] accepts the new key.
    KeyChanged {
        /// Whose key changed.
        username: String,
        /// Safety code of the pinned key.
        old: Fingerprint,
        /// Safety code of the key now presented.
        new: Fingerprint,
    },
    /// An operator announcement.
    Announcement {
        /// The announcement text.
        text: String,
    },
    /// Something went wrong that the user should know about (a refused message, a lost
    /// directory connection).
    Error {
        /// What happened, as a sentence.
        message: String,
    },
    /// The connection to the discovery server was lost. The node keeps its peer connections
    /// and reconnects by itself; lookups, and the server mailbox, wait until then.
    DirectoryLost {
        /// What broke, as a sentence.
        reason: String,
    },
    /// The connection to the discovery server is back (registered again) after
    /// [`Event::DirectoryLost`].
    DirectoryBack,
    /// The directory ended this node's session for good: the same user registered again
    /// elsewhere with the same key, or the server no longer accepts the registration. The
    /// node is no longer listed and will not reconnect; an interactive client should stop.
    DirectoryEnded {
        /// Why, as a sentence.
        reason: String,
    },
    /// Whether peers can dial this node directly, as the directory found when the node
    /// registered (again after every reconnection). When they cannot, peers reach it by
    /// connect-back or through the directory's relay.
    Reachability {
        /// `true`: directly dialable.
        direct: bool,
    },
    /// This reader fell behind and missed `missed` events. Never messages: those wait in
    /// the inbox for the reader.
    Lagged {
        /// How many events were lost to this reader.
        missed: u64,
    },
}
