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
