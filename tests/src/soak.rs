//! The chaos soak: training peers as separate processes over TCP on loopback, killed with SIGKILL and
//! restarted at random moments, and a third of them cut off from the others for a while; then checks that
//! training never stalled, that the members of each state round agree on the parameters, that every restarted
//! peer caught up with the swarm, that nothing panicked, and that the long-lived peers' memory stayed flat.
//!
//! Each peer listens on its own loopback port and announces (`--advertise`) the port of a relay that this
//! harness runs in front of it, so every connection to a peer passes through the harness. The relay reads
//! the dialer's hello (the first message of the TCP transport's handshake, which names the dialer's peer id
//! in the clear) and forwards the bytes untouched; while a partition is on, it refuses connections between
//! the two sides and cuts those already open, as a network split would. Nothing in the peers knows about it.
//!
//! The 2-minute soak runs in `cargo test` (`tests/tests/soak.rs`); the full one is
//! `cargo run --release -p colony-tests --bin soak -- --minutes 10`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colony_transports::handshake::{HELLO_LEN, HELLO_MAGIC};
use colony_transports::identity::PEER_ID_LEN;
use colony_transports::{Keypair, PeerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::processes::{Processes, SMALL_TASK, free_port, workspace_binary};

/// What the soak does and for how long.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Training peers, each a process.
    pub peers: usize,
    /// Length of the chaos phase (after every peer trained its first epochs).
    pub duration: Duration,
    /// A peer is killed every this long, drawn uniformly from the range.
    pub kill_every: (Duration, Duration),
    /// A killed peer restarts this long after the kill, with the same identity and ports.
    pub restart_after: Duration,
    /// When the partition starts, from the start of the chaos phase.
    pub partition_at: Duration,
    /// How long the partition lasts.
    pub partition_for: Duration,
    /// Peers `0..long_lived` are never killed; their resident memory is watched.
    pub long_lived: usize,
    /// Memory is compared with its value this long into the chaos phase.
    pub warm_up: Duration,
    /// A restarted peer must reach the swarm's epoch within this long.
    pub catch_up_within: Duration,
    /// Seed of the kill schedule and the choice of peers.
    pub seed: u64,
    /// The swarm's samples per epoch. With the small task's model and batches, 8 peers on this 2-core
    /// machine compute about 90,000 samples a second: 196,608 make epochs of about 2 s (real runs have
    /// epochs of tens of seconds). The stall rule counts in epoch-times, and a kill or a partition's heal
    /// costs the swarm a second or two whatever the epoch (timeouts in seconds; see docs/benchmarks.md), so
    /// much shorter epochs would measure the task, not Colony: with 65,536 (0.7 s epochs) the heal of the
    /// partition stalled 2.2 s = 3.0 epoch-times.
    pub target_batch_size: u64,
    /// Extra flags for every trainer.
    pub trainer_args: Vec<String>,
}

impl SoakConfig {
    /// The full soak: 8 peers for 10 minutes, a kill every 10–30 s, a third of the swarm cut off
    /// for 30 s.
    pub fn full(seed: u64) -> Self {
        Self {
            peers: 8,
            duration: Duration::from_secs(600),
            kill_every: (Duration::from_secs(10), Duration::from_secs(30)),
            restart_after: Duration::from_secs(2),
            partition_at: Duration::from_secs(240),
            partition_for: Duration::from_secs(30),
            long_lived: 2,
            warm_up: Duration::from_secs(120),
            catch_up_within: Duration::from_secs(60),
            seed,
            target_batch_size: 196_608,
            trainer_args: Vec::new(),
        }
    }

    /// The same for 2 minutes (CI): the partition 40 s in, memory compared from 45 s on.
    pub fn short(seed: u64) -> Self {
        Self {
            duration: Duration::from_secs(120),
            partition_at: Duration::from_secs(40),
            warm_up: Duration::from_secs(45),
            ..Self::full(seed)
        }
    }
}

/// One restart of a killed peer.
#[derive(Debug, Clone)]
pub struct Restart {
    /// The peer's index.
    pub index: usize,
    /// Its process name after the restart.
    pub name: String,
    /// Seconds into the chaos phase.
    pub restarted_at: f64,
    /// The epoch it loaded from the swarm, if it did.
    pub loaded: Option<u64>,
    /// Seconds from the restart until it trained within two epochs of the swarm, if it did.
    pub caught_up_after: Option<f64>,
    /// It was killed again (or the soak ended) before it had the time to catch up.
    pub cut_short: bool,
}

/// A long-lived peer's resident memory.
#[derive(Debug, Clone)]
pub struct Memory {
    /// The peer's index.
    pub index: usize,
    /// KiB at the end of the warm-up.
    pub baseline_kib: u64,
    /// Smallest and largest KiB after it.
    pub min_kib: u64,
    /// Largest KiB after the warm-up.
    pub max_kib: u64,
    /// KiB at the end.
    pub end_kib: u64,
    /// (seconds into the chaos phase, KiB) about every 10 s over the whole phase.
    pub trend: Vec<(f64, u64)>,
}

impl Memory {
    /// The largest relative difference from the baseline.
    pub fn deviation(&self) -> f64 {
        let base = self.baseline_kib.max(1) as f64;
        ((self.max_kib as f64 / base) - 1.0).max(1.0 - (self.min_kib as f64 / base))
    }
}

/// What the soak measured. [`SoakReport::violations`] lists what broke the rules.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// The configuration's seed.
    pub seed: u64,
    /// Length of the chaos phase, seconds.
    pub seconds: f64,
    /// The swarm's epoch at the start and the end of the chaos phase.
    pub epochs: (u64, u64),
    /// Mean seconds per epoch of the swarm over the chaos phase.
    pub epoch_time: f64,
    /// Longest seconds without an increase, and when it began (seconds into the chaos phase).
    pub longest_stall: (f64, f64),
    /// Kills with SIGKILL.
    pub kills: usize,
    /// The restarts.
    pub restarts: Vec<Restart>,
    /// The partition's sides (the isolated peers), and the seconds it lasted.
    pub partition: (Vec<usize>, f64),
    /// Connections the relay refused or cut across the partition.
    pub partition_cuts: u64,
    /// State rounds whose members all reported the same parameters.
    pub state_rounds_agreed: usize,
    /// State rounds where fewer members reported than the group had, explained by a kill, a partition or a
    /// failed round of a member nearby.
    pub state_rounds_incomplete: usize,
    /// State rounds whose members disagree on the parameters (no explanation).
    pub state_rounds_disagreeing: Vec<String>,
    /// State rounds that failed, as peers reported them.
    pub state_rounds_failed: usize,
    /// Lines with a panic.
    pub panics: Vec<String>,
    /// Peers that exited without being killed.
    pub unexpected_exits: Vec<String>,
    /// The long-lived peers' memory.
    pub memory: Vec<Memory>,
}

impl SoakReport {
    /// The rules of the soak that were broken, each as a sentence; empty when it passed.
    pub fn violations(&self, config: &SoakConfig) -> Vec<String> {
        let mut out = Vec::new();
        if self.epoch_time <= 0.0 {
            out.push("the swarm's epoch never increased during the soak".into());
        } else if self.longest_stall.0 > 3.0 * self.epoch_time {
            out.push(format!(
                "training stalled for {:.1} s from {:.1} s on: more than 3 epoch-times ({:.2} s each)",
                self.longest_stall.0, self.longest_stall.1, self.epoch_time
            ));
        }
        for restart in &self.restarts {
            if restart.caught_up_after.is_none() && !restart.cut_short {
                out.push(format!(
                    "{} (restarted {:.1} s in) did not reach the swarm's epoch within {:?}",
                    restart.name, restart.restarted_at, config.catch_up_within
                ));
            }
        }
        out.extend(self.state_rounds_disagreeing.iter().cloned());
        out.extend(self.panics.iter().map(|line| format!("a panic: {line}")));
        out.extend(
            self.unexpected_exits
                .iter()
                .map(|e| format!("an exit nobody asked for: {e}")),
        );
        for memory in &self.memory {
            if memory.deviation() > 0.10 {
                out.push(format!(
                    "peer {}'s resident memory left ±10 % of {} KiB after the warm-up: {}..{} KiB",
                    memory.index, memory.baseline_kib, memory.min_kib, memory.max_kib
                ));
            }
        }
        out
    }

    /// The report as Markdown, for docs/benchmarks.md.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let caught: Vec<f64> = self.restarts.iter().filter_map(|r| r.caught_up_after).collect();
        let loaded = self.restarts.iter().filter(|r| r.loaded.is_some()).count();
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let _ = writeln!(out, "| seed | {} |", self.seed);
        let _ = writeln!(out, "| chaos phase | {:.0} s |", self.seconds);
        let _ = writeln!(
            out,
            "| swarm epoch (start → end) | {} → {} |",
            self.epochs.0, self.epochs.1
        );
        let _ = writeln!(
            out,
            "| epoch time (mean) | {:.2} s |\n| longest stall | {:.2} s ({:.1} epoch-times, from {:.0} s) |",
            self.epoch_time,
            self.longest_stall.0,
            self.longest_stall.0 / self.epoch_time.max(1e-9),
            self.longest_stall.1
        );
        let _ = writeln!(
            out,
            "| kills / restarts | {} / {} ({} loaded the state, {} cut short by the next kill or the end) |",
            self.kills,
            self.restarts.len(),
            loaded,
            self.restarts.iter().filter(|r| r.cut_short).count()
        );
        let _ = writeln!(
            out,
            "| catch-up after restart | {} |",
            if caught.is_empty() {
                "none".to_owned()
            } else {
                format!(
                    "{} peers, {:.1}–{:.1} s",
                    caught.len(),
                    caught.iter().copied().fold(f64::INFINITY, f64::min),
                    caught.iter().copied().fold(0.0, f64::max)
                )
            }
        );
        let _ = writeln!(
            out,
            "| partition | peers {:?} cut off for {:.0} s ({} connections refused or cut) |",
            self.partition.0, self.partition.1, self.partition_cuts
        );
        let _ = writeln!(
            out,
            "| state rounds | {} agreed, {} with a member missing (killed, cut off or failed nearby), {} disagreeing, \
             {} failed reports |",
            self.state_rounds_agreed,
            self.state_rounds_incomplete,
            self.state_rounds_disagreeing.len(),
            self.state_rounds_failed
        );
        let _ = writeln!(out, "| panics | {} |", self.panics.len());
        for memory in &self.memory {
            let trend: Vec<String> = memory
                .trend
                .iter()
                .map(|(at, kib)| format!("{at:.0} s: {:.1} MiB", *kib as f64 / 1024.0))
                .collect();
            let _ = writeln!(
                out,
                "| peer {} resident memory over time | {} |",
                memory.index,
                trend.join(", ")
            );
            let _ = writeln!(
                out,
                "| peer {} resident memory | {} KiB after warm-up, then {}–{} KiB, {} KiB at the end ({:+.1} % / {:+.1} %) |",
                memory.index,
                memory.baseline_kib,
                memory.min_kib,
                memory.max_kib,
                memory.end_kib,
                (memory.min_kib as f64 / memory.baseline_kib.max(1) as f64 - 1.0) * 100.0,
                (memory.max_kib as f64 / memory.baseline_kib.max(1) as f64 - 1.0) * 100.0,
            );
        }
        out
    }
}

/// A small deterministic generator (xorshift64*) for the schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn between(&mut self, (low, high): (Duration, Duration)) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(if span == 0 { 0 } else { self.next() % (span + 1) })
    }
}

/// A relayed connection: its dialer (when known), its listener, and the task copying its bytes.
type Relayed = (Option<usize>, usize, AbortHandle);

/// A group member's report of a state round: its process, the group size, the parameters' digest, when.
type MemberReport<'a> = (&'a str, Option<usize>, Option<&'a str>, f64);

/// The relays' shared view: the partition and the connections open through them.
#[derive(Default)]
struct Links {
    /// The isolated side; empty when there is no partition.
    isolated: Mutex<HashSet<usize>>,
    /// Open relayed connections: (dialer, listener, the task copying its bytes).
    open: Mutex<HashMap<u64, Relayed>>,
    next: AtomicU64,
    cuts: AtomicU64,
}

impl Links {
    fn crosses(&self, from: Option<usize>, to: usize) -> bool {
        let isolated = self.isolated.lock().unwrap_or_else(|p| p.into_inner());
        match from {
            Some(from) if !isolated.is_empty() => isolated.contains(&from) != isolated.contains(&to),
            _ => false,
        }
    }

    fn partition(&self, side: &[usize]) {
        *self.isolated.lock().unwrap_or_else(|p| p.into_inner()) = side.iter().copied().collect();
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for (from, to, task) in open.values() {
            if self.crosses(*from, *to) {
                task.abort();
                self.cuts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn heal(&self) {
        self.isolated.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Relays connections from `listener` to peer `index` at `target`.
async fn relay(
    listener: TcpListener,
    index: usize,
    target: u16,
    peers: Arc<HashMap<PeerId, usize>>,
    links: Arc<Links>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(forward(inbound, index, target, peers.clone(), links.clone()));
    }
}

async fn forward(
    mut inbound: TcpStream,
    to: usize,
    target: u16,
    peers: Arc<HashMap<PeerId, usize>>,
    links: Arc<Links>,
) {
    let mut hello = [0u8; HELLO_LEN];
    match tokio::time::timeout(Duration::from_secs(10), inbound.read_exact(&mut hello)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let from = (hello[..HELLO_MAGIC.len()] == HELLO_MAGIC)
        .then(|| PeerId::try_from_slice(&hello[HELLO_MAGIC.len()..HELLO_MAGIC.len() + PEER_ID_LEN]).ok())
        .flatten()
        .and_then(|peer| peers.get(&peer).copied());
    if links.crosses(from, to) {
        links.cuts.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let connect = TcpStream::connect(("127.0.0.1", target));
    let Ok(Ok(mut outbound)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    if outbound.write_all(&hello).await.is_err() {
        return;
    }
    let task = tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    let id = links.next.fetch_add(1, Ordering::Relaxed);
    links
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (from, to, task.abort_handle()));
    // A partition that began between the check above and the registration.
    if links.crosses(from, to) {
        task.abort();
    }
    let _ = task.await;
    links.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
}

/// Resident memory of a process, KiB (`VmRSS` of /proc/PID/status).
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One peer of the soak: its identity and ports.
struct Peer {
    key: PathBuf,
    id: PeerId,
    port: u16,
    relay_port: u16,
    /// The name of its current process, `None` while it is dead.
    name: Option<String>,
    starts: usize,
}

impl Peer {
    fn address(&self) -> String {
        format!("tcp://127.0.0.1:{}/p/{}", self.relay_port, self.id)
    }
}

/// A state round as one peer reported it.
struct StateReport {
    at: f64,
    epoch: u64,
    peers: Option<usize>,
    group: Option<String>,
    digest: Option<String>,
}

/// Runs the soak; `log` gets a line for each event as it happens.
pub fn run(config: &SoakConfig, mut log: impl FnMut(&str)) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(config.peers >= 3, "the soak needs at least 3 peers");
    anyhow::ensure!(config.long_lived < config.peers, "some peers must be killable");
    let scratch = tempfile_dir()?;
    let mut peers = Vec::new();
    for index in 0..config.peers {
        let keypair = Keypair::generate();
        let key = scratch.join(format!("peer{index}.key"));
        keypair.save(&key)?;
        peers.push(Peer {
            key,
            id: keypair.peer_id(),
            port: free_port(),
            relay_port: 0,
            name: None,
            starts: 0,
        });
    }
    let by_id: Arc<HashMap<PeerId, usize>> = Arc::new(peers.iter().enumerate().map(|(i, p)| (p.id, i)).collect());
    let links = Arc::new(Links::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for (index, peer) in peers.iter_mut().enumerate() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        peer.relay_port = listener.local_addr()?.port();
        let _guard = runtime.enter();
        let listener = TcpListener::from_std(listener)?;
        runtime.spawn(relay(listener, index, peer.port, by_id.clone(), links.clone()));
    }

    let trainer = workspace_binary("colony-examples", "trainer");
    let command = |peers: &[Peer], index: usize, first_start: bool| {
        let peer = &peers[index];
        let mut command = Command::new(&trainer);
        command
            .arg(format!("--listen=tcp://127.0.0.1:{}", peer.port))
            .arg(format!("--advertise=tcp://127.0.0.1:{}", peer.relay_port))
            .arg("--identity")
            .arg(&peer.key)
            .arg(format!("--shuffle-seed={}", 100 + index))
            .args(SMALL_TASK.iter().filter(|a| !a.starts_with("--target-batch-size")))
            .arg(format!("--target-batch-size={}", config.target_batch_size))
            .arg("--delay-state-averaging=false")
            .args(&config.trainer_args)
            .env("RUST_LOG", "warn");
        // The first peer starts the run; later starts join through any other peer (the first alive answers).
        let initial: Vec<usize> = match (first_start, index) {
            (true, 0) => Vec::new(),
            (true, _) => vec![0],
            (false, _) => (0..peers.len()).filter(|i| *i != index).collect(),
        };
        for other in initial {
            command.arg(format!("--initial-peer={}", peers[other].address()));
        }
        command
    };

    let mut swarm = Processes::default();
    let wait = Duration::from_secs(120);
    for index in 0..config.peers {
        let name = format!("peer{index}");
        swarm.spawn(&name, command(&peers, index, true));
        peers[index].name = Some(name.clone());
        peers[index].starts = 1;
        swarm.wait_for_line(&name, "listening on ", wait);
    }
    for peer in &peers {
        let name = peer.name.clone().expect("started");
        swarm.wait_for(&name, "epoch ", wait, "two epochs", |lines| {
            lines.iter().filter_map(|l| epoch_of(l)).any(|e| e >= 2)
        });
    }
    let start = Instant::now();
    let since = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
    log(&format!(
        "all {} peers train; chaos for {:?}",
        config.peers, config.duration
    ));

    let mut rng = Rng(config.seed | 1);
    let partition_window = (
        config.partition_at.saturating_sub(Duration::from_secs(5)),
        config.partition_at + config.partition_for + Duration::from_secs(5),
    );
    let mut next_kill = rng.between(config.kill_every);
    let mut pending: Vec<(usize, Duration)> = Vec::new();
    let mut report = SoakReport {
        seed: config.seed,
        ..SoakReport::default()
    };
    let mut kills: Vec<(usize, f64)> = Vec::new();
    let mut partition_times: Option<(f64, f64)> = None;
    let mut memory: Vec<Vec<(f64, u64)>> = vec![Vec::new(); config.long_lived];
    let mut last_sample = Duration::ZERO;
    while start.elapsed() < config.duration {
        let now = start.elapsed();
        // Exits nobody asked for: reported, and the peer is restarted like a killed one.
        while let Some((name, status)) = swarm.exited() {
            report.unexpected_exits.push(format!("{name} exited with {status}"));
            log(&format!(
                "{:.1} s: {name} exited on its own: {status}",
                now.as_secs_f64()
            ));
            swarm.forget_exited(&name);
            if let Some(index) = peers.iter().position(|p| p.name.as_deref() == Some(name.as_str())) {
                peers[index].name = None;
                pending.push((index, now + config.restart_after));
            }
        }
        // The partition.
        if partition_times.is_none() && now >= config.partition_at {
            let mut side: Vec<usize> = (0..config.peers).collect();
            for i in (1..side.len()).rev() {
                side.swap(i, rng.below(i + 1));
            }
            side.truncate(config.peers.div_ceil(3));
            side.sort_unstable();
            links.partition(&side);
            log(&format!(
                "{:.1} s: partition: peers {side:?} cut off",
                now.as_secs_f64()
            ));
            report.partition.0 = side;
            partition_times = Some((now.as_secs_f64(), f64::INFINITY));
        }
        if let Some((began, ended)) = &mut partition_times
            && ended.is_infinite()
            && now >= config.partition_at + config.partition_for
        {
            links.heal();
            *ended = now.as_secs_f64();
            report.partition.1 = *ended - *began;
            log(&format!("{:.1} s: the partition healed", now.as_secs_f64()));
        }
        // Kills, outside the partition's window.
        if now >= next_kill {
            if now >= partition_window.0 && now < partition_window.1 {
                next_kill = partition_window.1;
            } else {
                let candidates: Vec<usize> = (config.long_lived..config.peers)
                    .filter(|i| peers[*i].name.is_some())
                    .collect();
                if !candidates.is_empty() {
                    let index = candidates[rng.below(candidates.len())];
                    let name = peers[index].name.take().expect("a running peer");
                    swarm.kill(&name);
                    kills.push((index, now.as_secs_f64()));
                    log(&format!("{:.1} s: SIGKILL {name}", now.as_secs_f64()));
                    pending.push((index, now + config.restart_after));
                }
                next_kill = now + rng.between(config.kill_every);
            }
        }
        // Restarts.
        let due: Vec<usize> = pending.iter().filter(|(_, at)| *at <= now).map(|(i, _)| *i).collect();
        pending.retain(|(_, at)| *at > now);
        for index in due {
            peers[index].starts += 1;
            let name = format!("peer{index}-start{}", peers[index].starts);
            swarm.spawn(&name, command(&peers, index, false));
            peers[index].name = Some(name.clone());
            report.restarts.push(Restart {
                index,
                name: name.clone(),
                restarted_at: now.as_secs_f64(),
                loaded: None,
                caught_up_after: None,
                cut_short: false,
            });
            log(&format!("{:.1} s: restarted {name}", now.as_secs_f64()));
        }
        // Memory of the long-lived peers, twice a second.
        if now >= last_sample + Duration::from_millis(500) {
            last_sample = now;
            for (index, samples) in memory.iter_mut().enumerate() {
                if let Some(name) = peers[index].name.clone()
                    && let Some(kib) = resident_kib(swarm.pid(&name))
                {
                    samples.push((now.as_secs_f64(), kib));
                }
            }
        }
        swarm.pump(Duration::from_millis(100));
    }
    let end = start.elapsed().as_secs_f64();
    report.seconds = end;
    report.kills = kills.len();
    report.partition_cuts = links.cuts.load(Ordering::Relaxed);

    // Progress: the swarm's epoch over time.
    let epochs: Vec<(String, f64, u64)> = swarm
        .timed_lines("epoch ")
        .into_iter()
        .filter_map(|(name, at, line)| Some((name, since(at), epoch_of(&line)?)))
        .collect();
    let mut increases = Vec::new();
    let mut top = 0;
    for (_, at, epoch) in &epochs {
        if *epoch > top {
            top = *epoch;
            increases.push((*at, *epoch));
        }
    }
    let swarm_epoch_at = |t: f64| {
        increases
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, e)| *e)
    };
    report.epochs = (swarm_epoch_at(0.0), top);
    let in_phase: Vec<f64> = increases.iter().map(|(at, _)| *at).filter(|at| *at > 0.0).collect();
    let mut gaps: Vec<(f64, f64)> = Vec::new();
    let mut previous = 0.0;
    for at in in_phase.iter().copied().chain(std::iter::once(end)) {
        gaps.push((at - previous, previous));
        previous = at;
    }
    // An epoch-time is the phase's mean: epochs take longer while peers rejoin or the swarm is split.
    let advanced = report.epochs.1.saturating_sub(report.epochs.0);
    report.epoch_time = if advanced == 0 { 0.0 } else { end / advanced as f64 };
    report.longest_stall = gaps
        .iter()
        .copied()
        .fold((0.0, 0.0), |best, gap| if gap.0 > best.0 { gap } else { best });

    // Restarts: loaded the state, then trained within two epochs of the swarm.
    let loads = swarm.timed_lines("loaded the swarm's state at epoch ");
    for restart in &mut report.restarts {
        restart.loaded = loads
            .iter()
            .find(|(name, _, _)| *name == restart.name)
            .and_then(|(_, _, epoch)| epoch.parse().ok());
        restart.caught_up_after = epochs
            .iter()
            .filter(|(name, _, _)| *name == restart.name)
            .find(|(_, at, epoch)| epoch + 2 >= swarm_epoch_at(*at))
            .map(|(_, at, _)| at - restart.restarted_at);
        let next_kill = kills
            .iter()
            .find(|(index, at)| *index == restart.index && *at > restart.restarted_at)
            .map(|(_, at)| *at);
        let window_end = restart.restarted_at + config.catch_up_within.as_secs_f64();
        restart.cut_short = restart.caught_up_after.is_none() && next_kill.unwrap_or(end).min(end) < window_end;
        if restart
            .caught_up_after
            .is_some_and(|after| after > config.catch_up_within.as_secs_f64())
        {
            restart.caught_up_after = None;
        }
    }

    // State rounds: the members of one group hold the same parameters right after it.
    let state: Vec<(String, StateReport)> = swarm
        .timed_lines("state round of epoch ")
        .into_iter()
        .filter_map(|(name, at, line)| Some((name, parse_state(since(at), &line)?)))
        .collect();
    report.state_rounds_failed = state.iter().filter(|(_, s)| s.peers.is_none()).count();
    // Each group's members, as they reported it: (peer, group size, digest).
    let mut groups: BTreeMap<(u64, String), Vec<MemberReport>> = BTreeMap::new();
    for (name, s) in &state {
        if let Some(group) = &s.group {
            groups
                .entry((s.epoch, group.clone()))
                .or_default()
                .push((name, s.peers, s.digest.as_deref(), s.at));
        }
    }
    for ((epoch, group), members) in &groups {
        let averaged: Vec<_> = members.iter().filter(|m| m.1.is_some()).collect();
        let Some(first) = averaged.first() else {
            continue;
        };
        let size = first.1.unwrap_or(0);
        let digests: HashSet<Option<&str>> = averaged.iter().map(|m| m.2).collect();
        if digests.len() > 1 || averaged.iter().any(|m| m.1 != first.1) || members.len() > size {
            report.state_rounds_disagreeing.push(format!(
                "state round of epoch {epoch} in group {group} ({:.1} s): its members reported {:?}",
                first.3,
                members.iter().map(|m| (m.0, m.1, m.2)).collect::<Vec<_>>()
            ));
        } else if averaged.len() == size {
            report.state_rounds_agreed += 1;
        } else {
            report.state_rounds_incomplete += 1;
        }
    }

    report.panics = swarm.lines_containing("panicked");
    // Every line of every peer, for a closer look: COLONY_SOAK_LOG=FILE.
    if let Some(path) = std::env::var_os("COLONY_SOAK_LOG") {
        swarm.dump(Path::new(&path), start)?;
    }
    let warm_up = config.warm_up.as_secs_f64();
    for (index, samples) in memory.iter().enumerate() {
        let after: Vec<u64> = samples
            .iter()
            .filter(|(at, _)| *at >= warm_up)
            .map(|(_, kib)| *kib)
            .collect();
        if let (Some(first), Some(last)) = (after.first(), after.last()) {
            report.memory.push(Memory {
                index,
                baseline_kib: *first,
                min_kib: after.iter().copied().min().unwrap_or(*first),
                max_kib: after.iter().copied().max().unwrap_or(*first),
                end_kib: *last,
                trend: samples
                    .iter()
                    .scan(f64::NEG_INFINITY, |next, sample| {
                        Some(if sample.0 >= *next {
                            *next = sample.0 + 10.0;
                            Some(*sample)
                        } else {
                            None
                        })
                    })
                    .flatten()
                    .collect(),
            });
        }
    }
    drop(swarm);
    runtime.shutdown_background();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(report)
}

/// The epoch of an `epoch N: …` line (without the prefix).
fn epoch_of(line: &str) -> Option<u64> {
    line.split(':').next()?.trim().parse().ok()
}

/// A `state round of epoch E: averaged by N peers[ in group G][, parameters D]` or `…: failed[ in group G]`
/// line (without the prefix).
fn parse_state(at: f64, line: &str) -> Option<StateReport> {
    let (epoch, rest) = line.split_once(':')?;
    let epoch = epoch.trim().parse().ok()?;
    let rest = rest.trim();
    let group = rest
        .split_once(" in group ")
        .map(|(_, g)| g.split(',').next().unwrap_or(g).trim().to_owned());
    let digest = rest.split_once(", parameters ").map(|(_, d)| d.trim().to_owned());
    let peers = if rest.starts_with("failed") {
        None
    } else {
        let (peers, _) = rest.strip_prefix("averaged by ")?.split_once(" peers")?;
        Some(peers.trim().parse().ok()?)
    };
    Some(StateReport {
        at,
        epoch,
        peers,
        group,
        digest,
    })
}

/// A fresh scratch directory for the identities.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "colony-soak-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_lines_parse() {
        let s = parse_state(1.0, "12: averaged by 8 peers, parameters 00ff00ff00ff00ff").unwrap();
        assert_eq!(
            (s.epoch, s.peers, s.digest.as_deref()),
            (12, Some(8), Some("00ff00ff00ff00ff"))
        );
        let s = parse_state(1.0, "3: averaged by 2 peers").unwrap();
        assert_eq!((s.epoch, s.peers, s.digest), (3, Some(2), None));
        let s = parse_state(1.0, "4: failed").unwrap();
        assert_eq!((s.epoch, s.peers), (4, None));
        assert!(parse_state(1.0, "x: failed").is_none());
    }

    #[test]
    fn memory_deviation_is_relative_to_the_baseline() {
        let m = Memory {
            index: 0,
            baseline_kib: 100,
            min_kib: 95,
            max_kib: 108,
            end_kib: 100,
            trend: Vec::new(),
        };
        assert!((m.deviation() - 0.08).abs() < 1e-9);
    }
}
