//! The configuration file and flags (`colony::config`): a TOML round trip of the defaults and of a full
//! configuration, unknown and misspelt keys refused with the nearest key, type errors naming the key, the
//! merge rule (defaults < file < flags, a flag not given keeps the file's value), and `colony node --config`
//! as a user runs it.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use clap::Parser;
use colony::config::{
    CodecName, Config, ConfigError, GradientAggregation, NodeSettings, OptimizerRule, OptimizerSettings, Schedule,
    TransportKind,
};
use colony::optimizer::CollaborativeOptions;
use colony_averaging::aggregation::Aggregation;
use colony_averaging::tensor::TensorInfo;
use colony_offload::OptimizerConfig;
use colony_transports::Keypair;

/// A model of two tensors, 10 values in all.
fn tensors() -> Vec<TensorInfo> {
    vec![TensorInfo::new("w", vec![2, 4]), TensorInfo::new("b", vec![2])]
}

/// The defaults of `CollaborativeOptions::new` for `tensors()`, with Adam at lr 1e-3.
fn default_options() -> CollaborativeOptions {
    let mut optimizer = OptimizerConfig::adam(1e-3, 10);
    optimizer.groups[0].ranges = vec![0..8, 8..10];
    CollaborativeOptions::new(256, optimizer)
}

/// Every `[node]` key set.
fn full_node() -> NodeSettings {
    NodeSettings {
        listen: Some("0.0.0.0:4000".into()),
        advertise: Some("203.0.113.7:0".into()),
        initial_peers: Some(vec![
            format!("tcp://10.0.0.1:4000/p/{}", Keypair::generate().peer_id()),
            format!("quic://10.0.0.2:4000/p/{}", Keypair::generate().peer_id()),
        ]),
        identity: Some(PathBuf::from("/var/lib/colony/peer.key")),
        allow_peers: Some(vec![Keypair::generate().peer_id().to_string()]),
        authority: Some(Keypair::generate().peer_id().to_string()),
        certificate: Some(PathBuf::from("/var/lib/colony/peer.cert")),
        transport: Some(TransportKind::Quic),
        run_id: Some("my-run".into()),
        auxiliary: Some(false),
        probe_period_ms: Some(500),
        suspect_timeout_ms: Some(2000),
        bootstrap_timeout_s: Some(60),
        bandwidth_mbps: Some(100.0),
        metrics_address: Some("127.0.0.1:9464".parse().unwrap()),
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, "peer.toml")
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn the_defaults_round_trip_through_toml() {
    let options = default_options();
    let config = Config {
        node: full_node(),
        optimizer: OptimizerSettings::from_options(&options).unwrap(),
    };
    let text = config.to_toml();
    assert!(
        text.contains("[optimizer]") && text.contains("matchmaking_time = 15.0"),
        "{text}"
    );
    let parsed = parse(&text).unwrap();
    assert_eq!(parsed, config, "{text}");
    // And back to the same options.
    let rebuilt = parsed.optimizer.options(&tensors()).unwrap();
    assert_eq!(format!("{rebuilt:?}"), format!("{options:?}"));
}

#[test]
fn a_full_configuration_round_trips_through_toml() {
    let optimizer = OptimizerSettings {
        target_batch_size: Some(4096),
        batch_size_per_step: Some(32),
        optimizer: Some(OptimizerRule::Sgd),
        lr: Some(0.1),
        weight_decay: Some(0.0005),
        momentum: Some(0.9),
        dampening: Some(0.0),
        nesterov: Some(true),
        scheduler: Some(Schedule::WarmupCosine {
            warmup: 10,
            total: 1000,
            min_factor: 0.05,
        }),
        matchmaking_time: Some(5.0),
        averaging_timeout: Some(30.0),
        allreduce_timeout: Some(20.0),
        next_chunk_timeout: Some(4.5),
        load_state_timeout: Some(120.0),
        reuse_grad_buffers: Some(true),
        offload_optimizer: Some(true),
        delay_optimizer_step: Some(true),
        delay_grad_averaging: Some(true),
        delay_state_averaging: Some(false),
        average_state_every: Some(4),
        use_local_updates: Some(false),
        client_mode: Some(true),
        grad_compression: Some(CodecName::ScaledFloat16),
        gradient_aggregation: Some(GradientAggregation::CenteredClip {
            tau: 0.05,
            iterations: 3,
        }),
        state_averaging_compression: Some(CodecName::Blockwise8bit),
        load_state_compression: Some(CodecName::None),
        average_opt_statistics: Some(vec!["momentum_buffer".into()]),
        min_group_size: Some(3),
        target_group_size: Some(8),
        request_timeout: Some(1.5),
        bandwidth: Some(250.0),
        part_size_bytes: Some(1 << 20),
        performance_ema_alpha: Some(0.2),
        min_refresh_period: Some(0.1),
        max_refresh_period: Some(2.0),
        shutdown_timeout: Some(10.0),
        ..OptimizerSettings::default()
    };
    let config = Config {
        node: full_node(),
        optimizer,
    };
    // The test sets every key: a key added to the struct and not here fails this.
    let written: toml::Table = config.to_toml().parse().unwrap();
    for (section, keys) in colony::config::sections() {
        let table = written[section].as_table().unwrap();
        let missing: Vec<_> = keys.iter().filter(|k| !table.contains_key(**k)).collect();
        let expected_missing: Vec<&&str> = if section == "optimizer" {
            // Adam's and LAMB's hyper-parameters do not apply to SGD.
            vec![&"beta1", &"beta2", &"eps", &"clamp_value"]
        } else {
            vec![]
        };
        assert_eq!(missing, expected_missing, "[{section}] keys not written");
    }
    let parsed = parse(&config.to_toml()).unwrap();
    assert_eq!(parsed, config);
    let options = parsed.options(&tensors()).unwrap();
    assert_eq!(options.matchmaking_time, Duration::from_secs(5));
    assert_eq!(options.next_chunk_timeout, Some(Duration::from_millis(4500)));
    assert_eq!(options.part_size_bytes, 1 << 20);
    assert_eq!(
        options.gradient_aggregation,
        Aggregation::CenteredClip {
            tau: 0.05,
            iterations: 3
        }
    );
    assert!(matches!(
        options.optimizer.kind,
        colony_offload::OptimizerKind::Sgd { nesterov: true, .. }
    ));
    assert_eq!(options.optimizer.groups[0].ranges, vec![0..8, 8..10]);
    assert_eq!(
        OptimizerSettings::from_options(&options).unwrap(),
        config.optimizer,
        "options -> settings is the inverse of settings -> options"
    );
    // Without the access keys: they name a certificate file that does not exist, and allow_peers and
    // authority exclude each other (tests/access.rs covers them).
    let node = NodeSettings {
        allow_peers: None,
        authority: None,
        certificate: None,
        ..parsed.node.clone()
    };
    let membership = node.membership().unwrap();
    assert_eq!(membership.listen.unwrap().to_string(), "quic://0.0.0.0:4000");
    assert_eq!(membership.swim.probe_period, Duration::from_millis(500));
    assert_eq!(membership.bootstrap_timeout, Duration::from_secs(60));
}

#[test]
fn an_unknown_key_is_refused_with_the_nearest_one() {
    let message = error("[optimizer]\ntarget_batch_size = 64\nmatchmaking_tme = 5\n");
    assert_eq!(
        message,
        "unknown key `matchmaking_tme` in [optimizer] of peer.toml; did you mean `matchmaking_time`?"
    );
    // Swapped letters count as one edit.
    let message = error("[node]\nrun_di = \"x\"\n");
    assert_eq!(
        message,
        "unknown key `run_di` in [node] of peer.toml; did you mean `run_id`?"
    );
    // A key of the other section.
    let message = error("[node]\nmatchmaking_time = 5\n");
    assert!(
        message.contains("`matchmaking_time` in [node]") && message.contains("belongs in [optimizer]"),
        "{message}"
    );
    // Outside any section.
    let message = error("target_batch_size = 5\n");
    assert!(
        message.contains("at the top level") && message.contains("belongs in [optimizer]"),
        "{message}"
    );
    let message = error("[optimiser]\nlr = 0.1\n");
    assert!(message.contains("did you mean `optimizer`?"), "{message}");
    // Nothing close: the valid keys are listed.
    let message = error("[node]\nzzzzzzzzzz = 1\n");
    assert!(
        message.contains("the keys here are listen, advertise, initial_peers"),
        "{message}"
    );
    match parse("[optimizer]\nbatch_size = 8\n") {
        Err(ConfigError::UnknownKey { suggestion, .. }) => {
            assert_eq!(suggestion.as_deref(), Some("batch_size_per_step"));
        }
        other => panic!("expected an unknown key, got {other:?}"),
    }
}

#[test]
fn a_value_of_the_wrong_type_names_the_key_and_the_type() {
    let message = error("[optimizer]\ntarget_batch_size = \"big\"\n");
    assert!(
        message.starts_with("`target_batch_size` in [optimizer] of peer.toml:") && message.contains("expected u64"),
        "{message}"
    );
    let message = error("[optimizer]\nmatchmaking_time = \"5s\"\n");
    assert!(
        message.contains("`matchmaking_time`") && message.contains("expected f64"),
        "{message}"
    );
    let message = error("[optimizer]\ngrad_compression = \"zip\"\n");
    assert!(
        message.contains("`grad_compression`") && message.contains("float16"),
        "{message}"
    );
    let message = error("[node]\nmetrics_address = \"localhost\"\n");
    assert!(
        message.contains("`metrics_address` in [node]") && message.contains("socket address"),
        "{message}"
    );
    let message = error("[node]\nauxiliary = 1\n");
    assert!(
        message.contains("`auxiliary`") && message.contains("expected a boolean"),
        "{message}"
    );
    let message = error("node = 3\n");
    assert!(
        message.contains("`node` at the top level") && message.contains("[node]"),
        "{message}"
    );
    let message = error("[optimizer]\nscheduler = { kind = \"step\", step_size = 10, gama = 0.5 }\n");
    assert!(
        message.contains("`scheduler`") && message.contains("gama") && message.contains("gamma"),
        "{message}"
    );
    let message = error("[optimizer]\ngradient_aggregation = { kind = \"centered_clip\", iterations = 3 }\n");
    assert!(
        message.contains("`gradient_aggregation`") && message.contains("tau"),
        "{message}"
    );
    let message = error("[optimizer]\ngradient_aggregation = { kind = \"median\" }\n");
    assert!(
        message.contains("`gradient_aggregation`") && message.contains("centered_clip"),
        "{message}"
    );
    // Not TOML at all: the parser's line and column.
    let message = error("[optimizer]\nlr = \n");
    assert!(
        message.contains("peer.toml is not valid TOML") && message.contains("line 2"),
        "{message}"
    );
    // In range for TOML, not for the option.
    let config =
        parse("[optimizer]\ntarget_batch_size = 4\noptimizer = \"adam\"\nlr = 0.1\nmatchmaking_time = -1\n").unwrap();
    let message = config.options(&tensors()).unwrap_err().to_string();
    assert!(
        message.contains("matchmaking_time") && message.contains("-1"),
        "{message}"
    );
    let config = parse(
        "[optimizer]\ntarget_batch_size = 4\noptimizer = \"adam\"\nlr = 0.1\n\
         gradient_aggregation = { kind = \"centered_clip\", tau = -0.5 }\n",
    )
    .unwrap();
    let message = config.options(&tensors()).unwrap_err().to_string();
    assert!(
        message.contains("gradient_aggregation") && message.contains("tau is -0.5"),
        "{message}"
    );
}

#[test]
fn required_keys_and_foreign_hyper_parameters_are_named() {
    let config = parse("[optimizer]\noptimizer = \"adam\"\nlr = 0.1\n").unwrap();
    let message = config.options(&tensors()).unwrap_err().to_string();
    assert_eq!(
        message,
        "`target_batch_size` is required: set it in [optimizer] of the configuration file or pass --target-batch-size"
    );
    let config = parse("[optimizer]\ntarget_batch_size = 8\noptimizer = \"adam\"\nlr = 0.1\nmomentum = 0.9\n").unwrap();
    let message = config.options(&tensors()).unwrap_err().to_string();
    assert!(
        message.contains("momentum do not apply to optimizer = \"adam\""),
        "{message}"
    );
    // The optimizer's own rules run on the merged options.
    let config = parse(
        "[node]\nauxiliary = true\n[optimizer]\ntarget_batch_size = 8\noptimizer = \"adam\"\nlr = 0.1\n\
         batch_size_per_step = 4\n",
    )
    .unwrap();
    let message = config.options(&tensors()).unwrap_err().to_string();
    assert!(message.contains("batch_size_per_step"), "{message}");
}

/// A command line with the node and optimizer flags and a configuration file, as a binary declares them.
#[derive(Debug, Parser)]
struct Cli {
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    node: NodeSettings,
    #[command(flatten)]
    optimizer: OptimizerSettings,
}

impl Cli {
    fn merged(&self) -> Config {
        let file = Config::load_optional(self.config.as_deref()).unwrap();
        file.overlay(&Config {
            node: self.node.clone(),
            optimizer: self.optimizer.clone(),
        })
    }
}

#[test]
fn a_flag_overrides_the_file_and_an_absent_flag_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.toml");
    std::fs::write(
        &path,
        "[node]\nrun_id = \"file-run\"\nprobe_period_ms = 500\ntransport = \"quic\"\nlisten = \"127.0.0.1:0\"\n\n\
         [optimizer]\ntarget_batch_size = 512\noptimizer = \"adamw\"\nlr = 0.01\nmatchmaking_time = 5\n\
         averaging_timeout = 30\nreuse_grad_buffers = true\ngrad_compression = \"float16\"\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();

    // No flags: the file's values, then the builders' defaults.
    let merged = Cli::parse_from(["test", "--config", config]).merged();
    let options = merged.options(&tensors()).unwrap();
    assert_eq!(options.target_batch_size, 512);
    assert_eq!(options.matchmaking_time, Duration::from_secs(5));
    assert_eq!(options.averaging_timeout, Duration::from_secs(30));
    assert!(options.reuse_grad_buffers);
    assert_eq!(
        options.load_state_timeout,
        Duration::from_secs(600),
        "the default of new()"
    );
    assert_eq!(
        options.optimizer.groups[0].weight_decay, 0.01,
        "AdamW's default weight decay"
    );
    let membership = merged.node.membership().unwrap();
    assert_eq!(membership.run_id, "file-run");
    assert_eq!(membership.listen.unwrap().to_string(), "quic://127.0.0.1:0");

    // Flags win over the file, key by key; the keys they do not give keep the file's values.
    let merged = Cli::parse_from([
        "test",
        "--config",
        config,
        "--matchmaking-time",
        "4",
        "--run-id",
        "flag-run",
        "--transport",
        "tcp",
        "--reuse-grad-buffers=false",
        "--grad-compression",
        "none",
        "--batch-size",
        "16",
        "--scheduler",
        "{ kind = \"step\", step_size = 10, gamma = 0.5 }",
        "--gradient-aggregation",
        "{ kind = \"centered_clip\", tau = 0.02 }",
        "--min-group-size",
        "3",
    ])
    .merged();
    let options = merged.options(&tensors()).unwrap();
    assert_eq!(options.matchmaking_time, Duration::from_secs(4));
    assert_eq!(options.averaging_timeout, Duration::from_secs(30), "kept from the file");
    assert_eq!(options.target_batch_size, 512, "kept from the file");
    assert!(!options.reuse_grad_buffers);
    assert_eq!(format!("{:?}", options.grad_compression), "Fixed(None)");
    assert_eq!(options.batch_size_per_step, Some(16));
    assert_eq!(options.scheduler.factor(25), 0.25);
    assert_eq!(
        options.gradient_aggregation,
        Aggregation::CenteredClip {
            tau: 0.02,
            iterations: 5
        },
        "iterations default to 5"
    );
    let membership = merged.node.membership().unwrap();
    assert_eq!(membership.run_id, "flag-run");
    assert_eq!(
        membership.swim.probe_period,
        Duration::from_millis(500),
        "kept from the file"
    );
    assert_eq!(membership.listen.unwrap().to_string(), "tcp://127.0.0.1:0");

    // A bare boolean flag means true.
    let merged = Cli::parse_from(["test", "--use-local-updates"]).merged();
    assert_eq!(merged.optimizer.use_local_updates, Some(true));
    assert_eq!(merged.optimizer.reuse_grad_buffers, None, "a flag not given is not set");
}

#[test]
fn a_missing_or_oversized_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let message = Config::load(&missing).unwrap_err().to_string();
    assert!(message.contains("missing.toml"), "{message}");
    let large = dir.path().join("large.toml");
    std::fs::write(&large, vec![b'#'; colony::config::MAX_FILE_BYTES as usize + 1]).unwrap();
    let message = Config::load(&large).unwrap_err().to_string();
    assert!(
        message.contains("large.toml") && message.contains("larger than"),
        "{message}"
    );
}

fn colony() -> Command {
    Command::new(env!("CARGO_BIN_EXE_colony"))
}

#[test]
fn colony_node_refuses_a_file_with_a_misspelt_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "[node]\nlisten = \"127.0.0.1:0\"\nprobe_period = 500\n").unwrap();
    let output = colony()
        .args(["node", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "colony: unknown key `probe_period` in [node] of {}; did you mean `probe_period_ms`?",
            path.display()
        )),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing ran");

    std::fs::write(
        &path,
        "[node]\nlisten = \"127.0.0.1:0\"\nsuspect_timeout_ms = \"long\"\n",
    )
    .unwrap();
    let output = colony().args(["node", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`suspect_timeout_ms` in [node]") && stderr.contains("expected u64"),
        "{stderr}"
    );
}

#[test]
fn colony_node_takes_its_settings_from_the_file_and_its_flags_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[node]\nlisten = \"127.0.0.1:0\"\ntransport = \"tcp\"\nrun_id = \"from-file\"\n",
    )
    .unwrap();
    // The file alone gives a listening node; --transport overrides the file's transport.
    for (flags, scheme) in [
        (&[][..], "tcp://127.0.0.1:"),
        (&["--transport", "quic"][..], "quic://127.0.0.1:"),
    ] {
        let mut child = colony()
            .args(["node", "--config"])
            .arg(&path)
            .args(flags)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            if let Some(Ok(line)) = BufReader::new(stdout).lines().next() {
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(60));
        let _ = child.kill();
        let _ = child.wait();
        let first = first.expect("the node printed its address within 60 s");
        assert!(first.starts_with(scheme), "flags {flags:?}: {first}");
    }
}
