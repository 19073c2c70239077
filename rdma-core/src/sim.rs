//! A deterministic, in-process RDMA fabric.
//!
//! Everything happens on a virtual clock (nanoseconds) when the test calls
//! [`SimFabric::advance_to`]; no threads, no sleeps. Writes really copy bytes between registered
//! memory, in order per queue pair, at `latency` after posting. ACKs take another `latency` back.
//! Faults follow real RC behaviour:
//!
//! * carrier loss: port-down events on both cards; outstanding requests flush.
//! * black hole: nothing arrives and nothing is said; when the retry budget computed from
//!   `timeout`/`retry_cnt` expires, the oldest request fails with RETRY_EXC and the rest flush.
//!   Cleared before the budget expires, the stalled requests are retransmitted.
//! * ACK loss (a black hole on the return path): data lands, the sender still times out.
//! * card removal: device-fatal on that card; its peer sees only retry timeouts.
//! * corruption: the next writes land with a flipped byte.
//! * latency spikes, queue-pair fatal errors, restores (port-active events).
//!
//! Device contexts are modelled as on verbs: each [`Nic::reopen`] opens a context of its own
//! (a [`SimNic`]'s clones share one), which reads its own copy of the card's events (a queue
//! pair's fatal event goes to the context that made it) and owns its registrations, queue pairs
//! and completion queues: a shared queue takes only its context's queue pairs, and a write
//! whose local or remote region belongs to another context than its queue pair's fails (a
//! local protection / remote access error). A context closes when its handle and everything
//! made on it are gone.
//!
//! The only randomness (PSNs, which byte to corrupt) comes from the seeded RNG, so a run replays
//! exactly from its seed.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    Access, AsyncEvent, Completion, CompletionKind, Endpoint, FabricError, Link, LinkParams,
    MemoryRegistration, Nic, RegisterableMemory, RemoteRegion, SharedCompletion, SharedCq,
    WcStatus,
};

/// Receiver-not-ready back-off between attempts.
const RNR_DELAY_NS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    HeadArrive { qp: usize },
    Ack { qp: usize, generation: u64 },
    StallExpire { qp: usize, since: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QpState {
    Reset,
    Rts,
    Error,
    Destroyed,
}

struct Wr {
    wr_id: u64,
    local_mr: usize,
    local_off: usize,
    len: usize,
    rkey: u32,
    remote_addr: u64,
    imm: Option<u32>,
    ready_at: u64,
    /// Completes on success too (else only in error).
    signaled: bool,
}

struct Qp {
    nic: usize,
    /// The device context it was made on.
    handle: usize,
    params: LinkParams,
    state: QpState,
    psn: u32,
    peer: Option<usize>,
    fifo: VecDeque<Wr>,
    head_scheduled: bool,
    last_arrival: u64,
    /// Written, not yet acknowledged: (wr_id, signaled).
    awaiting_ack: VecDeque<(u64, bool)>,
    last_ack_time: u64,
    /// Bumped when acks in flight must be forgotten (error, stall).
    ack_generation: u64,
    stalled_since: Option<u64>,
    rnr_attempts: u32,
    recv_credits: u32,
    cq: VecDeque<Completion>,
    qpn: u32,
    /// The card's shared completion queue this queue pair's completions go to (None: `cq`).
    shared: Option<SharedQueue>,
}

type SharedQueue = Rc<RefCell<VecDeque<SharedCompletion>>>;

impl Qp {
    /// Queues a completion: on this queue pair's own queue, or on the shared one it was made on.
    fn complete(&mut self, completion: Completion) {
        match &self.shared {
            Some(q) => q.borrow_mut().push_back(SharedCompletion {
                qpn: self.qpn,
                completion,
            }),
            None => self.cq.push_back(completion),
        }
    }
}

struct NicState {
    wire: usize,
    removed: bool,
    /// Writes this card had to retransmit (partial loss): its `hw_counters`.
    retransmissions: u64,
    /// Polls of its queue pairs' own completion queues (see [`SimFabric::cq_polls`]).
    cq_polls: u64,
    /// Polls of its shared completion queues (see [`SimFabric::shared_cq_polls`]).
    shared_cq_polls: u64,
}

struct Wire {
    nics: [usize; 2],
    latency_ns: u64,
    carrier: bool,
    black_hole: bool,
    ack_loss: bool,
    corrupt_next: u32,
    spike_until: u64,
    spike_extra_ns: u64,
    /// Partial loss (netem-like): until `loss_until`, each write is lost with probability
    /// `loss_per_mille`/1000 and arrives after an RC retransmission, `loss_retransmit_ns` late.
    loss_until: u64,
    loss_per_mille: u32,
    loss_retransmit_ns: u64,
}

struct Mr {
    /// The device context (handle) it was registered on: only that context's queue pairs
    /// may use it, locally or remotely (its protection domain).
    handle: usize,
    mem: Arc<dyn RegisterableMemory>,
    access: Access,
    rkey: u32,
    live: bool,
}

/// An open device context on a card (what `ibv_open_device` returns): the card's
/// asynchronous events go to every open one, each reading its own copy; a queue pair's fatal
/// event goes to the one it was made on. Its registrations, queue pairs and completion
/// queues belong to it alone.
struct HandleState {
    nic: usize,
    open: bool,
    events: VecDeque<AsyncEvent>,
}

struct World {
    now: u64,
    rng: ChaCha8Rng,
    next_event_seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    nics: Vec<NicState>,
    wires: Vec<Wire>,
    mrs: Vec<Mr>,
    qps: Vec<Qp>,
    handles: Vec<HandleState>,
}

/// Counts of what the fabric did (for tests and reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub writes_delivered: u64,
    pub bytes_delivered: u64,
    pub corrupted_writes: u64,
    /// Writes posted to a connected queue pair (on any card), in the order posted.
    pub writes_posted: u64,
    /// Which of those (its `writes_posted` count) was the latest write with immediate: what
    /// came before and after it in a call.
    pub last_imm_write_posted: u64,
}

/// The simulated network: cards joined pairwise by wires.
#[derive(Clone)]
pub struct SimFabric {
    world: Rc<RefCell<World>>,
    stats: Rc<RefCell<SimStats>>,
}

/// Index of a wire (a NIC pair) in a [`SimFabric`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireId(pub usize);

impl SimFabric {
    pub fn new(seed: u64) -> SimFabric {
        SimFabric {
            world: Rc::new(RefCell::new(World {
                now: 0,
                rng: ChaCha8Rng::seed_from_u64(seed),
                next_event_seq: 0,
                events: BinaryHeap::new(),
                nics: Vec::new(),
                wires: Vec::new(),
                mrs: Vec::new(),
                qps: Vec::new(),
                handles: Vec::new(),
            })),
            stats: Rc::new(RefCell::new(SimStats::default())),
        }
    }

    /// Adds a wire joining two new cards; returns (host 1's card, host 2's card, wire).
    pub fn add_wire(&self, name1: &str, name2: &str, latency_ns: u64) -> (SimNic, SimNic, WireId) {
        let mut w = self.world.borrow_mut();
        let wire = w.wires.len();
        let a = w.nics.len();
        for _ in [name1, name2] {
            w.nics.push(NicState {
                wire,
                removed: false,
                retransmissions: 0,
                cq_polls: 0,
                shared_cq_polls: 0,
            });
        }
        w.wires.push(Wire {
            nics: [a, a + 1],
            latency_ns,
            carrier: true,
            black_hole: false,
            ack_loss: false,
            corrupt_next: 0,
            spike_until: 0,
            spike_extra_ns: 0,
            loss_until: 0,
            loss_per_mille: 0,
            loss_retransmit_ns: 0,
        });
        drop(w);
        let mk = |id: usize, name: &str| {
            SimCard {
                fabric: self.clone(),
                id,
                name: name.to_string(),
            }
            .open()
        };
        (mk(a, name1), mk(a + 1, name2), WireId(wire))
    }

    /// Virtual time now, in nanoseconds.
    pub fn now(&self) -> u64 {
        self.world.borrow().now
    }

    /// Time of the next scheduled fabric event.
    pub fn next_event_time(&self) -> Option<u64> {
        self.world
            .borrow()
            .events
            .peek()
            .map(|Reverse((t, _, _))| *t)
    }

    /// Processes every event up to and including `t`, then sets the clock to `t` (never backwards).
    pub fn advance_to(&self, t: u64) {
        let mut w = self.world.borrow_mut();
        loop {
            let due = matches!(w.events.peek(), Some(Reverse((et, _, _))) if *et <= t);
            if !due {
                break;
            }
            let Reverse((et, _, ev)) = w.events.pop().expect("peeked");
            w.now = w.now.max(et);
            w.handle(ev, &mut self.stats.borrow_mut());
        }
        w.now = w.now.max(t);
    }

    pub fn stats(&self) -> SimStats {
        *self.stats.borrow()
    }

    /// Device contexts open on `card`'s card (each handle opened by `add_wire` or
    /// [`Nic::reopen`] until it and everything made on it are gone): what a leak of a dead
    /// card's context would show.
    pub fn open_contexts(&self, card: &SimNic) -> usize {
        let w = self.world.borrow();
        w.handles
            .iter()
            .filter(|h| h.open && h.nic == card.id)
            .count()
    }

    /// How many times the completion queues of the queue pairs on each card of `wire` were
    /// polled (each queue pair's own; shared ones are not counted): the first card named to
    /// [`SimFabric::add_wire`] first. What a driver that polls idle rails less often saves.
    pub fn cq_polls(&self, wire: WireId) -> [u64; 2] {
        let w = self.world.borrow();
        w.wires[wire.0].nics.map(|nic| w.nics[nic].cq_polls)
    }

    /// How many times the shared completion queues of each card of `wire` were polled (all of a
    /// card's together), as [`SimFabric::cq_polls`] counts a queue pair's own.
    pub fn shared_cq_polls(&self, wire: WireId) -> [u64; 2] {
        let w = self.world.borrow();
        w.wires[wire.0].nics.map(|nic| w.nics[nic].shared_cq_polls)
    }

    /// Cable pulled: port-down on both ends, outstanding requests flush.
    pub fn carrier_loss(&self, wire: WireId) {
        let mut w = self.world.borrow_mut();
        w.wires[wire.0].carrier = false;
        for nic in w.wires[wire.0].nics {
            w.card_event(nic, AsyncEvent::PortDown);
            w.fail_qps_of_nic(nic, WcStatus::Flushed);
        }
    }

    /// Cable back: port-active on both ends. Old queue pairs stay in error; connect new ones.
    pub fn carrier_restore(&self, wire: WireId) {
        let mut w = self.world.borrow_mut();
        w.wires[wire.0].carrier = true;
        for nic in w.wires[wire.0].nics {
            if !w.nics[nic].removed {
                w.card_event(nic, AsyncEvent::PortActive);
            }
        }
    }

    /// Silent black hole in both directions: no event, no error until the retry budget runs out.
    pub fn black_hole(&self, wire: WireId) {
        self.world.borrow_mut().wires[wire.0].black_hole = true;
    }

    /// Black hole on the return path only: writes land, ACKs are lost.
    pub fn ack_loss(&self, wire: WireId) {
        self.world.borrow_mut().wires[wire.0].ack_loss = true;
    }

    /// Ends a black hole or ACK loss; stalled requests are retransmitted.
    pub fn clear_black_hole(&self, wire: WireId) {
        let mut w = self.world.borrow_mut();
        w.wires[wire.0].black_hole = false;
        w.wires[wire.0].ack_loss = false;
        let now = w.now;
        let lat = w.wires[wire.0].latency_ns;
        for qp in 0..w.qps.len() {
            let nic = w.qps[qp].nic;
            if w.nics[nic].wire != wire.0
                || w.qps[qp].state != QpState::Rts
                || w.qps[qp].stalled_since.is_none()
            {
                continue;
            }
            w.qps[qp].stalled_since = None;
            // Retransmission: unacknowledged writes get acknowledged, stalled ones resume.
            let gen = w.qps[qp].ack_generation;
            for _ in 0..w.qps[qp].awaiting_ack.len() {
                w.schedule(
                    now + 2 * lat,
                    Ev::Ack {
                        qp,
                        generation: gen,
                    },
                );
            }
            if !w.qps[qp].fifo.is_empty() && !w.qps[qp].head_scheduled {
                w.qps[qp].head_scheduled = true;
                w.schedule(now + lat, Ev::HeadArrive { qp });
            }
        }
    }

    /// Queues `event` on the card and nothing else: the wire and the queue pairs carry on (a
    /// port flap shorter than the retry timeout, say, or a queue pair's fatal error reported
    /// before any of its completions).
    pub fn card_event(&self, nic: &SimNic, event: AsyncEvent) {
        self.world.borrow_mut().card_event(nic.id, event);
    }

    /// Card removed: device-fatal on it; its queue pairs flush. The peer sees only timeouts.
    pub fn remove_card(&self, nic: &SimNic) {
        let mut w = self.world.borrow_mut();
        w.nics[nic.id].removed = true;
        w.card_event(nic.id, AsyncEvent::DeviceFatal);
        w.fail_qps_of_nic(nic.id, WcStatus::Flushed);
    }

    /// Card back (port-active). Old queue pairs stay dead.
    pub fn restore_card(&self, nic: &SimNic) {
        let mut w = self.world.borrow_mut();
        w.nics[nic.id].removed = false;
        w.card_event(nic.id, AsyncEvent::PortActive);
    }

    /// The next `writes` writes crossing the wire land with one flipped byte.
    pub fn corrupt_next(&self, wire: WireId, writes: u32) {
        self.world.borrow_mut().wires[wire.0].corrupt_next += writes;
    }

    /// Writes posted in the next `duration_ns` take `extra_ns` longer.
    pub fn latency_spike(&self, wire: WireId, extra_ns: u64, duration_ns: u64) {
        let mut w = self.world.borrow_mut();
        let now = w.now;
        w.wires[wire.0].spike_until = now + duration_ns;
        w.wires[wire.0].spike_extra_ns = extra_ns;
    }

    /// Partial loss for `duration_ns`: each write posted meanwhile is lost with probability
    /// `per_mille`/1000 and retransmitted by RC `retransmit_ns` later (so it, and everything
    /// behind it on its queue pair, arrives late; nothing is lost for good).
    pub fn lossy(&self, wire: WireId, per_mille: u32, retransmit_ns: u64, duration_ns: u64) {
        let mut w = self.world.borrow_mut();
        let now = w.now;
        let wire = &mut w.wires[wire.0];
        wire.loss_until = now + duration_ns;
        wire.loss_per_mille = per_mille.min(1000);
        wire.loss_retransmit_ns = retransmit_ns;
    }

    /// The card at `end` of `wire` (0: the first host's, 1: the second's) counts `n` more RC
    /// retransmissions, as if it had sent that many again: scripts what a gray switch counts
    /// without the loss that would cause them.
    pub fn count_retransmissions(&self, wire: WireId, end: usize, n: u64) {
        let mut w = self.world.borrow_mut();
        let nic = w.wires[wire.0].nics[end];
        w.nics[nic].retransmissions += n;
    }

    /// A queue pair hits a fatal error (QP-fatal event on its card).
    pub fn qp_fatal(&self, link: &SimLink) {
        let mut w = self.world.borrow_mut();
        let handle = w.qps[link.qp].handle;
        let qpn = qpn_of(link.qp);
        w.handles[handle]
            .events
            .push_back(AsyncEvent::QpFatal { qpn });
        w.fail_qp(link.qp, WcStatus::Flushed);
    }
}

/// `IBV_WC_LOC_PROT_ERR`: a work request's local buffer is not registered in its queue
/// pair's protection domain.
const WC_LOC_PROT_ERR: u32 = 4;

fn qpn_of(index: usize) -> u32 {
    0x100 + index as u32
}

impl World {
    /// A card-wide event: a copy for every open device context on it.
    fn card_event(&mut self, nic: usize, event: AsyncEvent) {
        for h in self.handles.iter_mut().filter(|h| h.open && h.nic == nic) {
            h.events.push_back(event);
        }
    }

    fn schedule(&mut self, t: u64, ev: Ev) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.events.push(Reverse((t, seq, ev)));
    }

    fn fail_qps_of_nic(&mut self, nic: usize, status: WcStatus) {
        for qp in 0..self.qps.len() {
            if self.qps[qp].nic == nic {
                self.fail_qp(qp, status);
            }
        }
    }

    /// Error state: the oldest outstanding request ends with `status`, everything else flushes.
    fn fail_qp(&mut self, qp: usize, status: WcStatus) {
        let q = &mut self.qps[qp];
        if q.state != QpState::Rts {
            return;
        }
        q.state = QpState::Error;
        q.ack_generation += 1;
        q.stalled_since = None;
        let mut first = true;
        // In error every request completes, signaled or not.
        let mut ids: Vec<u64> = q.awaiting_ack.drain(..).map(|(id, _)| id).collect();
        ids.extend(q.fifo.drain(..).map(|w| w.wr_id));
        for wr_id in ids {
            let st = if first { status } else { WcStatus::Flushed };
            first = false;
            q.complete(Completion {
                wr_id,
                kind: CompletionKind::Write,
                status: st,
            });
        }
        for _ in 0..q.recv_credits {
            q.complete(Completion {
                wr_id: 0,
                kind: CompletionKind::Recv,
                status: WcStatus::Flushed,
            });
        }
        q.recv_credits = 0;
    }

    fn stall(&mut self, qp: usize) {
        if self.qps[qp].stalled_since.is_none() {
            let now = self.now;
            self.qps[qp].stalled_since = Some(now);
            self.qps[qp].ack_generation += 1;
            let budget = self.qps[qp].params.retry_budget_ns();
            self.schedule(now + budget, Ev::StallExpire { qp, since: now });
        }
    }

    fn handle(&mut self, ev: Ev, stats: &mut SimStats) {
        match ev {
            Ev::HeadArrive { qp } => self.head_arrive(qp, stats),
            Ev::Ack { qp, generation } => {
                let q = &mut self.qps[qp];
                if q.state == QpState::Rts && q.ack_generation == generation {
                    if let Some((wr_id, true)) = q.awaiting_ack.pop_front() {
                        q.complete(Completion {
                            wr_id,
                            kind: CompletionKind::Write,
                            status: WcStatus::Success,
                        });
                    }
                }
            }
            Ev::StallExpire { qp, since } => {
                if self.qps[qp].stalled_since == Some(since) {
                    self.fail_qp(qp, WcStatus::RetryExceeded);
                }
            }
        }
    }

    fn head_arrive(&mut self, qp: usize, stats: &mut SimStats) {
        self.qps[qp].head_scheduled = false;
        if self.qps[qp].state != QpState::Rts
            || self.qps[qp].fifo.is_empty()
            || self.qps[qp].stalled_since.is_some()
        {
            return;
        }
        let nic = self.qps[qp].nic;
        let wire_id = self.nics[nic].wire;
        let peer = self.qps[qp].peer.expect("connected");
        let peer_nic = self.qps[peer].nic;
        let wire = &self.wires[wire_id];
        let lost = !wire.carrier
            || wire.black_hole
            || self.nics[peer_nic].removed
            || self.nics[nic].removed;
        if lost || self.qps[peer].state != QpState::Rts {
            // Nothing answers: the requester retransmits until its budget expires.
            self.stall(qp);
            return;
        }
        let (rkey, remote_addr, len, imm) = {
            let h = &self.qps[qp].fifo[0];
            (h.rkey, h.remote_addr, h.len, h.imm)
        };
        // The requester's own buffer must be registered on its queue pair's device context
        // (the same protection domain): else a local protection error, as on a real card.
        let local = &self.mrs[self.qps[qp].fifo[0].local_mr];
        if !local.live || local.handle != self.qps[qp].handle {
            self.fail_qp(qp, WcStatus::Other(WC_LOC_PROT_ERR));
            return;
        }
        // Responder checks the rkey and range (remote access error otherwise).
        let peer_handle = self.qps[peer].handle;
        let target = self.mrs.iter().position(|m| {
            m.live
                && m.rkey == rkey
                && m.handle == peer_handle
                && m.access == Access::RemoteWrite
                && {
                    let base = m.mem.addr() as u64;
                    remote_addr >= base && remote_addr + len as u64 <= base + m.mem.len() as u64
                }
        });
        let Some(target) = target else {
            self.fail_qp(qp, WcStatus::RemoteAccess);
            return;
        };
        if imm.is_some() && self.qps[peer].recv_credits == 0 {
            let q = &mut self.qps[qp];
            q.rnr_attempts += 1;
            if q.rnr_attempts > q.params.rnr_retry as u32 {
                self.fail_qp(qp, WcStatus::RnrRetryExceeded);
            } else {
                q.head_scheduled = true;
                let t = self.now + RNR_DELAY_NS;
                self.schedule(t, Ev::HeadArrive { qp });
            }
            return;
        }
        let wr = self.qps[qp].fifo.pop_front().expect("non-empty");
        self.qps[qp].rnr_attempts = 0;
        let src = &self.mrs[wr.local_mr];
        let dst = &self.mrs[target];
        let dst_off = (remote_addr - dst.mem.addr() as u64) as usize;
        // Both regions are registered (their Arcs keep them alive); the source range was checked
        // at post time, the target range above; `copy` tolerates overlap.
        // SAFETY: live memory, ranges in bounds (see above).
        unsafe {
            std::ptr::copy(
                src.mem.addr().add(wr.local_off),
                dst.mem.addr().add(dst_off),
                wr.len,
            )
        };
        if self.wires[wire_id].corrupt_next > 0 && wr.len > 0 {
            self.wires[wire_id].corrupt_next -= 1;
            let at = self.rng.random_range(0..wr.len);
            let bit = 1u8 << self.rng.random_range(0..8);
            // SAFETY: `at` < len and the target range is inside the registered region (checked).
            unsafe { *dst.mem.addr().add(dst_off + at) ^= bit };
            stats.corrupted_writes += 1;
        }
        stats.writes_delivered += 1;
        stats.bytes_delivered += wr.len as u64;
        if let Some(imm) = imm {
            let p = &mut self.qps[peer];
            p.recv_credits -= 1;
            p.complete(Completion {
                wr_id: 0,
                kind: CompletionKind::RecvImm {
                    imm,
                    byte_len: wr.len as u32,
                },
                status: WcStatus::Success,
            });
        }
        let now = self.now;
        let lat = self.wires[wire_id].latency_ns;
        let q = &mut self.qps[qp];
        q.awaiting_ack.push_back((wr.wr_id, wr.signaled));
        q.last_arrival = now;
        if self.wires[wire_id].ack_loss {
            self.stall(qp);
        } else {
            let t = (now + lat).max(self.qps[qp].last_ack_time);
            self.qps[qp].last_ack_time = t;
            let generation = self.qps[qp].ack_generation;
            self.schedule(t, Ev::Ack { qp, generation });
        }
        self.schedule_head(qp);
    }

    fn schedule_head(&mut self, qp: usize) {
        let q = &mut self.qps[qp];
        if q.head_scheduled || q.stalled_since.is_some() {
            return;
        }
        if let Some(h) = q.fifo.front() {
            q.head_scheduled = true;
            let t = h.ready_at.max(q.last_arrival).max(self.now);
            self.schedule(t, Ev::HeadArrive { qp });
        }
    }
}

/// A simulated card.
#[derive(Clone)]
pub struct SimNic {
    fabric: SimFabric,
    id: usize,
    name: String,
    /// The device context this handle is (its clones share it, as clones of a verbs card share
    /// its context); open while it, a clone, or anything made on it lives.
    handle: Rc<HandleGuard>,
}

/// Names a simulated card without holding a device context on it: what
/// [`Nic::reopen`] opens a fresh context (a [`SimNic`]) from.
#[derive(Clone)]
pub struct SimCard {
    fabric: SimFabric,
    id: usize,
    name: String,
}

impl SimCard {
    /// A fresh device context on the card.
    fn open(&self) -> SimNic {
        let mut w = self.fabric.world.borrow_mut();
        let index = w.handles.len();
        w.handles.push(HandleState {
            nic: self.id,
            open: true,
            events: VecDeque::new(),
        });
        drop(w);
        SimNic {
            fabric: self.fabric.clone(),
            id: self.id,
            name: self.name.clone(),
            handle: Rc::new(HandleGuard {
                fabric: self.fabric.clone(),
                index,
            }),
        }
    }
}

/// Closes its device context when the last handle, registration, queue pair or completion
/// queue made on it goes: from then on the context gets no events.
struct HandleGuard {
    fabric: SimFabric,
    index: usize,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        // Never while the world is borrowed: every borrow is scoped to one fabric call, and
        // nothing the world holds owns a guard. (A panic here would be a simulator bug.)
        let mut w = self.fabric.world.borrow_mut();
        let h = &mut w.handles[self.index];
        h.open = false;
        h.events.clear();
    }
}

/// A registration on a simulated card.
pub struct SimMr {
    fabric: SimFabric,
    id: usize,
    remote: RemoteRegion,
    len: usize,
    _context: Rc<HandleGuard>,
}

impl Drop for SimMr {
    fn drop(&mut self) {
        self.fabric.world.borrow_mut().mrs[self.id].live = false;
    }
}

impl MemoryRegistration for SimMr {
    fn remote(&self) -> RemoteRegion {
        self.remote
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A simulated RC queue pair.
pub struct SimLink {
    fabric: SimFabric,
    qp: usize,
    _context: Rc<HandleGuard>,
}

impl Drop for SimLink {
    fn drop(&mut self) {
        let mut w = self.fabric.world.borrow_mut();
        // As verbs (which moves a queue pair to error before destroying it): what was
        // outstanding flushes. On a shared completion queue those stay behind, as on rxe.
        w.fail_qp(self.qp, WcStatus::Flushed);
        w.qps[self.qp].state = QpState::Destroyed;
        w.qps[self.qp].fifo.clear();
    }
}

/// A simulated completion queue shared by links of one card (it does not model overrun: size
/// it as a real one).
pub struct SimSharedCq {
    fabric: SimFabric,
    nic: usize,
    queue: SharedQueue,
    context: Rc<HandleGuard>,
}

/// Names a [`SimSharedCq`] to make links on (see [`SharedCq::Attach`]).
#[derive(Clone)]
pub struct SimCqAttach {
    fabric: SimFabric,
    nic: usize,
    /// The device context the queue was made on: only that context's queue pairs may use it.
    handle: usize,
    queue: SharedQueue,
}

impl SharedCq for SimSharedCq {
    type Attach = SimCqAttach;

    fn attach(&self) -> SimCqAttach {
        SimCqAttach {
            fabric: self.fabric.clone(),
            nic: self.nic,
            handle: self.context.index,
            queue: self.queue.clone(),
        }
    }

    fn poll(&mut self, out: &mut [SharedCompletion]) -> usize {
        self.fabric.world.borrow_mut().nics[self.nic].shared_cq_polls += 1;
        let mut q = self.queue.borrow_mut();
        let n = out.len().min(q.len());
        for (slot, c) in out.iter_mut().zip(q.drain(..n)) {
            *slot = c;
        }
        n
    }
}

impl SimNic {
    fn make_link(
        &self,
        params: &LinkParams,
        shared: Option<SharedQueue>,
    ) -> Result<SimLink, FabricError> {
        params.validate()?;
        let mut w = self.fabric.world.borrow_mut();
        if w.nics[self.id].removed {
            return Err(FabricError::NoSuchDevice(self.name.clone()));
        }
        let psn = w.rng.random::<u32>() & 0x00ff_ffff;
        let qp = w.qps.len();
        w.qps.push(Qp {
            nic: self.id,
            handle: self.handle.index,
            params: *params,
            state: QpState::Reset,
            psn,
            peer: None,
            fifo: VecDeque::new(),
            head_scheduled: false,
            last_arrival: 0,
            awaiting_ack: VecDeque::new(),
            last_ack_time: 0,
            ack_generation: 0,
            stalled_since: None,
            rnr_attempts: 0,
            recv_credits: 0,
            cq: VecDeque::new(),
            qpn: qpn_of(qp),
            shared,
        });
        Ok(SimLink {
            fabric: self.fabric.clone(),
            qp,
            _context: self.handle.clone(),
        })
    }
}

impl Nic for SimNic {
    type Mr = SimMr;
    type Link = SimLink;
    type SharedCq = SimSharedCq;
    type Reopen = SimCard;

    fn reopen_token(&self) -> SimCard {
        SimCard {
            fabric: self.fabric.clone(),
            id: self.id,
            name: self.name.clone(),
        }
    }

    /// A fresh device context, as `ibv_open_device` gives: events of its own from now on.
    fn reopen(token: &SimCard) -> Result<SimNic, FabricError> {
        if token.fabric.world.borrow().nics[token.id].removed {
            return Err(FabricError::NoSuchDevice(token.name.clone()));
        }
        Ok(token.open())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn register(
        &self,
        mem: Arc<dyn RegisterableMemory>,
        access: Access,
    ) -> Result<SimMr, FabricError> {
        let mut w = self.fabric.world.borrow_mut();
        if w.nics[self.id].removed {
            return Err(FabricError::NoSuchDevice(self.name.clone()));
        }
        let id = w.mrs.len();
        let rkey = (id as u32).wrapping_mul(0x9E37_79B9) | 1;
        let len = mem.len();
        let remote = RemoteRegion {
            addr: mem.addr() as u64,
            rkey,
            len: len as u64,
        };
        w.mrs.push(Mr {
            handle: self.handle.index,
            mem,
            access,
            rkey,
            live: true,
        });
        Ok(SimMr {
            fabric: self.fabric.clone(),
            id,
            remote,
            len,
            _context: self.handle.clone(),
        })
    }

    fn create_link(&self, params: &LinkParams) -> Result<SimLink, FabricError> {
        self.make_link(params, None)
    }

    fn create_shared_cq(&self, entries: u32) -> Result<SimSharedCq, FabricError> {
        if entries == 0 {
            return Err(FabricError::InvalidParams(
                "a completion queue needs entries",
            ));
        }
        if self.fabric.world.borrow().nics[self.id].removed {
            return Err(FabricError::NoSuchDevice(self.name.clone()));
        }
        Ok(SimSharedCq {
            fabric: self.fabric.clone(),
            nic: self.id,
            queue: Rc::default(),
            context: self.handle.clone(),
        })
    }

    fn create_link_on(
        &self,
        params: &LinkParams,
        cq: &SimCqAttach,
    ) -> Result<SimLink, FabricError> {
        if cq.nic != self.id || !Rc::ptr_eq(&cq.fabric.world, &self.fabric.world) {
            return Err(FabricError::InvalidParams(
                "the shared completion queue belongs to another card",
            ));
        }
        if cq.handle != self.handle.index {
            return Err(FabricError::InvalidParams(
                "the shared completion queue belongs to another device context",
            ));
        }
        self.make_link(params, Some(cq.queue.clone()))
    }

    fn poll_event(&self) -> Option<AsyncEvent> {
        self.fabric.world.borrow_mut().handles[self.handle.index]
            .events
            .pop_front()
    }

    fn retransmissions(&self) -> Option<u64> {
        Some(self.fabric.world.borrow().nics[self.id].retransmissions)
    }
}

impl SimNic {
    /// Index of this card in its fabric.
    pub fn id(&self) -> usize {
        self.id
    }
}

impl Link for SimLink {
    type Mr = SimMr;

    fn endpoint(&self) -> Endpoint {
        let w = self.fabric.world.borrow();
        let q = &w.qps[self.qp];
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&(q.nic as u32).to_be_bytes());
        Endpoint {
            qpn: qpn_of(self.qp),
            psn: q.psn,
            gid,
            lid: 0,
        }
    }

    fn connect(&mut self, remote: &Endpoint) -> Result<(), FabricError> {
        let mut w = self.fabric.world.borrow_mut();
        let Some(peer) = (remote.qpn as usize)
            .checked_sub(0x100)
            .filter(|&p| p < w.qps.len())
        else {
            return Err(FabricError::Unreachable);
        };
        let my_nic = w.qps[self.qp].nic;
        let peer_nic = w.qps[peer].nic;
        if w.nics[my_nic].wire != w.nics[peer_nic].wire
            || my_nic == peer_nic
            || w.qps[peer].psn != remote.psn
        {
            return Err(FabricError::Unreachable);
        }
        // As rxe: no route to the peer while the port is down (modify to RTR fails).
        if !w.wires[w.nics[my_nic].wire].carrier {
            return Err(FabricError::Unreachable);
        }
        if w.qps[self.qp].state != QpState::Reset {
            return Err(FabricError::NotConnected);
        }
        w.qps[self.qp].peer = Some(peer);
        w.qps[self.qp].state = QpState::Rts;
        Ok(())
    }

    fn post_write(
        &mut self,
        wr_id: u64,
        local: &SimMr,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), FabricError> {
        if local_offset > local.len || len > local.len - local_offset {
            return Err(FabricError::OutOfRange {
                offset: local_offset as u64,
                len,
                region_len: local.len,
            });
        }
        let mut w = self.fabric.world.borrow_mut();
        let now = w.now;
        let q = &w.qps[self.qp];
        match q.state {
            QpState::Reset | QpState::Destroyed => return Err(FabricError::NotConnected),
            QpState::Error => {
                // As on hardware: posting to a QP in error "succeeds" and flushes at once.
                w.qps[self.qp].complete(Completion {
                    wr_id,
                    kind: CompletionKind::Write,
                    status: WcStatus::Flushed,
                });
                return Ok(());
            }
            QpState::Rts => {}
        }
        if q.fifo.len() + q.awaiting_ack.len() >= q.params.max_send_wr as usize {
            return Err(FabricError::SendQueueFull);
        }
        let wire_id = w.nics[q.nic].wire;
        let wire = &w.wires[wire_id];
        let mut latency = wire.latency_ns;
        if now < wire.spike_until {
            latency += wire.spike_extra_ns;
        }
        if now < wire.loss_until {
            let (per_mille, retransmit) = (wire.loss_per_mille, wire.loss_retransmit_ns);
            if w.rng.random_range(0..1000) < per_mille {
                latency += retransmit;
                let nic = w.qps[self.qp].nic;
                w.nics[nic].retransmissions += 1;
            }
        }
        w.qps[self.qp].fifo.push_back(Wr {
            wr_id,
            local_mr: local.id,
            local_off: local_offset,
            len,
            rkey: remote.rkey,
            remote_addr: remote.addr.wrapping_add(remote_offset),
            imm,
            ready_at: now + latency,
            signaled,
        });
        w.schedule_head(self.qp);
        let mut stats = self.fabric.stats.borrow_mut();
        stats.writes_posted += 1;
        if imm.is_some() {
            stats.last_imm_write_posted = stats.writes_posted;
        }
        Ok(())
    }

    fn post_recvs(&mut self, count: u32) -> Result<(), FabricError> {
        let mut w = self.fabric.world.borrow_mut();
        let q = &mut w.qps[self.qp];
        match q.state {
            QpState::Destroyed => Err(FabricError::NotConnected),
            QpState::Error => {
                for _ in 0..count {
                    q.complete(Completion {
                        wr_id: 0,
                        kind: CompletionKind::Recv,
                        status: WcStatus::Flushed,
                    });
                }
                Ok(())
            }
            _ if q.recv_credits + count > q.params.max_recv_wr => Err(FabricError::SendQueueFull),
            _ => {
                q.recv_credits += count;
                Ok(())
            }
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut w = self.fabric.world.borrow_mut();
        let nic = w.qps[self.qp].nic;
        w.nics[nic].cq_polls += 1;
        let q = &mut w.qps[self.qp];
        let mut n = 0;
        while n < out.len() {
            match q.cq.pop_front() {
                Some(c) => {
                    out[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn shut_down(&mut self) {
        self.fabric
            .world
            .borrow_mut()
            .fail_qp(self.qp, WcStatus::Flushed);
    }
}
