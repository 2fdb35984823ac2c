//! The mailboxes as sessions use them: the storage's mailbox ([`Storage::mailbox`]) with
//! the rules a deposit must follow beside it. A session acts for its own user only: it
//! deposits in that user's name, into the mailbox of a name someone holds, within the
//! user's deposit rate, a token no longer than [`MAX_TOKEN_LEN`] and shaped like a Fernet
//! token no older than the message TTL and stamped at most [`MAX_TOKEN_AHEAD`] ahead, an expiry no later than the token's timestamp plus
//! that TTL; within the store's quotas (per mailbox, sender, pair and in all, which the
//! storage's mailbox enforces); it reads, acknowledges and takes expiry notices of its own
//! mailbox only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::BoxStream;
use p2pchat_core::crypto::{CryptoError, check_token_shape};
use p2pchat_core::error::chain;
use p2pchat_core::protocol::discovery::{
    DepositOutcome, MAX_DEPOSIT_BATCH, WireError, WireExpired, WireMailKey, WireMessage,
};
use p2pchat_core::protocol::{MAX_ACK_BATCH, MAX_TOKEN_LEN, validate_username};
use p2pchat_core::store::{
    MAX_FETCH_BATCH, MAX_TOKEN_AHEAD, MailKey, Put, StoreError, StoredMessage,
};

use crate::config::DEPOSIT_BURST;
use crate::limits::KeyedRate;
use crate::storage::{Storage, StorageError};

/// Mail tokens one reply may carry, in bytes: the reply must fit in a frame. Default: 192 KiB.
const MAIL_REPLY_BUDGET: usize = 192 * 1024;

/// The mailboxes and their rules.
#[derive(Debug)]
pub(crate) struct Mail {
    storage: Arc<dyn Storage>,
    /// Deposits per user.
    deposits: KeyedRate<String>,
    /// The longest a message may wait, from its token's timestamp.
    message_ttl: Duration,
}

/// The wire error a storage failure earns (logged: the client sees only a summary).
pub(crate) fn storage_error(e: StorageError) -> WireError {
    match e {
        StorageError::NameTaken(username) => WireError::NameTaken { username },
        e => {
            tracing::warn!(error = %chain(&e), "storage failed");
            WireError::Backend(e.to_string())
        }
    }
}

fn store_error(e: StoreError) -> WireError {
    match e {
        StoreError::QuotaExceeded {
            recipient,
            limit,
            quota,
        } => WireError::MailQuota {
            recipient,
            limit: limit.into(),
            quota,
        },
        StoreError::Forbidden(what) => WireError::Forbidden(what),
        e => {
            tracing::warn!(error = %chain(&e), "mailbox failed");
            WireError::Backend(e.to_string())
        }
    }
}

impl Mail {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        deposits_per_second_per_user: u32,
        message_ttl: Duration,
    ) -> Self {
        Self {
            storage,
            deposits: KeyedRate::new(deposits_per_second_per_user, DEPOSIT_BURST),
            message_ttl,
        }
    }

    /// Forgets users whose deposit allowance is full again.
    pub(crate) fn forget_idle(&self) {
        self.deposits.forget_idle();
    }

    /// Checks a message from `me` against the deposit rules: the message to store if it
    /// passes. `claimed` holds the recipients already found claimed (a batch looks each up
    /// once).
    async fn admit(
        &self,
        me: &str,
        message: WireMessage,
        claimed: &mut HashSet<String>,
    ) -> Result<StoredMessage, WireError> {
        if message.token.len() > MAX_TOKEN_LEN {
            return Err(WireError::LimitExceeded(format!(
                "a stored message is at most {MAX_TOKEN_LEN} bytes"
            )));
        }
        if message.from != me {
            return Err(WireError::Forbidden(format!(
                "{me} may not deposit mail in {}'s name",
                message.from
            )));
        }
        if validate_username(&message.to).is_err() {
            return Err(WireError::InvalidUsername(message.to));
        }
        // Only what could be a message, no older than a message may wait.
        let stamped = check_token_shape(
            &message.token,
            SystemTime::now(),
            self.message_ttl,
            MAX_TOKEN_AHEAD,
        )
        .map_err(|e| {
            WireError::Forbidden(match e {
                CryptoError::FromTheFuture { ahead_secs } => format!(
                    "the message is stamped {ahead_secs} s ahead of the server's clock (at \
                     most {} s allowed): check the sender's clock",
                    MAX_TOKEN_AHEAD.as_secs()
                ),
                CryptoError::Expired { age_secs, .. } => format!(
                    "the message was sealed {age_secs} s ago, more than the server keeps mail \
                     ({} s)",
                    self.message_ttl.as_secs()
                ),
                _ => "a stored message must be a Fernet token".to_owned(),
            })
        })?;
        if !self.deposits.allow(&me.to_owned()) {
            return Err(WireError::RateLimited);
        }
        if !claimed.contains(&message.to) {
            if self
                .storage
                .claim_of(&message.to)
                .await
                .map_err(storage_error)?
                .is_none()
            {
                return Err(WireError::Forbidden(format!(
                    "there is no user named {}",
                    message.to
                )));
            }
            claimed.insert(message.to.clone());
        }
        // Nobody's mail waits longer than the TTL from its sealing, whatever the sender asked.
        let latest = stamped + self.message_ttl;
        let mut stored = StoredMessage::from(message);
        stored.expires_at = stored.expires_at.min(latest);
        Ok(stored)
    }

    /// Leaves a message from `me` in its recipient's mailbox, by the rules.
    pub(crate) async fn deposit(&self, me: &str, message: WireMessage) -> Result<(), WireError> {
        let stored = self.admit(me, message, &mut HashSet::new()).await?;
        self.storage
            .mailbox()
            .put(stored)
            .await
            .map_err(store_error)
    }

    /// Leaves each of `batch` (at most [`MAX_DEPOSIT_BATCH`]) by the rules of
    /// [`Mail::deposit`], those that pass in one `put_many` (one commit on the embedded
    /// store); an outcome per message, in order.
    pub(crate) async fn deposit_batch(
        &self,
        me: &str,
        batch: Vec<WireMessage>,
    ) -> Result<Vec<DepositOutcome>, WireError> {
        if batch.len() > MAX_DEPOSIT_BATCH {
            return Err(WireError::LimitExceeded(format!(
                "at most {MAX_DEPOSIT_BATCH} messages per deposit batch"
            )));
        }
        let mut outcomes: Vec<Option<DepositOutcome>> = Vec::with_capacity(batch.len());
        let mut admitted = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        let mut claimed = HashSet::new();
        for message in batch {
            match self.admit(me, message, &mut claimed).await {
                Ok(stored) => {
                    slots.push(outcomes.len());
                    outcomes.push(None);
                    admitted.push(stored);
                }
                Err(refused) => outcomes.push(Some(DepositOutcome::Refused(refused))),
            }
        }
        if !admitted.is_empty() {
            let results = self.storage.mailbox().put_many(admitted).await;
            for (slot, result) in slots.into_iter().zip(results) {
                outcomes[slot] = Some(match result {
                    Ok(Put::Stored) => DepositOutcome::Stored,
                    Ok(_) => DepositOutcome::Duplicate,
                    Err(e) => DepositOutcome::Refused(store_error(e)),
                });
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    DepositOutcome::Refused(WireError::Backend("the store gave no answer".into()))
                })
            })
            .collect())
    }

    /// `me`'s oldest waiting messages, at most `limit` and as many as fit one reply (at
    /// least one, which always fits: tokens are at most [`MAX_TOKEN_LEN`]); the rest come
    /// with the next fetch.
    pub(crate) async fn fetch(&self, me: &str, limit: u32) -> Result<Vec<WireMessage>, WireError> {
        let limit = (limit as usize).clamp(1, MAX_FETCH_BATCH);
        let mut mail = self
            .storage
            .mailbox()
            .fetch(me, limit)
            .await
            .map_err(store_error)?;
        let mut used = 0;
        let keep = mail
            .iter()
            .take_while(|m| {
                used += m.token.len() + m.from.len() + m.to.len() + 64;
                used <= MAIL_REPLY_BUDGET
            })
            .count()
            .max(1);
        mail.truncate(keep);
        Ok(mail.into_iter().map(Into::into).collect())
    }

    /// Removes processed messages from `me`'s mailbox, each named by sender and id.
    pub(crate) async fn ack(&self, me: &str, acked: Vec<WireMailKey>) -> Result<(), WireError> {
        if acked.len() > MAX_ACK_BATCH {
            return Err(WireError::LimitExceeded(format!(
                "at most {MAX_ACK_BATCH} messages per acknowledgement"
            )));
        }
        let acked: Vec<MailKey> = acked.into_iter().map(Into::into).collect();
        self.storage
            .mailbox()
            .ack(me, &acked)
            .await
            .map_err(store_error)
    }

    /// Expiry notices of messages `me` sent.
    pub(crate) async fn take_expired(&self, me: &str) -> Result<Vec<WireExpired>, WireError> {
        let taken = self
            .storage
            .mailbox()
            .take_expired(me)
            .await
            .map_err(store_error)?;
        Ok(taken.into_iter().map(Into::into).collect())
    }

    /// New-mail notices for `me`'s mailbox.
    pub(crate) async fn subscribe(&self, me: &str) -> Result<BoxStream<'static, ()>, WireError> {
        self.storage
            .mailbox()
            .subscribe(me)
            .await
            .map_err(|e| WireError::Backend(e.to_string()))
    }
}
