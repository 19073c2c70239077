//! Many connections over the same cards, driven by one `poll`.
//!
//! A trading gateway holds tens to hundreds of sessions on the same two cards. An [`Endpoint`]
//! holds each card once (on verbs: one device context and protection domain per card, shared by
//! every connection's queue pairs and registrations) and any number of [`Connection`]s, each
//! named by a [`ConnectionId`]. One [`Endpoint::poll`] drives them all: completions, device
//! events, heartbeats, failovers and re-arms of every connection, then delivery, with the
//! connection's id and the record's sequence number. A card's failure therefore fails over every
//! connection on it within the same `poll`. [`Endpoint::poll_event`] gives each connection's
//! events with its id.
//!
//! The connections' queue pairs share a few completion queues per card (see
//! [`crate::shared_queues`]): an empty `poll` polls those, not one queue per link, and a blocking
//! wait watches one descriptor per queue. A connection of an endpoint therefore closes through it
//! ([`Endpoint::close`], [`Endpoint::remove`], or dropping the endpoint, which closes them all
//! together), and is driven by the endpoint's `poll` (or [`Endpoint::poll_cards`] followed by the
//! connections' own `poll`).
//!
//! ```
//! use railover::endpoint::SimEndpoints;
//! use railover::Config;
//!
//! let cfg = Config::builder().rails(2).build().unwrap();
//! let mut hosts = SimEndpoints::new(cfg, 7, 2_000).unwrap();
//! let ids: Vec<_> = (0..8).map(|_| hosts.connect().unwrap()).collect();
//! for &(a, _) in &ids {
//!     hosts.a.send(a, b"order").unwrap();
//! }
//! let mut got = 0;
//! while got < ids.len() {
//!     hosts.step(u64::MAX);
//!     got += hosts.b.poll(|_id, seq, msg| assert_eq!((seq, msg), (1, &b"order"[..])));
//! }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use railover_rdma::{AsyncEvent, Completion, Nic, SharedCompletion, SharedCq};

use crate::config::Config;
use crate::core::{Event, Nanos, SendError, Stats};
use crate::runtime::{Clock, CloseError, ConnectError, Connection, PendingConnection, RailCard};
use crate::shared_queues::{NewsReceiver, QueueNews, QueuePool};

/// Names one connection of an [`Endpoint`]. An id is never reused for another connection of the
/// same endpoint (a removed connection's slot gets a new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId {
    index: u32,
    generation: u32,
}

impl ConnectionId {
    /// Its position among the endpoint's connections (slots are reused after
    /// [`Endpoint::remove`], with a new generation).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.index, self.generation)
    }
}

struct Slot<N: Nic, C: Clock> {
    generation: u32,
    conn: Option<Entry<N, C>>,
}

struct Entry<N: Nic, C: Clock> {
    conn: Connection<N, C>,
    /// Every log line of this connection carries its id.
    span: tracing::Span,
}

/// Each card's shared completion queues (see [`crate::shared_queues`]), and whose links report
/// there.
struct SharedQueues<N: Nic> {
    /// Where set-ups make their links (on any thread).
    pool: Arc<QueuePool<N>>,
    /// What the set-ups did, in order.
    news: NewsReceiver<N>,
    /// Per rail.
    cards: Vec<CardQueues<N>>,
    /// The connections held, by the token their links' news names them with.
    owners: HashMap<u64, ConnectionId>,
}

struct CardQueues<N: Nic> {
    /// Which opening of the card these are of (see [`QueuePool::forget_rail`]): news of another
    /// is about a card let go of.
    epoch: u64,
    queues: Vec<N::SharedCq>,
    /// Every link on them, by queue pair number (looked up once per completion).
    routes: HashMap<u32, Route, BuildHasherDefault<QpnHasher>>,
}

/// Hashes a queue pair number with one multiplication, not SipHash: the numbers come from the
/// local provider, not from a peer, so there is no flooding to defend against, and the lookup
/// happens for every completion.
#[derive(Default)]
struct QpnHasher(u64);

impl Hasher for QpnHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: an odd constant spreads consecutive numbers over every bit.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl<N: Nic> CardQueues<N> {
    fn new(epoch: u64) -> Self {
        CardQueues {
            epoch,
            queues: Vec::new(),
            routes: HashMap::default(),
        }
    }
}

/// Whose a link on a shared queue is.
enum Route {
    /// Its connection (`owner`, see [`crate::shared_queues`]) isn't inserted yet (set up in the
    /// background, or prepared and not yet inserted): its completions wait here, in order, and
    /// are handed over at the insert.
    Waiting { owner: u64, early: Vec<Completion> },
    /// This connection's.
    Held(ConnectionId),
}

/// Each card once, and any number of connections on them, driven by one [`Endpoint::poll`].
pub struct Endpoint<N: Nic, C: Clock> {
    /// Connections set up in the background (verbs: `Endpoint::listen`,
    /// `Endpoint::connect_in_background`), waiting for [`Endpoint::poll_connected`]. Its
    /// listener is stopped first thing in the endpoint's drop.
    pub(crate) incoming: Option<Incoming<N, C>>,
    cfg: Config,
    /// This host's card of each rail, shared by every connection (None: released after a
    /// device-fatal event, until it opens again). The endpoint's thread's copy of the cards in
    /// its queue pool (`queues.pool`), where set-up threads and re-arms take them: a card
    /// released here (device fatal) is let go there too, as a device recovers only once every
    /// handle on it is gone, and one opened again there is taken here at the next look.
    cards: Vec<Option<N>>,
    clock: C,
    /// When the cards' device events are read next (once per heartbeat interval: a system
    /// call per card on verbs, never one per message).
    next_card_events: Nanos,
    /// When every connection next looks at all its rails (see
    /// [`crate::runtime::QUIET_RAIL_POLL_NS`]): together, so that a simulated endpoint's time
    /// stops there once per period, not once per connection.
    quiet_rails_due: Nanos,
    /// The cards whose shared queues every poll looks at (a bit per rail): those of the rails
    /// any connection was busy on (its active rail, the one its peer sends on) at the last look
    /// at every card, and the bits of rails beyond the last card. The others' queues (standbys: heartbeats alone) are looked at once per
    /// [`crate::runtime::QUIET_RAIL_POLL_NS`], as a single connection does with its own.
    busy_cards: u8,
    /// Whether a poll since the last look at every card left some card's queues unpolled:
    /// [`Endpoint::next_timeout`] then asks to be driven again at `quiet_rails_due`.
    cards_owed: bool,
    slots: Vec<Slot<N, C>>,
    /// The control thread every connection's re-arms run on (verbs; made with the first
    /// connection). After `slots`: connections are dropped (and closed) first.
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) control: Option<crate::control::ControlPool<N>>,
    /// Slots without a connection, reused first.
    free: Vec<u32>,
    live: usize,
    /// Where the next `poll_event` starts looking, so that a chatty connection doesn't starve
    /// the others' events.
    event_cursor: usize,
    /// Names this endpoint to its peers' endpoints, to share liveness with them (random; 0:
    /// its connections heart-beat alone, see [`Endpoint::set_shared_liveness`]).
    id: u64,
    /// The liveness shared with each peer endpoint (see [`crate::liveness`]), by its id.
    groups: Vec<(u64, std::sync::Arc<crate::liveness::LivenessGroup>)>,
    /// Tokens of the members of those groups, never reused.
    next_member: u32,
    /// Every connection's heartbeat ticks fall on the interval grid, so one wake-up serves them
    /// all (see [`Endpoint::set_aligned_heartbeats`]; None: not chosen, off until a blocking
    /// poll turns it on).
    aligned_heartbeats: Option<bool>,
    /// How many times a blocking poll waited (see [`Endpoint::blocking_waits`]).
    waits: u64,
    /// The cards' completion queues, shared by the connections' links.
    queues: SharedQueues<N>,
    /// Where a poll of a shared queue puts its completions (kept: a fresh array per poll
    /// would be zeroed each time, ~90 instructions per queue).
    got: [SharedCompletion; 32],
}

impl<N, C> Endpoint<N, C>
where
    N: Nic,
    C: Clock + Clone,
{
    /// An endpoint on `cards` (this host's card of rail i at `cards[i]`, the first primary);
    /// every connection it makes uses `cfg` and `clock`.
    pub fn new(cfg: Config, cards: Vec<N>, clock: C) -> Result<Self, ConnectError> {
        Self::with_cards(cfg, cards.into_iter().map(RailCard::Open).collect(), clock)
    }

    /// [`Endpoint::new`] with cards that may be absent (a card missing at start): every
    /// connection's rail on an absent card starts failed and joins once the card is back (the
    /// first re-arm, or new connection, to find it back opens it as the endpoint's card, for
    /// all).
    pub fn with_cards(
        cfg: Config,
        cards: Vec<RailCard<N>>,
        clock: C,
    ) -> Result<Self, ConnectError> {
        if cards.len() != cfg.rails() {
            return Err(ConnectError::RailCount {
                want: cfg.rails(),
                got: cards.len(),
            });
        }
        // Each rail's card (None: absent) and how to open it again.
        let (cards, reopen): (Vec<Option<N>>, Vec<N::Reopen>) = (cards.into_iter())
            .map(|c| match c {
                RailCard::Open(nic) => {
                    let token = nic.reopen_token();
                    (Some(nic), token)
                }
                RailCard::Absent(token) => (None, token),
            })
            .unzip();
        let (pool, news) = QueuePool::new(cards.iter().cloned().zip(reopen).collect());
        Ok(Endpoint {
            queues: SharedQueues {
                pool,
                news,
                cards: (0..cards.len()).map(|_| CardQueues::new(0)).collect(),
                owners: HashMap::new(),
            },
            got: [SharedCompletion::EMPTY; 32],
            incoming: None,
            cfg,
            cards,
            clock,
            next_card_events: 0,
            quiet_rails_due: 0,
            busy_cards: u8::MAX,
            cards_owed: false,
            slots: Vec::new(),
            control: None,
            free: Vec::new(),
            live: 0,
            event_cursor: 0,
            id: random_id(),
            groups: Vec::new(),
            next_member: 0,
            aligned_heartbeats: None,
            waits: 0,
        })
    }

    /// A new connection on the endpoint's cards, to be connected with the peer's hellos
    /// ([`PendingConnection::hellos`], [`PendingConnection::connect`]) and then
    /// [`Endpoint::insert`]ed. Registers its memory and creates its queue pairs, on the cards'
    /// shared completion queues (what they complete before the insert waits for it).
    /// A card released after a device-fatal event is opened again here if it is back (else the
    /// rail starts failed and joins when it is).
    pub fn prepare(&mut self) -> Result<PendingConnection<N, C>, ConnectError> {
        let cards = (0..self.cards.len())
            .map(|rail| {
                let card = match self.reopened(rail) {
                    Ok(nic) => RailCard::Open(nic),
                    Err(_) => RailCard::Absent(self.queues.pool.reopen_token(rail)),
                };
                // (The pool's opening is changed only on this thread, when it lets go.)
                (card, self.queues.pool.epoch(rail).unwrap_or(0))
            })
            .collect();
        PendingConnection::on_shared_queues(self.cfg, cards, self.clock.clone(), &self.queues.pool)
    }

    /// Where set-ups on other threads make their queue pairs.
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn queue_pool(&self) -> Arc<QueuePool<N>> {
        Arc::clone(&self.queues.pool)
    }

    /// Opens again every card that is released or was missing at start and is back now;
    /// the others stay absent (their rails start failed in new connections and join later).
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn open_cards_back(&mut self) {
        for rail in 0..self.cards.len() {
            if let Err(e) = self.reopened(rail) {
                tracing::warn!(rail, error = %e, "card still can't be opened: its rail starts failed");
            }
        }
    }

    /// Rail `rail`'s card, opened again first if it was released (or taken from the pool, if a
    /// connection's re-arm opened it meanwhile).
    fn reopened(&mut self, rail: usize) -> Result<N, ConnectError> {
        if let Some(nic) = &self.cards[rail] {
            return Ok(nic.clone());
        }
        let (nic, _) = self.queues.pool.open_card(rail)?;
        self.cards[rail] = Some(nic.clone());
        Ok(nic)
    }

    /// The clock every connection of the endpoint reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }
}

impl<N: Nic, C: Clock> Endpoint<N, C> {
    /// The configuration every connection made here uses.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This host's card of rail `rail` (None while it is missing: after a device-fatal event,
    /// or since the start, until opened again for a new connection or a re-arm; one a re-arm
    /// opened is taken here at the endpoint's next look at the cards' events).
    pub fn card(&self, rail: usize) -> Option<&N> {
        self.cards.get(rail).and_then(Option::as_ref)
    }

    /// Takes `conn` (connected and started) into the endpoint: from now on [`Endpoint::poll`]
    /// drives it.
    pub fn insert(&mut self, mut conn: Connection<N, C>) -> ConnectionId {
        // A card opened again meanwhile (that one the connection may well be on: see below).
        self.adopt_opened_cards();
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let id = ConnectionId {
            index,
            generation: slot.generation,
        };
        let span = tracing::info_span!("connection", id = %id);
        if let Some(peer) = conn.peer_endpoint.filter(|_| self.id != 0) {
            let group = match self.groups.iter().find(|(p, _)| *p == peer) {
                Some((_, g)) => g.clone(),
                None => {
                    let g = std::sync::Arc::default();
                    self.groups.push((peer, std::sync::Arc::clone(&g)));
                    g
                }
            };
            self.next_member += 1;
            conn.liveness = Some(crate::liveness::Member::new(group, self.next_member));
        }
        conn.align_heartbeats(self.aligned_heartbeats == Some(true));
        // A card released on a device-fatal event while the connection was being set up (on a
        // set-up thread, or between `prepare` and this insert, from the cards as they were): it
        // missed the event, so it hears it now and lets go of the dead handle too (the device
        // recovers only once all are gone). Told by the opening its card came from: the card
        // may well be open again by now (a re-arm opens it as soon as it is back).
        for rail in 0..self.cards.len() {
            if conn.on_released_endpoint_card(rail, self.queues.pool.epoch(rail)) {
                conn.card_event(rail, AsyncEvent::DeviceFatal);
            }
        }
        // Its links on the shared queues are its own from now on; what they completed meanwhile
        // is handed over first, in order.
        hear_news(&mut self.queues);
        if let Some(owner) = conn.route_owner() {
            // Links made for it from now on (re-arms) route to it at once; those made already
            // (at set-up, or a re-arm that ran before the insert) route to it from here on.
            self.queues.owners.insert(owner, id);
            for (rail, card) in self.queues.cards.iter_mut().enumerate() {
                for (&qpn, route) in card.routes.iter_mut() {
                    let Route::Waiting { owner: o, early } = route else {
                        continue;
                    };
                    if *o == owner {
                        let early = std::mem::take(early);
                        *route = Route::Held(id);
                        let now = self.clock.now();
                        for c in early {
                            conn.shared_completion(rail, qpn, c, now);
                        }
                    }
                }
            }
        }
        slot.conn = Some(Entry { conn, span });
        self.live += 1;
        // Its rails' cards may be quiet ones so far: the next poll looks at every card.
        self.quiet_rails_due = 0;
        id
    }

    /// The next connection set up in the background (on verbs: a client `Endpoint::listen`
    /// accepted, or a dial of `Endpoint::connect_in_background`), now driven by the endpoint:
    /// its id. `None` when none is ready (never blocks); an error for a dial that failed, or a
    /// client whose set-up failed after its greeting checked out.
    pub fn poll_connected(&mut self) -> Option<Result<ConnectionId, ConnectError>> {
        let ready = self.incoming.as_ref()?.ready.try_recv().ok()?;
        Some(ready.map(|conn| self.insert(conn)))
    }

    /// Takes the connection out (to read what it left unacknowledged, or drop it). Its id names
    /// nothing from now on. A connection still running is closed first, as by
    /// [`Endpoint::close`] with the configured linger: away from the endpoint, its links on the
    /// shared completion queues would see nothing more.
    pub fn remove(&mut self, id: ConnectionId) -> Option<Connection<N, C>> {
        if self.get(id).is_some_and(|c| !c.close_finished()) {
            let _ = self.close(id, self.cfg.close_linger_ns());
        }
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let entry = slot.conn.take()?;
        if let Some(owner) = entry.conn.route_owner() {
            self.queues.owners.remove(&owner);
        }
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        Some(entry.conn)
    }

    /// How many connections the endpoint holds (ended ones included until removed).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The ids of every connection held, in slot order.
    pub fn ids(&self) -> impl Iterator<Item = ConnectionId> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.conn.as_ref().map(|_| ConnectionId {
                index: i as u32,
                generation: s.generation,
            })
        })
    }

    /// The connection `id` names, if it is still held.
    pub fn get(&self, id: ConnectionId) -> Option<&Connection<N, C>> {
        let slot = self.slots.get(id.index as usize)?;
        (slot.generation == id.generation)
            .then_some(slot.conn.as_ref())
            .flatten()
            .map(|e| &e.conn)
    }

    /// The connection `id` names, to send, reserve or read its state (close it with
    /// [`Endpoint::close`]: its own blocking calls say `DrivenByEndpoint`).
    pub fn get_mut(&mut self, id: ConnectionId) -> Option<&mut Connection<N, C>> {
        self.entry_mut(id).map(|e| &mut e.conn)
    }

    /// Sends `msg` on connection `id` (see [`Connection::send`]): its sequence number.
    pub fn send(&mut self, id: ConnectionId, msg: &[u8]) -> Result<u64, SendError> {
        match self.entry_mut(id) {
            Some(e) => {
                let _in = e.span.enter();
                e.conn.send(msg)
            }
            None => Err(SendError::UnknownConnection),
        }
    }

    /// Sends `msgs` on connection `id` as one batch (see [`Connection::send_batch`]): their
    /// sequence numbers.
    pub fn send_batch(
        &mut self,
        id: ConnectionId,
        msgs: &[&[u8]],
    ) -> Result<std::ops::Range<u64>, SendError> {
        match self.entry_mut(id) {
            Some(e) => {
                let _in = e.span.enter();
                e.conn.send_batch(msgs)
            }
            None => Err(SendError::UnknownConnection),
        }
    }

    /// Drives every connection once (completions, device events, timers, re-arms), then
    /// delivers what arrived: `deliver(connection, sequence number, message)`, in order and
    /// exactly once per connection. Returns how many messages were delivered. A connection
    /// that ended stays until [`Endpoint::remove`]d; its end is an [`Event::Ended`] (or
    /// [`Event::AllRailsDown`]) from [`Endpoint::poll_event`].
    pub fn poll(&mut self, mut deliver: impl FnMut(ConnectionId, u64, &[u8])) -> usize {
        let (now, every_card) = self.poll_cards_at();
        let mut delivered = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(e) = slot.conn.as_mut() else {
                continue;
            };
            let id = ConnectionId {
                index: index as u32,
                generation: slot.generation,
            };
            let _in = e.span.enter();
            // An ended connection's error repeats what its events said.
            // One clock read for all: the connections' clocks are copies of the endpoint's.
            if let Ok(n) = e.conn.poll_seq_at(now, |seq, msg| deliver(id, seq, msg)) {
                delivered += n;
            }
        }
        if every_card {
            // Until the next look at every card: those the connections are busy on now, and
            // the bits beyond the last card (every card busy is all bits). A connection's busy
            // rails change when its peer's records move to another rail, which only a look at
            // that card finds, or when it moves its own: then its send completions wait for
            // the next such look, a period at most (`next_timeout` asks for it).
            let beyond = !(((1u16 << self.queues.cards.len()) - 1) as u8);
            self.busy_cards = self
                .connections()
                .fold(beyond, |cards, c| cards | c.core().busy_rails());
        }
        delivered
    }

    /// Blocking form of [`Endpoint::poll`]: sleeps until a message arrives on any connection or
    /// `timeout_ns` pass, and returns how many were delivered (0: timed out). It wakes for any
    /// connection's completions, control-thread news or split sender, for the cards' device
    /// events, and for the earliest timer of any connection (heartbeats, re-arms, close), which
    /// it handles before sleeping again. On the simulator the clock's `idle` moves virtual time.
    ///
    /// From its first call on, every connection's heartbeat ticks fall on multiples of the
    /// heartbeat interval (never later than they would otherwise), so the timers wake this
    /// thread about once per interval for all connections together, not once per connection
    /// (unless [`Endpoint::set_aligned_heartbeats`] chose otherwise). A busy-polled endpoint
    /// keeps them spread, so that no single `poll` runs them all.
    pub fn poll_blocking(
        &mut self,
        timeout_ns: Nanos,
        mut deliver: impl FnMut(ConnectionId, u64, &[u8]),
    ) -> usize {
        if self.aligned_heartbeats.is_none() {
            self.set_aligned_heartbeats(true);
        }
        let deadline = self.clock.now().saturating_add(timeout_ns);
        loop {
            let n = self.poll(&mut deliver);
            if n > 0 || self.clock.now() >= deadline {
                return n;
            }
            self.sleep_until(deadline);
        }
    }

    /// Sleeps until a descriptor of any connection or card is readable, the earliest timer of
    /// any connection is due, or `deadline`.
    fn sleep_until(&mut self, deadline: Nanos) {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let now = self.clock.now();
        // Only timers bound the wait: every connection looks at all its rails, quiet ones
        // included, before it (in `arm_for_sleep` below, or here on the simulator).
        let until = self.next_timer().map_or(deadline, |t| t.min(deadline));
        if until <= now {
            return;
        }
        let entries = || self.slots.iter().filter_map(|s| s.conn.as_ref());
        // A fabric without wake-up descriptors (the simulator) moves virtual time instead.
        if !entries().all(|e| e.conn.open_cards_wake()) {
            // The quiet cards' queues too: the last poll may have skipped them.
            let mut handled = self.poll_queues(now, u8::MAX);
            for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
                handled += e.conn.look_at_every_rail();
            }
            if handled > 0 {
                return;
            }
            self.waits += 1;
            self.clock.idle(until);
            return;
        }
        // The shared queues first: one arming (a system call at most) per queue, then one more
        // look, as a completion that came before the arming raises no wake-up.
        hear_news(&mut self.queues);
        for (rail, card) in self.queues.cards.iter_mut().enumerate() {
            for q in &mut card.queues {
                if let Err(e) = q.arm_wakeup() {
                    tracing::warn!(rail, error = %e, "arming a shared completion queue failed");
                }
            }
        }
        if self.poll_queues(self.clock.now(), u8::MAX) > 0 {
            return;
        }
        let mut armed = 0;
        for index in 0..self.slots.len() {
            let Some(e) = self.slots[index].conn.as_mut() else {
                continue;
            };
            if !e.conn.arm_for_sleep() {
                // Something arrived (or a sender committed): poll again instead of sleeping.
                for e in self.slots[..index]
                    .iter_mut()
                    .filter_map(|s| s.conn.as_mut())
                {
                    e.conn.cancel_sleep();
                }
                return;
            }
            armed += 1;
        }
        let mut set = Vec::with_capacity(self.cards.len() + 4 * armed);
        for card in self.cards.iter().flatten() {
            if let Some(fd) = card.event_fd() {
                set.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            }
        }
        let card_fds = set.len();
        for q in self.queues.cards.iter().flat_map(|c| &c.queues) {
            if let Some(fd) = q.wakeup_fd() {
                set.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            }
        }
        self.waits += 1;
        for e in self.slots.iter().filter_map(|s| s.conn.as_ref()) {
            e.conn
                .wake_fds(&mut |fd| set.push(PollFd::from_borrowed_fd(fd, PollFlags::IN)));
        }
        let card_event = if set.is_empty() {
            // No card open anywhere and nothing else to wait on: wait out the timer.
            self.clock.idle(until);
            false
        } else {
            let wait = until - now;
            let timeout = Timespec {
                tv_sec: (wait / 1_000_000_000) as _,
                tv_nsec: (wait % 1_000_000_000) as _,
            };
            match poll(&mut set, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => tracing::warn!(error = %e, "waiting for completions failed"),
            }
            // Every clock here (the connections' are copies) asks the OS at its next read.
            self.clock.woke();
            for e in self.slots.iter().filter_map(|s| s.conn.as_ref()) {
                e.conn.clock().woke();
            }
            set[..card_fds].iter().any(|p| !p.revents().is_empty())
        };
        // What the wait saw readable (usually a few): each is consumed, and only those.
        let mut readable: Vec<i32> = set
            .iter()
            .filter(|p| !p.revents().is_empty())
            .map(|p| p.as_fd().as_raw_fd())
            .collect();
        readable.sort_unstable();
        drop(set);
        let readable = |fd: BorrowedFd<'_>| readable.binary_search(&fd.as_raw_fd()).is_ok();
        for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
            e.conn.after_sleep(&readable);
        }
        for q in self.queues.cards.iter_mut().flat_map(|c| &mut c.queues) {
            if q.wakeup_fd().is_some_and(readable) {
                q.clear_wakeups();
            }
        }
        if card_event {
            self.next_card_events = 0; // read them at once (see `poll_cards`)
        }
        // Whatever woke it may be on a quiet card: the next poll looks at every one.
        self.quiet_rails_due = 0;
    }

    /// The next event of any connection, with its id. Connections take turns, so none starves
    /// the others.
    pub fn poll_event(&mut self) -> Option<(ConnectionId, Event)> {
        let n = self.slots.len();
        for k in 0..n {
            let index = (self.event_cursor + k) % n;
            let slot = &mut self.slots[index];
            let Some(e) = slot.conn.as_mut() else {
                continue;
            };
            if let Some(ev) = e.conn.poll_event() {
                self.event_cursor = (index + 1) % n;
                let id = ConnectionId {
                    index: index as u32,
                    generation: slot.generation,
                };
                return Some((id, ev));
            }
        }
        None
    }

    /// The earliest time any connection has a timer due (heartbeat, re-arm, close), for a caller
    /// that sleeps between polls.
    pub fn next_timeout(&self) -> Option<Nanos> {
        // Connections that left quiet rails unpolled, and the endpoint if it left a card's
        // queues unpolled, look at them together, at the endpoint's time for it.
        let quiet = (self.cards_owed || self.connections().any(|c| c.quiet_rails_owed()))
            .then_some(self.quiet_rails_due);
        [self.next_timer(), quiet].into_iter().flatten().min()
    }

    /// The earliest timer of any connection's core (heartbeat, re-arm, close).
    fn next_timer(&self) -> Option<Nanos> {
        self.connections().filter_map(|c| c.next_timer()).min()
    }

    /// Runs every connection's heartbeat ticks on multiples of the heartbeat interval (never
    /// later than they would run otherwise), so that their timers fall due together:
    /// [`Endpoint::next_timeout`] then moves about once per interval for all connections, not
    /// once per connection. [`Endpoint::poll_blocking`] turns this on unless it was chosen
    /// here; turn it on yourself when you sleep on the endpoint in a loop of your own. Off (the
    /// default for busy polling), the ticks stay spread, so that no single `poll` runs them
    /// all. Applies to every connection, those inserted later included; ticks already aligned
    /// stay together until their connections' schedules drift apart.
    pub fn set_aligned_heartbeats(&mut self, on: bool) {
        self.aligned_heartbeats = Some(on);
        for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
            e.conn.align_heartbeats(on);
        }
    }

    /// How many times [`Endpoint::poll_blocking`] went to sleep (until a descriptor was
    /// readable, a timer was due or its deadline): how often an idle endpoint wakes its thread.
    pub fn blocking_waits(&self) -> u64 {
        self.waits
    }

    /// Connection `id`'s counters.
    pub fn stats(&self, id: ConnectionId) -> Option<Stats> {
        self.get(id).map(|c| c.stats())
    }

    /// Starts closing every connection (see [`crate::Receiver::start_close`]): each ends by
    /// itself as the endpoint keeps being polled.
    pub fn start_close_all(&mut self, linger_ns: Nanos) {
        for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
            let _in = e.span.enter();
            e.conn.start_close(linger_ns);
        }
    }

    /// Whether this endpoint's connections share liveness with the other connections to the
    /// same peer endpoint (default: yes, when the peer's endpoint does too): one heartbeat per
    /// rail and interval from any of them proves that card pair's path for all, so control
    /// writes per second depend on the card pairs, not on the number of connections (see
    /// [`crate::liveness`]). Set before connections are made; those made already keep theirs.
    pub fn set_shared_liveness(&mut self, share: bool) {
        self.id = if share { random_id() } else { 0 };
    }

    /// What this endpoint's greetings say (0: no sharing).
    #[cfg_attr(not(any(feature = "verbs", feature = "test-util")), allow(dead_code))]
    pub(crate) fn liveness_id(&self) -> u64 {
        self.id
    }

    /// Every connection held.
    pub fn connections(&self) -> impl Iterator<Item = &Connection<N, C>> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.conn.as_ref().map(|e| &e.conn))
    }

    /// Polls the cards' shared completion queues, handing each completion to its connection, and
    /// reads the cards' device events (at most once per heartbeat interval), handing them to
    /// every connection. [`Endpoint::poll`] does this; call it yourself only when you drive the
    /// connections one by one instead (`get_mut(id)` and the connection's own `poll`), once per
    /// turn of your loop: a connection's own `poll` sees no completion of its links on the
    /// shared queues.
    pub fn poll_cards(&mut self) {
        // Every card: the busy ones are known only to `Endpoint::poll`, which polls the
        // connections itself.
        self.busy_cards = u8::MAX;
        self.poll_cards_at();
    }

    /// [`Endpoint::poll_cards`], returning the time it read and whether it looked at every
    /// card (once a period), not just the busy ones.
    fn poll_cards_at(&mut self) -> (Nanos, bool) {
        let now = self.clock.now();
        if now >= self.next_card_events {
            self.next_card_events = now + self.cfg.heartbeat_interval_ns();
            self.dispatch_card_events();
        }
        let mut cards = self.busy_cards;
        if now >= self.quiet_rails_due {
            self.quiet_rails_due = now.saturating_add(crate::runtime::QUIET_RAIL_POLL_NS);
            for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
                e.conn.look_at_every_rail_next();
            }
            cards = u8::MAX;
        }
        self.cards_owed = cards != u8::MAX;
        self.poll_queues(now, cards);
        (now, cards == u8::MAX)
    }

    /// Polls the shared completion queues of the cards in `cards` (a bit per rail) and hands
    /// each completion to its link's connection: how many there were.
    fn poll_queues(&mut self, now: Nanos, cards: u8) -> usize {
        hear_news(&mut self.queues);
        let mut handled = 0;
        for rail in 0..self.queues.cards.len() {
            if cards & (1 << rail) == 0 {
                continue;
            }
            let mut at = 0;
            while at < self.queues.cards[rail].queues.len() {
                let n = self.queues.cards[rail].queues[at].poll(&mut self.got);
                for i in 0..n {
                    self.route(rail, self.got[i], now);
                }
                handled += n;
                if n < self.got.len() {
                    at += 1;
                }
            }
        }
        handled
    }

    /// Hands `c`, from one of rail `rail`'s shared queues, to its link's connection.
    fn route(&mut self, rail: usize, c: SharedCompletion, now: Nanos) {
        // Twice at most: the second time after taking in the news (a link made, or one gone and
        // its number given to another, since the last look).
        for heard in [false, true] {
            if heard {
                hear_news(&mut self.queues);
            }
            match self.queues.cards[rail].routes.get_mut(&c.qpn) {
                Some(Route::Held(id)) => {
                    let id = *id;
                    let taken = self
                        .entry_mut(id)
                        .is_some_and(|e| e.conn.shared_completion(rail, c.qpn, c.completion, now));
                    if taken {
                        return;
                    }
                }
                Some(Route::Waiting { early, .. }) => return early.push(c.completion),
                None => {}
            }
        }
        tracing::trace!(
            rail,
            qpn = c.qpn,
            "leftover of a replaced queue pair dropped"
        );
    }

    /// How many shared completion queues the endpoint polls, over all its cards.
    pub fn completion_queues(&self) -> usize {
        self.queues.cards.iter().map(|c| c.queues.len()).sum()
    }

    /// Closes connection `id` gracefully and waits (see [`crate::Receiver::close`]): no new
    /// record is accepted, and it runs until the peer delivered every record sent, at most
    /// `linger_ns`, then the peer is told. The endpoint's other connections keep making progress
    /// meanwhile (what arrives for them is delivered at the next [`Endpoint::poll`]). A
    /// connection stays held, ended, until [`Endpoint::remove`]d.
    pub fn close(&mut self, id: ConnectionId, linger_ns: Nanos) -> Result<(), CloseError> {
        let start = self.clock.now();
        let Some(e) = self.entry_mut(id) else {
            return Err(CloseError::UnknownConnection);
        };
        let _in = e.span.enter();
        e.conn.start_close(linger_ns);
        drop(_in);
        let deadline = start
            .saturating_add(linger_ns)
            .saturating_add(self.cfg.heartbeat_timeout_ns());
        self.drive_until(deadline, |ep| ep.get(id).is_none_or(|c| c.close_finished()));
        match self.get(id) {
            Some(c) => c.close_outcome(),
            None => Err(CloseError::UnknownConnection),
        }
    }

    /// Makes every connection progress (delivering nothing) until `done` or `deadline`,
    /// sleeping in between.
    fn drive_until(&mut self, deadline: Nanos, done: impl Fn(&Self) -> bool) {
        loop {
            self.drive_once();
            if done(self) || self.clock.now() >= deadline {
                return;
            }
            self.sleep_until(deadline);
        }
    }

    /// One turn of every connection (completions, events, timers), delivering nothing.
    fn drive_once(&mut self) {
        self.poll_cards();
        for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
            let _in = e.span.enter();
            e.conn.progress();
        }
    }

    /// Reads each card's device events once and hands each to every connection on the card: a
    /// port going down fails that rail of every connection in this pass. (A queue pair's fatal
    /// error goes only to the connection that owns it: see [`crate::Receiver::card_event`].)
    fn dispatch_card_events(&mut self) {
        self.adopt_opened_cards();
        for rail in 0..self.cards.len() {
            while let Some(event) = self.cards[rail].as_ref().and_then(|c| c.poll_event()) {
                tracing::info!(rail, ?event, "card event");
                let fatal = event == AsyncEvent::DeviceFatal;
                // The pool lets go of the card first (a new opening, the old one's handle
                // dropped): a control thread woken below sees what it holds is stale.
                let epoch = fatal.then(|| self.queues.pool.forget_rail(rail));
                for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
                    // Not a connection whose rail runs on the user's card: it reads that card's
                    // events itself.
                    if e.conn.card_events_elsewhere && e.conn.on_endpoint_card(rail) {
                        let _in = e.span.enter();
                        e.conn.card_event(rail, event);
                    } else if fatal && e.conn.endpoint_rail(rail) {
                        // Released already, mid re-arm: its control thread may hold the card.
                        e.conn.endpoint_card_released();
                    }
                }
                if let Some(epoch) = epoch {
                    // Every connection let go of it; so does the endpoint, with its completion
                    // queues, so that the device can recover (the first re-arm, set-up or
                    // `prepare` to find it back opens it again for all).
                    self.cards[rail] = None;
                    self.queues.cards[rail] = CardQueues::new(epoch);
                }
            }
        }
    }

    /// Takes as its own each released card a connection's re-arm (or a set-up) opened again in
    /// the pool: the endpoint then reads its events for every connection on it, and opens
    /// nothing again for new ones. One load while none was.
    fn adopt_opened_cards(&mut self) {
        if !self.queues.pool.take_opened() {
            return;
        }
        for (rail, card) in self.cards.iter_mut().enumerate() {
            if card.is_none() {
                match self.queues.pool.try_card(rail) {
                    Some(opened) => *card = opened,
                    // A set-up holds the pool: not waited for; the next look takes it.
                    None => self.queues.pool.flag_opened(),
                }
            }
        }
    }

    fn entry_mut(&mut self, id: ConnectionId) -> Option<&mut Entry<N, C>> {
        let slot = self.slots.get_mut(id.index as usize)?;
        (slot.generation == id.generation)
            .then_some(slot.conn.as_mut())
            .flatten()
    }
}

/// Takes in what the set-ups did since the last look: new queues, links made and gone.
#[inline]
fn hear_news<N: Nic>(queues: &mut SharedQueues<N>) {
    if !queues.news.any() {
        return;
    }
    while let Some(news) = queues.news.next() {
        match news {
            QueueNews::Queue { rail, epoch, cq } if queues.cards[rail].epoch == epoch => {
                queues.cards[rail].queues.push(cq);
            }
            QueueNews::Link {
                rail,
                epoch,
                qpn,
                owner,
            } if queues.cards[rail].epoch == epoch => {
                let route = match queues.owners.get(&owner) {
                    Some(&id) => Route::Held(id),
                    None => Route::Waiting {
                        owner,
                        early: Vec::new(),
                    },
                };
                queues.cards[rail].routes.insert(qpn, route);
            }
            QueueNews::Gone { rail, epoch, qpn } if queues.cards[rail].epoch == epoch => {
                queues.cards[rail].routes.remove(&qpn);
            }
            _ => {} // about a card let go of (device fatal) since
        }
    }
}

impl<N: Nic, C: Clock> Drop for Endpoint<N, C> {
    /// Stops the listener, then closes every connection still running together (those on the
    /// shared queues would see nothing by themselves once the endpoint is gone), within one
    /// configured linger, taking in and closing the background set-ups that finish meanwhile. A
    /// set-up still under way after that ends without a goodbye: its peer sees the connection
    /// fail.
    fn drop(&mut self) {
        if let Some(incoming) = self.incoming.as_mut() {
            drop(incoming.listener.take()); // stopped and joined: no new clients
        }
        let linger = self.cfg.close_linger_ns();
        let deadline = self
            .clock
            .now()
            .saturating_add(linger)
            .saturating_add(self.cfg.heartbeat_timeout_ns());
        loop {
            while self.poll_connected().is_some() {}
            for e in self.slots.iter_mut().filter_map(|s| s.conn.as_mut()) {
                if !e.conn.close_finished() && !e.conn.core().is_closing() {
                    let _in = e.span.enter();
                    e.conn.start_close(linger);
                }
            }
            self.drive_once();
            if self.connections().all(|c| c.close_finished()) || self.clock.now() >= deadline {
                return;
            }
            self.sleep_until(deadline);
        }
    }
}

/// A random, non-zero id (std's hasher keys come from the OS's randomness).
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1
}

/// A set-up finished in the background: the connection, or why not.
pub(crate) type SetUp<N, C> = Result<Connection<N, C>, ConnectError>;

/// Connections being set up in the background, and the listener that takes clients.
pub(crate) struct Incoming<N: Nic, C: Clock> {
    pub(crate) ready: std::sync::mpsc::Receiver<SetUp<N, C>>,
    /// Where set-ups hand their results (each takes a clone).
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) results: std::sync::mpsc::Sender<SetUp<N, C>>,
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) listener: Option<Listening>,
}

impl<N: Nic, C: Clock> Incoming<N, C> {
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn new() -> Self {
        let (results, ready) = std::sync::mpsc::channel();
        Incoming {
            ready,
            results,
            listener: None,
        }
    }
}

/// A background listener's thread; stopped (and joined) when dropped.
pub(crate) struct Listening {
    pub(crate) stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Relaxed: a stop flag, seen within one wait of the listener's loop.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(feature = "test-util")]
pub use crate::sim::SimEndpoints;

#[cfg(test)]
mod tests {
    use crate::sim::SimEndpoints;

    /// The cards in the endpoint's pool (where verbs' background listener and dialler and the
    /// connections' re-arms take them) let go of a card the endpoint released on a device-fatal
    /// event (or the device could not recover while a set-up thread waits), and hold the card
    /// once it is opened again, the same handle the endpoint has.
    #[test]
    fn the_pool_lets_go_of_a_released_card_and_holds_the_reopened_one() {
        let cfg = crate::sim::small_endpoint_config();
        let mut hosts = SimEndpoints::new(cfg, 3, 2_000).unwrap();
        hosts.connect().unwrap();
        let pool = hosts.b.queue_pool();
        assert!(pool.card(0).is_some() && pool.card(1).is_some());
        let settle = |hosts: &mut SimEndpoints, until: u64| {
            while hosts.now() < until {
                hosts.step(until);
            }
        };
        settle(&mut hosts, 5_000_000);
        let card = hosts.cards[0].1.clone();
        hosts.fabric.remove_card(&card);
        settle(&mut hosts, 10_000_000);
        assert!(hosts.b.card(0).is_none(), "the endpoint let go");
        assert!(
            pool.card(0).is_none() && pool.card(1).is_some(),
            "so did the pool"
        );
        // (The harness's own handle on the card: one context open all along.)
        let before = hosts.fabric.open_contexts(&card);
        hosts.fabric.restore_card(&card);
        drop(hosts.b.prepare().unwrap()); // opens it again
        assert!(hosts.b.card(0).is_some());
        let contexts = hosts.fabric.open_contexts(&card);
        assert_eq!(
            contexts,
            before + 1,
            "the pool's card is the endpoint's handle"
        );
        assert!(pool.card(0).is_some(), "the set-up threads use it too");
    }
}
