//! The thin layer that drives a [`Core`] over a fabric: it posts what the core asks for, feeds it
//! completions, device events and the time. All decisions are the core's.

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use railover_rdma::handshake::{HandshakeError, Hello, WireGeometry};
use railover_rdma::{
    Access, AsyncEvent, Completion, CompletionKind, FabricError, Link, MemoryRegistration, Nic,
    RemoteRegion, WcStatus,
};
use railover_segq::{LaneError, LaneReservation, LaneWriter, Reservation};

use crate::config::Config;
use crate::config::MAX_RAILS;
use crate::control::{ControlChannel, ControlThread, InlineControl, ThreadCard};
use crate::core::{
    send_error_of, Buf, Core, DataWrite, EndReason, Event, Io, Nanos, RailState, RdmaWrite,
    RecvError, SendError, Stats,
};
use crate::memory::{QueueMem, RegionMem};
use crate::rearm::Role;
use crate::shared_queues::{QueuePool, RouteGuard, RoutedLink, SharedLinks};

/// How this connection re-arms rails with a peer in another process.
enum Control<N: Nic> {
    /// On the data thread, inside `progress` (the simulator, single-threaded set-ups).
    Inline(Box<InlineControl<N>>),
    /// On a control thread of the connection's own (real devices).
    Thread(ControlThread<N>),
}

pub use crate::clock::{Clock, RealClock};

/// How long a rail that carries neither side's records (a standby, with heartbeats alone) and
/// the cards' device events may go unpolled while the connection is being driven. Against
/// heartbeat timeouts of milliseconds it delays nothing a failover waits for; the first record
/// the peer sends on a rail after a failover waits at most this long (the rail is polled every
/// time from then on).
pub const QUIET_RAIL_POLL_NS: Nanos = 10_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("memory: {0}")]
    Memory(#[from] std::io::Error),
    #[error("{got} rails offered, the configuration says {want}")]
    RailCount { want: usize, got: usize },
    #[error("re-arm channel: {0}")]
    Channel(std::io::Error),
    #[error("the session ended: {0}")]
    Ended(EndReason),
    /// `replace_card` names a rail that doesn't exist or hasn't failed.
    #[error("rail {0} is not a failed rail of this connection")]
    RailNotFailed(usize),
    /// A re-arm (`rearm_prepare`, `rearm_complete`, `install_rearmed`) names a rail the
    /// connection doesn't have.
    #[error("the connection has no rail {0}")]
    NoSuchRail(usize),
}

/// A close that could not hand everything over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// The linger ran out before the peer delivered `records` records; `unacked()` lists them.
    #[error(
        "{records} records not delivered by the peer before the linger ran out; see unacked()"
    )]
    Undelivered { records: u64 },
    /// The session had ended otherwise first; `unacked()` lists what the peer did not deliver.
    #[error("session ended before the close: {0}")]
    Ended(EndReason),
    /// The connection's completions come through its [`crate::Endpoint`]'s shared completion
    /// queues: the close was started, and ends as the endpoint is polled. Wait for it with
    /// [`crate::Endpoint::close`].
    #[error("the connection is driven by its endpoint: close it with Endpoint::close")]
    DrivenByEndpoint,
    /// [`crate::Endpoint::close`] of an id that names no connection (any more).
    #[error("no such connection")]
    UnknownConnection,
}

/// One rail's fabric objects.
struct RailIo<N: Nic> {
    /// The card and what lives on it; `None` while released after a device-fatal event (a
    /// re-arm opens it again).
    card: Option<CardIo<N>>,
    /// How to open the card again.
    reopen: N::Reopen,
    /// Set when the card is the endpoint's (opened at set-up, or again through the endpoint's
    /// pool after a device-fatal release: one handle for all its connections): the pool's
    /// opening (epoch) it came from. Fresh queue pairs then go on the endpoint's shared queues
    /// and its device events are read by the endpoint. None for the user's card
    /// (`replace_card`) or a single connection's, whose events the connection (or its control
    /// thread) reads. Kept while the card is released: it says to open it again through the pool.
    endpoint_epoch: Option<u64>,
    peer_ring: RemoteRegion,
    peer_ctrl: RemoteRegion,
}

/// Everything of a rail that lives on its card. Field order is drop order: the queue pair (the
/// endpoint first told it goes, when it is on a shared queue), then the registrations and the
/// card itself.
pub(crate) struct CardIo<N: Nic> {
    /// Set when the queue pair is on one of its endpoint's shared completion queues (see
    /// [`crate::shared_queues`]): the endpoint polls that and hands this rail its completions.
    route: Option<RouteGuard<N>>,
    pub(crate) link: N::Link,
    regs: CardRegs<N>,
}

/// A card and its registrations of one rail's memory (a card opened again by the control thread
/// travels as this, without a queue pair). Field order is drop order: registrations, then card.
pub(crate) struct CardRegs<N: Nic> {
    ring_tx: N::Mr,
    ring_rx: N::Mr,
    ctrl_out: N::Mr,
    ctrl_in: N::Mr,
    /// Set when the card is the endpoint's, opened again through its pool by the control
    /// thread: the epoch of that opening (the install checks it is still current).
    pub(crate) endpoint_epoch: Option<u64>,
    /// Shared with the control thread (which makes fresh queue pairs on it); the data path holds
    /// the owning reference, the control thread only a weak one, so releasing the card here
    /// releases the device.
    pub(crate) nic: Arc<N>,
}

/// One rail's registered memory (stable for the connection's lifetime).
#[derive(Clone)]
pub(crate) struct RailMemory {
    tx: railover_segq::Memory,
    rx: railover_segq::Memory,
    ctrl_out: Arc<railover_segq::Region>,
    ctrl_in: Arc<railover_segq::Region>,
}

impl RailMemory {
    pub(crate) fn of(core: &Core, rail: usize) -> RailMemory {
        let (tx, rx, ctrl_out, ctrl_in) = core.rail_memory(rail);
        RailMemory {
            tx,
            rx,
            ctrl_out,
            ctrl_in,
        }
    }
}

impl<N: Nic> CardRegs<N> {
    /// Registers a rail's memory on `nic`.
    pub(crate) fn register(nic: Arc<N>, mem: &RailMemory) -> Result<CardRegs<N>, FabricError> {
        Ok(CardRegs {
            ring_tx: nic.register(Arc::new(QueueMem(mem.tx.clone())), Access::Local)?,
            ring_rx: nic.register(Arc::new(QueueMem(mem.rx.clone())), Access::RemoteWrite)?,
            ctrl_out: nic.register(Arc::new(RegionMem(mem.ctrl_out.clone())), Access::Local)?,
            ctrl_in: nic.register(
                Arc::new(RegionMem(mem.ctrl_in.clone())),
                Access::RemoteWrite,
            )?,
            endpoint_epoch: None,
            nic,
        })
    }

    /// Where the peer writes: (this side's mirror ring, its control slot).
    pub(crate) fn remotes(&self) -> (RemoteRegion, RemoteRegion) {
        (self.ring_rx.remote(), self.ctrl_in.remote())
    }
}

impl<N: Nic> CardIo<N> {
    /// Registers rail `rail`'s memory on `nic` and creates a queue pair there (on one of the
    /// endpoint's shared completion queues when `shared` is given).
    fn open(
        nic: N,
        cfg: &Config,
        core: &Core,
        rail: usize,
        shared: Option<(&SharedLinks<N>, u64)>,
    ) -> Result<CardIo<N>, ConnectError> {
        let regs = CardRegs::register(Arc::new(nic), &RailMemory::of(core, rail))?;
        let RoutedLink { route, link } = make_link(shared, rail, &regs.nic, cfg)?;
        Ok(CardIo { route, link, regs })
    }

    pub(crate) fn nic(&self) -> &Arc<N> {
        &self.regs.nic
    }
}

impl<N: Nic> RailIo<N> {
    /// Whether its card's device events are read by the endpoint (`endpoint_reads`: the
    /// connection's `card_events_elsewhere`), not by the connection or its control thread: only
    /// on the endpoint's own card.
    #[inline]
    fn events_read_by_endpoint(&self, endpoint_reads: bool) -> bool {
        endpoint_reads && self.endpoint_epoch.is_some()
    }
}

/// A fresh queue pair for rail `rail` on `nic`: on the endpoint's shared completion queues when
/// the connection has them and `nic` is the endpoint's card of that epoch (see
/// [`crate::shared_queues`]), else with a queue of its own.
pub(crate) fn make_link<N: Nic>(
    shared: Option<(&SharedLinks<N>, u64)>,
    rail: usize,
    nic: &N,
    cfg: &Config,
) -> Result<RoutedLink<N>, FabricError> {
    match shared {
        Some((s, epoch)) => s.make_link(rail, nic, epoch, &cfg.link()),
        None => Ok(RoutedLink {
            route: None,
            link: nic.create_link(&cfg.link())?,
        }),
    }
}

/// A connection whose links exist but are not yet connected to the peer's.
pub struct PendingConnection<N: Nic, C: Clock> {
    conn: Connection<N, C>,
    hellos: Vec<Hello>,
}

/// A railover connection: both directions over every rail, failover included.
///
/// Single-threaded and caller-driven (busy-poll, or blocking with
/// [`Receiver::recv_blocking`]): [`Connection::send`] posts at once, [`Receiver::poll`] makes
/// progress (completions, events, heartbeats) and delivers. Everything that is not sending lives
/// on the [`Receiver`] half and is reached through `Deref`. [`Connection::split`] hands the sending
/// half to another thread.
pub struct Connection<N: Nic, C: Clock> {
    rx: Receiver<N, C>,
    /// Sends since the last full progress: a caller that only sends still heart-beats.
    sends_since_progress: u32,
}

/// The receiving half, which also drives the connection: completions, device events,
/// heartbeats, acknowledgements, failover, re-arm, and posting what the [`Sender`] committed.
/// After [`Connection::split`] it must keep being polled (busy or blocking) for anything to move.
pub struct Receiver<N: Nic, C: Clock> {
    core: Core,
    rails: Vec<RailIo<N>>,
    clock: C,
    rearm_requests: Vec<usize>,
    completions: [Completion; 32],
    /// Re-arms with a peer in another process, over the set-up TCP stream (see [`crate::rearm`]).
    control: Option<Control<N>>,
    /// After a split: how the sender wakes this receiver when it sleeps in a blocking receive.
    doorbell: Option<Arc<Doorbell>>,
    /// Set when the split [`Sender`] is dropped: the connection then closes.
    sender_gone: Option<Arc<AtomicBool>>,
    /// When the cards' retransmission counters are read next (gray switch, inline control:
    /// about once a heartbeat interval; a control thread reads them itself).
    next_counter_read: Nanos,
    /// When every rail's completions and device events are looked at next (see
    /// [`QUIET_RAIL_POLL_NS`]); 0 makes the next `progress` look at all.
    quiet_rails_due: Nanos,
    /// The rails the last `progress` polled when it left the others and the device events for
    /// later (0 after it looked at all): the connection then wants `progress` again by
    /// `quiet_rails_due` ([`Receiver::next_timeout`]).
    partly_polled: u8,
    /// `progress` calls that ran `progress_rest` ([`Stats::full_turns`]).
    full_turns: u64,
    /// The core may have sent or heard a beat (or missed a rail) since its liveness group last
    /// heard from it: set by every completion, device event and post, cleared when a quiet poll
    /// publishes (the full turn publishes whatever it is).
    liveness_unpublished: bool,
    /// The cards are shared with other connections (an [`crate::Endpoint`]): their device
    /// events are read once, there, and handed to every connection on them
    /// ([`Receiver::card_event`]); neither this connection nor its control thread reads them
    /// (the user's card, given with `replace_card`, they read).
    pub(crate) card_events_elsewhere: bool,
    /// Per rail, the card the user swapped in ([`Receiver::replace_card`]) while the control
    /// thread has not installed it: a re-arm on any other card (the old one, or one the thread
    /// reopened), queued before the thread took the user's, is retired instead of installed.
    /// (Weak: if the thread lets go of the user's card, after a device-fatal event, the swap is
    /// over and whatever the thread reopens by its name is installed.)
    card_swaps: [Option<std::sync::Weak<N>>; MAX_RAILS],
    /// The peer's endpoint, when both sides share liveness between their endpoints (set at
    /// set-up; the endpoint that inserts the connection puts it in that group).
    pub(crate) peer_endpoint: Option<u64>,
    /// Its place in the group of connections to the same peer endpoint (see [`crate::liveness`]).
    pub(crate) liveness: Option<crate::liveness::Member>,
    /// An endpoint's connection: its queue pairs go on the endpoint's shared completion queues,
    /// whose completions the endpoint hands over ([`Receiver::shared_completion`]).
    shared: Option<SharedLinks<N>>,
}

/// Lets a split [`Sender`] wake its [`Receiver`] sleeping in a blocking receive, so a record
/// committed meanwhile is posted at once rather than at the next heartbeat. The sender pays a
/// fence and a load per send; the eventfd `write` only while the receiver sleeps.
struct Doorbell {
    /// Receiver -> sender: it is (about to be) asleep. Dekker with the sender's commit: each side
    /// stores, fences SeqCst, then reads the other's (committed records / this flag).
    asleep: AtomicBool,
    fd: rustix::fd::OwnedFd,
    /// Rings so far (a statistic).
    rings: AtomicU64,
}

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        use rustix::event::{eventfd, EventfdFlags};
        Ok(Doorbell {
            asleep: AtomicBool::new(false),
            fd: eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?,
            rings: AtomicU64::new(0),
        })
    }

    /// Sender, after committing a record.
    fn ring_if_asleep(&self) {
        // Orders the commit (segq's Release store) before the load of `asleep` (see the field).
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) {
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
            self.rings.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Receiver, after waking: no longer asleep, and consumes the rings if the wait saw the
    /// eventfd readable (no system call otherwise).
    fn clear(&self, rang: bool) {
        self.asleep.store(false, Ordering::Relaxed);
        if rang {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.fd, &mut b);
        }
    }
}

/// The sending half after [`Connection::split`]: lock-free and allocation-free, it frames records
/// into the active rail's ring (no syscall, no lock: a Dekker handshake with the failover, see
/// `railover_segq::lanes`). The [`Receiver`]'s thread posts them.
///
/// Dropping it closes the connection (gracefully: see [`Receiver::close`]); once the connection
/// ended, sends fail with the reason ([`SendError::AllRailsDown`] or [`SendError::Ended`]).
pub struct Sender {
    writer: LaneWriter,
    doorbell: Option<Arc<Doorbell>>,
    /// Tells the [`Receiver`] this half is gone (after a split).
    gone: Option<Arc<AtomicBool>>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(gone) = &self.gone {
            // Pairs with the Acquire in `Receiver::progress_counted`.
            gone.store(true, Ordering::Release);
        }
        self.notify(); // a receiver asleep in a blocking receive closes now, not at its next tick
    }
}

impl Sender {
    /// Queues `msg`; the receiver's thread posts it. Returns its sequence number. A failover in
    /// progress is waited out (it takes microseconds); a full ring is [`SendError::Backpressure`],
    /// and so is the wait after a failover to a full hot standby for the records it kept
    /// ([`crate::core::Core::keeps_records`]), which lasts until the peer frees room. A message
    /// larger than the configured largest record is [`SendError::TooLarge`] at once, waits or
    /// not.
    pub fn send(&mut self, msg: &[u8]) -> Result<u64, SendError> {
        self.push_past_switches(|w| w.push(msg))
    }

    /// Queues `msgs` as consecutive records with one commit, all or none ([`Connection::send_batch`]);
    /// the receiver's thread posts them, in one write when they fit in one. Returns their
    /// sequence numbers. Waits out a failover as [`Sender::send`] does.
    pub fn send_batch(&mut self, msgs: &[&[u8]]) -> Result<Range<u64>, SendError> {
        self.push_past_switches(|w| w.push_batch(msgs))
    }

    /// Pushes with `push`, spinning while a failover switches lanes; wakes a sleeping receiver
    /// after a push that went in.
    #[inline(always)]
    fn push_past_switches<T>(
        &mut self,
        mut push: impl FnMut(&mut LaneWriter) -> Result<T, LaneError>,
    ) -> Result<T, SendError> {
        loop {
            match push(&mut self.writer) {
                Err(LaneError::Switching) => std::hint::spin_loop(),
                r => {
                    if r.is_ok() {
                        self.notify();
                    }
                    return r.map_err(send_error_of);
                }
            }
        }
    }

    /// Like [`Sender::send`], retrying a full ring until `timeout` passes (spinning: the
    /// receiver's thread frees space as acknowledgements arrive).
    pub fn send_timeout(
        &mut self,
        msg: &[u8],
        timeout: std::time::Duration,
    ) -> Result<u64, SendError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.send(msg) {
                Err(SendError::Backpressure) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now()
                }
                r => return r,
            }
        }
    }

    /// A zero-copy slot of `len` bytes: fill it and `commit()` it. Keep it short: a failover
    /// waits for it.
    pub fn reserve(&mut self, len: usize) -> Result<LaneReservation<'_>, SendError> {
        self.writer.reserve(len).map_err(send_error_of)
    }

    /// Whether the receiver is asleep in a blocking receive right now (a send would wake it).
    pub fn receiver_sleeping(&self) -> bool {
        self.doorbell
            .as_ref()
            .is_some_and(|b| b.asleep.load(Ordering::Relaxed))
    }

    /// After committing a reservation: wakes the receiver if it sleeps (it posts the record).
    pub fn notify(&self) {
        if let Some(bell) = &self.doorbell {
            bell.ring_if_asleep();
        }
    }

    /// Largest message accepted.
    pub fn max_message(&self) -> usize {
        self.writer.max_record()
    }
}

impl<N: Nic, C: Clock> std::ops::Deref for Connection<N, C> {
    type Target = Receiver<N, C>;
    fn deref(&self) -> &Receiver<N, C> {
        &self.rx
    }
}

impl<N: Nic, C: Clock> std::ops::DerefMut for Connection<N, C> {
    fn deref_mut(&mut self) -> &mut Receiver<N, C> {
        &mut self.rx
    }
}

impl<N: Nic, C: Clock> Connection<N, C> {
    /// Queues `msg` and posts it at once. Returns its sequence number.
    pub fn send(&mut self, msg: &[u8]) -> Result<u64, SendError> {
        self.send_with(|core| core.push(msg))
    }

    /// Queues `msgs` as consecutive records, all or none, and posts them at once: one commit
    /// for the batch and, when the rail's send queue and credits allow, one RDMA write (one
    /// doorbell) for as many as fit in a write. The peer delivers them in order like separate
    /// sends. Returns their sequence numbers. Without room for the whole batch:
    /// [`SendError::Backpressure`], nothing queued (let the connection progress and retry);
    /// a batch the ring could never hold: [`SendError::BatchTooLarge`] (split it).
    pub fn send_batch(&mut self, msgs: &[&[u8]]) -> Result<Range<u64>, SendError> {
        self.send_with(|core| core.push_batch(msgs))
    }

    /// Queues with `push` (once more after a progress when the ring was full), then posts.
    #[inline(always)]
    fn send_with<T>(
        &mut self,
        push: impl Fn(&mut Core) -> Result<T, SendError>,
    ) -> Result<T, SendError> {
        let mut r = push(&mut self.rx.core);
        if matches!(r, Err(SendError::Backpressure)) {
            self.rx.progress(); // acknowledgements may be waiting
            r = push(&mut self.rx.core);
        }
        self.rx.flush_after_send();
        // Keep the engine turning for callers that only send (heartbeats, completions,
        // acknowledgements): after this call's write is posted, not before it.
        self.sends_since_progress += 1;
        if self.sends_since_progress >= 64 {
            self.sends_since_progress = 0;
            self.rx.progress();
        }
        r
    }

    /// Like [`Connection::send`], but when the ring is full it keeps the connection running
    /// (completions, acknowledgements, heartbeats, failover) for up to `timeout_ns` waiting for
    /// space. Still full at the deadline: [`SendError::Backpressure`]; nothing is queued then.
    /// A connection of an [`crate::Endpoint`] can't wait here (its completions come through the
    /// endpoint): full, it says [`SendError::DrivenByEndpoint`] at once.
    pub fn send_timeout(&mut self, msg: &[u8], timeout_ns: Nanos) -> Result<u64, SendError> {
        let deadline = self.rx.clock.now().saturating_add(timeout_ns);
        loop {
            match self.send(msg) {
                Err(SendError::Backpressure) if self.rx.on_shared_queues() => {
                    return Err(SendError::DrivenByEndpoint);
                }
                Err(SendError::Backpressure) => {}
                done => return done,
            }
            if self.rx.clock.now() >= deadline {
                return Err(SendError::Backpressure);
            }
            self.rx.clock.idle(deadline);
            self.rx.progress();
        }
    }

    /// A zero-copy slot: fill it, `commit()` it, then call [`Receiver::flush`]. On
    /// [`SendError::Backpressure`], let the connection progress ([`Receiver::progress`]) and retry.
    pub fn reserve(&mut self, len: usize) -> Result<Reservation<'_>, SendError> {
        self.rx.core.reserve(len)
    }

    /// Hands the sending half to another thread. The [`Receiver`] keeps driving the connection
    /// and posts what the [`Sender`] commits, so some thread must keep polling it (busy, or
    /// blocking: the sender wakes a sleeping receiver). Sends cost two fences more than on an
    /// unsplit connection and reach the wire on the receiver's next poll.
    pub fn split(mut self) -> (Sender, Receiver<N, C>) {
        let tx = self
            .take_sender()
            .expect("a connection hands out its writer once, at split (which consumes it)");
        let Connection { rx, .. } = self;
        (tx, rx)
    }

    /// [`Connection::split`] in place: the [`Sender`] goes to another thread (or a handler) while
    /// this connection keeps driving itself as its own [`Receiver`] (its `send` and `reserve`
    /// then fail with [`SendError::WriterElsewhere`]). None if it was taken already.
    pub fn take_sender(&mut self) -> Option<Sender> {
        let rx = &mut self.rx;
        let writer = rx.core.take_writer()?;
        let mut tx = Sender {
            writer,
            doorbell: None,
            gone: None,
        };
        let gone = Arc::new(AtomicBool::new(false));
        tx.gone = Some(gone.clone());
        rx.sender_gone = Some(gone);
        match Doorbell::new() {
            Ok(bell) => {
                let bell = Arc::new(bell);
                tx.doorbell = Some(bell.clone());
                rx.doorbell = Some(bell);
            }
            // Only blocking receives lose: they post at the next heartbeat instead.
            Err(e) => {
                tracing::warn!(error = %e, "no eventfd: a sleeping receiver wakes on its timers only")
            }
        }
        Some(tx)
    }
}

/// What this side tells the peer about one rail (at connect and at every re-arm: one definition):
/// its queue pair, and where the peer writes (`remotes`: this side's mirror ring, control slot).
pub(crate) fn rail_hello(
    cfg: &Config,
    rail: usize,
    endpoint: railover_rdma::Endpoint,
    remotes: (RemoteRegion, RemoteRegion),
) -> Hello {
    Hello {
        rail_index: rail as u16,
        rail_count: cfg.rails() as u16,
        endpoint,
        geometry: wire_geometry(cfg),
        ring: remotes.0,
        ctrl: remotes.1,
    }
}

fn wire_geometry(cfg: &Config) -> WireGeometry {
    let g = cfg.geometry();
    WireGeometry {
        segment_size: g.segment_size() as u32,
        segment_count: g.segment_count() as u32,
        max_record: g.max_record() as u32,
    }
}

/// One rail's card at set-up.
pub enum RailCard<N: Nic> {
    Open(N),
    /// It could not be opened (a card missing after a restart): the rail starts failed, the
    /// peer is told ([`Hello::absent`]), and a re-arm opens it again from this token (its name)
    /// once it is back.
    Absent(N::Reopen),
}

impl<N: Nic, C: Clock> PendingConnection<N, C> {
    /// Allocates and registers every rail's memory on its card and creates the queue pairs.
    /// `cards[i]` is this host's card of rail i (the first is primary).
    pub fn new(cfg: Config, cards: Vec<N>, clock: C) -> Result<Self, ConnectError> {
        let cards = cards.into_iter().map(RailCard::Open).collect();
        Self::with_cards(cfg, cards, clock, None)
    }

    /// Like [`PendingConnection::new`] with rails whose card could not be opened (at least one
    /// must be open), continuing `resume`'s stream if given (see
    /// [`PendingConnection::new_resuming`]).
    pub fn with_cards(
        cfg: Config,
        cards: Vec<RailCard<N>>,
        clock: C,
        resume: Option<&crate::core::ResumeState>,
    ) -> Result<Self, ConnectError> {
        let core = match resume {
            Some(state) => Core::new_resuming(cfg, clock.now(), state)?,
            None => Core::new(cfg, clock.now())?,
        };
        Self::with_core(cfg, cards, clock, core, None)
    }

    /// Like [`PendingConnection::with_cards`] for an endpoint's connection: its queue pairs go on
    /// the endpoint's shared completion queues (see [`crate::shared_queues`]), and the endpoint
    /// reads the cards' device events. `cards` are the endpoint's, each with the pool's epoch it
    /// was taken at (read with it: see [`QueuePool::card_at`]).
    pub(crate) fn on_shared_queues(
        cfg: Config,
        cards: Vec<(RailCard<N>, u64)>,
        clock: C,
        pool: &Arc<QueuePool<N>>,
    ) -> Result<Self, ConnectError> {
        let core = Core::new(cfg, clock.now())?;
        let shared = SharedLinks::new(pool);
        let (cards, epochs): (Vec<_>, Vec<_>) = cards.into_iter().unzip();
        let shared = Some((shared, epochs));
        let mut pending = Self::with_core(cfg, cards, clock, core, shared)?;
        pending.conn.rx.card_events_elsewhere = true;
        Ok(pending)
    }

    /// Like [`PendingConnection::new`], continuing the stream of a connection that ended
    /// ([`Receiver::resume_state`]): its unacknowledged records are sent again under their own
    /// sequence numbers and whatever it already delivered is discarded, so the application sees
    /// every record exactly once across both connections. The peer must resume too.
    pub fn new_resuming(
        cfg: Config,
        cards: Vec<N>,
        clock: C,
        state: &crate::core::ResumeState,
    ) -> Result<Self, ConnectError> {
        let cards = cards.into_iter().map(RailCard::Open).collect();
        Self::with_cards(cfg, cards, clock, Some(state))
    }

    /// `shared`: an endpoint's connection, with the pool's epoch of each of its cards.
    fn with_core(
        cfg: Config,
        cards: Vec<RailCard<N>>,
        clock: C,
        core: Core,
        shared: Option<(SharedLinks<N>, Vec<u64>)>,
    ) -> Result<Self, ConnectError> {
        let (shared, epochs) = shared.unzip();
        let epoch = |i: usize| epochs.as_ref().map(|e| e.get(i).copied().unwrap_or(0));
        if cards.len() != cfg.rails() {
            return Err(ConnectError::RailCount {
                want: cfg.rails(),
                got: cards.len(),
            });
        }
        let mut rails = Vec::with_capacity(cards.len());
        let mut hellos = Vec::with_capacity(cards.len());
        for (i, card) in cards.into_iter().enumerate() {
            let (card, reopen) = match card {
                RailCard::Open(nic) => {
                    let reopen = nic.reopen_token();
                    let on_pool = shared.as_ref().zip(epoch(i));
                    match CardIo::open(nic, &cfg, &core, i, on_pool) {
                        Ok(card) => {
                            hellos.push(rail_hello(
                                &cfg,
                                i,
                                card.link.endpoint(),
                                card.regs.remotes(),
                            ));
                            (Some(card), reopen)
                        }
                        // The endpoint's card, released since the set-up took it (device
                        // fatal), or failing: the rail starts absent and joins when it is back.
                        Err(e) if on_pool.is_some() => {
                            tracing::warn!(rail = i, error = %e, "card unusable at set-up: the rail starts failed");
                            hellos.push(Hello::absent(
                                i as u16,
                                cfg.rails() as u16,
                                wire_geometry(&cfg),
                            ));
                            (None, reopen)
                        }
                        Err(e) => return Err(e),
                    }
                }
                RailCard::Absent(reopen) => {
                    hellos.push(Hello::absent(
                        i as u16,
                        cfg.rails() as u16,
                        wire_geometry(&cfg),
                    ));
                    (None, reopen)
                }
            };
            rails.push(RailIo {
                card,
                reopen,
                endpoint_epoch: epoch(i),
                peer_ring: RemoteRegion::default(),
                peer_ctrl: RemoteRegion::default(),
            });
        }
        Ok(PendingConnection {
            conn: Connection {
                rx: Receiver {
                    core,
                    rails,
                    clock,
                    rearm_requests: Vec::with_capacity(8),
                    completions: [Completion::EMPTY; 32],
                    control: None,
                    doorbell: None,
                    sender_gone: None,
                    next_counter_read: 0,
                    quiet_rails_due: 0,
                    partly_polled: 0,
                    full_turns: 0,
                    liveness_unpublished: false,
                    card_events_elsewhere: false,
                    card_swaps: Default::default(),
                    shared,
                    peer_endpoint: None,
                    liveness: None,
                },
                sends_since_progress: 0,
            },
            hellos,
        })
    }

    /// What to send the peer, one per rail.
    pub fn hellos(&self) -> &[Hello] {
        &self.hellos
    }

    /// Validates the peer's hellos, connects every rail and starts the connection. Use this when
    /// the peer is known to be connected too (one process); across hosts use
    /// [`PendingConnection::connect_links`], a barrier with the peer, then [`Receiver::start`].
    pub fn connect(self, peer: &[Hello]) -> Result<Connection<N, C>, ConnectError> {
        let mut conn = self.connect_links(peer)?;
        conn.start();
        Ok(conn)
    }

    /// Validates the peer's hellos (one per rail, same order) and connects every rail's queue pair,
    /// without sending anything yet.
    pub fn connect_links(mut self, peer: &[Hello]) -> Result<Connection<N, C>, ConnectError> {
        if peer.len() != self.hellos.len() {
            return Err(ConnectError::RailCount {
                want: self.hellos.len(),
                got: peer.len(),
            });
        }
        let mut unreachable = Vec::new();
        for (i, (ours, theirs)) in self.hellos.iter().zip(peer).enumerate() {
            // Re-validate: a caller may hand us hellos that never went through decode().
            let theirs = Hello::decode(&theirs.encode())?;
            ours.check_peer(&theirs)?;
            let rail = &mut self.conn.rails[i];
            rail.peer_ring = theirs.ring;
            rail.peer_ctrl = theirs.ctrl;
            // A card missing on either side: the rail starts failed and joins later.
            let Some(card) = rail.card.as_mut().filter(|_| !theirs.is_absent()) else {
                tracing::warn!(
                    rail = i,
                    "no card on one side at set-up: the rail starts failed"
                );
                unreachable.push((i, FabricError::NotConnected));
                continue;
            };
            if let Err(e) = card.link.connect(&theirs.endpoint) {
                // A wire or port down at start-up: the rail starts failed and joins later.
                tracing::warn!(rail = i, error = %e, "rail unreachable at set-up");
                unreachable.push((i, e));
            }
        }
        if unreachable.len() == self.hellos.len() {
            let (_, e) = unreachable.swap_remove(0);
            return Err(e.into()); // no rail at all: nothing to start with
        }
        for (rail, _) in unreachable {
            self.conn.rx.core.rail_unreachable(rail);
        }
        self.conn.rx.flush();
        Ok(self.conn)
    }
}

impl<N: Nic, C: Clock> Receiver<N, C> {
    /// Starts heartbeats and posts the first receives and control writes. Call once the peer's
    /// queue pairs are connected too.
    pub fn start(&mut self) {
        let now = self.clock.now();
        self.core.start(now);
        self.flush();
    }

    /// Makes progress, then delivers every message that arrived (zero-copy, in order, exactly once).
    #[inline]
    pub fn poll(&mut self, deliver: impl FnMut(&[u8])) -> Result<usize, RecvError> {
        self.progress();
        let n = self.core.poll_recv(deliver);
        if self.core.recv_made_io_due() {
            self.flush(); // acknowledgements it made due, a rail it failed
        }
        n
    }

    /// [`Receiver::poll`], with each message's sequence number (what the peer's `send`
    /// returned for it: 1, 2, 3, ... in delivery order, continued by a resumed connection).
    pub fn poll_seq(&mut self, deliver: impl FnMut(u64, &[u8])) -> Result<usize, RecvError> {
        self.progress();
        let n = self.core.poll_recv_seq(deliver);
        if self.core.recv_made_io_due() {
            self.flush();
        }
        n
    }

    /// [`Receiver::poll_seq`] at `now`, read by the caller: an endpoint reads its clock once
    /// for all its connections.
    #[inline]
    pub(crate) fn poll_seq_at(
        &mut self,
        now: Nanos,
        deliver: impl FnMut(u64, &[u8]),
    ) -> Result<usize, RecvError> {
        self.progress_counted_at(now);
        let n = self.core.poll_recv_seq(deliver);
        if self.core.recv_made_io_due() {
            self.flush();
        }
        n
    }

    /// Makes progress, then copies the next message (if any) into `buf`, which must hold the
    /// largest record. Returns its length.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, RecvError> {
        self.progress();
        let n = self.core.recv(buf);
        if self.core.recv_made_io_due() {
            self.flush();
        }
        n
    }

    /// Blocking form of [`Receiver::poll`]: sleeps (completion channels, device events) until
    /// a message arrives or `timeout_ns` pass; returns how many were delivered (0: timed out).
    /// The thread still wakes at every heartbeat interval to heart-beat and check its rails.
    pub fn poll_blocking(
        &mut self,
        timeout_ns: Nanos,
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<usize, RecvError> {
        if self.on_shared_queues() {
            return Err(RecvError::DrivenByEndpoint); // it would never see a completion
        }
        let deadline = self.clock.now().saturating_add(timeout_ns);
        loop {
            let n = self.poll(&mut deliver)?;
            if n > 0 || self.clock.now() >= deadline {
                return Ok(n);
            }
            self.sleep_until(deadline);
        }
    }

    /// Blocking form of [`Receiver::recv`]: `Ok(None)` when nothing arrived within `timeout_ns`.
    pub fn recv_blocking(
        &mut self,
        buf: &mut [u8],
        timeout_ns: Nanos,
    ) -> Result<Option<usize>, RecvError> {
        if self.on_shared_queues() {
            return Err(RecvError::DrivenByEndpoint); // it would never see a completion
        }
        let deadline = self.clock.now().saturating_add(timeout_ns);
        loop {
            if let Some(n) = self.recv(buf)? {
                return Ok(Some(n));
            }
            if self.clock.now() >= deadline {
                return Ok(None);
            }
            self.sleep_until(deadline);
        }
    }

    /// Sleeps until a rail has a completion, a card has an event, the core's next timer is due
    /// (heartbeat, re-arm) or `deadline`, whichever comes first. On a fabric without wake-up
    /// descriptors (the simulator) the clock's `idle` moves virtual time instead.
    fn sleep_until(&mut self, deadline: Nanos) {
        let now = self.clock.now();
        let until = self
            .core
            .poll_timeout()
            .map_or(deadline, |t| t.min(deadline));
        if until <= now {
            return;
        }
        if !self.has_wake_descriptors() {
            // Nothing wakes it but the clock: look at every rail first, as arming does.
            if self.look_at_every_rail() > 0 {
                return;
            }
            self.clock.idle(until);
            return;
        }
        if !self.arm_for_sleep() {
            return;
        }
        let Some(any) = self
            .rails
            .iter()
            .find_map(|r| r.card.as_ref().and_then(|c| c.nic().event_fd()))
        else {
            return;
        };
        // A fixed array: a blocking receive allocates nothing.
        let mut fds = [any; 2 * MAX_RAILS + 2];
        let mut n = 0;
        self.wake_fds(&mut |fd| {
            fds[n] = fd;
            n += 1;
        });
        let ready = match railover_rdma::wait_readable_mask(&fds[..n], until - now) {
            Ok(mask) => mask,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for completions failed; polling instead");
                0
            }
        };
        self.clock.woke();
        // The readable ones as numbers (-1: not readable), so the borrow of `self` ends here.
        let mut ready_fds = [-1; 2 * MAX_RAILS + 2];
        for (i, fd) in fds[..n].iter().enumerate() {
            if ready & (1 << i) != 0 {
                ready_fds[i] = fd.as_raw_fd();
            }
        }
        self.after_sleep(&|fd| ready_fds[..n].contains(&fd.as_raw_fd()));
    }

    /// Runs this connection's heartbeat ticks on the interval grid (see
    /// [`crate::core::Core::align_heartbeats`]): an endpoint's blocking wait asks for it.
    pub(crate) fn align_heartbeats(&mut self, on: bool) {
        self.core.align_heartbeats(on);
    }

    /// Whether every open card gives wake-up descriptors (completion channel, device events), so
    /// a blocking wait can sleep on them (not on the simulator, nor with no card open).
    pub(crate) fn has_wake_descriptors(&self) -> bool {
        self.has_open_card() && self.open_cards_wake()
    }

    pub(crate) fn has_open_card(&self) -> bool {
        self.rails.iter().any(|r| r.card.is_some())
    }

    /// Whether every open card (if any) gives wake-up descriptors.
    pub(crate) fn open_cards_wake(&self) -> bool {
        self.rails.iter().filter_map(|r| r.card.as_ref()).all(|c| {
            // A link on a shared queue wakes through the endpoint's descriptor of that queue.
            (c.route.is_some() || c.link.wakeup_fd().is_some()) && c.nic().event_fd().is_some()
        })
    }

    /// Hands rail `rail` a completion its endpoint took from a shared queue, naming queue pair
    /// `qpn`. False (and nothing done) when the rail's queue pair is no longer that one: a
    /// leftover of one replaced since.
    pub(crate) fn shared_completion(
        &mut self,
        rail: usize,
        qpn: u32,
        c: Completion,
        now: Nanos,
    ) -> bool {
        let current = self.rails.get(rail).and_then(|r| r.card.as_ref());
        let route = current.and_then(|card| card.route.as_ref());
        if route.map(RouteGuard::qpn) != Some(qpn) {
            // A leftover of a queue pair replaced since. (A fresh one completes nothing before
            // its install: its receives are posted only then.)
            return false;
        }
        // The core learns the time before the completion, as from its own queues (a beat the
        // completion carries is heard now, not at the last poll).
        self.core.observe_time(now);
        self.liveness_unpublished = true;
        self.core.handle_completion(rail, &c);
        true
    }

    /// This connection's queue pairs on shared completion queues: (rail, number, the card's
    /// epoch).
    pub(crate) fn shared_links(&self) -> impl Iterator<Item = (usize, u32, u64)> + '_ {
        self.rails.iter().enumerate().filter_map(|(i, r)| {
            let guard = r.card.as_ref()?.route.as_ref()?;
            Some((i, guard.qpn(), guard.epoch()))
        })
    }

    /// Whether the connection is an endpoint's, its queue pairs made on the endpoint's shared
    /// completion queues (those that could not be have queues of their own): the endpoint hands
    /// it its completions, so its blocking calls (close, receive, `send_timeout`) are the
    /// endpoint's to make.
    pub fn on_shared_queues(&self) -> bool {
        self.shared.is_some()
    }

    /// How many of its rails' queue pairs are on its endpoint's shared completion queues (the
    /// others have queues of their own, which its `progress` polls).
    pub fn rails_on_shared_queues(&self) -> usize {
        self.shared_links().count()
    }

    /// The token the endpoint's queue news names this connection by.
    pub(crate) fn route_owner(&self) -> Option<u64> {
        self.shared.as_ref().map(SharedLinks::owner)
    }

    /// Before a blocking wait: arms the rails' completion channels and tells a split sender this
    /// thread is about to sleep. False when it must not sleep: a completion arrived before the
    /// arming (it raises no wake-up), or the sender committed a record meanwhile (nothing is
    /// left to undo then). After true: [`Receiver::after_sleep`] once awake, or
    /// [`Receiver::cancel_sleep`] if the wait does not happen after all.
    pub(crate) fn arm_for_sleep(&mut self) -> bool {
        for (i, rail) in self.rails.iter_mut().enumerate() {
            let Some(card) = rail.card.as_mut() else {
                continue;
            };
            if self.core.rail_state(i) != RailState::Failed {
                if let Err(e) = card.link.arm_wakeup() {
                    tracing::warn!(rail = i, error = %e, "arming the completion channel failed");
                }
            }
        }
        // A completion that arrived before arming raises no wake-up: look once more, at every
        // rail (the wait wakes for any of them).
        if self.look_at_every_rail() > 0 {
            return false;
        }
        if let Some(bell) = &self.doorbell {
            bell.asleep.store(true, Ordering::Relaxed);
            // Dekker with `Doorbell::ring_if_asleep` (see `Doorbell::asleep`).
            fence(Ordering::SeqCst);
            if self.core.has_unposted() {
                bell.asleep.store(false, Ordering::Relaxed);
                return false; // the sender committed meanwhile: post it, don't sleep
            }
        }
        true
    }

    /// The descriptors that wake this connection from a blocking wait: each rail's completion
    /// channel, its cards' device events (unless a control thread or an endpoint reads them),
    /// its control thread's news, a split sender's doorbell.
    pub(crate) fn wake_fds<'a>(&'a self, push: &mut impl FnMut(BorrowedFd<'a>)) {
        // A control thread reads the cards' events and rings its own descriptor instead.
        let thread = match &self.control {
            Some(Control::Thread(t)) => Some(t),
            _ => None,
        };
        for rail in &self.rails {
            let Some(card) = &rail.card else { continue };
            // An endpoint reads its own cards' events; the user's card, the connection reads.
            let events = card.nic().event_fd().filter(|_| {
                thread.is_none() && !rail.events_read_by_endpoint(self.card_events_elsewhere)
            });
            for fd in [card.link.wakeup_fd(), events].into_iter().flatten() {
                push(fd);
            }
        }
        if let Some(t) = thread {
            push(t.wake_fd());
        }
        if let Some(bell) = &self.doorbell {
            push(rustix::fd::AsFd::as_fd(&bell.fd));
        }
    }

    /// After [`Receiver::arm_for_sleep`] said true, when the wait does not happen after all:
    /// a split sender stops ringing.
    pub(crate) fn cancel_sleep(&mut self) {
        if let Some(bell) = &self.doorbell {
            bell.asleep.store(false, Ordering::Relaxed);
        }
    }

    /// After a blocking wait: consumes the wake-ups of the descriptors the wait saw readable
    /// (`readable`), and only those: waking makes no system call per queue pair. (A completion
    /// channel whose completions were polled is also consumed by its next arming.)
    pub(crate) fn after_sleep(&mut self, readable: &dyn Fn(BorrowedFd<'_>) -> bool) {
        self.quiet_rails_due = 0; // whichever rail woke it is looked at next
        if let Some(Control::Thread(t)) = &self.control {
            if readable(t.wake_fd()) {
                t.clear_wake();
            }
        }
        if let Some(bell) = &self.doorbell {
            bell.clear(readable(rustix::fd::AsFd::as_fd(&bell.fd)));
        }
        for card in self.rails.iter_mut().filter_map(|r| r.card.as_mut()) {
            if card.link.wakeup_fd().is_some_and(readable) {
                card.link.clear_wakeups();
            }
        }
    }

    /// A `progress` that looks at every rail and device event, quiet ones included (before a
    /// blocking wait): returns how many it handled.
    pub(crate) fn look_at_every_rail(&mut self) -> usize {
        self.quiet_rails_due = 0;
        self.progress_counted()
    }

    /// Makes the next `progress` look at every rail and device event.
    pub(crate) fn look_at_every_rail_next(&mut self) {
        self.quiet_rails_due = 0;
    }

    /// Whether a `progress` left rails or device events unlooked-at since they were last looked
    /// at (see [`QUIET_RAIL_POLL_NS`]): not when every rail is busy (hot-hot) and the cards'
    /// events are read elsewhere (a control thread, an endpoint).
    pub(crate) fn quiet_rails_owed(&self) -> bool {
        self.partly_polled != 0
            && (self.partly_polled != self.core.all_rails() || self.reads_card_events())
    }

    /// Whether `progress` reads the cards' device events itself: not when a control thread
    /// does (a system call each, off the data thread) or an endpoint (once for all its
    /// connections).
    fn reads_card_events(&self) -> bool {
        !matches!(self.control, Some(Control::Thread(_)))
            && (!self.card_events_elsewhere
                || (self.rails.iter()).any(|r| r.card.is_some() && r.endpoint_epoch.is_none()))
    }

    /// Whether `rail` runs on its endpoint's card (whose events the endpoint reads and hands to
    /// every connection on it), not the user's, and the card is not released.
    pub(crate) fn on_endpoint_card(&self, rail: usize) -> bool {
        self.rails
            .get(rail)
            .is_some_and(|r| r.card.is_some() && r.endpoint_epoch.is_some())
    }

    /// Whether `rail` runs on an opening of its endpoint's card that the endpoint has let go of
    /// since (a device-fatal event handled while this connection was being set up): it missed
    /// the event, and must hear it (see [`crate::Endpoint::insert`]).
    pub(crate) fn on_released_endpoint_card(&self, rail: usize, current: Option<u64>) -> bool {
        self.rails.get(rail).is_some_and(|r| {
            r.card.is_some() && r.endpoint_epoch.is_some_and(|e| Some(e) != current)
        })
    }

    /// Whether `rail`'s card (present or released) is its endpoint's.
    pub(crate) fn endpoint_rail(&self, rail: usize) -> bool {
        self.rails
            .get(rail)
            .is_some_and(|r| r.endpoint_epoch.is_some())
    }

    /// The endpoint let go of `rail`'s card (a device-fatal event) while this connection had
    /// released it already, mid re-arm: its control thread, which may hold that card for an
    /// install or a fresh queue pair on it, is woken to let go too (see `ControlTask::turn`).
    pub(crate) fn endpoint_card_released(&self) {
        if let Some(Control::Thread(t)) = &self.control {
            t.card_released();
        }
    }

    /// Processes completions, device events and timers, and posts what the core asks for.
    ///
    /// The rails carrying either side's records ([`Core::busy_rails`]) are polled every time;
    /// the others, which carry heartbeats alone until a failover, and the cards' device events,
    /// at most [`QUIET_RAIL_POLL_NS`] apart (and always before a blocking wait): a busy loop
    /// polls one completion queue, not one per card.
    pub fn progress(&mut self) {
        self.progress_counted();
    }

    /// [`Connection::progress`], returning how many completions and device events it handled.
    #[inline]
    fn progress_counted(&mut self) -> usize {
        let now = self.clock.now();
        self.progress_counted_at(now)
    }

    /// [`Receiver::progress_counted`] at `now`, read by the caller (an endpoint reads its clock
    /// once for all its connections).
    #[inline]
    fn progress_counted_at(&mut self, now: Nanos) -> usize {
        if now < self.quiet_rails_due {
            // The busy loop's poll: the rails carrying records alone, and when they bring
            // nothing and nothing is due, no more than a few loads.
            let busy = self.core.busy_rails();
            self.partly_polled = busy;
            let (handled, _) = self.poll_rails(now, busy, false);
            // Completions alone (the common one: a record arrived) leave nothing for the full
            // turn: whatever they make due (a failed rail, receives or a control block to post,
            // a beat heard) sets the core's rescan, and `nothing_due` sees it.
            if self.nothing_due(now, busy) {
                return handled;
            }
            self.progress_rest(now, busy, 0, false);
            return handled;
        }
        self.quiet_rails_due = now.saturating_add(QUIET_RAIL_POLL_NS);
        self.partly_polled = 0;
        let events_here = self.reads_card_events();
        let (handled, fatal) = self.poll_rails(now, u8::MAX, events_here);
        self.progress_rest(now, u8::MAX, fatal, events_here);
        handled
    }

    /// Polls the rails in `polled` (a bit mask): their completions, and their cards' device
    /// events when `events` is set. Returns how many it handled, and the rails whose card
    /// reported a device-fatal event. The core learns the time `now` before it hears of any.
    #[inline]
    fn poll_rails(&mut self, now: Nanos, polled: u8, events: bool) -> (usize, u8) {
        let mut handled = 0;
        let mut fatal = 0u8;
        let mut left = polled;
        let endpoint_reads = self.card_events_elsewhere;
        while left != 0 {
            let i = left.trailing_zeros() as usize;
            left &= left - 1;
            // (Bits past the last rail end the walk: the lowest comes first.)
            let Some(rail) = self.rails.get_mut(i) else {
                break;
            };
            let Some(card) = rail.card.as_mut() else {
                continue;
            };
            // An endpoint reads its own cards' events (one read for all its connections).
            let events = events && !(endpoint_reads && rail.endpoint_epoch.is_some());
            while let Some(ev) = events.then(|| card.nic().poll_event()).flatten() {
                self.core.observe_time(now);
                self.liveness_unpublished = true;
                if ev == AsyncEvent::DeviceFatal {
                    fatal |= 1 << i;
                }
                self.core.handle_event(i, ev);
                handled += 1;
            }
            if card.route.is_some() {
                continue; // on a shared queue: the endpoint polls it and hands completions over
            }
            loop {
                let n = card.link.poll(&mut self.completions);
                if n > 0 {
                    self.core.observe_time(now);
                    self.liveness_unpublished = true;
                }
                for c in &self.completions[..n] {
                    self.core.handle_completion(i, c);
                }
                handled += n;
                if n < self.completions.len() {
                    break;
                }
            }
        }
        (handled, fatal)
    }

    /// Whether an empty poll of the rails in `watched` leaves nothing to do: no timer due, no
    /// peer control block changed on them, no I/O due, no control-plane news, no dropped
    /// sender. (It runs the core's quiet timer tick, and a liveness group's publication.)
    #[inline]
    fn nothing_due(&mut self, now: Nanos, watched: u8) -> bool {
        let quiet = self
            .sender_gone
            .as_ref()
            .is_none_or(|g| !g.load(Ordering::Relaxed))
            && match &self.control {
                None => true,
                Some(Control::Thread(t)) => self.rearm_requests.is_empty() && t.idle(),
                Some(Control::Inline(c)) => c.idle(self),
            }
            && self.core.quiet_tick(now, watched)
            && self.core.nothing_to_post();
        if quiet && self.liveness_unpublished {
            if let Some(member) = &mut self.liveness {
                // No heartbeat tick is due (the quiet tick says so), so the group has nothing
                // to hand the core; what the core sent and heard since it last published (a
                // beat the last flush posted, one a completion carried) is published as the
                // full turn would. (Beats go out only in posts and are heard only in
                // completions or the full turn, which publishes itself.)
                member.after_turn(&mut self.core, now);
            }
            self.liveness_unpublished = false;
        }
        quiet
    }

    /// The rest of a `progress` after polling the rails in `polled`: released cards, counters,
    /// timers, posting, the control plane.
    #[inline(never)]
    fn progress_rest(&mut self, now: Nanos, polled: u8, fatal: u8, events_here: bool) {
        self.full_turns += 1;
        self.core.observe_time(now);
        if fatal != 0 {
            for rail in (0..self.rails.len()).filter(|r| fatal & (1 << r) != 0) {
                self.release_card(rail);
            }
        }
        if events_here && now >= self.next_counter_read && self.core.wants_retransmissions() {
            self.next_counter_read = now + self.core.config().heartbeat_interval_ns();
            for (i, rail) in self.rails.iter().enumerate() {
                if let Some(total) = rail.card.as_ref().and_then(|c| c.nic().retransmissions()) {
                    self.core.note_retransmissions(i, total);
                }
            }
        }
        if let Some(gone) = &self.sender_gone {
            // Pairs with the Release in `Sender::drop`.
            if gone.load(Ordering::Acquire) && !self.core.is_closing() && !self.core.is_dead() {
                tracing::info!("sender dropped: closing the connection");
                let linger = self.core.config().close_linger_ns();
                self.core.close(now, linger);
            }
        }
        // Cheap (a few words per rail): reads acknowledgements and fault reports every time.
        match &mut self.liveness {
            None => self.core.handle_timeout_watching(now, polled),
            Some(member) => {
                member.before_tick(&mut self.core, now);
                self.core.handle_timeout_watching(now, polled);
                member.after_turn(&mut self.core, now);
            }
        }
        self.flush();
        if let Some(mut control) = self.control.take() {
            if !self.core.is_dead() {
                match &mut control {
                    Control::Inline(c) => c.serve(self),
                    Control::Thread(t) => t.serve(self),
                }
            }
            self.control = Some(control);
        }
    }

    /// Starts a graceful close without waiting: the connection ends by itself (see
    /// [`Receiver::end_reason`]) as it keeps being driven (`poll`, `progress`), once the peer
    /// delivered everything sent or `linger_ns` passed. For event loops that can't block.
    pub fn start_close(&mut self, linger_ns: Nanos) {
        let now = self.clock.now();
        self.core.close(now, linger_ns);
        self.flush();
    }

    /// Closes the connection gracefully: no new record is accepted (a split [`Sender`] gets
    /// [`SendError::Ended`]), the connection keeps running until the peer delivered every record
    /// sent — at most `linger_ns` — then the peer is told (it sees [`EndReason::PeerClosed`],
    /// never a fault). Records the peer did not deliver stay listed by `unacked()`.
    /// Dropping a connection (or its [`Receiver`]) does this with the configured
    /// [`crate::Config::close_linger_ns`]. A connection of an [`crate::Endpoint`] closes through
    /// it ([`crate::Endpoint::close`], [`crate::Endpoint::remove`], or dropping the endpoint):
    /// here it gets [`CloseError::DrivenByEndpoint`].
    pub fn close(&mut self, linger_ns: Nanos) -> Result<(), CloseError> {
        let start = self.clock.now();
        self.start_close(linger_ns);
        if self.on_shared_queues() {
            // Its completions (the goodbye's among them) reach it only through the endpoint.
            return Err(CloseError::DrivenByEndpoint);
        }
        // The goodbye's own completion is waited for too, within one heartbeat timeout more: a
        // queue pair destroyed with it in flight may never send it.
        let deadline = start
            .saturating_add(linger_ns)
            .saturating_add(self.core.config().heartbeat_timeout_ns());
        loop {
            self.progress();
            if self.close_finished() {
                break;
            }
            if self.clock.now() >= deadline {
                break;
            }
            // Wakes for the core's timers (the linger's end among them) and for completions.
            self.sleep_until(deadline);
        }
        self.close_outcome()
    }

    /// Whether nothing is left to do for a close: the session ended and its goodbye, if any,
    /// completed.
    pub(crate) fn close_finished(&self) -> bool {
        self.core.is_dead() && !self.core.bye_pending()
    }

    /// What a close that ran its course comes to (see [`Receiver::close`]).
    pub(crate) fn close_outcome(&self) -> Result<(), CloseError> {
        match self.core.end_reason() {
            Some(EndReason::Closed) | None => {
                let undelivered = self
                    .core
                    .last_sent_seq()
                    .saturating_sub(self.core.peer_delivered());
                if undelivered == 0 {
                    Ok(())
                } else {
                    Err(CloseError::Undelivered {
                        records: undelivered,
                    })
                }
            }
            Some(reason) => Err(CloseError::Ended(reason)),
        }
    }

    /// Re-arms failed rails with a peer in another process over `stream` (the TCP stream the
    /// connection was set up on): the side that dialled initiates, the other answers. Without a
    /// channel, re-arm requests wait for [`Receiver::take_rearm_request`] (in-process set-ups:
    /// [`serve_rearms`]).
    pub fn attach_rearm_channel(
        &mut self,
        stream: std::net::TcpStream,
        role: Role,
    ) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        self.attach_control_channel(Box::new(stream), role);
        Ok(())
    }

    /// Re-arms failed rails over `channel` (any byte stream to the peer's control plane: the
    /// simulator's in-memory channel, say), inside `progress` on this thread.
    pub fn attach_control_channel(&mut self, channel: Box<dyn ControlChannel + Send>, role: Role) {
        let cfg = *self.core.config();
        self.control = Some(Control::Inline(Box::new(InlineControl::new(
            channel, role, &cfg,
        ))));
    }

    /// With an inline control executor: its results reach the data path `lag_ns` after they
    /// are ready, as a control thread's do (the simulator uses it to model one).
    pub fn set_control_handover_lag(&mut self, lag_ns: Nanos) {
        if let Some(Control::Inline(c)) = &mut self.control {
            c.set_handover_lag(lag_ns);
        }
    }

    /// An asynchronous event of `rail`'s card, read by the control thread.
    /// The control thread read `rail`'s card's retransmission counter.
    pub(crate) fn card_retransmissions(&mut self, rail: usize, total: u64) {
        self.core.note_retransmissions(rail, total);
    }

    pub(crate) fn card_event(&mut self, rail: usize, event: AsyncEvent) {
        let Some(card) = self.rails[rail].card.as_ref() else {
            return; // released meanwhile: the event is about a card this side let go of
        };
        if let AsyncEvent::QpFatal { qpn } = event {
            if card.link.endpoint().qpn != qpn {
                return; // another connection's queue pair on a shared card
            }
        }
        self.core.handle_event(rail, event);
        if event == AsyncEvent::DeviceFatal {
            self.release_card(rail);
        }
        self.flush();
    }

    /// Tells the user the control channel is gone (failed rails can't be re-armed any more).
    pub(crate) fn rearm_channel_lost(&mut self) {
        let now = self.clock.now();
        self.core.rearm_channel_lost(now);
    }

    pub(crate) fn rearm_channel_restored(&mut self) {
        let now = self.clock.now();
        self.core.rearm_channel_restored(now);
    }

    /// Times a split sender woke this receiver from a blocking receive (0 before a split).
    pub fn sender_wakeups(&self) -> u64 {
        self.doorbell
            .as_ref()
            .map_or(0, |b| b.rings.load(Ordering::Relaxed))
    }

    /// Re-arms completed over the channel (None: no channel attached).
    pub fn rearms_completed(&self) -> Option<u64> {
        self.control.as_ref().map(|c| match c {
            Control::Inline(c) => c.completed(),
            Control::Thread(t) => t.completed(),
        })
    }

    /// The connection's clock.
    pub fn now(&self) -> Nanos {
        self.clock.now()
    }

    /// The clock the connection reads (a [`RealClock`] tells how often it asked the OS).
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Carries out every I/O the core wants now.
    #[inline]
    pub fn flush(&mut self) {
        // The steady-state empty poll: nothing due (checked inline, no call).
        if let Some(io) = self.core.poll_io() {
            self.carry_out(io);
        }
    }

    /// [`Receiver::flush`] after a send: the new records' write goes straight to the rail
    /// (no [`Io`] to build and take apart) when it is all there is to do. (Always inline: with
    /// `send_batch` calling it too, the compiler made it a call from `send`, +22 instructions a
    /// round trip.)
    #[inline(always)]
    fn flush_after_send(&mut self) {
        if let Some(w) = self.core.poll_new_data() {
            self.post_data(w);
            // `poll_new_data` found nothing else due: done, unless the write left committed
            // records behind or its post failed (which sets the rescan). (Records a split-off
            // `Sender` commits meanwhile go in a later poll, as after any flush.)
            if w.reaches_commit && !self.core.rescan_due() {
                return;
            }
        }
        self.flush();
    }

    /// Posts a data write on its rail.
    fn post_data(&mut self, w: DataWrite) {
        self.liveness_unpublished = true; // the write carries a beat
        self.post_write(w.write);
    }

    /// Posts an RDMA write; a failed post is the rail's error completion.
    #[inline(always)]
    fn post_write(&mut self, w: RdmaWrite) {
        let RdmaWrite {
            rail,
            wr_id,
            buf,
            offset,
            len,
            imm,
            signaled,
        } = w;
        let r = &mut self.rails[rail];
        let posted = match r.card.as_mut() {
            Some(card) => {
                let (mr, peer) = match buf {
                    Buf::Ring => (&card.regs.ring_tx, &r.peer_ring),
                    Buf::Ctrl => (&card.regs.ctrl_out, &r.peer_ctrl),
                };
                card.link
                    .post_write(wr_id, mr, offset, len, peer, offset as u64, imm, signaled)
            }
            None => Err(FabricError::Unavailable("card released".into())),
        };
        if let Err(e) = posted {
            tracing::warn!(rail, error = %e, "post failed");
            self.core.handle_completion(
                rail,
                &Completion {
                    wr_id,
                    kind: CompletionKind::Write,
                    status: WcStatus::Other(u32::MAX),
                },
            );
        }
    }

    /// [`Receiver::flush`] once something is due: this I/O and every one after it.
    fn carry_out(&mut self, first: Io) {
        self.liveness_unpublished = true; // a post may carry a beat
        let mut io = first;
        loop {
            match io {
                Io::Write(w) => self.post_write(w),
                Io::PostRecvs { rail, count } => {
                    let posted = match self.rails[rail].card.as_mut() {
                        Some(card) => card.link.post_recvs(count),
                        None => Err(FabricError::Unavailable("card released".into())),
                    };
                    if let Err(e) = posted {
                        tracing::warn!(rail, error = %e, "posting receives failed");
                        self.core.link_error(rail);
                    }
                }
                Io::ShutDown { rail } => {
                    if let Some(card) = self.rails[rail].card.as_mut() {
                        card.link.shut_down();
                    }
                }
                Io::Rearm { rail } => self.rearm_requests.push(rail),
            }
            match self.core.poll_io() {
                Some(next) => io = next,
                None => return,
            }
        }
    }

    /// A rail the core wants re-armed (connect a fresh queue pair with the peer's), if any.
    pub fn take_rearm_request(&mut self) -> Option<usize> {
        self.rearm_requests.pop()
    }

    /// Whether a re-arm request is waiting.
    pub fn has_rearm_request(&self) -> bool {
        !self.rearm_requests.is_empty()
    }

    /// Drops pending re-arm requests for `rail` (it was just re-armed from the other side).
    pub fn cancel_rearm_request(&mut self, rail: usize) {
        self.rearm_requests.retain(|&r| r != rail);
    }

    /// Creates a fresh queue pair on `rail` (opening its card again first if a device-fatal
    /// event released it); send the returned hello to the peer. (A re-arm driven by hand: when
    /// this or [`Receiver::rearm_complete`] fails for a rail the core asked to re-arm, tell it
    /// with [`Receiver::rearm_failed`], or it won't ask again.)
    pub fn rearm_prepare(&mut self, rail: usize) -> Result<(N::Link, Hello), ConnectError> {
        if rail >= self.rails.len() {
            return Err(ConnectError::NoSuchRail(rail));
        }
        // A queue of its own: its caller holds it without a route (see `prepare_fresh`).
        let (fresh, hello) = self.prepare_on(rail, false)?;
        Ok((fresh.link, hello))
    }

    /// Like [`Receiver::rearm_prepare`], the fresh queue pair on the endpoint's shared
    /// completion queues when the connection is an endpoint's and the card is the endpoint's
    /// (see [`crate::shared_queues`]); install it with [`Receiver::install_routed`].
    pub(crate) fn prepare_fresh(
        &mut self,
        rail: usize,
    ) -> Result<(RoutedLink<N>, Hello), ConnectError> {
        self.prepare_on(rail, true)
    }

    fn prepare_on(
        &mut self,
        rail: usize,
        may_share: bool,
    ) -> Result<(RoutedLink<N>, Hello), ConnectError> {
        if let Some(reason) = self.core.end_reason() {
            return Err(ConnectError::Ended(reason)); // nothing to re-arm for
        }
        let cfg = *self.core.config();
        let r = &mut self.rails[rail];
        if r.card.is_none() {
            let nic = match self.shared.as_ref().filter(|_| r.endpoint_epoch.is_some()) {
                // The endpoint's card: its handle, opened again by whichever connection (or
                // the endpoint) needs it first, so the fresh queue pair goes on its shared
                // queues and its events are read once for all.
                Some(shared) => {
                    let (nic, epoch) = shared.open_card(rail)?;
                    r.endpoint_epoch = Some(epoch);
                    nic
                }
                None => {
                    let nic = N::reopen(&r.reopen)?;
                    tracing::info!(rail, card = nic.name(), "card opened again");
                    nic
                }
            };
            r.card = Some(CardIo::open(nic, &cfg, &self.core, rail, None)?);
        }
        let r = &self.rails[rail];
        let card = r.card.as_ref().expect("opened above");
        let shared = (self.shared.as_ref())
            .zip(r.endpoint_epoch)
            .filter(|_| may_share);
        let fresh = make_link(shared, rail, card.nic(), &cfg)?;
        let hello = rail_hello(&cfg, rail, fresh.link.endpoint(), card.regs.remotes());
        Ok((fresh, hello))
    }

    /// Lets go of `rail`'s card after a device-fatal event: its queue pair, registrations and
    /// device handle are dropped so the device can recover (a driver resets a device only once
    /// every process let go of it). A later re-arm opens it again.
    fn release_card(&mut self, rail: usize) {
        if let Some(card) = self.rails[rail].card.take() {
            tracing::warn!(
                rail,
                card = card.nic().name(),
                "device fatal: card released"
            );
            drop(card);
            if let Some(Control::Thread(t)) = &self.control {
                t.card_released(); // it holds the card while it waits: let go of it now
            }
        }
    }

    /// Whether `rail`'s card is released (after a device-fatal event, until a re-arm reopens it;
    /// false for a rail the connection doesn't have).
    pub fn card_released(&self, rail: usize) -> bool {
        self.rails.get(rail).is_some_and(|r| r.card.is_none())
    }

    /// Connects the fresh queue pair to the peer's and makes the rail a standby again (if it
    /// was carrying traffic, it fails over first: the peer re-armed it). Both sides' queue
    /// pairs must exist (each side's `rearm_prepare` done, hellos exchanged) before either side
    /// completes: a write on a queue pair whose peer is not connected yet fails the rail again.
    pub fn rearm_complete(
        &mut self,
        rail: usize,
        mut link: N::Link,
        ours: &Hello,
        peer: &Hello,
    ) -> Result<(), ConnectError> {
        if rail >= self.rails.len() {
            return Err(ConnectError::NoSuchRail(rail));
        }
        let peer = Hello::decode(&peer.encode())?;
        ours.check_peer(&peer)?;
        self.check_rail_of(rail, ours)?;
        link.connect(&peer.endpoint)?;
        self.install_rearmed(rail, link, &peer)
    }

    /// A hello made for another rail than `rail` (its queue pair and rings are that rail's).
    fn check_rail_of(&self, rail: usize, hello: &Hello) -> Result<(), ConnectError> {
        if usize::from(hello.rail_index) != rail {
            return Err(HandshakeError::RailMismatch {
                local: rail as u16,
                local_count: self.rails.len() as u16,
                remote: hello.rail_index,
                remote_count: hello.rail_count,
            }
            .into());
        }
        Ok(())
    }

    /// Installs an already connected fresh queue pair on `rail` (the peer's hello validated);
    /// the old queue pair is destroyed here.
    pub fn install_rearmed(
        &mut self,
        rail: usize,
        link: N::Link,
        peer: &Hello,
    ) -> Result<(), ConnectError> {
        if rail >= self.rails.len() {
            return Err(ConnectError::NoSuchRail(rail));
        }
        self.check_rail_of(rail, peer)?;
        if self.rails[rail].card.is_none() {
            // Released (device fatal) since the queue pair was made: the core asks again.
            self.rearm_failed(rail);
            return Err(FabricError::Unavailable("card released".into()).into());
        }
        drop(self.install_rearmed_keep_old(rail, link, None, peer));
        Ok(())
    }

    /// [`Receiver::install_rearmed`] of a queue pair from [`Receiver::prepare_fresh`].
    pub(crate) fn install_routed(&mut self, rail: usize, fresh: RoutedLink<N>, peer: &Hello) {
        let RoutedLink { route, link } = fresh;
        drop(self.install_rearmed_keep_old(rail, link, route, peer));
    }

    /// Like [`Receiver::install_rearmed`], handing back the old queue pair for the caller to
    /// destroy elsewhere (destroying one takes system calls: the control thread does it).
    pub(crate) fn install_rearmed_keep_old(
        &mut self,
        rail: usize,
        link: N::Link,
        route: Option<RouteGuard<N>>,
        peer: &Hello,
    ) -> Option<N::Link> {
        let r = &mut self.rails[rail];
        let Some(card) = r.card.as_mut() else {
            // Released (device fatal) since the queue pair was made: try again later.
            self.rearm_failed(rail);
            return Some(link);
        };
        // The old queue pair's route goes first (its news before it is destroyed).
        card.route = route;
        let old = std::mem::replace(&mut card.link, link);
        r.peer_ring = peer.ring;
        r.peer_ctrl = peer.ctrl;
        let now = self.clock.now();
        self.core.rail_rearmed(rail, now);
        self.flush();
        Some(old)
    }

    /// Whether a re-arm made on `card` (None: on the card the data path has) may be installed
    /// on `rail`: not while a card the user swapped in waits for its install and this is
    /// another (see `card_swaps`).
    pub(crate) fn install_allowed(&self, rail: usize, card: Option<&Arc<N>>) -> bool {
        let swap = self.card_swaps.get(rail).and_then(|w| w.as_ref());
        match swap.and_then(std::sync::Weak::upgrade) {
            None => true, // no swap, or the user's card is gone: the swap is over
            Some(user) => card.is_some_and(|c| Arc::ptr_eq(c, &user)),
        }
    }

    /// Installs a re-armed rail on a card the control thread opened again (after a device-fatal
    /// release) or was handed by [`Receiver::replace_card`]: the card, its registrations and the
    /// fresh queue pair come together. Hands back a queue pair for the caller to destroy, if one
    /// is replaced (the user's swap: the old card's, whose card and registrations go here).
    pub(crate) fn install_reopened(
        &mut self,
        rail: usize,
        link: N::Link,
        route: Option<RouteGuard<N>>,
        regs: CardRegs<N>,
        peer: &Hello,
    ) -> Option<N::Link> {
        let endpoint_epoch = match regs.endpoint_epoch {
            Some(epoch) => {
                let current =
                    (self.shared.as_ref()).is_some_and(|s| s.card_is_current(rail, epoch));
                if !current {
                    // The endpoint's card, released (device fatal) since the control thread
                    // took it: no use. The fresh queue pair goes back to be destroyed (its
                    // route first); the core asks again.
                    drop((route, regs));
                    self.rearm_failed(rail);
                    return Some(link);
                }
                Some(epoch)
            }
            None => None,
        };
        self.card_swaps[rail] = None;
        let r = &mut self.rails[rail];
        r.endpoint_epoch = endpoint_epoch;
        let old = r.card.replace(CardIo { route, link, regs });
        r.peer_ring = peer.ring;
        r.peer_ctrl = peer.ctrl;
        let now = self.clock.now();
        self.core.rail_rearmed(rail, now);
        self.flush();
        // The old card's queue pair (destroyed by the caller); its registrations and card go
        // here. Its route went first, with the news it routed.
        old.map(|CardIo { route, link, .. }| {
            drop(route);
            link
        })
    }

    /// Uses `nic` for failed rail `rail` from its next re-arm on: for a card that came back
    /// under another name (a re-arm opens a removed card again by its name), or any
    /// card the caller picks. The rail's memory is registered with it now (its errors are
    /// returned here); with a control thread (verbs connections) the thread makes the rail's
    /// next queue pair on it and the old card is let go when card and queue pair are installed
    /// together; inline, the old card goes at once. Pass a card opened for this call, not a
    /// clone of an [`crate::Endpoint`]'s (`Endpoint::card`): its device events are read here
    /// from now on, and two readers of one handle would each miss what the other took.
    pub fn replace_card(&mut self, rail: usize, nic: N) -> Result<(), ConnectError> {
        if rail >= self.rails.len() || self.core.rail_state(rail) != RailState::Failed {
            return Err(ConnectError::RailNotFailed(rail));
        }
        let reopen = nic.reopen_token();
        if let Some(Control::Thread(t)) = &self.control {
            let regs = CardRegs::register(Arc::new(nic), &RailMemory::of(&self.core, rail))?;
            let user = Arc::downgrade(&regs.nic);
            if t.use_card(rail, regs, reopen.clone()).is_ok() {
                self.rails[rail].reopen = reopen;
                self.card_swaps[rail] = Some(user);
                return Ok(());
            }
            return Err(ConnectError::Channel(std::io::Error::other(
                "the control thread is gone",
            )));
        }
        let cfg = *self.core.config();
        let card = CardIo::open(nic, &cfg, &self.core, rail, None)?;
        let r = &mut self.rails[rail];
        r.card = Some(card); // the old one drops here: queue pair, registrations, card
        r.reopen = reopen;
        r.endpoint_epoch = None;
        Ok(())
    }

    /// Re-arming `rail` failed for now; the core will ask again later.
    pub fn rearm_failed(&mut self, rail: usize) {
        if rail < self.rails.len() {
            let now = self.clock.now();
            self.core.rearm_failed(rail, now);
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            full_turns: self.full_turns,
            ..self.core.stats()
        }
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.core.end_reason()
    }

    /// Where a new connection picks up this one's stream ([`PendingConnection::new_resuming`],
    /// `verbs::connect_resuming`): call it once the session ended.
    pub fn resume_state(&self) -> crate::core::ResumeState {
        self.core.resume_state()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.poll_event()
    }

    /// Records accepted but not known delivered (what to resend elsewhere after AllRailsDown).
    pub fn unacked(&self, f: impl FnMut(u64, &[u8])) {
        self.core.unacked(f)
    }

    /// The state machine (read-only), for inspection.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// When the connection's core next has a timer due (heartbeat, re-arm, close): a blocking
    /// wait, which wakes for every rail's completions, sleeps until then.
    pub(crate) fn next_timer(&self) -> Option<Nanos> {
        self.core.poll_timeout()
    }

    /// When the connection next needs [`Receiver::progress`] even if nothing arrives: its next
    /// timer, or sooner when the last `progress` left quiet rails unpolled (see
    /// [`QUIET_RAIL_POLL_NS`]).
    pub fn next_timeout(&self) -> Option<Nanos> {
        let quiet = self.quiet_rails_owed().then_some(self.quiet_rails_due);
        [self.core.poll_timeout(), quiet]
            .into_iter()
            .flatten()
            .min()
    }

    /// The card of `rail` (None while released after a device-fatal event).
    pub fn card(&self, rail: usize) -> Option<&N> {
        let card = self.rails.get(rail).and_then(|r| r.card.as_ref());
        card.map(|c| &**c.nic())
    }
}

impl<N, C> Receiver<N, C>
where
    N: Nic + Send + Sync + 'static,
    N::Link: Send + 'static,
    N::Mr: Send + 'static,
    N::Reopen: Send + 'static,
    N::SharedCq: Send + 'static,
    <N::SharedCq as railover_rdma::SharedCq>::Attach: Send + 'static,
    C: Clock,
{
    /// Re-arms failed rails with a peer in another process over `channel` (the TCP stream the
    /// connection was set up on, and its way back when it breaks: [`crate::rejoin`]) on a
    /// control thread of this connection's own: queue-pair
    /// creation, card reopening, connecting, destroying old queue pairs and the stream's I/O all
    /// happen there; `progress` only hands over requests and installs ready rails.
    pub fn attach_control_thread(
        &mut self,
        channel: crate::rejoin::TcpControl,
        role: Role,
    ) -> std::io::Result<()> {
        self.attach_control(channel, role, None)
    }

    /// [`Receiver::attach_control_thread`], on `pool`'s thread (an endpoint's, shared by its
    /// connections) when given.
    pub(crate) fn attach_control(
        &mut self,
        channel: crate::rejoin::TcpControl,
        role: Role,
        pool: Option<&crate::control::PoolHandle<N>>,
    ) -> std::io::Result<()> {
        let cards = self
            .rails
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (nic, remotes) = match &r.card {
                    Some(c) => (Arc::downgrade(c.nic()), c.regs.remotes()),
                    None => (std::sync::Weak::new(), Default::default()),
                };
                ThreadCard::new(
                    nic,
                    r.reopen.clone(),
                    RailMemory::of(&self.core, i),
                    remotes,
                    self.shared.clone().zip(r.endpoint_epoch),
                    self.card_events_elsewhere && r.endpoint_epoch.is_some(),
                )
            })
            .collect();
        let cfg = *self.core.config();
        let read_events = !self.card_events_elsewhere;
        self.control = Some(Control::Thread(ControlThread::spawn(
            channel,
            role,
            cfg,
            cards,
            read_events,
            pool,
            crate::control::CONTROL_IDLE,
        )?));
        Ok(())
    }
}

impl<N: Nic, C: Clock> Drop for Receiver<N, C> {
    /// A graceful close (see [`Receiver::close`]) with the configured linger, so the peer sees
    /// [`EndReason::PeerClosed`] rather than a fault; then the queue pairs are destroyed, with
    /// every completion-channel event acknowledged first (libibverbs blocks destroying a completion
    /// queue with unacknowledged events).
    fn drop(&mut self) {
        // On shared queues its endpoint closed it already, as far as it could (see
        // `Endpoint::remove` and the endpoint's drop): nothing more would be seen here.
        if !self.close_finished() && !self.on_shared_queues() {
            let linger = self.core.config().close_linger_ns();
            let _ = self.close(linger);
        }
        for card in self.rails.iter_mut().filter_map(|r| r.card.as_mut()) {
            card.link.clear_wakeups();
        }
    }
}

/// Re-arms `rail` on two connections driven by one process (tests, simulations, single-host
/// set-ups): fresh queue pairs on both sides, connected to each other, then both cores reset the
/// rail as a standby. On failure both cores are told and will ask again later.
pub fn rearm_both<N: Nic, C: Clock>(
    a: &mut Receiver<N, C>,
    b: &mut Receiver<N, C>,
    rail: usize,
) -> Result<(), ConnectError> {
    let attempt = (|| {
        let (mut la, ha) = a.prepare_fresh(rail)?;
        let (mut lb, hb) = b.prepare_fresh(rail)?;
        ha.check_peer(&hb)?;
        // Both links must connect before either side resets its rings.
        la.link.connect(&hb.endpoint)?;
        lb.link.connect(&ha.endpoint)?;
        Ok::<_, ConnectError>((la, ha, lb, hb))
    })();
    match attempt {
        Ok((la, ha, lb, hb)) => {
            a.install_routed(rail, la, &hb);
            b.install_routed(rail, lb, &ha);
            Ok(())
        }
        Err(e) => {
            tracing::debug!(rail, error = %e, "re-arm failed; will retry");
            a.rearm_failed(rail);
            b.rearm_failed(rail);
            Err(e)
        }
    }
}

/// Serves every pending re-arm request of two connections driven by one process. Returns the
/// rails it tried and the outcome of each.
pub fn serve_rearms<N: Nic, C: Clock>(
    a: &mut Receiver<N, C>,
    b: &mut Receiver<N, C>,
) -> Vec<(usize, Result<(), ConnectError>)> {
    let mut out = Vec::new();
    while let Some(rail) = a.take_rearm_request().or_else(|| b.take_rearm_request()) {
        a.cancel_rearm_request(rail);
        b.cancel_rearm_request(rail);
        out.push((rail, rearm_both(a, b, rail)));
    }
    out
}
