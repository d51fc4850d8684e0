//! The receiver's side of `/colony/state/1`: the driver that runs [`super::plan::Plan`]'s decisions over
//! streams, and the workers that read one range of chunks each.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_transports::rpc::{self, StreamConfig};
use colony_transports::wire::WireError;
use colony_transports::{Connection, PeerId, StreamError};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::plan::{Plan, Verdict, WorkerId};
use super::wire::{
    ChunkFault, StateInfo, StateRequest, StateResponse, check_chunk, chunk_count, chunk_range, decode_values,
};
use super::{Donor, DonorIssue, DownloadConfig, DownloadError, DownloadedState, MAX_CHUNK_VALUES, protocol};
use crate::net::Connector;
use crate::tensor::{FlatTensors, SchemaHash, TensorLayout};

/// Events buffered from workers before they wait for the driver.
const EVENT_QUEUE: usize = 64;

/// Downloads the state for `layout` from `donors`.
///
/// Donors are tried by priority, highest first (ties in random order, see
/// [`DownloadConfig::tie_break_seed`]); those below `own_epoch` are refused unasked, as are donors whose
/// info announces an epoch below it or another schema. Donors of the best priority serve disjoint ranges in
/// parallel; a donor that fails, stalls past [`DownloadConfig::chunk_timeout`] or sends a bad chunk
/// (wrong length, NaN or infinity) is dropped and its remaining chunks go to others. Returns the state with
/// the donors it came from, or every donor tried and why it failed.
///
/// Cancel-safe: every stream and task it starts belongs to the returned future; dropping the future aborts
/// them (each stops, and closes its stream, at its next poll).
pub async fn download(
    connector: &dyn Connector,
    donors: &[Donor],
    layout: &Arc<TensorLayout>,
    own_epoch: Option<u64>,
    config: &DownloadConfig,
) -> Result<DownloadedState, DownloadError> {
    let started = Instant::now();
    let result = download_timed(connector, donors, layout, own_epoch, config).await;
    let outcome = match &result {
        Ok(_) => "loaded",
        Err(DownloadError::NoDonors) => "no_donors",
        Err(DownloadError::InvalidConfig(_)) => "invalid_config",
        Err(DownloadError::Exhausted { .. }) => "exhausted",
        Err(DownloadError::TimedOut { .. }) => "timed_out",
    };
    // The bytes are counted by the transport under `protocol="state"`.
    metrics::histogram!("colony_state_transfer_seconds", "outcome" => outcome).record(started.elapsed().as_secs_f64());
    result
}

async fn download_timed(
    connector: &dyn Connector,
    donors: &[Donor],
    layout: &Arc<TensorLayout>,
    own_epoch: Option<u64>,
    config: &DownloadConfig,
) -> Result<DownloadedState, DownloadError> {
    let chunk_values = (config.chunk_bytes / 4) as u64;
    if chunk_values == 0 || chunk_values > MAX_CHUNK_VALUES {
        return Err(DownloadError::InvalidConfig(format!(
            "chunk_bytes is {}, it must hold 1 to {MAX_CHUNK_VALUES} values of 4 bytes",
            config.chunk_bytes
        )));
    }
    if config.chunk_bytes as u64 > config.stream.limits.max_payload_bytes {
        return Err(DownloadError::InvalidConfig(format!(
            "chunk_bytes ({}) exceeds the stream's payload limit ({})",
            config.chunk_bytes, config.stream.limits.max_payload_bytes
        )));
    }
    if config.max_parallel_donors == 0 {
        return Err(DownloadError::InvalidConfig(
            "max_parallel_donors must be at least 1".into(),
        ));
    }
    if donors.is_empty() {
        return Err(DownloadError::NoDonors);
    }
    let total_values = layout.total_values() as u64;
    let chunks = chunk_count(total_values, chunk_values);
    let mut stream = config.stream;
    stream.message_timeout = config.chunk_timeout;
    stream.limits.max_payload_bytes = stream
        .limits
        .max_payload_bytes
        .min(config.chunk_bytes.max(config.max_metadata_bytes) as u64);
    let expect = Arc::new(Expectation {
        schema_hash: layout.schema_hash(),
        total_values,
        chunk_values,
        own_epoch,
        max_metadata_bytes: config.max_metadata_bytes,
        stream,
    });
    let plan = Plan::new(
        order(donors, config.tie_break_seed),
        own_epoch,
        chunks,
        config.max_parallel_donors,
    );
    let driver = Driver {
        plan,
        expect,
        values: vec![0.0; layout.total_values()],
        workers: HashMap::new(),
        tasks: JoinSet::new(),
        events: mpsc::channel(EVENT_QUEUE),
    };
    driver.run(connector, layout, config).await
}

/// Highest priority first; a shuffle before the stable sort orders equal priorities at random.
fn order(donors: &[Donor], seed: Option<u64>) -> Vec<Donor> {
    let mut rng = match seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => rand::make_rng(),
    };
    let mut ordered = donors.to_vec();
    ordered.shuffle(&mut rng);
    ordered.sort_by_key(|donor| std::cmp::Reverse(donor.priority));
    ordered
}

/// What every donor's info must match.
struct Expectation {
    schema_hash: SchemaHash,
    total_values: u64,
    chunk_values: u64,
    own_epoch: Option<u64>,
    max_metadata_bytes: usize,
    stream: StreamConfig,
}

impl Expectation {
    fn check(&self, info: &StateInfo, metadata_len: usize) -> Result<(), DonorIssue> {
        if info.schema_hash != self.schema_hash.0 {
            return Err(DonorIssue::SchemaMismatch {
                announced: SchemaHash(info.schema_hash),
                expected: self.schema_hash,
            });
        }
        if info.total_values != self.total_values {
            return Err(DonorIssue::SizeMismatch {
                announced: info.total_values,
                expected: self.total_values,
            });
        }
        if info.chunk_values != self.chunk_values {
            return Err(DonorIssue::Malformed(format!(
                "chunks of {} values announced, {} requested",
                info.chunk_values, self.chunk_values
            )));
        }
        if let Some(own_epoch) = self.own_epoch
            && info.epoch < own_epoch
        {
            return Err(DonorIssue::EpochBelowOwn {
                epoch: info.epoch,
                own_epoch,
            });
        }
        if metadata_len > self.max_metadata_bytes {
            return Err(DonorIssue::MetadataTooLarge {
                len: metadata_len,
                limit: self.max_metadata_bytes,
            });
        }
        Ok(())
    }

    fn chunk_len(&self, index: u64) -> usize {
        chunk_range(index, self.chunk_values, self.total_values).len()
    }
}

/// What workers tell the driver, in order per worker: an info, chunks, then their end.
enum Event {
    Info {
        worker: WorkerId,
        epoch: u64,
        metadata: Bytes,
    },
    Chunk {
        worker: WorkerId,
        index: u64,
        payload: Bytes,
    },
    Ended {
        worker: WorkerId,
        result: Result<(), DonorIssue>,
    },
}

type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Connection, DonorIssue>> + Send + 'a>>;

struct Driver {
    plan: Plan,
    expect: Arc<Expectation>,
    values: Vec<f32>,
    /// Per running worker: its shared end (lowered when its range is split) and how to stop it.
    workers: HashMap<WorkerId, (Arc<AtomicU64>, AbortHandle)>,
    /// Owns every worker: dropping the driver (or the download future) aborts them.
    tasks: JoinSet<()>,
    events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
}

impl Driver {
    async fn run(
        mut self,
        connector: &dyn Connector,
        layout: &Arc<TensorLayout>,
        config: &DownloadConfig,
    ) -> Result<DownloadedState, DownloadError> {
        let deadline = tokio::time::Instant::now() + config.total_timeout;
        let mut connecting: Option<(usize, ConnectFuture<'_>)> = None;
        loop {
            if self.plan.is_complete() {
                return Ok(self.finish(layout));
            }
            if connecting.is_none()
                && let Some((index, peer)) = self.plan.next_connect()
            {
                connecting = Some((index, connect(connector, peer, config.chunk_timeout)));
            }
            if connecting.is_none() && self.plan.is_stuck() {
                return Err(DownloadError::Exhausted {
                    donors: self.plan.issues().to_vec(),
                });
            }
            let connect_step = async {
                match connecting.as_mut() {
                    Some((index, future)) => (*index, future.await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    return Err(DownloadError::TimedOut {
                        after: config.total_timeout,
                        donors: self.plan.issues().to_vec(),
                    });
                }
                (index, result) = connect_step => {
                    connecting = None;
                    match result {
                        Ok(conn) => self.start_worker(index, conn),
                        Err(issue) => self.plan.connect_failed(index, issue),
                    }
                }
                Some(event) = self.events.1.recv() => self.handle(event),
                // Reap finished tasks; their outcome came as an event.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
    }

    fn start_worker(&mut self, index: usize, conn: Connection) {
        let Some(assignment) = self.plan.connected(index) else {
            return;
        };
        if let Some((shortened, end)) = assignment.shortened
            && let Some((shared_end, _)) = self.workers.get(&shortened)
        {
            shared_end.store(end, Ordering::Release);
        }
        let end = Arc::new(AtomicU64::new(assignment.range.end));
        let job = Job {
            worker: assignment.worker,
            conn,
            range: assignment.range,
            end: end.clone(),
            expect: self.expect.clone(),
            events: self.events.0.clone(),
        };
        let abort = self.tasks.spawn(job.run());
        self.workers.insert(assignment.worker, (end, abort));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Info {
                worker,
                epoch,
                metadata,
            } => {
                if self.plan.on_info(worker, epoch, metadata) == Verdict::Refuse
                    && let Some((_, abort)) = self.workers.remove(&worker)
                {
                    abort.abort();
                }
            }
            Event::Chunk { worker, index, payload } => {
                if self.plan.on_chunk(worker, index) {
                    let range = chunk_range(index, self.expect.chunk_values, self.expect.total_values);
                    decode_values(&payload, &mut self.values[range]);
                }
            }
            Event::Ended { worker, result } => {
                self.workers.remove(&worker);
                self.plan.on_ended(worker, result);
            }
        }
    }

    fn finish(self, layout: &Arc<TensorLayout>) -> DownloadedState {
        let (anchor, donors, issues) = self
            .plan
            .finish()
            .expect("a complete plan has an anchor (is_complete requires it)");
        let tensors = FlatTensors::new(layout.clone(), self.values)
            .expect("the buffer was allocated with the layout's number of values");
        DownloadedState {
            epoch: anchor.epoch,
            metadata: anchor.metadata,
            tensors,
            donors,
            issues,
        }
    }
}

fn connect(connector: &dyn Connector, peer: PeerId, timeout: Duration) -> ConnectFuture<'_> {
    Box::pin(async move {
        match tokio::time::timeout(timeout, connector.connect(&peer)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(DonorIssue::Unreachable(error.reason)),
            Err(_) => Err(DonorIssue::TimedOut(format!("connecting took longer than {timeout:?}"))),
        }
    })
}

/// One worker: a stream to one donor for one range of chunks.
struct Job {
    worker: WorkerId,
    conn: Connection,
    range: Range<u64>,
    /// Where to stop; the driver lowers it when another donor takes the tail of the range.
    end: Arc<AtomicU64>,
    expect: Arc<Expectation>,
    events: mpsc::Sender<Event>,
}

impl Job {
    async fn run(self) {
        let result = self.fetch().await;
        // The driver is gone when this fails; nothing is left to report to.
        let _ = self
            .events
            .send(Event::Ended {
                worker: self.worker,
                result,
            })
            .await;
    }

    async fn fetch(&self) -> Result<(), DonorIssue> {
        let stream = &self.expect.stream;
        let timeout = stream.message_timeout;
        let (mut send, mut recv) = within(
            timeout,
            "opening a stream",
            rpc::open::<StateResponse>(&self.conn, &protocol(), stream),
        )
        .await?;
        let request = StateRequest {
            chunk_values: self.expect.chunk_values,
            start_chunk: self.range.start,
            chunk_count: self.range.end - self.range.start,
        };
        within(timeout, "sending the request", send.send(&request, Bytes::new())).await?;
        within(timeout, "sending the request", send.finish()).await?;
        let (first, metadata) = recv.recv_required("the state info").await.map_err(wire_issue)?;
        let info = match first {
            StateResponse::Info(info) => info,
            StateResponse::Refused { reason } => return Err(DonorIssue::NotSharing(reason)),
            StateResponse::Chunk { index } => {
                return Err(DonorIssue::Malformed(format!(
                    "chunk {index} arrived before the state info"
                )));
            }
        };
        self.expect.check(&info, metadata.len())?;
        let info_event = Event::Info {
            worker: self.worker,
            epoch: info.epoch,
            metadata,
        };
        if self.events.send(info_event).await.is_err() {
            return Ok(());
        }
        let mut next = self.range.start;
        while next < self.end.load(Ordering::Acquire) {
            let (message, payload) = recv.recv_required("a chunk").await.map_err(wire_issue)?;
            let arrived = match message {
                StateResponse::Chunk { index } if index == next => None,
                StateResponse::Chunk { index } => Some(format!("chunk {index}")),
                StateResponse::Info(_) => Some("a second state info".to_owned()),
                StateResponse::Refused { .. } => Some("a refusal".to_owned()),
            };
            if let Some(arrived) = arrived {
                return Err(DonorIssue::Malformed(format!(
                    "{arrived} arrived where chunk {next} was due"
                )));
            }
            check_chunk(&payload, self.expect.chunk_len(next)).map_err(|fault| match fault {
                ChunkFault::Length { bytes, expected_bytes } => DonorIssue::ChunkLength {
                    index: next,
                    bytes,
                    expected_bytes,
                },
                ChunkFault::NonFinite { position } => DonorIssue::NonFinite { index: next, position },
            })?;
            let chunk = Event::Chunk {
                worker: self.worker,
                index: next,
                payload,
            };
            if self.events.send(chunk).await.is_err() {
                return Ok(());
            }
            next += 1;
        }
        if next < self.range.end {
            // Another donor took the rest of the range: tell this one to stop sending it.
            recv.stop(0);
        }
        Ok(())
    }
}

async fn within<T>(
    after: Duration,
    what: &'static str,
    step: impl Future<Output = Result<T, WireError>>,
) -> Result<T, DonorIssue> {
    match tokio::time::timeout(after, step).await {
        Ok(result) => result.map_err(wire_issue),
        Err(_) => Err(DonorIssue::TimedOut(format!("{what} took longer than {after:?}"))),
    }
}

fn wire_issue(error: WireError) -> DonorIssue {
    match error {
        WireError::Stream(StreamError::Timeout { what, after }) => {
            DonorIssue::TimedOut(format!("{what}: nothing within {after:?}"))
        }
        WireError::Remote(message) => DonorIssue::DonorError(message),
        WireError::Stream(stream) => DonorIssue::StreamFailed(stream.to_string()),
        other => DonorIssue::Malformed(other.to_string()),
    }
}
