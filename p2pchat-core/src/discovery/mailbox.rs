//! [`MailboxStore`]: the offline mailboxes kept by a `p2pchat-discovery` server, reached over
//! the node's own discovery session.

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;

use super::client::{Call, Failure, call};
use crate::protocol::discovery::{
    DepositOutcome, MAX_DEPOSIT_BATCH, Reply, Request, WireError, WireMessage,
};
use crate::protocol::{MAX_ACK_BATCH, MAX_FRAME_LEN};
use crate::store::{
    ExpiredMessage, MAX_FETCH_BATCH, MailKey, OfflineStore, Put, StoreError, StoredMessage,
};

/// Bytes of messages one [`Request::DepositBatch`] carries at most: the frame limit, less
/// room for the frame's own fields.
const DEPOSIT_BATCH_BYTES: usize = MAX_FRAME_LEN - 4096;

/// About how many bytes `message` takes in a frame.
fn encoded_len(message: &StoredMessage) -> usize {
    message.token.len() + message.from.len() + message.to.len() + 48
}

/// `messages` in runs that each fit one [`Request::DepositBatch`], in order.
fn deposit_batches(messages: Vec<StoredMessage>) -> Vec<Vec<StoredMessage>> {
    let mut batches: Vec<Vec<StoredMessage>> = Vec::new();
    let mut bytes = 0;
    for message in messages {
        let len = encoded_len(&message);
        match batches.last_mut() {
            Some(batch)
                if batch.len() < MAX_DEPOSIT_BATCH && bytes + len <= DEPOSIT_BATCH_BYTES =>
            {
                bytes += len;
                batch.push(message);
            }
            _ => {
                bytes = len;
                batches.push(vec![message]);
            }
        }
    }
    batches
}

/// The server mailbox of one registered user: [`OfflineStore`] over a
/// [`crate::DiscoveryClient`] session, so offline delivery needs no other service.
///
/// Get it from the session ([`crate::DiscoverySession::mailbox`]); a [`crate::ChatNode`]
/// whose builder was given no offline store uses it by itself. It acts for that user only:
/// it fetches, acknowledges and subscribes to that user's mailbox, takes that user's expiry
/// notices, and deposits in that user's name ([`StoreError::Forbidden`] otherwise; the server
/// checks the same). The server pushes a new-mail notice whenever mail arrives, and the
/// session adds one after every reconnection. It does not keep the session alive: once the
/// session is dropped, every call fails with [`StoreError::Unavailable`].
#[derive(Debug, Clone)]
pub struct MailboxStore {
    user: String,
    server: String,
    cmds: mpsc::WeakSender<Call>,
    notices: broadcast::Sender<()>,
}

impl MailboxStore {
    pub(crate) fn new(
        user: String,
        server: String,
        cmds: mpsc::WeakSender<Call>,
        notices: broadcast::Sender<()>,
    ) -> Self {
        Self {
            user,
            server,
            cmds,
            notices,
        }
    }

    /// The user this mailbox belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    fn only_mine(&self, user: &str, what: &str) -> Result<(), StoreError> {
        if user == self.user {
            Ok(())
        } else {
            Err(StoreError::Forbidden(format!(
                "{} may not {what} {user}'s mailbox",
                self.user
            )))
        }
    }

    /// Refuses a deposit in another user's name, as the server would.
    fn mine_to_send(&self, message: &StoredMessage) -> Result<(), StoreError> {
        if message.from == self.user {
            Ok(())
        } else {
            Err(StoreError::Forbidden(format!(
                "{} may not deposit mail in {}'s name",
                self.user, message.from
            )))
        }
    }

    async fn call(&self, request: Request) -> Result<Reply, StoreError> {
        let Some(cmds) = self.cmds.upgrade() else {
            return Err(StoreError::unavailable(format!(
                "the discovery session with {} is closed",
                self.server
            )));
        };
        call(&cmds, request).await.map_err(|e| match e {
            Failure::Wire(e) => StoreError::from(e),
            Failure::Session(e) => StoreError::unavailable(e),
        })
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::MailQuota {
                recipient,
                limit,
                quota,
            } => StoreError::QuotaExceeded {
                recipient,
                limit: limit.into(),
                quota,
            },
            WireError::QuotaExceeded { recipient, quota } => StoreError::QuotaExceeded {
                recipient,
                limit: crate::store::Quota::MailboxMessages,
                quota,
            },
            WireError::Forbidden(what) => StoreError::Forbidden(what),
            other => StoreError::unavailable(other),
        }
    }
}

impl MailboxStore {
    /// One [`Request::DepositBatch`]: an answer per message, in order. Messages in another
    /// user's name are refused here, as the server would.
    async fn deposit_batch(&self, batch: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        let mut answers: Vec<Option<Result<Put, StoreError>>> = Vec::with_capacity(batch.len());
        let mut sent: Vec<WireMessage> = Vec::with_capacity(batch.len());
        for message in batch {
            match self.mine_to_send(&message) {
                Ok(()) => {
                    answers.push(None);
                    sent.push(message.into());
                }
                Err(refused) => answers.push(Some(Err(refused))),
            }
        }
        let n = sent.len();
        let mut outcomes: Vec<Result<Put, StoreError>> = if n == 0 {
            Vec::new()
        } else {
            match self.call(Request::DepositBatch(sent)).await {
                Ok(Reply::Deposited(outcomes)) if outcomes.len() == n => outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        DepositOutcome::Stored => Ok(Put::Stored),
                        DepositOutcome::Duplicate => Ok(Put::Duplicate),
                        DepositOutcome::Refused(e) => Err(StoreError::from(e)),
                    })
                    .collect(),
                Ok(other) => vec![Err(wrong_reply(other)); n],
                Err(e) => vec![Err(e); n],
            }
        };
        outcomes.reverse();
        answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    outcomes
                        .pop()
                        .unwrap_or_else(|| Err(StoreError::unavailable("no answer for a deposit")))
                })
            })
            .collect()
    }
}

fn wrong_reply(reply: Reply) -> StoreError {
    StoreError::unavailable(format!("unexpected reply from the server: {reply:?}"))
}

#[async_trait]
impl OfflineStore for MailboxStore {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        self.mine_to_send(&message)?;
        match self
            .call(Request::Deposit(Box::new(message.into())))
            .await?
        {
            Reply::Done => Ok(()),
            other => Err(wrong_reply(other)),
        }
    }

    /// The messages in [`Request::DepositBatch`]es (as many as fit a frame, at most
    /// [`MAX_DEPOSIT_BATCH`] each), all pipelined on the session at once: one round trip and,
    /// on the server, one commit for the lot.
    async fn put_many(&self, messages: Vec<StoredMessage>) -> Vec<Result<Put, StoreError>> {
        let batches = deposit_batches(messages);
        let answers =
            futures::future::join_all(batches.into_iter().map(|b| self.deposit_batch(b))).await;
        answers.into_iter().flatten().collect()
    }

    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        self.only_mine(recipient, "read")?;
        let limit = limit.clamp(1, MAX_FETCH_BATCH) as u32;
        match self.call(Request::FetchMail { limit }).await? {
            Reply::Mail(mail) => Ok(mail.into_iter().map(Into::into).collect()),
            other => Err(wrong_reply(other)),
        }
    }

    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        self.only_mine(recipient, "acknowledge mail in")?;
        for chunk in acked.chunks(MAX_ACK_BATCH) {
            match self
                .call(Request::AckMailFrom {
                    acked: chunk.iter().cloned().map(Into::into).collect(),
                })
                .await?
            {
                Reply::Done => {}
                other => return Err(wrong_reply(other)),
            }
        }
        Ok(())
    }

    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        if sender != self.user {
            return Err(StoreError::Forbidden(format!(
                "{} may not take {sender}'s expiry notices",
                self.user
            )));
        }
        match self.call(Request::TakeExpired).await? {
            Reply::Expired(notices) => Ok(notices.into_iter().map(Into::into).collect()),
            other => Err(wrong_reply(other)),
        }
    }

    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        self.only_mine(recipient, "watch")?;
        Ok(BroadcastStream::new(self.notices.subscribe())
            // A lagged receiver missed notices: that is still "mail may have arrived".
            .map(|_| ())
            .boxed())
    }
}
