//! `ListOnline`: a page of online users, in name order.

use std::time::SystemTime;

use p2pchat_core::protocol::discovery::{MAX_PAGE_SIZE, Reply, WirePage, WirePeer};

use super::{Answer, Then, online_peer};
use crate::mail::storage_error;
use crate::session::Session;

/// Up to `limit` (at most [`MAX_PAGE_SIZE`]) online users after `after`, and where the next
/// page starts.
pub(in crate::session) async fn apply(
    session: &mut Session,
    after: Option<&str>,
    limit: u32,
) -> Answer {
    let limit = (limit as usize).clamp(1, MAX_PAGE_SIZE);
    let listed = session
        .directory
        .storage
        .list_online(after, limit + 1)
        .await;
    let result = listed.map_err(storage_error).map(|leases| {
        let now = SystemTime::now();
        let mut users: Vec<WirePeer> = leases.into_iter().map(|l| online_peer(l, now)).collect();
        let next = (users.len() > limit).then(|| {
            users.truncate(limit);
            users.last().map(|u| u.username.clone())
        });
        Reply::Page(WirePage {
            users,
            next: next.flatten(),
        })
    });
    (result, Then::Continue)
}
