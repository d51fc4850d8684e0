//! The `colony` command as a user runs it.

use std::process::Command;

use colony_transports::Keypair;

fn colony() -> Command {
    Command::new(env!("CARGO_BIN_EXE_colony"))
}

#[test]
fn keygen_writes_a_private_key_and_prints_its_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.key");
    let output = colony().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    let keypair = Keypair::load(&path).unwrap();
    assert_eq!(printed.trim(), keypair.peer_id().to_string());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // An existing identity is not replaced by accident.
    let output = colony().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(
        message.contains("already exists") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(Keypair::load(&path).unwrap().peer_id(), keypair.peer_id());

    let output = colony()
        .args(["keygen", "--force", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_ne!(Keypair::load(&path).unwrap().peer_id(), keypair.peer_id());
}

#[test]
fn keygen_into_a_missing_folder_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-folder").join("peer.key");
    let output = colony().args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("no-such-folder"), "{message}");
}

#[test]
fn authority_keygen_and_issue_make_a_certificate_for_a_peer_and_run() {
    use colony_transports::access::Certificate;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authority.key");
    let output = colony()
        .args(["authority", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let authority = Keypair::load(&key).unwrap();
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        authority.peer_id().to_string()
    );
    let again = colony()
        .args(["authority", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let peer = Keypair::generate().peer_id();
    let cert = dir.path().join("peer.cert");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let output = colony()
        .args(["authority", "issue", "--key"])
        .arg(&key)
        .args([
            "--peer",
            &peer.to_string(),
            "--run",
            "my-run",
            "--valid-for",
            "1d12h",
            "--out",
        ])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains(&peer.to_string()) && printed.contains("'my-run'"),
        "{printed}"
    );
    let certificate = Certificate::load(&cert).unwrap();
    certificate.verify_signature().unwrap();
    assert_eq!(
        (certificate.peer(), certificate.run_id(), certificate.authority()),
        (peer, "my-run", authority.peer_id())
    );
    let lifetime = 36 * 3600;
    assert!((before + lifetime..before + lifetime + 5).contains(&certificate.not_after()));
    assert!(certificate.not_before() <= before.saturating_sub(299));
}

#[test]
fn authority_issue_names_what_was_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authority.key");
    Keypair::generate().save(&key).unwrap();
    let peer = Keypair::generate().peer_id().to_string();
    let issue = |args: &[&str]| {
        let output = colony()
            .args(["authority", "issue", "--out"])
            .arg(dir.path().join("x.cert"))
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        String::from_utf8(output.stderr).unwrap()
    };
    let key = key.to_str().unwrap();
    let message = issue(&["--key", key, "--peer", &peer, "--run", "r", "--valid-for", "30x"]);
    assert!(message.contains("--valid-for") && message.contains("'x'"), "{message}");
    let message = issue(&["--key", key, "--peer", "not-a-peer", "--run", "r", "--valid-for", "30d"]);
    assert!(
        message.contains("--peer") && message.contains("not-a-peer"),
        "{message}"
    );
    let message = issue(&[
        "--key",
        "/no/such/authority.key",
        "--peer",
        &peer,
        "--run",
        "r",
        "--valid-for",
        "1h",
    ]);
    assert!(message.contains("authority.key"), "{message}");
    let long_run = "r".repeat(200);
    let message = issue(&["--key", key, "--peer", &peer, "--run", &long_run, "--valid-for", "1h"]);
    assert!(message.contains("at most 128"), "{message}");
}

/// A `colony node` child process, killed when dropped.
struct Node {
    child: std::process::Child,
    address: String,
}

impl Node {
    fn start(args: &[&str]) -> Node {
        use std::io::BufRead;
        let mut child = colony()
            .arg("node")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Node {
            child,
            address: String::new(),
        };
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Ok(line)) => node.address = line,
            other => panic!("colony node printed no address: {other:?}"),
        }
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn colony_node_refuses_an_unlisted_peer_and_it_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (listed, stranger) = (dir.path().join("listed.key"), dir.path().join("stranger.key"));
    let listed_id = Keypair::load_or_generate(&listed).unwrap().peer_id().to_string();
    let stranger_id = Keypair::load_or_generate(&stranger).unwrap().peer_id().to_string();
    let node = Node::start(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--identity",
        listed.to_str().unwrap(),
        "--allow-peer",
        &listed_id,
    ]);
    let output = colony()
        .args([
            "node",
            "--listen",
            "tcp://127.0.0.1:0",
            "--bootstrap-timeout-s",
            "20",
            "--identity",
        ])
        .arg(&stranger)
        .args(["--initial-peer", &node.address])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(
        message.contains(&format!("peer {stranger_id} is not on the run's allowlist")),
        "{message}"
    );

    // A run that admits by certificate needs the peer's own.
    let authority = Keypair::generate().peer_id().to_string();
    let output = colony()
        .args(["node", "--listen", "tcp://127.0.0.1:0", "--authority", &authority])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("authority needs certificate"), "{message}");
}
