//! `colony status` against a running swarm: a bare member as the bootstrap peer (what `colony node` runs)
//! and three training peers joined through it, in this process over TCP on loopback (two listening trainers
//! and one client-mode trainer), observed by the real `colony` binary. The printed epoch,
//! members by role and peers must be the swarm's, in the table and in JSON; `--watch --json` follows the
//! swarm while it trains on and leaves gracefully on Ctrl-C; the observer never publishes progress; a wrong
//! run id and an unreachable peer are clear errors with a non-zero exit.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use colony::membership::{Membership, MembershipConfig, Role};
use colony::optimizer::CollaborativeOptions;
use colony::peer::{TrainingPeer, start_training_peer};
use colony::progress::{LocalProgress, PROGRESS_KEY, parse_records};
use colony_averaging::tensor::TensorInfo;
use colony_offload::OptimizerConfig;
use colony_transports::{Address, Keypair, PeerId, Scheme};

const RUN: &str = "status-test";
const TARGET: u64 = 48;
const BATCH: u32 = 8;
const PARAMS: usize = 8;

fn options() -> CollaborativeOptions {
    let mut options = CollaborativeOptions::new(TARGET, OptimizerConfig::sgd(0.1, 0.0, PARAMS));
    options.matchmaking_time = Duration::from_secs(1);
    options.request_timeout = Duration::from_millis(300);
    options.averaging_timeout = Duration::from_secs(5);
    options.next_chunk_timeout = Some(Duration::from_secs(2));
    options.load_state_timeout = Duration::from_secs(20);
    options.min_refresh_period = Duration::from_millis(20);
    options.max_refresh_period = Duration::from_millis(200);
    options
}

struct Peer {
    inner: TrainingPeer,
    params: Vec<f32>,
    grads: Vec<f32>,
}

/// A peer of the run: listening on a free loopback port (or in client mode with `listen = false`),
/// joining through `bootstrap`.
async fn peer(listen: bool, bootstrap: Option<&Address>) -> Peer {
    let address = listen.then(|| "tcp://127.0.0.1:0".parse::<Address>().unwrap());
    let mut config = MembershipConfig::new(RUN, address);
    config.initial_peers = bootstrap.cloned().into_iter().collect();
    config.bootstrap_timeout = Duration::from_secs(20);
    let tensors = vec![TensorInfo::new("w", [PARAMS])];
    let initial = vec![0.0f32; PARAMS];
    let inner = start_training_peer(config, Keypair::generate(), None, tensors, &initial, options())
        .await
        .expect("a training peer starts");
    Peer {
        inner,
        params: initial,
        grads: vec![0.0; PARAMS],
    }
}

/// Whether `peer`'s own progress record (in its replica, where a publish lands first) is at its local epoch.
fn published_its_epoch(peer: &Peer) -> bool {
    let me = peer.inner.membership.local_peer();
    let epoch = peer.inner.optimizer.local_epoch();
    records(peer).iter().any(|r| r.peer == me && r.epoch == epoch)
}

/// Trains until the local epoch reaches `epoch` and the peer's progress record says so: the gradient of
/// `½‖w − centre‖²` in batches of [`BATCH`] every 20 ms. (A peer that reached the epoch by loading the
/// swarm's state publishes it only once it reports samples again, as Hivemind's peers do.)
async fn train_until(mut peer: Peer, centre: f32, epoch: u64, timeout: Duration) -> Peer {
    let start = Instant::now();
    while peer.inner.optimizer.local_epoch() < epoch || !published_its_epoch(&peer) {
        assert!(
            start.elapsed() < timeout,
            "epoch {epoch} did not come within {timeout:?}"
        );
        for (g, w) in peer.grads.iter_mut().zip(&peer.params) {
            *g = w - centre;
        }
        peer.inner
            .optimizer
            .step(&mut peer.params, &mut peer.grads, Some(BATCH))
            .await
            .expect("a step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peer
}

/// Trains the three peers concurrently until each is at `epoch`.
async fn train_all(peers: Vec<Peer>, epoch: u64) -> Vec<Peer> {
    let tasks: Vec<_> = peers
        .into_iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(train_until(p, i as f32, epoch, Duration::from_secs(60))))
        .collect();
    let mut peers = Vec::new();
    for task in tasks {
        peers.push(task.await.expect("a training task"));
    }
    peers
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn records(peer: &Peer) -> Vec<LocalProgress> {
    replica_records(&peer.inner.membership)
}

fn replica_records(membership: &Membership) -> Vec<LocalProgress> {
    parse_records(membership.get(PROGRESS_KEY).as_ref())
}

/// A member that trains nothing, as `colony node` runs it: the run's bootstrap peer.
async fn bare_member() -> Membership {
    let keypair = Keypair::generate();
    let transport = colony::peer::transport_for(Scheme::Tcp, &keypair).unwrap();
    let config = MembershipConfig::new(RUN, Some("tcp://127.0.0.1:0".parse().unwrap()));
    Membership::start(config, Arc::new(keypair), transport, colony::peer::training_schemas())
        .await
        .expect("the bootstrap member starts")
}

fn colony() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_colony"));
    command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `colony status ARGS` to completion within `timeout` (killed and failed past it).
async fn status(args: &[&str], timeout: Duration) -> Output {
    let mut child = colony().arg("status").args(args).spawn().expect("colony status starts");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for colony status") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("colony status {args:?} did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn drain(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        bytes
    })
}

/// A child process killed when dropped, so that a failed test leaves none behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the swarm is, read from the first peer's replica: the epoch (the largest of peers not in client
/// mode) and the peers with their client mode.
fn expected_epoch(records: &[LocalProgress]) -> u64 {
    records
        .iter()
        .filter(|r| !r.client_mode)
        .map(|r| r.epoch)
        .max()
        .unwrap()
}

/// The table's summary line `label VALUE...`.
fn summary<'a>(table: &'a str, label: &str) -> &'a str {
    table
        .lines()
        .find_map(|line| line.strip_prefix(label).map(str::trim))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{table}"))
}

fn check_json(json: &serde_json::Value, epoch: u64, bootstrap: PeerId, ids: &[(PeerId, &str, bool)]) {
    assert_eq!(json["run_id"], RUN, "{json}");
    assert_eq!(json["epoch"], epoch, "{json}");
    assert_eq!(json["target_batch_size"], TARGET, "{json}");
    assert!(json["samples_accumulated"].as_u64().unwrap() <= TARGET, "{json}");
    assert_eq!(json["members"]["trainer"], 3, "{json}");
    assert_eq!(json["members"]["client"], 1, "{json}");
    assert_eq!(json["members"]["auxiliary"], 0, "{json}");
    assert_eq!(json["peers_with_progress"], 3, "{json}");
    let peers = json["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 4, "{json}");
    let bare = peers
        .iter()
        .find(|p| p["peer"] == bootstrap.to_string())
        .unwrap_or_else(|| panic!("no row for the bootstrap peer: {json}"));
    assert_eq!(bare["role"], "trainer", "{json}");
    assert!(
        bare["address"].as_str().unwrap().starts_with("tcp://127.0.0.1:"),
        "{json}"
    );
    assert!(bare["epoch"].is_null() && bare["client_mode"].is_null(), "{json}");
    for (id, role, client_mode) in ids {
        let row = peers
            .iter()
            .find(|p| p["peer"] == id.to_string())
            .unwrap_or_else(|| panic!("no row for {id}: {json}"));
        assert_eq!(row["role"], *role, "{json}");
        assert_eq!(row["client_mode"], *client_mode, "{json}");
        assert!(row["last_seen_seconds"].as_f64().unwrap() >= 0.0, "{json}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_swarm_in_a_table_and_in_json_and_follows_it_with_watch() {
    let bootstrap = bare_member().await;
    let bootstrap_id = bootstrap.local_peer();
    let address = bootstrap.address().unwrap();
    let first = peer(true, Some(&address)).await;
    let second = peer(true, Some(&address)).await;
    let client = peer(false, Some(&address)).await;
    let ids = [
        (first.inner.membership.local_peer(), "trainer", false),
        (second.inner.membership.local_peer(), "trainer", false),
        (client.inner.membership.local_peer(), "client", true),
    ];
    let mut peers = vec![first, second, client];
    wait_until("the swarm formed", Duration::from_secs(20), || {
        bootstrap.members().len() == 3 && peers.iter().all(|p| p.inner.membership.members().len() == 3)
    })
    .await;

    // Train to epoch 3, then stop: nobody steps, so the swarm's epoch stays where it is.
    peers = train_all(peers, 3).await;
    let known: Vec<PeerId> = ids.iter().map(|(id, ..)| *id).collect();
    // The observer copies the records of the peer it joins through.
    let settled = |peers: &[Peer]| {
        let records = replica_records(&bootstrap);
        records.len() == 3
            && peers.iter().all(|p| {
                records
                    .iter()
                    .any(|r| r.peer == p.inner.membership.local_peer() && r.epoch == p.inner.optimizer.local_epoch())
            })
    };
    let start = Instant::now();
    while !settled(&peers) {
        let locals: Vec<(PeerId, u64)> = peers
            .iter()
            .map(|p| (p.inner.membership.local_peer(), p.inner.optimizer.local_epoch()))
            .collect();
        let seen: Vec<(PeerId, u64)> = replica_records(&bootstrap).iter().map(|r| (r.peer, r.epoch)).collect();
        let own: Vec<String> = peers
            .iter()
            .map(|p| {
                let me = p.inner.membership.local_peer();
                let tracker = p.inner.optimizer.tracker();
                format!(
                    "{me:?}: tracker local {:?} global {} own record {:?}",
                    (tracker.local().epoch, tracker.local().samples_accumulated),
                    tracker.global().epoch,
                    records(p).iter().find(|r| r.peer == me).map(|r| r.epoch)
                )
            })
            .collect();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the bootstrap peer does not hold every peer's record at its epoch: local epochs {locals:?}, records {seen:?}; {own:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let epoch = expected_epoch(&replica_records(&bootstrap));
    assert!(epoch >= 3, "epoch {epoch}");
    let address = address.to_string();

    // JSON.
    let output = status(
        &["--initial-peer", &address, "--run-id", RUN, "--json"],
        Duration::from_secs(30),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the output is JSON");
    check_json(&json, epoch, bootstrap_id, &ids);

    // The observer left (every member dropped it), and published nothing.
    let only_the_swarm = |peers: &[Peer]| {
        bootstrap.members().len() == 3 && peers.iter().all(|p| p.inner.membership.members().len() == 3)
    };
    wait_until("the observer left", Duration::from_secs(5), || only_the_swarm(&peers)).await;
    assert!(replica_records(&bootstrap).iter().all(|r| known.contains(&r.peer)));

    // The table.
    let output = status(&["--initial-peer", &address, "--run-id", RUN], Duration::from_secs(30)).await;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("{table}");
    assert_eq!(summary(&table, "epoch"), epoch.to_string(), "{table}");
    // Nobody stepped since the JSON was printed: the same samples.
    let samples = json["samples_accumulated"].as_u64().unwrap();
    assert_eq!(
        summary(&table, "samples"),
        format!("{samples} / {TARGET} ({:.1} %)", samples as f64 * 100.0 / TARGET as f64),
        "{table}"
    );
    assert_eq!(
        summary(&table, "members"),
        "3 trainer, 1 client, 0 auxiliary; 3 with progress",
        "{table}"
    );
    for ((id, role, client_mode), peer) in ids.iter().zip(&peers) {
        let row: Vec<&str> = table
            .lines()
            .find(|line| line.starts_with(&id.short()))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[1], *role, "{table}");
        assert_eq!(row[2], peer.inner.optimizer.local_epoch().to_string(), "{table}");
        assert_eq!(*row.last().unwrap(), if *client_mode { "yes" } else { "no" }, "{table}");
    }
    let rows = table.lines().skip_while(|l| !l.starts_with("PEER")).skip(1).count();
    assert_eq!(rows, 4, "{table}");
    let bare: Vec<&str> = table
        .lines()
        .find(|line| line.starts_with(&bootstrap_id.short()))
        .unwrap_or_else(|| panic!("no row for the bootstrap peer:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(bare[1..], ["trainer", "-", "-", "-", "-", "-"], "{table}");

    wait_until("the observer left", Duration::from_secs(5), || only_the_swarm(&peers)).await;
    assert!(replica_records(&bootstrap).iter().all(|r| known.contains(&r.peer)));

    // --watch --json while the swarm trains on to epoch + 2.
    let mut watch = Guard(
        colony()
            .args([
                "status",
                "--initial-peer",
                &address,
                "--run-id",
                RUN,
                "--watch",
                "--json",
            ])
            .args(["--interval", "0.2"])
            .spawn()
            .expect("colony status --watch starts"),
    );
    let lines = lines_of(watch.0.stdout.take().unwrap());
    let first_line = next_line(&lines, Duration::from_secs(30)).await;
    let json: serde_json::Value = serde_json::from_str(&first_line).expect("JSON per line");
    check_json(&json, epoch, bootstrap_id, &ids);
    // The observer is a client-mode member that publishes no progress: the trainers, which count the peers
    // of a round from the progress records of live members, do not count it.
    wait_until("the observer is a member", Duration::from_secs(10), || {
        bootstrap
            .members()
            .iter()
            .any(|m| m.role == Role::Client && !known.contains(&m.peer))
    })
    .await;
    let target = epoch + 2;
    peers = train_all(peers, target).await;
    assert!(
        records(&peers[0]).iter().all(|r| known.contains(&r.peer)),
        "the observer published progress"
    );
    let mut seen = epoch;
    let start = Instant::now();
    while seen < target {
        let remaining = Duration::from_secs(30).saturating_sub(start.elapsed());
        let line = next_line(&lines, remaining).await;
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON per line");
        let now = json["epoch"].as_u64().unwrap();
        assert!(
            now >= seen && now <= target,
            "epoch {now} after {seen} (target {target})"
        );
        seen = now;
    }
    // Ctrl-C: the observer leaves gracefully (the others drop it at once, not after failure detection, about
    // 7 s with the default SWIM timing) and exits with success.
    let pid = watch.0.id().to_string();
    let signalled = Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
    assert!(signalled.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = watch.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "status --watch did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    wait_until("the observer left at once", Duration::from_secs(4), || {
        only_the_swarm(&peers)
    })
    .await;

    // Another run's name: refused by the peer, with its reason.
    let output = status(
        &["--initial-peer", &address, "--run-id", "another-run", "--timeout", "5"],
        Duration::from_secs(30),
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot observe run 'another-run'")
            && stderr.contains(&format!("this peer serves run '{RUN}', not 'another-run'")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    assert_eq!(stderr.matches("this peer serves run").count(), 1, "said once: {stderr}");

    for mut p in peers {
        p.inner.optimizer.shutdown().await;
        p.inner.membership.leave().await;
    }
    bootstrap.leave().await;
}

/// No peer at the address: a clear error within --timeout and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_an_error_within_the_timeout() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let address = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let output = status(&["--initial-peer", &address, "--timeout", "1"], Duration::from_secs(20)).await;
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot observe run 'colony': could not join the swarm within 1s; tried tcp://127.0.0.1:"),
        "{stderr}"
    );
}

fn lines_of(stdout: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(lines: &Receiver<String>, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        match lines.try_recv() {
            Ok(line) => return line,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                assert!(
                    start.elapsed() < timeout,
                    "no line from status --watch within {timeout:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => panic!("status --watch exited"),
        }
    }
}
