//! Three `colony node` processes on loopback, over tcp and over quic: they find each other through the
//! first; a SIGKILLed one is dropped by the others within the failure detection time; restarted with the
//! same identity file it rejoins; SIGTERM leaves gracefully and exits with success.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use colony_transports::Keypair;

/// Fast failure detection for the test: 300 ms probes, 1 s suspicion; the failure detection time is four
/// probe periods plus the suspicion time (`SwimConfig::failure_detection_time`).
const PROBE_MS: u64 = 300;
const SUSPECT_MS: u64 = 1000;
const DETECTION: Duration = Duration::from_millis(4 * PROBE_MS + SUSPECT_MS);

/// A running node; killed when dropped so a failed test leaves no process behind.
struct Node {
    child: Child,
    address: String,
    lines: Receiver<String>,
    /// Lines read but not matched yet (events of different peers may come in any order).
    unmatched: std::cell::RefCell<Vec<String>>,
}

impl Node {
    fn start(transport: &str, identity: &Path, initial: Option<&str>) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_colony"));
        command
            .args([
                "node",
                "--listen",
                "127.0.0.1:0",
                "--transport",
                transport,
                "--identity",
            ])
            .arg(identity)
            .args(["--probe-period-ms", &PROBE_MS.to_string()])
            .args(["--suspect-timeout-ms", &SUSPECT_MS.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(initial) = initial {
            command.args(["--initial-peer", initial]);
        }
        let mut child = command.spawn().expect("colony node starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let address = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the node prints its address");
        Node {
            child,
            address,
            lines,
            unmatched: Default::default(),
        }
    }

    /// Waits for a line equal to `want` or starting with `want ` (events carry role and address after the
    /// peer id).
    fn expect_line(&self, want: &str, within: Duration) -> Duration {
        let start = Instant::now();
        let matches = |line: &str| line == want || line.starts_with(&format!("{want} "));
        let mut unmatched = self.unmatched.borrow_mut();
        if let Some(index) = unmatched.iter().position(|line| matches(line)) {
            unmatched.remove(index);
            return Duration::ZERO;
        }
        loop {
            let left = within.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return start.elapsed(),
                Ok(line) => unmatched.push(line),
                Err(RecvTimeoutError::Timeout) => panic!("{}: no '{want}' within {within:?}", self.address),
                Err(RecvTimeoutError::Disconnected) => panic!("{}: exited before '{want}'", self.address),
            }
        }
    }

    /// Sends `signal` (`-TERM`, `-INT`) with the system's `kill` command.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "{} did not exit within {within:?}",
                self.address
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn three_nodes_find_each_other_drop_a_killed_one_and_take_it_back(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<_> = (0..3).map(|i| dir.path().join(format!("node-{i}.key"))).collect();
    for key in &keys {
        Keypair::generate().save(key).unwrap();
    }
    let ids: Vec<String> = keys
        .iter()
        .map(|k| Keypair::load(k).unwrap().peer_id().to_string())
        .collect();
    let join = Duration::from_secs(20);

    let a = Node::start(transport, &keys[0], None);
    assert!(
        a.address.starts_with(&format!("{transport}://127.0.0.1:")),
        "{}",
        a.address
    );
    assert!(a.address.ends_with(&format!("/p/{}", ids[0])), "{}", a.address);
    let b = Node::start(transport, &keys[1], Some(&a.address));
    let c = Node::start(transport, &keys[2], Some(&a.address));
    for (node, others) in [(&a, [1, 2]), (&b, [0, 2]), (&c, [0, 1])] {
        for other in others {
            node.expect_line(&format!("joined {}", ids[other]), join);
        }
    }

    let mut c = c;
    c.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    a.expect_line(&format!("left {}", ids[2]), DETECTION);
    let dropped_a = killed.elapsed();
    b.expect_line(&format!("left {}", ids[2]), DETECTION.saturating_sub(dropped_a));
    let dropped_b = killed.elapsed();
    println!(
        "{transport}: a SIGKILLed node was dropped after {dropped_a:?} and {dropped_b:?} (failure detection time {DETECTION:?})"
    );
    drop(c);

    let c = Node::start(transport, &keys[2], Some(&b.address));
    a.expect_line(&format!("joined {}", ids[2]), join);
    b.expect_line(&format!("joined {}", ids[2]), join);
    c.expect_line(&format!("joined {}", ids[0]), join);

    // SIGTERM leaves gracefully: the others see it go at once, and the process exits with success.
    c.signal("-TERM");
    a.expect_line(&format!("left {}", ids[2]), DETECTION);
    assert!(c.wait_exit(Duration::from_secs(10)).success());
    for node in [a, b] {
        node.signal("-INT");
        assert!(node.wait_exit(Duration::from_secs(10)).success());
    }
}

#[test]
fn three_tcp_nodes() {
    three_nodes_find_each_other_drop_a_killed_one_and_take_it_back("tcp");
}

#[test]
fn three_quic_nodes() {
    three_nodes_find_each_other_drop_a_killed_one_and_take_it_back("quic");
}
