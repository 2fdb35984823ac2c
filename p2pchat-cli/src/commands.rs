//! The chat commands: parsing a typed line into a [`Command`], and the help text.

use std::time::Duration;

/// What the user can type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `help`
    Help,
    /// `list`
    List,
    /// `send <user> <message>`
    Send {
        /// Recipient.
        to: String,
        /// The rest of the line, as typed.
        text: String,
    },
    /// `block <user>`
    Block(String),
    /// `unblock <user>`
    Unblock(String),
    /// `mute <user> <seconds>`
    Mute(String, Duration),
    /// `unmute <user>`
    Unmute(String),
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
    /// `quit`
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

/// The help text, one command per line.
pub const HELP: &str = "\
Commands:
  help                       show this list
  list                       list online users
  send <user> <message>      send a message
  block <user>               block a user (nothing from them is shown)
  unblock <user>             unblock a user
  mute <user> <seconds>      hide a user's messages for a while
  unmute <user>              show a muted user's messages again
  fingerprint [user]         show your safety code, or a user's, to compare out of band
  trust <user>               accept a user's new key after checking their safety code
  requests                   list who wrote to you without being a contact (--contacts-only)
  accept <user>              show a user's messages and let them write to you
  blocked                    list blocked users
  blocked export <file>      write the block list to a file, one name per line
  blocked import <file>      block every name in a file
  quit                       leave (Ctrl-D and Ctrl-C too)";

/// Parses one typed line. Errors are sentences for the user.
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim();
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (line, ""),
    };
    let one_user = |usage: &str| -> Result<String, String> {
        let mut parts = rest.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(user), None) => Ok(user.to_owned()),
            _ => Err(format!("Usage: {usage}")),
        }
    };
    match word.to_ascii_lowercase().as_str() {
        "" => Ok(Command::Nothing),
        "help" => Ok(Command::Help),
        "list" => Ok(Command::List),
        "quit" | "exit" => Ok(Command::Quit),
        "send" => {
            let Some((to, text)) = rest.split_once(char::is_whitespace) else {
                return Err("Usage: send <user> <message>".into());
            };
            let text = text.trim_start();
            if text.is_empty() {
                return Err("Usage: send <user> <message>".into());
            }
            Ok(Command::Send {
                to: to.to_owned(),
                text: text.to_owned(),
            })
        }
        "block" => one_user("block <user>").map(Command::Block),
        "unblock" => one_user("unblock <user>").map(Command::Unblock),
        "unmute" => one_user("unmute <user>").map(Command::Unmute),
        "trust" => one_user("trust <user>").map(Command::Trust),
        "accept" => one_user("accept <user>").map(Command::Accept),
        "requests" if rest.is_empty() => Ok(Command::Requests),
        "requests" => Err("Usage: requests".into()),
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
        "mute" => {
            let mut parts = rest.split_whitespace();
            let (Some(user), Some(seconds), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err("Usage: mute <user> <seconds>".into());
            };
            match seconds.parse::<u64>() {
                Ok(secs) => Ok(Command::Mute(user.to_owned(), Duration::from_secs(secs))),
                Err(_) => Err(format!(
                    "'{seconds}' is not a number of seconds. Usage: mute <user> <seconds>"
                )),
            }
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
        assert_eq!(parse("unmute carol"), Ok(Command::Unmute("carol".into())));
        assert_eq!(parse("fingerprint"), Ok(Command::Fingerprint(None)));
        assert_eq!(
            parse("fingerprint bob"),
            Ok(Command::Fingerprint(Some("bob".into())))
        );
        assert_eq!(parse("trust bob"), Ok(Command::Trust("bob".into())));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse(""), Ok(Command::Nothing));
        assert_eq!(parse("SEND bob hi").map(|_| ()), Ok(()));
    }

    #[test]
    fn mistakes_get_a_sentence() {
        assert_eq!(
            parse("mute carol soon"),
            Err("'soon' is not a number of seconds. Usage: mute <user> <seconds>".into())
        );
        assert_eq!(
            parse("mute carol"),
            Err("Usage: mute <user> <seconds>".into())
        );
        assert_eq!(
            parse("send bob"),
            Err("Usage: send <user> <message>".into())
        );
        assert_eq!(parse("send"), Err("Usage: send <user> <message>".into()));
        assert_eq!(parse("block"), Err("Usage: block <user>".into()));
        assert_eq!(parse("block a b"), Err("Usage: block <user>".into()));
        assert_eq!(
            parse("dance"),
            Err("Unknown command 'dance'. Type 'help' for commands.".into())
        );
    }
}
