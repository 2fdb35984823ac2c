//! An echo bot: a node that runs until it is stopped, answers every message it is shown
//! with the same text (`echo: <text>`), and handles every [`Event`] a node reports.
//!
//! ```text
//! cargo run -p p2pchat-discovery -- --listen 127.0.0.1:5001 --data-dir /tmp/p2pchat-server
//! cargo run -p p2pchat-examples --example echo_bot -- --server 127.0.0.1:5001
//! ```
//!
//! then talk to it from a client, e.g. `cargo run -p p2pchat-cli -- --user alice --port 0`
//! and `send echo hello`, which prints `[echo] echo: hello`.
//!
//! It stops at Ctrl-C (or SIGTERM), or once it has answered `--max-messages N` messages;
//! either way it shuts the node down gracefully (replies still in flight are delivered or
//! left in the recipient's mailbox) and reads the event stream to its end before exiting.
//! Other flags: `--name NAME` (default `echo`) and `--data-dir DIR` (default:
//! `p2pchat-example-echo-bot-<name>` in the system's temporary directory), where the bot
//! keeps its identity key (`identity.key`; the name is bound to it on the server) and its
//! node database.
//!
//! The bot confirms each message only once its reply is durable in the outbox
//! ([`Confirm::Explicit`]), so a bot killed between reading a message and answering it is
//! shown the message again when it restarts: nothing goes unanswered.
//!
//! The handler is one `match` with an arm per variant. [`Event`] is `#[non_exhaustive]`,
//! so the compiler also requires a `_` arm for variants added in later versions of the
//! library: this bot logs them and carries on (on nightly, the
//! `non_exhaustive_omitted_patterns` lint can point at them).

use std::future::Future;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::discovery::DEFAULT_DISCOVERY_ADDR;
use p2pchat_core::{ChatNode, Confirm, DiscoveryClient, Event, Identity, NodeError};

/// The identity key's file name in the data directory (the `p2pchat` client's too).
const IDENTITY_FILE: &str = "identity.key";

/// A bot answering every message with its own text.
#[derive(Debug, Parser)]
struct Args {
    /// The discovery server, `host:port`.
    #[arg(long, default_value = DEFAULT_DISCOVERY_ADDR)]
    server: String,
    /// The bot's username.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Where the bot keeps its identity key and node database.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stop after answering this many messages (default: run until Ctrl-C or SIGTERM).
    #[arg(long)]
    max_messages: Option<u64>,
}

/// Whether the bot goes on after an event.
enum Flow {
    Continue,
    /// Stop, for this reason.
    Stop(String),
}

/// The bot's state.
struct Bot {
    node: ChatNode,
    /// Messages answered so far.
    answered: u64,
    /// Stop after this many.
    max_messages: Option<u64>,
    /// `false` once stopping: messages still handed out are left for the next run.
    replying: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Installed now, before the bot says it is ready: a signal from then on stops it.
    let stop = stop_signal().context("installing the signal handlers")?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("p2pchat-example-echo-bot-{}", args.name))
    });
    let identity = Identity::load_or_generate(data_dir.join(IDENTITY_FILE))
        .with_context(|| format!("loading the identity key from {}", data_dir.display()))?;
    let node = ChatNode::builder()
        .username(&args.name)
        .identity(identity)
        .data_dir(&data_dir)
        .discovery(DiscoveryClient::new(args.server.clone()))
        .confirm(Confirm::Explicit)
        .spawn()
        .await
        .with_context(|| {
            format!(
                "starting the bot (is p2pchat-discovery running at {}?)",
                args.server
            )
        })?;
    // The first stream starts at spawn: it includes mail drained from the mailbox at start.
    let mut events = node.events();
    println!(
        "echo bot '{}' ready: registered with {}, listening on {}",
        args.name,
        args.server,
        node.local_addr()
    );

    let mut bot = Bot {
        node: node.clone(),
        answered: 0,
        max_messages: args.max_messages,
        replying: true,
    };
    tokio::pin!(stop);
    let reason = loop {
        tokio::select! {
            signal = &mut stop => break format!("{signal}: stopping"),
            event = events.next() => match event {
                Some(event) => {
                    if let Flow::Stop(reason) = bot.handle(event).await? {
                        break reason;
                    }
                }
                None => break "the node stopped".to_owned(),
            },
        }
    };
    println!("{reason}");

    bot.replying = false;
    node.shutdown().await.context("shutting the bot down")?;
    // The stream ends once the node has stopped; what it reports on the way out (the last
    // replies' outcomes) is still read.
    while let Some(event) = events.next().await {
        bot.handle(event).await?;
    }
    println!("stopped after answering {} messages", bot.answered);
    Ok(())
}

impl Bot {
    /// Handles one event: every variant has its arm.
    async fn handle(&mut self, event: Event) -> anyhow::Result<Flow> {
        match event {
            Event::MessageReceived {
                id,
                from,
                text,
                offline,
                ..
            } => {
                let tag = if offline { "[Offline]" } else { "" };
                println!("{tag}[{from}] {text}");
                if !self.replying {
                    // Not confirmed: shown again when the bot next starts.
                    println!("    (left for the next run)");
                    return Ok(Flow::Continue);
                }
                match self.node.send(&from, &format!("echo: {text}")).await {
                    Ok(reply) => println!("    answered {from}: reply {reply}"),
                    // Not confirmed: shown again when the bot next starts.
                    Err(NodeError::ShutDown) => {
                        return Ok(Flow::Stop("the node shut down".to_owned()));
                    }
                    // This message can never be answered (too long with the prefix, a
                    // blocked sender): say so and move on.
                    Err(e) => eprintln!("    cannot answer {from}: {e}"),
                }
                // The reply is durable in the outbox: only now is the message done with.
                self.node.confirm(&from, id)?;
                self.answered += 1;
                if self.max_messages.is_some_and(|max| self.answered >= max) {
                    return Ok(Flow::Stop(format!(
                        "answered {} messages (--max-messages): stopping",
                        self.answered
                    )));
                }
            }
            // Our replies' progress: queued, sent, then one outcome each.
            Event::Queued { id, to, retry } => {
                if let Some(why) = retry {
                    println!("    (reply {id} to {to} will be retried: {why})");
                }
            }
            // Written to the connection; `Delivered` follows once it is acknowledged.
            Event::Sent { .. } => {}
            Event::Delivered { id, to } => println!("    (reply {id} delivered to {to})"),
            Event::StoredOffline { id, to } => {
                println!("    ({to} went away: reply {id} waits in their mailbox)");
            }
            Event::Expired { id, to } => {
                println!("    ({to} never came back for reply {id}: it expired)");
            }
            Event::Cancelled { id, to } => println!("    (reply {id} to {to} was cancelled)"),
            Event::SendFailed { id, to, reason } => {
                eprintln!("    reply {id} to {to} failed: {reason}");
            }
            // Only in contacts-only mode, which this bot leaves off: it talks to anyone.
            Event::MessageRequest { from } => {
                println!("({from} asks to write: accepting)");
                if let Err(e) = self.node.accept(&from).await {
                    eprintln!("    cannot accept {from} yet: {e}");
                }
            }
            // Presence of the people the bot has answered (it watches them from then on).
            Event::PeerOnline { username } => println!("({username} is online)"),
            Event::PeerOffline { username } => println!("({username} is offline)"),
            // Someone now holds the name with another key; their messages wait until it is
            // trusted. An echo bot keeps no secrets, so it trusts the new key at once; a bot
            // that does should ask its operator to compare safety codes first.
            Event::KeyChanged { username, old, new } => {
                println!("({username}'s key changed, {old} -> {new}: trusting the new one)");
                if let Err(e) = self.node.trust(&username).await {
                    eprintln!("    cannot trust {username}'s new key yet: {e}");
                }
            }
            Event::Announcement { text } => println!("[Special Message] {text}"),
            Event::Error { message } => eprintln!("error: {message}"),
            // The directory connection: the node reconnects by itself; peers already
            // connected keep talking meanwhile.
            Event::DirectoryLost { reason } => {
                println!("(lost the discovery server: {reason}; reconnecting)");
            }
            Event::DirectoryBack => println!("(registered with the discovery server again)"),
            // For good: the bot is no longer listed and will not reconnect.
            Event::DirectoryEnded { reason } => {
                return Ok(Flow::Stop(format!(
                    "the discovery server ended the session: {reason}"
                )));
            }
            Event::Reachability { direct } => {
                if direct {
                    println!("(peers can dial the bot directly)");
                } else {
                    println!("(peers cannot dial the bot: they reach it through the server)");
                }
            }
            // Only other events are ever lost to a slow reader, never messages.
            Event::Lagged { missed } => println!("(fell behind: {missed} events missed)"),
            // `Event` is #[non_exhaustive]: a later version of the library may add variants,
            // and this arm takes them until the bot learns them.
            other => println!("(an event this bot does not know: {other:?})"),
        }
        Ok(Flow::Continue)
    }
}

/// Resolves at Ctrl-C (SIGINT) or SIGTERM, with the signal's name. The handlers are
/// installed by this call, not when the future is first polled.
fn stop_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => "Ctrl-C",
                _ = terminate.recv() => "SIGTERM",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}
