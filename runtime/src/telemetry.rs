//! Prometheus export of the metrics Colony records.
//!
//! Colony records its metrics through the [`metrics`] facade everywhere (membership, transports, matchmaking,
//! all-reduce, the optimizer). Until a recorder is installed those calls cost a relaxed atomic load and record
//! nothing, so the library exports nothing by default. [`serve_prometheus`] is the one switch: it installs the
//! process-global recorder, with explicit histogram buckets for every histogram Colony records (so Prometheus
//! gets `_bucket` series it can aggregate across peers, not per-process quantiles), and serves the text format
//! over HTTP. The names, labels and buckets are listed in `docs/operations.md`, section *Metrics*.
//!
//! ```no_run
//! let bound = colony::telemetry::serve_prometheus("127.0.0.1:9464".parse().unwrap())?;
//! println!("metrics on http://{bound}/metrics");
//! # Ok::<(), colony::telemetry::TelemetryError>(())
//! ```

use std::net::{SocketAddr, TcpListener};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Bucket upper bounds, in seconds, for short durations: an all-reduce, an optimizer step, an offload copy.
/// From 1 ms to 2 minutes.
pub const SHORT_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Bucket upper bounds, in seconds, for long durations: matchmaking (which waits up to `matchmaking_time`), a
/// whole averaging round, a state transfer. From 10 ms to 10 minutes.
pub const LONG_SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Every histogram Colony records, with its buckets. Any other histogram (one recorded by the embedding
/// application) gets [`SHORT_SECONDS_BUCKETS`].
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    ("colony_matchmaking_seconds", LONG_SECONDS_BUCKETS),
    ("colony_allreduce_seconds", LONG_SECONDS_BUCKETS),
    ("colony_state_transfer_seconds", LONG_SECONDS_BUCKETS),
    ("colony_round_seconds", LONG_SECONDS_BUCKETS),
    ("colony_optimizer_step_seconds", SHORT_SECONDS_BUCKETS),
    ("colony_offload_copy_seconds", SHORT_SECONDS_BUCKETS),
];

/// Why [`serve_prometheus`] could not start the exporter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The address could not be bound: it is taken, not local, or needs privileges.
    #[error("cannot serve Prometheus metrics on {address}: {reason}; choose another --metrics-address")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// What the operating system said.
        reason: String,
    },
    /// A global metrics recorder is already installed in this process (by an earlier call, or by the embedding
    /// application); the `metrics` facade accepts one per process.
    #[error("a metrics recorder is already installed in this process; serve_prometheus can be called once")]
    RecorderAlreadyInstalled,
    /// The exporter's runtime or thread could not be started.
    #[error("cannot start the Prometheus exporter: {0}")]
    Start(String),
}

/// Installs Colony's Prometheus recorder as the process-global [`metrics`] recorder and serves the Prometheus
/// text format over HTTP on `address` (any path answers; scrape `/metrics`). Port 0 picks a free port.
/// Returns the bound address.
///
/// The exporter runs on its own thread with a single-threaded tokio runtime, so it neither needs nor disturbs
/// the caller's runtime, and it lives until the process exits. Nothing is recorded or served unless this is
/// called.
///
/// # Errors
/// [`TelemetryError::Bind`] when the address cannot be bound, [`TelemetryError::RecorderAlreadyInstalled`] when
/// the process already has a recorder (then no port is left open), [`TelemetryError::Start`] when the thread
/// cannot be started.
pub fn serve_prometheus(address: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    // The exporter binds the address itself and does not report the port it got, so port 0 is resolved here
    // first. Another process could take the port in between; the exporter's bind would then fail and is retried
    // with a fresh port.
    const PORT_ZERO_ATTEMPTS: usize = 5;
    let attempts = if address.port() == 0 { PORT_ZERO_ATTEMPTS } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let concrete = if address.port() == 0 {
            pick_free_port(address)?
        } else {
            address
        };
        match start_exporter(concrete) {
            Ok(()) => {
                describe_metrics();
                return Ok(concrete);
            }
            Err(error @ TelemetryError::Bind { .. }) => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or(TelemetryError::Start("no attempt was made".to_owned())))
}

fn pick_free_port(address: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    let listener = TcpListener::bind(address).map_err(|error| TelemetryError::Bind {
        address,
        reason: error.to_string(),
    })?;
    listener.local_addr().map_err(|error| TelemetryError::Bind {
        address,
        reason: error.to_string(),
    })
}

fn start_exporter(address: SocketAddr) -> Result<(), TelemetryError> {
    let builder = buckets(PrometheusBuilder::new().with_http_listener(address))
        .map_err(|error| TelemetryError::Start(error.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| TelemetryError::Start(format!("tokio runtime: {error}")))?;
    // `build` binds the listener (it needs a runtime context for that) and spawns the recorder's upkeep task.
    let (recorder, exporter) = {
        let _context = runtime.enter();
        builder.build().map_err(|error| match error {
            BuildError::FailedToCreateHTTPListener(reason) => TelemetryError::Bind { address, reason },
            other => TelemetryError::Start(other.to_string()),
        })?
    };
    // Installing before serving: if a recorder is already there, dropping `exporter` and `runtime` here closes
    // the listener, so a failed call leaves no port open.
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::RecorderAlreadyInstalled)?;
    std::thread::Builder::new()
        .name("colony-prometheus".to_owned())
        .spawn(move || {
            if let Err(error) = runtime.block_on(exporter) {
                tracing::warn!(?error, "the Prometheus exporter stopped");
            }
        })
        .map_err(|error| TelemetryError::Start(format!("exporter thread: {error}")))?;
    Ok(())
}

fn buckets(mut builder: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    builder = builder.set_buckets(SHORT_SECONDS_BUCKETS)?;
    for (name, bounds) in HISTOGRAMS {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), bounds)?;
    }
    Ok(builder)
}

/// The `# HELP` lines: what each metric means, in one sentence.
fn describe_metrics() {
    describe_gauge!(
        "colony_peers",
        "Peers this peer's membership currently sees alive, by role."
    );
    describe_counter!(
        "colony_bytes_sent_total",
        Unit::Bytes,
        "Payload bytes sent, by transport (tcp|quic|memory) and protocol."
    );
    describe_counter!(
        "colony_bytes_received_total",
        Unit::Bytes,
        "Payload bytes received, by transport (tcp|quic|memory) and protocol."
    );
    describe_histogram!(
        "colony_matchmaking_seconds",
        Unit::Seconds,
        "Time from asking for a group to having one (or giving up), by outcome."
    );
    describe_counter!(
        "colony_matchmaking_failures_total",
        "Matchmaking attempts that ended without a group, by reason."
    );
    describe_histogram!(
        "colony_allreduce_seconds",
        Unit::Seconds,
        "Duration of an all-reduce that completed."
    );
    describe_counter!(
        "colony_allreduce_failures_total",
        "All-reduce rounds that failed, by reason."
    );
    describe_counter!(
        "colony_allreduce_parts_refused_total",
        "All-reduce parts refused (a sender's part or a reducer's result), by reason (non_finite: NaN or infinity)."
    );
    describe_counter!(
        "colony_allreduce_clipped_copies_total",
        "Senders' copies of parts that CenteredClip clipped on this peer's reducer."
    );
    describe_counter!(
        "colony_membership_datagrams_sent_total",
        "Membership (SWIM) datagrams sent."
    );
    describe_counter!(
        "colony_membership_datagrams_received_total",
        "Membership (SWIM) datagrams received."
    );
    describe_counter!(
        "colony_membership_datagrams_malformed_total",
        "Membership datagrams dropped because they did not decode."
    );
    describe_counter!(
        "colony_membership_datagrams_spoofed_total",
        "Membership datagrams dropped because their sender was not the authenticated peer."
    );
    describe_counter!(
        "colony_membership_datagrams_unreachable_total",
        "Membership datagrams that could not be sent because the peer was unreachable."
    );
    describe_counter!(
        "colony_records_stored_total",
        "Records accepted into the local record store."
    );
    describe_counter!(
        "colony_records_refused_total",
        "Records refused by the local record store, by reason."
    );
    describe_histogram!(
        "colony_state_transfer_seconds",
        Unit::Seconds,
        "Duration of a state download from peers (load_state_from_peers), by outcome."
    );
    describe_gauge!("colony_epoch", "This peer's local epoch.");
    describe_gauge!("colony_global_epoch", "The swarm's epoch as this peer estimates it.");
    describe_gauge!(
        "colony_samples_accumulated",
        "Samples the swarm has accumulated towards the current epoch."
    );
    describe_gauge!("colony_target_batch_size", "Samples the swarm accumulates per epoch.");
    describe_gauge!(
        "colony_eta_seconds",
        Unit::Seconds,
        "Estimated time until the swarm reaches the next epoch."
    );
    describe_counter!("colony_rounds_total", "Averaging rounds, by kind and outcome.");
    describe_histogram!(
        "colony_round_seconds",
        Unit::Seconds,
        "Duration of an averaging round, by kind and outcome."
    );
    describe_histogram!(
        "colony_optimizer_step_seconds",
        Unit::Seconds,
        "Duration of the inner optimizer's step."
    );
    describe_histogram!(
        "colony_offload_copy_seconds",
        Unit::Seconds,
        "Duration of a copy between the device and the host buffers."
    );
    describe_counter!(
        "colony_offload_copy_bytes_total",
        Unit::Bytes,
        "Bytes copied between the device and the host buffers."
    );
}
