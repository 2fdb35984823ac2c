//! p2pchat beside its ceiling, in one run, alternating: (a) a bare tokio TCP connection
//! carrying length-prefixed frames, each a Fernet token encrypted by the sender and decrypted
//! by the receiver (the `fernet` crate), acknowledged with one byte, pipelined; (b) two p2pchat
//! nodes over TCP on 127.0.0.1 sending acknowledged messages, pipelined. A third side, (a'),
//! is (a) with p2pchat's own sealing (`PairKey::seal` and `open` of a full message payload)
//! in place of the `fernet` crate: against it, (b) shows what the node adds beyond the crypto.
//!
//! ```text
//! cargo run --release -p p2pchat-benches --bin compare
//! ```
//!
//! The nodes keep their database in a temporary data directory with the default durability
//! (`--db memory`, `--durability power-loss` for the other settings), and bob's application
//! reads its messages as they arrive (they wait in his inbox until read).
//!
//! For 64 B and 1 KiB bodies it prints messages per second (median of the rounds) and the
//! send-to-ack round trip (p50 and p99 over every sample, one message at a time) for each
//! side, `ratio <size>: <b/a>` for throughput, and the same ratios against (a'). The machine
//! is shared and noisy, so the sides run alternately, round by round, in one process.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::crypto::{PairKey, Payload};
use p2pchat_core::{
    ChatNode, Durability, Event, Events, Identity, MemoryDiscovery, MemoryStore, MessageId,
    TcpTransport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

/// Compares p2pchat with the raw TCP + Fernet ceiling.
#[derive(Debug, Parser)]
struct Args {
    /// Alternating rounds per size.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Messages per throughput run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Round trips sampled per round.
    #[arg(long, default_value_t = 500)]
    round_trips: usize,
    /// Body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 1024])]
    sizes: Vec<usize>,
    /// Run one side only (for profiling it). No ratio is printed.
    #[arg(long)]
    only: Option<Side>,
    /// Where the nodes keep their database: in a temporary data directory on disk (the
    /// default, as an application with a data directory runs), or in memory.
    #[arg(long, value_enum, default_value_t = DbPlace::Disk)]
    db: DbPlace,
    /// How durable `send` is before it returns (and a message before it is acknowledged).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Process)]
    durability: DurabilityArg,
}

/// Where the node database lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DbPlace {
    /// A temporary data directory.
    Disk,
    /// No data directory: redb's in-memory backend.
    Memory,
}

/// [`Durability`], for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DurabilityArg {
    /// Kept across a kill of the process (the default).
    Process,
    /// Kept across a power loss (synced, grouped).
    PowerLoss,
}

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    /// (a) raw TCP + the `fernet` crate.
    Raw,
    /// (a′) raw TCP + p2pchat's sealing (`PairKey::seal` / `open` of a message payload).
    RawPairKey,
    /// (b) two p2pchat nodes.
    Nodes,
}

// ---------------------------------------------------------------------------------------
// (a) The ceiling: raw framed TCP with a Fernet token per frame.

/// How the raw sides make and check tokens.
#[derive(Clone)]
enum Sealer {
    /// The `fernet` crate, on the message body.
    FernetCrate(fernet::Fernet),
    /// p2pchat's pair keys, on a full message payload (alice to bob), as a node seals it.
    PairKey(Box<PairSides>),
}

/// Alice's and Bob's pair keys, and the payload Alice seals every time.
#[derive(Clone)]
struct PairSides {
    alice: PairKey,
    bob: PairKey,
    payload: Payload,
}

impl Sealer {
    fn new(side: Side, body: &str) -> anyhow::Result<Self> {
        Ok(match side {
            Side::RawPairKey => {
                let (a, b) = (Identity::generate(), Identity::generate());
                Self::PairKey(Box::new(PairSides {
                    alice: PairKey::derive(&a, &b.public_key())?,
                    bob: PairKey::derive(&b, &a.public_key())?,
                    payload: Payload {
                        id: MessageId::random(),
                        from: "alice".into(),
                        to: "bob".into(),
                        sent_at_ms: 1_700_000_000_000,
                        seq: 1_700_000_000_000_000,
                        body: body.to_owned(),
                    },
                }))
            }
            _ => Self::FernetCrate(
                fernet::Fernet::new(&fernet::Fernet::generate_key()).context("fernet key")?,
            ),
        })
    }

    fn seal(&self, body: &[u8]) -> String {
        match self {
            Self::FernetCrate(f) => f.encrypt(body),
            Self::PairKey(sides) => sides.alice.seal(&sides.payload),
        }
    }

    fn open(&self, token: &str) -> anyhow::Result<()> {
        match self {
            Self::FernetCrate(f) => f.decrypt(token).map(drop).context("decrypt"),
            Self::PairKey(sides) => sides
                .bob
                .open(token, "alice", "bob", Duration::from_secs(3600))
                .map(drop)
                .context("open"),
        }
    }
}

struct Raw {
    writer: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    acks: BufReader<tokio::net::tcp::OwnedReadHalf>,
    sealer: Sealer,
    _receiver: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn connect(sealer: Sealer) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let opener = sealer.clone();
        let receiver = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let _ = receive(stream, opener).await;
        });
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Self {
            writer: BufWriter::new(write),
            acks: BufReader::new(read),
            sealer,
            _receiver: receiver,
        })
    }

    fn frame(&self, body: &[u8], out: &mut Vec<u8>) {
        let token = self.sealer.seal(body);
        out.extend_from_slice(&(token.len() as u32).to_be_bytes());
        out.extend_from_slice(token.as_bytes());
    }

    /// `n` messages pipelined; returns the time until the last ack.
    async fn throughput(&mut self, body: &[u8], n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let Self {
            writer,
            acks,
            sealer,
            ..
        } = self;
        let send = async {
            let mut buf = Vec::new();
            for _ in 0..n {
                buf.clear();
                let token = sealer.seal(body);
                buf.extend_from_slice(&(token.len() as u32).to_be_bytes());
                buf.extend_from_slice(token.as_bytes());
                writer.write_all(&buf).await?;
            }
            writer.flush().await?;
            anyhow::Ok(())
        };
        let receive_acks = async {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            while got < n {
                let read = acks.read(&mut buf).await?;
                anyhow::ensure!(read > 0, "receiver closed");
                got += read;
            }
            anyhow::Ok(())
        };
        tokio::try_join!(send, receive_acks)?;
        Ok(started.elapsed())
    }

    /// One message at a time: send, wait for its ack.
    async fn round_trip(&mut self, body: &[u8]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut buf = Vec::new();
        self.frame(body, &mut buf);
        self.writer.write_all(&buf).await?;
        self.writer.flush().await?;
        let mut ack = [0u8; 1];
        self.acks.read_exact(&mut ack).await?;
        Ok(started.elapsed())
    }
}

/// Reads frames, opens each, and acknowledges each with one byte (flushed when the input
/// runs dry, so acks are batched under load as p2pchat's are).
async fn receive(stream: TcpStream, sealer: Sealer) -> anyhow::Result<()> {
    let (read, write) = stream.into_split();
    let mut reader = BufReader::with_capacity(256 * 1024, read);
    let mut writer = BufWriter::new(write);
    let mut token = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
        if reader.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        token.resize(u32::from_be_bytes(len) as usize, 0);
        reader.read_exact(&mut token).await?;
        sealer.open(std::str::from_utf8(&token)?)?;
        writer.write_all(&[1]).await?;
    }
}

// ---------------------------------------------------------------------------------------
// (b) p2pchat: two nodes over TCP.

struct Nodes {
    alice: ChatNode,
    bob: ChatNode,
    alice_events: Events,
    /// Reads bob's messages, as an application does (they wait in his inbox until read).
    _bob_reader: tokio_util::task::AbortOnDropHandle<()>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Nodes {
    async fn start(db: DbPlace, durability: Durability) -> anyhow::Result<Self> {
        let (directory, store) = (MemoryDiscovery::new(), MemoryStore::new());
        let mut dirs = Vec::new();
        let mut node = |name: &str| {
            let mut builder = ChatNode::builder()
                .username(name)
                .listen("127.0.0.1:0".parse().expect("address"))
                .transport(TcpTransport::new())
                .discovery(directory.clone())
                .offline_store(store.clone())
                .event_capacity(1 << 17)
                .durability(durability);
            if db == DbPlace::Disk {
                let dir = tempfile::tempdir().expect("temporary directory");
                builder = builder.data_dir(dir.path());
                dirs.push(dir);
            }
            builder.spawn()
        };
        let alice = node("alice").await?;
        let bob = node("bob").await?;
        let alice_events = alice.events();
        let mut bob_events = bob.events();
        let bob_reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while bob_events.next().await.is_some() {}
        }));
        let mut nodes = Self {
            alice,
            bob,
            alice_events,
            _bob_reader: bob_reader,
            _dirs: dirs,
        };
        // Open the connection before measuring.
        nodes.round_trip("warm up").await?;
        Ok(nodes)
    }

    async fn delivered(&mut self, n: usize) -> anyhow::Result<()> {
        let mut got = 0;
        while got < n {
            match self.alice_events.next().await {
                Some(Event::Delivered { .. }) => got += 1,
                Some(Event::StoredOffline { .. } | Event::SendFailed { .. }) => {
                    anyhow::bail!("a message was not delivered directly")
                }
                Some(_) => {}
                None => anyhow::bail!("alice stopped"),
            }
        }
        Ok(())
    }

    async fn throughput(&mut self, body: &str, n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let alice = self.alice.clone();
        let body = body.to_owned();
        let sending = tokio::spawn(async move {
            for _ in 0..n {
                alice.send("bob", &body).await?;
            }
            anyhow::Ok(())
        });
        self.delivered(n).await?;
        sending.await??;
        Ok(started.elapsed())
    }

    async fn round_trip(&mut self, body: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.alice.send("bob", body).await?;
        self.delivered(1).await?;
        Ok(started.elapsed())
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.alice.shutdown().await?;
        self.bob.shutdown().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort();
    let i = ((xs.len().saturating_sub(1)) as f64 * p).round() as usize;
    xs.get(i).copied().unwrap_or_default()
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// One side, ready to measure.
enum Runner {
    Raw(Box<Raw>),
    Nodes(Box<Nodes>),
}

impl Runner {
    async fn start(side: Side, body: &str, args: &Args) -> anyhow::Result<Self> {
        let (db, durability) = (
            args.db,
            match args.durability {
                DurabilityArg::Process => Durability::Process,
                DurabilityArg::PowerLoss => Durability::PowerLoss,
            },
        );
        Ok(match side {
            Side::Nodes => Self::Nodes(Box::new(Nodes::start(db, durability).await?)),
            raw => Self::Raw(Box::new(Raw::connect(Sealer::new(raw, body)?).await?)),
        })
    }

    async fn throughput(&mut self, body: &str, n: usize) -> anyhow::Result<Duration> {
        match self {
            Self::Raw(raw) => raw.throughput(body.as_bytes(), n).await,
            Self::Nodes(nodes) => nodes.throughput(body, n).await,
        }
    }

    async fn round_trip(&mut self, body: &str) -> anyhow::Result<Duration> {
        match self {
            Self::Raw(raw) => raw.round_trip(body.as_bytes()).await,
            Self::Nodes(nodes) => nodes.round_trip(body).await,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Raw(_) => Ok(()),
            Self::Nodes(nodes) => nodes.stop().await,
        }
    }
}

/// What one side measured at one size.
#[derive(Default)]
struct Figures {
    rates: Vec<f64>,
    rtts: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        median(self.rates.clone())
    }

    fn p50(&mut self) -> Duration {
        percentile(&mut self.rtts, 0.50)
    }

    fn p99(&mut self) -> Duration {
        percentile(&mut self.rtts, 0.99)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Every side is driven from a runtime worker, as an application's tasks would be, not
    // from the main thread's `block_on` (whose wake-ups go through a condition variable).
    tokio::spawn(run(args)).await?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sides: Vec<Side> = match args.only {
        Some(side) => vec![side],
        None => vec![Side::Raw, Side::RawPairKey, Side::Nodes],
    };
    println!(
        "{} rounds per size, alternating {:?}; {} messages per throughput run, {} round trips per round",
        args.rounds, sides, args.messages, args.round_trips
    );
    for &size in &args.sizes {
        let body = "x".repeat(size);
        let mut runners = Vec::new();
        for &side in &sides {
            runners.push((
                side,
                Runner::start(side, &body, &args).await?,
                Figures::default(),
            ));
        }
        for _ in 0..args.rounds {
            for (_, runner, figures) in &mut runners {
                let took = runner.throughput(&body, args.messages).await?;
                figures
                    .rates
                    .push(args.messages as f64 / took.as_secs_f64());
            }
            for _ in 0..args.round_trips {
                for (_, runner, figures) in &mut runners {
                    figures.rtts.push(runner.round_trip(&body).await?);
                }
            }
        }
        println!("size {size} B:");
        for (side, _, figures) in &mut runners {
            let label = match side {
                Side::Raw => "(a)  raw TCP + fernet crate",
                Side::RawPairKey => "(a') raw TCP + p2pchat seal",
                Side::Nodes => "(b)  p2pchat nodes",
            };
            println!(
                "  {label:<28} {:>10.0} msg/s   round trip p50 {:>9}  p99 {:>9}",
                figures.rate(),
                micros(figures.p50()),
                micros(figures.p99())
            );
        }
        let mut find = |side: Side| {
            runners
                .iter_mut()
                .find(|(s, _, _)| *s == side)
                .map(|(_, _, f)| (f.rate(), f.p50()))
        };
        if let (Some((a, a_rtt)), Some((b, b_rtt))) = (find(Side::Raw), find(Side::Nodes)) {
            println!(
                "  round trip p50 ratio (b/a): {:.2}",
                b_rtt.as_secs_f64() / a_rtt.as_secs_f64()
            );
            if let Some((a2, a2_rtt)) = find(Side::RawPairKey) {
                println!(
                    "  against (a'): throughput b/a' {:.2}, round trip p50 b/a' {:.2}",
                    b / a2,
                    b_rtt.as_secs_f64() / a2_rtt.as_secs_f64()
                );
            }
            println!("ratio {size}: {:.2}", b / a);
        }
        for (_, runner, _) in runners {
            runner.stop().await?;
        }
    }
    Ok(())
}
