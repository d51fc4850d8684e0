//! Issue 6's Prometheus criterion: a real Prometheus, started on loopback with a scrape configuration for
//! three local training peers (processes of the example trainer with `--metrics-address`), sees through its
//! HTTP query API that the epoch advanced on all three and that a round-duration histogram has
//! observations. It also checks a few of the runtime's own series end to end (peers by role, bytes by
//! protocol, matchmaking and all-reduce durations).
//!
//! Prometheus comes from the distribution's packages (`.ci/run` installs it and sets
//! `COLONY_REQUIRE_PROMETHEUS=1`). Without a `prometheus` on `PATH` the test prints a notice and passes, so
//! that `cargo test --workspace` works on a fresh laptop, unless `COLONY_REQUIRE_PROMETHEUS` is set.
//!
//! The trainer binary is the one `cargo test --workspace` builds beside this test's binary
//! ([`colony_tests::processes::workspace_binary`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use colony_tests::processes::{Processes, SMALL_TASK, free_port, workspace_binary};

/// The epoch gauge every peer exports.
const EPOCH_METRIC: &str = "colony_epoch";
/// The round-duration histogram (its `_count` series).
const ROUND_HISTOGRAM_COUNT: &str = "colony_round_seconds_count";
/// Peers of the swarm.
const PEERS: usize = 3;
/// How long the swarm and Prometheus get to show everything (a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(180);
/// How long a peer gets to print its addresses.
const STARTUP: Duration = Duration::from_secs(60);

/// `prometheus` on `PATH`.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Starts one trainer; returns its swarm address (`listening on …`) and its metrics address.
fn start_trainer(
    swarm: &mut Processes,
    trainer: &Path,
    index: usize,
    initial_peer: Option<&str>,
) -> (String, SocketAddr) {
    let name = format!("trainer{index}");
    let mut command = Command::new(trainer);
    command
        .args(["--listen", "tcp://127.0.0.1:0", "--metrics-address", "127.0.0.1:0"])
        .arg(format!("--shuffle-seed={}", 100 + index))
        .args(SMALL_TASK)
        .env("RUST_LOG", "warn");
    if let Some(peer) = initial_peer {
        command.args(["--initial-peer", peer]);
    }
    swarm.spawn(&name, command);
    let metrics = swarm.wait_for_line(&name, "Prometheus metrics on http://", STARTUP);
    let metrics: SocketAddr = metrics
        .trim_end_matches("/metrics")
        .parse()
        .unwrap_or_else(|error| panic!("{name}'s metrics address '{metrics}': {error}"));
    let address = swarm.wait_for_line(&name, "listening on ", STARTUP);
    (address, metrics)
}

/// An HTTP/1.0 GET on loopback (1.0: the body ends with the connection, never chunked); status and body.
fn http_get(address: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {target} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(16 << 20).read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// An instant query: each result series' `instance` label (or its labels) and value.
fn query(prometheus: SocketAddr, promql: &str) -> Result<BTreeMap<String, f64>, String> {
    let (status, body) =
        http_get(prometheus, &format!("/api/v1/query?query={}", encode(promql))).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if json["status"] != "success" {
        return Err(format!("query failed: {body}"));
    }
    let results = json["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("no result list: {body}"))?;
    results
        .iter()
        .map(|series| {
            let labels = &series["metric"];
            let key = labels["instance"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| labels.to_string());
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("no value in {series}"))?;
            Ok((key, value))
        })
        .collect()
}

/// Starts Prometheus scraping `targets` every second; returns its API address once it is ready.
fn start_prometheus(swarm: &mut Processes, binary: &Path, dir: &Path, targets: &[SocketAddr]) -> SocketAddr {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: colony\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .expect("writing prometheus.yml");
    // The free port may be taken between our check and Prometheus's bind: then it exits, and we retry.
    for attempt in 0..3 {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("an address");
        let name = format!("prometheus{attempt}");
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join(format!("data{attempt}")).display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn");
        let child = swarm.spawn(&name, command);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok((200, _)) = http_get(address, "/-/ready") {
                return address;
            }
            if child.try_wait().expect("polling prometheus").is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("prometheus did not become ready on {address}; retrying");
    }
    panic!("prometheus did not start; its output:\n{}", swarm.tail());
}

#[test]
fn prometheus_sees_three_training_peers() {
    let Some(prometheus) = find_on_path("prometheus") else {
        let required = std::env::var_os("COLONY_REQUIRE_PROMETHEUS").is_some_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "COLONY_REQUIRE_PROMETHEUS is set but no `prometheus` is on PATH (install the distribution's \
             `prometheus` package)"
        );
        eprintln!(
            "NOTICE: skipping the Prometheus integration test: no `prometheus` on PATH (install the \
             distribution's `prometheus` package, or set COLONY_REQUIRE_PROMETHEUS=1 to make this a failure)"
        );
        return;
    };
    let trainer = workspace_binary("colony-examples", "trainer");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut swarm = Processes::default();

    let (first, first_metrics) = start_trainer(&mut swarm, &trainer, 0, None);
    let mut targets = vec![first_metrics];
    for index in 1..PEERS {
        let (_, metrics) = start_trainer(&mut swarm, &trainer, index, Some(&first));
        targets.push(metrics);
    }
    let api = start_prometheus(&mut swarm, &prometheus, dir.path(), &targets);

    // What must hold, each as (what, PromQL, condition on the result by instance).
    type Check = (&'static str, String, Box<dyn Fn(&BTreeMap<String, f64>) -> bool>);
    let checks: Vec<Check> = vec![
        (
            "every peer is scraped",
            "up == 1".to_owned(),
            Box::new(|r| r.len() == PEERS),
        ),
        (
            "the epoch advanced on every peer",
            format!("max_over_time({EPOCH_METRIC}[10m]) - min_over_time({EPOCH_METRIC}[10m]) >= 1"),
            Box::new(|r| r.len() == PEERS),
        ),
        (
            "a round-duration histogram has observations",
            format!("sum({ROUND_HISTOGRAM_COUNT})"),
            Box::new(|r| r.values().any(|&v| v > 0.0)),
        ),
        (
            "every peer sees the other two as trainers",
            "colony_peers{role=\"trainer\"} == 2".to_owned(),
            Box::new(|r| r.len() == PEERS),
        ),
        (
            "all-reduce bytes are counted by transport and protocol",
            "sum(colony_bytes_sent_total{transport=\"tcp\",protocol=\"allreduce\"}) > 0 and \
             sum(colony_bytes_received_total{transport=\"tcp\",protocol=\"allreduce\"}) > 0"
                .to_owned(),
            Box::new(|r| !r.is_empty()),
        ),
        (
            "matchmaking found groups and all-reduces finished",
            "sum(colony_matchmaking_seconds_count{outcome=\"found\"}) > 0 and sum(colony_allreduce_seconds_count) > 0"
                .to_owned(),
            Box::new(|r| !r.is_empty()),
        ),
    ];

    let started = Instant::now();
    let mut last: HashMap<&str, Result<BTreeMap<String, f64>, String>> = HashMap::new();
    loop {
        for (what, promql, _) in &checks {
            last.insert(what, query(api, promql));
        }
        let missing: Vec<&str> = checks
            .iter()
            .filter(|(what, _, holds)| !matches!(&last[what], Ok(result) if holds(result)))
            .map(|(what, _, _)| *what)
            .collect();
        if missing.is_empty() {
            eprintln!("Prometheus saw everything after {:.1?}", started.elapsed());
            break;
        }
        if let Some((name, status)) = swarm.exited() {
            panic!("{name} exited early ({status}); output:\n{}", swarm.tail());
        }
        if started.elapsed() > DEADLINE {
            let report: Vec<String> = checks
                .iter()
                .map(|(what, promql, _)| format!("{what}: {promql} -> {:?}", last[what]))
                .collect();
            panic!(
                "within {DEADLINE:?}, Prometheus did not see: {missing:?}\nlast answers:\n{}\noutput:\n{}",
                report.join("\n"),
                swarm.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
