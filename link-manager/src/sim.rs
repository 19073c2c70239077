//! Two connected endpoints on the deterministic simulated fabric, with a virtual clock: the basis of
//! the seeded simulation tests, the examples and the benchmark's `--fabric sim`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use railover_rdma::sim::{SimFabric, SimNic, WireId};

use crate::control::ControlChannel;
use crate::core::ResumeState;
use crate::rearm::Role;

use crate::config::Config;
use crate::core::Nanos;
use crate::endpoint::{ConnectionId, Endpoint};
use crate::runtime::{Clock, ConnectError, Connection, PendingConnection, RailCard};

/// The fabric's virtual clock.
#[derive(Clone)]
pub struct SimClock(SimFabric);

impl Clock for SimClock {
    fn now(&self) -> Nanos {
        self.0.now()
    }
    /// Jumps to the fabric's next event (a packet landing, say), or to the deadline.
    fn idle(&self, deadline: Nanos) {
        let next = self.0.next_event_time().unwrap_or(deadline).min(deadline);
        self.0.advance_to(next.max(self.0.now()));
    }
}

pub type SimConnection = Connection<SimNic, SimClock>;

/// Host 1 (`a`) and host 2 (`b`), one wire per rail.
pub struct SimPair {
    pub fabric: SimFabric,
    pub wires: Vec<WireId>,
    /// (host 1's card, host 2's card) per rail.
    pub cards: Vec<(SimNic, SimNic)>,
    pub a: SimConnection,
    pub b: SimConnection,
    /// Until when host 1 / host 2 is paused (its process stopped: it makes no progress, while its
    /// cards keep answering the wire, as a stopped process's NICs do).
    paused_until: [Nanos; 2],
    /// The control channel the hosts re-arm over, when they use one (else re-arms are served
    /// in-process by [`crate::runtime::serve_rearms`]).
    control: Option<SimControl>,
}

/// The simulated control channel between the two hosts (the TCP stream of a real set-up), in
/// virtual time: each direction delivers its bytes after its own delay, in order; it can carry
/// garbage or break, as a stream can.
#[derive(Clone)]
pub struct SimControl(Arc<Mutex<ControlState>>);

struct ControlState {
    now: Nanos,
    /// Bytes in flight towards host 1 (index 0) and host 2 (index 1), with their arrival times.
    queues: [VecDeque<(Nanos, Vec<u8>)>; 2],
    /// Delay of what host 1 (index 0) and host 2 (index 1) send.
    delay: [Nanos; 2],
    broken: bool,
    /// Streams so far after the first: an end holding an older one reads end-of-stream, as a
    /// process does on a TCP stream that was replaced.
    epoch: u64,
}

/// One host's end of a [`SimControl`].
struct SimControlEnd {
    host2: bool,
    state: SimControl,
    /// The stream this end holds.
    epoch: u64,
}

impl SimControl {
    fn new() -> SimControl {
        SimControl(Arc::new(Mutex::new(ControlState {
            now: 0,
            queues: [VecDeque::new(), VecDeque::new()],
            delay: [0; 2],
            broken: false,
            epoch: 0,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What host 1 (`from_host2` false) or host 2 sends arrives `ns` later from now on.
    pub fn set_delay(&self, from_host2: bool, ns: Nanos) {
        self.state().delay[from_host2 as usize] = ns;
    }

    /// Bytes no honest peer sends, towards host 2 (`to_host2`) or host 1.
    pub fn inject_garbage(&self, to_host2: bool, bytes: &[u8]) {
        let mut s = self.state();
        let now = s.now;
        s.queues[to_host2 as usize].push_back((now, bytes.to_vec()));
    }

    /// The stream breaks (both ends read end-of-stream).
    pub fn break_channel(&self) {
        self.state().broken = true;
    }

    /// A new stream can be set up from now on (the peer's address is reachable again): each end
    /// takes it when it reconnects; bytes in flight on the old one are gone.
    pub fn restore(&self) {
        let mut s = self.state();
        if s.broken {
            s.broken = false;
            s.epoch += 1;
            s.queues.iter_mut().for_each(|q| q.clear());
        }
    }

    /// Whether the stream is broken (not yet restored).
    pub fn is_broken(&self) -> bool {
        self.state().broken
    }

    fn set_now(&self, now: Nanos) {
        self.state().now = now;
    }

    fn next_arrival(&self) -> Option<Nanos> {
        let s = self.state();
        s.queues
            .iter()
            .filter_map(|q| q.front().map(|(t, _)| *t))
            .min()
    }
}

impl ControlChannel for SimControlEnd {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.state.state();
        if s.broken || s.epoch != self.epoch {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let at = s.now + s.delay[self.host2 as usize];
        // In order: never before what was sent earlier.
        let to = !self.host2 as usize;
        let at = s.queues[to].back().map_or(at, |(t, _)| at.max(*t));
        s.queues[to].push_back((at, bytes.to_vec()));
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.state.state();
        if s.broken || s.epoch != self.epoch {
            return Ok(0);
        }
        let now = s.now;
        let q = &mut s.queues[self.host2 as usize];
        match q.front_mut() {
            Some((t, bytes)) if *t <= now => {
                let n = bytes.len().min(buf.len());
                buf[..n].copy_from_slice(&bytes[..n]);
                bytes.drain(..n);
                if bytes.is_empty() {
                    q.pop_front();
                }
                Ok(n)
            }
            _ => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn shutdown(&mut self) {
        let mut s = self.state.state();
        if s.epoch == self.epoch {
            s.broken = true;
        }
    }

    fn reconnect(&mut self) -> std::io::Result<bool> {
        let s = self.state.state();
        if s.broken || s.epoch == self.epoch {
            return Ok(false); // no new stream yet
        }
        self.epoch = s.epoch;
        Ok(true)
    }
}

impl SimPair {
    pub fn new(cfg: Config, seed: u64, latency_ns: u64) -> Result<SimPair, ConnectError> {
        SimPair::new_with(cfg, seed, latency_ns, |_, _| {})
    }

    /// Like [`SimPair::new`], calling `before_connect` with the fabric and its wires (one per
    /// rail) once the cards exist and before the queue pairs are connected: to start with a wire
    /// down, say.
    pub fn new_with(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
        before_connect: impl FnOnce(&SimFabric, &[WireId]),
    ) -> Result<SimPair, ConnectError> {
        SimPair::build([cfg; 2], seed, latency_ns, None, None, before_connect)
    }

    /// Like [`SimPair::new`] with each host's own configuration (host 1's, host 2's): one side
    /// with a gray switch and the other without, say. The geometry must agree, as between two
    /// processes.
    pub fn with_configs(
        host1: Config,
        host2: Config,
        seed: u64,
        latency_ns: u64,
    ) -> Result<SimPair, ConnectError> {
        if host1.rails() != host2.rails() {
            return Err(ConnectError::RailCount {
                want: host1.rails(),
                got: host2.rails(),
            });
        }
        SimPair::build([host1, host2], seed, latency_ns, None, None, |_, _| {})
    }

    /// Like [`SimPair::new`] with one card missing when the connection is set up (host 2's if
    /// `host2`, of rail `rail`): it is removed from the fabric and its rail starts failed;
    /// [`SimFabric::restore_card`] brings it back (the pair's `cards` hold it).
    pub fn new_with_card_missing(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
        host2: bool,
        rail: usize,
    ) -> Result<SimPair, ConnectError> {
        SimPair::build(
            [cfg; 2],
            seed,
            latency_ns,
            None,
            Some((host2, rail)),
            |_, _| {},
        )
    }

    /// Two new endpoints continuing the streams of a pair whose session ended: host 1 resumes
    /// from `a` (its old side's [`crate::Receiver::resume_state`]), host 2 from `b`.
    pub fn new_resuming(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
        a: &ResumeState,
        b: &ResumeState,
    ) -> Result<SimPair, ConnectError> {
        SimPair::build([cfg; 2], seed, latency_ns, Some((a, b)), None, |_, _| {})
    }

    fn build(
        cfgs: [Config; 2],
        seed: u64,
        latency_ns: u64,
        resume: Option<(&ResumeState, &ResumeState)>,
        missing: Option<(bool, usize)>,
        before_connect: impl FnOnce(&SimFabric, &[WireId]),
    ) -> Result<SimPair, ConnectError> {
        let fabric = SimFabric::new(seed);
        let mut wires = Vec::new();
        let mut cards = Vec::new();
        for r in 0..cfgs[0].rails() {
            let (x, y, w) = fabric.add_wire(
                &format!("sim_r{r}_host1"),
                &format!("sim_r{r}_host2"),
                latency_ns,
            );
            wires.push(w);
            cards.push((x, y));
        }
        let side = |host2: bool| {
            let cards = cards
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    let card = if host2 { c.1.clone() } else { c.0.clone() };
                    card_at_start(&fabric, card, missing == Some((host2, r)))
                })
                .collect();
            let clock = SimClock(fabric.clone());
            let resume = resume.map(|(a, b)| if host2 { b } else { a });
            PendingConnection::with_cards(cfgs[host2 as usize], cards, clock, resume)
        };
        let (pa, pb) = (side(false)?, side(true)?);
        before_connect(&fabric, &wires);
        let (ha, hb) = (pa.hellos().to_vec(), pb.hellos().to_vec());
        let a = pa.connect(&hb)?;
        let b = pb.connect(&ha)?;
        Ok(SimPair {
            fabric,
            wires,
            cards,
            a,
            b,
            paused_until: [0; 2],
            control: None,
        })
    }

    /// Like [`SimPair::new`], with the hosts re-arming over a simulated control channel (host 1
    /// initiates), each inside its own `progress`, exactly as two processes do over TCP.
    pub fn with_control_channel(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
    ) -> Result<SimPair, ConnectError> {
        let mut p = SimPair::new(cfg, seed, latency_ns)?;
        p.use_control_channel();
        Ok(p)
    }

    /// From now on the hosts re-arm over a simulated control channel (see
    /// [`SimPair::with_control_channel`]).
    pub fn use_control_channel(&mut self) {
        let control = SimControl::new();
        for (host2, conn) in [(false, &mut self.a), (true, &mut self.b)] {
            let end = SimControlEnd {
                host2,
                state: control.clone(),
                epoch: 0,
            };
            let role = if host2 {
                Role::Acceptor
            } else {
                Role::Initiator
            };
            conn.attach_control_channel(Box::new(end), role);
        }
        self.control = Some(control);
    }

    /// Re-arm results reach each host's data path `lag_ns` after its executor has them, as
    /// with a control thread (frames, faults and the peer carry on meanwhile).
    pub fn set_handover_lag(&mut self, lag_ns: Nanos) {
        self.a.set_control_handover_lag(lag_ns);
        self.b.set_control_handover_lag(lag_ns);
    }

    /// The control channel, when the hosts re-arm over one.
    pub fn control(&self) -> Option<&SimControl> {
        self.control.as_ref()
    }

    /// Stops host 1 (`host2` false) or host 2 from running until `until` (virtual time): a
    /// paused, descheduled or SIGSTOPped process.
    pub fn pause(&mut self, host2: bool, until: Nanos) {
        self.paused_until[host2 as usize] = until;
    }

    /// Whether host 1 (`host2` false) or host 2 is paused now.
    pub fn is_paused(&self, host2: bool) -> bool {
        self.now() < self.paused_until[host2 as usize]
    }

    pub fn now(&self) -> Nanos {
        self.fabric.now()
    }

    /// The fabric and the two connections, for a caller that drives each host on its own (a
    /// server loop that owns its connection, say); time moves with [`SimFabric::advance_to`].
    pub fn into_parts(self) -> (SimFabric, SimConnection, SimConnection) {
        (self.fabric, self.a, self.b)
    }

    /// Both sides make progress; re-arm requests are served (both sides of a rail re-arm together).
    pub fn progress(&mut self) {
        let (pa, pb) = (self.is_paused(false), self.is_paused(true));
        if let Some(c) = &self.control {
            c.set_now(self.fabric.now());
        }
        if !pa {
            self.a.progress();
        }
        if !pb {
            self.b.progress();
        }
        // In-process re-arms need both processes running (over a channel, each side serves it
        // in its own progress).
        let in_process = self.control.is_none();
        if in_process && !pa && !pb && (self.a.has_rearm_request() || self.b.has_rearm_request()) {
            crate::runtime::serve_rearms(&mut self.a, &mut self.b);
        }
    }

    /// The next time anything can happen (fabric event or timer), capped at `limit`. (Out of
    /// line: `bench/instructions.sh` counts this scheduler's calls as the simulator's work.)
    #[inline(never)]
    pub fn next_deadline(&self, limit: Nanos) -> Nanos {
        let resume = |t: Nanos| (t > self.now()).then_some(t);
        let times = [
            self.fabric.next_event_time(),
            // A paused host's timers wait for it to resume.
            self.a.next_timeout().filter(|_| !self.is_paused(false)),
            self.b.next_timeout().filter(|_| !self.is_paused(true)),
            resume(self.paused_until[0]),
            resume(self.paused_until[1]),
            // (Bytes already due wait for a paused host to resume.)
            self.control
                .as_ref()
                .and_then(|c| c.next_arrival())
                .filter(|t| *t > self.now()),
        ];
        earliest(times, self.now(), limit)
    }

    /// Advances virtual time to the next deadline (at most `limit`) and makes progress.
    pub fn step(&mut self, limit: Nanos) {
        let t = self.next_deadline(limit);
        self.fabric.advance_to(t);
        self.progress();
    }

    /// Advances virtual time to the fabric's next event (at most `limit`), not to the hosts'
    /// timers, and makes no progress: for a caller that drives each host itself, as busy-polling
    /// processes do (the ping-pong benchmark: a host's `poll` makes its progress, and its timers
    /// fire in its first poll after them). In-process re-arms wait for a [`SimPair::progress`].
    pub fn advance_to_fabric_event(&mut self, limit: Nanos) {
        let t = earliest([self.fabric.next_event_time()], self.now(), limit);
        self.fabric.advance_to(t);
    }
}

/// Two hosts' [`Endpoint`]s on one simulated fabric (one wire per rail), with any number of
/// connections between them: what a gateway and its peer look like, in virtual time. Re-arms
/// are served in-process, both sides of a rail together (see [`crate::runtime::serve_rearms`]).
pub struct SimEndpoints {
    pub fabric: SimFabric,
    pub wires: Vec<WireId>,
    /// (host 1's card, host 2's card) per rail (the endpoints hold them too, until a
    /// device-fatal event).
    pub cards: Vec<(SimNic, SimNic)>,
    pub a: Endpoint<SimNic, SimClock>,
    pub b: Endpoint<SimNic, SimClock>,
    /// (host 1's id, host 2's id) of each connection, in the order they were made.
    pub pairs: Vec<(ConnectionId, ConnectionId)>,
}

/// A small configuration for the crate's own tests on endpoints: two rails, small rings, a
/// 1 ms heartbeat with 3 misses.
#[cfg(test)]
pub(crate) fn small_endpoint_config() -> crate::Config {
    crate::Config::builder()
        .rails(2)
        .geometry(4096, 8, 256)
        .heartbeat_interval(std::time::Duration::from_millis(1))
        .heartbeat_misses(3)
        .build()
        .expect("a valid configuration")
}

impl SimEndpoints {
    pub fn new(cfg: Config, seed: u64, latency_ns: u64) -> Result<SimEndpoints, ConnectError> {
        SimEndpoints::build(cfg, seed, latency_ns, None)
    }

    /// Like [`SimEndpoints::new`], with host 2's (`host2`) or host 1's card of `rail` removed
    /// before its endpoint opens the cards: the endpoint starts with it absent
    /// ([`Endpoint::with_cards`]). Restore it with [`SimFabric::restore_card`].
    pub fn new_with_card_missing(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
        host2: bool,
        rail: usize,
    ) -> Result<SimEndpoints, ConnectError> {
        SimEndpoints::build(cfg, seed, latency_ns, Some((host2, rail)))
    }

    fn build(
        cfg: Config,
        seed: u64,
        latency_ns: u64,
        missing: Option<(bool, usize)>,
    ) -> Result<SimEndpoints, ConnectError> {
        let fabric = SimFabric::new(seed);
        let (mut host1, mut host2, mut wires) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..cfg.rails() {
            let (x, y, w) = fabric.add_wire(
                &format!("sim_r{r}_host1"),
                &format!("sim_r{r}_host2"),
                latency_ns,
            );
            host1.push(x);
            host2.push(y);
            wires.push(w);
        }
        let clock = SimClock(fabric.clone());
        let cards: Vec<(SimNic, SimNic)> =
            host1.iter().cloned().zip(host2.iter().cloned()).collect();
        let side = |host2: bool, nics: Vec<SimNic>| -> Vec<RailCard<SimNic>> {
            (nics.into_iter().enumerate())
                .map(|(r, nic)| card_at_start(&fabric, nic, missing == Some((host2, r))))
                .collect()
        };
        let (cards1, cards2) = (side(false, host1), side(true, host2));
        Ok(SimEndpoints {
            cards,
            a: Endpoint::with_cards(cfg, cards1, clock.clone())?,
            b: Endpoint::with_cards(cfg, cards2, clock)?,
            fabric,
            wires,
            pairs: Vec::new(),
        })
    }

    /// A new connection between the two endpoints: (host 1's id, host 2's id).
    pub fn connect(&mut self) -> Result<(ConnectionId, ConnectionId), ConnectError> {
        let (pa, pb) = (self.a.prepare()?, self.b.prepare()?);
        let (ha, hb) = (pa.hellos().to_vec(), pb.hellos().to_vec());
        let (mut ca, mut cb) = (pa.connect(&hb)?, pb.connect(&ha)?);
        // What the greetings settle on real cards: both share liveness, or neither.
        let (ia, ib) = (self.a.liveness_id(), self.b.liveness_id());
        if ia != 0 && ib != 0 {
            ca.peer_endpoint = Some(ib);
            cb.peer_endpoint = Some(ia);
        }
        let pair = (self.a.insert(ca), self.b.insert(cb));
        self.pairs.push(pair);
        Ok(pair)
    }

    pub fn now(&self) -> Nanos {
        self.fabric.now()
    }

    /// Both endpoints make progress (nothing is delivered: see [`Endpoint::poll`] for that) and
    /// re-arm requests are served.
    pub fn progress(&mut self) {
        self.a.poll_cards();
        self.b.poll_cards();
        for &(x, y) in &self.pairs {
            let (Some(a), Some(b)) = (self.a.get_mut(x), self.b.get_mut(y)) else {
                continue;
            };
            a.progress();
            b.progress();
            if a.has_rearm_request() || b.has_rearm_request() {
                crate::runtime::serve_rearms(a, b);
            }
        }
    }

    /// The next time anything can happen (fabric event or timer), capped at `limit`. (Out of
    /// line: `bench/instructions.sh` counts this scheduler's calls as the simulator's work.)
    #[inline(never)]
    pub fn next_deadline(&self, limit: Nanos) -> Nanos {
        let times = [
            self.fabric.next_event_time(),
            self.a.next_timeout(),
            self.b.next_timeout(),
        ];
        earliest(times, self.now(), limit)
    }

    /// Advances virtual time to the next deadline (at most `limit`) and makes progress.
    pub fn step(&mut self, limit: Nanos) {
        let t = self.next_deadline(limit);
        self.fabric.advance_to(t);
        self.progress();
    }
}

/// A card as a host finds it at start: open, or (`missing`) removed from the fabric and absent.
fn card_at_start(fabric: &SimFabric, nic: SimNic, missing: bool) -> RailCard<SimNic> {
    if missing {
        fabric.remove_card(&nic);
        RailCard::Absent(railover_rdma::Nic::reopen_token(&nic))
    } else {
        RailCard::Open(nic)
    }
}

/// The earliest of `times` (none: `limit`), capped at `limit`, never before `now`.
fn earliest(times: impl IntoIterator<Item = Option<Nanos>>, now: Nanos, limit: Nanos) -> Nanos {
    times
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(limit)
        .min(limit)
        .max(now)
}
