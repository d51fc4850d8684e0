//! The `colony` command: `keygen` (create a peer identity file), `node` (run a peer that others join
//! through), `status` (observe a run) and `authority` (the keys and membership certificates of a run that
//! admits peers by certificate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use colony::config::{Config, NodeSettings};
use colony::membership::{Membership, MembershipEvent};
use colony_transports::access::{Certificate, format_unix_time, system_clock};
use colony_transports::{Keypair, PeerId};

#[derive(Debug, Parser)]
#[command(
    name = "colony",
    about = "Colony: collaborative training on unreliable machines",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a peer identity (an ed25519 key, PEM PKCS#8, mode 0600) and print its peer id.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file (the old identity is lost).
        #[arg(long)]
        force: bool,
    },
    /// Run a peer: a bootstrap peer others join through (or one that joins with --initial-peer). Prints its
    /// full dialable address on the first line of standard output, then one line per member that joins
    /// (`joined PEER ROLE ADDRESS`) or leaves (`left PEER`); logs go to standard error. SIGINT or SIGTERM
    /// leaves the swarm gracefully and exits.
    Node(NodeArgs),
    /// Show a run's swarm: joins through --initial-peer as a client-mode observer (it publishes nothing and
    /// is counted by no trainer), reads the peers' progress records and prints the global epoch, samples
    /// against the target, samples/s, ETA, members by role and one row per peer; --watch refreshes in
    /// place, --json prints one JSON object (per refresh). Leaves the swarm gracefully when done.
    Status(colony::status::StatusArgs),
    /// Access control by certificate: create a run's authority key, and issue membership certificates with
    /// it. Peers of the run set `authority` to the authority's id and `certificate` to their own certificate.
    Authority {
        #[command(subcommand)]
        command: AuthorityCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuthorityCommand {
    /// Create an authority key (an ed25519 key, PEM PKCS#8, mode 0600; keep it off the training machines)
    /// and print its id, the value of the peers' `authority` setting.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file (certificates signed by the old key stop being accepted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a membership certificate: the authority's signature that a peer may take part in a run until
    /// a time. Writes the certificate file and prints what it admits.
    Issue {
        /// The authority key file (from `colony authority keygen`).
        #[arg(long, value_name = "AUTHORITY_KEY")]
        key: PathBuf,
        /// The peer admitted: its id, as `colony keygen` printed it.
        #[arg(long, value_name = "PEER_ID")]
        peer: String,
        /// The run it is admitted to.
        #[arg(long, value_name = "RUN_ID")]
        run: String,
        /// How long the certificate is valid from now: a number and a unit, s, m, h, d or w (`30d`, `12h`,
        /// `90m`; several add up: `1d12h`). It is valid from five minutes before now, for clocks that lag.
        #[arg(long, value_name = "DURATION")]
        valid_for: String,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Certificates are valid from this long before they are issued, so that a peer whose clock lags the
/// authority's accepts a fresh one.
const BACKDATE_SECS: u64 = 300;

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// A configuration file (TOML, see docs/configuration.md): its `[node]` keys are these flags' names with
    /// underscores; a flag given here overrides the file's key.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: NodeSettings,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("colony: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(node(args))
        }
        Command::Status(args) => {
            // Warnings only: standard output carries the status (a script reads it with --json).
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(colony::status::run(args)).map_err(anyhow::Error::from)
        }
        Command::Authority { command } => authority(command),
        Command::Keygen { out, force } => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; it may be a peer's identity. Pass --force to replace it",
                    out.display()
                );
            }
            let keypair = Keypair::generate();
            keypair.save(&out)?;
            println!("{}", keypair.peer_id());
            Ok(())
        }
    }
}

fn authority(command: AuthorityCommand) -> anyhow::Result<()> {
    match command {
        AuthorityCommand::Keygen { out, force } => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; it may be a run's authority key, and replacing it invalidates every \
                     certificate it signed. Pass --force to replace it",
                    out.display()
                );
            }
            let keypair = Keypair::generate();
            keypair.save(&out)?;
            println!("{}", keypair.peer_id());
            Ok(())
        }
        AuthorityCommand::Issue {
            key,
            peer,
            run,
            valid_for,
            out,
        } => {
            let authority = Keypair::load(&key).context("reading the authority key")?;
            let peer: PeerId = peer.parse().context("--peer")?;
            let lifetime = parse_validity(&valid_for).map_err(|e| anyhow::anyhow!("--valid-for {valid_for:?}: {e}"))?;
            let now = system_clock()();
            let not_after = now
                .checked_add(lifetime)
                .ok_or_else(|| anyhow::anyhow!("--valid-for {valid_for:?} reaches beyond the year 584 billion"))?;
            let certificate = Certificate::issue(&authority, peer, &run, now.saturating_sub(BACKDATE_SECS), not_after)?;
            certificate.save(&out)?;
            println!(
                "certificate for peer {peer} in run '{run}', valid until {}, signed by authority {}: {}",
                format_unix_time(not_after),
                authority.peer_id(),
                out.display()
            );
            Ok(())
        }
    }
}

/// Seconds in a duration written as numbers with units (`30d`, `12h`, `90m`, `45s`, `2w`, `1d12h`).
fn parse_validity(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected numbers each followed by s, m, h, d or w (e.g. 30d, 12h, 90m, 1d12h)";
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            other => return Err(format!("unexpected {other:?}; {EXPECTED}")),
        };
        if digits.is_empty() {
            return Err(format!("a unit without a number; {EXPECTED}"));
        }
        let count: u64 = digits.parse().map_err(|_| "the number is too large".to_string())?;
        total = count
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or("the duration is too large")?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("a number without a unit; {EXPECTED}"));
    }
    if total == 0 {
        return Err(format!("the duration is zero; {EXPECTED}"));
    }
    Ok(total)
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    // Defaults < file < flags: a flag not given leaves the file's key alone.
    let file = Config::load_optional(args.config.as_deref())?;
    let settings = file.node.overlay(&args.settings);
    let config = settings.membership()?;
    let Some(listen) = config.listen.clone() else {
        anyhow::bail!("colony node needs an address to listen on: pass --listen HOST:PORT or set [node] listen");
    };
    let keypair = match &settings.identity {
        Some(path) => Keypair::load_or_generate(path)?,
        None => Keypair::generate(),
    };
    let transport = colony::peer::transport_for(listen.scheme(), &keypair).map_err(anyhow::Error::msg)?;
    if let Some(address) = settings.metrics_address {
        let bound = colony::telemetry::serve_prometheus(address)?;
        tracing::info!(%bound, "Prometheus metrics on http://{bound}/metrics");
    }
    if settings.auxiliary == Some(true) {
        return auxiliary_node(config, keypair, transport, &file, settings.bootstrap_timeout_s).await;
    }
    // The node relays the records of the trainers that join through it, so it validates their kinds.
    let schemas = colony::peer::training_schemas();
    let membership = Membership::start(config, Arc::new(keypair), transport, schemas).await?;
    let mut events = membership.events();
    let address = membership.address().context("a listening node has an address")?;
    println!("{address}");
    let print_joined = |member: colony::membership::MemberInfo| {
        let address = member.address.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        println!("joined {} {} {address}", member.peer, member.role);
    };
    // Members learned while joining, before the event stream was open (one may be printed twice).
    for member in membership.members() {
        print_joined(member);
    }
    tracing::info!(%address, "node running; Ctrl-C leaves the swarm");

    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("handling SIGTERM")?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(MembershipEvent::Joined(member)) => print_joined(member),
                Ok(MembershipEvent::Left(peer)) => println!("left {peer}"),
                Ok(MembershipEvent::Rejoined(generation)) => {
                    tracing::warn!(generation, "declared dead by the swarm; rejoined");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "membership events were dropped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!("leaving the swarm");
    membership.leave().await;
    Ok(())
}

/// Resolves at SIGINT or SIGTERM.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!("cannot handle SIGTERM ({error}); Ctrl-C still stops the node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `colony node --auxiliary`: joins, learns the run's gradient schema from a trainer, and reduces parts of
/// every gradient round for the trainers until SIGINT or SIGTERM. The file's `[optimizer]` keys give the
/// round timings; the model, its codecs and the target batch size come from the trainers. Prints its
/// address, then `auxiliary for N tensors (V values), target B` and `epoch E: reduced with P peers` /
/// `epoch E: round failed: REASON` lines.
async fn auxiliary_node(
    config: colony::membership::MembershipConfig,
    keypair: Keypair,
    transport: Arc<dyn colony_transports::Transport>,
    file: &Config,
    bootstrap_timeout_s: Option<u64>,
) -> anyhow::Result<()> {
    // The trainers' schema replaces the model-dependent keys, so they need not be in the file.
    let mut settings = file.optimizer.clone();
    settings.target_batch_size.get_or_insert(1);
    settings.optimizer.get_or_insert(colony::config::OptimizerRule::Sgd);
    settings.lr.get_or_insert(1e-3);
    let options = settings.options(&[])?;
    let wait = Duration::from_secs(bootstrap_timeout_s.unwrap_or(30).max(1));
    let (mut peer, schema) = colony::peer::start_auxiliary_peer(config, keypair, Some(transport), options, wait)
        .await
        .map_err(anyhow::Error::msg)?;
    let address = peer.membership.address().context("an auxiliary node listens")?;
    println!("{address}");
    let values: usize = schema.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    println!(
        "auxiliary for {} tensors ({values} values), target {}",
        schema.tensors.len(),
        schema.target_batch_size
    );
    tracing::info!(%address, "auxiliary node running; Ctrl-C leaves the swarm");
    let (reduced, failed) = colony::peer::run_auxiliary(
        &mut peer.optimizer,
        Duration::from_millis(10),
        shutdown_signal(),
        |round| match &round.result {
            colony::optimizer::RoundResult::Averaged { peers } => {
                println!("epoch {}: reduced with {peers} peers", round.epoch)
            }
            colony::optimizer::RoundResult::Failed { reason } => {
                println!("epoch {}: round failed: {reason}", round.epoch)
            }
        },
    )
    .await;
    tracing::info!(reduced, failed, "leaving the swarm");
    peer.optimizer.shutdown().await;
    peer.membership.leave().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_validity;

    #[test]
    fn validity_durations_add_up_their_units() {
        assert_eq!(parse_validity("30d"), Ok(30 * 86_400));
        assert_eq!(parse_validity("12h"), Ok(12 * 3_600));
        assert_eq!(parse_validity("90m"), Ok(90 * 60));
        assert_eq!(parse_validity("1d12h"), Ok(86_400 + 12 * 3_600));
        assert_eq!(parse_validity(" 2w "), Ok(2 * 604_800));
        for bad in ["", "30", "d", "30x", "0d", "1.5d", "-1d", "99999999999999999999d"] {
            let error = parse_validity(bad).unwrap_err();
            assert!(!error.is_empty(), "{bad}");
        }
        assert!(parse_validity("30x").unwrap_err().contains("'x'"));
    }
}
