//! The chat commands: parsing a typed line into a [`Command`], and the help text.
//!
//! Every command may be typed with a leading `/` (`/msg bob hi`, `/quit`), as in IRC
//! clients; in a conversation (`query <user>`) only those lines are commands, the others
//! are messages.

use std::time::Duration;

/// The longest mute: beyond it, `block` is the tool.
pub const MAX_MUTE: Duration = Duration::from_secs(365 * 86_400);

/// How many history lines `history <user>` shows without a count.
pub const HISTORY_LINES: usize = 20;

/// The most history lines one `history` shows.
pub const MAX_HISTORY_LINES: usize = 10_000;

/// What the user can type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `help`
    Help,
    /// `list`
    List,
    /// `send <user> <message>` (also `msg`)
    Send {
        /// Recipient.
        to: String,
        /// The rest of the line, as typed.
        text: String,
    },
    /// `reply <message>`: to whoever wrote last.
    Reply(String),
    /// `query <user>` starts a conversation, `query` alone ends it.
    Query(Option<String>),
    /// `block <user>`
    Block(String),
    /// `unblock <user>`
    Unblock(String),
    /// `mute <user> <duration>`
    Mute(String, Duration),
    /// `unmute <user>`
    Unmute(String),
    /// `muted`
    Muted,
    /// `fingerprint [user]`
    Fingerprint(Option<String>),
    /// `trust <user>`
    Trust(String),
    /// `requests`
    Requests,
    /// `accept <user>`
    Accept(String),
    /// `blocked`, `blocked export <file>`, `blocked import <file>`
    Blocked(BlockList),
    /// `history <user> [n]`
    History(String, usize),
    /// `status`
    Status,
    /// `quit` (also `exit`)
    Quit,
    /// An empty line.
    Nothing,
}

/// What `blocked` does with the block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockList {
    /// Shows it.
    Show,
    /// Writes it to a file, one name per line.
    Export(String),
    /// Blocks every name in a file.
    Import(String),
}

/// The command words, for completion (each also with a leading `/`).
pub const WORDS: &[&str] = &[
    "accept",
    "block",
    "blocked",
    "exit",
    "fingerprint",
    "help",
    "history",
    "list",
    "msg",
    "mute",
    "muted",
    "query",
    "quit",
    "reply",
    "requests",
    "send",
    "status",
    "trust",
    "unblock",
    "unmute",
];

/// The commands whose first argument is a username, for completion.
pub const TAKES_USER: &[&str] = &[
    "accept",
    "block",
    "fingerprint",
    "history",
    "msg",
    "mute",
    "query",
    "send",
    "trust",
    "unblock",
    "unmute",
];

/// The help text, one command per line.
pub const HELP: &str = "\
Commands (each may start with '/', as in /msg bob hi):
  help                       show this list
  list                       list online users
  send <user> <message>      send a message (also: msg)
  reply <message>            answer whoever wrote to you last
  query <user>               talk to one user: plain lines go to them ('query' alone ends it;
                             commands then need their '/')
  history <user> [n]         the last n messages with a user (20 without n)
  block <user>               block a user (nothing from them is shown)
  unblock <user>             unblock a user
  blocked                    list blocked users
  blocked export <file>      write the block list to a file, one name per line
  blocked import <file>      block every name in a file
  mute <user> <duration>     hide a user's messages for a while (60, 90s, 10m, 2h, 1d)
  unmute <user>              show a muted user's messages again
  muted                      list muted users and the time left
  fingerprint [user]         show your safety code, or a user's, to compare out of band
  trust <user>               accept a user's new key after checking their safety code
  requests                   list who wrote to you without being a contact (--contacts-only)
  accept <user>              show a user's messages and let them write to you
  status                     the server connection, your reachability, who is online
  quit                       leave (also: exit, Ctrl-D, Ctrl-C)";

/// Parses a mute duration: plain seconds, or with a unit (`90s`, `10m`, `2h`, `1d`).
fn duration(text: &str) -> Result<Duration, String> {
    const USAGE: &str = "Usage: mute <user> <duration>";
    let parsed = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .map_err(|_| format!("'{text}' is not a duration (60, 90s, 10m, 2h, 1d). {USAGE}"))?,
    };
    if parsed < Duration::from_secs(1) {
        return Err(format!("Mute for at least a second. {USAGE}"));
    }
    if parsed > MAX_MUTE {
        return Err(
            "A mute lasts at most 365 days; to hide someone for good, 'block <user>'.".into(),
        );
    }
    Ok(parsed)
}

/// Parses one typed line. Errors are sentences for the user.
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim();
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (line, ""),
    };
    let word = word.strip_prefix('/').unwrap_or(word).to_ascii_lowercase();
    let one_user = |usage: &str| -> Result<String, String> {
        let mut parts = rest.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(user), None) => Ok(user.to_owned()),
            _ => Err(format!("Usage: {usage}")),
        }
    };
    let alone = |command: Command, usage: &str| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(format!("'{usage}' takes nothing after it. Usage: {usage}"))
        }
    };
    match word.as_str() {
        "" => Ok(Command::Nothing),
        "help" => alone(Command::Help, "help"),
        "list" => alone(Command::List, "list"),
        "quit" | "exit" => alone(Command::Quit, "quit"),
        "status" => alone(Command::Status, "status"),
        "muted" => alone(Command::Muted, "muted"),
        "requests" => alone(Command::Requests, "requests"),
        "send" | "msg" => {
            let usage = || format!("Usage: {word} <user> <message>");
            let Some((to, text)) = rest.split_once(char::is_whitespace) else {
                return Err(usage());
            };
            let text = text.trim_start();
            if text.is_empty() {
                return Err(usage());
            }
            Ok(Command::Send {
                to: to.to_owned(),
                text: text.to_owned(),
            })
        }
        "reply" if rest.is_empty() => Err("Usage: reply <message>".into()),
        "reply" => Ok(Command::Reply(rest.to_owned())),
        "query" => {
            let mut parts = rest.split_whitespace();
            match (parts.next(), parts.next()) {
                (user, None) => Ok(Command::Query(user.map(str::to_owned))),
                _ => Err("Usage: query <user> (or 'query' alone to end the conversation)".into()),
            }
        }
        "block" => one_user("block <user>").map(Command::Block),
        "unblock" => one_user("unblock <user>").map(Command::Unblock),
        "unmute" => one_user("unmute <user>").map(Command::Unmute),
        "trust" => one_user("trust <user>").map(Command::Trust),
        "accept" => one_user("accept <user>").map(Command::Accept),
        "blocked" => {
            let mut parts = rest.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (None, _, _) => Ok(Command::Blocked(BlockList::Show)),
                (Some("export"), Some(file), None) => {
                    Ok(Command::Blocked(BlockList::Export(file.to_owned())))
                }
                (Some("import"), Some(file), None) => {
                    Ok(Command::Blocked(BlockList::Import(file.to_owned())))
                }
                _ => Err("Usage: blocked [export <file> | import <file>]".into()),
            }
        }
        "fingerprint" => {
            let mut parts = rest.split_whitespace();
            match (parts.next(), parts.next()) {
                (user, None) => Ok(Command::Fingerprint(user.map(str::to_owned))),
                _ => Err("Usage: fingerprint [user]".into()),
            }
        }
        "history" => {
            const USAGE: &str = "Usage: history <user> [n]";
            let mut parts = rest.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(user), None, None) => Ok(Command::History(user.to_owned(), HISTORY_LINES)),
                (Some(user), Some(n), None) => match n.parse::<usize>() {
                    Ok(n) if (1..=MAX_HISTORY_LINES).contains(&n) => {
                        Ok(Command::History(user.to_owned(), n))
                    }
                    _ => Err(format!(
                        "'{n}' is not a number of lines (1 to {MAX_HISTORY_LINES}). {USAGE}"
                    )),
                },
                _ => Err(USAGE.into()),
            }
        }
        "mute" => {
            let mut parts = rest.split_whitespace();
            let (Some(user), Some(time), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err("Usage: mute <user> <duration>".into());
            };
            Ok(Command::Mute(user.to_owned(), duration(time)?))
        }
        other => Err(format!(
            "Unknown command '{other}'. Type 'help' for commands."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_as_the_original_typed_them() {
        assert_eq!(parse("help"), Ok(Command::Help));
        assert_eq!(parse("  list  "), Ok(Command::List));
        assert_eq!(
            parse("send bob hello there,  friend"),
            Ok(Command::Send {
                to: "bob".into(),
                text: "hello there,  friend".into()
            })
        );
        assert_eq!(parse("block mallory"), Ok(Command::Block("mallory".into())));
        assert_eq!(parse("accept carol"), Ok(Command::Accept("carol".into())));
        assert_eq!(parse("requests"), Ok(Command::Requests));
        assert_eq!(parse("blocked"), Ok(Command::Blocked(BlockList::Show)));
        assert_eq!(
            parse("blocked export /tmp/b.txt"),
            Ok(Command::Blocked(BlockList::Export("/tmp/b.txt".into())))
        );
        assert_eq!(
            parse("blocked import b.txt"),
            Ok(Command::Blocked(BlockList::Import("b.txt".into())))
        );
        assert!(parse("blocked delete x").is_err());
        assert!(parse("requests now").is_err());
        assert_eq!(
            parse("unblock mallory"),
            Ok(Command::Unblock("mallory".into()))
        );
        assert_eq!(
            parse("mute carol 60"),
            Ok(Command::Mute("carol".into(), Duration::from_secs(60)))
        );
        assert_eq!(
            parse("mute carol 10m"),
            Ok(Command::Mute("carol".into(), Duration::from_secs(600)))
        );
        assert_eq!(parse("unmute carol"), Ok(Command::Unmute("carol".into())));
        assert_eq!(parse("fingerprint"), Ok(Command::Fingerprint(None)));
        assert_eq!(
            parse("fingerprint bob"),
            Ok(Command::Fingerprint(Some("bob".into())))
        );
        assert_eq!(parse("trust bob"), Ok(Command::Trust("bob".into())));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse("exit"), Ok(Command::Quit));
        assert_eq!(parse(""), Ok(Command::Nothing));
        assert_eq!(parse("SEND bob hi").map(|_| ()), Ok(()));
    }

    #[test]
    fn slash_forms_and_conversations() {
        assert_eq!(
            parse("/msg bob hi there"),
            Ok(Command::Send {
                to: "bob".into(),
                text: "hi there".into()
            })
        );
        assert_eq!(parse("/quit"), Ok(Command::Quit));
        assert_eq!(parse("/query bob"), Ok(Command::Query(Some("bob".into()))));
        assert_eq!(parse("query"), Ok(Command::Query(None)));
        assert_eq!(parse("reply sure"), Ok(Command::Reply("sure".into())));
        assert_eq!(parse("history bob"), Ok(Command::History("bob".into(), 20)));
        assert_eq!(
            parse("history bob 5"),
            Ok(Command::History("bob".into(), 5))
        );
        assert_eq!(parse("muted"), Ok(Command::Muted));
        assert_eq!(parse("status"), Ok(Command::Status));
    }

    #[test]
    fn mistakes_get_a_sentence() {
        assert_eq!(
            parse("mute carol soon"),
            Err(
                "'soon' is not a duration (60, 90s, 10m, 2h, 1d). Usage: mute <user> <duration>"
                    .into()
            )
        );
        assert_eq!(
            parse("mute carol"),
            Err("Usage: mute <user> <duration>".into())
        );
        assert_eq!(
            parse("mute bob 0"),
            Err("Mute for at least a second. Usage: mute <user> <duration>".into())
        );
        assert!(
            parse("mute bob 18446744073709551615")
                .unwrap_err()
                .contains("at most 365 days")
        );
        assert_eq!(
            parse("send bob"),
            Err("Usage: send <user> <message>".into())
        );
        assert_eq!(parse("send"), Err("Usage: send <user> <message>".into()));
        assert_eq!(parse("block"), Err("Usage: block <user>".into()));
        assert_eq!(parse("block a b"), Err("Usage: block <user>".into()));
        assert_eq!(
            parse("exit now"),
            Err("'quit' takes nothing after it. Usage: quit".into())
        );
        assert!(parse("help me").is_err());
        assert!(parse("history bob 0").is_err());
        assert!(parse("history bob lots").is_err());
        assert_eq!(parse("reply"), Err("Usage: reply <message>".into()));
        assert_eq!(
            parse("dance"),
            Err("Unknown command 'dance'. Type 'help' for commands.".into())
        );
    }
}
