//! [`Events`]: the stream of a node's events, and the [`EventHub`] that queues them per
//! stream.

use parking_lot::{Mutex, MutexGuard};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::Stream;

use super::InboxStream;
use crate::event::Event;

/// Where a node's events go: a bounded queue per [`Events`] stream. An event is moved into
/// one stream's queue and cloned into the others' (usually there is one stream, and no
/// clone); a stream takes everything queued for it at once, under one lock. A full queue
/// drops its oldest event and counts it, for [`Event::Lagged`].
#[derive(Debug)]
pub(crate) struct EventHub {
    capacity: usize,
    state: Mutex<HubState>,
}

#[derive(Debug, Default)]
struct HubState {
    queues: Vec<Queue>,
    next_id: u64,
    /// The node stopped: streams end once they have read what is queued.
    closed: bool,
}

#[derive(Debug)]
struct Queue {
    id: u64,
    events: VecDeque<Event>,
    /// Events dropped from this queue since its reader last heard of it.
    missed: u64,
    waker: Option<Waker>,
}

impl EventHub {
    /// A hub whose streams each buffer `capacity` events.
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.state.lock()
    }

    /// Queues `event` for every stream (none is fine: events are for whoever listens).
    pub(crate) fn emit(&self, event: Event) {
        let mut state = self.state();
        self.queue(&mut state, event);
    }

    /// Queues several events, in order, under one lock.
    pub(crate) fn emit_all(&self, events: impl IntoIterator<Item = Event>) {
        let mut state = self.state();
        for event in events {
            self.queue(&mut state, event);
        }
    }

    fn queue(&self, state: &mut HubState, event: Event) {
        if state.closed {
            return;
        }
        let capacity = self.capacity;
        let mut event = Some(event);
        let last = state.queues.len().saturating_sub(1);
        for (i, queue) in state.queues.iter_mut().enumerate() {
            let Some(e) = (if i == last {
                event.take()
            } else {
                event.clone()
            }) else {
                break;
            };
            if queue.events.len() >= capacity {
                queue.events.pop_front();
                queue.missed += 1;
            }
            queue.events.push_back(e);
            if let Some(waker) = queue.waker.take() {
                // Schedules the reader; it runs once this lock is released.
                waker.wake();
            }
        }
    }

    /// A new stream's queue, starting now.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Subscription {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        if !state.closed {
            state.queues.push(Queue {
                id,
                events: VecDeque::new(),
                missed: 0,
                waker: None,
            });
        }
        Subscription {
            hub: self.clone(),
            id,
            taken: VecDeque::new(),
        }
    }

    /// The node stopped: every stream ends after what is queued for it.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        for queue in &mut state.queues {
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
    }
}

/// One stream's queue in an [`EventHub`].
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<EventHub>,
    id: u64,
    /// Events taken from the queue, not yet handed out.
    taken: VecDeque<Event>,
}

impl Subscription {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if let Some(event) = self.taken.pop_front() {
            return Poll::Ready(Some(event));
        }
        let mut state = self.hub.state();
        let closed = state.closed;
        let Some(queue) = state.queues.iter_mut().find(|q| q.id == self.id) else {
            return Poll::Ready(None);
        };
        if queue.missed > 0 {
            let missed = std::mem::take(&mut queue.missed);
            return Poll::Ready(Some(Event::Lagged { missed }));
        }
        std::mem::swap(&mut queue.events, &mut self.taken);
        if let Some(event) = self.taken.pop_front() {
            return Poll::Ready(Some(event));
        }
        if closed {
            return Poll::Ready(None);
        }
        if !queue
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            queue.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.state().queues.retain(|q| q.id != self.id);
    }
}

/// The stream of a node's events, from [`crate::ChatNode::events`].
///
/// Messages ([`Event::MessageReceived`]) come from the node's inbox through a cursor of
/// this stream's own: none is ever lost to a slow reader, and each stream starts at the
/// oldest message the application has not confirmed (see [`crate::Confirm`]). Other events
/// come from a bounded queue of this stream's own: the first stream a node hands out starts
/// at spawn, later ones when they are created, and a reader that falls more than the node's
/// event capacity behind gets [`Event::Lagged`] and continues with the oldest events still
/// queued. The stream ends, after its queued events, when the node has shut down.
pub struct Events {
    inbox: Option<InboxStream>,
    inner: Subscription,
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
    pub(crate) fn new(inner: Subscription, inbox: Option<InboxStream>) -> Self {
        Self {
            inbox,
            inner,
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
            match this.inner.poll_next(cx) {
                Poll::Ready(Some(event)) => return Poll::Ready(Some(event)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn error(n: u64) -> Event {
        Event::Error {
            message: n.to_string(),
        }
    }

    #[tokio::test]
    async fn every_stream_gets_every_event_in_order_and_a_slow_one_hears_what_it_missed() {
        let hub = EventHub::new(4);
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        for n in 0..3 {
            hub.emit(error(n));
        }
        async fn next(s: &mut Subscription) -> Option<Event> {
            futures::future::poll_fn(|cx| s.poll_next(cx)).await
        }
        for n in 0..3 {
            assert_eq!(next(&mut a).await, Some(error(n)));
        }
        for n in 3..10 {
            hub.emit(error(n));
        }
        // b fell 10 behind a queue of 4: it hears of the 6 dropped, then the newest 4.
        assert_eq!(next(&mut b).await, Some(Event::Lagged { missed: 6 }));
        for n in 6..10 {
            assert_eq!(next(&mut b).await, Some(error(n)));
        }
        assert_eq!(next(&mut a).await, Some(Event::Lagged { missed: 3 }));
        for n in 6..10 {
            assert_eq!(next(&mut a).await, Some(error(n)));
        }
        hub.close();
        hub.emit(error(99));
        assert_eq!(next(&mut b).await, None);
        drop(a);
        assert_eq!(hub.state().queues.len(), 1);
        let mut late = hub.subscribe();
        assert_eq!(
            next(&mut late).await,
            None,
            "a stream made after the end ends"
        );
    }

    #[tokio::test]
    async fn a_waiting_stream_is_woken_by_an_event() {
        let hub = EventHub::new(8);
        let sub = hub.subscribe();
        let mut stream = Events::new(sub, None);
        let waiter = tokio::spawn(async move { stream.next().await });
        tokio::task::yield_now().await;
        hub.emit(error(1));
        assert_eq!(waiter.await.unwrap(), Some(error(1)));
    }
}
