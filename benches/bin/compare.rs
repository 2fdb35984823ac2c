//! p2pchat beside its ceiling, in one run, alternating: (a) a bare tokio TCP connection
//! carrying length-prefixed frames, each a Fernet token encrypted by the sender and decrypted
//! by the receiver, acknowledged with one byte, pipelined; (b) two p2pchat nodes over TCP on
//! 127.0.0.1 sending acknowledged messages, pipelined.
//!
//! ```text
//! cargo run --release -p p2pchat-benches --bin compare
//! ```
//!
//! For 64 B and 1 KiB bodies it prints messages per second (median of the rounds) and the
//! send-to-ack round trip (p50 and p99 over every sample, one message at a time) for each
//! side, and `ratio <size>: <b/a>` for throughput. The machine is shared and noisy, so the
//! two sides run alternately, round by round, in one process.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::{ChatNode, Event, Events, MemoryDiscovery, MemoryStore, TcpTransport};
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
}

// ---------------------------------------------------------------------------------------
// (a) The ceiling: raw framed TCP with a Fernet token per frame.

struct Raw {
    writer: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    acks: BufReader<tokio::net::tcp::OwnedReadHalf>,
    fernet: fernet::Fernet,
    _receiver: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn connect() -> anyhow::Result<Self> {
        let key = fernet::Fernet::generate_key();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let receiver_key = key.clone();
        let receiver = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let _ = receive(stream, fernet::Fernet::new(&receiver_key)).await;
        });
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Self {
            writer: BufWriter::new(write),
            acks: BufReader::new(read),
            fernet: fernet::Fernet::new(&key).context("fernet key")?,
            _receiver: receiver,
        })
    }

    fn frame(&self, body: &[u8], out: &mut Vec<u8>) {
        let token = self.fernet.encrypt(body);
        out.extend_from_slice(&(token.len() as u32).to_be_bytes());
        out.extend_from_slice(token.as_bytes());
    }

    /// `n` messages pipelined; returns the time until the last ack.
    async fn throughput(&mut self, body: &[u8], n: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let Self {
            writer,
            acks,
            fernet,
            ..
        } = self;
        let send = async {
            let mut buf = Vec::new();
            for _ in 0..n {
                buf.clear();
                let token = fernet.encrypt(body);
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

/// Reads frames, decrypts each, and acknowledges each with one byte (flushed when the
/// input runs dry, so acks are batched under load as p2pchat's are).
async fn receive(stream: TcpStream, fernet: Option<fernet::Fernet>) -> anyhow::Result<()> {
    let fernet = fernet.context("fernet key")?;
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
        let token = std::str::from_utf8(&token)?;
        fernet.decrypt(token).context("decrypt")?;
        writer.write_all(&[1]).await?;
    }
}

// ---------------------------------------------------------------------------------------
// (b) p2pchat: two nodes over TCP.

struct Nodes {
    alice: ChatNode,
    bob: ChatNode,
    alice_events: Events,
    _bob_events: Events,
}

impl Nodes {
    async fn start() -> anyhow::Result<Self> {
        let (directory, store) = (MemoryDiscovery::new(), MemoryStore::new());
        let node = |name: &str| {
            ChatNode::builder()
                .username(name)
                .listen("127.0.0.1:0".parse().expect("address"))
                .transport(TcpTransport::new())
                .discovery(directory.clone())
                .offline_store(store.clone())
                .event_capacity(1 << 17)
                .spawn()
        };
        let alice = node("alice").await?;
        let bob = node("bob").await?;
        let alice_events = alice.events();
        // bob's stream is read by nobody: a lagging reader costs the node nothing.
        let bob_events = bob.events();
        let mut nodes = Self {
            alice,
            bob,
            alice_events,
            _bob_events: bob_events,
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
    xs[xs.len() / 2]
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort();
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} rounds per size, alternating (a) raw TCP + Fernet and (b) p2pchat; {} messages per throughput run, {} round trips per round",
        args.rounds, args.messages, args.round_trips
    );
    for &size in &args.sizes {
        let body = "x".repeat(size);
        let mut raw = Raw::connect().await?;
        let mut nodes = Nodes::start().await?;
        let (mut raw_rates, mut node_rates) = (Vec::new(), Vec::new());
        let (mut raw_rtts, mut node_rtts) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            let took = raw.throughput(body.as_bytes(), args.messages).await?;
            raw_rates.push(args.messages as f64 / took.as_secs_f64());
            let took = nodes.throughput(&body, args.messages).await?;
            node_rates.push(args.messages as f64 / took.as_secs_f64());
            for _ in 0..args.round_trips {
                raw_rtts.push(raw.round_trip(body.as_bytes()).await?);
                node_rtts.push(nodes.round_trip(&body).await?);
            }
        }
        let (a, b) = (median(raw_rates), median(node_rates));
        println!("size {size} B:");
        println!(
            "  (a) raw TCP + Fernet: {a:>10.0} msg/s   round trip p50 {:>9}  p99 {:>9}",
            micros(percentile(&mut raw_rtts, 0.50)),
            micros(percentile(&mut raw_rtts, 0.99))
        );
        println!(
            "  (b) p2pchat nodes:    {b:>10.0} msg/s   round trip p50 {:>9}  p99 {:>9}",
            micros(percentile(&mut node_rtts, 0.50)),
            micros(percentile(&mut node_rtts, 0.99))
        );
        println!(
            "  round trip p50 ratio (b/a): {:.2}",
            percentile(&mut node_rtts, 0.50).as_secs_f64()
                / percentile(&mut raw_rtts, 0.50).as_secs_f64()
        );
        println!("ratio {size}: {:.2}", b / a);
        nodes.stop().await?;
    }
    Ok(())
}
