//! The client: starts a node, then runs the command loop over a line editor (in a terminal)
//! or plain lines (anything else), printing the node's events as they come.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use futures::StreamExt;
use p2pchat_core::error::chain;
use p2pchat_core::store::RedisStore;
use p2pchat_core::{ChatNode, DiscoveryClient, Event, Identity};
use rustyline_async::{Readline, ReadlineEvent, SharedWriter};
use tokio::io::AsyncBufReadExt;

use crate::commands::{self, Command, HELP};
use crate::render;

/// The identity key's file name in the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Everything the client needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The username.
    pub user: String,
    /// The port to accept peers on (0: any free port).
    pub port: u16,
    /// The discovery server, `host:port`.
    pub discovery: String,
    /// Identity key, pinned keys, block and mute lists.
    pub data_dir: PathBuf,
    /// Offline mail and announcements through Redis instead of the server mailbox.
    pub redis_url: Option<String>,
    /// The Redis channel announcements arrive on.
    pub announcement_channel: String,
    /// Addresses to publish instead of the one the server sees.
    pub announce: Vec<std::net::SocketAddr>,
    /// `false`: nobody can dial this client; peers use connect-back or the relay.
    pub dialable: bool,
    /// Contacts-only mode (`--contacts-only`).
    pub contacts_only: bool,
    /// Messages per second per sender (`--sender-rate`; 0: no limit).
    pub sender_rate: u32,
    /// Use the line editor (stdin is a terminal).
    pub terminal: bool,
}

/// Where lines go: above the line editor's prompt, or straight to stdout.
#[derive(Clone)]
enum Out {
    Terminal(SharedWriter),
    Plain,
}

impl Out {
    fn say(&mut self, text: &str) {
        match self {
            // Printed above the prompt, keeping what is being typed.
            Out::Terminal(w) => {
                let _ = writeln!(w, "{text}");
            }
            Out::Plain => {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{text}");
                let _ = stdout.flush();
            }
        }
    }
}

/// Starts the node described by `settings`. Failures are sentences for the user.
async fn start(settings: &Settings) -> anyhow::Result<ChatNode> {
    // Private: it holds the identity key and the node database. Directories created here
    // are 0700; an existing one keeps its mode.
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut dirs, 0o700);
    dirs.create(&settings.data_dir).with_context(|| {
        format!(
            "Cannot create the data directory {}",
            settings.data_dir.display()
        )
    })?;
    let key = settings.data_dir.join(IDENTITY_FILE);
    let identity = Identity::load_or_generate(&key)
        .with_context(|| format!("Cannot use the identity key {}", key.display()))?;
    let mut builder = ChatNode::builder()
        .identity(identity)
        .username(settings.user.clone())
        .listen(([0, 0, 0, 0], settings.port).into())
        .announce(settings.announce.clone())
        .dialable(settings.dialable)
        .contacts_only(settings.contacts_only)
        .messages_per_second_per_sender(settings.sender_rate)
        .discovery(DiscoveryClient::new(settings.discovery.clone()))
        .data_dir(&settings.data_dir);
    if let Some(url) = &settings.redis_url {
        let store = RedisStore::connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("Cannot use Redis at {url}: {}.", chain(&e)))?;
        let feed = store
            .announcements(&settings.announcement_channel)
            .await
            .map_err(|e| {
                anyhow::anyhow!("Cannot listen for announcements on Redis: {}.", chain(&e))
            })?;
        builder = builder.offline_store(store).announcements(feed);
    }
    builder.spawn().await.map_err(|e| {
        anyhow::anyhow!(
            "{}",
            render::spawn_error(&e, &settings.discovery, settings.port)
        )
    })
}

/// Runs the client until `quit`, end of input, Ctrl-C or SIGTERM; then shuts the node down
/// (deregistering, storing whatever is in flight) and flushes the screen.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let node = start(&settings).await?;
    let events = node.events();
    let waiting = node.outbox().await.len();
    let greeting = match waiting {
        0 => "Client started. Type 'help' for commands.".to_owned(),
        n => format!(
            "Client started. Type 'help' for commands.\n({n} message(s) from last time are still queued and will be sent.)"
        ),
    };
    let greeting = greeting.as_str();
    if settings.terminal {
        let (mut editor, writer) = Readline::new("> ".into()).context("Cannot use the terminal")?;
        let mut out = Out::Terminal(writer);
        out.say(greeting);
        let printer = tokio::spawn(print_events(events, out.clone()));
        let result = terminal_loop(&node, &settings, &mut editor, &mut out).await;
        finish(&node, &settings, &mut out).await;
        drop(out);
        let _ = printer.await;
        let _ = editor.flush();
        result
    } else {
        let mut out = Out::Plain;
        out.say(greeting);
        let printer = tokio::spawn(print_events(events, out.clone()));
        let result = plain_loop(&node, &settings, &mut out).await;
        finish(&node, &settings, &mut out).await;
        let _ = printer.await;
        result
    }
}

async fn finish(node: &ChatNode, settings: &Settings, out: &mut Out) {
    if let Err(e) = node.shutdown().await {
        out.say(&render::error(&e, &settings.discovery));
    }
}

/// Messages whose retries the screen was told about already: one line per message, not
/// one per retry. Bounded; forgetting only means a second line.
const RETRIES_REMEMBERED: usize = 4096;

async fn print_events(mut events: p2pchat_core::Events, mut out: Out) {
    let mut retried = std::collections::HashSet::new();
    while let Some(event) = events.next().await {
        match &event {
            Event::Queued {
                id, retry: Some(_), ..
            } => {
                if retried.len() >= RETRIES_REMEMBERED {
                    retried.clear();
                }
                if !retried.insert(*id) {
                    continue;
                }
            }
            Event::Delivered { id, .. }
            | Event::StoredOffline { id, .. }
            | Event::SendFailed { id, .. }
            | Event::Expired { id, .. } => {
                retried.remove(id);
            }
            _ => {}
        }
        if let Some(line) = render::event(&event) {
            out.say(&line);
        }
    }
}

async fn terminal_loop(
    node: &ChatNode,
    settings: &Settings,
    editor: &mut Readline,
    out: &mut Out,
) -> anyhow::Result<()> {
    let mut terminate = terminate_signal();
    loop {
        let event = tokio::select! {
            event = editor.readline() => event,
            _ = &mut terminate => return Ok(()),
        };
        match event {
            Ok(ReadlineEvent::Line(line)) => {
                let line = line.trim().to_owned();
                if !line.is_empty() {
                    editor.add_history_entry(line.clone());
                }
                if !handle(node, settings, &line, out).await {
                    return Ok(());
                }
            }
            Ok(ReadlineEvent::Eof | ReadlineEvent::Interrupted) => return Ok(()),
            Err(e) => return Err(e).context("The terminal failed"),
        }
    }
}

async fn plain_loop(node: &ChatNode, settings: &Settings, out: &mut Out) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut terminate = terminate_signal();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line.context("Cannot read the input")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = &mut terminate => return Ok(()),
        };
        let Some(line) = line else { return Ok(()) };
        if !handle(node, settings, &line, out).await {
            return Ok(());
        }
    }
}

/// Completes on SIGTERM (never elsewhere).
fn terminate_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut sigterm) = signal(SignalKind::terminate()) {
            return Box::pin(async move {
                sigterm.recv().await;
            });
        }
    }
    Box::pin(std::future::pending())
}

/// `blocked`: shows, exports or imports the block list.
async fn block_list(
    node: &ChatNode,
    list: commands::BlockList,
) -> Result<Option<String>, p2pchat_core::node::NodeError> {
    use commands::BlockList;
    Ok(Some(match list {
        BlockList::Show => {
            let blocked = node.blocked();
            if blocked.is_empty() {
                "Nobody is blocked.".to_owned()
            } else {
                format!("Blocked: {}", blocked.join(", "))
            }
        }
        BlockList::Export(file) => match std::fs::write(&file, node.export_blocked()) {
            Ok(()) => format!("Wrote {} blocked users to {file}.", node.blocked().len()),
            Err(e) => format!("Cannot write {file}: {e}."),
        },
        BlockList::Import(file) => match std::fs::read_to_string(&file) {
            Ok(text) => {
                let added = node.import_blocked(&text).await?;
                format!("Blocked {added} more users from {file}.")
            }
            Err(e) => format!("Cannot read {file}: {e}."),
        },
    }))
}

/// Runs one typed line. `false` means quit.
async fn handle(node: &ChatNode, settings: &Settings, line: &str, out: &mut Out) -> bool {
    let command = match commands::parse(line) {
        Ok(command) => command,
        Err(sentence) => {
            out.say(&sentence);
            return true;
        }
    };
    let said = match command {
        Command::Nothing => return true,
        Command::Quit => return false,
        Command::Help => Ok(Some(HELP.to_owned())),
        Command::Send { to, text } => node.send(&to, &text).await.map(|_| None),
        Command::List => node.peers().await.map(|peers| {
            let names: Vec<String> = peers
                .into_iter()
                .map(|p| p.username)
                .filter(|name| name != node.username())
                .collect();
            Some(if names.is_empty() {
                "No other users are online.".to_owned()
            } else {
                format!("Online users: {}", names.join(", "))
            })
        }),
        Command::Block(user) => node
            .block(&user)
            .await
            .map(|()| Some(format!("Blocked {user}: nothing from them will be shown."))),
        Command::Unblock(user) => node
            .unblock(&user)
            .await
            .map(|()| Some(format!("Unblocked {user}."))),
        Command::Mute(user, duration) => node
            .mute(&user, duration)
            .await
            .map(|()| Some(format!("Muted {user} for {} seconds.", duration.as_secs()))),
        Command::Unmute(user) => node
            .unmute(&user)
            .await
            .map(|()| Some(format!("Unmuted {user}."))),
        Command::Fingerprint(None) => Ok(Some(format!(
            "Your safety code: {}",
            node.public_key().fingerprint()
        ))),
        Command::Fingerprint(Some(user)) => node
            .fingerprint(&user)
            .await
            .map(|fp| Some(format!("{user}'s safety code: {fp}"))),
        Command::Trust(user) => node.trust(&user).await.map(|()| {
            Some(format!(
                "Trusted {user}'s new key; messages held for {user} are being sent."
            ))
        }),
        Command::Requests => {
            let requests = node.requests();
            Ok(Some(if requests.is_empty() {
                "No message requests.".to_owned()
            } else {
                let lines: Vec<String> = requests
                    .iter()
                    .map(|r| {
                        let s = if r.messages == 1 { "" } else { "s" };
                        format!("  {} ({} message{s})", r.from, r.messages)
                    })
                    .collect();
                format!(
                    "Message requests ('accept <user>' to read, 'block <user>' to refuse):\n{}",
                    lines.join("\n")
                )
            }))
        }
        Command::Accept(user) => node.accept(&user).await.map(|()| {
            Some(format!(
                "Accepted {user}: their messages are shown from now on."
            ))
        }),
        Command::Blocked(list) => block_list(node, list).await,
    };
    match said {
        Ok(Some(text)) => out.say(&text),
        Ok(None) => {}
        Err(e) => out.say(&render::error(&e, &settings.discovery)),
    }
    true
}
