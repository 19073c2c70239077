//! Clients, a primary, a backup and the fabric in one process, in virtual time, driven by a seed:
//! any failure replays exactly from its seed (as in railover's own seeded simulation).
//!
//! Two server hosts ("slots") hold one replica each; the replication connection between them is a
//! real railover connection on the simulated fabric ([`railover::sim::SimPair`]), so rail faults
//! are absorbed by railover's failover underneath. Clients reach the servers over in-order
//! channels with random delays. A seed's fault schedule mixes:
//! - a crash of the primary at a chosen step of the request path (before an entry is
//!   replicated, before a reply leaves, just after one left) or at a random instant; either a
//!   stopped process (silent: the backup learns it from railover's session timeout) or a killed
//!   one (its cards gone: its connections fail at once);
//! - a crash of the backup (the primary holds replies until a new backup has joined);
//! - the crashed host restarting as a joining backup (state transfer: snapshot, then the log);
//! - rail faults on the replication connection (carrier loss, black hole, corruption);
//! - a partition: every rail of the replication connection cut while both replicas live. The
//!   backup takes over, the old primary stalls and is fenced (stopped) 5 ms later;
//! - client resend storms;
//! - client restarts: a new session under the same id (what the old run had unanswered is
//!   abandoned; replies to it that reach the new run are not taken).
//!
//! At the end, [`run`] checks that every request of every client was answered exactly once with
//! the reply the log gives it, that no request was applied twice, that a fresh service replaying
//! the log reaches the primary's state, and that the backup's state is the primary's.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use railover::core::Event;
use railover::sim::SimPair;
use railover::{Config, SendError};
use railover_rdma::LinkParams;
use railover_segq::Backing;

use crate::client::{Client, ClientError, ClientEvent};
use crate::matching::{OrderBook, OrderRequest, RiskLimits, Side};
use crate::node::{
    Action, BackupLoss, Journaled, Node, NodeConfig, NodeEvent, ReplicationMode, Role,
};
use crate::service::{Ctx, External, Rng, Service};
use crate::wire::Msg;

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

/// What one run does.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub clients: usize,
    pub requests_per_client: usize,
    /// Requests a client keeps outstanding.
    pub window: usize,
    /// A client waits up to this long (uniformly) between new requests.
    pub think_ns: u64,
    pub mode: ReplicationMode,
    /// Crash the primary (only with [`ReplicationMode::Sync`]: see its docs).
    pub primary_crashes: bool,
    pub backup_crashes: bool,
    pub rail_faults: bool,
    pub storms: bool,
    /// Restart client processes: a new session under the same id (what the old run had
    /// unanswered is abandoned, and never answered to the new run).
    pub client_restarts: bool,
    /// Cut every rail of the replication connection while both replicas live (only with
    /// [`ReplicationMode::Sync`]): the backup promotes itself, the old primary stalls and is
    /// fenced (stopped) a little later, as an operator or a fencing agent would.
    pub partitions: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            clients: 3,
            requests_per_client: 40,
            window: 4,
            think_ns: MS,
            mode: ReplicationMode::Sync,
            primary_crashes: true,
            backup_crashes: true,
            rail_faults: true,
            storms: true,
            client_restarts: true,
            partitions: true,
        }
    }
}

/// Where a primary crash hit the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CrashPoint {
    /// About to send an entry to the backup.
    BeforeReplication,
    /// About to send a reply (its entry acknowledged by the backup).
    BeforeReply,
    /// Just after a reply left.
    AfterReply,
    /// At a random instant.
    Anytime,
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub requests: u64,
    pub log_entries: u64,
    pub duplicate_replies: u64,
    pub redirects: u64,
    /// Requests that reached a new primary ahead of earlier ones (the client resent).
    pub out_of_order: u64,
    pub client_timeouts: u64,
    pub primary_crashes: BTreeMap<CrashPoint, u64>,
    pub backup_crashes: u64,
    pub promotions: u64,
    pub joins: u64,
    pub rail_faults: u64,
    pub rail_failovers: u64,
    pub partitions: u64,
    /// Old primaries stopped after a partition made the backup take over.
    pub fenced: u64,
    pub storms: u64,
    pub client_restarts: u64,
    /// Replies of an earlier run of a client that reached its new run (and were not taken).
    pub other_run_replies: u64,
    /// Longest time from a primary crash to the first reply from the promoted backup.
    pub takeover_ns: u64,
    pub virtual_ns: u64,
}

/// The venue's risk system: one, shared by both replicas (only a primary calls it).
#[derive(Clone)]
pub struct SharedRisk(pub Rc<RefCell<RiskLimits>>);

impl External for SharedRisk {
    fn call(&mut self, call: &[u8]) -> Vec<u8> {
        self.0.borrow_mut().call(call)
    }
}

type Replica = Node<OrderBook, SharedRisk>;

struct Slot {
    node: Option<Replica>,
    /// Applied entries as this replica's lineage sees them: the history it got with its snapshot,
    /// then its own journal.
    history: Vec<Journaled>,
    /// Killed (its connections reset) rather than stopped (silent).
    killed: bool,
    restart_at: Option<u64>,
    /// A primary crash waiting for its step of the request path.
    armed: Option<CrashPoint>,
    /// When this (old, stalled) primary is stopped, the other replica having taken over.
    fence_at: Option<u64>,
}

/// The replication connection: host 1 of the pair is the primary's slot.
struct Link {
    pair: SimPair,
    primary: usize,
    /// Global time when the pair's clock read 0.
    base: u64,
    /// Messages waiting for ring space: primary to backup, backup to primary.
    outbox: [VecDeque<Vec<u8>>; 2],
    ended: [bool; 2],
    /// Whether each side's end was handed to its replica.
    told: [bool; 2],
    /// When the first side's session ended (global time).
    first_end_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Delivery {
    ToServer {
        slot: usize,
        client: usize,
    },
    ToClient {
        client: usize,
        slot: usize,
    },
    /// The client's connection to `slot` was reset (the server process was killed).
    Reset {
        client: usize,
        slot: usize,
    },
    /// The client's backoff after a redirect or a reset is over: it resends.
    Retry {
        client: usize,
    },
}

/// A message or notice on a client channel: (arrival, order of sending, where, bytes).
type InFlight = (u64, u64, Delivery, Vec<u8>);

#[derive(Debug, Clone, Copy)]
enum Fault {
    CrashPrimary(CrashPoint, bool),
    CrashBackup(bool),
    Rail {
        rail: usize,
        kind: u8,
        duration: u64,
    },
    Storm {
        client: usize,
    },
    Partition,
    ClientRestart {
        client: usize,
    },
}

struct ClientHost {
    client: Client,
    rng: Rng,
    sent: usize,
    /// When the client sends its next new request (it thinks between orders).
    next_send_at: u64,
    /// First reply per sequence number.
    replies: BTreeMap<u64, Vec<u8>>,
    last_progress: u64,
    /// This run's session nonce.
    session: u64,
    /// Earlier runs of this client: (session, first reply per sequence number).
    earlier_runs: Vec<(u64, BTreeMap<u64, Vec<u8>>)>,
}

struct World {
    cfg: SimConfig,
    seed: u64,
    now: u64,
    rng: Rng,
    slots: [Slot; 2],
    link: Option<Link>,
    links_made: u64,
    clients: Vec<ClientHost>,
    channel: BinaryHeap<Reverse<InFlight>>,
    channel_order: u64,
    /// Last arrival per (direction, client, slot): channels deliver in order.
    last_arrival: BTreeMap<(bool, usize, usize), u64>,
    faults: Vec<(u64, Fault)>,
    rail_restores: Vec<(u64, u64, usize, u8)>,
    crashed_at: Option<u64>,
    report: Report,
    risk: SharedRisk,
    /// Every reply delivered to a client: (client id, seq, body).
    all_replies: Vec<(u64, u64, u64, Vec<u8>)>,
    /// Broken invariants seen on the way (a run fails with the first).
    errors: Vec<String>,
}

const CLIENT_TIMEOUT: u64 = 30 * MS;
const RESTART_DELAY: u64 = 10 * MS;
/// How long a stalled old primary lives on after the other replica took over, before it is
/// stopped.
const FENCE_DELAY: u64 = 5 * MS;
/// A client waits this long before retrying after a redirect or a reset connection.
const RETRY_BACKOFF: u64 = MS;

fn link_config() -> Config {
    Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .rearm_after(Duration::from_millis(5))
        .session_timeout(Duration::from_millis(20))
        .link_params(LinkParams {
            timeout: 8,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .backing(Backing::Heap)
        .build()
        .expect("valid replication link config")
}

fn node_config(mode: ReplicationMode) -> NodeConfig {
    NodeConfig {
        mode,
        backup_loss: BackupLoss::Stall,
        snapshot_chunk: 1024,
        max_request: 1024,
    }
}

/// Runs one seed; `Err` says which invariant broke (replay it with the same seed).
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, String> {
    let mut w = World::new(seed, *cfg);
    w.run().map_err(|e| format!("seed {seed}: {e}"))?;
    w.check().map_err(|e| format!("seed {seed}: {e}"))?;
    w.report.virtual_ns = w.now;
    Ok(w.report)
}

impl World {
    fn new(seed: u64, cfg: SimConfig) -> World {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let risk = SharedRisk(Rc::new(RefCell::new(RiskLimits::new(
            cfg.requests_per_client as u64 * 6,
        ))));
        let primary = Node::primary(
            node_config(cfg.mode),
            OrderBook::new(),
            risk.clone(),
            rng.next_u64(),
        );
        let backup = Node::joining(node_config(cfg.mode), risk.clone(), rng.next_u64());
        let slot = |mut node: Replica| {
            node.enable_journal();
            Slot {
                node: Some(node),
                history: Vec::new(),
                killed: false,
                restart_at: None,
                armed: None,
                fence_at: None,
            }
        };
        let clients = (0..cfg.clients)
            .map(|i| ClientHost {
                client: Client::new(i as u64 + 1, 2, 0),
                rng: Rng::new(rng.next_u64()),
                sent: 0,
                next_send_at: 0,
                replies: BTreeMap::new(),
                last_progress: 0,
                session: 0,
                earlier_runs: Vec::new(),
            })
            .collect();
        let mut faults = Vec::new();
        let at = |rng: &mut Rng| MS + rng.next_u64() % (25 * MS);
        let crashes = rng.next_u64() % 3; // 0, 1 or 2
        for _ in 0..crashes {
            let t = at(&mut rng);
            let killed = rng.next_u64() % 2 == 0;
            let primary = rng.next_u64() % 3 != 0;
            let fault = if primary && cfg.primary_crashes {
                let point = [
                    CrashPoint::BeforeReplication,
                    CrashPoint::BeforeReply,
                    CrashPoint::AfterReply,
                    CrashPoint::Anytime,
                ][(rng.next_u64() % 4) as usize];
                Fault::CrashPrimary(point, killed)
            } else if cfg.backup_crashes {
                Fault::CrashBackup(killed)
            } else {
                continue;
            };
            faults.push((t, fault));
        }
        if cfg.rail_faults {
            for _ in 0..rng.next_u64() % 4 {
                let t = at(&mut rng);
                faults.push((
                    t,
                    Fault::Rail {
                        rail: (rng.next_u64() % 2) as usize,
                        kind: (rng.next_u64() % 3) as u8,
                        duration: MS + rng.next_u64() % (10 * MS),
                    },
                ));
            }
        }
        if cfg.storms {
            for _ in 0..rng.next_u64() % 4 {
                let t = at(&mut rng);
                let client = (rng.next_u64() % cfg.clients as u64) as usize;
                faults.push((t, Fault::Storm { client }));
            }
        }
        if cfg.client_restarts && rng.next_u64() % 4 == 0 {
            let client = (rng.next_u64() % cfg.clients as u64) as usize;
            faults.push((at(&mut rng), Fault::ClientRestart { client }));
        }
        if cfg.partitions && cfg.mode == ReplicationMode::Sync && rng.next_u64() % 4 == 0 {
            faults.push((at(&mut rng), Fault::Partition));
        }
        faults.sort_by_key(|f| Reverse(f.0)); // popped from the end, earliest first
        let mut w = World {
            cfg,
            seed,
            now: 0,
            rng,
            slots: [slot(primary), slot(backup)],
            link: None,
            links_made: 0,
            clients,
            channel: BinaryHeap::new(),
            channel_order: 0,
            last_arrival: BTreeMap::new(),
            faults,
            rail_restores: Vec::new(),
            crashed_at: None,
            report: Report {
                seed,
                ..Report::default()
            },
            risk,
            all_replies: Vec::new(),
            errors: Vec::new(),
        };
        w.restarts(); // the first backup joins
        w
    }

    fn node(&mut self, slot: usize) -> Option<&mut Replica> {
        self.slots[slot].node.as_mut()
    }

    /// Connects the replication link from the primary in `primary` to the other slot.
    fn connect(&mut self, primary: usize) {
        self.links_made += 1;
        let pair = SimPair::new(
            link_config(),
            self.seed.wrapping_mul(31).wrapping_add(self.links_made),
            2 * US,
        )
        .expect("simulated replication link");
        self.link = Some(Link {
            pair,
            primary,
            base: self.now,
            outbox: [VecDeque::new(), VecDeque::new()],
            ended: [false; 2],
            told: [false; 2],
            first_end_at: None,
        });
    }

    fn clients_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.sent == self.cfg.requests_per_client && c.client.unanswered() == 0)
    }

    /// Every client has its replies, every fault has played out, and a backup has caught up
    /// with the primary (so that their states can be compared).
    fn done(&self) -> bool {
        let Some(p) = self.primary_slot() else {
            return false;
        };
        let caught_up = match (&self.slots[p].node, &self.slots[1 - p].node) {
            (Some(pn), Some(bn)) => {
                bn.role() == Role::Backup
                    && bn.applied() == pn.applied()
                    && pn.held() == 0
                    && pn.backup_live()
            }
            _ => false,
        };
        self.clients_done()
            && caught_up
            && self.faults.is_empty()
            && self.rail_restores.is_empty()
            && self
                .slots
                .iter()
                .all(|s| s.restart_at.is_none() && s.armed.is_none() && s.fence_at.is_none())
    }

    /// The primary's slot; after a partition, the one that took over (not the stalled one
    /// waiting to be fenced).
    fn primary_slot(&self) -> Option<usize> {
        let primary = |s: &usize| {
            self.slots[*s]
                .node
                .as_ref()
                .is_some_and(|n| n.role() == Role::Primary)
        };
        (0..2)
            .filter(primary)
            .find(|s| self.slots[*s].fence_at.is_none())
            .or_else(|| (0..2).find(primary))
    }

    fn run(&mut self) -> Result<(), String> {
        const LIMIT: u64 = 5_000 * MS;
        self.feed_clients();
        let mut steps = 0u64;
        while !self.done() {
            steps += 1;
            if self.now > LIMIT || steps > 2_000_000 {
                return Err(format!(
                    "stuck at {} ms: {}",
                    self.now / MS,
                    self.describe()
                ));
            }
            self.now = self.next_time(LIMIT).max(self.now);
            self.step_link();
            self.deliver_channel();
            self.fire_faults();
            self.unarm_idle();
            self.client_timers();
            self.restarts();
            for slot in 0..2 {
                self.execute(slot)?;
            }
            if let Some(e) = self.errors.first() {
                return Err(e.clone());
            }
            self.flush_link();
            self.feed_clients();
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let slot = |s: &Slot| match &s.node {
            Some(n) => format!(
                "{:?} applied {} held {} stalled {} backup live {}",
                n.role(),
                n.applied(),
                n.held(),
                n.stalled(),
                n.backup_live()
            ),
            None => "down".into(),
        };
        let unanswered: Vec<_> = self
            .clients
            .iter()
            .map(|c| (c.sent, c.client.unanswered(), c.client.server()))
            .collect();
        format!(
            "slot 0: {}; slot 1: {}; link: {}; clients (sent, unanswered, server): {unanswered:?}",
            slot(&self.slots[0]),
            slot(&self.slots[1]),
            self.link
                .as_ref()
                .map(|l| format!("primary {} ended {:?}", l.primary, l.ended))
                .unwrap_or("none".into())
        )
    }

    fn next_time(&self, limit: u64) -> u64 {
        let mut t = limit;
        if let Some(Reverse((at, ..))) = self.channel.peek() {
            t = t.min(*at);
        }
        if let Some(l) = &self.link {
            let pair_limit = t.saturating_sub(l.base);
            t = t.min(l.base + l.pair.next_deadline(pair_limit.max(l.pair.now())));
        }
        if let Some((at, _)) = self.faults.last() {
            t = t.min(*at);
        }
        for (at, ..) in &self.rail_restores {
            t = t.min(*at);
        }
        for s in &self.slots {
            for at in [s.restart_at, s.fence_at].into_iter().flatten() {
                t = t.min(at);
            }
        }
        for c in &self.clients {
            if c.sent < self.cfg.requests_per_client && c.client.unanswered() < self.cfg.window {
                t = t.min(c.next_send_at.max(self.now));
            }
            if c.client.unanswered() > 0 {
                t = t.min(c.last_progress + CLIENT_TIMEOUT);
            }
        }
        t
    }

    /// Moves the replication link to now: railover progresses, messages and events come out.
    fn step_link(&mut self) {
        /// How soon a running side must see its session end after its peer's did: past the
        /// session timeout (20 ms here) and a heartbeat timeout (3 ms).
        const END_SEEN_NS: u64 = 50 * MS;
        let Some(link) = &mut self.link else { return };
        let target = self.now - link.base;
        if target > link.pair.now() {
            link.pair.fabric.advance_to(target);
        }
        link.pair.progress();
        let primary = link.primary;
        let mut arrived: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for (host2, out) in arrived.iter_mut().enumerate() {
            let host2 = host2 == 1;
            if link.pair.is_paused(host2) || link.ended[host2 as usize] {
                continue;
            }
            let conn = if host2 {
                &mut link.pair.b
            } else {
                &mut link.pair.a
            };
            if conn.poll(|m| out.push(m.to_vec())).is_err() {
                link.ended[host2 as usize] = true;
            }
            while let Some(e) = conn.poll_event() {
                if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
                    eprintln!("link host{} {e:?}", host2 as u8 + 1);
                }
                match e {
                    Event::Ended { .. } => link.ended[host2 as usize] = true,
                    Event::Failover { .. } => self.report.rail_failovers += 1,
                    _ => {}
                }
            }
        }
        let ended = link.ended;
        let told = link.told;
        let paused = [link.pair.is_paused(false), link.pair.is_paused(true)];
        for (side, msgs) in arrived.into_iter().enumerate() {
            let slot = if side == 0 { primary } else { 1 - primary };
            if let Some(node) = self.node(slot) {
                for m in msgs {
                    node.on_replication(&m);
                }
            }
        }
        // A running side whose session ended learns, once, that its peer is gone. The link goes
        // once no side runs on it with its session up; until then the other side is driven on
        // and must see its own session end (its peer's end reaches it a poll later, or a
        // heartbeat timeout later: a partition's port events, an ended peer's silence).
        for side in 0..2 {
            let slot = if side == 0 { primary } else { 1 - primary };
            if !ended[side] || paused[side] || told[side] {
                continue;
            }
            let Some(node) = self.node(slot) else {
                continue;
            };
            match node.role() {
                Role::Primary => node.backup_lost(),
                Role::Backup => {
                    node.promote().expect("a synced backup promotes");
                    let old = 1 - slot;
                    let old_primary = self.slots[old]
                        .node
                        .as_ref()
                        .is_some_and(|n| n.role() == Role::Primary);
                    if old_primary {
                        // A partition, not a crash: the old primary lives on, stalled. It is
                        // stopped before it may take a backup again.
                        self.slots[old].fence_at = Some(self.now + FENCE_DELAY);
                    }
                    if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
                        eprintln!("{} us: slot {slot} promoted", self.now / US);
                    }
                    self.report.promotions += 1;
                }
                // A joining backup without its state can only wait for another primary.
                Role::Joining => {}
            }
        }
        let live_sides = (0..2).filter(|s| !ended[*s] && !paused[*s]).count();
        if !(ended[0] || ended[1]) {
            return;
        }
        if live_sides == 0 {
            self.link = None;
            return;
        }
        let now = self.now;
        let Some(link) = &mut self.link else { return };
        for side in 0..2 {
            link.told[side] |= ended[side] && !paused[side];
        }
        let first = *link.first_end_at.get_or_insert(now);
        if now - first > END_SEEN_NS {
            self.errors.push(format!(
                "{} us: one side's replication session ended at {} us, the other side runs on \
                 with its session up",
                now / US,
                first / US
            ));
        }
    }

    fn send_channel(&mut self, to_server: bool, client: usize, slot: usize, bytes: Vec<u8>) {
        let delay = 2 * US + self.rng.next_u64() % (20 * US);
        let key = (to_server, client, slot);
        let last = self.last_arrival.get(&key).copied().unwrap_or(0);
        let at = (self.now + delay).max(last);
        self.last_arrival.insert(key, at);
        let d = if to_server {
            Delivery::ToServer { slot, client }
        } else {
            Delivery::ToClient { client, slot }
        };
        self.channel_order += 1;
        self.channel
            .push(Reverse((at, self.channel_order, d, bytes)));
    }

    fn deliver_channel(&mut self) {
        while let Some(Reverse((at, ..))) = self.channel.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((_, _, d, bytes)) = self.channel.pop().expect("peeked");
            match d {
                Delivery::ToServer { slot, client } => {
                    let now = self.now;
                    let killed = self.slots[slot].killed;
                    match self.node(slot) {
                        Some(n) => n.on_client(&bytes, now),
                        None if killed => self.reset_client(client, slot),
                        None => {} // a stopped process: silence
                    }
                }
                Delivery::ToClient { client, slot } => self.client_message(client, slot, &bytes),
                Delivery::Reset { client, slot } => {
                    if self.clients[client].client.server() == slot {
                        self.clients[client].client.switch_server();
                        self.clients[client].last_progress = self.now;
                        self.retry_later(client);
                    }
                }
                Delivery::Retry { client } => {
                    self.clients[client].client.resend_all();
                    self.send_client_outbox(client);
                }
            }
        }
    }

    fn retry_later(&mut self, client: usize) {
        self.channel_order += 1;
        let at = self.now + RETRY_BACKOFF;
        self.channel.push(Reverse((
            at,
            self.channel_order,
            Delivery::Retry { client },
            Vec::new(),
        )));
    }

    fn reset_client(&mut self, client: usize, slot: usize) {
        self.channel_order += 1;
        let at = self.now + 50 * US;
        self.channel.push(Reverse((
            at,
            self.channel_order,
            Delivery::Reset { client, slot },
            Vec::new(),
        )));
    }

    fn client_message(&mut self, client: usize, slot: usize, bytes: &[u8]) {
        let now = self.now;
        // Every reply that reaches a client, from whichever server (also those it ignores,
        // from a server it has left), is checked against the log at the end.
        if let Ok(Msg::Reply {
            client: id,
            session,
            seq,
            body,
        }) = Msg::decode(bytes)
        {
            self.all_replies.push((id, session, seq, body));
        }
        let c = &mut self.clients[client];
        match c.client.on_message(slot, bytes) {
            Ok(Some(ClientEvent::Answered { seq, body })) => {
                c.replies.insert(seq, body);
                c.last_progress = now;
                if let Some(t) = self.crashed_at.take() {
                    self.report.takeover_ns = self.report.takeover_ns.max(now - t);
                }
            }
            Ok(Some(ClientEvent::Duplicate { seq, body })) => {
                self.report.duplicate_replies += 1;
                if c.replies.get(&seq) != Some(&body) {
                    // Checked at the end too, but say it where it happened.
                    c.replies.insert(seq | (1 << 63), body);
                }
            }
            Ok(Some(ClientEvent::Resent)) => self.report.out_of_order += 1,
            Ok(Some(ClientEvent::Refused { seq, why })) => self
                .errors
                .push(format!("client {client} request {seq} refused: {why:?}")),
            Ok(Some(ClientEvent::Redirected { .. })) => {
                self.report.redirects += 1;
                c.last_progress = now;
                self.retry_later(client);
            }
            Ok(None) => {}
            // A reply to an earlier run of this client (released after it restarted): the
            // client does not take it.
            Err(ClientError::OtherClient { client: id, .. }) if id == client as u64 + 1 => {
                self.report.other_run_replies += 1;
            }
            Err(e) => panic!("client {client} got a bad message: {e}"),
        }
        self.send_client_outbox(client);
    }

    fn send_client_outbox(&mut self, client: usize) {
        for (slot, bytes) in self.clients[client].client.take_outbox() {
            self.send_channel(true, client, slot, bytes);
        }
    }

    /// Keeps each client's window full.
    fn feed_clients(&mut self) {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            while c.sent < self.cfg.requests_per_client
                && c.client.unanswered() < self.cfg.window
                && c.next_send_at <= self.now
            {
                c.next_send_at = self.now + c.rng.next_u64() % self.cfg.think_ns.max(1);
                let req = random_order(&mut c.rng);
                if c.client.unanswered() == 0 {
                    c.last_progress = self.now;
                }
                c.client.request(req.encode());
                c.sent += 1;
                self.report.requests += 1;
            }
            self.send_client_outbox(i);
        }
    }

    fn client_timers(&mut self) {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.client.unanswered() > 0 && self.now >= c.last_progress + CLIENT_TIMEOUT {
                c.client.server_lost();
                c.last_progress = self.now;
                self.report.client_timeouts += 1;
                self.send_client_outbox(i);
            }
        }
    }

    fn fire_faults(&mut self) {
        while let Some(&(at, fault)) = self.faults.last() {
            if at > self.now {
                break;
            }
            match fault {
                Fault::CrashPrimary(point, killed) => {
                    // Only with a backup alive and following: a second fault before redundancy
                    // is back loses what only the primary had, which no primary/backup pair
                    // survives.
                    let Some(p) = self.redundant_primary() else {
                        self.postpone();
                        continue;
                    };
                    self.faults.pop();
                    if point == CrashPoint::Anytime {
                        *self.report.primary_crashes.entry(point).or_default() += 1;
                        self.crash(p, killed);
                    } else {
                        self.slots[p].armed = Some(point);
                        self.slots[p].killed = killed;
                    }
                }
                Fault::CrashBackup(killed) => {
                    self.faults.pop();
                    let Some(p) = self.primary_slot() else {
                        continue;
                    };
                    let b = 1 - p;
                    let backup = self.slots[b]
                        .node
                        .as_ref()
                        .is_some_and(|n| n.role() != Role::Primary);
                    if backup && self.slots[p].armed.is_none() {
                        self.report.backup_crashes += 1;
                        self.crash(b, killed);
                    }
                }
                Fault::Rail {
                    rail,
                    kind,
                    duration,
                } => {
                    // One rail fault at a time, and only with both rails up (as in railover's
                    // own seeds): losing every rail at once is a partition, which a
                    // primary/backup pair can't tell from a crash (see the README).
                    let redundant = self.link.as_ref().is_some_and(|l| {
                        !l.pair.a.core().any_rail_failed() && !l.pair.b.core().any_rail_failed()
                    });
                    let busy = !self.rail_restores.is_empty();
                    if self.link.is_some() && (busy || !redundant) {
                        self.postpone();
                        continue;
                    }
                    self.faults.pop();
                    if let Some(l) = &self.link {
                        let wire = l.pair.wires[rail];
                        match kind {
                            0 => l.pair.fabric.carrier_loss(wire),
                            1 => l.pair.fabric.black_hole(wire),
                            _ => l.pair.fabric.corrupt_next(wire, 1),
                        }
                        self.report.rail_faults += 1;
                        if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
                            eprintln!("{} us: rail {rail} fault {kind}", self.now / US);
                        }
                        self.rail_restores
                            .push((self.now + duration, self.links_made, rail, kind));
                    }
                }
                Fault::Partition => {
                    // Only with a backup following (a partition of a primary alone is nothing),
                    // and no other fault in progress.
                    let busy = !self.rail_restores.is_empty();
                    if self.redundant_primary().is_none() || busy {
                        self.postpone();
                        continue;
                    }
                    self.faults.pop();
                    let l = self.link.as_ref().expect("a backup follows over a link");
                    for wire in &l.pair.wires {
                        l.pair.fabric.carrier_loss(*wire);
                    }
                    self.report.partitions += 1;
                    if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
                        eprintln!("{} us: partition", self.now / US);
                    }
                }
                Fault::ClientRestart { client } => {
                    self.faults.pop();
                    self.report.client_restarts += 1;
                    let c = &mut self.clients[client];
                    let session = c.session + 1 + self.rng.next_u64() % 1000; // later runs: larger
                    let replies = std::mem::take(&mut c.replies);
                    c.earlier_runs.push((c.session, replies));
                    c.session = session;
                    c.client = Client::new(client as u64 + 1, 2, 0).with_session(session);
                    c.sent = 0;
                    c.last_progress = self.now;
                }
                Fault::Storm { client } => {
                    self.faults.pop();
                    self.report.storms += 1;
                    self.clients[client].client.resend_all();
                    self.send_client_outbox(client);
                }
            }
        }
        let now = self.now;
        let links_made = self.links_made;
        let link = &self.link;
        self.rail_restores.retain(|&(at, link_id, rail, kind)| {
            if at > now {
                return true;
            }
            if let (Some(l), true) = (link, link_id == links_made) {
                let wire = l.pair.wires[rail];
                match kind {
                    0 => l.pair.fabric.carrier_restore(wire),
                    1 => l.pair.fabric.clear_black_hole(wire),
                    _ => {}
                }
            }
            false
        });
    }

    /// The primary's slot, if a backup is alive and follows its log (as the primary sees it, and
    /// in fact: a stopped backup looks alive until railover's session timeout).
    fn redundant_primary(&self) -> Option<usize> {
        let p = self.primary_slot()?;
        let primary_sees = self.slots[p].node.as_ref()?.backup_live();
        let backup_is = self.slots[1 - p]
            .node
            .as_ref()
            .is_some_and(|n| n.role() == Role::Backup);
        (primary_sees && backup_is).then_some(p)
    }

    /// The next fault waits a millisecond.
    fn postpone(&mut self) {
        self.faults.last_mut().expect("a fault is due").0 = self.now + MS;
        self.faults.sort_by_key(|f| Reverse(f.0));
    }

    /// Whether an event breaks the run's invariants.
    fn broken(&self, e: &NodeEvent) -> Option<String> {
        match e {
            NodeEvent::Divergence { .. } | NodeEvent::Refused { .. } => Some(format!("{e:?}")),
            NodeEvent::Gap { .. } if self.cfg.mode == ReplicationMode::Sync => {
                Some(format!("{e:?}"))
            }
            _ => None,
        }
    }

    /// A primary crash armed for a step of the request path that no request will reach any more
    /// (the clients are done) happens now.
    fn unarm_idle(&mut self) {
        if !self.clients_done() {
            return;
        }
        for slot in 0..2 {
            if self.slots[slot].armed.take().is_some() && self.redundant_primary() == Some(slot) {
                *self
                    .report
                    .primary_crashes
                    .entry(CrashPoint::Anytime)
                    .or_default() += 1;
                let killed = self.slots[slot].killed;
                self.crash(slot, killed);
            }
        }
    }

    /// The process in `slot` dies: stopped (silent) or killed (its cards and connections gone).
    fn crash(&mut self, slot: usize, killed: bool) {
        if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
            eprintln!(
                "{} us: crash slot {slot} killed {killed}: {}",
                self.now / US,
                self.describe()
            );
        }
        let Some(mut node) = self.slots[slot].node.take() else {
            return;
        };
        while let Some(e) = node.poll_event() {
            if let Some(why) = self.broken(&e) {
                self.errors.push(format!("slot {slot} (crashing): {why}"));
            }
        }
        let journal = node.take_journal();
        self.slots[slot].history.extend(journal);
        self.slots[slot].killed = killed;
        self.slots[slot].armed = None;
        self.slots[slot].restart_at = Some(self.now + RESTART_DELAY);
        if node.role() == Role::Primary {
            self.crashed_at = Some(self.now);
        }
        if let Some(l) = &mut self.link {
            let host2 = (slot != l.primary) as usize;
            l.outbox[host2].clear();
            if killed {
                for (c1, c2) in l.pair.cards.clone() {
                    l.pair
                        .fabric
                        .remove_card(if host2 == 1 { &c2 } else { &c1 });
                }
            }
            l.pair.pause(host2 == 1, u64::MAX);
        }
        if killed {
            for c in 0..self.clients.len() {
                if self.clients[c].client.server() == slot {
                    self.reset_client(c, slot);
                }
            }
        }
    }

    /// A crashed host comes back as a joining backup, and joins once a primary is there.
    fn restarts(&mut self) {
        for slot in 0..2 {
            if self.slots[slot].fence_at.is_some_and(|t| t <= self.now) {
                self.slots[slot].fence_at = None;
                self.report.fenced += 1;
                self.crash(slot, true);
                self.crashed_at = None; // the takeover was the partition's, not this stop's
            }
        }
        for slot in 0..2 {
            if self.slots[slot].restart_at.is_some_and(|t| t <= self.now) {
                self.slots[slot].restart_at = None;
                let seed = self.rng.next_u64();
                let mut node = Node::joining(node_config(self.cfg.mode), self.risk.clone(), seed);
                node.enable_journal();
                self.slots[slot].node = Some(node);
                self.slots[slot].history.clear();
                self.slots[slot].killed = false;
            }
        }
        if self.link.is_some() {
            return;
        }
        let Some(p) = self.primary_slot() else { return };
        let b = 1 - p;
        if self.slots[b]
            .node
            .as_ref()
            .is_some_and(|n| n.role() == Role::Joining)
        {
            // The joiner's history is the primary's up to the snapshot.
            let journal = self.slots[p].node.as_mut().expect("primary").take_journal();
            self.slots[p].history.extend(journal);
            self.slots[b].history = self.slots[p].history.clone();
            self.connect(p);
            self.slots[p]
                .node
                .as_mut()
                .expect("primary")
                .attach_backup()
                .expect("the simulated state is small");
            if std::env::var_os("RAILOVER_REPLICA_TRACE").is_some() {
                eprintln!("{} us: join: {}", self.now / US, self.describe());
            }
            self.report.joins += 1;
        }
    }

    /// Carries out a replica's actions (a primary armed to crash dies at its step).
    fn execute(&mut self, slot: usize) -> Result<(), String> {
        loop {
            let Some(node) = self.slots[slot].node.as_mut() else {
                return Ok(());
            };
            while let Some(e) = node.poll_event() {
                let broken = match e {
                    NodeEvent::Divergence { .. } | NodeEvent::Refused { .. } => true,
                    NodeEvent::Gap { .. } => self.cfg.mode == ReplicationMode::Sync,
                    _ => false,
                };
                if broken {
                    return Err(format!("slot {slot}: {e:?}"));
                }
            }
            let Some(action) = node.pop_action() else {
                return Ok(());
            };
            let armed = self.slots[slot].armed;
            let crash_here = match (&action, armed) {
                (Action::ToBackup(b), Some(CrashPoint::BeforeReplication)) => {
                    matches!(b.get(1), Some(4)) // an entry, not a snapshot piece
                }
                (Action::ToClient { msg, .. }, Some(CrashPoint::BeforeReply)) => is_reply(msg),
                _ => false,
            };
            if crash_here && self.redundant_primary() != Some(slot) {
                // The backup went down since the crash was armed: no double fault.
                self.slots[slot].armed = None;
                continue;
            }
            if crash_here {
                let killed = self.slots[slot].killed;
                *self
                    .report
                    .primary_crashes
                    .entry(armed.expect("armed"))
                    .or_default() += 1;
                self.crash(slot, killed);
                return Ok(());
            }
            let reply = matches!(&action, Action::ToClient { msg, .. } if is_reply(msg));
            match action {
                Action::ToBackup(b) | Action::ToPrimary(b) => {
                    if let Some(l) = &mut self.link {
                        let side = (slot != l.primary) as usize;
                        l.outbox[side].push_back(b);
                    }
                }
                Action::ToClient { client, msg } => {
                    self.send_channel(false, client as usize - 1, slot, msg);
                }
            }
            if reply
                && armed == Some(CrashPoint::AfterReply)
                && self.redundant_primary() == Some(slot)
            {
                let killed = self.slots[slot].killed;
                *self
                    .report
                    .primary_crashes
                    .entry(CrashPoint::AfterReply)
                    .or_default() += 1;
                self.crash(slot, killed);
                return Ok(());
            }
        }
    }

    fn flush_link(&mut self) {
        let Some(l) = &mut self.link else { return };
        for side in 0..2 {
            if l.ended[side] || l.pair.is_paused(side == 1) {
                continue;
            }
            let conn = if side == 1 {
                &mut l.pair.b
            } else {
                &mut l.pair.a
            };
            while let Some(m) = l.outbox[side].front() {
                match conn.send(m) {
                    Ok(_) => {
                        l.outbox[side].pop_front();
                    }
                    Err(SendError::Backpressure) => break,
                    Err(e @ SendError::TooLarge { .. }) => panic!("replication message: {e}"),
                    Err(_) => break, // the session is ending: the link's end handles it
                }
            }
        }
    }

    /// The invariants, once every client has all its replies.
    fn check(&mut self) -> Result<(), String> {
        let p = self.primary_slot().ok_or("no primary at the end")?;
        let journal = self.slots[p].node.as_mut().expect("primary").take_journal();
        self.slots[p].history.extend(journal);
        let log = &self.slots[p].history;
        self.report.log_entries = log.len() as u64;
        // The log has no hole and applies no request twice.
        let mut seen = BTreeMap::new();
        for (i, e) in log.iter().enumerate() {
            if e.index != i as u64 + 1 {
                return Err(format!("log position {i} holds entry {}", e.index));
            }
            if let Some(first) = seen.insert((e.client, e.session, e.seq), e.index) {
                return Err(format!(
                    "request {}/{}/{} applied twice: entries {first} and {}",
                    e.client, e.session, e.seq, e.index
                ));
            }
        }
        // Every client got one reply per request, the one the log gives it.
        for (i, c) in self.clients.iter().enumerate() {
            let client = i as u64 + 1;
            // Every reply an earlier run got is the log's (what it had unanswered when it
            // restarted may or may not have been applied: once at most).
            for (session, replies) in &c.earlier_runs {
                if replies.keys().any(|s| s & (1 << 63) != 0) {
                    return Err(format!(
                        "client {client} (earlier run): a second reply differs"
                    ));
                }
                for (seq, got) in replies {
                    let idx = seen.get(&(client, *session, *seq)).ok_or(format!(
                        "client {client} (earlier run) request {seq} answered but not in the log"
                    ))?;
                    if &log[*idx as usize - 1].reply != got {
                        return Err(format!(
                            "client {client} (earlier run) request {seq}: reply differs"
                        ));
                    }
                }
            }
            for seq in 1..=self.cfg.requests_per_client as u64 {
                let got = c
                    .replies
                    .get(&seq)
                    .ok_or(format!("client {client} request {seq} never answered"))?;
                let idx = seen.get(&(client, c.session, seq)).ok_or(format!(
                    "client {client} request {seq} answered but not in the log"
                ))?;
                if &log[*idx as usize - 1].reply != got {
                    return Err(format!(
                        "client {client} request {seq}: reply differs from the log's"
                    ));
                }
            }
            if let Some((seq, _)) = c.replies.iter().find(|(s, _)| **s & (1 << 63) != 0) {
                return Err(format!(
                    "client {client} request {}: a second reply differs from the first",
                    seq & !(1 << 63)
                ));
            }
        }
        // Every reply any client received, from any server, is the log's.
        for (client, session, seq, body) in &self.all_replies {
            let idx = seen.get(&(*client, *session, *seq)).ok_or(format!(
                "client {client} got a reply to {seq}, which is not in the log"
            ))?;
            if &log[*idx as usize - 1].reply != body {
                return Err(format!(
                    "client {client} got a reply to {seq} that differs from the log's"
                ));
            }
        }
        // A fresh service replaying the log gives the same replies and the primary's state.
        let mut fresh = OrderBook::new();
        for e in log {
            let mut ctx = Ctx::replay(&e.recorded);
            let reply = fresh.apply(&mut ctx, e.client, &e.body);
            if reply != e.reply {
                return Err(format!("replaying entry {} gives another reply", e.index));
            }
            if let Some(m) = ctx.finish() {
                return Err(format!("replaying entry {}: {m:?}", e.index));
            }
        }
        let primary = self.slots[p].node.as_ref().expect("primary");
        if fresh.snapshot() != primary.service().expect("state").snapshot() {
            return Err("replaying the log does not reach the primary's state".into());
        }
        // The backup, caught up, holds the primary's state (service, sessions, records).
        if let Some(b) = self.slots[1 - p].node.as_ref() {
            if b.role() == Role::Backup && b.encode_state() != primary.encode_state() {
                return Err("backup state differs from the primary's".into());
            }
        }
        Ok(())
    }
}

/// Whether an encoded message is a reply (not a refusal or a redirect).
fn is_reply(msg: &[u8]) -> bool {
    matches!(Msg::decode(msg), Ok(Msg::Reply { .. }))
}

/// A random order: mostly new orders around 100, some cancels.
fn random_order(rng: &mut Rng) -> OrderRequest {
    let x = rng.next_u64();
    if x % 5 == 0 {
        OrderRequest::Cancel {
            order_id: 1 + (x >> 8) % 40,
        }
    } else {
        OrderRequest::New {
            side: if x % 2 == 0 { Side::Buy } else { Side::Sell },
            price: 95 + (x >> 16) % 11,
            qty: 1 + (x >> 24) % 10,
        }
    }
}
