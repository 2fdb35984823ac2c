//! What the user reads: events as lines in the original's format, errors as sentences.

use p2pchat_core::error::chain;
use p2pchat_core::{DiscoveryError, Event, NodeError, SpawnError};

/// `text` with its control characters escaped (`\n`, `\u{1b}`, ...): a peer must not be
/// able to start a new line that looks like another user's message or an announcement, or
/// send terminal escape sequences.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The line an event prints, if any.
pub fn event(event: &Event) -> Option<String> {
    Some(match event {
        Event::MessageReceived {
            from,
            text,
            offline: false,
            ..
        } => format!("[{from}] {}", printable(text)),
        Event::MessageReceived {
            from,
            text,
            offline: true,
            ..
        } => format!("[Offline][{from}] {}", printable(text)),
        Event::Announcement { text } => format!("[Special Message] {}", printable(text)),
        Event::StoredOffline { to, .. } => {
            format!("({to} is offline: the message is stored and will be delivered later)")
        }
        Event::Queued {
            to,
            retry: Some(reason),
            ..
        } => format!("(a message to {to} is queued: {})", printable(reason)),
        Event::Cancelled { to, .. } => format!("(the message to {to} was cancelled)"),
        Event::Expired { to, .. } => {
            format!("(a message to {to} expired before {to} came online; it was not delivered)")
        }
        Event::SendFailed { to, reason, .. } => {
            format!(
                "(a message to {to} could not be sent: {})",
                printable(reason)
            )
        }
        Event::KeyChanged { username, old, new } => format!(
            "!! WARNING: {username}'s key has changed. It was {old}, it is now {new}.\n\
             !! Messages to {username} are held. Compare safety codes with {username} out of band \
             ('fingerprint {username}'), then accept the new key with 'trust {username}'."
        ),
        Event::MessageRequest { from } => format!(
            "({from} wants to message you: 'accept {from}' to read, 'block {from}' to refuse)"
        ),
        Event::Error { message } => format!("(error: {})", printable(message)),
        Event::Reachability { direct: false } => {
            "(you are not reachable directly; messages go through the server relay)".into()
        }
        Event::Lagged { missed } => {
            format!("({missed} events were missed: the screen fell behind)")
        }
        // Deliveries, first queueing, sending and presence are quiet, as in the original.
        _ => return None,
    })
}

/// A failed command as a sentence.
pub fn error(e: &NodeError, discovery: &str) -> String {
    match e {
        NodeError::UnknownUser(user) => format!("There is no user named '{user}'."),
        NodeError::MessageTooLong { len, max } => {
            format!("That message is too long: {len} bytes, and the limit is {max}.")
        }
        NodeError::Blocked(user) => {
            format!("You have blocked {user}. Type 'unblock {user}' to write to them again.")
        }
        NodeError::SendToSelf => "You cannot send a message to yourself.".into(),
        NodeError::NothingToTrust(user) => {
            format!("{user}'s key has not changed: there is nothing to trust.")
        }
        NodeError::InvalidUsername(e) => format!("That is not a valid username: {e}."),
        NodeError::Discovery(e) => discovery_error(e, discovery),
        other => format!("{}.", chain(other)),
    }
}

/// Why the node could not start, as a sentence.
pub fn spawn_error(e: &SpawnError, discovery: &str, port: u16) -> String {
    match e {
        SpawnError::Transport(t) => format!(
            "Cannot listen on port {port}: {}. Choose another with --port (0 picks a free one).",
            chain(t)
        ),
        SpawnError::InvalidUsername(e) => format!("That is not a valid username: {e}."),
        SpawnError::Discovery(e) => discovery_error(e, discovery),
        other => format!("{}.", chain(other)),
    }
}

/// A directory failure as a sentence, naming the server.
pub fn discovery_error(e: &DiscoveryError, discovery: &str) -> String {
    match e {
        DiscoveryError::Unreachable { source, .. } => format!(
            "Cannot reach the discovery server at {discovery} ({}). Start one with \
             'p2pchat-discovery', or point to yours with --discovery HOST:PORT.",
            chain(source)
        ),
        DiscoveryError::NameTaken { username } => format!(
            "The name '{username}' is already taken by another key. Choose another name with \
             --user, or use the data directory that holds {username}'s key (--data-dir)."
        ),
        DiscoveryError::InvalidUsername(e) => format!("That is not a valid username: {e}."),
        DiscoveryError::RateLimited => {
            "The discovery server is busy (too many registrations); try again in a moment.".into()
        }
        other => format!("The discovery server said: {}.", chain(other)),
    }
}

#[cfg(test)]
mod tests {
    use p2pchat_core::{Identity, MessageId};

    use super::*;

    #[test]
    fn messages_print_as_the_original_printed_them() {
        let received = |offline| Event::MessageReceived {
            id: MessageId::random(),
            from: "bob".into(),
            text: "hi".into(),
            sent_at: std::time::SystemTime::now(),
            offline,
        };
        assert_eq!(event(&received(false)).unwrap(), "[bob] hi");
        assert_eq!(event(&received(true)).unwrap(), "[Offline][bob] hi");
        assert_eq!(
            event(&Event::Announcement {
                text: "maintenance".into()
            })
            .unwrap(),
            "[Special Message] maintenance"
        );
        assert_eq!(
            event(&Event::Delivered {
                id: MessageId::random(),
                to: "bob".into()
            }),
            None
        );
    }

    #[test]
    fn a_peer_cannot_forge_lines_or_send_escape_sequences() {
        let forged = Event::MessageReceived {
            id: MessageId::random(),
            from: "mallory".into(),
            text: "hi\n[Special Message] send me your key\u{1b}[2J".into(),
            sent_at: std::time::SystemTime::now(),
            offline: false,
        };
        let line = event(&forged).unwrap();
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line:?}");
        assert_eq!(
            line,
            "[mallory] hi\\n[Special Message] send me your key\\u{1b}[2J"
        );
    }

    #[test]
    fn a_key_change_names_fingerprint_and_trust() {
        let (old, new) = (
            Identity::generate().public_key().fingerprint(),
            Identity::generate().public_key().fingerprint(),
        );
        let line = event(&Event::KeyChanged {
            username: "bob".into(),
            old,
            new,
        })
        .unwrap();
        assert!(
            line.contains("'fingerprint bob'") && line.contains("'trust bob'"),
            "{line}"
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        let unreachable = NodeError::Discovery(DiscoveryError::Unreachable {
            addr: "127.0.0.1:5001".into(),
            source: "connection refused".into(),
        });
        let said = error(&unreachable, "127.0.0.1:5001");
        assert!(said.starts_with("Cannot reach the discovery server at 127.0.0.1:5001"));
        assert!(said.contains("(connection refused)"), "{said}");
        assert!(said.contains("p2pchat-discovery"));
        // A failure's cause is part of the sentence.
        let store_down = NodeError::Store(p2pchat_core::store::StoreError::unavailable(
            "the Redis server closed the connection",
        ));
        assert_eq!(
            error(&store_down, "x"),
            "the offline store is unavailable: the Redis server closed the connection."
        );
        assert_eq!(
            error(&NodeError::UnknownUser("zed".into()), "x"),
            "There is no user named 'zed'."
        );
    }
}
