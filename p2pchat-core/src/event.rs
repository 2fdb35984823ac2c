//! What a node reports: [`Event`] and the [`Events`] stream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::identity::Fingerprint;
use crate::node::InboxStream;
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
    /// Our message is durable in the outbox and waits to be sent: right after `send`
    /// (`retry: None`), and again after a failed attempt (`retry` says what failed; it will
    /// be retried with backoff until it is delivered, stored or expires).
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
    /// This reader fell behind and missed `missed` events. Never messages: those wait in
    /// the inbox for the reader.
    Lagged {
        /// How many events were lost to this reader.
        missed: u64,
    },
}

/// The stream of a node's events, from [`crate::ChatNode::events`].
///
/// Messages ([`Event::MessageReceived`]) come from the node's inbox through a cursor of
/// this stream's own: none is ever lost to a slow reader, and each stream starts at the
/// oldest message the application has not confirmed (see [`crate::Confirm`]). Other events
/// come from a bounded buffer: the first stream a node hands out starts at spawn, later ones
/// when they are created, and a reader that falls more than the node's event capacity
/// behind gets [`Event::Lagged`] and continues with the oldest events still buffered. The
/// stream ends, after its buffered events, when the node has shut down.
pub struct Events {
    inbox: Option<InboxStream>,
    inner: BroadcastStream<Event>,
    /// Alternates which source is polled first, so neither starves the other.
    inbox_first: bool,
    ended: bool,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    pub(crate) fn new(
        rx: tokio::sync::broadcast::Receiver<Event>,
        inbox: Option<InboxStream>,
    ) -> Self {
        Self {
            inbox,
            inner: BroadcastStream::new(rx),
            inbox_first: true,
            ended: false,
        }
    }

    fn poll_inbox(&mut self, cx: &mut Context<'_>) -> Option<Event> {
        self.inbox.as_mut()?.poll(cx.waker())
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = &mut *self;
        this.inbox_first = !this.inbox_first;
        if !this.inbox_first
            && !this.ended
            && let Some(message) = this.poll_inbox(cx)
        {
            return Poll::Ready(Some(message));
        }
        if !this.ended {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => return Poll::Ready(Some(event)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    return Poll::Ready(Some(Event::Lagged { missed }));
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {}
            }
        }
        if this.ended {
            // The node stopped: what the inbox still holds waits for its next start.
            return Poll::Ready(None);
        }
        if let Some(message) = this.poll_inbox(cx) {
            return Poll::Ready(Some(message));
        }
        Poll::Pending
    }
}
