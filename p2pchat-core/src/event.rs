//! What a node reports: [`Event`] and the [`Events`] stream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::identity::Fingerprint;
use crate::protocol::MessageId;

/// Something that happened at a node. Every outcome of a [`crate::ChatNode::send`] is an
/// event carrying the [`MessageId`] that `send` returned.
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
    /// The peer acknowledged our message.
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
    /// The message could not be delivered nor stored.
    SendFailed {
        /// Our message.
        id: MessageId,
        /// The recipient.
        to: String,
        /// Why, as a sentence.
        reason: String,
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
    /// Something went wrong that the user should know about (a rejected message, a lost
    /// directory connection).
    Error {
        /// What happened, as a sentence.
        message: String,
    },
    /// This reader fell behind and missed `missed` events.
    Lagged {
        /// How many events were lost to this reader.
        missed: u64,
    },
}

/// The stream of a node's events, from [`crate::ChatNode::events`]. The first stream a node
/// hands out starts at spawn; later ones start when they are created. A reader that falls
/// more than the node's event capacity behind gets [`Event::Lagged`] and continues with the
/// oldest events still buffered. The stream ends, after its buffered events, when the node
/// has shut down.
pub struct Events {
    inner: BroadcastStream<Event>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    pub(crate) fn new(rx: tokio::sync::broadcast::Receiver<Event>) -> Self {
        Self {
            inner: BroadcastStream::new(rx),
        }
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|r| match r {
                Ok(event) => event,
                Err(BroadcastStreamRecvError::Lagged(missed)) => Event::Lagged { missed },
            })
        })
    }
}
