//! `bench -- transport`: one bulk transfer over loopback per case, for Colony's tcp and quic transports, with a
//! raw tokio `TcpStream` transfer of the same size in the same run as the bound.
//!
//! Sender and receiver run in one process on a multi-threaded runtime. The sender writes the same 1 MiB
//! buffer repeatedly (shared, not copied, for Colony's chunk API); the receiver reads until the end of the
//! stream and counts. The time runs from the first write until the receiver has counted every byte.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use colony_transports::quic::{QuicConfig, QuicTransport};
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Keypair, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Measurement;

const CHUNK: usize = 1 << 20;

/// Runs the suite: `total` bytes per transfer, best of `repeat` transfers per case, for the case named `only`
/// (all when `None`). Cases take turns in each round, so that a disturbance on the machine hits the bound
/// and the transports alike.
pub async fn run(total: usize, repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    let cases: Vec<&str> = ["raw-tcp", "tcp", "tcp+tls", "quic"]
        .into_iter()
        .filter(|name| *name == "raw-tcp" || only.is_none_or(|only| *name == only))
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(repeat); cases.len()];
    for _ in 0..repeat {
        for (case, name) in cases.iter().enumerate() {
            let elapsed = match *name {
                "raw-tcp" => raw_tcp(total).await,
                "tcp" => colony_transfer(tcp(false), tcp(false), "tcp://127.0.0.1:0", total).await,
                "tcp+tls" => colony_transfer(tcp(true), tcp(true), "tcp://127.0.0.1:0", total).await,
                _ => colony_transfer(quic(), quic(), "quic://127.0.0.1:0", total).await,
            }
            .with_context(|| format!("case {name}"))?;
            times[case].push(elapsed);
        }
    }
    let best = |all: &[Duration]| *all.iter().min().expect("repeat is at least 1");
    let bound = mb_per_s(total, best(&times[0]));
    Ok(cases
        .iter()
        .zip(&times)
        .map(|(name, all)| {
            Measurement::new("transport", *name, mb_per_s(total, best(all)), "MB/s", bound)
                .bound_case("raw-tcp")
                .note(format!(
                    "{} MiB, best of {repeat} ({})",
                    total >> 20,
                    spread(total, all)
                ))
        })
        .collect())
}

fn tcp(tls: bool) -> Arc<dyn Transport> {
    Arc::new(TcpTransport::new(
        Keypair::generate(),
        TcpConfig {
            tls,
            ..TcpConfig::default()
        },
    ))
}

fn quic() -> Arc<dyn Transport> {
    Arc::new(QuicTransport::new(Keypair::generate(), QuicConfig::default()))
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn spread(total: usize, all: &[Duration]) -> String {
    let rates: Vec<String> = all.iter().map(|d| format!("{:.0}", mb_per_s(total, *d))).collect();
    format!("runs: {} MB/s", rates.join(", "))
}

async fn raw_tcp(total: usize) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0usize;
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            received += n;
        }
        anyhow::Ok((received, Instant::now()))
    });
    let mut socket = tokio::net::TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
    let chunk = vec![7u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = CHUNK.min(total - sent);
        socket.write_all(&chunk[..n]).await?;
        sent += n;
    }
    socket.shutdown().await?;
    let (received, finished) = receiver.await??;
    if received != total {
        bail!("raw tcp received {received} of {total} bytes");
    }
    Ok(finished - started)
}

async fn colony_transfer(
    server: Arc<dyn Transport>,
    client: Arc<dyn Transport>,
    listen: &str,
    total: usize,
) -> anyhow::Result<Duration> {
    let mut listener = server.listen(&listen.parse()?).await?;
    let address = listener.local_address();
    let receiver = tokio::spawn(async move {
        let conn = listener.accept().await?;
        let (_send, mut recv) = conn.accept_stream().await?;
        let mut received = 0usize;
        while let Some(chunk) = recv.read_chunk(CHUNK).await? {
            received += chunk.len();
        }
        anyhow::Ok((received, Instant::now(), conn))
    });
    let conn = client.dial(&address).await?;
    let (mut send, _recv) = conn.open_stream().await?;
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = CHUNK.min(total - sent);
        send.write_chunk(chunk.slice(..n)).await?;
        sent += n;
    }
    send.finish().await?;
    let (received, finished, _server_conn) = receiver.await??;
    if received != total {
        bail!("received {received} of {total} bytes");
    }
    conn.close("benchmark done");
    Ok(finished - started)
}
