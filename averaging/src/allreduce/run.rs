//! One peer's run of a round: the sending side (one task per remote reducer), the reducing side (one reader
//! and one writer task per remote sender) and the collector that assembles results tensor by tensor.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use colony_transports::PeerId;
use colony_transports::rpc::{self, FramedRecv, FramedSend, StreamConfig};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::buffer::{RoundBuffer, f32_bytes};
use super::messages::{Refusal, ToReducer, ToSender};
use super::service::{AllReduceService, IncomingPart, Registration, refuse};
use super::{AllReduceConfig, AllReduceError, Fault, GroupPlan, Outcome, PeerMode, Report, protocol};
use crate::codec::{Codec, CodecError};
use crate::net::Connector;
use crate::partition::{PartitionPlan, values_per_part};
use crate::reducer::{PartReducer, ReducerError, SumPool, all_finite};
use crate::tensor::{FlatTensors, TensorLayout};

/// A tensor whose every part is in: its averaged values (local values where a reducer failed).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReady {
    /// Index in the layout.
    pub index: usize,
    /// Its values.
    pub values: Vec<f32>,
}

/// A round in progress. Dropping it cancels the round (every task and stream of it ends).
pub struct AllReduceRun {
    tensors: mpsc::UnboundedReceiver<TensorReady>,
    outcome: Option<oneshot::Receiver<Result<Outcome, AllReduceError>>>,
    driver: JoinHandle<()>,
}

impl AllReduceRun {
    /// The next tensor whose parts are all in, in layout order; `None` once every tensor was delivered or
    /// the round ended (or when this peer receives no results: an auxiliary).
    pub async fn next_tensor(&mut self) -> Option<TensorReady> {
        self.tensors.recv().await
    }

    /// Waits for the end of the round. Tensors not taken with [`AllReduceRun::next_tensor`] are not copied
    /// out any more; they are in the outcome's buffer.
    pub async fn finish(mut self) -> Result<Outcome, AllReduceError> {
        self.tensors.close();
        let outcome = self.outcome.take().ok_or(AllReduceError::Cancelled)?;
        outcome.await.unwrap_or(Err(AllReduceError::Cancelled))
    }

    /// Cancels the round: outgoing streams are reset, and late senders are told "cancelled".
    pub fn cancel(&self) {
        self.driver.abort();
    }
}

impl Drop for AllReduceRun {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What the collector learns about one part.
enum PartUpdate {
    /// Add this delta to the local values.
    Delta { part: usize, values: Vec<f32> },
    /// The part's average, uncompressed little-endian f32 checked finite, as received.
    RawAverage { part: usize, bytes: Bytes },
    /// The part's average (this peer reduced it).
    Average { part: usize, values: Arc<Average> },
}

/// Everything the tasks of a run share, immutable.
struct RunContext {
    plan: GroupPlan,
    me: usize,
    partition: PartitionPlan,
    layout: Arc<TensorLayout>,
    codecs: Vec<Codec>,
    config: AllReduceConfig,
    /// This peer's values, averaged in place (senders only).
    local: Option<Arc<RoundBuffer>>,
    /// Member index → sender slot (auxiliaries send nothing).
    sender_slot: Vec<Option<usize>>,
    /// The service's spare buffers for the sums of the parts this peer reduces.
    sums: Arc<SumPool>,
}

impl RunContext {
    fn part_codec(&self, part: usize) -> Codec {
        self.codecs[self.partition.parts()[part].tensor]
    }

    fn part_range(&self, part: usize) -> Range<usize> {
        self.partition.parts()[part].range.clone()
    }

    fn row_len(&self, part: usize) -> usize {
        self.layout.tensors()[self.partition.parts()[part].tensor].row_len()
    }

    fn stream_config(&self, message_timeout: Duration) -> StreamConfig {
        StreamConfig {
            message_timeout,
            ..self.config.stream
        }
    }
}

/// Starts this peer's part of a round. `tensors` are this peer's values (required unless it is an
/// auxiliary); `layout` must be the group's layout. The run proceeds in the background; see
/// [`AllReduceRun`].
pub fn start(
    service: &AllReduceService,
    connector: Arc<dyn Connector>,
    plan: GroupPlan,
    me: PeerId,
    layout: Arc<TensorLayout>,
    tensors: Option<FlatTensors>,
    config: AllReduceConfig,
) -> Result<AllReduceRun, AllReduceError> {
    config
        .aggregation
        .validate()
        .map_err(|e| AllReduceError::InvalidConfig(format!("aggregation: {e}")))?;
    let me = plan.validate(me)?;
    let mode = plan.members[me].mode;
    let local = match (mode, tensors) {
        (PeerMode::Auxiliary, _) => None,
        (_, None) => return Err(AllReduceError::BadInput("gave no tensors".into())),
        (_, Some(tensors)) => {
            if **tensors.layout() != *layout {
                return Err(AllReduceError::BadInput("gave tensors of another layout".into()));
            }
            Some(tensors.into_vec())
        }
    };
    let codecs: Vec<Codec> = layout.tensors().iter().map(|t| config.codecs.codec_for(t)).collect();
    let part_values = |index: usize, _: &crate::tensor::TensorInfo| {
        values_per_part(config.part_size_bytes, codecs[index].bytes_per_value())
    };
    let partition = PartitionPlan::new(&layout, part_values, &plan.effective_shares())?;
    let local = local.map(|values| Arc::new(RoundBuffer::new(values, partition.parts().len())));
    let mut slots = 0;
    let sender_slot = plan
        .members
        .iter()
        .map(|m| {
            (m.mode != PeerMode::Auxiliary).then(|| {
                slots += 1;
                slots - 1
            })
        })
        .collect();

    // Register before returning, so streams that arrive from now on find this run.
    let mut registration = (!partition.parts_of_peer(me).is_empty()).then(|| service.register(plan.group_id));
    let (tensor_sender, tensor_receiver) = mpsc::unbounded_channel();
    let (outcome_sender, outcome_receiver) = oneshot::channel();
    if config.fault == Some(Fault::Cancel) {
        if let Some(registration) = registration.as_mut() {
            registration.outcome = Refusal::Cancelled;
        }
        drop(registration);
        service.refuse_group(plan.group_id);
        let _ = outcome_sender.send(Err(AllReduceError::Cancelled));
        return Ok(AllReduceRun {
            tensors: tensor_receiver,
            outcome: Some(outcome_receiver),
            driver: tokio::spawn(async {}),
        });
    }
    let context = Arc::new(RunContext {
        plan,
        me,
        partition,
        layout,
        codecs,
        config,
        local,
        sender_slot,
        sums: service.sum_pool(),
    });
    let driver = tokio::spawn(async move {
        let mut guard = CancelGuard(registration.take());
        let result = drive(context, connector, guard.0.as_mut(), tensor_sender).await;
        guard.0.take();
        let _ = outcome_sender.send(result);
    });
    Ok(AllReduceRun {
        tensors: tensor_receiver,
        outcome: Some(outcome_receiver),
        driver,
    })
}

/// Marks the registration "cancelled" when the driver is aborted before it finishes.
struct CancelGuard(Option<Registration>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(registration) = self.0.as_mut() {
            registration.outcome = Refusal::Cancelled;
        }
    }
}

async fn drive(
    context: Arc<RunContext>,
    connector: Arc<dyn Connector>,
    registration: Option<&mut Registration>,
    tensor_sender: mpsc::UnboundedSender<TensorReady>,
) -> Result<Outcome, AllReduceError> {
    let deadline = Instant::now() + context.config.allreduce_timeout;
    let (updates, mut update_receiver) = mpsc::unbounded_channel();
    let mut tasks: JoinSet<TaskReport> = JoinSet::new();
    if context.local.is_some() {
        let reducers = context.partition.num_peers();
        let last_reducer = (0..reducers)
            .rev()
            .find(|&j| j != context.me && !context.partition.parts_of_peer(j).is_empty());
        for reducer in 0..reducers {
            if reducer == context.me || context.partition.parts_of_peer(reducer).is_empty() {
                continue;
            }
            let fault = context.config.fault.filter(|_| Some(reducer) == last_reducer);
            tasks.spawn(exchange_with_reducer(
                context.clone(),
                connector.clone(),
                reducer,
                updates.clone(),
                fault,
            ));
        }
    }
    let reducing = registration
        .map(|registration| reduce_own_parts(context.clone(), registration, updates.clone(), connector.clone()));
    drop(updates);

    let mut collector = Collector::new(&context, tensor_sender);
    let mut report = Report {
        parts: context.partition.parts().len(),
        ..Report::default()
    };
    let work = async {
        let mut reducing_report = None;
        let reducing = async {
            if let Some(reducing) = reducing {
                reducing_report = Some(reducing.await);
            }
        };
        let collecting = async {
            loop {
                let Some(buffer) = context.local.as_ref().filter(|_| collector.has_deferred()) else {
                    match update_receiver.recv().await {
                        Some(update) => collector.apply(update),
                        None => break,
                    }
                    continue;
                };
                // A result waits for its part's payload to leave: retry when a lease ends (listening before
                // the retry, so an end in between is not missed).
                let released = buffer.released();
                tokio::pin!(released);
                released.as_mut().enable();
                collector.retry_deferred();
                if !collector.has_deferred() {
                    continue;
                }
                tokio::select! {
                    update = update_receiver.recv() => match update {
                        Some(update) => collector.apply(update),
                        None => break,
                    },
                    () = released => {}
                }
            }
        };
        let joining = async {
            let mut reports = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                if let Ok(task_report) = joined {
                    reports.push(task_report);
                }
            }
            reports
        };
        let ((), (), reports) = tokio::join!(reducing, collecting, joining);
        (reducing_report, reports)
    };
    let timed_out = match tokio::time::timeout_at(deadline, work).await {
        Ok((reducing_report, reports)) => {
            for task in reports.into_iter().chain(reducing_report) {
                match task {
                    TaskReport::ReducerFailed { peer, non_finite } => {
                        report.failed_reducers.push(peer);
                        report.non_finite_parts += usize::from(non_finite);
                    }
                    TaskReport::Reduced {
                        dropped,
                        non_finite,
                        clipped,
                    } => {
                        report.dropped_senders.extend(dropped);
                        report.non_finite_parts += non_finite;
                        report.clipped_copies += clipped;
                    }
                    TaskReport::Fine => {}
                }
            }
            false
        }
        Err(_) => true,
    };
    if timed_out && context.local.is_none() {
        return Err(AllReduceError::Timeout(context.config.allreduce_timeout));
    }
    report.timed_out = timed_out;
    // Every task of the run ends here (tasks still running after a timeout are aborted); then the buffer
    // comes back, and results still waiting for their payload to leave are written into it.
    drop(tasks);
    let layout = context.layout.clone();
    let buffer = collector.buffer.take();
    drop(context);
    let tensors = match buffer {
        Some(buffer) => {
            let mut values = RoundBuffer::into_vec(buffer, BUFFER_RETURN_WAIT).await;
            collector.finish(&mut values);
            Some(FlatTensors::new(layout, values).expect("the buffer keeps the layout's length"))
        }
        None => None,
    };
    report.parts_averaged = collector.averaged;
    Ok(Outcome { tensors, report })
}

/// How long the end of a round waits for the transport to drop the payloads it has written before it
/// returns a copy of the buffer instead of the caller's own.
const BUFFER_RETURN_WAIT: Duration = Duration::from_secs(1);

/// Writes each part's result over this peer's values and hands out tensors in order as they complete.
struct Collector {
    /// This peer's values (none for an auxiliary), written in place.
    buffer: Option<Arc<RoundBuffer>>,
    /// Per part: its range of values and its tensor.
    parts: Vec<(Range<usize>, usize)>,
    done: Vec<bool>,
    /// Results whose part was still leased to an outgoing payload when they arrived.
    deferred: Vec<PartUpdate>,
    remaining_by_tensor: Vec<usize>,
    next_tensor: usize,
    averaged: usize,
    tensors: mpsc::UnboundedSender<TensorReady>,
    ranges: Vec<Range<usize>>,
}

impl Collector {
    fn new(context: &RunContext, tensors: mpsc::UnboundedSender<TensorReady>) -> Self {
        let count = context.layout.len();
        let parts = context.partition.parts();
        let mut collector = Self {
            buffer: context.local.clone(),
            parts: parts.iter().map(|p| (p.range.clone(), p.tensor)).collect(),
            done: vec![false; parts.len()],
            deferred: Vec::new(),
            remaining_by_tensor: (0..count).map(|t| context.partition.parts_of_tensor(t).len()).collect(),
            next_tensor: 0,
            averaged: 0,
            tensors,
            ranges: (0..count).map(|t| context.layout.range(t)).collect(),
        };
        collector.hand_out();
        collector
    }

    fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Writes `update` over its part, or defers it while the part's payload is still on its way out.
    fn apply(&mut self, update: PartUpdate) {
        let part = update.part();
        if self.done[part] {
            return;
        }
        if let Some(buffer) = &self.buffer {
            if buffer.leased(part) {
                self.deferred.push(update);
                return;
            }
            // SAFETY: the collector is the only writer; the part's result is in, so its sender or reducer
            // has read it for the last time, and no payload borrows it (checked just above; a part is
            // leased only before it is sent, never after its result arrived).
            let target = unsafe { buffer.write(self.parts[part].0.clone()) };
            update.write_over(target);
        }
        self.complete(part);
        self.hand_out();
    }

    fn retry_deferred(&mut self) {
        for update in std::mem::take(&mut self.deferred) {
            self.apply(update);
        }
    }

    fn complete(&mut self, part: usize) {
        self.done[part] = true;
        self.averaged += 1;
        self.remaining_by_tensor[self.parts[part].1] -= 1;
    }

    fn hand_out(&mut self) {
        let Some(buffer) = self.buffer.as_ref() else { return };
        if self.tensors.is_closed() {
            // Nobody takes tensors one by one (the owner waits for the whole buffer): skip the copies.
            return;
        }
        while self.next_tensor < self.remaining_by_tensor.len() && self.remaining_by_tensor[self.next_tensor] == 0 {
            let index = self.next_tensor;
            // SAFETY: every part of the tensor is complete: only the collector (this) wrote them, and
            // nobody writes them any more.
            let values = unsafe { buffer.read(self.ranges[index].clone()) }.to_vec();
            let _ = self.tensors.send(TensorReady { index, values });
            self.next_tensor += 1;
        }
    }

    /// With the round's buffer back: writes the deferred results into it, and hands out what is left (parts
    /// without a result keep this peer's values, which are already there).
    fn finish(&mut self, values: &mut [f32]) {
        for update in std::mem::take(&mut self.deferred) {
            let part = update.part();
            if !self.done[part] {
                update.write_over(&mut values[self.parts[part].0.clone()]);
                self.complete(part);
            }
        }
        if self.tensors.is_closed() {
            return;
        }
        for index in self.next_tensor..self.ranges.len() {
            let _ = self.tensors.send(TensorReady {
                index,
                values: values[self.ranges[index].clone()].to_vec(),
            });
        }
        self.next_tensor = self.ranges.len();
    }
}

impl PartUpdate {
    fn part(&self) -> usize {
        match self {
            Self::Delta { part, .. } | Self::RawAverage { part, .. } | Self::Average { part, .. } => *part,
        }
    }

    /// Writes the result over `target`, which holds this peer's values of the part.
    fn write_over(&self, target: &mut [f32]) {
        match self {
            Self::Delta { values, .. } => {
                for (value, delta) in target.iter_mut().zip(values) {
                    *value += delta;
                }
            }
            Self::RawAverage { bytes, .. } => match aligned_f32s(bytes) {
                Some(averages) => target.copy_from_slice(averages),
                None => {
                    for (value, average) in target.iter_mut().zip(bytes.chunks_exact(4)) {
                        *value = f32::from_le_bytes([average[0], average[1], average[2], average[3]]);
                    }
                }
            },
            Self::Average { values, .. } => target.copy_from_slice(values),
        }
    }
}

enum TaskReport {
    Fine,
    /// A reducer failed this peer; `non_finite` when it sent a result with NaN or infinity.
    ReducerFailed {
        peer: PeerId,
        non_finite: bool,
    },
    /// This peer's reducing side: the senders it dropped, the parts it refused as non-finite and the copies
    /// CenteredClip clipped.
    Reduced {
        dropped: Vec<PeerId>,
        non_finite: usize,
        clipped: usize,
    },
}

/// Why a stream's exchange ended early, and whether the cause was a NaN or an infinity (counted apart).
struct Failure {
    reason: String,
    non_finite: bool,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            non_finite: false,
        }
    }
}

impl Failure {
    /// A failure whose cause is a non-finite value: counted in `colony_allreduce_parts_refused_total`.
    fn non_finite(reason: String) -> Self {
        metrics::counter!("colony_allreduce_parts_refused_total", "reason" => "non_finite").increment(1);
        Self {
            reason,
            non_finite: true,
        }
    }

    fn codec(error: CodecError, reason: String) -> Self {
        if matches!(error, CodecError::NonFinite { .. }) {
            Self::non_finite(reason)
        } else {
            Self::from(reason)
        }
    }

    fn reducer(error: ReducerError, reason: String) -> Self {
        if matches!(error, ReducerError::NonFinite { .. }) {
            Self::non_finite(reason)
        } else {
            Self::from(reason)
        }
    }
}

/// Sends this peer's parts to reducer `reducer` and applies the deltas it returns.
async fn exchange_with_reducer(
    context: Arc<RunContext>,
    connector: Arc<dyn Connector>,
    reducer: usize,
    updates: mpsc::UnboundedSender<PartUpdate>,
    fault: Option<Fault>,
) -> TaskReport {
    let peer = context.plan.members[reducer].peer;
    let timeout = context.config.reducer_timeout;
    let opened = async {
        let conn = tokio::time::timeout(timeout, connector.connect(&peer))
            .await
            .map_err(|_| format!("no connection within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = rpc::open::<ToSender>(&conn, &protocol(), &context.stream_config(timeout))
            .await
            .map_err(|e| e.to_string())?;
        let begin = ToReducer::Begin {
            group_id: context.plan.group_id.0,
        };
        send.send(&begin, Bytes::new()).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv))
    };
    let (send, recv) = match tokio::time::timeout(timeout, opened).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(reason)) => return reducer_failed(peer, reason.into()),
        Err(_) => {
            return reducer_failed(peer, format!("could not open a stream within {timeout:?}").into());
        }
    };
    let parts = context.partition.parts_of_peer(reducer);
    let (sent_sender, sent) = watch::channel(SendProgress::default());
    let sending = send_parts(&context, send, parts.clone(), sent_sender, fault);
    let receiving = receive_results(&context, recv, parts, sent, &updates);
    // A peer that reduces nothing reads its results only after it has sent everything.
    let received = if context.partition.parts_of_peer(context.me).is_empty() {
        sending.await;
        receiving.await
    } else {
        tokio::join!(sending, receiving).1
    };
    match received {
        Ok(()) => TaskReport::Fine,
        Err(failure) => reducer_failed(peer, failure),
    }
}

fn reducer_failed(peer: PeerId, failure: Failure) -> TaskReport {
    let reason = failure.reason;
    tracing::debug!(reducer = %peer.short(), %reason, "all-reduce: reducer failed; its parts keep local values");
    TaskReport::ReducerFailed {
        peer,
        non_finite: failure.non_finite,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SendProgress {
    sent: usize,
    finished: bool,
}

async fn send_parts(
    context: &RunContext,
    mut send: FramedSend,
    parts: Range<usize>,
    progress: watch::Sender<SendProgress>,
    fault: Option<Fault>,
) {
    let local = context.local.as_ref().expect("only senders send parts");
    let mut sent = 0;
    for part in parts {
        let codec = context.part_codec(part);
        let payload = encode_local_part(codec, local, part, context.part_range(part), context.row_len(part));
        let message = ToReducer::Part {
            index: part as u64,
            codec: codec.id(),
        };
        if send.send(&message, payload).await.is_err() {
            break;
        }
        sent += 1;
        progress.send_replace(SendProgress { sent, finished: false });
        match fault {
            Some(Fault::SlowSending) if sent == 1 => tokio::time::sleep(Duration::from_secs(10)).await,
            Some(Fault::FailSending) if sent == 1 => {
                send.reset(1);
                break;
            }
            _ => {}
        }
    }
    let _ = send.finish().await;
    progress.send_replace(SendProgress { sent, finished: true });
}

async fn receive_results(
    context: &RunContext,
    recv: FramedRecv<ToSender>,
    parts: Range<usize>,
    mut progress: watch::Receiver<SendProgress>,
    updates: &mpsc::UnboundedSender<PartUpdate>,
) -> Result<(), Failure> {
    let mut recv = recv;
    for (position, part) in parts.clone().enumerate() {
        // Never wait for the result of a part that was not sent.
        let state = *progress
            .wait_for(|p| p.sent > position || p.finished)
            .await
            .map_err(|_| "the sending side ended".to_owned())?;
        if state.sent <= position {
            return Err(format!("sent only {} of {} parts", state.sent, parts.len()).into());
        }
        let (message, payload) = recv
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the stream ended after {position} of {} results", parts.len()))?;
        let (index, codec) = match message {
            ToSender::Averaged { index, codec } => (index, codec),
            ToSender::Refused { code, detail } => {
                let why = Refusal::from_code(code).map_or_else(|| format!("refusal code {code}"), |r| r.to_string());
                return Err(format!("refused: {why} ({detail})").into());
            }
        };
        if index != part as u64 {
            return Err(format!("expected the result of part {part}, got part {index}").into());
        }
        let expected = context.part_codec(part);
        if codec != expected.id() {
            return Err(format!("result of part {part} in codec {codec}, expected {}", expected.id()).into());
        }
        let len = context.part_range(part).len();
        let update = if expected == Codec::None {
            // Uncompressed: the average itself (no compression error to cancel), checked here and copied
            // straight from the received bytes.
            if payload.len() != len * 4 {
                return Err(format!("result of part {part}: {} bytes for {len} values", payload.len()).into());
            }
            // Received buffers are aligned: check them as f32 a block at a time (vectorised); else per value.
            let finite = aligned_f32s(&payload).map_or_else(
                || {
                    payload
                        .chunks_exact(4)
                        .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                },
                all_finite,
            );
            if !finite {
                let at = payload
                    .chunks_exact(4)
                    .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                    .unwrap_or_default();
                return Err(Failure::non_finite(format!(
                    "result of part {part}: value {at} is not finite"
                )));
            }
            PartUpdate::RawAverage { part, bytes: payload }
        } else {
            let values = expected.decode(&payload, len).map_err(|e| {
                let reason = format!("result of part {part}: {e}");
                Failure::codec(e, reason)
            })?;
            PartUpdate::Delta { part, values }
        };
        if updates.send(update).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// A part's average as this peer reduced it; its buffer goes back to the pool once every sender's copy
/// of it has been written out.
struct Average {
    values: Vec<f32>,
    pool: Arc<SumPool>,
}

impl std::ops::Deref for Average {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.values
    }
}

impl Drop for Average {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.values));
    }
}

/// The reducing side's shared state.
struct ReducerCore {
    reducer: PartReducer,
    /// Where the reducer's sums come from and its averages return.
    pool: Arc<SumPool>,
    /// First global part index this peer reduces.
    first: usize,
    /// Per sender slot: its parts (local index → values, codec) waiting for their average.
    pending: Vec<HashMap<usize, (Received, Codec)>>,
    /// Per sender slot: where its results go.
    writers: Vec<Option<mpsc::UnboundedSender<Reply>>>,
    started: Vec<bool>,
    dropped: Vec<PeerId>,
    /// This peer's own sender slot, if it sends.
    own_slot: Option<usize>,
    /// Parts refused because they held NaN or infinity.
    non_finite: usize,
    /// Copies CenteredClip clipped.
    clipped: usize,
}

struct Reply {
    part: usize,
    average: Arc<Average>,
    own: Received,
    codec: Codec,
}

/// What the reducer keeps of a sender's part until the average is ready.
enum Received {
    /// A compressed part, decoded: the sender gets `average − this` in its codec, so its own compression
    /// error cancels.
    Compressed(Vec<f32>),
    /// An uncompressed part: the sender gets the average itself, the same bytes for every sender.
    Uncompressed,
}

/// `bytes` as f32 values when they can be read in place: little-endian machine, 4-byte aligned, whole values.
fn aligned_f32s(bytes: &[u8]) -> Option<&[f32]> {
    if !cfg!(target_endian = "little") || !bytes.len().is_multiple_of(4) || bytes.as_ptr().align_offset(4) != 0 {
        return None;
    }
    // SAFETY: the pointer is 4-byte aligned (checked), the memory holds len/4 whole f32 of initialised bytes,
    // every bit pattern is a valid f32, and the returned slice borrows `bytes`, which outlives it.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) })
}

impl ReducerCore {
    /// Hands out every part that completed.
    fn drain(&mut self, updates: &mpsc::UnboundedSender<PartUpdate>) {
        while let Some(reduced) = self.reducer.next_completed() {
            let part = self.first + reduced.index;
            if reduced.clipped > 0 {
                self.clipped += reduced.clipped;
                metrics::counter!("colony_allreduce_clipped_copies_total").increment(reduced.clipped as u64);
            }
            let Some(values) = reduced.average else { continue };
            let average = Arc::new(Average {
                values,
                pool: self.pool.clone(),
            });
            if self.own_slot.is_some() {
                let _ = updates.send(PartUpdate::Average {
                    part,
                    values: average.clone(),
                });
            }
            for (slot, pending) in self.pending.iter_mut().enumerate() {
                if let Some((own, codec)) = pending.remove(&reduced.index)
                    && let Some(writer) = &self.writers[slot]
                {
                    let _ = writer.send(Reply {
                        part,
                        average: average.clone(),
                        own,
                        codec,
                    });
                }
            }
        }
        if self.reducer.is_finished() {
            // Every result is queued: writers finish their streams once they have sent them.
            self.writers.iter_mut().for_each(|w| *w = None);
        }
    }

    fn drop_sender(&mut self, slot: usize, peer: PeerId, reason: &str, updates: &mpsc::UnboundedSender<PartUpdate>) {
        // A sender is dropped once; later it may neither reconnect nor count for more parts.
        self.started[slot] = true;
        if self.dropped.contains(&peer) {
            return;
        }
        tracing::debug!(sender = %peer.short(), %reason, "all-reduce: dropping a sender from later parts");
        self.reducer.ban(slot);
        self.dropped.push(peer);
        self.pending[slot].clear();
        self.drain(updates);
    }

    fn report(&self) -> TaskReport {
        TaskReport::Reduced {
            dropped: self.dropped.clone(),
            non_finite: self.non_finite,
            clipped: self.clipped,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic inside would be a bug of ours; the state is still the best we have.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How often a reducer asks whether a sender that has not started is gone.
const GONE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Reduces the parts this peer owns: its own contribution locally, the others' from their streams.
async fn reduce_own_parts(
    context: Arc<RunContext>,
    registration: &mut Registration,
    updates: mpsc::UnboundedSender<PartUpdate>,
    connector: Arc<dyn Connector>,
) -> TaskReport {
    let own_parts = context.partition.parts_of_peer(context.me);
    let part_lens: Vec<usize> = own_parts.clone().map(|p| context.part_range(p).len()).collect();
    let weights: Vec<f32> = context
        .plan
        .members
        .iter()
        .filter(|m| m.mode != PeerMode::Auxiliary)
        .map(|m| m.weight)
        .collect();
    let senders = weights.len();
    let own_slot = context.sender_slot[context.me];
    let reducer = PartReducer::with_aggregation(part_lens, weights, context.config.aggregation)
        .expect("start validated the aggregation (invariant of start)")
        .with_pool(context.sums.clone());
    let core = Arc::new(Mutex::new(ReducerCore {
        reducer,
        pool: context.sums.clone(),
        first: own_parts.start,
        pending: (0..senders).map(|_| HashMap::new()).collect(),
        writers: (0..senders).map(|_| None).collect(),
        started: vec![false; senders],
        dropped: Vec::new(),
        own_slot,
        non_finite: 0,
        clipped: 0,
    }));
    if let (Some(slot), Some(local)) = (own_slot, context.local.as_ref()) {
        let mut core = lock(&core);
        core.started[slot] = true;
        for (index, part) in own_parts.clone().enumerate() {
            // SAFETY: nothing writes a part this peer reduces before its average exists, which needs this
            // contribution first (or the ban below).
            let own = unsafe { local.read(context.part_range(part)) };
            if let Err(error) = core.reducer.accumulate(slot, index, own) {
                tracing::warn!(%error, "all-reduce: this peer's own values were refused; dropping them");
                if matches!(error, ReducerError::NonFinite { .. }) {
                    core.non_finite += 1;
                    metrics::counter!("colony_allreduce_parts_refused_total", "reason" => "non_finite").increment(1);
                }
                core.reducer.ban(slot);
                break;
            }
        }
    }
    // Parts that wait for nobody (a group without senders) complete at once.
    lock(&core).drain(&updates);

    let replies_sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = Arc::new(Notify::new());
    let mut streams: JoinSet<()> = JoinSet::new();
    let missing_deadline = Instant::now() + context.config.sender_timeout;
    let mut missing_checked = false;
    let mut gone_check = tokio::time::interval(GONE_CHECK_INTERVAL);
    gone_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if lock(&core).reducer.is_finished() {
            break;
        }
        tokio::select! {
            _ = gone_check.tick(), if !missing_checked => {
                // A sender known to be gone (it crashed after the group formed) will not start: waiting for
                // it until the sender timeout would only stall everyone else's parts.
                let mut core = lock(&core);
                for (member, slot) in context.sender_slot.iter().enumerate() {
                    let peer = context.plan.members[member].peer;
                    if let Some(slot) = *slot && !core.started[slot] && connector.is_gone(&peer) {
                        core.drop_sender(slot, peer, "is gone (its connections broke)", &updates);
                    }
                }
            }
            incoming = registration.receiver.recv() => {
                let Some(incoming) = incoming else { break };
                accept_sender(&context, &core, incoming, &mut streams, &updates, &replies_sent, &failed).await;
            }
            () = tokio::time::sleep_until(missing_deadline), if !missing_checked => {
                missing_checked = true;
                let mut core = lock(&core);
                for (member, slot) in context.sender_slot.iter().enumerate() {
                    if let Some(slot) = *slot && !core.started[slot] {
                        let peer = context.plan.members[member].peer;
                        core.drop_sender(slot, peer, "did not start within the sender timeout", &updates);
                    }
                }
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            () = failed.notified() => {
                // Fault injection: this reducer dies with every stream of it.
                streams.abort_all();
                return lock(&core).report();
            }
        }
    }
    // Late senders of a finished run are refused by the service once the registration ends; the writers
    // finish sending what is queued.
    lock(&core).writers.iter_mut().for_each(|w| *w = None);
    loop {
        tokio::select! {
            joined = streams.join_next() => if joined.is_none() { break },
            () = failed.notified() => {
                streams.abort_all();
                break;
            }
        }
    }
    lock(&core).report()
}

async fn accept_sender(
    context: &Arc<RunContext>,
    core: &Arc<Mutex<ReducerCore>>,
    incoming: IncomingPart,
    streams: &mut JoinSet<()>,
    updates: &mpsc::UnboundedSender<PartUpdate>,
    replies_sent: &Arc<std::sync::atomic::AtomicUsize>,
    failed: &Arc<Notify>,
) {
    let member = context.plan.members.iter().position(|m| m.peer == incoming.peer);
    let slot = member
        .and_then(|m| context.sender_slot[m])
        .filter(|_| member != Some(context.me));
    let accepted = slot.filter(|&slot| {
        let mut core = lock(core);
        let fresh = !core.started[slot];
        core.started[slot] = true;
        fresh && core.reducer.delivered(slot) == 0
    });
    let Some(slot) = accepted else {
        let why = if slot.is_some() {
            (Refusal::Banned, "this sender was dropped or is already connected")
        } else {
            (Refusal::ProtocolViolation, "not a sender of this group")
        };
        streams.spawn(async move {
            let _ = refuse(incoming.send, why.0, why.1).await;
        });
        return;
    };
    let (writer_sender, writer_receiver) = mpsc::unbounded_channel();
    lock(core).writers[slot] = Some(writer_sender);
    let peer = incoming.peer;
    let reader_context = context.clone();
    let reader_core = core.clone();
    let reader_updates = updates.clone();
    let recv = FramedRecv::<ToReducer>::new(
        incoming.recv,
        context.config.stream.limits,
        context.config.sender_timeout,
    );
    streams.spawn(async move {
        if let Err(failure) = read_parts(&reader_context, &reader_core, slot, recv, &reader_updates).await {
            let mut core = lock(&reader_core);
            core.non_finite += usize::from(failure.non_finite);
            core.drop_sender(slot, peer, &failure.reason, &reader_updates);
        }
    });
    let writer_context = context.clone();
    let replies_sent = replies_sent.clone();
    let failed = failed.clone();
    streams.spawn(async move {
        write_results(&writer_context, incoming.send, writer_receiver, &replies_sent, &failed).await;
    });
}

/// Reads one sender's parts in order into the reducer.
async fn read_parts(
    context: &RunContext,
    core: &Mutex<ReducerCore>,
    slot: usize,
    mut recv: FramedRecv<ToReducer>,
    updates: &mpsc::UnboundedSender<PartUpdate>,
) -> Result<(), Failure> {
    let own_parts = context.partition.parts_of_peer(context.me);
    for (index, part) in own_parts.clone().enumerate() {
        let (message, payload) = recv
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the stream ended after {index} of {} parts", own_parts.len()))?;
        let ToReducer::Part { index: got, codec } = message else {
            return Err(String::from("a second Begin message").into());
        };
        if got != part as u64 {
            return Err(format!("expected part {part}, got part {got}").into());
        }
        let codec = Codec::from_id(codec).map_err(|e| e.to_string())?;
        let len = context.part_range(part).len();
        // Uncompressed aligned parts are accumulated from the received bytes (the reducer checks that every
        // value is finite); anything else is decoded first.
        let in_place = (codec == Codec::None)
            .then(|| aligned_f32s(&payload))
            .flatten()
            .filter(|values| values.len() == len);
        let decoded = match in_place {
            Some(_) => None,
            None => Some(codec.decode(&payload, len).map_err(|e| {
                let reason = format!("part {part}: {e}");
                Failure::codec(e, reason)
            })?),
        };
        let values = in_place.or(decoded.as_deref()).expect("one of the two is set");
        let mut core = lock(core);
        core.reducer.accumulate(slot, index, values).map_err(|e| {
            let reason = format!("part {part}: {e}");
            Failure::reducer(e, reason)
        })?;
        let received = match decoded {
            Some(values) if codec != Codec::None => Received::Compressed(values),
            _ => Received::Uncompressed,
        };
        core.pending[slot].insert(index, (received, codec));
        core.drain(updates);
    }
    Ok(())
}

/// Streams one sender's results back: the average for uncompressed parts, else the delta in its codec.
async fn write_results(
    context: &RunContext,
    mut send: FramedSend,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    replies_sent: &std::sync::atomic::AtomicUsize,
    failed: &Notify,
) {
    while let Some(reply) = replies.recv().await {
        let row_len = context.row_len(reply.part);
        let payload = match reply.own {
            Received::Uncompressed => encode_part(Codec::None, &reply.average, 0..reply.average.len(), row_len),
            Received::Compressed(mut own) => {
                for (own, average) in own.iter_mut().zip(reply.average.iter()) {
                    *own = average - *own;
                }
                Bytes::from(reply.codec.encode(&own, row_len))
            }
        };
        let message = ToSender::Averaged {
            index: reply.part as u64,
            codec: reply.codec.id(),
        };
        // A sender that stopped reading gets no more than the time a sender waits for a result.
        match tokio::time::timeout(context.config.reducer_timeout, send.send(&message, payload)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        let sent = replies_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        match context.config.fault {
            Some(Fault::SlowReducing) if sent >= 3 => tokio::time::sleep(Duration::from_secs(10)).await,
            Some(Fault::FailReducing) if sent == 3 => {
                failed.notify_one();
                return;
            }
            _ => {}
        }
    }
    let _ = send.finish().await;
}

/// Encodes a part of `values`. Uncompressed parts on a little-endian machine are the values' own bytes:
/// the frame carries them without a copy.
fn encode_part(codec: Codec, values: &Arc<Average>, range: Range<usize>, row_len: usize) -> Bytes {
    if codec == Codec::None && cfg!(target_endian = "little") {
        Bytes::from_owner(F32Bytes(values.clone(), range))
    } else {
        Bytes::from(codec.encode(&values[range], row_len))
    }
}

/// Encodes part `part` (values `range`) of this peer's buffer. Uncompressed on a little-endian machine, the
/// payload is the buffer's own bytes, leased until the transport has written them.
fn encode_local_part(
    codec: Codec,
    local: &Arc<RoundBuffer>,
    part: usize,
    range: Range<usize>,
    row_len: usize,
) -> Bytes {
    if codec == Codec::None && cfg!(target_endian = "little") {
        local.lease(part, range)
    } else {
        // SAFETY: the part's result cannot arrive (and be written) before the part is sent, after this read.
        Bytes::from(codec.encode(unsafe { local.read(range) }, row_len))
    }
}

/// f32 values seen as their little-endian bytes (the `none` codec's wire layout on a little-endian machine).
struct F32Bytes(Arc<Average>, Range<usize>);

impl AsRef<[u8]> for F32Bytes {
    fn as_ref(&self) -> &[u8] {
        f32_bytes(&self.0[self.1.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allreduce::{GroupId, GroupMember};
    use crate::tensor::TensorInfo;

    /// A run context of one node holding `values` in one tensor cut into parts of `part_values` values.
    fn context(values: Vec<f32>, part_values: usize) -> RunContext {
        let layout = Arc::new(TensorLayout::new(vec![TensorInfo::new("t", [values.len()])]).unwrap());
        let partition = PartitionPlan::new(&layout, |_, _| part_values, &[1.0]).unwrap();
        let parts = partition.parts().len();
        RunContext {
            plan: GroupPlan {
                group_id: GroupId([0; 32]),
                members: vec![GroupMember {
                    peer: colony_transports::Keypair::generate().peer_id(),
                    mode: PeerMode::Node,
                    weight: 1.0,
                    share: 1.0,
                }],
            },
            me: 0,
            partition,
            layout,
            codecs: vec![Codec::None],
            config: AllReduceConfig::default(),
            local: Some(Arc::new(RoundBuffer::new(values, parts))),
            sender_slot: vec![Some(0)],
            sums: Arc::new(SumPool::new(0)),
        }
    }

    fn raw(part: usize, values: &[f32]) -> PartUpdate {
        PartUpdate::RawAverage {
            part,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
        }
    }

    #[tokio::test]
    async fn a_result_for_a_part_still_on_its_way_out_waits_for_the_lease_to_end() {
        let context = context(vec![1.0, 2.0, 3.0, 4.0], 2);
        let buffer = context.local.clone().unwrap();
        let (tensors, mut taken) = mpsc::unbounded_channel();
        let mut collector = Collector::new(&context, tensors);
        let payload = buffer.lease(1, 2..4);
        collector.apply(raw(0, &[10.0, 20.0]));
        collector.apply(PartUpdate::Delta {
            part: 1,
            values: vec![0.5, 0.5],
        });
        assert!(collector.has_deferred(), "part 1 is leased: its result must wait");
        let expected: Vec<u8> = [3.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            &payload[..],
            &expected[..],
            "the payload still reads the values it was sent with"
        );
        collector.retry_deferred();
        assert!(collector.has_deferred(), "still leased");
        drop(payload);
        collector.retry_deferred();
        assert!(!collector.has_deferred());
        assert_eq!(collector.averaged, 2);
        let ready = taken.try_recv().expect("the tensor is complete");
        assert_eq!(ready.values, vec![10.0, 20.0, 3.5, 4.5]);
        drop(collector);
        drop(context);
        let values = RoundBuffer::into_vec(buffer, Duration::from_secs(1)).await;
        assert_eq!(values, vec![10.0, 20.0, 3.5, 4.5]);
    }

    #[tokio::test]
    async fn a_result_still_waiting_at_the_end_of_the_round_goes_into_the_returned_values() {
        let context = context(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
        let (tensors, taken) = mpsc::unbounded_channel::<TensorReady>();
        drop(taken);
        let mut collector = Collector::new(&context, tensors);
        let buffer = collector.buffer.clone().unwrap();
        // A payload of part 2 stuck behind a broken connection outlives the round.
        let stuck = buffer.lease(2, 4..6);
        collector.apply(raw(0, &[7.0, 7.0]));
        collector.apply(raw(2, &[9.0, 9.0]));
        assert!(collector.has_deferred());
        collector.buffer = None;
        drop(context);
        let mut values = RoundBuffer::into_vec(buffer, Duration::from_millis(10)).await;
        collector.finish(&mut values);
        // Part 1 got no result (its reducer failed): it keeps this peer's values.
        assert_eq!(values, vec![7.0, 7.0, 3.0, 4.0, 9.0, 9.0]);
        assert_eq!(collector.averaged, 2);
        let expected: Vec<u8> = [5.0f32, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            &stuck[..],
            &expected[..],
            "the stuck payload still reads the original buffer"
        );
    }
}
