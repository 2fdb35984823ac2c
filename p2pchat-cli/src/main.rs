//! `p2pchat`: the interactive chat client. A thin program over `p2pchat_core::ChatNode`:
//! flags, prompts for what is missing, then the command loop in `app`.

mod app;
mod commands;
mod editor;
mod render;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use p2pchat_core::discovery::DEFAULT_DISCOVERY_ADDR;
use p2pchat_core::protocol::validate_username;
use p2pchat_core::store::DEFAULT_ANNOUNCEMENT_CHANNEL;
use tracing_subscriber::EnvFilter;

/// Peer-to-peer chat, end-to-end encrypted. Type 'help' once started.
#[derive(Debug, Parser)]
#[command(name = "p2pchat", version)]
struct Args {
    /// Your username (asked for when missing in a terminal).
    #[arg(long)]
    user: Option<String>,
    /// The port to accept peers on, 0 for any free port (asked for when missing in a
    /// terminal).
    #[arg(long)]
    port: Option<u16>,
    /// The discovery server.
    #[arg(long, default_value = DEFAULT_DISCOVERY_ADDR)]
    discovery: String,
    /// Where your identity key, pinned keys and block and mute lists live
    /// [default: the platform's data directory, per user, e.g. ~/.local/share/p2pchat/USER].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep offline messages in Redis and hear announcements there, as the original did
    /// (instead of the discovery server's mailbox).
    #[arg(long, env = "P2PCHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// The Redis channel announcements arrive on.
    #[arg(long, default_value = DEFAULT_ANNOUNCEMENT_CHANNEL)]
    announcement_channel: String,
    /// Publish this address for peers to dial instead of the one the server sees (a port
    /// forward, say); may be given several times.
    #[arg(long, value_name = "IP:PORT")]
    announce: Vec<std::net::SocketAddr>,
    /// Nobody can dial you (behind a NAT without a port forward): the server publishes no
    /// address and peers reach you by connect-back or through its relay. Without it, the
    /// server checks whether it can dial you and says so.
    #[arg(long)]
    not_dialable: bool,
    /// Show messages only from people you wrote to or accepted: anyone else's wait as
    /// requests ('requests', 'accept <user>', 'block <user>').
    #[arg(long)]
    contacts_only: bool,
    /// Messages per second one sender may show you, after a burst of 10,000; faster
    /// senders are read more slowly, nothing is lost (0: no limit).
    #[arg(long, default_value_t = p2pchat_core::node::MESSAGES_PER_SECOND_PER_SENDER)]
    sender_rate: u32,
    /// Days of conversation history to keep in the data directory ('history <user>'); 0
    /// keeps none and deletes what was kept.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=3650))]
    history_days: u32,
    /// For scripts and bots: read commands as lines, print one JSON object per event and per
    /// answer (no prompts, no colours).
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let terminal = std::io::stdin().is_terminal() && !args.json;
    let settings = match settings(args, terminal) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(app::run(settings));
    // Not waiting for a read of stdin still blocked on its thread (plain and --json modes
    // stopped by SIGTERM or by the directory): it would hold the process until a line came.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fills in the settings, asking in a terminal for what the flags left out.
fn settings(args: Args, terminal: bool) -> Result<app::Settings, String> {
    let user = match args.user {
        Some(user) => user,
        None if terminal => ask("Enter your username: ", |s| {
            validate_username(s)
                .map(|()| s.to_owned())
                .map_err(|e| format!("That is not a valid username: {e}."))
        })?,
        None => return Err("Give a username with --user NAME.".into()),
    };
    validate_username(&user).map_err(|e| format!("'{user}' is not a valid username: {e}."))?;
    let port = match args.port {
        Some(port) => port,
        None if terminal => ask("Enter port to listen on: ", |s| {
            s.parse::<u16>()
                .map_err(|_| format!("'{s}' is not a port number (0 to 65535)."))
        })?,
        None => return Err("Give a port with --port PORT (0 picks a free one).".into()),
    };
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => dirs::data_dir()
            .map(|d| d.join("p2pchat"))
            .unwrap_or_else(|| PathBuf::from("p2pchat-data"))
            .join(&user),
    };
    Ok(app::Settings {
        user,
        port,
        discovery: args.discovery,
        data_dir,
        redis_url: args.redis_url,
        announcement_channel: args.announcement_channel,
        announce: args.announce,
        dialable: !args.not_dialable,
        contacts_only: args.contacts_only,
        sender_rate: args.sender_rate,
        history: std::time::Duration::from_secs(u64::from(args.history_days) * 86_400),
        mode: if args.json {
            app::Mode::Json
        } else if terminal {
            app::Mode::Terminal
        } else {
            app::Mode::Plain
        },
        // A terminal on both ends, and NO_COLOR (https://no-color.org) unset or empty.
        color: terminal
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    })
}

/// Asks until the answer is valid (or input ends).
fn ask<T>(prompt: &str, valid: impl Fn(&str) -> Result<T, String>) -> Result<T, String> {
    let stdin = std::io::stdin();
    loop {
        print!("{prompt}");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return Err("No answer; giving up.".into()),
            Ok(_) => {}
        }
        match valid(line.trim()) {
            Ok(value) => return Ok(value),
            Err(why) => println!("{why}"),
        }
    }
}
