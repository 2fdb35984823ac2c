//! A connection that announces instead of registering: an operator's signed announcement,
//! relayed (through the storage, so every instance sharing it relays it too) and answered
//! with how many sessions this instance has.

use std::sync::Arc;

use p2pchat_core::Announcement;
use p2pchat_core::protocol::discovery::{ServerFrame, WireError};
use tokio::io::AsyncWrite;

use super::Opening;
use super::connection::Writer;
use crate::directory::Directory;
use crate::mail::storage_error;

/// Relays `announcement` if this server's operator signed it, fresh and not seen before:
/// to this instance's sessions at once, recorded (so a restart does not relay it again), and
/// published through the storage for the other instances. `Err(None)`: the connection
/// failed, say nothing.
pub(super) async fn apply<W: AsyncWrite + Unpin>(
    directory: &Arc<Directory>,
    writer: &mut Writer<W>,
    announcement: &Announcement,
) -> Result<Opening, Option<WireError>> {
    directory.admit_announcement(announcement).map_err(Some)?;
    let sessions = directory.relay(announcement);
    directory.record_announced(announcement).await;
    directory
        .storage
        .publish_announcement(announcement)
        .await
        .map_err(|e| Some(storage_error(e)))?;
    tracing::info!(id = %announcement.id, sessions, "announcement accepted");
    writer
        .send(&ServerFrame::Announced { sessions })
        .await
        .map_err(|_| None)?;
    Ok(Opening::Announced)
}
