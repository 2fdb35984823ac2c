//! The client: starts a node, then runs the command loop over a line editor (in a
//! terminal), plain lines, or JSON lines (`--json`), printing the node's events as they
//! come.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use futures::StreamExt;
use p2pchat_core::error::chain;
use p2pchat_core::store::RedisStore;
use p2pchat_core::{ChatNode, DiscoveryClient, Event, Identity, MessageId};
use rustyline::ExternalPrinter;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, mpsc};

use crate::commands::{self, Command, HELP};
use crate::editor::{self, Input, Names};
use crate::render::{self, Look};

/// The identity key's file name in the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// The input history's file name in the data directory.
pub const INPUT_HISTORY_FILE: &str = "input-history.txt";

/// How the client talks to whoever runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A person at a terminal: line editor, colours, completion.
    Terminal,
    /// Lines in, lines out (pipes, scripts).
    Plain,
    /// Commands as lines in, one JSON object per line out (`--json`).
    Json,
}

/// Everything the client needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The username.
    pub user: String,
    /// The port to accept peers on (0: any free port).
    pub port: u16,
    /// The discovery server, `host:port`.
    pub discovery: String,
    /// Identity key, pinned keys, block and mute lists, history.
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
    /// How long conversation history is kept (zero: none).
    pub history: Duration,
    /// How to talk to the user.
    pub mode: Mode,
    /// Colours (a terminal, and `NO_COLOR` unset).
    pub color: bool,
}

/// Where lines go: above the line editor's prompt, to stdout, or as JSON.
#[derive(Clone)]
struct Out {
    mode: Mode,
    /// In a terminal: lines for the printer thread ([`printer_thread`]).
    printer: Option<std::sync::mpsc::Sender<String>>,
}

/// Prints lines above the editor's prompt, keeping what is being typed. rustyline's printer
/// may wait (until the editor reads again), so it has a thread of its own: nothing else
/// ever waits on it, with or without a lock held. Ends when every sender is gone, saying so
/// on `done`.
fn printer_thread(
    mut printer: Box<dyn ExternalPrinter + Send>,
    lines: std::sync::mpsc::Receiver<String>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    while let Ok(line) = lines.recv() {
        let _ = printer.print(format!("{line}\n"));
    }
    let _ = done.send(());
}

impl Out {
    fn write(&self, text: &str) {
        if let Some(printer) = &self.printer {
            let _ = printer.send(text.to_owned());
            return;
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }

    /// A line for the user (a command's answer): as it is, or `{"reply": …}`.
    fn say(&self, text: &str) {
        match self.mode {
            Mode::Json => self.write(&serde_json::json!({ "reply": text }).to_string()),
            _ => self.write(text),
        }
    }

    /// A mistake or failure: as it is, or `{"error": …}`.
    fn fail(&self, text: &str) {
        match self.mode {
            Mode::Json => self.write(&serde_json::json!({ "error": text }).to_string()),
            _ => self.write(text),
        }
    }
}

/// What the command loop and the event printer share.
struct Session {
    node: ChatNode,
    settings: Settings,
    look: Look,
    out: Out,
    /// Names offered for completion.
    names: Names,
    /// Who wrote last (`reply`).
    last_sender: Mutex<Option<String>>,
    /// The conversation partner (`query`).
    query: Mutex<Option<String>>,
    /// Whether the directory connection is up.
    connected: AtomicBool,
    /// Our messages in flight: their first words, to name them in notices.
    sending: Mutex<Sending>,
    /// Held across `send` and the echo of the message: the event printer takes it before
    /// an outcome, so a quick "delivered" never comes before the message's own line.
    send_gate: tokio::sync::Mutex<()>,
    /// Set when the directory ended the session: the client stops.
    ended: Notify,
}

/// Our messages' first words by id, the oldest forgotten beyond a bound (forgetting only
/// makes a notice less specific).
#[derive(Default)]
struct Sending {
    snippets: HashMap<MessageId, String>,
    order: VecDeque<MessageId>,
    /// Messages whose retries were reported already: one line per message, not per retry.
    retried: HashSet<MessageId>,
}

/// Messages remembered in [`Sending`].
const SENDING_REMEMBERED: usize = 4096;

impl Sending {
    fn add(&mut self, id: MessageId, text: &str) {
        if self.order.len() >= SENDING_REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.snippets.remove(&old);
            self.retried.remove(&old);
        }
        self.order.push_back(id);
        self.snippets.insert(id, render::snippet(text));
    }
}

impl Session {
    fn remember(&self, name: &str) {
        if name != self.node.username()
            && let Ok(mut names) = self.names.lock()
        {
            names.insert(name.to_owned());
        }
    }

    fn prompt(&self) -> String {
        let me = self.node.username();
        let away = if self.connected.load(Ordering::Relaxed) {
            ""
        } else {
            " (server lost)"
        };
        match self.query.lock().ok().and_then(|q| q.clone()) {
            Some(peer) => format!("{me}{away} -> {peer}> "),
            None => format!("{me}{away}> "),
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
        .history(settings.history)
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

/// Runs the client until `quit`, end of input, Ctrl-C or SIGTERM, or until the directory
/// ends the session (then it fails); then shuts the node down (deregistering, storing
/// whatever is in flight) and flushes the screen.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let node = start(&settings).await?;
    let events = node.events();
    let waiting = node.outbox().await.len();
    let mut names = std::collections::BTreeSet::new();
    names.extend(node.contacts());
    names.extend(node.history_peers());
    names.extend(node.blocked());
    let names: Names = Arc::new(Mutex::new(names));
    let look = Look {
        color: settings.color,
        me: settings.user.clone(),
    };
    // In a terminal: the editor, and the terminal's settings to put back at the end.
    let mut saved = None;
    let mut printed = None;
    let (out, mut terminal) = if settings.mode == Mode::Terminal {
        saved = Some(editor::SavedTerminal::save());
        let prompt = format!("{}> ", settings.user);
        let terminal = editor::start(
            names.clone(),
            settings.data_dir.join(INPUT_HISTORY_FILE),
            prompt,
        )
        .context("Cannot use the terminal")?;
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let printer = terminal.printer;
        std::thread::Builder::new()
            .name("p2pchat-printer".into())
            .spawn(move || printer_thread(printer, lines_rx, done_tx))
            .context("Cannot use the terminal")?;
        printed = Some(done_rx);
        let out = Out {
            mode: Mode::Terminal,
            printer: Some(lines_tx),
        };
        (out, Some((terminal.lines, terminal.prompts)))
    } else {
        let out = Out {
            mode: settings.mode,
            printer: None,
        };
        (out, None)
    };
    let session = Arc::new(Session {
        node,
        settings,
        look,
        out,
        names,
        last_sender: Mutex::new(None),
        query: Mutex::new(None),
        connected: AtomicBool::new(true),
        sending: Mutex::default(),
        send_gate: tokio::sync::Mutex::new(()),
        ended: Notify::new(),
    });
    if session.settings.mode == Mode::Json {
        session.out.write(
            &serde_json::json!({"event": "started", "user": session.node.username(),
                "queued": waiting})
            .to_string(),
        );
    } else {
        session.out.say("Client started. Type 'help' for commands.");
        if waiting > 0 {
            session.out.say(&format!(
                "({waiting} message(s) from last time are still queued and will be sent.)"
            ));
        }
    }
    let printer = tokio::spawn(print_events(events, session.clone()));
    let result = match &mut terminal {
        Some((lines, prompts)) => terminal_loop(&session, lines, prompts).await,
        None => plain_loop(&session).await,
    };
    if let Err(e) = session.node.shutdown().await {
        session
            .out
            .fail(&render::error(&e, &session.settings.discovery));
    }
    let _ = printer.await;
    drop(terminal);
    // The last lines reach the screen (bounded: the printer may wait for an editor that
    // has stopped reading).
    drop(session);
    if let Some(done) = printed {
        let _ = tokio::time::timeout(Duration::from_millis(500), done).await;
    }
    drop(saved);
    result
}

async fn print_events(mut events: p2pchat_core::Events, session: Arc<Session>) {
    while let Some(event) = events.next().await {
        let mut snippet = None;
        match &event {
            Event::MessageReceived { from, .. } => {
                session.remember(from);
                if let Ok(mut last) = session.last_sender.lock() {
                    *last = Some(from.clone());
                }
            }
            Event::MessageRequest { from } => session.remember(from),
            Event::PeerOnline { username } | Event::PeerOffline { username } => {
                session.remember(username)
            }
            Event::DirectoryLost { .. } => session.connected.store(false, Ordering::Relaxed),
            Event::DirectoryBack => session.connected.store(true, Ordering::Relaxed),
            Event::Queued {
                id, retry: Some(_), ..
            } => {
                let mut sending = session.sending.lock().unwrap_or_else(|e| e.into_inner());
                if !sending.retried.insert(*id) && session.settings.mode != Mode::Json {
                    continue;
                }
                snippet = sending.snippets.get(id).cloned();
            }
            Event::Delivered { id, .. }
            | Event::StoredOffline { id, .. }
            | Event::SendFailed { id, .. }
            | Event::Expired { id, .. }
            | Event::Cancelled { id, .. } => {
                // A send whose echo is still to come finishes first.
                drop(session.send_gate.lock().await);
                let mut sending = session.sending.lock().unwrap_or_else(|e| e.into_inner());
                sending.retried.remove(id);
                snippet = sending.snippets.get(id).cloned();
            }
            _ => {}
        }
        if session.settings.mode == Mode::Json {
            session.out.write(&render::json(&event).to_string());
        } else if let Some(line) = render::event(&session.look, &event, snippet.as_deref()) {
            session.out.write(&line);
        }
        if matches!(event, Event::DirectoryEnded { .. }) {
            session.ended.notify_one();
        }
    }
}

/// What ended the session from the directory's side, as the error the client exits with.
fn ended() -> anyhow::Error {
    anyhow::anyhow!(
        "The discovery server ended this session (this user signed in elsewhere with the same key, \
         or the server no longer accepts it)."
    )
}

async fn terminal_loop(
    session: &Session,
    lines: &mut mpsc::Receiver<Input>,
    prompts: &std::sync::mpsc::Sender<String>,
) -> anyhow::Result<()> {
    let mut terminate = terminate_signal();
    // Between lines the editor is not in raw mode: Ctrl-C is a signal then, and stops the
    // client as it does in the editor (cleanly), not the process.
    let mut interrupt = interrupt_signal();
    loop {
        let input = tokio::select! {
            input = lines.recv() => input,
            _ = &mut terminate => return Ok(()),
            _ = &mut interrupt => return Ok(()),
            _ = session.ended.notified() => return Err(ended()),
        };
        match input {
            Some(Input::Line(line)) => {
                let keep_going = tokio::select! {
                    keep_going = handle(session, &line) => keep_going,
                    _ = &mut terminate => return Ok(()),
                    _ = &mut interrupt => return Ok(()),
                    _ = session.ended.notified() => return Err(ended()),
                };
                if !keep_going {
                    return Ok(());
                }
                let _ = prompts.send(session.prompt());
            }
            Some(Input::End) => return Ok(()),
            None => anyhow::bail!("The line editor stopped unexpectedly."),
        }
    }
}

async fn plain_loop(session: &Session) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut terminate = terminate_signal();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line.context("Cannot read the input")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = &mut terminate => return Ok(()),
            _ = session.ended.notified() => return Err(ended()),
        };
        let Some(line) = line else { return Ok(()) };
        let keep_going = tokio::select! {
            keep_going = handle(session, &line) => keep_going,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = &mut terminate => return Ok(()),
            _ = session.ended.notified() => return Err(ended()),
        };
        if !keep_going {
            return Ok(());
        }
    }
}

/// Completes on SIGINT (Ctrl-C), registered at once (never elsewhere).
fn interrupt_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut sigint) = signal(SignalKind::interrupt()) {
            return Box::pin(async move {
                sigint.recv().await;
            });
        }
    }
    Box::pin(std::future::pending())
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

/// How a duration reads: "45 seconds", "20 minutes", "3 h 20 min", "2 d 4 h".
fn left(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    let pair = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big} {big_unit}")
        } else {
            format!("{big} {big_unit} {small} {small_unit}")
        }
    };
    match secs {
        0..60 => plural(secs, "second"),
        60..3_600 => plural(secs.div_ceil(60), "minute"),
        3_600..86_400 => pair(secs / 3_600, "h", (secs % 3_600) / 60, "min"),
        _ => pair(secs / 86_400, "d", (secs % 86_400) / 3_600, "h"),
    }
}

/// Sends `text` to `to` and echoes it with the time.
async fn send(
    session: &Session,
    to: &str,
    text: &str,
) -> Result<Option<String>, p2pchat_core::NodeError> {
    let _gate = session.send_gate.lock().await;
    let id = session.node.send(to, text).await?;
    session.remember(to);
    session
        .sending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(id, text);
    // Written while the gate is held: before any outcome of this message.
    if session.settings.mode == Mode::Json {
        session
            .out
            .write(&serde_json::json!({"sent": id.to_string(), "to": to}).to_string());
    } else {
        session
            .out
            .say(&session.look.sent(to, text, SystemTime::now()));
    }
    Ok(None)
}

/// Runs one typed line. `false` means quit.
async fn handle(session: &Session, line: &str) -> bool {
    let node = &session.node;
    let out = &session.out;
    let query = session.query.lock().ok().and_then(|q| q.clone());
    // In a conversation, lines not starting with '/' are messages.
    let parsed = match &query {
        Some(peer) if !line.trim_start().starts_with('/') && !line.trim().is_empty() => {
            Ok(Command::Send {
                to: peer.clone(),
                text: line.trim().to_owned(),
            })
        }
        _ => commands::parse(line),
    };
    let command = match parsed {
        Ok(command) => command,
        Err(sentence) => {
            out.fail(&sentence);
            return true;
        }
    };
    // Commands naming a user who does not exist get a sentence, not silence. When the
    // directory cannot tell (unreachable), a block or mute still goes through.
    if let Command::Block(user) | Command::Mute(user, _) = &command {
        match node.user_exists(user).await {
            Ok(false) => {
                out.fail(&format!("There is no user named '{user}'."));
                return true;
            }
            Err(p2pchat_core::NodeError::InvalidUsername(e)) => {
                out.fail(&format!("That is not a valid username: {e}."));
                return true;
            }
            Ok(true) | Err(_) => {}
        }
    }
    let said = match command {
        Command::Nothing => return true,
        Command::Quit => return false,
        Command::Help => Ok(Some(HELP.to_owned())),
        Command::Send { to, text } => send(session, &to, &text).await,
        Command::Reply(text) => {
            let last = session.last_sender.lock().ok().and_then(|l| l.clone());
            match last {
                Some(to) => send(session, &to, &text).await,
                None => Ok(Some(
                    "Nobody has written to you yet: there is no one to reply to.".into(),
                )),
            }
        }
        Command::Query(Some(peer)) => {
            if peer == node.username() {
                Ok(Some("You cannot talk to yourself.".into()))
            } else {
                match node.user_exists(&peer).await {
                    Ok(true) => {
                        session.remember(&peer);
                        if let Ok(mut q) = session.query.lock() {
                            *q = Some(peer.clone());
                        }
                        Ok(Some(format!(
                            "Talking to {peer}: plain lines go to {peer}; commands start with '/' ('/query' alone ends it)."
                        )))
                    }
                    Ok(false) => Ok(Some(format!("There is no user named '{peer}'."))),
                    Err(e) => Err(e),
                }
            }
        }
        Command::Query(None) => {
            let was = session.query.lock().ok().and_then(|mut q| q.take());
            Ok(Some(match was {
                Some(peer) => format!("No longer talking to {peer}."),
                None => "You are not talking to anyone ('query <user>' starts it).".into(),
            }))
        }
        Command::List => node.peers().await.map(|peers| {
            let names: Vec<String> = peers
                .into_iter()
                .map(|p| p.username)
                .filter(|name| name != node.username())
                .collect();
            for name in &names {
                session.remember(name);
            }
            Some(if names.is_empty() {
                "No other users are online.".to_owned()
            } else {
                format!("Online users: {}", names.join(", "))
            })
        }),
        Command::Block(user) => node.block(&user).await.map(|()| {
            session.remember(&user);
            Some(format!("Blocked {user}: nothing from them will be shown."))
        }),
        Command::Unblock(user) => {
            if node.blocked().contains(&user) {
                node.unblock(&user)
                    .await
                    .map(|()| Some(format!("Unblocked {user}.")))
            } else {
                Ok(Some(format!("{user} is not blocked.")))
            }
        }
        Command::Mute(user, duration) => node
            .mute(&user, duration)
            .await
            .map(|()| Some(format!("Muted {user} for {}.", left(duration)))),
        Command::Unmute(user) => {
            if node.is_muted(&user) {
                node.unmute(&user)
                    .await
                    .map(|()| Some(format!("Unmuted {user}.")))
            } else {
                Ok(Some(format!("{user} is not muted.")))
            }
        }
        Command::Muted => {
            let muted = node.muted();
            Ok(Some(if muted.is_empty() {
                "Nobody is muted.".to_owned()
            } else {
                let list: Vec<String> = muted
                    .iter()
                    .map(|(user, rest)| format!("{user} ({} left)", left(*rest)))
                    .collect();
                format!("Muted: {}", list.join(", "))
            }))
        }
        Command::Fingerprint(None) => Ok(Some(format!(
            "Your safety code: {}",
            node.public_key().fingerprint()
        ))),
        Command::Fingerprint(Some(user)) => node.safety_codes(&user).await.map(|codes| {
            Some(match codes.pinned {
                Some(pinned) if codes.changed() => format!(
                    "{user}'s safety code is now {} (a new key, not trusted yet). The key you \
                     trusted had {pinned}. Compare the new code with {user} out of band, then \
                     'trust {user}'.",
                    codes.current
                ),
                _ => format!("{user}'s safety code: {}", codes.current),
            })
        }),
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
        Command::History(user, n) => Ok(Some(if session.settings.history.is_zero() {
            "No history is kept (--history-days 0).".to_owned()
        } else {
            let entries = node.history(&user, n);
            if entries.is_empty() {
                format!("No history with {user}.")
            } else {
                let lines: Vec<String> = entries
                    .iter()
                    .map(|e| {
                        let (from, to) = if e.outgoing {
                            (node.username(), Some(e.peer.as_str()))
                        } else {
                            (e.peer.as_str(), None)
                        };
                        let who = match to {
                            Some(to) => {
                                format!("{} -> {}", session.look.name(from), session.look.name(to))
                            }
                            None => session.look.name(from),
                        };
                        format!(
                            "{} [{who}] {}",
                            render::clock(e.sent_at),
                            session.look.text(&e.text)
                        )
                    })
                    .collect();
                lines.join("\n")
            }
        })),
        Command::Status => {
            let online = node.peers().await.map(|peers| {
                peers
                    .into_iter()
                    .map(|p| p.username)
                    .filter(|n| n != node.username())
                    .collect::<Vec<_>>()
            });
            let server = if session.connected.load(Ordering::Relaxed) {
                format!("connected to {}", session.settings.discovery)
            } else {
                format!("reconnecting to {}", session.settings.discovery)
            };
            let reach = match node.dialable() {
                Some(true) => "peers can dial you directly",
                Some(false) => "peers reach you through the server (connect-back or relay)",
                None => "reachability not known yet",
            };
            let online = match online {
                Ok(names) if names.is_empty() => "nobody else is online".to_owned(),
                Ok(names) => format!("online: {}", names.join(", ")),
                Err(_) => "who is online is not known now".to_owned(),
            };
            let talking = session
                .query
                .lock()
                .ok()
                .and_then(|q| q.clone())
                .map(|p| format!("; talking to {p}"))
                .unwrap_or_default();
            Ok(Some(format!(
                "{} — {server}; {reach}; {online}{talking}.",
                node.username()
            )))
        }
    };
    match said {
        Ok(Some(text)) => out.say(&text),
        Ok(None) => {}
        Err(e) => out.fail(&render::error(&e, &session.settings.discovery)),
    }
    true
}
