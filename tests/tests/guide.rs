//! The multi-machine guide's one-machine commands (`docs/operations.md`, "On one machine"), run as written in
//! separate processes on loopback: a bootstrap `colony node`, two listening trainers and a client-mode
//! trainer form a working swarm, and `colony status` sees it. The commands are read from the guide itself,
//! so the guide cannot drift from what works. Two substitutions only: `./target/release/X` is the binary
//! `cargo test` built (this test's profile), and `--watch` becomes `--json` so that the test can read one
//! answer; the `cargo build` line is skipped (the binaries are built).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use colony_tests::processes::{Processes, workspace_binary};

/// How long a peer gets to print a line (a loaded 2-core machine, debug-profile binaries).
const WAIT: Duration = Duration::from_secs(180);

/// The shell commands of the guide's "On one machine" block, comments and blank lines left out.
fn guide_commands() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let guide = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let section = guide
        .split("### On one machine")
        .nth(1)
        .expect("the guide has an 'On one machine' section");
    let block = section
        .split("```sh")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a sh block");
    block
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A guide command as a process: the program mapped to the built binary, `BOOT_ID` replaced by the
/// bootstrap peer's id.
fn command(line: &str, boot_id: Option<&str>, dir: &std::path::Path) -> (String, Command) {
    let line = match boot_id {
        Some(id) => line.replace("BOOT_ID", id),
        None => line.to_owned(),
    };
    let mut words = line.split_whitespace();
    let program = words.next().expect("a command");
    let binary = match program {
        "./target/release/colony" => workspace_binary("colony", "colony"),
        "./target/release/trainer" => workspace_binary("colony-examples", "trainer"),
        other => panic!("the guide runs {other}, which this test does not know"),
    };
    let mut command = Command::new(binary);
    let args: Vec<String> = words
        .map(|w| if w == "--watch" { "--json".into() } else { w.to_owned() })
        .collect();
    command.args(&args).current_dir(dir).env("RUST_LOG", "warn");
    let name = format!("{program} {}", args.first().map(String::as_str).unwrap_or_default());
    (name, command)
}

#[test]
fn the_guides_one_machine_commands_give_a_working_three_peer_swarm() {
    let commands = guide_commands();
    assert!(
        commands.first().is_some_and(|c| c.starts_with("cargo build")),
        "the block starts with the build: {commands:?}"
    );
    let [node, trainers @ .., status] = &commands[1..] else {
        panic!("the block: the build, a node, trainers, status; got {commands:?}");
    };
    assert_eq!(trainers.len(), 3, "three trainers in the guide: {trainers:?}");
    let dir = std::env::temp_dir().join(format!("colony-guide-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let mut swarm = Processes::default();

    let (_, node_command) = command(node, None, &dir);
    swarm.spawn("node", node_command);
    // Its first line is its address, `tcp://127.0.0.1:4000/p/ID`.
    let address = swarm.wait_for_line("node", "tcp://", WAIT);
    let boot_id = address
        .rsplit("/p/")
        .next()
        .expect("an address with a peer id")
        .to_owned();

    for (index, line) in trainers.iter().enumerate() {
        let (_, trainer) = command(line, Some(&boot_id), &dir);
        swarm.spawn(&format!("trainer{index}"), trainer);
    }
    // A working swarm: every trainer ends epochs, and the rounds average (no trainer alone).
    for index in 0..trainers.len() {
        swarm.wait_for(&format!("trainer{index}"), "epoch ", WAIT, "three epochs", |lines| {
            lines.len() >= 3
        });
    }

    let (_, status_command) = command(status, Some(&boot_id), &dir);
    swarm.spawn("status", status_command);
    let json = swarm.wait_for_line("status", "{", WAIT);
    let snapshot: serde_json::Value =
        serde_json::from_str(&format!("{{{json}")).unwrap_or_else(|e| panic!("status printed {json}: {e}"));
    let members = &snapshot["members"];
    // The bootstrap node is a member with the trainer role (it publishes no progress).
    assert_eq!(members["trainer"], 3, "two listening trainers and the node: {snapshot}");
    assert_eq!(members["client"], 1, "one client-mode trainer: {snapshot}");
    assert_eq!(
        snapshot["peers_with_progress"], 3,
        "three trainers publish progress: {snapshot}"
    );
    assert!(
        snapshot["epoch"].as_u64().is_some_and(|e| e >= 2),
        "the swarm's epoch: {snapshot}"
    );
    drop(swarm);
    let _ = std::fs::remove_dir_all(&dir);
}
