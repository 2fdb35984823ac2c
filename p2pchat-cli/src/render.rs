//! What the user reads: events as lines in the original's format, errors as sentences.

use std::time::SystemTime;

use anstyle::{AnsiColor, Color, Style};
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

/// How lines look: colours (in a terminal, unless `NO_COLOR` is set) and whose name is
/// highlighted.
#[derive(Debug, Clone)]
pub struct Look {
    /// Whether to colour.
    pub color: bool,
    /// Our own name, highlighted where it appears.
    pub me: String,
}

const NOTICE: Style = Style::new().dimmed();
const WARNING: Style = Style::new()
    .bold()
    .fg_color(Some(Color::Ansi(AnsiColor::Red)));
const ANNOUNCEMENT: Style = Style::new()
    .bold()
    .fg_color(Some(Color::Ansi(AnsiColor::Magenta)));
const OWN_NAME: Style = Style::new()
    .bold()
    .fg_color(Some(Color::Ansi(AnsiColor::Yellow)));
/// Peers' names get one of these, the same one for a name every time.
const NAMES: [AnsiColor; 6] = [
    AnsiColor::Cyan,
    AnsiColor::Green,
    AnsiColor::Blue,
    AnsiColor::BrightMagenta,
    AnsiColor::BrightCyan,
    AnsiColor::BrightGreen,
];

impl Look {
    /// `text` in `style`, when colouring.
    pub fn paint(&self, style: Style, text: &str) -> String {
        if self.color {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }

    /// A user's name, in its colour (ours highlighted).
    pub fn name(&self, name: &str) -> String {
        if name == self.me {
            return self.paint(OWN_NAME, name);
        }
        let hash = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        let style = Style::new().fg_color(Some(Color::Ansi(NAMES[hash % NAMES.len()])));
        self.paint(style, name)
    }

    /// A message's text, made printable, our name highlighted where it is mentioned.
    pub fn text(&self, text: &str) -> String {
        let text = printable(text);
        if !self.color || self.me.is_empty() {
            return text;
        }
        text.replace(&self.me, &self.paint(OWN_NAME, &self.me))
    }

    /// A notice (not a message), dimmed.
    pub fn notice(&self, text: &str) -> String {
        self.paint(NOTICE, text)
    }

    /// A warning, in bold red.
    pub fn warning(&self, text: &str) -> String {
        self.paint(WARNING, text)
    }

    /// A received message's line: the time, `[Offline]` for mail, the sender, the text.
    /// A live message shows when it arrived; mail shows when its sender sent it.
    pub fn received(&self, from: &str, text: &str, sent_at: SystemTime, offline: bool) -> String {
        let (at, mark) = if offline {
            (clock(sent_at), "[Offline]")
        } else {
            (clock(SystemTime::now()), "")
        };
        format!("{at} {mark}[{}] {}", self.name(from), self.text(text))
    }

    /// Our own message's line.
    pub fn sent(&self, to: &str, text: &str, at: SystemTime) -> String {
        format!(
            "{} [{} -> {}] {}",
            clock(at),
            self.name(&self.me),
            self.name(to),
            self.text(text)
        )
    }
}

/// A time as the screen shows it, in the local time zone: `14:05` today, `2026-12-01 14:05`
/// on another day.
pub fn clock(at: SystemTime) -> String {
    let zone = jiff::tz::TimeZone::system();
    let Ok(at) = jiff::Timestamp::try_from(at) else {
        return "--:--".into();
    };
    let at = at.to_zoned(zone.clone());
    let today = jiff::Timestamp::now().to_zoned(zone).date();
    if at.date() == today {
        at.strftime("%H:%M").to_string()
    } else {
        at.strftime("%Y-%m-%d %H:%M").to_string()
    }
}

/// The first words of a message, to name it in a notice.
pub fn snippet(text: &str) -> String {
    const LEN: usize = 40;
    let text = printable(text);
    match text.char_indices().nth(LEN) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// The line an event prints, if any. `sent` names our message by its first words, when
/// known.
pub fn event(look: &Look, event: &Event, sent: Option<&str>) -> Option<String> {
    let what = match sent {
        Some(snippet) => format!("\"{snippet}\""),
        None => "the message".to_owned(),
    };
    Some(match event {
        Event::MessageReceived {
            from,
            text,
            sent_at,
            offline,
            ..
        } => look.received(from, text, *sent_at, *offline),
        Event::Announcement { text } => format!(
            "{} {} {}",
            clock(SystemTime::now()),
            look.paint(ANNOUNCEMENT, "[Special Message]"),
            printable(text)
        ),
        Event::Delivered { to, .. } => look.notice(&format!("({what} was delivered to {to})")),
        Event::StoredOffline { to, .. } => look.notice(&format!(
            "({to} cannot be reached now: {what} is stored and will be delivered when {to} can receive it)"
        )),
        Event::Queued {
            to,
            retry: Some(reason),
            ..
        } => look.notice(&format!(
            "({what} to {to} is queued: {})",
            printable(reason)
        )),
        Event::Cancelled { to, .. } => look.notice(&format!("({what} to {to} was cancelled)")),
        Event::Expired { to, .. } => look.warning(&format!(
            "({what} to {to} expired before {to} came online; it was not delivered)"
        )),
        Event::SendFailed { to, reason, .. } => look.warning(&format!(
            "({what} to {to} could not be sent: {})",
            printable(reason)
        )),
        Event::KeyChanged { username, old, new } => look.warning(&format!(
            "!! WARNING: {username}'s key has changed. It was {old}, it is now {new}.\n\
             !! Messages to {username} are held. Compare safety codes with {username} out of band \
             ('fingerprint {username}'), then accept the new key with 'trust {username}'."
        )),
        Event::MessageRequest { from } => look.notice(&format!(
            "({from} wants to message you: 'accept {from}' to read, 'block {from}' to refuse)"
        )),
        Event::PeerOnline { username } => look.notice(&format!(
            "{} ({username} is online)",
            clock(SystemTime::now())
        )),
        Event::PeerOffline { username } => look.notice(&format!(
            "{} ({username} went offline)",
            clock(SystemTime::now())
        )),
        Event::DirectoryLost { reason } => look.warning(&format!(
            "(lost the connection to the discovery server: {}; reconnecting. Messages wait \
             in your outbox meanwhile)",
            printable(reason)
        )),
        Event::DirectoryBack => look.notice("(connected to the discovery server again)"),
        Event::DirectoryEnded { reason } => look.warning(&format!(
            "(the discovery server ended this session: {}. This client stops.)",
            printable(reason)
        )),
        Event::Error { message } => look.warning(&format!("(error: {})", printable(message))),
        Event::Reachability { direct: false } => look.notice(
            "(you are not reachable directly; messages go through the server relay)",
        ),
        Event::Lagged { missed } => {
            look.notice(&format!("({missed} events were missed: the screen fell behind)"))
        }
        // First queueing and writing to a connection are quiet.
        _ => return None,
    })
}

/// An event as one JSON object for `--json` (every event, the quiet ones too).
pub fn json(event: &Event) -> serde_json::Value {
    use serde_json::json;
    let ms = |at: &SystemTime| {
        at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    };
    match event {
        Event::MessageReceived {
            id,
            from,
            text,
            sent_at,
            offline,
        } => json!({"event": "message", "id": id.to_string(), "from": from, "text": text,
                    "sent_at_ms": ms(sent_at), "offline": offline}),
        Event::Queued { id, to, retry } => {
            json!({"event": "queued", "id": id.to_string(), "to": to, "retry": retry})
        }
        Event::Sent { id, to } => json!({"event": "sent", "id": id.to_string(), "to": to}),
        Event::Delivered { id, to } => {
            json!({"event": "delivered", "id": id.to_string(), "to": to})
        }
        Event::StoredOffline { id, to } => {
            json!({"event": "stored", "id": id.to_string(), "to": to})
        }
        Event::Expired { id, to } => json!({"event": "expired", "id": id.to_string(), "to": to}),
        Event::Cancelled { id, to } => {
            json!({"event": "cancelled", "id": id.to_string(), "to": to})
        }
        Event::SendFailed { id, to, reason } => {
            json!({"event": "failed", "id": id.to_string(), "to": to, "reason": reason})
        }
        Event::MessageRequest { from } => json!({"event": "request", "from": from}),
        Event::PeerOnline { username } => json!({"event": "online", "user": username}),
        Event::PeerOffline { username } => json!({"event": "offline", "user": username}),
        Event::KeyChanged { username, old, new } => json!({"event": "key_changed",
            "user": username, "old": old.to_string(), "new": new.to_string()}),
        Event::Announcement { text } => json!({"event": "announcement", "text": text}),
        Event::Error { message } => json!({"event": "error", "message": message}),
        Event::DirectoryLost { reason } => json!({"event": "server_lost", "reason": reason}),
        Event::DirectoryBack => json!({"event": "server_back"}),
        Event::DirectoryEnded { reason } => json!({"event": "server_ended", "reason": reason}),
        Event::Reachability { direct } => json!({"event": "reachability", "direct": direct}),
        Event::Lagged { missed } => json!({"event": "lagged", "missed": missed}),
        other => json!({"event": "other", "debug": format!("{other:?}")}),
    }
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

    fn plain() -> Look {
        Look {
            color: false,
            me: "alice".into(),
        }
    }

    #[test]
    fn times_read_as_the_clock_does() {
        let now = SystemTime::now();
        let today = clock(now);
        assert_eq!(today.len(), 5, "{today}");
        assert_eq!(&today[2..3], ":");
        let long_ago = clock(now - std::time::Duration::from_secs(3 * 86_400));
        assert_eq!(long_ago.len(), 16, "{long_ago}");
    }

    #[test]
    fn every_event_is_one_json_object() {
        let id = MessageId::random();
        let value = json(&Event::Delivered {
            id,
            to: "bob".into(),
        });
        assert_eq!(value["event"], "delivered");
        assert_eq!(value["id"], id.to_string());
        let line = serde_json::to_string(&json(&Event::MessageReceived {
            id,
            from: "bob".into(),
            text: "a\nb".into(),
            sent_at: SystemTime::now(),
            offline: true,
        }))
        .unwrap();
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn messages_print_as_the_original_printed_them() {
        let received = |offline| Event::MessageReceived {
            id: MessageId::random(),
            from: "bob".into(),
            text: "hi".into(),
            sent_at: std::time::SystemTime::now(),
            offline,
        };
        let look = plain();
        let now = clock(SystemTime::now());
        assert_eq!(
            event(&look, &received(false), None).unwrap(),
            format!("{now} [bob] hi")
        );
        assert_eq!(
            event(&look, &received(true), None).unwrap(),
            format!("{now} [Offline][bob] hi")
        );
        assert_eq!(
            event(
                &look,
                &Event::Announcement {
                    text: "maintenance".into()
                },
                None
            )
            .unwrap(),
            format!("{now} [Special Message] maintenance")
        );
        assert_eq!(
            event(
                &look,
                &Event::Delivered {
                    id: MessageId::random(),
                    to: "bob".into()
                },
                Some("hi")
            )
            .unwrap(),
            "(\"hi\" was delivered to bob)"
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
        let line = event(&plain(), &forged, None).unwrap();
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line:?}");
        assert!(
            line.ends_with("[mallory] hi\\n[Special Message] send me your key\\u{1b}[2J"),
            "{line}"
        );
        // Coloured, the text still carries no escape of the peer's.
        let colored = Look {
            color: true,
            me: "bob".into(),
        };
        let line = event(&colored, &forged, None).unwrap();
        assert!(!line.contains("\u{1b}[2J"), "{line:?}");
    }

    #[test]
    fn a_key_change_names_fingerprint_and_trust() {
        let (old, new) = (
            Identity::generate().public_key().fingerprint(),
            Identity::generate().public_key().fingerprint(),
        );
        let line = event(
            &plain(),
            &Event::KeyChanged {
                username: "bob".into(),
                old,
                new,
            },
            None,
        )
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
