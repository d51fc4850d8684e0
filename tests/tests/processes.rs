//! Peers as separate processes over TCP on loopback: a trainer killed with SIGKILL and restarted loads the
//! swarm's state and trains on at the swarm's epoch; `colony node --auxiliary` learns the run's schema from
//! the trainers and reduces in their gradient rounds, then leaves on SIGTERM.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use colony_tests::processes::{Processes, SMALL_TASK, workspace_binary};

/// How long a peer gets to print its address, or the swarm to show a change (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(120);

/// Swarms of processes share the machine's two cores: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A trainer of the small task, listening on a free loopback port.
fn trainer(index: u64, initial_peer: Option<&str>, identity: Option<&PathBuf>) -> Command {
    let mut command = Command::new(workspace_binary("colony-examples", "trainer"));
    command
        .args(["--listen", "tcp://127.0.0.1:0"])
        .arg(format!("--shuffle-seed={}", 100 + index))
        .args(SMALL_TASK)
        .env("RUST_LOG", "warn");
    if let Some(peer) = initial_peer {
        command.args(["--initial-peer", peer]);
    }
    if let Some(path) = identity {
        command.arg("--identity").arg(path);
    }
    command
}

/// The epochs a trainer reported (`epoch N: …` lines).
fn epochs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|line| line.split(':').next()?.trim().parse().ok())
        .collect()
}

/// A scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("colony-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

#[test]
fn a_killed_trainer_restarts_loads_the_state_and_trains_at_the_swarms_epoch() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let identity = scratch("restart").join("trainer2.key");
    let mut swarm = Processes::default();
    swarm.spawn("trainer0", trainer(0, None, None));
    let bootstrap = swarm.wait_for_line("trainer0", "listening on ", WAIT);
    swarm.spawn("trainer1", trainer(1, Some(&bootstrap), None));
    swarm.spawn("trainer2", trainer(2, Some(&bootstrap), Some(&identity)));
    swarm.wait_for("trainer2", "epoch ", WAIT, "three epochs", |lines| {
        epochs(lines).last().is_some_and(|e| *e >= 3)
    });

    // SIGKILL: no goodbye; the others notice through failure detection and train on.
    swarm.kill("trainer2");
    let before = epochs(&swarm.lines_of("trainer0", "epoch "))
        .last()
        .copied()
        .unwrap_or(0);
    swarm.wait_for("trainer0", "epoch ", WAIT, "two epochs without trainer2", |lines| {
        epochs(lines).last().is_some_and(|e| *e >= before + 2)
    });

    // The same identity in a new process: it joins, loads the state the swarm reached, and trains on.
    let at_restart = epochs(&swarm.lines_of("trainer0", "epoch "))
        .last()
        .copied()
        .unwrap_or(0);
    swarm.spawn("trainer2-restarted", trainer(2, Some(&bootstrap), Some(&identity)));
    let loaded = swarm.wait_for_line("trainer2-restarted", "loaded the swarm's state at epoch ", WAIT);
    let loaded: u64 = loaded.parse().unwrap_or_else(|_| panic!("a loaded epoch: {loaded}"));
    assert!(
        loaded >= at_restart,
        "the restarted trainer loaded epoch {loaded}, the swarm was at {at_restart}"
    );
    let trained = swarm.wait_for(
        "trainer2-restarted",
        "epoch ",
        WAIT,
        "two epochs after loading",
        |lines| epochs(lines).iter().filter(|e| **e > loaded).count() >= 2,
    );
    // At the swarm's epoch: within two epochs (a few hundred milliseconds here) of the peers that never
    // stopped, as their lines reached this test.
    let mine = *epochs(&trained).last().expect("epochs");
    let theirs = ["trainer0", "trainer1"]
        .map(|name| epochs(&swarm.lines_of(name, "epoch ")).last().copied().unwrap_or(0))
        .into_iter()
        .max()
        .expect("two trainers");
    assert!(
        mine.abs_diff(theirs) <= 2,
        "the restarted trainer is at epoch {mine}, the swarm at {theirs}; output:\n{}",
        swarm.tail()
    );
    drop(swarm);
    let _ = std::fs::remove_dir_all(identity.parent().expect("the scratch directory"));
}

#[test]
fn colony_node_auxiliary_reduces_in_the_trainers_rounds_and_leaves_on_sigterm() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The auxiliary peer's round timings, as the trainers' (its model and target come from them).
    let config = scratch("auxiliary").join("auxiliary.toml");
    std::fs::write(
        &config,
        "[optimizer]\nmatchmaking_time = 1.0\nrequest_timeout = 0.3\naveraging_timeout = 5.0\nnext_chunk_timeout = 2.0\n",
    )
    .expect("writing the configuration");
    let mut swarm = Processes::default();
    swarm.spawn("trainer0", trainer(0, None, None));
    let bootstrap = swarm.wait_for_line("trainer0", "listening on ", WAIT);
    swarm.spawn("trainer1", trainer(1, Some(&bootstrap), None));
    let mut auxiliary = Command::new(workspace_binary("colony", "colony"));
    auxiliary
        .args([
            "node",
            "--auxiliary",
            "--listen",
            "tcp://127.0.0.1:0",
            "--run-id",
            "colony-example",
        ])
        .args(["--initial-peer", &bootstrap])
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn");
    swarm.spawn("auxiliary", auxiliary);
    let schema = swarm.wait_for_line("auxiliary", "auxiliary for ", WAIT);
    assert!(schema.ends_with("target 2048"), "the schema line: {schema}");
    swarm.wait_for(
        "auxiliary",
        "epoch ",
        WAIT,
        "three rounds reduced with both trainers",
        |lines| lines.iter().filter(|l| l.ends_with("reduced with 3 peers")).count() >= 3,
    );
    let status = swarm.terminate("auxiliary", Duration::from_secs(30));
    assert!(status.success(), "colony node --auxiliary exited with {status}");
    // The trainers go on without it.
    let before = epochs(&swarm.lines_of("trainer0", "epoch "))
        .last()
        .copied()
        .unwrap_or(0);
    swarm.wait_for(
        "trainer0",
        "epoch ",
        WAIT,
        "an epoch after the auxiliary left",
        |lines| epochs(lines).last().is_some_and(|e| *e > before),
    );
}
