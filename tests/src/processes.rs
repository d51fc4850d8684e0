//! Peers as separate processes, for the tests that kill, restart and watch them: the workspace's binaries,
//! children killed on every exit path (panics included), their output captured line by line, and waits on
//! the lines they print (conditions, not sleeps).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The example trainer's flags for a small, fast task: a small MLP, small batches, a swarm epoch of a few
/// hundred milliseconds, short matchmaking and timeouts (those of the runtime's optimizer tests), no
/// evaluation, and more epochs than a test waits for.
pub const SMALL_TASK: &[&str] = &[
    "--hidden=60,60",
    "--train-samples=8192",
    "--eval-samples=256",
    "--batch-size=32",
    "--target-batch-size=2048",
    "--max-epochs=100000",
    "--target-accuracy=0",
    "--eval-every=0",
    "--matchmaking-time=1",
    "--request-timeout=0.3",
    "--averaging-timeout=5",
    "--next-chunk-timeout=2",
    "--load-state-timeout=20",
];

/// The binary `name` of the workspace package `package`, as `cargo test --workspace` builds it beside the
/// calling test (`target/<profile>/<name>`: cargo builds a package's binaries for its integration tests);
/// built now with cargo when missing. The environment variable `COLONY_<NAME>_BIN` names another.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let variable = format!("COLONY_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&variable) {
        return PathBuf::from(path);
    }
    // A test binary is target/<profile>/deps/<test>-<hash>; a binary of this package (the soak, the bench)
    // is target/<profile>/<name>.
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the binary lies in a directory");
    let profile_dir = if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target/<profile>/deps lies in target/<profile>")
    } else {
        dir
    };
    let binary = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !binary.is_file() {
        eprintln!("{} is missing: building it", binary.display());
        let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        build.args(["build", "-p", package, "--bin", name]);
        match profile_dir.file_name().and_then(|profile| profile.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(other) => {
                build.args(["--profile", other]);
            }
        }
        let status = build.status().expect("running cargo");
        assert!(status.success(), "building {package}'s {name} failed: {status}");
    }
    binary
}

/// A free loopback port (bound and released; the process that gets it binds it next).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("its address").port()
}

/// Child processes by name, with their output. Every child still running is killed (and reaped) when this
/// is dropped.
pub struct Processes {
    children: Vec<(String, Child)>,
    kept: Arc<Mutex<Vec<String>>>,
    sender: mpsc::Sender<(String, String, Instant)>,
    lines: mpsc::Receiver<(String, String, Instant)>,
    /// Every line received so far, by process name, with the time it was read.
    seen: Vec<(String, String, Instant)>,
}

impl Default for Processes {
    fn default() -> Self {
        let (sender, lines) = mpsc::channel();
        Self {
            children: Vec::new(),
            kept: Arc::default(),
            sender,
            lines,
            seen: Vec::new(),
        }
    }
}

impl Processes {
    /// Starts `command` as `name`, its standard output and error captured. Names are for one process each,
    /// even after it exited (its lines stay under the name): give a restarted process a new one.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> &mut Child {
        assert!(
            self.children.iter().all(|(n, _)| n != name),
            "{name} is already running"
        );
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.capture(name, child.stdout.take().expect("piped stdout"));
        self.capture(name, child.stderr.take().expect("piped stderr"));
        self.children.push((name.to_owned(), child));
        &mut self.children.last_mut().expect("just pushed").1
    }

    fn capture(&self, name: &str, stream: impl Read + Send + 'static) {
        let (name, kept, sender) = (name.to_owned(), self.kept.clone(), self.sender.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = sender.send((name.clone(), line.clone(), Instant::now()));
                let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                // The last lines are what tells why; keep the output bounded.
                if kept.len() > 400 {
                    kept.drain(..200);
                }
                kept.push(format!("[{name}] {line}"));
            }
        });
    }

    /// Takes in the lines printed so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The last lines of every process, for failure messages.
    pub fn tail(&self) -> String {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept[kept.len().saturating_sub(60)..].join("\n")
    }

    /// The lines of `name` received so far that start with `prefix`, without the prefix.
    pub fn lines_of(&mut self, name: &str, prefix: &str) -> Vec<String> {
        self.drain();
        self.seen
            .iter()
            .filter(|(who, line, _)| who == name && line.starts_with(prefix))
            .map(|(_, line, _)| line[prefix.len()..].trim().to_owned())
            .collect()
    }

    /// Every process's lines received so far that start with `prefix` (without it), in the order they were
    /// read: the process's name, the time the line was read, the line.
    pub fn timed_lines(&mut self, prefix: &str) -> Vec<(String, Instant, String)> {
        self.drain();
        self.seen
            .iter()
            .filter(|(_, line, _)| line.starts_with(prefix))
            .map(|(who, line, at)| (who.clone(), *at, line[prefix.len()..].trim().to_owned()))
            .collect()
    }

    /// Every process's lines received so far that contain `text`, as `[name] line`.
    pub fn lines_containing(&mut self, text: &str) -> Vec<String> {
        self.drain();
        self.seen
            .iter()
            .filter(|(_, line, _)| line.contains(text))
            .map(|(who, line, _)| format!("[{who}] {line}"))
            .collect()
    }

    /// Writes every line received so far to `path`, each as `seconds-since-start [name] line`.
    pub fn dump(&mut self, path: &Path, start: Instant) -> std::io::Result<()> {
        use std::io::Write as _;
        self.drain();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (name, line, at) in &self.seen {
            let seconds = at.saturating_duration_since(start).as_secs_f64();
            writeln!(out, "{seconds:9.3} [{name}] {line}")?;
        }
        out.flush()
    }

    /// The process id of the running child `name`.
    pub fn pid(&mut self, name: &str) -> u32 {
        self.child(name).id()
    }

    /// Waits up to `timeout` until `condition` holds for `name`'s lines starting with `prefix` (each without
    /// the prefix); returns those lines. Panics with every process's last output otherwise.
    pub fn wait_for(
        &mut self,
        name: &str,
        prefix: &str,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.lines_of(name, prefix);
            if condition(&found) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "{name}: {what} did not happen within {timeout:?}; output:\n{}",
                    self.tail()
                );
            }
            if let Ok(line) = self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                self.seen.push(line);
            }
        }
    }

    /// Waits for the first line of `name` starting with `prefix`; returns the rest of it.
    pub fn wait_for_line(&mut self, name: &str, prefix: &str, timeout: Duration) -> String {
        let what = format!("a line starting with '{prefix}'");
        self.wait_for(name, prefix, timeout, &what, |lines| !lines.is_empty())
            .swap_remove(0)
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process named {name}"))
            .1
    }

    /// Forgets a reaped child, so that its name can be used again.
    fn forget(&mut self, name: &str) {
        self.children.retain(|(n, _)| n != name);
    }

    /// Forgets `name`, which [`Processes::exited`] reported: its lines stay, its name may be used again.
    pub fn forget_exited(&mut self, name: &str) {
        self.forget(name);
    }

    /// Takes in the lines printed within `timeout` (at least one wait for the next line).
    pub fn pump(&mut self, timeout: Duration) {
        if let Ok(line) = self.lines.recv_timeout(timeout) {
            self.seen.push(line);
        }
        self.drain();
    }

    /// A child that exited on its own, if any: its name and status.
    pub fn exited(&mut self) -> Option<(String, ExitStatus)> {
        self.children.iter_mut().find_map(|(name, child)| {
            let status = child.try_wait().expect("polling a child")?;
            Some((name.clone(), status))
        })
    }

    /// SIGKILL: the process dies at once, leaving nothing (no goodbye to the swarm).
    pub fn kill(&mut self, name: &str) {
        let child = self.child(name);
        let _ = child.kill();
        let _ = child.wait();
        self.forget(name);
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, name: &str, timeout: Duration) -> ExitStatus {
        let child = self.child(name);
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {name} failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child(name).try_wait().expect("waiting for the child") {
                self.forget(name);
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name} did not exit within {timeout:?} of SIGTERM; output:\n{}",
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            if let Err(error) = child.kill() {
                // Already exited: nothing to kill.
                if error.kind() != std::io::ErrorKind::InvalidInput {
                    eprintln!("killing {name}: {error}");
                }
            }
            let _ = child.wait();
        }
    }
}
