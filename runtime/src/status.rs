//! `colony status`: the state of a run's swarm, read from its records by an observer.
//!
//! The observer joins the run through an initial peer as a client-mode member (it listens nowhere, so no
//! peer ever dials it), holds a replica of the run's records like every member, and reads the peers'
//! progress records from it. It publishes nothing: trainers count the peers of a round from the progress
//! records of live members, so a member without a record (this observer) is invisible to them. It leaves
//! the swarm gracefully when done, so the others drop it at once.
//!
//! What it shows is a [`SwarmSnapshot`], computed by [`snapshot`] from the records, the member list and the
//! time — a pure function, like its two renderings [`render_table`] and [`render_json`]:
//!
//! - the swarm's epoch, samples accumulated at it against the target batch size (each progress record
//!   carries its peer's target), the total rate and the ETA of the epoch, all as the trainers' own estimate
//!   ([`crate::progress::estimate`]) computes them;
//! - the members by role, and the peers that publish progress;
//! - one row per peer: role, epoch, samples, samples/s, how long ago its record was written, client mode.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_transports::{Address, Keypair, PeerId, Scheme};
use serde::Serialize;

use crate::membership::{MemberInfo, Membership, MembershipConfig, MembershipError, Role};
use crate::progress::{LocalProgress, PROGRESS_KEY, ProgressConfig, estimate, parse_records};
use crate::records::Time;

/// How often the observer looks for the first progress records while it waits for them.
const RECORDS_POLL: Duration = Duration::from_millis(50);

/// How long the observer waits at most, once it has records, for their peers to appear in its member list
/// (gossip brings a member within a probe period or two).
const MEMBERS_SETTLE: Duration = Duration::from_secs(3);

/// The longest `--interval` or `--timeout` accepted, seconds (a day).
const MAX_SECONDS: f64 = 86_400.0;

/// The transport to dial initial peers given as `HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DialTransport {
    /// TCP (LAN).
    Tcp,
    /// QUIC (WAN).
    Quic,
}

/// `colony status`: the flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// A peer of the run to join through: its full address as it printed it (`tcp://HOST:PORT/p/PEER`), or
    /// `HOST:PORT` with --transport. Repeat for several; the first that answers is used.
    #[arg(long = "initial-peer", required = true)]
    pub initial_peers: Vec<String>,
    /// The run to observe.
    #[arg(long, default_value = "colony")]
    pub run_id: String,
    /// Refresh in place every --interval until Ctrl-C (with --json: one object per line per refresh).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two refreshes with --watch.
    #[arg(long, default_value = "2", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Print one JSON object (per refresh with --watch) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds to join the swarm and receive its progress records.
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    pub timeout: Duration,
    /// The transport for initial peers given without a scheme.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: DialTransport,
}

/// Reads a number of seconds: finite, above zero and at most a day.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS) {
        return Err(format!("{seconds} s must be above 0 and at most {MAX_SECONDS} s"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Why `colony status` could not show the swarm. The cause, where there is one, is the error's
/// [`source`](std::error::Error::source) (`colony` prints the chain: `cannot observe run 'a': could not join
/// the swarm within 10s; tried ...`).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No initial peer was given.
    #[error("no initial peer: pass --initial-peer with the address a peer of the run printed")]
    NoInitialPeer,
    /// An initial peer's address does not parse or names no network transport.
    #[error("--initial-peer {address}: {reason}")]
    Address {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The initial peers use different transports (one observer dials with one).
    #[error("the initial peers use both {first} and {second}; give peers of one transport")]
    MixedTransports {
        /// The first peer's scheme.
        first: Scheme,
        /// Another peer's scheme.
        second: Scheme,
    },
    /// Joining the run failed: no initial peer answered, one refused (another run, a clock too far off).
    #[error("cannot observe run '{run_id}'")]
    Join {
        /// The run.
        run_id: String,
        /// Why membership could not join.
        #[source]
        source: MembershipError,
    },
    /// The signal handlers could not be installed.
    #[error("cannot handle Ctrl-C and SIGTERM")]
    Signals(#[source] std::io::Error),
    /// Writing the output failed (a closed pipe).
    #[error("writing the status")]
    Output(#[from] std::io::Error),
}

/// Members of the swarm by role, as the observer sees them (itself not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoleCounts {
    /// Listening peers that train (a bare `colony node` is one too, with no progress record).
    pub trainer: usize,
    /// Client-mode peers (behind NAT; they dial out only).
    pub client: usize,
    /// Auxiliary peers (average for others, train nothing).
    pub auxiliary: usize,
}

/// One peer of the swarm: a member, a peer with a progress record, or both.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    /// Its full peer id.
    pub peer: String,
    /// Its membership role; `None` when it has a progress record but is not a member (it left or crashed
    /// and its record has not expired yet, or its membership has not reached the observer yet).
    pub role: Option<String>,
    /// Where it listens (`None` for client-mode members and non-members).
    pub address: Option<String>,
    /// The epoch of its progress record (`None`: no record, it does not train).
    pub epoch: Option<u64>,
    /// Samples it accumulated at that epoch.
    pub samples_accumulated: Option<u64>,
    /// Its measured rate, samples per second.
    pub samples_per_second: Option<f64>,
    /// Seconds since it wrote its record, by the observer's clock.
    pub last_seen_seconds: Option<f64>,
    /// Whether it trains in client mode (its epoch does not move the swarm's).
    pub client_mode: Option<bool>,
}

/// The swarm's state at one moment, as `colony status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwarmSnapshot {
    /// The run.
    pub run_id: String,
    /// When it was taken, seconds since the Unix epoch (the run's clock).
    pub time: Time,
    /// The swarm's epoch: the largest epoch of the peers not in client mode (of all peers, when every one
    /// is in client mode); 0 with no record.
    pub epoch: u64,
    /// Samples the peers at that epoch reported.
    pub samples_accumulated: u64,
    /// Samples an epoch needs: the target most peers' records carry (`None` with no record).
    pub target_batch_size: Option<u64>,
    /// Other targets that some peers carry: a misconfigured run (empty when all agree).
    pub conflicting_targets: Vec<u64>,
    /// The peers' rates summed, samples per second.
    pub samples_per_second: f64,
    /// Seconds until the swarm is expected to reach the target (`None` with no record or no rate yet).
    pub eta_seconds: Option<f64>,
    /// Members by role.
    pub members: RoleCounts,
    /// Peers with a progress record (the peers that train).
    pub peers_with_progress: usize,
    /// Every member and every peer with a progress record, by peer id.
    pub peers: Vec<PeerStatus>,
}

/// The snapshot of a swarm whose members (other than the observer) are `members` and whose progress
/// records are `records`, at `now` on the run's clock. `observer` is the observer's own id (never counted).
pub fn snapshot(
    run_id: &str,
    observer: PeerId,
    records: &[LocalProgress],
    members: &[MemberInfo],
    now: Time,
) -> SwarmSnapshot {
    let mut rows: BTreeMap<String, PeerStatus> = BTreeMap::new();
    let mut roles = RoleCounts::default();
    for member in members.iter().filter(|m| m.peer != observer) {
        match member.role {
            Role::Trainer => roles.trainer += 1,
            Role::Client => roles.client += 1,
            Role::Auxiliary => roles.auxiliary += 1,
        }
        rows.insert(
            member.peer.to_string(),
            PeerStatus {
                peer: member.peer.to_string(),
                role: Some(member.role.to_string()),
                address: member.address.as_ref().map(ToString::to_string),
                epoch: None,
                samples_accumulated: None,
                samples_per_second: None,
                last_seen_seconds: None,
                client_mode: None,
            },
        );
    }
    let records: Vec<LocalProgress> = records.iter().filter(|r| r.peer != observer).copied().collect();
    for record in &records {
        let row = rows.entry(record.peer.to_string()).or_insert_with(|| PeerStatus {
            peer: record.peer.to_string(),
            role: None,
            address: None,
            epoch: None,
            samples_accumulated: None,
            samples_per_second: None,
            last_seen_seconds: None,
            client_mode: None,
        });
        row.epoch = Some(record.epoch);
        row.samples_accumulated = Some(record.samples_accumulated);
        row.samples_per_second = Some(record.samples_per_second);
        row.last_seen_seconds = Some((now - record.time).max(0.0));
        row.client_mode = Some(record.client_mode);
    }

    // The target most records carry (ties: the larger), and the others.
    let mut targets: BTreeMap<u64, usize> = BTreeMap::new();
    for record in &records {
        *targets.entry(record.target_batch_size).or_default() += 1;
    }
    let target = targets
        .iter()
        .max_by_key(|(target, count)| (**count, **target))
        .map(|(target, _)| *target);
    let conflicting_targets: Vec<u64> = targets.keys().copied().filter(|t| Some(*t) != target).collect();

    let samples_per_second: f64 = records.iter().map(|r| r.samples_per_second).sum();
    let (epoch, samples_accumulated, eta_seconds) = if records.is_empty() {
        (0, 0, None)
    } else {
        // The observer is no peer: it stands at the epoch of a swarm made only of clients (whose epochs
        // the estimate does not follow), and below any epoch otherwise.
        let all_clients = records.iter().all(|r| r.client_mode);
        let observer_epoch = if all_clients {
            records.iter().map(|r| r.epoch).max().unwrap_or(0)
        } else {
            0
        };
        let standpoint = LocalProgress {
            peer: observer,
            epoch: observer_epoch,
            samples_accumulated: 0,
            samples_per_second: 0.0,
            time: now,
            client_mode: true,
            target_batch_size: target.unwrap_or(1),
        };
        let global = estimate(&records, &standpoint, now, &ProgressConfig::new(target.unwrap_or(1)));
        let eta = (samples_per_second > 0.0)
            .then(|| (global.eta_next_epoch - now).max(0.0))
            .filter(|eta| eta.is_finite());
        (global.epoch, global.samples_accumulated, eta)
    };
    SwarmSnapshot {
        run_id: run_id.to_owned(),
        time: now,
        epoch,
        samples_accumulated,
        target_batch_size: target,
        conflicting_targets,
        samples_per_second,
        eta_seconds,
        members: roles,
        peers_with_progress: records.len(),
        peers: rows.into_values().collect(),
    }
}

/// A duration for people: `0.4 s`, `42 s`, `3 min 12 s`, `5 h 07 min`.
fn human_duration(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.1} s")
    } else if seconds < 60.0 {
        format!("{seconds:.0} s")
    } else if seconds < 3600.0 {
        let whole = seconds as u64;
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        let whole = seconds as u64;
        format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
    }
}

/// The first 8 characters of a peer id (as [`PeerId::short`] prints them).
fn short(peer: &str) -> String {
    peer.chars().take(8).collect()
}

/// The snapshot as a summary and a table of peers, for people. Every line ends with a newline.
pub fn render_table(snapshot: &SwarmSnapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "run        {}", snapshot.run_id);
    let _ = writeln!(out, "epoch      {}", snapshot.epoch);
    let _ = match snapshot.target_batch_size {
        Some(target) => writeln!(
            out,
            "samples    {} / {target} ({:.1} %)",
            snapshot.samples_accumulated,
            snapshot.samples_accumulated as f64 * 100.0 / target as f64
        ),
        None => writeln!(out, "samples    {} / unknown target", snapshot.samples_accumulated),
    };
    if !snapshot.conflicting_targets.is_empty() {
        let others: Vec<String> = snapshot.conflicting_targets.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "warning    some peers use another target_batch_size: {}",
            others.join(", ")
        );
    }
    let _ = writeln!(out, "samples/s  {:.1}", snapshot.samples_per_second);
    let _ = writeln!(
        out,
        "eta        {}",
        snapshot
            .eta_seconds
            .map_or_else(|| "unknown".to_owned(), human_duration)
    );
    let roles = snapshot.members;
    let _ = writeln!(
        out,
        "members    {} trainer, {} client, {} auxiliary; {} with progress",
        roles.trainer, roles.client, roles.auxiliary, snapshot.peers_with_progress
    );
    if snapshot.peers_with_progress == 0 {
        let _ = writeln!(
            out,
            "note       no peer has published progress: nobody trains in this run yet"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8}  {:<9}  {:>8}  {:>10}  {:>10}  {:>9}  CLIENT",
        "PEER", "ROLE", "EPOCH", "SAMPLES", "SAMPLES/S", "LAST SEEN"
    );
    let dash = || "-".to_owned();
    for peer in &snapshot.peers {
        let _ = writeln!(
            out,
            "{:<8}  {:<9}  {:>8}  {:>10}  {:>10}  {:>9}  {}",
            short(&peer.peer),
            peer.role.clone().unwrap_or_else(dash),
            peer.epoch.map_or_else(dash, |e| e.to_string()),
            peer.samples_accumulated.map_or_else(dash, |s| s.to_string()),
            peer.samples_per_second.map_or_else(dash, |r| format!("{r:.1}")),
            peer.last_seen_seconds.map_or_else(dash, human_duration),
            peer.client_mode
                .map_or_else(dash, |c| if c { "yes" } else { "no" }.to_owned()),
        );
    }
    out
}

/// The snapshot as one line of JSON (no newline).
pub fn render_json(snapshot: &SwarmSnapshot) -> String {
    // A struct of strings, numbers and options: serialization cannot fail, and non-finite floats (which
    // serde_json writes as null) cannot occur in a snapshot built from validated records.
    serde_json::to_string(snapshot).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

/// Reads `--initial-peer` values: full addresses, or `HOST:PORT` with `transport`'s scheme; all of one
/// network transport.
pub fn initial_peers(values: &[String], transport: DialTransport) -> Result<Vec<Address>, StatusError> {
    if values.is_empty() {
        return Err(StatusError::NoInitialPeer);
    }
    let default_scheme = match transport {
        DialTransport::Tcp => "tcp",
        DialTransport::Quic => "quic",
    };
    let mut addresses: Vec<Address> = Vec::with_capacity(values.len());
    for value in values {
        let text = if value.contains("://") {
            value.clone()
        } else {
            format!("{default_scheme}://{value}")
        };
        let address: Address = text.parse().map_err(|e| StatusError::Address {
            address: value.clone(),
            reason: format!("{e}"),
        })?;
        if address.scheme() == Scheme::Mem {
            return Err(StatusError::Address {
                address: value.clone(),
                reason: "mem:// addresses exist only inside one process; use tcp:// or quic://".into(),
            });
        }
        if let Some(first) = addresses.first()
            && first.scheme() != address.scheme()
        {
            return Err(StatusError::MixedTransports {
                first: first.scheme(),
                second: address.scheme(),
            });
        }
        addresses.push(address);
    }
    Ok(addresses)
}

/// Observes the swarm: joins as a client-mode member, waits up to `--timeout` (from the start) for the
/// first progress records, prints the snapshot (once, or every `--interval` until Ctrl-C or SIGTERM with
/// `--watch`), and leaves. Must run inside a tokio runtime.
pub async fn run(args: StatusArgs) -> Result<(), StatusError> {
    let started = Instant::now();
    let initial_peers = initial_peers(&args.initial_peers, args.transport)?;
    let keypair = Keypair::generate();
    let observer = keypair.peer_id();
    let transport =
        crate::peer::transport_for(initial_peers[0].scheme(), &keypair).map_err(|reason| StatusError::Address {
            address: initial_peers[0].to_string(),
            reason,
        })?;
    let bootstrap_ids: Vec<PeerId> = initial_peers.iter().filter_map(Address::peer).collect();
    let mut config = MembershipConfig::new(args.run_id.clone(), None);
    config.initial_peers = initial_peers;
    config.bootstrap_timeout = args.timeout;
    config.join_attempt_timeout = config.join_attempt_timeout.min(args.timeout);
    // The observer holds the records of the run's trainers, so it validates their kinds.
    let membership = Membership::start(config, Arc::new(keypair), transport, crate::peer::training_schemas())
        .await
        .map_err(|source| StatusError::Join {
            run_id: args.run_id.clone(),
            source,
        })?;
    let result = observe(&args, &membership, observer, &bootstrap_ids, started).await;
    membership.leave().await;
    result
}

async fn observe(
    args: &StatusArgs,
    membership: &Membership,
    observer: PeerId,
    bootstrap_ids: &[PeerId],
    started: Instant,
) -> Result<(), StatusError> {
    // From here on Ctrl-C and SIGTERM end the observation, so that the observer still leaves gracefully.
    let mut interrupts = Interrupts::install().map_err(StatusError::Signals)?;
    // Joining copied the records of the peer that admitted the observer (every member holds all of them);
    // if that exchange failed, the periodic exchanges bring them within a sync interval.
    let deadline = started + args.timeout;
    while parse_records(membership.get(PROGRESS_KEY).as_ref()).is_empty() && Instant::now() < deadline {
        tokio::select! {
            () = tokio::time::sleep(RECORDS_POLL.min(deadline.saturating_duration_since(Instant::now()))) => {}
            () = interrupts.recv() => return Ok(()),
        }
    }
    // The member list arrives partly with the join (the members the admitting peer knows, not that peer
    // itself) and partly by gossip: give the peer the observer joined through, and the members whose records
    // are here, a moment to be known too, so that they are listed with their roles. A peer that crashed keeps
    // its record until it expires and never becomes a member again, hence the bound.
    let settle = deadline.min(Instant::now() + MEMBERS_SETTLE);
    loop {
        let members: HashSet<PeerId> = membership.members().into_iter().map(|m| m.peer).collect();
        let records = parse_records(membership.get(PROGRESS_KEY).as_ref());
        let admitter_known = if bootstrap_ids.is_empty() {
            !members.is_empty()
        } else {
            bootstrap_ids.iter().any(|peer| members.contains(peer))
        };
        if (admitter_known && records.iter().all(|r| members.contains(&r.peer))) || Instant::now() >= settle {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(RECORDS_POLL.min(settle.saturating_duration_since(Instant::now()))) => {}
            () = interrupts.recv() => return Ok(()),
        }
    }
    let take = || {
        let records = parse_records(membership.get(PROGRESS_KEY).as_ref());
        snapshot(
            &args.run_id,
            observer,
            &records,
            &membership.members(),
            membership.replica().now(),
        )
    };
    let print = |snapshot: &SwarmSnapshot| -> Result<(), StatusError> {
        let mut stdout = std::io::stdout().lock();
        if args.json {
            writeln!(stdout, "{}", render_json(snapshot))?;
        } else if args.watch {
            // Clear the screen and go home, then the table: a refresh in place.
            write!(stdout, "\x1b[2J\x1b[H{}", render_table(snapshot))?;
        } else {
            write!(stdout, "{}", render_table(snapshot))?;
        }
        stdout.flush()?;
        Ok(())
    };
    let first = take();
    if first.peers_with_progress == 0 {
        tracing::warn!(
            run_id = %args.run_id,
            timeout = ?args.timeout,
            "no progress record arrived: no peer of this run trains yet"
        );
    }
    match print(&first) {
        // The reader went away (`colony status | head`): nothing more to show.
        Err(StatusError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        result => result?,
    }
    if !args.watch {
        return Ok(());
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(args.interval) => match print(&take()) {
                Err(StatusError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                result => result?,
            },
            () = interrupts.recv() => return Ok(()),
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from installation on (a signal that arrives between two waits is
/// kept for the next).
struct Interrupts {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next signal (never, once the signal streams are closed).
    async fn recv(&mut self) {
        let received = tokio::select! {
            received = self.interrupt.recv() => received,
            received = self.terminate.recv() => received,
        };
        if received.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(seed: u8) -> PeerId {
        Keypair::from_seed([seed; 32]).peer_id()
    }

    fn record(seed: u8, epoch: u64, samples: u64, rate: f64, time: Time, client_mode: bool) -> LocalProgress {
        LocalProgress {
            peer: peer(seed),
            epoch,
            samples_accumulated: samples,
            samples_per_second: rate,
            time,
            client_mode,
            target_batch_size: 1000,
        }
    }

    fn member(seed: u8, role: Role) -> MemberInfo {
        MemberInfo {
            peer: peer(seed),
            role,
            address: (role != Role::Client).then(|| format!("tcp://10.0.0.{seed}:4000").parse().unwrap()),
            bandwidth_mbps: 0.0,
            generation: 1,
        }
    }

    #[test]
    fn the_snapshot_follows_the_trainers_estimate_and_lists_every_peer() {
        let observer = peer(99);
        let records = [
            record(1, 7, 300, 100.0, 99.0, false),
            record(2, 7, 200, 50.0, 100.0, false),
            // A client one epoch ahead does not move the swarm's epoch, nor count at it.
            record(3, 8, 40, 50.0, 100.0, true),
            // Behind: its rate counts, its samples do not.
            record(4, 6, 900, 0.0, 97.5, false),
            // The observer's own id is never counted (it publishes nothing; defensive).
            record(99, 50, 1, 1.0, 100.0, false),
        ];
        let members = [
            member(1, Role::Trainer),
            member(2, Role::Trainer),
            member(3, Role::Client),
            member(5, Role::Auxiliary),
            member(6, Role::Trainer),
        ];
        let snapshot = snapshot("run-a", observer, &records, &members, 100.0);
        assert_eq!(snapshot.epoch, 7);
        assert_eq!(snapshot.samples_accumulated, 500);
        assert_eq!(snapshot.target_batch_size, Some(1000));
        assert!(snapshot.conflicting_targets.is_empty());
        assert!((snapshot.samples_per_second - 200.0).abs() < 1e-9);
        // At 100: 300 + 1 s * 100 + 200 = 600 estimated; 400 left at 200 samples/s.
        let eta = snapshot.eta_seconds.unwrap();
        assert!((eta - 2.0).abs() < 1e-6, "{eta}");
        assert_eq!(
            snapshot.members,
            RoleCounts {
                trainer: 3,
                client: 1,
                auxiliary: 1
            }
        );
        assert_eq!(snapshot.peers_with_progress, 4);
        assert_eq!(snapshot.peers.len(), 6, "five members and one record of a non-member");
        let row = |seed: u8| {
            snapshot
                .peers
                .iter()
                .find(|p| p.peer == peer(seed).to_string())
                .unwrap()
        };
        assert_eq!(row(1).last_seen_seconds, Some(1.0));
        assert_eq!(row(3).client_mode, Some(true));
        assert_eq!(row(3).address, None);
        assert_eq!(row(4).role, None, "a record without membership");
        assert_eq!(row(5).epoch, None, "a member without a record");
        assert_eq!(row(5).role.as_deref(), Some("auxiliary"));
        let ids: Vec<&str> = snapshot.peers.iter().map(|p| p.peer.as_str()).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "rows by peer id");
    }

    #[test]
    fn an_empty_swarm_a_swarm_of_clients_and_disagreeing_targets() {
        let observer = peer(99);
        let empty = snapshot("run-a", observer, &[], &[member(1, Role::Trainer)], 10.0);
        assert_eq!(
            (empty.epoch, empty.target_batch_size, empty.eta_seconds),
            (0, None, None)
        );
        assert_eq!(empty.peers[0].epoch, None);
        assert!(render_table(&empty).contains("nobody trains"));

        let clients = [record(1, 4, 10, 0.0, 10.0, true), record(2, 5, 20, 0.0, 10.0, true)];
        let snapshot_of_clients = snapshot("run-a", observer, &clients, &[], 10.0);
        assert_eq!(snapshot_of_clients.epoch, 5, "with only clients, their largest epoch");
        assert_eq!(snapshot_of_clients.samples_accumulated, 20);
        assert_eq!(snapshot_of_clients.eta_seconds, None, "no rate yet");

        let mut odd = record(3, 4, 10, 1.0, 10.0, false);
        odd.target_batch_size = 64;
        let mixed = [
            record(1, 4, 10, 1.0, 10.0, false),
            record(2, 4, 10, 1.0, 10.0, false),
            odd,
        ];
        let snapshot = snapshot("run-a", observer, &mixed, &[], 10.0);
        assert_eq!(snapshot.target_batch_size, Some(1000), "the target most peers carry");
        assert_eq!(snapshot.conflicting_targets, vec![64]);
        assert!(render_table(&snapshot).contains("another target_batch_size: 64"));
    }

    #[test]
    fn the_table_and_the_json_show_the_snapshot() {
        let observer = peer(99);
        let records = [
            record(1, 12, 250, 125.5, 99.5, false),
            record(3, 12, 0, 0.0, 40.0, true),
        ];
        let members = [
            member(1, Role::Trainer),
            member(3, Role::Client),
            member(5, Role::Trainer),
        ];
        let snapshot = snapshot("run-a", observer, &records, &members, 100.0);
        let table = render_table(&snapshot);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "run        run-a");
        assert_eq!(lines[1], "epoch      12");
        assert_eq!(lines[2], "samples    250 / 1000 (25.0 %)");
        assert_eq!(lines[3], "samples/s  125.5");
        assert!(lines[4].starts_with("eta        "), "{}", lines[4]);
        assert_eq!(lines[5], "members    2 trainer, 1 client, 0 auxiliary; 2 with progress");
        assert_eq!(lines[6], "");
        assert!(lines[7].starts_with("PEER      ROLE"), "{}", lines[7]);
        assert!(lines.iter().all(|l| *l == l.trim_end()), "no trailing blanks:\n{table}");
        let row = |seed: u8| {
            let id = peer(seed).short();
            *lines.iter().find(|l| l.starts_with(&id)).unwrap()
        };
        let fields = |seed: u8| row(seed).split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let expect = |seed: u8, rest: &[&str]| {
            let mut expected = vec![peer(seed).short()];
            expected.extend(rest.iter().map(|f| (*f).to_owned()));
            assert_eq!(fields(seed), expected, "row of peer {seed}");
        };
        expect(1, &["trainer", "12", "250", "125.5", "0.5", "s", "no"]);
        expect(3, &["client", "12", "0", "0.0", "1", "min", "00", "s", "yes"]);
        expect(5, &["trainer", "-", "-", "-", "-", "-"]);

        let json: serde_json::Value = serde_json::from_str(&render_json(&snapshot)).unwrap();
        assert_eq!(json["epoch"], 12);
        assert_eq!(json["samples_accumulated"], 250);
        assert_eq!(json["target_batch_size"], 1000);
        assert_eq!(json["members"]["trainer"], 2);
        assert_eq!(json["members"]["client"], 1);
        assert_eq!(json["peers_with_progress"], 2);
        assert_eq!(json["peers"].as_array().unwrap().len(), 3);
        let client = json["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer"] == peer(3).to_string())
            .unwrap();
        assert_eq!(client["role"], "client");
        assert_eq!(client["client_mode"], true);
        assert_eq!(client["last_seen_seconds"], 60.0);
        assert!(!render_json(&snapshot).contains('\n'));
    }

    #[test]
    fn flags_are_checked() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "1e9", "soon"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        let peers = initial_peers(&["127.0.0.1:4000".into()], DialTransport::Quic).unwrap();
        assert_eq!(peers[0].scheme(), Scheme::Quic);
        assert!(matches!(
            initial_peers(&[], DialTransport::Tcp),
            Err(StatusError::NoInitialPeer)
        ));
        assert!(matches!(
            initial_peers(&["tcp://a:1".into(), "quic://b:2".into()], DialTransport::Tcp),
            Err(StatusError::MixedTransports { .. })
        ));
        let mem = initial_peers(&["mem://a".into()], DialTransport::Tcp).unwrap_err();
        assert!(mem.to_string().contains("mem://"), "{mem}");
        let garbage = initial_peers(&["tcp://".into()], DialTransport::Tcp).unwrap_err();
        assert!(garbage.to_string().starts_with("--initial-peer tcp://"), "{garbage}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(0.42), "0.4 s");
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(192.0), "3 min 12 s");
        assert_eq!(human_duration(5.0 * 3600.0 + 7.0 * 60.0), "5 h 07 min");
    }
}
