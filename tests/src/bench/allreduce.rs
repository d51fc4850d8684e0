//! `bench -- allreduce`: one round of the butterfly all-reduce among peers that are separate processes on
//! loopback TCP, against raw TCP doing the same exchange in the same run.
//!
//! Each peer holds `values` f32. In a butterfly all-reduce among N peers each one sends (N−1)/N of its
//! vector as parts and receives as much back as results, while receiving and answering the others' parts:
//! 2·(N−1)/N of the vector each way at once. The bound is raw tokio TCP moving exactly that (2·V·4/N bytes
//! to and from every other peer, all streams at once) between the same processes, measured in the same run:
//! each peer sends the bytes of its vector (the slice of the receiving peer, then its own slice, as the
//! all-reduce sends parts and then results) and receives into vector-sized buffers, so the bound moves the
//! same memory as a round does. The note also gives raw TCP from one reused 1 MiB buffer (cache-hot, never
//! touched), which no transfer of a vector larger than the caches can reach.
//!
//! The parent spawns the peers as child processes of this binary (`bench allreduce-peer`) and drives them
//! with one-line commands on their stdin; each answers on stdout.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colony_averaging::allreduce::{
    self, AllReduceConfig, AllReduceService, GroupId, GroupMember, GroupPlan, PeerMode, ServiceConfig,
};
use colony_averaging::codec::{Codec, CodecPolicy};
use colony_averaging::net::Endpoint;
use colony_averaging::tensor::{FlatTensors, TensorInfo, TensorLayout};
use colony_transports::rpc::Router;
use colony_transports::tcp::{TcpConfig, TcpTransport};
use colony_transports::{Address, Keypair, PeerId, Transport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::Measurement;

/// Runs the suite: `peers` processes, `values` f32 each, `repeat` rounds per case (the best is reported).
pub async fn run(peers: usize, values: usize, repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    if peers < 2 {
        bail!("the all-reduce needs at least 2 peers, got {peers}");
    }
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let mut children = Vec::new();
    for index in 0..peers {
        let mut child = tokio::process::Command::new(&exe)
            .args([
                "allreduce-peer",
                "--peers",
                &peers.to_string(),
                "--values",
                &values.to_string(),
            ])
            .arg("--index")
            .arg(index.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning a peer process")?;
        let stdin = child.stdin.take().context("peer stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?).lines();
        children.push((child, stdin, stdout));
    }
    let mut addresses = Vec::new();
    for (_, _, stdout) in &mut children {
        let line = read_line(stdout, Duration::from_secs(30)).await?;
        let address = line
            .strip_prefix("ADDR ")
            .context("a peer's first line names its addresses")?;
        addresses.push(address.to_owned());
    }
    let peers_line = format!("PEERS {}\n", addresses.join(" "));
    command_all(&mut children, &peers_line, Duration::from_secs(60)).await?;

    let bytes_each_way = 2.0 * (peers as f64 - 1.0) / peers as f64 * values as f64 * 4.0;
    let (mut raw, mut raw_worst, mut hot) = (f64::INFINITY, 0.0f64, f64::INFINITY);
    for _ in 0..repeat {
        let once = command_all(&mut children, "RAW\n", Duration::from_secs(300)).await?;
        raw = raw.min(once);
        raw_worst = raw_worst.max(once);
        hot = hot.min(command_all(&mut children, "RAWHOT\n", Duration::from_secs(300)).await?);
    }
    let bound = bytes_each_way / raw / 1e9;
    let mut results = Vec::new();
    for (round_base, codec) in [Codec::None, Codec::Float16].into_iter().enumerate() {
        if only.is_some_and(|case| case != codec.name()) {
            continue;
        }
        let mut best = f64::INFINITY;
        let mut worst: f64 = 0.0;
        for round in 0..repeat {
            let command = format!("ROUND {} {}\n", codec.id(), round_base * 1000 + round);
            let seconds = command_all(&mut children, &command, Duration::from_secs(600)).await?;
            best = best.min(seconds);
            worst = worst.max(seconds);
        }
        // Throughput as the bound counts it: the uncompressed bytes each peer exchanges each way.
        let throughput = bytes_each_way / best / 1e9;
        results.push(
            Measurement::new("allreduce", codec.name(), throughput, "GB/s", bound)
                .bound_case("raw tcp")
                .note(format!(
                    "{peers} processes, {values} f32 each; best {best:.3} s/round, worst {worst:.3} s; raw tcp {raw:.3} s (worst {raw_worst:.3} s); from a hot 1 MiB buffer {hot:.3} s, ratio {:.3}", hot / best
                )),
        );
    }
    command_all(&mut children, "EXIT\n", Duration::from_secs(30)).await.ok();
    for (mut child, _, _) in children {
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
    Ok(results)
}

type Child = (
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
);

async fn read_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    timeout: Duration,
) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, lines.next_line())
        .await
        .context("a peer did not answer in time")??
        .context("a peer exited")
}

/// Sends `command` to every peer and waits for every "DONE"; returns the longest time a peer reported (the
/// peers time only the exchange itself, not preparing their buffers), or the wall time when none reported.
async fn command_all(children: &mut [Child], command: &str, timeout: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut longest: Option<f64> = None;
    for (_, stdin, _) in children.iter_mut() {
        stdin.write_all(command.as_bytes()).await?;
        stdin.flush().await?;
    }
    if command == "EXIT\n" {
        return Ok(0.0);
    }
    for (_, _, stdout) in children.iter_mut() {
        let line = read_line(stdout, timeout).await?;
        let Some(rest) = line.strip_prefix("DONE") else {
            bail!("a peer answered `{line}` to `{}`", command.trim());
        };
        if let Ok(seconds) = rest.trim().parse::<f64>() {
            longest = Some(longest.map_or(seconds, |l| l.max(seconds)));
        }
    }
    Ok(longest.unwrap_or_else(|| started.elapsed().as_secs_f64()))
}

/// The child side: one peer process.
pub async fn peer_process(index: usize, peers: usize, values: usize) -> anyhow::Result<()> {
    let keypair = Keypair::generate();
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new(keypair.clone(), TcpConfig::default()));
    let service = AllReduceService::new(ServiceConfig::default());
    let mut router = Router::default();
    service.serve(&mut router);
    let endpoint = Endpoint::listen(transport, &"tcp://127.0.0.1:0".parse()?, router).await?;
    let raw_listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("ADDR {} {}", endpoint.local_address(), raw_listener.local_addr()?);

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let line = stdin.next_line().await?.context("no PEERS line")?;
    let fields: Vec<&str> = line
        .strip_prefix("PEERS ")
        .context("expected PEERS")?
        .split(' ')
        .collect();
    if fields.len() != 2 * peers {
        bail!("expected {peers} address pairs, got `{line}`");
    }
    let mut members = Vec::new();
    let mut raw_addresses = Vec::new();
    for pair in fields.chunks(2) {
        let address: Address = pair[0].parse()?;
        members.push(address.peer().context("addresses name their peer")?);
        endpoint.add_address(address);
        raw_addresses.push(pair[1].to_owned());
    }
    let raw = connect_raw(index, &raw_listener, &raw_addresses).await?;
    let connector = endpoint.connector();
    // Open the colony connections before timing anything.
    for peer in &members {
        if *peer != keypair.peer_id() {
            connector.connect(peer).await?;
        }
    }
    println!("DONE");

    let layout = Arc::new(TensorLayout::new(
        (0..64)
            .map(|t| TensorInfo::new(format!("layer{t}"), [values / 64]))
            .collect(),
    )?);
    let input: Vec<f32> = (0..layout.total_values())
        .map(|k| ((k * 7919 + index * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut raw = raw;
    // The raw bound's memory: this peer's vector as bytes, and one vector slice per other peer to receive
    // into (written once here, so that no page is faulted in while timing).
    let slice_bytes = values / peers * 4;
    let vector: Arc<Vec<u8>> = Arc::new(input.iter().flat_map(|v| v.to_le_bytes()).collect());
    let mut landing: Vec<Vec<u8>> = (0..peers - 1).map(|_| vec![1u8; slice_bytes]).collect();
    let others: Vec<usize> = (0..peers).filter(|&other| other != index).collect();
    while let Some(line) = stdin.next_line().await? {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["RAW"] => {
                let sources = others
                    .iter()
                    .map(|&other| {
                        [
                            other * slice_bytes..(other + 1) * slice_bytes,
                            index * slice_bytes..(index + 1) * slice_bytes,
                        ]
                    })
                    .collect();
                let started = Instant::now();
                (raw, landing) = raw_exchange(raw, Source::Vector(vector.clone(), sources), landing).await?;
                println!("DONE {}", started.elapsed().as_secs_f64());
            }
            ["RAWHOT"] => {
                let started = Instant::now();
                (raw, landing) = raw_exchange(raw, Source::Hot(2 * slice_bytes), landing).await?;
                println!("DONE {}", started.elapsed().as_secs_f64());
            }
            ["ROUND", codec, round] => {
                let codec = Codec::from_id(codec.parse()?)?;
                let round: u64 = round.parse()?;
                let tensors = FlatTensors::new(layout.clone(), input.clone())?;
                let started = Instant::now();
                let outcome =
                    one_round(&service, &connector, &members, &keypair, &layout, tensors, codec, round).await?;
                let seconds = started.elapsed().as_secs_f64();
                if outcome.report.parts_averaged != outcome.report.parts {
                    bail!("peer {index}: round {round} averaged only {:?}", outcome.report);
                }
                println!("DONE {seconds}");
            }
            ["EXIT"] => return Ok(()),
            _ => bail!("unknown command `{line}`"),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn one_round(
    service: &AllReduceService,
    connector: &Arc<dyn colony_averaging::net::Connector>,
    members: &[PeerId],
    keypair: &Keypair,
    layout: &Arc<TensorLayout>,
    tensors: FlatTensors,
    codec: Codec,
    round: u64,
) -> anyhow::Result<allreduce::Outcome> {
    let mut group_id = [0u8; 32];
    group_id[..8].copy_from_slice(&round.to_le_bytes());
    let plan = GroupPlan {
        group_id: GroupId(group_id),
        members: members
            .iter()
            .map(|peer| GroupMember {
                peer: *peer,
                mode: PeerMode::Node,
                weight: 1.0,
                share: 1.0,
            })
            .collect(),
    };
    let config = AllReduceConfig {
        codecs: CodecPolicy::Fixed(codec),
        allreduce_timeout: Duration::from_secs(300),
        ..AllReduceConfig::default()
    };
    let run = allreduce::start(
        service,
        connector.clone(),
        plan,
        keypair.peer_id(),
        layout.clone(),
        Some(tensors),
        config,
    )?;
    Ok(run.finish().await?)
}

/// One raw TCP connection to every other peer (index order decides who dials).
async fn connect_raw(index: usize, listener: &TcpListener, addresses: &[String]) -> anyhow::Result<Vec<TcpStream>> {
    let mut streams: Vec<Option<TcpStream>> = (0..addresses.len()).map(|_| None).collect();
    for (other, address) in addresses.iter().enumerate().skip(index + 1) {
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        stream.write_u32(index as u32).await?;
        streams[other] = Some(stream);
    }
    for _ in 0..index {
        let (mut stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let other = stream.read_u32().await? as usize;
        if other >= streams.len() {
            bail!("a raw connection claimed index {other}");
        }
        streams[other] = Some(stream);
    }
    Ok(streams.into_iter().flatten().collect())
}

/// What each raw connection sends: per connection, two ranges of the vector's bytes; or `bytes` from one
/// reused 1 MiB buffer.
enum Source {
    Vector(Arc<Vec<u8>>, Vec<[std::ops::Range<usize>; 2]>),
    Hot(usize),
}

/// The hot source's buffer.
const HOT_CHUNK: usize = 1 << 20;

/// Sends to and receives from every other peer at once, as much each way as [`Source`] says; what a
/// connection receives lands in its buffer of `landing` (twice over: the second half of the exchange
/// overwrites the first, as results overwrite a vector's slice), or in one reused 1 MiB buffer when the
/// source is hot.
async fn raw_exchange(
    streams: Vec<TcpStream>,
    source: Source,
    landing: Vec<Vec<u8>>,
) -> anyhow::Result<(Vec<TcpStream>, Vec<Vec<u8>>)> {
    let hot_chunk = Arc::new(vec![7u8; HOT_CHUNK]);
    let mut tasks = Vec::new();
    for (connection, (stream, mut land)) in streams.into_iter().zip(landing).enumerate() {
        // The bytes to send, as ranges of `data`.
        let (data, pieces, hot) = match &source {
            Source::Vector(vector, ranges) => (vector.clone(), ranges[connection].to_vec(), false),
            Source::Hot(bytes) => {
                let pieces = (0..*bytes)
                    .step_by(HOT_CHUNK)
                    .map(|start| 0..HOT_CHUNK.min(bytes - start))
                    .collect();
                (hot_chunk.clone(), pieces, true)
            }
        };
        let total: usize = pieces.iter().map(|piece| piece.len()).sum();
        tasks.push(tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            let write = async {
                for piece in &pieces {
                    writer.write_all(&data[piece.clone()]).await?;
                }
                writer.flush().await
            };
            let read = async {
                let mut scratch = if hot { vec![0u8; HOT_CHUNK] } else { Vec::new() };
                let target = if hot { &mut scratch } else { &mut land };
                let mut received = 0;
                while received < total {
                    let at = received % target.len().max(1);
                    let end = target.len().min(at + (total - received));
                    let n = reader.read(&mut target[at..end]).await?;
                    if n == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed"));
                    }
                    received += n;
                }
                Ok(())
            };
            let (written, read) = tokio::join!(write, read);
            written?;
            read?;
            Ok::<_, std::io::Error>((reader.reunite(writer).expect("halves of one stream"), land))
        }));
    }
    let mut streams = Vec::new();
    let mut landing = Vec::new();
    for task in tasks {
        let (stream, land) = task.await??;
        streams.push(stream);
        landing.push(land);
    }
    Ok((streams, landing))
}
