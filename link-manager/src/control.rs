//! The control plane's executors: they carry out the re-arm protocol ([`crate::rearm`]) over a
//! control channel and hand re-armed rails to the data path.
//!
//! * [`ControlThread`] (real devices): a thread of the connection's own (or of its endpoint's,
//!   shared by all its connections: `ControlPool`) makes fresh queue pairs,
//!   opens released cards again, connects queue pairs, destroys old ones, reads and writes the
//!   control stream, and reads the cards' asynchronous events (port down, device fatal...) as
//!   they come, forwarding them at once. The data thread only posts a request (when the core asks
//!   for a re-arm) and, when the thread flags a result, handles it: one relaxed load per
//!   `progress` in steady state, never a blocking call, no system call.
//! * [`InlineControl`] (the simulator, which is single-threaded, and single-threaded set-ups):
//!   the same protocol, carried out inside `progress` on a non-blocking channel.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use railover_rdma::handshake::Hello;
use railover_rdma::{AsyncEvent, Link, Nic, RemoteRegion};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::config::{Config, MAX_RAILS};
use crate::core::Nanos;
use crate::rearm::{RearmIo, RearmProtocol, Role, FRAME};
use crate::rejoin::TcpControl;
use crate::runtime::{make_link, rail_hello, CardRegs, Clock, Receiver};
use crate::shared_queues::{RoutedLink, SharedLinks};

/// A byte stream to the peer's control plane. `recv` never blocks: `Ok(0)` means the peer closed
/// it, `WouldBlock` that nothing is there now.
pub trait ControlChannel {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Ends the stream for both ends (the peer reads end-of-stream), after a frame no honest
    /// peer sends: the peer then sets up a new one too.
    fn shutdown(&mut self) {}
    /// Puts a new stream to the same peer in place of a broken one, if one can be had now
    /// (without blocking for long): `Ok(true)` when it is. A channel that can't (the default)
    /// stays lost.
    fn reconnect(&mut self) -> std::io::Result<bool> {
        Ok(false)
    }
}

impl ControlChannel for TcpStream {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // 150-byte frames on an otherwise idle stream never fill its buffer; a stream that is
        // full anyway is as good as broken.
        self.write_all(bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read(buf)
    }
    fn shutdown(&mut self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// Reads what the channel has into the protocol; a closed or failed channel is reported to it.
fn read_into(channel: &mut dyn ControlChannel, proto: &mut RearmProtocol, now: Nanos) {
    let mut buf = [0u8; FRAME];
    while !proto.is_closed() {
        match channel.recv(&mut buf) {
            Ok(0) => proto.channel_failed(),
            Ok(n) => proto.on_bytes(&buf[..n], now),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "control channel failed");
                proto.channel_failed();
            }
        }
    }
}

/// Per rail: the fresh queue pair of the re-arm attempt under way, kept with its attempt number
/// so a step for another attempt never touches it (see [`RearmIo::Prepare`]).
struct FreshLinks<L>([Option<(u32, L)>; MAX_RAILS]);

impl<L> FreshLinks<L> {
    fn new() -> Self {
        FreshLinks(std::array::from_fn(|_| None))
    }

    fn put(&mut self, rail: usize, attempt: u32, link: L) {
        self.0[rail] = Some((attempt, link));
    }

    fn get_mut(&mut self, rail: usize, attempt: u32) -> Option<&mut L> {
        match &mut self.0[rail] {
            Some((a, link)) if *a == attempt => Some(link),
            _ => None,
        }
    }

    fn take(&mut self, rail: usize, attempt: u32) -> Option<L> {
        match self.0[rail] {
            Some((a, _)) if a == attempt => self.0[rail].take().map(|(_, link)| link),
            _ => None,
        }
    }

    /// Drops the attempt's queue pair (one made for a later attempt stays).
    fn abandon(&mut self, rail: usize, attempt: u32) {
        drop(self.take(rail, attempt));
    }

    /// Drops the rail's queue pair whatever its attempt: its card is no longer the rail's (the
    /// attempt's later steps find none and fail; the protocol tries again).
    fn drop_rail(&mut self, rail: usize) {
        self.0[rail] = None;
    }

    /// The rail's queue pair, whatever its attempt.
    fn peek(&self, rail: usize) -> Option<&L> {
        self.0[rail].as_ref().map(|(_, link)| link)
    }
}

/// A result of the executor for the data path (what a control thread sends through its queue).
enum Handover<L> {
    Install { rail: usize, link: L, peer: Hello },
    Failed(usize),
    Lost,
    Restored,
}

/// The re-arm protocol carried out inside `progress`, on the data thread.
pub struct InlineControl<N: Nic> {
    proto: RearmProtocol,
    channel: Box<dyn ControlChannel + Send>,
    fresh: FreshLinks<RoutedLink<N>>,
    lost_reported: bool,
    /// How long results wait before the data path takes them, in order (0: at once). The
    /// simulator sets it to model a control thread: its results reach the data thread on that
    /// thread's next `progress`, while frames, faults and the peer carry on meanwhile.
    handover_lag_ns: Nanos,
    handovers: std::collections::VecDeque<(Nanos, Handover<RoutedLink<N>>)>,
}

impl<N: Nic> InlineControl<N> {
    pub fn new(channel: Box<dyn ControlChannel + Send>, role: Role, cfg: &Config) -> Self {
        InlineControl {
            proto: RearmProtocol::new(role, cfg.rails())
                .with_timeout(cfg.rearm_exchange_timeout_ns()),
            channel,
            fresh: FreshLinks::new(),
            lost_reported: false,
            handover_lag_ns: 0,
            handovers: std::collections::VecDeque::new(),
        }
    }

    /// Results reach the data path `lag_ns` after they are ready (see [`InlineControl`]).
    pub fn set_handover_lag(&mut self, lag_ns: Nanos) {
        self.handover_lag_ns = lag_ns;
    }

    pub fn completed(&self) -> u64 {
        self.proto.completed()
    }

    fn hand_over<C: Clock>(&mut self, rx: &mut Receiver<N, C>, h: Handover<RoutedLink<N>>) {
        if self.handover_lag_ns == 0 && self.handovers.is_empty() {
            Self::apply(rx, h);
        } else {
            let due = rx.now() + self.handover_lag_ns;
            self.handovers.push_back((due, h));
        }
    }

    fn apply<C: Clock>(rx: &mut Receiver<N, C>, h: Handover<RoutedLink<N>>) {
        match h {
            Handover::Install { rail, link, peer } => rx.install_routed(rail, link, &peer),
            Handover::Failed(rail) => rx.rearm_failed(rail),
            Handover::Lost => rx.rearm_channel_lost(),
            Handover::Restored => rx.rearm_channel_restored(),
        }
    }

    /// Hands over the results that are due, in order.
    fn deliver_due<C: Clock>(&mut self, rx: &mut Receiver<N, C>) {
        if self.handovers.is_empty() {
            return; // (the steady state: no clock read)
        }
        let now = rx.now();
        while self.handovers.front().is_some_and(|(due, _)| *due <= now) {
            let (_, h) = self.handovers.pop_front().expect("peeked");
            Self::apply(rx, h);
        }
    }

    /// Whether [`InlineControl::serve`] would find nothing to do.
    pub fn idle<C: Clock>(&self, rx: &Receiver<N, C>) -> bool {
        self.handovers.is_empty() && self.at_rest(rx)
    }

    /// No exchange under way or asked for, no rail failed, the channel open: nothing to read.
    fn at_rest<C: Clock>(&self, rx: &Receiver<N, C>) -> bool {
        !(self.proto.busy()
            || rx.has_rearm_request()
            || rx.core().any_rail_failed()
            || self.proto.is_closed())
    }

    /// Advances the protocol: the core's requests, the peer's frames, time-outs. The channel is
    /// read only while a rail is failed or an exchange is under way (no system call otherwise).
    pub fn serve<C: Clock>(&mut self, rx: &mut Receiver<N, C>) {
        self.deliver_due(rx);
        if self.at_rest(rx) {
            return;
        }
        let now = rx.now();
        while let Some(rail) = rx.take_rearm_request() {
            self.proto.request(rail, now);
        }
        read_into(&mut *self.channel, &mut self.proto, now);
        self.proto.handle_timeout(now);
        while let Some(io) = self.proto.poll() {
            let now = rx.now();
            match io {
                RearmIo::Send(frame) => {
                    if let Err(e) = self.channel.send(&frame) {
                        tracing::warn!(error = %e, "control channel failed");
                        self.proto.channel_failed();
                    }
                }
                RearmIo::Prepare { rail, attempt } => match rx.prepare_fresh(rail) {
                    Ok((link, ours)) => {
                        self.fresh.put(rail, attempt, link);
                        self.proto.prepared::<String>(rail, attempt, Ok(ours), now);
                    }
                    Err(e) => self.proto.prepared(rail, attempt, Err(e), now),
                },
                RearmIo::Connect {
                    rail,
                    attempt,
                    peer,
                } => {
                    let result = match self.fresh.get_mut(rail, attempt) {
                        Some(fresh) => fresh
                            .link
                            .connect(&peer.endpoint)
                            .map_err(|e| e.to_string()),
                        None => Err("no fresh queue pair".into()),
                    };
                    self.proto.connected(rail, attempt, result, now);
                }
                RearmIo::Install {
                    rail,
                    attempt,
                    peer,
                } => {
                    let h = match self.fresh.take(rail, attempt) {
                        Some(link) => Handover::Install { rail, link, peer },
                        None => Handover::Failed(rail),
                    };
                    self.hand_over(rx, h);
                }
                RearmIo::Abandon { rail, attempt } => {
                    self.fresh.abandon(rail, attempt);
                    self.hand_over(rx, Handover::Failed(rail));
                }
                RearmIo::Decline { rail } => self.hand_over(rx, Handover::Failed(rail)),
            }
        }
        if self.proto.is_closed() && !self.lost_reported {
            self.lost_reported = true;
            self.channel.shutdown();
            self.hand_over(rx, Handover::Lost);
        }
        if self.proto.is_closed() && matches!(self.channel.reconnect(), Ok(true)) {
            self.proto.reopen();
            self.lost_reported = false;
            self.hand_over(rx, Handover::Restored);
        }
        self.deliver_due(rx);
    }
}

/// Data thread -> control thread.
enum Command<N: Nic> {
    Rearm(usize),
    /// An old queue pair to destroy (off the data thread: it takes system calls).
    Retire(N::Link),
    /// The user's card for `rail` (`Receiver::replace_card`), registered: the rail's next queue
    /// pair is made on it, and it is reopened by `reopen` from then on.
    UseCard {
        rail: usize,
        regs: CardRegs<N>,
        reopen: N::Reopen,
    },
}

/// Control thread -> data thread.
pub(crate) enum Outcome<N: Nic> {
    /// A fresh queue pair connected to the peer's: install it as `rail`'s standby. `card` is the
    /// card it was made on when that is not the data path's, with its registrations: one the
    /// control thread opened again (after a device-fatal release), or the user's.
    Install {
        rail: usize,
        link: RoutedLink<N>,
        peer: Hello,
        card: Option<CardRegs<N>>,
    },
    /// The attempt failed; the core asks again later.
    Failed(usize),
    /// The control channel broke (it is being re-established).
    ChannelLost,
    /// A new control channel is in place.
    ChannelRestored,
    /// An asynchronous event of `rail`'s card.
    Event { rail: usize, event: AsyncEvent },
    /// `rail`'s card's RC retransmission counter changed (gray switch).
    Retransmissions { rail: usize, total: u64 },
}

/// The data thread's handle on its connection's control thread.
pub struct ControlThread<N: Nic> {
    commands: mpsc::Sender<Command<N>>,
    outcomes: mpsc::Receiver<Outcome<N>>,
    /// Set (Release) by the thread after it queued an outcome; swapped (Acquire) by the data
    /// thread before it drains them, so no outcome is left behind unflagged.
    flagged: Arc<AtomicBool>,
    /// Written by the thread after each outcome: wakes a data thread asleep in a blocking
    /// receive (it waits on this instead of the cards' event descriptors).
    wake: Bell,
    stop: Arc<AtomicBool>,
    /// Wakes the thread after a command, a released card or the stop.
    bell: Bell,
    thread: Option<JoinHandle<()>>,
    completed: u64,
}

/// What the control thread knows of one rail's card.
pub(crate) struct ThreadCard<N: Nic> {
    /// The data path's card (weak: releasing it there releases the device).
    nic: Weak<N>,
    reopen: N::Reopen,
    mem: crate::runtime::RailMemory,
    remotes: (RemoteRegion, RemoteRegion),
    /// A card it holds for the rail's next install, not yet handed over: one opened again (after
    /// a device-fatal release; an endpoint's card through the endpoint's pool) or the user's
    /// (`replace_card`).
    reopened: Option<CardRegs<N>>,
    /// An endpoint's connection on the endpoint's card (not the user's), with the pool's epoch
    /// of the data path's card: fresh queue pairs go on its shared completion queues, and a
    /// released card is opened again as the endpoint's.
    shared: Option<(SharedLinks<N>, u64)>,
    /// The card is the endpoint's, which reads its events once for all its connections. The
    /// user's card, or a single connection's, has its events read here.
    events_elsewhere: bool,
}

impl<N: Nic> ThreadCard<N> {
    /// `nic`: the data path's card (None while released); `remotes`: where the peer writes.
    pub(crate) fn new(
        nic: Weak<N>,
        reopen: N::Reopen,
        mem: crate::runtime::RailMemory,
        remotes: (RemoteRegion, RemoteRegion),
        shared: Option<(SharedLinks<N>, u64)>,
        events_elsewhere: bool,
    ) -> Self {
        ThreadCard {
            nic,
            reopen,
            mem,
            remotes,
            reopened: None,
            shared,
            events_elsewhere,
        }
    }

    /// Whether the endpoint let go of the card opening `epoch` (a device-fatal event) since.
    fn released(&self, rail: usize, epoch: u64) -> bool {
        (self.shared.as_ref()).is_some_and(|(s, _)| !s.card_is_current(rail, epoch))
    }

    /// Lets go of what it holds on an opening of the endpoint's card the endpoint let go of (a
    /// device-fatal event): the card held for an install, and `fresh`'s queue pair made on it
    /// (the device recovers only once every handle on it is gone). The attempt under way then
    /// fails and the next opens the card again. True if it let go of anything.
    fn let_go_if_released(&mut self, rail: usize, fresh: &mut FreshLinks<RoutedLink<N>>) -> bool {
        let mut let_go = false;
        if let Some(epoch) = self.reopened.as_ref().and_then(|r| r.endpoint_epoch) {
            if self.released(rail, epoch) {
                self.reopened = None;
                let_go = true;
            }
        }
        let fresh_epoch = fresh
            .peek(rail)
            .and_then(|l| l.route.as_ref())
            .map(|r| r.epoch());
        if fresh_epoch.is_some_and(|epoch| self.released(rail, epoch)) {
            fresh.drop_rail(rail);
            let_go = true;
        }
        let_go
    }
}

/// How long the control thread waits while it has timed work: a re-arm exchange under way, a
/// broken stream to redial, the gray switch's retransmission counters to read.
const CONTROL_POLL: Duration = Duration::from_millis(5);

/// The shortest wait of a dialler whose next try is due (the try is made in the turn after it).
const REDIAL_WAIT_MIN: Duration = Duration::from_millis(1);

/// How long it waits with nothing timed to do. Everything it serves then wakes it at once (the
/// stream, the rejoin port and the cards' events are descriptors it waits on; commands, a
/// released card and the connection's end ring its bell), so this is only a safety net. (It
/// woke every [`CONTROL_POLL`] until session 19: on a process pinned to one core with the data
/// thread, 200 context switches a second away from the busy poll, each tens of microseconds
/// under qemu, set the ping-pong's p99 on rxe.)
pub(crate) const CONTROL_IDLE: Duration = Duration::from_secs(1);

/// An eventfd that wakes a thread: the control thread's bell, which the data thread (or the
/// endpoint) rings after queueing a command, releasing a card or stopping it, drained after
/// each wait; and the data thread's wake, rung by the control thread after each outcome. Rung
/// only on such rare changes, never per message.
#[derive(Clone)]
pub(crate) struct Bell(Arc<OwnedFd>);

impl Bell {
    fn new() -> std::io::Result<Bell> {
        use rustix::event::{eventfd, EventfdFlags};
        Ok(Bell(Arc::new(eventfd(
            0,
            EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC,
        )?)))
    }

    pub(crate) fn ring(&self) {
        // A full counter (2^64 - 2 rings) is readable already: the wake is not lost.
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&*self.0, &mut b);
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl<N> ControlThread<N>
where
    N: Nic + Send + Sync + 'static,
    N::Link: Send + 'static,
    N::Mr: Send + 'static,
    N::Reopen: Send + 'static,
    N::SharedCq: Send + 'static,
    <N::SharedCq as railover_rdma::SharedCq>::Attach: Send + 'static,
{
    /// Starts the control thread of a connection whose rails' cards are `cards`. With no timed
    /// work it waits up to `idle` ([`CONTROL_IDLE`]; tests make it long enough that only the
    /// bell can end the wait).
    pub(crate) fn spawn(
        channel: TcpControl,
        role: Role,
        cfg: Config,
        cards: Vec<ThreadCard<N>>,
        read_events: bool,
        pool: Option<&PoolHandle<N>>,
        idle: Duration,
    ) -> std::io::Result<ControlThread<N>> {
        // Non-blocking: the thread waits on it (and the cards' event descriptors) with poll.
        channel.stream().set_nonblocking(true)?;
        channel.stream().set_nodelay(true)?;
        let wake = Bell::new()?;
        let bell = Bell::new()?;
        let (commands, command_rx) = mpsc::channel();
        let (outcome_tx, outcomes) = mpsc::channel();
        let flagged = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let task = ControlTask {
            channel,
            cfg,
            read_events,
            cards,
            commands: command_rx,
            reporter: Reporter {
                outcomes: outcome_tx,
                flagged: flagged.clone(),
                wake: wake.clone(),
            },
            stop: stop.clone(),
            bell: bell.clone(),
            idle,
            proto: RearmProtocol::new(role, cfg.rails())
                .with_timeout(cfg.rearm_exchange_timeout_ns()),
            fresh: FreshLinks::new(),
            lost_reported: false,
            retransmissions: [None; MAX_RAILS],
            start: Instant::now(),
        };
        let thread = match pool {
            Some(pool) => {
                pool.joining
                    .send(task)
                    .map_err(|_| std::io::Error::other("the endpoint's control thread is gone"))?;
                pool.bell.ring();
                None
            }
            None => Some(
                std::thread::Builder::new()
                    .name("railover-control".into())
                    .spawn(move || control_loop(task))?,
            ),
        };
        Ok(ControlThread {
            commands,
            outcomes,
            flagged,
            wake,
            stop,
            bell,
            thread,
            completed: 0,
        })
    }
}

impl<N: Nic> ControlThread<N> {
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Readable when the thread has news for the data thread (to wait on in a blocking receive).
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.fd()
    }

    /// After a blocking wait: consumes the wake-ups.
    pub fn clear_wake(&self) {
        self.wake.drain();
    }

    /// Whether the thread has no news (outcomes) waiting: one relaxed load (`serve` swaps the
    /// flag with Acquire before reading any). The caller checks for re-arm requests to hand it.
    pub fn idle(&self) -> bool {
        !self.flagged.load(Ordering::Relaxed)
    }

    /// On the data thread, inside `progress`: hands the core's re-arm requests to the thread and
    /// installs what it finished. Never blocks.
    pub fn serve<C: Clock>(&mut self, rx: &mut Receiver<N, C>) {
        while let Some(rail) = rx.take_rearm_request() {
            if self.commands.send(Command::Rearm(rail)).is_err() {
                rx.rearm_failed(rail); // the thread is gone; the core asks again later
            } else {
                self.bell.ring();
            }
        }
        // Steady state: this one relaxed load. The swap pairs with the thread's Release store.
        if !self.flagged.load(Ordering::Relaxed) || !self.flagged.swap(false, Ordering::Acquire) {
            return;
        }
        while let Ok(outcome) = self.outcomes.try_recv() {
            match outcome {
                Outcome::Install {
                    rail,
                    link,
                    peer,
                    card,
                } => {
                    let RoutedLink { route, link } = link;
                    let old = if !rx.install_allowed(rail, card.as_ref().map(|c| &c.nic)) {
                        // Made on a card other than the one the user swapped in (queued before
                        // the thread took it): no use; the core asks again.
                        drop((route, card));
                        rx.rearm_failed(rail);
                        Some(link)
                    } else {
                        match card {
                            Some(regs) => rx.install_reopened(rail, link, route, regs, &peer),
                            None => rx.install_rearmed_keep_old(rail, link, route, &peer),
                        }
                    };
                    if let Some(old) = old {
                        let _ = self.commands.send(Command::Retire(old));
                        self.bell.ring();
                    }
                    self.completed += 1;
                }
                Outcome::Failed(rail) => rx.rearm_failed(rail),
                Outcome::ChannelLost => rx.rearm_channel_lost(),
                Outcome::ChannelRestored => rx.rearm_channel_restored(),
                Outcome::Event { rail, event } => rx.card_event(rail, event),
                Outcome::Retransmissions { rail, total } => rx.card_retransmissions(rail, total),
            }
        }
        // What the outcomes changed, the thread looks at in one more turn: above all a card
        // released on a device-fatal event (`progress` holds this handle out of the receiver
        // meanwhile, so `card_released` can't reach it). Outcomes are rare: one ring for all.
        self.bell.ring();
    }

    /// Wakes the thread to look at the cards again: the data thread released one (the thread
    /// holds the cards it waits on, and a released device recovers only once every handle on it
    /// is gone).
    pub(crate) fn card_released(&self) {
        self.bell.ring();
    }

    /// Hands the thread the user's card for `rail` (registered with the rail's memory): the
    /// rail's next re-arm makes its queue pair there and installs card and queue pair together
    /// (the data path keeps the old card until then). Its events are read from now on.
    pub(crate) fn use_card(
        &self,
        rail: usize,
        regs: CardRegs<N>,
        reopen: N::Reopen,
    ) -> Result<(), ()> {
        self.commands
            .send(Command::UseCard { rail, regs, reopen })
            .map_err(|_| ())?;
        self.bell.ring();
        Ok(())
    }
}

impl<N: Nic> Drop for ControlThread<N> {
    fn drop(&mut self) {
        // Relaxed: a stop flag; the bell wakes the thread to see it.
        self.stop.store(true, Ordering::Relaxed);
        self.bell.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes a fresh queue pair on `card` (opening the card again if the data path released it) and
/// the hello that describes it.
fn prepare<N: Nic>(
    card: &mut ThreadCard<N>,
    cfg: &Config,
    rail: usize,
) -> Result<(RoutedLink<N>, Hello), String> {
    // The endpoint's card this thread holds for an install, released meanwhile (device fatal):
    // let go of it (the device recovers only once every handle is gone) and open it again.
    if let Some(epoch) = card.reopened.as_ref().and_then(|r| r.endpoint_epoch) {
        if card.released(rail, epoch) {
            card.reopened = None;
        }
    }
    // The card, and its opening when it is the endpoint's (a queue pair goes on the shared
    // queues only on the card of the pool's current opening).
    let (nic, epoch) = match (&card.reopened, card.nic.upgrade()) {
        (Some(regs), _) => (regs.nic.clone(), regs.endpoint_epoch),
        (None, Some(nic)) => (nic, card.shared.as_ref().map(|(_, epoch)| *epoch)),
        (None, None) => {
            let (nic, epoch) = match &card.shared {
                // The endpoint's card: its handle, opened again by whichever connection (or the
                // endpoint) needs it first, so that every connection's queue pairs go on its
                // shared queues again and the endpoint reads its events once for all.
                Some((shared, _)) => {
                    let (nic, epoch) = shared.open_card(rail).map_err(|e| e.to_string())?;
                    (nic, Some(epoch))
                }
                None => {
                    let nic = N::reopen(&card.reopen).map_err(|e| e.to_string())?;
                    tracing::info!(rail, card = nic.name(), "card opened again");
                    (nic, None)
                }
            };
            let nic = Arc::new(nic);
            let mut regs = CardRegs::register(nic.clone(), &card.mem).map_err(|e| e.to_string())?;
            regs.endpoint_epoch = epoch;
            card.remotes = regs.remotes();
            card.reopened = Some(regs);
            (nic, epoch)
        }
    };
    let shared = card.shared.as_ref().map(|(s, _)| s).zip(epoch);
    let link = make_link(shared, rail, &*nic, cfg).map_err(|e| e.to_string())?;
    let hello = rail_hello(cfg, rail, link.link.endpoint(), card.remotes);
    Ok((link, hello))
}

/// How the control thread hands outcomes to the data thread.
struct Reporter<N: Nic> {
    outcomes: mpsc::Sender<Outcome<N>>,
    flagged: Arc<AtomicBool>,
    wake: Bell,
}

impl<N: Nic> Reporter<N> {
    fn report(&self, o: Outcome<N>) {
        if self.outcomes.send(o).is_ok() {
            // Pairs with the data thread's Acquire swap: the outcome is queued before the flag.
            self.flagged.store(true, Ordering::Release);
            // Outcomes are rare (faults, re-arms): waking a blocking receiver each time is fine.
            self.wake.ring();
        }
    }
}

/// One connection's control work, turned by its own thread ([`ControlThread::spawn`]) or by an
/// endpoint's shared one ([`ControlPool`]).
pub(crate) struct ControlTask<N: Nic> {
    channel: TcpControl,
    cfg: Config,
    /// Whether it reads the cards' device events (not when an endpoint shares the cards and
    /// reads them once for all its connections).
    read_events: bool,
    cards: Vec<ThreadCard<N>>,
    commands: mpsc::Receiver<Command<N>>,
    reporter: Reporter<N>,
    /// Set when the connection is dropped.
    stop: Arc<AtomicBool>,
    /// Rung by the data thread (see [`Bell`]).
    bell: Bell,
    /// How long it waits with no timed work ([`CONTROL_IDLE`]).
    idle: Duration,
    proto: RearmProtocol,
    fresh: FreshLinks<RoutedLink<N>>,
    lost_reported: bool,
    retransmissions: [Option<u64>; MAX_RAILS],
    start: Instant,
}

impl<N: Nic> ControlTask<N> {
    fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    /// Whether the connection is gone (dropped, or its handle disconnected).
    fn stopped(&self) -> bool {
        // Relaxed: a stop flag (see ControlThread::drop).
        self.stop.load(Ordering::Relaxed)
    }

    /// The descriptors to wait on: the stream, the rejoin port (the listener's side watches it
    /// always) and the event descriptors of `held` ([`ControlTask::held_for_wait`]: the cards
    /// whose events it reads).
    fn wait_fds<'a>(&'a self, held: &'a [Option<Arc<N>>], out: &mut Vec<BorrowedFd<'a>>) {
        out.push(self.bell.fd());
        if !self.proto.is_closed() {
            out.push(self.channel.stream().as_fd());
        }
        out.extend(self.channel.rejoin_port().map(|l| l.as_fd()));
        out.extend(held.iter().flatten().filter_map(|n| n.event_fd()));
    }

    /// Whether it reads `rail`'s card's events: always on a connection of its own, on an
    /// endpoint's only for the user's card (`replace_card`).
    fn events_here(&self, rail: usize) -> bool {
        self.read_events || self.cards.get(rail).is_some_and(|c| !c.events_elsewhere)
    }

    /// How long it may wait: [`CONTROL_POLL`] while it has timed work, else [`CONTROL_IDLE`]
    /// (everything else wakes it: its descriptors and its bell).
    fn wait_for(&self) -> Duration {
        let redials = self.proto.is_closed() && self.channel.dials();
        let counts_retransmissions = self
            .cfg
            .gray_switch()
            .is_some_and(|g| g.retransmits_per_window > 0);
        let wait = if self.proto.busy() || counts_retransmissions {
            CONTROL_POLL
        } else if redials {
            // Until its next try (the back-off grows to 1 s; it woke every 5 ms until session
            // 20), at least a millisecond: never a spin.
            let next = self.channel.next_redial_in().unwrap_or(CONTROL_POLL);
            next.max(REDIAL_WAIT_MIN).min(self.idle)
        } else {
            self.idle
        };
        // A resting rejoin port is not waited on: the wait ends when it is watched again.
        match self.channel.next_accept_in() {
            Some(rest) => wait.min(rest.max(REDIAL_WAIT_MIN)),
            None => wait,
        }
    }

    /// The cards to keep through the wait: those whose event descriptors it waits on (not an
    /// endpoint's cards, whose events the endpoint reads). A card the data path lets go of
    /// meanwhile is then released at once, not when the wait ends.
    fn held_for_wait(&self, live: [Option<Arc<N>>; MAX_RAILS]) -> [Option<Arc<N>>; MAX_RAILS] {
        let mut live = live;
        for (rail, nic) in live.iter_mut().enumerate() {
            if !self.events_here(rail) {
                *nic = None;
            }
        }
        live
    }

    /// The cards the data path still holds (its Weak is dead for a released one).
    fn live_cards(&self) -> [Option<Arc<N>>; MAX_RAILS] {
        std::array::from_fn(|i| self.cards.get(i).and_then(|c| c.nic.upgrade()))
    }

    /// Takes the data thread's commands. False when the connection is gone.
    fn take_commands(&mut self) -> bool {
        // Before the commands: a ring after this read comes with a command read below or in
        // the next turn (the bell stays readable).
        self.bell.drain();
        loop {
            match self.commands.try_recv() {
                Ok(Command::Rearm(rail)) => self.proto.request(rail, self.now()),
                Ok(Command::Retire(link)) => drop(link),
                Ok(Command::UseCard { rail, regs, reopen }) => self.use_card(rail, regs, reopen),
                Err(mpsc::TryRecvError::Empty) => return !self.stopped(),
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// The user's card for `rail`: what the thread knew of the old one goes (its Weak, its
    /// reopen token, a card the thread holds for an install, the endpoint's shared queues), and so
    /// does a queue pair an attempt under way made there. Before this, after the user's swap the
    /// thread kept reopening the old card by its token for every attempt, and the data path
    /// dropped each: the rail never came back.
    fn use_card(&mut self, rail: usize, regs: CardRegs<N>, reopen: N::Reopen) {
        let Some(card) = self.cards.get_mut(rail) else {
            return;
        };
        card.nic = Arc::downgrade(&regs.nic);
        card.remotes = regs.remotes();
        card.reopen = reopen;
        card.shared = None;
        card.events_elsewhere = false;
        card.reopened = Some(regs);
        self.fresh.drop_rail(rail);
    }

    /// One turn after a wait: card events, retransmission counts, the stream, the re-arm
    /// protocol's timers and its I/O (queue pairs made, connected, handed over).
    fn turn(&mut self, live: &[Option<Arc<N>>; MAX_RAILS]) {
        // What it holds on an opening of the endpoint's card that the endpoint let go of (the
        // endpoint reads that card's events, and rings this thread's bell when it lets go).
        for (rail, card) in self.cards.iter_mut().enumerate() {
            if card.let_go_if_released(rail, &mut self.fresh) {
                tracing::info!(rail, "let go of a card released by the endpoint");
            }
        }
        for (rail, nic) in live.iter().enumerate() {
            if let Some(nic) = nic.as_ref().filter(|_| self.events_here(rail)) {
                while let Some(event) = nic.poll_event() {
                    if event == AsyncEvent::DeviceFatal {
                        // A card it holds and the data path doesn't have yet (opened again, or
                        // the user's): let go of it too, so the device can recover; the next
                        // attempt opens it again by name.
                        if let Some(card) = self.cards.get_mut(rail) {
                            card.reopened = None;
                        }
                    }
                    self.reporter.report(Outcome::Event { rail, event });
                }
            }
        }
        // The gray switch's retransmission counts: read here, off the data thread (files).
        if self
            .cfg
            .gray_switch()
            .is_some_and(|g| g.retransmits_per_window > 0)
        {
            for (rail, nic) in live.iter().enumerate() {
                let total = nic.as_ref().and_then(|n| n.retransmissions());
                if let Some(total) = total.filter(|t| Some(*t) != self.retransmissions[rail]) {
                    self.retransmissions[rail] = Some(total);
                    self.reporter
                        .report(Outcome::Retransmissions { rail, total });
                }
            }
        }
        let now = self.now();
        if !self.proto.is_closed() {
            read_into(&mut self.channel, &mut self.proto, now);
        }
        // Said before it is replaced (a dialler may get a new stream at once).
        self.report_loss();
        // A broken stream is replaced (the dialler redials, backing off); the listener also
        // takes a new one while its own looks fine (its end may be half-open).
        if (self.proto.is_closed() || !self.channel.dials())
            && matches!(self.channel.reconnect(), Ok(true))
        {
            self.proto.reopen();
            if std::mem::take(&mut self.lost_reported) {
                self.reporter.report(Outcome::ChannelRestored);
            }
            read_into(&mut self.channel, &mut self.proto, now);
        }
        self.proto.handle_timeout(self.now());
        while let Some(io) = self.proto.poll() {
            self.carry_out(io);
        }
        self.report_loss();
    }

    fn carry_out(&mut self, io: RearmIo) {
        let now = self.now();
        let (proto, reporter) = (&mut self.proto, &self.reporter);
        match io {
            RearmIo::Send(frame) => {
                if let Err(e) = self.channel.send(&frame) {
                    tracing::warn!(error = %e, "control channel failed");
                    proto.channel_failed();
                }
            }
            RearmIo::Prepare { rail, attempt } => {
                match prepare(&mut self.cards[rail], &self.cfg, rail) {
                    Ok((link, ours)) => {
                        self.fresh.put(rail, attempt, link);
                        proto.prepared::<String>(rail, attempt, Ok(ours), now);
                    }
                    Err(e) => proto.prepared(rail, attempt, Err(e), now),
                }
            }
            RearmIo::Connect {
                rail,
                attempt,
                peer,
            } => {
                let result = match self.fresh.get_mut(rail, attempt) {
                    Some(fresh) => fresh
                        .link
                        .connect(&peer.endpoint)
                        .map_err(|e| e.to_string()),
                    None => Err("no fresh queue pair".to_string()),
                };
                proto.connected(rail, attempt, result, now);
            }
            RearmIo::Install {
                rail,
                attempt,
                peer,
            } => match self.fresh.take(rail, attempt) {
                Some(link) => {
                    let card = self.cards[rail].reopened.take();
                    if let Some(regs) = &card {
                        let thread_card = &mut self.cards[rail];
                        thread_card.nic = Arc::downgrade(&regs.nic);
                        if let (Some((_, at)), Some(epoch)) =
                            (&mut thread_card.shared, regs.endpoint_epoch)
                        {
                            *at = epoch;
                        }
                    }
                    reporter.report(Outcome::Install {
                        rail,
                        link,
                        peer,
                        card,
                    });
                }
                None => reporter.report(Outcome::Failed(rail)),
            },
            RearmIo::Abandon { rail, attempt } => {
                self.fresh.abandon(rail, attempt);
                reporter.report(Outcome::Failed(rail));
            }
            RearmIo::Decline { rail } => reporter.report(Outcome::Failed(rail)),
        }
    }

    /// Says once that the stream broke, and ends it for the peer too (it then sets up a new one).
    fn report_loss(&mut self) {
        if self.proto.is_closed() && !self.lost_reported {
            self.lost_reported = true;
            self.channel.shutdown();
            self.reporter.report(Outcome::ChannelLost);
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passed (just sleeps for that with none);
/// returns how many are readable. Any number of descriptors (an endpoint's pool waits on three
/// or more per connection; `railover_rdma::wait_readable`, made for the data thread, takes 16
/// without allocating).
fn wait(fds: &[BorrowedFd<'_>], timeout: Duration) -> usize {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return 0;
    }
    let mut set: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    let wait_at_most = timeout;
    let timeout = Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    match poll(&mut set, Some(&timeout)) {
        Ok(n) => {
            if n > 0
                && set
                    .iter()
                    .map(|fd| fd.revents())
                    .filter(|r| !r.is_empty())
                    .all(hung_up)
            {
                // Nothing to read, and the next wait would end at once again: the turn after
                // this one comes a poll interval later (or at the wait's own end, if sooner),
                // never in a spin (a descriptor whose device or socket broke stays like this
                // until its owner drops it). Anything else ready is served at once.
                tracing::debug!("control thread: a descriptor reports an error or hang-up");
                std::thread::sleep(CONTROL_POLL.min(wait_at_most));
            }
            n
        }
        Err(rustix::io::Errno::INTR) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "control thread: waiting failed");
            std::thread::sleep(CONTROL_POLL); // never spin on a broken wait
            0
        }
    }
}

/// Whether a descriptor's poll result is an error or hang-up with nothing to read.
fn hung_up(revents: rustix::event::PollFlags) -> bool {
    use rustix::event::PollFlags;
    revents.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL)
        && !revents.contains(PollFlags::IN)
}

/// A connection's own control thread: waits on its stream and cards, then takes a turn.
fn control_loop<N: Nic>(mut task: ControlTask<N>) {
    // Commands are taken and turned before every wait, never left for after it: a wait with no
    // timed work lasts until a descriptor or the bell wakes it.
    while task.take_commands() {
        let live = task.live_cards();
        task.turn(&live);
        let held = task.held_for_wait(live);
        let mut fds = Vec::with_capacity(MAX_RAILS + 3);
        task.wait_fds(&held, &mut fds);
        wait(&fds, task.wait_for());
    }
}

/// One control thread for many connections (an endpoint's): it waits on all their streams at
/// once and takes a turn for each. Connections join with [`ControlPool::attach`]; a
/// connection's task leaves when the connection is dropped.
pub(crate) struct ControlPool<N: Nic> {
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    joining: PoolHandle<N>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<N> ControlPool<N>
where
    N: Nic + Send + Sync + 'static,
    N::Link: Send + 'static,
    N::Mr: Send + 'static,
    N::Reopen: Send + 'static,
    N::SharedCq: Send + 'static,
    <N::SharedCq as railover_rdma::SharedCq>::Attach: Send + 'static,
{
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    /// Starts the pool's thread; `idle` as for [`ControlThread::spawn`] (its wait with no
    /// connection, or none with timed work).
    pub(crate) fn spawn(idle: Duration) -> std::io::Result<ControlPool<N>> {
        let (joining, joined) = mpsc::channel::<ControlTask<N>>();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let bell = Bell::new()?;
        let pool_bell = bell.clone();
        let thread = std::thread::Builder::new()
            .name("railover-control".into())
            .spawn(move || {
                let mut tasks: Vec<ControlTask<N>> = Vec::new();
                // As `control_loop`, for every task: commands taken and turned before each wait.
                loop {
                    // Drained before the stop flag is read: a ring from `drop` after the drain
                    // ends the wait below, one before it comes with the flag already set.
                    pool_bell.drain();
                    // Relaxed: a stop flag; the bell orders it (see above).
                    if halt.load(Ordering::Relaxed) {
                        break;
                    }
                    while let Ok(task) = joined.try_recv() {
                        tasks.push(task);
                    }
                    tasks.retain_mut(|t| t.take_commands());
                    let live: Vec<_> = tasks.iter().map(|t| t.live_cards()).collect();
                    for (t, live) in tasks.iter_mut().zip(&live) {
                        t.turn(live);
                    }
                    let held: Vec<_> = tasks
                        .iter()
                        .zip(live)
                        .map(|(t, live)| t.held_for_wait(live))
                        .collect();
                    let mut fds = Vec::with_capacity(1 + 3 * tasks.len());
                    fds.push(pool_bell.fd());
                    for (t, held) in tasks.iter().zip(&held) {
                        t.wait_fds(held, &mut fds);
                    }
                    let timeout = tasks.iter().map(|t| t.wait_for()).min();
                    wait(&fds, timeout.unwrap_or(idle));
                }
            })?;
        Ok(ControlPool {
            joining: PoolHandle { joining, bell },
            stop,
            thread: Some(thread),
        })
    }
}

/// Where connections join a [`ControlPool`] (from any thread: a background acceptor's, say).
pub(crate) struct PoolHandle<N: Nic> {
    joining: mpsc::Sender<ControlTask<N>>,
    /// Wakes the pool's thread to take the new task (and to see its stop flag).
    bell: Bell,
}

impl<N: Nic> Clone for PoolHandle<N> {
    fn clone(&self) -> Self {
        PoolHandle {
            joining: self.joining.clone(),
            bell: self.bell.clone(),
        }
    }
}

impl<N: Nic> ControlPool<N> {
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn handle(&self) -> &PoolHandle<N> {
        &self.joining
    }
}

impl<N: Nic> Drop for ControlPool<N> {
    fn drop(&mut self) {
        // Relaxed: a stop flag; the bell wakes the thread to see it.
        self.stop.store(true, Ordering::Relaxed);
        self.joining.bell.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GraySwitch;
    use railover_rdma::sim::SimNic;
    #[cfg(feature = "verbs")]
    use railover_rdma::verbs::VerbsNic;
    #[cfg(feature = "verbs")]
    use std::mem::ManuallyDrop;
    use std::net::TcpListener;

    /// Both ends of a loopback stream.
    fn stream_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    fn dialler() -> (TcpControl, TcpStream) {
        let (ours, theirs) = stream_pair();
        (TcpControl::dialler(ours, 7, 1).expect("dialler"), theirs)
    }

    fn listener() -> (TcpControl, TcpStream) {
        let (ours, theirs) = stream_pair();
        let port = TcpListener::bind("127.0.0.1:0").expect("rejoin port");
        (
            TcpControl::listener(ours, 7, port).expect("listener"),
            theirs,
        )
    }

    const FOREVER: Duration = Duration::from_secs(3600);

    /// A thread that only its bell (or its descriptors) can wake: its idle wait is an hour.
    /// (A verbs connection's thread, with no card: none is opened. The simulated card can't go
    /// to another thread.)
    /// (Not dropped unless a test says so: a drop joins the thread, and a failing test must end,
    /// not wait an hour for it.)
    #[cfg(feature = "verbs")]
    fn spawn(
        channel: TcpControl,
        role: Role,
        pool: Option<&PoolHandle<VerbsNic>>,
    ) -> ManuallyDrop<ControlThread<VerbsNic>> {
        ManuallyDrop::new(
            ControlThread::spawn(
                channel,
                role,
                Config::builder().build().expect("default config"),
                Vec::new(),
                false,
                pool,
                FOREVER,
            )
            .expect("spawn"),
        )
    }

    /// Waits (at most a minute: a bound for a failing run, not a synchronization) until the
    /// thread reports an outcome; returns it.
    #[cfg(feature = "verbs")]
    fn next_outcome(t: &ControlThread<VerbsNic>) -> Option<Outcome<VerbsNic>> {
        let ready = railover_rdma::wait_readable(&[t.wake_fd()], 60_000_000_000).expect("wait");
        t.clear_wake();
        (ready > 0).then(|| t.outcomes.try_recv().ok()).flatten()
    }

    /// The control thread's step that makes a fresh queue pair (`prepare`, run here on the
    /// test's thread: a simulated card stays on its thread) for an endpoint's connection whose
    /// card was released: the card opened again is the endpoint's (the pool's handle, one device
    /// context, the queue pair on a shared queue), and one released again before its install is
    /// neither installed (the data path refuses it by its epoch) nor used for the next try.
    #[test]
    fn a_re_arm_takes_the_endpoints_card_and_never_one_released_again() {
        use crate::sim::SimEndpoints;
        use railover_rdma::Nic;
        let cfg = crate::sim::small_endpoint_config();
        let mut hosts = SimEndpoints::new(cfg, 5, 2_000).unwrap();
        let (_, y) = hosts.connect().unwrap();
        let settle = |hosts: &mut SimEndpoints, ms: u64| {
            let until = hosts.now() + ms * 1_000_000;
            while hosts.now() < until {
                hosts.step(until);
            }
        };
        settle(&mut hosts, 5);
        let card = hosts.cards[0].1.clone();
        let pool = hosts.b.queue_pool();
        let mem = crate::runtime::RailMemory::of(hosts.b.get(y).unwrap().core(), 0);
        let mut thread_card = ThreadCard::new(
            Weak::new(), // the data path's card: released
            card.reopen_token(),
            mem,
            Default::default(),
            Some((SharedLinks::new(&pool), pool.epoch(0).unwrap())),
            true,
        );
        hosts.fabric.remove_card(&card);
        settle(&mut hosts, 5);
        assert!(hosts.b.card(0).is_none(), "the endpoint let go");
        let harness_only = hosts.fabric.open_contexts(&card);
        hosts.fabric.restore_card(&card);

        let (fresh, hello) = prepare(&mut thread_card, &cfg, 0).expect("prepare");
        assert!(fresh.route.is_some(), "on the endpoint's shared queues");
        let regs = thread_card
            .reopened
            .take()
            .expect("the card, for the install");
        assert_eq!(regs.endpoint_epoch, pool.epoch(0));
        assert!(pool.card(0).is_some());
        assert_eq!(
            hosts.fabric.open_contexts(&card),
            harness_only + 1,
            "one handle: the pool's, the endpoint's"
        );

        // Released again (the endpoint takes the card, reads the event, lets go) before the
        // install: refused.
        settle(&mut hosts, 2);
        assert!(
            hosts.b.card(0).is_some(),
            "the endpoint took the pool's card"
        );
        hosts.fabric.remove_card(&card);
        settle(&mut hosts, 5);
        assert!(hosts.b.card(0).is_none() && pool.card(0).is_none());
        let conn = hosts.b.get_mut(y).unwrap();
        assert!(conn.card_released(0));
        let back = conn.install_reopened(0, fresh.link, fresh.route, regs, &hello);
        assert!(
            back.is_some(),
            "the fresh queue pair goes back to be destroyed"
        );
        assert!(conn.card_released(0), "not installed");
        assert_eq!(conn.core().rail_state(0), crate::RailState::Failed);
        drop(back);

        // A try that holds the card and a fresh queue pair on it when it is released again
        // (before the install) lets go of both at its next turn, without another try: no
        // handle is left on the device. The next try opens it anew, at the new opening.
        hosts.fabric.restore_card(&card);
        let mut fresh_links = FreshLinks::new();
        let (fresh, _) = prepare(&mut thread_card, &cfg, 0).expect("prepare");
        fresh_links.put(0, 1, fresh);
        let held = thread_card.reopened.as_ref().and_then(|r| r.endpoint_epoch);
        assert_eq!(held, pool.epoch(0));
        assert!(
            !thread_card.let_go_if_released(0, &mut fresh_links),
            "current"
        );
        settle(&mut hosts, 2);
        assert!(hosts.b.card(0).is_some(), "the endpoint took it");
        hosts.fabric.remove_card(&card);
        settle(&mut hosts, 5);
        assert!(hosts.b.card(0).is_none(), "the endpoint let go");
        assert!(thread_card.let_go_if_released(0, &mut fresh_links));
        assert!(thread_card.reopened.is_none() && fresh_links.peek(0).is_none());
        assert_eq!(
            hosts.fabric.open_contexts(&card),
            harness_only,
            "nothing holds the released card"
        );
        hosts.fabric.restore_card(&card);
        drop(prepare(&mut thread_card, &cfg, 0).expect("prepare"));
        let now_held = thread_card.reopened.as_ref().and_then(|r| r.endpoint_epoch);
        assert!(now_held > held, "{now_held:?} after {held:?}");
        assert_eq!(now_held, pool.epoch(0));
    }

    #[test]
    fn the_wait_takes_any_number_of_descriptors() {
        // An endpoint's pool with a dozen connections waits on three dozen.
        let bells: Vec<Bell> = (0..40).map(|_| Bell::new().expect("eventfd")).collect();
        bells[37].ring();
        let fds: Vec<BorrowedFd<'_>> = bells.iter().map(|b| b.fd()).collect();
        assert_eq!(wait(&fds, FOREVER), 1, "the rung one, among 40");
    }

    #[test]
    fn an_idle_control_thread_waits_without_a_timer_and_a_busy_one_with_one() {
        type Setup = fn(&mut RearmProtocol);
        let cases: [(bool, Role, Setup, Duration, &str); 4] = [
            (
                true,
                Role::Initiator,
                |_| {},
                FOREVER,
                "idle: its descriptors and bell wake it",
            ),
            (
                true,
                Role::Initiator,
                |p| p.request(0, 0),
                CONTROL_POLL,
                "an exchange times out",
            ),
            (
                true,
                Role::Initiator,
                |p| p.channel_failed(),
                REDIAL_WAIT_MIN,
                "a dialler's first try is due at once",
            ),
            (
                false,
                Role::Acceptor,
                |p| p.channel_failed(),
                FOREVER,
                "a listener waits on its port",
            ),
        ];
        for (dials, role, setup, expected, why) in cases {
            let (channel, _peer) = if dials { dialler() } else { listener() };
            let mut task = test_task(channel, role);
            setup(&mut task.proto);
            assert_eq!(task.wait_for(), expected, "{why}");
        }
        // A dialler whose try failed waits for its back-off (50 ms first), not 5 ms at a time.
        let (mut channel, _peer) = dialler();
        assert!(!ControlChannel::reconnect(&mut channel).expect("a refused try"));
        let mut task = test_task(channel, Role::Initiator);
        task.proto.channel_failed();
        let wait = task.wait_for();
        assert!(
            wait > CONTROL_POLL && wait <= Duration::from_millis(50),
            "until the next try: {wait:?}"
        );
        // The gray switch reads the cards' retransmission counters on every turn.
        let (channel, _peer) = dialler();
        let mut task = test_task(channel, Role::Initiator);
        let gray = GraySwitch::new(
            Duration::from_micros(50),
            Duration::from_millis(10),
            Duration::from_secs(1),
        )
        .retransmits_per_window(1);
        task.cfg = Config::builder().gray_switch(gray).build().expect("config");
        assert_eq!(task.wait_for(), CONTROL_POLL, "retransmissions are counted");
    }

    /// A rejoin port whose accept fails (out of descriptors; here shut down, which also makes
    /// it report a hang-up at once to every wait) rests, backing off, and is not waited on
    /// meanwhile: the listener's thread waited on it and woke at once, again and again.
    #[test]
    fn a_rejoin_port_whose_accept_fails_rests_instead_of_waking_the_thread() {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let (ours, _theirs) = stream_pair();
        let port = TcpListener::bind("127.0.0.1:0").expect("rejoin port");
        rustix::net::shutdown(&port, rustix::net::Shutdown::Read).expect("shut the port");
        let mut probe = [PollFd::new(&port, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(
            poll(&mut probe, Some(&now)).expect("poll"),
            1,
            "ready at once"
        );
        assert!(
            hung_up(probe[0].revents()),
            "with a hang-up, nothing to read"
        );
        let mut channel = TcpControl::listener(ours, 7, port).expect("listener");
        assert!(channel.rejoin_port().is_some(), "watched before");
        let before = Instant::now();
        assert!(
            ControlChannel::reconnect(&mut channel).is_err(),
            "accept fails"
        );
        // (Judged at `before`: a loaded machine may take the whole rest to get here. The
        // wait's descriptors are `rejoin_port`'s.)
        assert!(
            channel.rejoin_port_at(before).is_none(),
            "resting: not waited on"
        );
        let rest = channel.next_accept_in_at(before).expect("resting");
        assert!(
            rest >= Duration::from_millis(50),
            "the first rest: {rest:?}"
        );
        let mut task = test_task(channel, Role::Acceptor);
        task.proto.channel_failed();
        let wait = task.wait_for();
        assert!(
            wait >= REDIAL_WAIT_MIN && wait <= Duration::from_millis(50),
            "the wait ends when the port is watched again: {wait:?}"
        );
    }

    /// Sends a re-arm request as `serve` does and waits for the answer: an acceptor declines it
    /// (only the dialler starts exchanges) and says so at once.
    #[cfg(feature = "verbs")]
    fn declined(t: &ControlThread<VerbsNic>, rail: usize) -> bool {
        t.commands.send(Command::Rearm(rail)).expect("thread alive");
        t.bell.ring();
        matches!(next_outcome(t), Some(Outcome::Failed(r)) if r == rail)
    }

    #[test]
    #[cfg(feature = "verbs")]
    fn a_command_wakes_the_control_thread_through_its_bell() {
        let (channel, _peer) = listener();
        let t = spawn(channel, Role::Acceptor, None);
        // The first may be taken before the thread ever waits; the thread takes the second
        // only after the wait that follows its answer to the first, which only the bell ends.
        assert!(declined(&t, 1), "the first command answered");
        assert!(
            declined(&t, 0),
            "the second, through the bell (else it sleeps an hour)"
        );
        drop(ManuallyDrop::into_inner(t));
    }

    #[test]
    #[cfg(feature = "verbs")]
    fn dropping_the_connection_ends_its_control_thread_at_once() {
        let (channel, _peer) = listener();
        let t = spawn(channel, Role::Acceptor, None);
        assert!(
            declined(&t, 1),
            "the thread is past its first turn, waiting"
        );
        assert!(
            ends_within_a_minute(move || drop(ManuallyDrop::into_inner(t))),
            "the drop's ring ended the thread's wait (else it sleeps an hour)"
        );
    }

    #[test]
    #[cfg(feature = "verbs")]
    fn an_endpoints_pool_takes_connections_commands_and_its_stop_through_bells() {
        let pool = ManuallyDrop::new(ControlPool::<VerbsNic>::spawn(FOREVER).expect("pool"));
        let (channel, _peer) = listener();
        let t = spawn(channel, Role::Acceptor, Some(pool.handle()));
        assert!(
            declined(&t, 1),
            "the joining connection taken, its command answered"
        );
        assert!(
            declined(&t, 0),
            "a later command, through the connection's bell"
        );
        let (channel, _peer2) = listener();
        let u = spawn(channel, Role::Acceptor, Some(pool.handle()));
        assert!(
            declined(&u, 1),
            "a second connection joins the waiting pool"
        );
        drop(ManuallyDrop::into_inner(t)); // (a pool's connection has no thread of its own to join)
        assert!(declined(&u, 0), "the pool still serves the other");
        drop(ManuallyDrop::into_inner(u));
        assert!(
            ends_within_a_minute(move || drop(ManuallyDrop::into_inner(pool))),
            "the pool's own bell ends its wait (else it sleeps an hour)"
        );
    }

    /// Runs `f` on another thread; whether it returned within a minute (a bound for a failing
    /// run, not a synchronization).
    #[cfg(feature = "verbs")]
    fn ends_within_a_minute(f: impl FnOnce() + Send + 'static) -> bool {
        let (done, ended) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        ended.recv_timeout(Duration::from_secs(60)).is_ok()
    }

    /// A task as `spawn` builds it, not running, to ask how long it would wait.
    fn test_task(channel: TcpControl, role: Role) -> ControlTask<SimNic> {
        let (_commands, command_rx) = mpsc::channel();
        let (outcomes, _rx) = mpsc::channel();
        ControlTask {
            channel,
            cfg: Config::builder().build().expect("default config"),
            read_events: false,
            cards: Vec::new(),
            commands: command_rx,
            reporter: Reporter {
                outcomes,
                flagged: Arc::new(AtomicBool::new(false)),
                wake: Bell::new().expect("eventfd"),
            },
            stop: Arc::new(AtomicBool::new(false)),
            bell: Bell::new().expect("bell"),
            idle: FOREVER,
            proto: RearmProtocol::new(role, 2),
            fresh: FreshLinks::new(),
            lost_reported: false,
            retransmissions: [None; MAX_RAILS],
            start: Instant::now(),
        }
    }
}
