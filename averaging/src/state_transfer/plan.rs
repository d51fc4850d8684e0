//! The receiver's pure scheduling core: which donor to contact next, which chunks each one serves, whose
//! answers are accepted. It performs no I/O and keeps no clock; [`super::download`] feeds it events and
//! carries out its decisions.

use std::ops::Range;

use bytes::Bytes;
use colony_transports::PeerId;

use super::{Donor, DonorIssue, DonorReport};

/// A worker whose remaining range is shorter than this is not split for another donor: the extra stream
/// would cost more than the chunk it saves.
const MIN_STEAL_CHUNKS: u64 = 2;

/// One request stream to one donor for one range of chunks.
pub(super) type WorkerId = u64;

/// A worker whose range was cut to make room for another, and its new end.
type Shortened = Option<(WorkerId, u64)>;

/// The snapshot the result is assembled from: the first donor whose info was accepted.
#[derive(Debug, Clone)]
pub(super) struct Anchor {
    /// The epoch every mixed-in donor must announce.
    pub epoch: u64,
    /// The anchor donor's metadata, which the result carries.
    pub metadata: Bytes,
    /// The anchor donor's priority: donors at the same priority may serve in parallel.
    priority: u64,
    /// The anchor donor's index.
    donor: usize,
}

/// What the driver must do after a connection to a donor opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Assignment {
    /// The new worker's id.
    pub worker: WorkerId,
    /// The chunks it requests.
    pub range: Range<u64>,
    /// A worker whose range was cut to make room, and its new end.
    pub shortened: Shortened,
}

/// Whether a worker's info is mixed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Its chunks are taken.
    Accept,
    /// The worker must be stopped; its chunks go to others.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not contacted yet.
    Queued,
    /// A connection is being opened.
    Connecting,
    /// A worker streams from it.
    Working,
    /// It served a range at the anchor's epoch and may serve more.
    Idle,
    /// Refused or failed; never contacted again.
    Dropped,
}

struct Candidate {
    donor: Donor,
    stage: Stage,
    /// Chunks accepted from it since the anchor was chosen.
    served: u64,
}

struct Worker {
    donor: usize,
    accepted: bool,
    next: u64,
    end: u64,
}

/// The download's bookkeeping.
pub(super) struct Plan {
    chunks: u64,
    max_parallel: usize,
    candidates: Vec<Candidate>,
    anchor: Option<Anchor>,
    pending: Vec<Range<u64>>,
    workers: Vec<(WorkerId, Worker)>,
    /// The donor being connected to, and its stage before (restored when the work ran out meanwhile).
    connecting: Option<(usize, Stage)>,
    received: u64,
    next_worker: WorkerId,
    issues: Vec<DonorReport>,
}

impl Plan {
    /// A plan over `donors` (already in the order to try them) for `chunks` chunks. Donors whose priority
    /// is below `own_epoch` are refused at once; repeated peers keep their first entry.
    pub fn new(donors: Vec<Donor>, own_epoch: Option<u64>, chunks: u64, max_parallel: usize) -> Self {
        let mut candidates: Vec<Candidate> = Vec::with_capacity(donors.len());
        let mut issues = Vec::new();
        for donor in donors {
            if candidates.iter().any(|c| c.donor.peer == donor.peer) {
                continue;
            }
            let stage = match own_epoch {
                Some(own_epoch) if donor.priority < own_epoch => {
                    issues.push(DonorReport {
                        peer: donor.peer,
                        priority: donor.priority,
                        issue: DonorIssue::PriorityBelowOwnEpoch {
                            priority: donor.priority,
                            own_epoch,
                        },
                    });
                    Stage::Dropped
                }
                _ => Stage::Queued,
            };
            candidates.push(Candidate {
                donor,
                stage,
                served: 0,
            });
        }
        Self {
            chunks,
            max_parallel: max_parallel.max(1),
            candidates,
            anchor: None,
            pending: std::iter::once(0..chunks).filter(|all| !all.is_empty()).collect(),
            workers: Vec::new(),
            connecting: None,
            received: 0,
            next_worker: 0,
            issues,
        }
    }

    /// Every chunk arrived from donors at the anchor's epoch.
    pub fn is_complete(&self) -> bool {
        self.anchor.is_some() && self.received == self.chunks
    }

    /// Nothing runs and no donor is left to try: the download cannot finish.
    pub fn is_stuck(&self) -> bool {
        !self.is_complete() && self.workers.is_empty() && self.connecting.is_none() && self.pick().is_none()
    }

    /// The donor to connect to now, if one should be; it counts as busy until [`Plan::connected`] or
    /// [`Plan::connect_failed`].
    pub fn next_connect(&mut self) -> Option<(usize, PeerId)> {
        let index = self.pick()?;
        let before = std::mem::replace(&mut self.candidates[index].stage, Stage::Connecting);
        self.connecting = Some((index, before));
        Some((index, self.candidates[index].donor.peer))
    }

    fn pick(&self) -> Option<usize> {
        if self.connecting.is_some() || self.is_complete() || !self.has_work() {
            return None;
        }
        let first = |stage: Stage| self.candidates.iter().position(|c| c.stage == stage);
        let Some(anchor) = &self.anchor else {
            // Until a donor's info sets the epoch, one donor at a time, so that parallel donors are all
            // checked against it.
            return if self.workers.is_empty() {
                first(Stage::Queued)
            } else {
                None
            };
        };
        if self.workers.len() >= self.max_parallel {
            return None;
        }
        if let Some(idle) = first(Stage::Idle) {
            return Some(idle);
        }
        let queued = first(Stage::Queued)?;
        // Donors of lower priority stand in only when no one else is serving.
        (self.workers.is_empty() || self.candidates[queued].donor.priority == anchor.priority).then_some(queued)
    }

    fn has_work(&self) -> bool {
        !self.pending.is_empty()
            || (self.anchor.is_none() && self.workers.is_empty())
            || self
                .workers
                .iter()
                .any(|(_, w)| w.accepted && w.end - w.next >= MIN_STEAL_CHUNKS)
    }

    /// The connection to donor `index` is open: the range it should request, or `None` when the work ran
    /// out meanwhile (the donor goes back to where it was).
    pub fn connected(&mut self, index: usize) -> Option<Assignment> {
        let before = match self.connecting.take() {
            Some((connecting, before)) if connecting == index => before,
            _ => Stage::Queued,
        };
        let Some((range, shortened)) = self.take_range() else {
            self.candidates[index].stage = before;
            return None;
        };
        self.candidates[index].stage = Stage::Working;
        let worker = self.next_worker;
        self.next_worker += 1;
        self.workers.push((
            worker,
            Worker {
                donor: index,
                accepted: false,
                next: range.start,
                end: range.end,
            },
        ));
        Some(Assignment {
            worker,
            range,
            shortened,
        })
    }

    fn take_range(&mut self) -> Option<(Range<u64>, Shortened)> {
        if let Some(range) = self.pending.pop() {
            return Some((range, None));
        }
        if self.anchor.is_none() {
            // Only an empty buffer has nothing pending before any donor answered: ask for the info.
            return (self.workers.is_empty() && self.chunks == 0).then_some((0..0, None));
        }
        // Split the largest remaining range: its worker keeps the first half.
        let (id, worker) = self
            .workers
            .iter_mut()
            .filter(|(_, w)| w.accepted && w.end - w.next >= MIN_STEAL_CHUNKS)
            .max_by_key(|(_, w)| w.end - w.next)?;
        let middle = worker.next + (worker.end - worker.next) / 2;
        let stolen = middle..worker.end;
        worker.end = middle;
        Some((stolen, Some((*id, middle))))
    }

    /// The connection to donor `index` could not be opened.
    pub fn connect_failed(&mut self, index: usize, issue: DonorIssue) {
        self.connecting = None;
        self.drop_donor(index, issue);
    }

    /// A worker's donor announced `epoch` (its other fields already checked).
    pub fn on_info(&mut self, worker: WorkerId, epoch: u64, metadata: Bytes) -> Verdict {
        let Some(position) = self.workers.iter().position(|(id, _)| *id == worker) else {
            return Verdict::Refuse;
        };
        let donor = self.workers[position].1.donor;
        let alone = self.workers.len() == 1 && !self.candidates.iter().any(|c| c.stage == Stage::Idle);
        match &self.anchor {
            Some(anchor) if anchor.epoch == epoch => {}
            // Every donor of the anchor's epoch is gone: start over from this one rather than fail.
            Some(_) if alone => {
                let range = self.workers[position].1.next..self.workers[position].1.end;
                self.pending = [0..range.start, range.end..self.chunks]
                    .into_iter()
                    .filter(|r| !r.is_empty())
                    .collect();
                self.received = 0;
                for candidate in &mut self.candidates {
                    candidate.served = 0;
                }
                self.set_anchor(donor, epoch, metadata);
            }
            Some(anchor) => {
                let issue = DonorIssue::EpochDiffers {
                    announced: epoch,
                    assembled: anchor.epoch,
                };
                let (_, refused) = self.workers.remove(position);
                self.give_back(&refused);
                self.drop_donor(donor, issue);
                return Verdict::Refuse;
            }
            None => self.set_anchor(donor, epoch, metadata),
        }
        self.workers[position].1.accepted = true;
        Verdict::Accept
    }

    fn set_anchor(&mut self, donor: usize, epoch: u64, metadata: Bytes) {
        self.anchor = Some(Anchor {
            epoch,
            metadata,
            priority: self.candidates[donor].donor.priority,
            donor,
        });
    }

    /// A worker delivered a checked chunk: whether it belongs to the result (the driver then copies it).
    pub fn on_chunk(&mut self, worker: WorkerId, index: u64) -> bool {
        let Some((_, w)) = self.workers.iter_mut().find(|(id, _)| *id == worker) else {
            return false;
        };
        // Chunks past a shortened end are another worker's now.
        if !w.accepted || index != w.next || index >= w.end {
            return false;
        }
        w.next += 1;
        self.received += 1;
        self.candidates[w.donor].served += 1;
        true
    }

    /// A worker ended: its unserved chunks go back to the pool; a failure drops its donor.
    pub fn on_ended(&mut self, worker: WorkerId, result: Result<(), DonorIssue>) {
        let Some(position) = self.workers.iter().position(|(id, _)| *id == worker) else {
            return;
        };
        let (_, ended) = self.workers.remove(position);
        self.give_back(&ended);
        match result {
            Ok(()) => self.candidates[ended.donor].stage = Stage::Idle,
            Err(issue) => self.drop_donor(ended.donor, issue),
        }
    }

    fn give_back(&mut self, worker: &Worker) {
        if worker.next < worker.end {
            self.pending.push(worker.next..worker.end);
        }
    }

    fn drop_donor(&mut self, index: usize, issue: DonorIssue) {
        let candidate = &mut self.candidates[index];
        candidate.stage = Stage::Dropped;
        tracing::debug!(peer = %candidate.donor.peer.short(), %issue, "state donor dropped");
        self.issues.push(DonorReport {
            peer: candidate.donor.peer,
            priority: candidate.donor.priority,
            issue,
        });
    }

    /// Refusals and failures so far, in the order they happened.
    pub fn issues(&self) -> &[DonorReport] {
        &self.issues
    }

    /// The anchor, the donors whose data is in the result (the anchor and every donor that served an
    /// accepted chunk, in trying order), and the issues. Call once [`Plan::is_complete`].
    pub fn finish(self) -> Option<(Anchor, Vec<PeerId>, Vec<DonorReport>)> {
        let anchor = self.anchor?;
        let donors = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(index, c)| c.served > 0 || *index == anchor.donor)
            .map(|(_, c)| c.donor.peer)
            .collect();
        Some((anchor, donors, self.issues))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_transports::Keypair;

    fn donors(priorities: &[u64]) -> Vec<Donor> {
        priorities
            .iter()
            .map(|&priority| Donor {
                peer: Keypair::generate().peer_id(),
                priority,
            })
            .collect()
    }

    #[test]
    fn one_donor_at_a_time_until_the_epoch_is_known_then_equal_donors_split_the_work() {
        let list = donors(&[7, 7, 7, 3]);
        let mut plan = Plan::new(list.clone(), None, 100, 4);
        let (first, peer) = plan.next_connect().unwrap();
        assert_eq!((first, peer), (0, list[0].peer));
        assert!(plan.next_connect().is_none(), "one connection at a time");
        let a = plan.connected(first).unwrap();
        assert_eq!(a.range, 0..100);
        assert!(plan.next_connect().is_none(), "no parallel donor before the first info");
        assert_eq!(plan.on_info(a.worker, 7, Bytes::new()), Verdict::Accept);
        for index in 0..10 {
            assert!(plan.on_chunk(a.worker, index));
        }
        let (second, _) = plan.next_connect().unwrap();
        assert_eq!(second, 1);
        let b = plan.connected(second).unwrap();
        assert_eq!((b.range.clone(), b.shortened), (55..100, Some((a.worker, 55))));
        assert_eq!(plan.on_info(b.worker, 7, Bytes::new()), Verdict::Accept);
        for index in 10..20 {
            assert!(plan.on_chunk(a.worker, index));
        }
        let (third, _) = plan.next_connect().unwrap();
        assert_eq!(third, 2);
        let c = plan.connected(third).unwrap();
        assert_eq!(c.range, 77..100, "the larger remaining range is split");
        for index in 55..77 {
            assert!(plan.on_chunk(b.worker, index));
        }
        assert!(
            !plan.on_chunk(b.worker, 77),
            "a chunk past a shortened end is not taken"
        );
        // A different epoch at the same priority is not mixed in; its range returns to the pool.
        assert_eq!(plan.on_info(c.worker, 8, Bytes::new()), Verdict::Refuse);
        assert!(matches!(
            plan.issues()[0].issue,
            DonorIssue::EpochDiffers {
                announced: 8,
                assembled: 7
            }
        ));
        // The lower-priority donor is not used while equal ones work.
        assert!(plan.next_connect().is_none());
    }

    #[test]
    fn a_failed_donor_hands_its_remaining_chunks_to_the_next() {
        let list = donors(&[5, 4]);
        let mut plan = Plan::new(list, None, 10, 4);
        let (first, _) = plan.next_connect().unwrap();
        let a = plan.connected(first).unwrap();
        plan.on_info(a.worker, 5, Bytes::from_static(b"meta"));
        for index in 0..3 {
            assert!(plan.on_chunk(a.worker, index));
        }
        assert!(
            plan.next_connect().is_none(),
            "a lower priority does not run beside the anchor"
        );
        plan.on_ended(a.worker, Err(DonorIssue::StreamFailed("killed".into())));
        let (second, _) = plan.next_connect().unwrap();
        let b = plan.connected(second).unwrap();
        assert_eq!(b.range, 3..10);
        assert_eq!(plan.on_info(b.worker, 5, Bytes::new()), Verdict::Accept);
        for index in 3..10 {
            assert!(plan.on_chunk(b.worker, index));
        }
        assert!(plan.is_complete());
        let (anchor, served, issues) = plan.finish().unwrap();
        assert_eq!(&anchor.metadata[..], b"meta");
        assert_eq!(served.len(), 2);
        assert_eq!(issues.len(), 1);
    }

    #[test]
    fn a_lone_donor_of_another_epoch_restarts_the_assembly() {
        let mut plan = Plan::new(donors(&[5, 4]), Some(2), 10, 4);
        let (first, _) = plan.next_connect().unwrap();
        let a = plan.connected(first).unwrap();
        plan.on_info(a.worker, 5, Bytes::new());
        assert!(plan.on_chunk(a.worker, 0));
        plan.on_ended(a.worker, Err(DonorIssue::TimedOut("stalled".into())));
        let (second, _) = plan.next_connect().unwrap();
        let b = plan.connected(second).unwrap();
        assert_eq!(b.range, 1..10);
        assert_eq!(plan.on_info(b.worker, 4, Bytes::new()), Verdict::Accept);
        for index in 1..10 {
            plan.on_chunk(b.worker, index);
        }
        assert!(!plan.is_complete(), "chunk 0 came from the old epoch");
        plan.on_ended(b.worker, Ok(()));
        let (again, _) = plan.next_connect().unwrap();
        let c = plan.connected(again).unwrap();
        assert_eq!(c.range, 0..1);
        plan.on_info(c.worker, 4, Bytes::new());
        assert!(plan.on_chunk(c.worker, 0));
        assert!(plan.is_complete());
        assert_eq!(plan.finish().unwrap().0.epoch, 4);
    }

    #[test]
    fn donors_below_the_own_epoch_are_refused_and_nothing_is_left() {
        let mut plan = Plan::new(donors(&[3, 4]), Some(5), 10, 4);
        assert!(plan.next_connect().is_none());
        assert!(plan.is_stuck());
        assert_eq!(plan.issues().len(), 2);
    }

    #[test]
    fn an_empty_buffer_still_asks_for_the_info() {
        let mut plan = Plan::new(donors(&[1]), None, 0, 4);
        let (first, _) = plan.next_connect().unwrap();
        let a = plan.connected(first).unwrap();
        assert_eq!(a.range, 0..0);
        plan.on_info(a.worker, 1, Bytes::new());
        assert!(plan.is_complete());
    }
}
