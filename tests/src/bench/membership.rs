//! `bench -- membership`: how fast a swarm on the in-process `mem` transport (no link emulation) converges, what
//! a peer costs in memory, and how fast a published record becomes visible on every peer.
//!
//! - `converge`: a bootstrap peer, then `peers - 1` peers joining through it, started concurrently in batches;
//!   each publishes one `progress` record (8 bytes) under its own peer subkey right after it started. Timed
//!   from the moment the last peer finished starting until every peer lists every other peer and holds every
//!   record, polled every 50 ms with a deadline, so that a swarm that does not converge ends the benchmark
//!   with how far it got instead of hanging.
//! - `rss/peer`: the process's resident memory after convergence minus before the swarm started, per peer.
//! - `visible`: on a fresh, converged swarm of 64 peers, one peer (a different one each time) publishes a new
//!   value of its record; timed until the last peer's subscription delivers it.
//!
//! All peers run in this process, on the default `SwimConfig` and `MembershipConfig` timings: what is
//! measured is the protocol's own cost and latency, with the machine's CPUs shared by every peer. The bounds
//! are the goals of the issue that asked for this suite (no faster implementation is at hand to run beside
//! it), so `ratio < 1` means the goal is met.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use colony::membership::{Membership, MembershipConfig, MembershipEvent};
use colony::records::{Schemas, Subkey, View};
use colony_transports::mem::MemHub;
use colony_transports::{Address, Keypair, PeerId};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::task::JoinSet;

use super::Measurement;

const SUITE: &str = "membership";
const RUN: &str = "membership-bench";
const KEY: &str = "progress";
/// The goals: 1,000 peers converge within 10 s, cost under 1 MiB each, and a record is visible on 64
/// peers within 50 ms.
const CONVERGE_GOAL_S: f64 = 10.0;
const RSS_GOAL_MIB: f64 = 1.0;
const VISIBLE_GOAL_MS: f64 = 50.0;
const VISIBLE_PEERS: usize = 64;
/// Peers started at once; each join is a dial and one request to the bootstrap peer.
const START_BATCH: usize = 50;
const POLL: Duration = Duration::from_millis(50);
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);
const VISIBLE_DEADLINE: Duration = Duration::from_secs(10);
/// How long the converged swarm's CPU use is measured for.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// Longest wait for the previous case's swarm to wind down.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// How often progress goes to standard error while a large swarm starts and converges.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Long enough that no record expires during a run.
const RECORD_LIFETIME_S: f64 = 3600.0;

/// Runs the suite: `peers` peers for `converge` and `rss/peer`, `repeat` publishes for `visible`, only the
/// case named `only` when given (`converge` and `rss/peer` come from the same swarm, so either runs both).
pub async fn run(peers: usize, repeat: usize, only: Option<&str>) -> anyhow::Result<Vec<Measurement>> {
    if peers < 2 {
        bail!("the membership suite needs at least 2 peers, not {peers}");
    }
    let wanted = |names: &[&str]| only.is_none_or(|only| names.contains(&only));
    if !wanted(&["converge", "rss/peer", "visible"]) {
        bail!("the membership suite has the cases converge, rss/peer and visible, not {only:?}");
    }
    let mut results = Vec::new();
    if wanted(&["converge", "rss/peer"]) {
        results.extend(converge(peers).await.context("case converge")?);
    }
    if wanted(&["visible"]) {
        // The shut-down swarm's tasks and connections wind down first, so that they do not slow this case.
        settle().await?;
        results.push(visible(VISIBLE_PEERS, repeat).await.context("case visible")?);
    }
    Ok(results)
}

fn schemas() -> Schemas {
    let mut schemas = Schemas::default();
    schemas.register_with(KEY, |value| {
        if value.len() == 8 {
            Ok(())
        } else {
            Err(format!("8 bytes expected, got {}", value.len()))
        }
    });
    schemas
}

fn publish(peer: &Membership, value: u64) -> anyhow::Result<()> {
    let expiration = peer.replica().now() + RECORD_LIFETIME_S;
    peer.publish(
        KEY,
        Some(Subkey::Peer(peer.local_peer())),
        Some(Bytes::copy_from_slice(&value.to_le_bytes())),
        expiration,
    )
    .with_context(|| format!("peer {} publishing its own record", peer.local_peer().short()))?;
    Ok(())
}

fn progress_entries(peer: &Membership) -> usize {
    match peer.get(KEY) {
        Some(View::Dictionary { entries, .. }) => entries.len(),
        _ => 0,
    }
}

/// Peers on one in-process hub.
struct Swarm {
    peers: Vec<Membership>,
    /// How long starting every peer took.
    start_time: Duration,
    /// Peers that could not start (an overloaded bootstrap peer times joins out), with the first error.
    failed: usize,
    first_failure: Option<String>,
}

impl Swarm {
    /// Starts a bootstrap peer, then `n - 1` peers joining through it, `START_BATCH` at a time; each
    /// publishes its record once started. A peer that fails to join is counted, not fatal: the swarm is
    /// then measured without it and the note says so.
    async fn start(name: &str, n: usize) -> anyhow::Result<Self> {
        let hub = MemHub::new();
        let started = Instant::now();
        let bootstrap = start_peer(&hub, name, 0, None).await?;
        let address = bootstrap.address().context("the bootstrap peer listens")?;
        let mut swarm = Self {
            peers: vec![bootstrap],
            start_time: Duration::ZERO,
            failed: 0,
            first_failure: None,
        };
        let mut index = 1;
        let mut reported = Instant::now();
        while index < n {
            let batch = START_BATCH.min(n - index);
            let mut starting = JoinSet::new();
            for i in index..index + batch {
                let (hub, name, address) = (hub.clone(), name.to_owned(), address.clone());
                starting.spawn(async move { start_peer(&hub, &name, i, Some(address)).await });
            }
            while let Some(peer) = starting.join_next().await {
                match peer.context("a starting peer panicked")? {
                    Ok(peer) => swarm.peers.push(peer),
                    Err(error) => {
                        swarm.failed += 1;
                        swarm.first_failure.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            index += batch;
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                eprintln!(
                    "{name}: {} of {n} peers started after {:.1} s ({} failed)",
                    swarm.peers.len(),
                    started.elapsed().as_secs_f64(),
                    swarm.failed
                );
            }
        }
        swarm.start_time = started.elapsed();
        Ok(swarm)
    }

    fn describe_start(&self) -> String {
        let mut text = format!(
            "started in {:.1} s ({START_BATCH} at a time)",
            self.start_time.as_secs_f64()
        );
        if let Some(error) = &self.first_failure {
            text += &format!(
                ", {} peers FAILED to join and are left out (first error: {error})",
                self.failed
            );
        }
        text
    }

    fn connections(&self) -> usize {
        self.peers.iter().map(Membership::connections).sum()
    }

    /// The peers running (a peer that failed to join may still be listed by some until it is found dead).
    fn ids(&self) -> HashSet<PeerId> {
        self.peers.iter().map(Membership::local_peer).collect()
    }

    /// Whether every peer lists every other and holds every record (reads every peer's full view).
    fn converged(&self, ids: &HashSet<PeerId>) -> bool {
        let n = self.peers.len();
        self.peers.iter().all(|peer| {
            let members = peer.members().iter().filter(|m| ids.contains(&m.peer)).count();
            members == n - 1 && progress_entries(peer) == n
        })
    }

    /// Polls every peer's view until the swarm converged or `deadline` passed; the time it took, if it did.
    async fn wait_converged(&self, deadline: Duration) -> (Option<Duration>, Progress) {
        let started = Instant::now();
        let ids = self.ids();
        let mut watches: Vec<Watch> = self.peers.iter().map(|peer| Watch::new(peer, &ids)).collect();
        let n = self.peers.len();
        let mut reported = Duration::ZERO;
        loop {
            let now = started.elapsed();
            for watch in &mut watches {
                watch.observe(now, &ids);
            }
            // The cheap views (member events, record count) say when to confirm with full reads.
            if watches.iter().all(Watch::done) && self.converged(&ids) {
                return (Some(started.elapsed()), Progress::of(&watches));
            }
            if now >= deadline {
                return (None, Progress::of(&watches));
            }
            if now >= reported + PROGRESS_EVERY {
                reported = now;
                eprintln!(
                    "after {:.1} s: {}",
                    now.as_secs_f64(),
                    Progress::of(&watches).describe(n)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn shutdown(&self) {
        for peer in &self.peers {
            peer.shutdown();
        }
    }
}

async fn start_peer(hub: &MemHub, name: &str, index: usize, initial: Option<Address>) -> anyhow::Result<Membership> {
    let listen: Address = format!("mem://{name}-{index}").parse()?;
    let mut config = MembershipConfig::new(RUN, Some(listen));
    config.initial_peers = initial.into_iter().collect();
    let keypair = Arc::new(Keypair::generate());
    let transport = hub.transport(&keypair);
    let peer = Membership::start(config, keypair, transport, schemas())
        .await
        .with_context(|| format!("starting peer {index}"))?;
    publish(&peer, index as u64)?;
    Ok(peer)
}

/// One peer's view, followed cheaply: its member list from its events (no copy of the list per poll) and its
/// record count; with the first time each was complete.
struct Watch {
    peer: Membership,
    events: Receiver<MembershipEvent>,
    members: HashSet<PeerId>,
    members_complete: bool,
    records_complete: bool,
    members_first: Option<Duration>,
    records_first: Option<Duration>,
    /// Members this peer saw leave; nobody leaves in this benchmark, so each is a false failure detection.
    departures: usize,
}

impl Watch {
    fn new(peer: &Membership, ids: &HashSet<PeerId>) -> Self {
        // Subscribe before the snapshot: an event after the snapshot is then applied on top of it, and one
        // that the snapshot already shows changes nothing.
        let events = peer.events();
        let members = Self::running_members(peer, ids);
        Self {
            peer: peer.clone(),
            events,
            members,
            members_complete: false,
            records_complete: false,
            members_first: None,
            records_first: None,
            departures: 0,
        }
    }

    fn running_members(peer: &Membership, ids: &HashSet<PeerId>) -> HashSet<PeerId> {
        peer.members()
            .into_iter()
            .map(|m| m.peer)
            .filter(|p| ids.contains(p))
            .collect()
    }

    fn observe(&mut self, now: Duration, ids: &HashSet<PeerId>) {
        let n = ids.len();
        loop {
            match self.events.try_recv() {
                Ok(MembershipEvent::Joined(info)) if ids.contains(&info.peer) => {
                    self.members.insert(info.peer);
                }
                Ok(MembershipEvent::Left(peer)) if ids.contains(&peer) => {
                    self.departures += 1;
                    self.members.remove(&peer);
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(_)) => {
                    self.events = self.events.resubscribe();
                    self.members = Self::running_members(&self.peer, ids);
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.members_complete = self.members.len() == n - 1;
        // Every record of this benchmark is one `progress` entry, so the store's size counts them.
        self.records_complete = self.peer.replica().len() == n;
        if self.members_complete {
            self.members_first.get_or_insert(now);
        }
        if self.records_complete {
            self.records_first.get_or_insert(now);
        }
    }

    fn done(&self) -> bool {
        self.members_complete && self.records_complete
    }
}

/// How far a swarm got: peers complete now, and when the last peer was first complete.
struct Progress {
    members_complete: usize,
    records_complete: usize,
    members_last: Option<Duration>,
    records_last: Option<Duration>,
    fewest_members: usize,
    fewest_records: usize,
    departures: usize,
}

impl Progress {
    fn of(watches: &[Watch]) -> Self {
        let last = |first: fn(&Watch) -> Option<Duration>| {
            watches
                .iter()
                .map(first)
                .try_fold(Duration::ZERO, |last, at| at.map(|at| last.max(at)))
        };
        Self {
            members_complete: watches.iter().filter(|w| w.members_complete).count(),
            records_complete: watches.iter().filter(|w| w.records_complete).count(),
            members_last: last(|w| w.members_first),
            records_last: last(|w| w.records_first),
            fewest_members: watches.iter().map(|w| w.members.len()).min().unwrap_or(0),
            fewest_records: watches.iter().map(|w| w.peer.replica().len()).min().unwrap_or(0),
            departures: watches.iter().map(|w| w.departures).sum(),
        }
    }

    fn describe(&self, n: usize) -> String {
        let secs = |at: Option<Duration>| at.map_or("never".to_owned(), |at| format!("{:.1} s", at.as_secs_f64()));
        format!(
            "all members seen by every peer at {}, all records at {}; now {}/{n} peers list {} members (fewest \
             {}), {}/{n} hold {n} records (fewest {}); {} false departures seen",
            secs(self.members_last),
            secs(self.records_last),
            self.members_complete,
            n - 1,
            self.fewest_members,
            self.records_complete,
            self.fewest_records,
            self.departures,
        )
    }
}

/// CPU time used so far by this process's threads, seconds (from each thread's `schedstat`, in nanoseconds).
fn cpu_seconds() -> anyhow::Result<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        // A thread that ended between the listing and the read used no further time.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(nanos as f64 / 1e9)
}

/// Waits until this process is nearly idle (under a tenth of a core over half a second), at most `SETTLE_MAX`.
async fn settle() -> anyhow::Result<()> {
    let window = Duration::from_millis(500);
    let started = Instant::now();
    while started.elapsed() < SETTLE_MAX {
        let before = cpu_seconds()?;
        tokio::time::sleep(window).await;
        if cpu_seconds()? - before < 0.1 * window.as_secs_f64() {
            break;
        }
    }
    Ok(())
}

/// The resident memory of this process, bytes.
fn resident_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line in /proc/self/status")?;
    Ok(kib * 1024)
}

fn config_note() -> String {
    let config = MembershipConfig::new(RUN, None);
    let swim = &config.swim;
    format!(
        "default config: probe {:?}/rtt {:?}, gossip {:?} x{}, {} transmissions, sync {:?}, pool {} connections",
        swim.probe_period,
        swim.probe_rtt,
        swim.gossip_interval,
        swim.gossip_fanout,
        swim.max_transmissions,
        config.sync_interval,
        config.pool.max_connections,
    )
}

async fn converge(n: usize) -> anyhow::Result<Vec<Measurement>> {
    let rss_before = resident_bytes()?;
    let swarm = Swarm::start("converge", n).await?;
    let (converged, progress) = swarm.wait_converged(CONVERGE_DEADLINE).await;
    let rss_after = resident_bytes()?;
    // What the swarm costs when nothing changes: SWIM probes and gossip, anti-entropy exchanges.
    let cpu_before = cpu_seconds()?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cores = (cpu_seconds()? - cpu_before) / IDLE_WINDOW.as_secs_f64();
    let running = swarm.peers.len();
    let connections = swarm.connections();
    let sum = |count: fn(&Membership) -> u64| swarm.peers.iter().map(count).sum::<u64>();
    let sent = sum(|p| p.counters().datagrams_sent.get());
    let unreachable = sum(|p| p.counters().datagrams_unreachable.get());
    let refused = sum(|p| p.replica().counters().refused_total());
    let start = swarm.describe_start();
    swarm.shutdown();

    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let mib_per_peer = mib(rss_after.saturating_sub(rss_before)) / running as f64;
    let (value, outcome) = match converged {
        Some(elapsed) => (elapsed.as_secs_f64(), "converged".to_owned()),
        None => (
            CONVERGE_DEADLINE.as_secs_f64(),
            format!("NOT converged within {CONVERGE_DEADLINE:?} (value is the deadline)"),
        ),
    };
    let converge = Measurement::new(SUITE, "converge", value, "s", CONVERGE_GOAL_S)
        .bound_case("issue goal")
        .note(format!(
            "{running} peers on mem, {outcome}, timed from the last start; {start}; {}; {sent} SWIM packets sent, \
             {unreachable} unreachable, {refused} records refused; afterwards the swarm used {idle_cores:.2} of {} \
             CPU cores over {IDLE_WINDOW:?}; {}",
            progress.describe(running),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            config_note(),
        ));
    let rss = Measurement::new(SUITE, "rss/peer", mib_per_peer, "MiB", RSS_GOAL_MIB)
        .bound_case("issue goal")
        .note(format!(
            "resident {:.0} MiB before the swarm, {:.0} MiB after {}, {running} peers; {connections} open \
             connections ({:.0} per peer)",
            mib(rss_before),
            mib(rss_after),
            if converged.is_some() {
                "convergence"
            } else {
                "the deadline"
            },
            connections as f64 / running as f64,
        ));
    Ok(vec![converge, rss])
}

async fn visible(n: usize, repeat: usize) -> anyhow::Result<Measurement> {
    let swarm = Swarm::start("visible", n).await?;
    if let Some(error) = &swarm.first_failure {
        swarm.shutdown();
        bail!("{} of {n} peers failed to join: {error}", swarm.failed);
    }
    let (converged, progress) = swarm.wait_converged(CONVERGE_DEADLINE).await;
    if converged.is_none() {
        swarm.shutdown();
        bail!(
            "{n} peers did not converge within {CONVERGE_DEADLINE:?}: {}",
            progress.describe(n)
        );
    }
    let mut last_arrivals = Vec::with_capacity(repeat);
    let mut median_arrivals = Vec::with_capacity(repeat);
    let mut missed = 0;
    for round in 0..repeat {
        // A different publisher each round: the publishing limits allow each slot only a few updates per second.
        let publisher = &swarm.peers[(round * 7 + 1) % n];
        let owner = Subkey::Peer(publisher.local_peer());
        let value = Bytes::copy_from_slice(&(1_000_000 + round as u64).to_le_bytes());
        let mut waiting = JoinSet::new();
        for peer in &swarm.peers {
            let mut changes = peer.subscribe(KEY);
            let (owner, value) = (owner.clone(), value.clone());
            waiting.spawn(async move {
                loop {
                    let change = changes.next().await.ok()?;
                    if change.subkey.as_ref() == Some(&owner) && change.value.as_ref() == Some(&value) {
                        return Some(Instant::now());
                    }
                }
            });
        }
        let published = Instant::now();
        publish(publisher, 1_000_000 + round as u64)?;
        let mut arrivals = Vec::with_capacity(n);
        let _ = tokio::time::timeout(VISIBLE_DEADLINE, async {
            while let Some(arrival) = waiting.join_next().await {
                if let Ok(Some(at)) = arrival {
                    arrivals.push(at - published);
                }
            }
        })
        .await;
        waiting.abort_all();
        if arrivals.len() < n {
            missed += n - arrivals.len();
            continue;
        }
        arrivals.sort();
        median_arrivals.push(arrivals[n / 2]);
        last_arrivals.push(arrivals[n - 1]);
    }
    swarm.shutdown();

    if last_arrivals.is_empty() {
        bail!("no publish reached all {n} peers within {VISIBLE_DEADLINE:?} in {repeat} tries");
    }
    last_arrivals.sort();
    median_arrivals.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let middle = |all: &[Duration]| ms(all[all.len() / 2]);
    let complete = last_arrivals.len();
    Ok(
        Measurement::new(SUITE, "visible", middle(&last_arrivals), "ms", VISIBLE_GOAL_MS)
            .bound_case("issue goal")
            .note(format!(
                "{n} peers on mem, converged first; until the last peer's subscription saw the new value: median \
                 of {complete} publishes {:.1} ms, best {:.1} ms, max {:.1} ms; half the peers by {:.1} ms \
                 (median); {missed} arrivals missed the {VISIBLE_DEADLINE:?} deadline; {}",
                middle(&last_arrivals),
                ms(last_arrivals[0]),
                ms(last_arrivals[complete - 1]),
                middle(&median_arrivals),
                config_note(),
            )),
    )
}
