//! Two connected endpoints on the deterministic simulated fabric, with a virtual clock: the basis of
//! the seeded simulation tests, the examples and the benchmark's `--fabric sim`.

use railover_rdma::sim::{SimFabric, SimNic, WireId};

use crate::config::Config;
use crate::core::Nanos;
use crate::runtime::{Clock, ConnectError, Connection, PendingConnection};

/// The fabric's virtual clock.
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
}

impl SimPair {
    pub fn new(cfg: Config, seed: u64, latency_ns: u64) -> Result<SimPair, ConnectError> {
        let fabric = SimFabric::new(seed);
        let mut wires = Vec::new();
        let mut cards = Vec::new();
        for r in 0..cfg.rails() {
            let (x, y, w) = fabric.add_wire(
                &format!("sim_r{r}_host1"),
                &format!("sim_r{r}_host2"),
                latency_ns,
            );
            wires.push(w);
            cards.push((x, y));
        }
        let pa = PendingConnection::new(
            cfg,
            cards.iter().map(|c| c.0.clone()).collect(),
            SimClock(fabric.clone()),
        )?;
        let pb = PendingConnection::new(
            cfg,
            cards.iter().map(|c| c.1.clone()).collect(),
            SimClock(fabric.clone()),
        )?;
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
        })
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

    /// Both sides make progress; re-arm requests are served (both sides of a rail re-arm together).
    pub fn progress(&mut self) {
        let (pa, pb) = (self.is_paused(false), self.is_paused(true));
        if !pa {
            self.a.progress();
        }
        if !pb {
            self.b.progress();
        }
        // A re-arm needs both processes running.
        if !pa && !pb && (self.a.has_rearm_request() || self.b.has_rearm_request()) {
            crate::runtime::serve_rearms(&mut self.a, &mut self.b);
        }
    }

    /// The next time anything can happen (fabric event or timer), capped at `limit`.
    pub fn next_deadline(&self, limit: Nanos) -> Nanos {
        let resume = |t: Nanos| (t > self.now()).then_some(t);
        [
            self.fabric.next_event_time(),
            // A paused host's timers wait for it to resume.
            self.a.next_timeout().filter(|_| !self.is_paused(false)),
            self.b.next_timeout().filter(|_| !self.is_paused(true)),
            resume(self.paused_until[0]),
            resume(self.paused_until[1]),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(limit)
        .min(limit)
        .max(self.now())
    }

    /// Advances virtual time to the next deadline (at most `limit`) and makes progress.
    pub fn step(&mut self, limit: Nanos) {
        let t = self.next_deadline(limit);
        self.fabric.advance_to(t);
        self.progress();
    }
}
