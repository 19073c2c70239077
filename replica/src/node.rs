//! One replica (primary, backup or joining backup), sans I/O: it owns no connection, thread or
//! clock. The driver hands it what arrived (`on_client`, `on_replication`), tells it what the
//! replication connection did (`attach_backup`, `backup_lost`, `promote`) and carries out its
//! [`Action`]s; the simulation and a real process drive the same code.
//!
//! The request path on the primary:
//! 1. the **session manager** ([`Node::on_client`]) keeps, per client, the next sequence number
//!    and the replies not yet acknowledged by the client (the transaction records); a request it
//!    has seen is answered from them, never applied twice;
//! 2. the **dispatcher** applies a new request to the service with a recording [`Ctx`] and appends
//!    it to the input log (its index);
//! 3. the entry (input, recorded values, digest of the reply) goes to the backup;
//! 4. in synchronous mode the reply is held until the backup acknowledges the entry.
//!
//! The backup applies each entry with a replaying [`Ctx`], keeps the same records, and compares
//! its reply's digest with the primary's (the **verification engine**): a mismatch is a
//! [`NodeEvent::Divergence`].

use std::collections::{BTreeMap, VecDeque};

use crate::service::{Ctx, External, ReplayMismatch, RestoreError, Rng, Service};
use crate::wire::{
    DecodeError, Entry, Msg, Reader, Recorded, RefusedRequest, Request, SnapshotChunk, Writer,
    MAX_SNAPSHOT,
};

/// When a reply may leave the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// After the backup acknowledged the request's entry: a reply a client saw survives the
    /// primary's loss.
    Sync,
    /// At once, while the entry is on its way. Faster by the backup's round trip; if the primary
    /// dies before the entry reached the backup, a client may hold a reply the backup never
    /// produced: resent, that request is applied anew on the backup (with other times, prices and
    /// fills), and later requests may find a gap ([`NodeEvent::Gap`]).
    Async,
}

/// What a synchronous primary does when it loses its backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupLoss {
    /// Hold the replies of what was applied, and apply nothing new (new requests get
    /// [`Msg::NotPrimary`]), until a new backup has joined and acknowledged them. If the "lost"
    /// backup is in fact alive and promoted itself (a partition), this primary answers nothing
    /// more by itself. But it is not fenced: a backup that joins it later releases its held
    /// replies, so stop (fence) a stalled primary before any backup may join it once the other
    /// replica may have taken over.
    Stall,
    /// Release held replies and go on alone. Only safe if something outside (a fence, an
    /// operator) guarantees the backup will not promote itself.
    ContinueSolo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    pub mode: ReplicationMode,
    pub backup_loss: BackupLoss,
    /// Largest snapshot piece per message (keep it within the transport's record size).
    pub snapshot_chunk: usize,
    /// Largest request body; a larger one is refused before it is applied
    /// ([`RefusedRequest::TooLarge`]). Keep an entry (body, recorded values, ~60 bytes) within
    /// the transport's record size.
    pub max_request: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            mode: ReplicationMode::Sync,
            backup_loss: BackupLoss::Stall,
            snapshot_chunk: 1024,
            max_request: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
    /// A backup waiting for the primary's snapshot.
    Joining,
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// To the backup, over the replication connection.
    ToBackup(Vec<u8>),
    /// To the primary, over the replication connection.
    ToPrimary(Vec<u8>),
    /// To a client.
    ToClient { client: u64, msg: Vec<u8> },
}

/// Why a backup's reply differed from the primary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DivergenceKind {
    /// Same inputs, another reply.
    Digest { primary: u32, backup: u32 },
    /// The service used its context otherwise than on the primary.
    Replay(ReplayMismatch),
}

/// Where an unusable message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Client,
    Primary,
    Backup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// This backup is now the primary (solo until a backup joins), its log at `applied`.
    Promoted { applied: u64 },
    /// A joining backup has the state up to `index` and follows the log.
    BackupSynced { index: u64 },
    /// The replication connection to the backup is gone; `held` replies wait (see
    /// [`BackupLoss`]).
    BackupLost { held: usize },
    /// The verification engine found the backup's reply to entry `index` differs.
    Divergence {
        index: u64,
        client: u64,
        seq: u64,
        kind: DivergenceKind,
    },
    /// A client's request skipped sequence numbers (possible only after an asynchronous
    /// primary's loss; see [`ReplicationMode::Async`]).
    Gap {
        client: u64,
        expected: u64,
        got: u64,
    },
    /// A message was refused (and dropped); nothing accepted is lost.
    Refused { from: Peer, error: RefusedWhy },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusedWhy {
    Decode(DecodeError),
    /// A message this role does not take (an entry at a primary, say).
    Unexpected,
    /// An entry out of log order.
    OutOfOrder {
        expected: u64,
        got: u64,
    },
    /// An acknowledgement of entries not yet applied here.
    AckBeyondLog {
        acked: u64,
        applied: u64,
    },
    Snapshot(RestoreError),
}

/// Why [`Node::promote`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PromoteError {
    #[error("already the primary")]
    AlreadyPrimary,
    #[error("a joining backup has no complete state yet: it can't take over")]
    NotSynced,
    #[error("this backup diverged from the primary: its state can't be trusted to take over")]
    Diverged,
}

/// The state is too large to send to a joining backup ([`MAX_SNAPSHOT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state of {0} bytes exceeds the largest snapshot")]
pub struct StateTooLarge(pub usize);

/// One applied entry, for the simulation's checks ([`Node::enable_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journaled {
    pub index: u64,
    pub client: u64,
    pub session: u64,
    pub seq: u64,
    pub recorded: Vec<Recorded>,
    pub body: Vec<u8>,
    pub reply: Vec<u8>,
}

/// A client's session: its transaction records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Session {
    /// The client process's run these records belong to.
    session: u64,
    next_seq: u64,
    /// Replies of requests the client has not acknowledged yet, by sequence number, with the
    /// index of their entry.
    replies: BTreeMap<u64, (u64, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupState {
    None,
    /// The snapshot (at `index`) is on its way.
    Syncing {
        index: u64,
    },
    Live,
}

pub struct Node<S: Service, E: External> {
    cfg: NodeConfig,
    role: Role,
    service: Option<S>,
    external: E,
    rng: Rng,
    /// Index of the last entry applied here.
    applied: u64,
    sessions: BTreeMap<u64, Session>,
    /// Primary: replies of entries up to here may leave.
    released_through: u64,
    /// Primary: entries whose replies wait for `released_through`, in log order.
    held: VecDeque<(u64, u64, u64)>,
    backup: BackupState,
    /// Primary: how many times a backup was attached (the current one's epoch). Backup: its
    /// snapshot's epoch, which its acknowledgements carry.
    epoch: u64,
    /// Primary: the backup was lost under [`BackupLoss::Stall`]; replies wait for a new one.
    stalled: bool,
    /// Joining: the snapshot so far.
    incoming: Vec<u8>,
    ack_due: bool,
    /// Backup: an entry's replay did not match the primary's (it acknowledges nothing more and
    /// can't be promoted).
    diverged: bool,
    /// The latest time the service was given: a new primary's clock may be behind the old one's,
    /// and the time a service sees never goes back.
    last_time: u64,
    actions: VecDeque<Action>,
    events: VecDeque<NodeEvent>,
    journal: Option<Vec<Journaled>>,
}

impl<S: Service, E: External> Node<S, E> {
    /// The first primary, with the service's initial state and no backup yet (it is solo until
    /// one is attached, whatever [`BackupLoss`] says: there was never one to lose). Every backup,
    /// the first included, joins through [`Node::attach_backup`]: it starts from the primary's
    /// snapshot, never from a state assumed equal.
    pub fn primary(cfg: NodeConfig, service: S, external: E, seed: u64) -> Self {
        Node::new(cfg, Role::Primary, Some(service), external, seed)
    }

    /// A backup joining a running primary: it waits for the primary's snapshot.
    pub fn joining(cfg: NodeConfig, external: E, seed: u64) -> Self {
        Node::new(cfg, Role::Joining, None, external, seed)
    }

    fn new(cfg: NodeConfig, role: Role, service: Option<S>, external: E, seed: u64) -> Self {
        Node {
            cfg,
            role,
            service,
            external,
            rng: Rng::new(seed),
            applied: 0,
            sessions: BTreeMap::new(),
            released_through: 0,
            held: VecDeque::new(),
            backup: BackupState::None,
            stalled: false,
            epoch: 0,
            incoming: Vec::new(),
            ack_due: false,
            diverged: false,
            last_time: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            journal: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Index of the last entry applied here.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Replies applied but not yet released.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether a backup follows the log (its snapshot acknowledged).
    pub fn backup_live(&self) -> bool {
        self.backup == BackupState::Live
    }

    /// Whether this backup's replay diverged from the primary's (see [`NodeEvent::Divergence`]).
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    pub fn service(&self) -> Option<&S> {
        self.service.as_ref()
    }

    /// Keeps every applied entry for [`Node::take_journal`] (tests and simulation).
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    pub fn take_journal(&mut self) -> Vec<Journaled> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The next thing to send.
    pub fn pop_action(&mut self) -> Option<Action> {
        if self.ack_due {
            self.ack_due = false;
            let ack = Msg::Ack {
                epoch: self.epoch,
                applied: self.applied,
            };
            return Some(Action::ToPrimary(ack.encode()));
        }
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// A message from a client, at `now` (the primary's clock: what [`Ctx::now`] returns).
    pub fn on_client(&mut self, bytes: &[u8], now: u64) {
        match Msg::decode(bytes) {
            Ok(Msg::Request(r)) => self.on_request(r, now),
            Ok(_) => self.refuse(Peer::Client, RefusedWhy::Unexpected),
            Err(e) => self.refuse(Peer::Client, RefusedWhy::Decode(e)),
        }
    }

    /// A client's request, already decoded (a driver that looked at it first: see
    /// [`Node::on_client`]).
    pub fn on_request(&mut self, req: Request, now: u64) {
        if self.role != Role::Primary {
            return self.send_client(req.client, Msg::NotPrimary);
        }
        // Sequence numbers start at 1; every request below `answered_below` was answered, so it
        // can't pass the request itself.
        if req.seq == 0 || req.seq == u64::MAX || req.answered_below > req.seq {
            return self.refuse_request(&req, RefusedRequest::BadSequence);
        }
        let next_seq = match self.sessions.get(&req.client) {
            Some(s) if s.session == req.session => s.next_seq,
            // An earlier run's request (still on its way when the client restarted).
            Some(s) if req.session < s.session => {
                return self.refuse_request(&req, RefusedRequest::StaleSession);
            }
            // A later run of the client (or its first): it starts at 1, and the earlier run's
            // records are dropped when its first request is applied.
            _ => 1,
        };
        if req.seq < next_seq {
            // Seen before: answer from the records if the reply may leave; if it is held it
            // leaves when released; if it was trimmed the client already has it.
            let released = self.released_through;
            let stored = self
                .sessions
                .get(&req.client)
                .filter(|s| s.session == req.session)
                .and_then(|s| s.replies.get(&req.seq));
            if let Some((_, reply)) = stored.filter(|(index, _)| *index <= released) {
                let msg = Msg::Reply {
                    client: req.client,
                    session: req.session,
                    seq: req.seq,
                    body: reply.clone(),
                };
                self.send_client(req.client, msg);
            }
            return;
        }
        if req.body.len() > self.cfg.max_request {
            return self.refuse_request(&req, RefusedRequest::TooLarge);
        }
        if self.stalled {
            // Without a backup nothing new is applied (its external calls would be made twice
            // if the backup took over meanwhile): the client tries the other server, then here
            // again, until a backup has joined.
            return self.send_client(req.client, Msg::NotPrimary);
        }
        if req.seq > next_seq {
            let lost_replies =
                self.cfg.mode == ReplicationMode::Async && req.answered_below > next_seq;
            if !lost_replies {
                // The client still waits for the requests in between: they are on their way or
                // were refused (sent while this was a backup). Applying this one first would
                // reorder the client's requests.
                let msg = Msg::OutOfOrder {
                    client: req.client,
                    session: req.session,
                    expected: next_seq,
                };
                return self.send_client(req.client, msg);
            }
            // The client holds replies to requests this log never had: an asynchronous
            // primary's loss (see [`ReplicationMode::Async`]).
            self.events.push_back(NodeEvent::Gap {
                client: req.client,
                expected: next_seq,
                got: req.seq,
            });
        }
        self.dispatch(req, now);
    }

    fn send_client(&mut self, client: u64, msg: Msg) {
        self.actions.push_back(Action::ToClient {
            client,
            msg: msg.encode(),
        });
    }

    fn refuse_request(&mut self, req: &Request, why: RefusedRequest) {
        let msg = Msg::Refused {
            client: req.client,
            session: req.session,
            seq: req.seq,
            why,
        };
        self.send_client(req.client, msg);
    }

    /// The dispatcher: applies a new request, logs it, replicates it, releases or holds the reply.
    fn dispatch(&mut self, req: Request, now: u64) {
        let service = self.service.as_mut().expect("a primary has a state");
        let now = now.max(self.last_time);
        let mut recorded = Vec::new();
        let reply = {
            let mut ctx = Ctx::record(now, &mut self.rng, &mut self.external, &mut recorded);
            service.apply(&mut ctx, req.client, &req.body)
        };
        let index = self.applied + 1;
        let digest = crc32c::crc32c(&reply);
        let entry = Entry {
            index,
            client: req.client,
            session: req.session,
            seq: req.seq,
            answered_below: req.answered_below,
            recorded,
            digest,
            body: req.body,
        };
        // Encoded in place (no copy of the entry), then taken back to be recorded.
        let msg = Msg::Entry(entry);
        if self.backup != BackupState::None {
            self.actions.push_back(Action::ToBackup(msg.encode()));
        }
        let Msg::Entry(entry) = msg else {
            unreachable!("built as an entry")
        };
        self.record(&entry, reply);
        if self.replies_wait() {
            self.held.push_back((index, entry.client, entry.seq));
        } else {
            self.released_through = index;
            self.send_reply(entry.client, entry.seq);
        }
    }

    /// Whether a new reply must wait for the backup.
    fn replies_wait(&self) -> bool {
        self.cfg.mode == ReplicationMode::Sync && (self.backup != BackupState::None || self.stalled)
    }

    /// Appends an applied entry to the records (both roles): the session's next sequence number,
    /// its reply, and the trim the client allowed.
    fn record(&mut self, entry: &Entry, reply: Vec<u8>) {
        for r in &entry.recorded {
            if let Recorded::Time(t) = r {
                self.last_time = self.last_time.max(*t);
            }
        }
        let session = self.sessions.entry(entry.client).or_default();
        if session.session != entry.session {
            *session = Session {
                session: entry.session,
                ..Session::default()
            };
        }
        session.next_seq = entry.seq.saturating_add(1);
        session.replies = session.replies.split_off(&entry.answered_below);
        if let Some(j) = &mut self.journal {
            j.push(Journaled {
                index: entry.index,
                client: entry.client,
                session: entry.session,
                seq: entry.seq,
                recorded: entry.recorded.clone(),
                body: entry.body.clone(),
                reply: reply.clone(),
            });
        }
        session.replies.insert(entry.seq, (entry.index, reply));
        self.applied = entry.index;
    }

    fn send_reply(&mut self, client: u64, seq: u64) {
        let session = self.sessions.get(&client);
        if let Some((s, (_, reply))) = session.and_then(|s| Some((s, s.replies.get(&seq)?))) {
            let msg = Msg::Reply {
                client,
                session: s.session,
                seq,
                body: reply.clone(),
            };
            self.send_client(client, msg);
        }
    }

    /// Releases held replies up to entry `index`.
    fn release_through(&mut self, index: u64) {
        self.released_through = self.released_through.max(index);
        while let Some(&(i, client, seq)) = self.held.front() {
            if i > self.released_through {
                break;
            }
            self.held.pop_front();
            self.send_reply(client, seq);
        }
    }

    /// A message over the replication connection (from the primary if this is a backup, from
    /// the backup if this is the primary).
    pub fn on_replication(&mut self, bytes: &[u8]) {
        let from = match self.role {
            Role::Primary => Peer::Backup,
            _ => Peer::Primary,
        };
        let msg = match Msg::decode(bytes) {
            Ok(m) => m,
            Err(e) => return self.refuse(from, RefusedWhy::Decode(e)),
        };
        match (self.role, msg) {
            // An acknowledgement from a backup attached before the current one (its messages
            // still on their way) says nothing about the current one: ignored.
            (Role::Primary, Msg::Ack { epoch, .. }) if epoch != self.epoch => {}
            (Role::Primary, Msg::Ack { applied, .. }) => self.on_ack(applied),
            (Role::Backup, Msg::Entry(e)) => self.apply_entry(e),
            (Role::Joining, Msg::Snapshot(c)) => self.on_snapshot_chunk(c),
            _ => self.refuse(from, RefusedWhy::Unexpected),
        }
    }

    fn on_ack(&mut self, acked: u64) {
        if acked > self.applied {
            return self.refuse(
                Peer::Backup,
                RefusedWhy::AckBeyondLog {
                    acked,
                    applied: self.applied,
                },
            );
        }
        if let BackupState::Syncing { index } = self.backup {
            if acked < index {
                return;
            }
            self.backup = BackupState::Live;
            self.events.push_back(NodeEvent::BackupSynced { index });
        }
        if self.cfg.mode == ReplicationMode::Sync {
            self.release_through(acked);
        }
    }

    /// The backup's side of the request path: apply with the primary's values and compare.
    fn apply_entry(&mut self, e: Entry) {
        let expected = self.applied.saturating_add(1);
        if e.index != expected || self.applied == u64::MAX {
            return self.refuse(
                Peer::Primary,
                RefusedWhy::OutOfOrder {
                    expected,
                    got: e.index,
                },
            );
        }
        let service = self.service.as_mut().expect("a backup has a state");
        let mut ctx = Ctx::replay(&e.recorded);
        let reply = service.apply(&mut ctx, e.client, &e.body);
        let mismatch = ctx.finish();
        let digest = crc32c::crc32c(&reply);
        let kind = match mismatch {
            Some(m) => Some(DivergenceKind::Replay(m)),
            None if digest != e.digest => Some(DivergenceKind::Digest {
                primary: e.digest,
                backup: digest,
            }),
            None => None,
        };
        if let Some(kind) = kind {
            // Never acknowledged: in synchronous mode the primary then holds the reply until a
            // backup that agrees has joined; this one can't take over.
            self.diverged = true;
            self.events.push_back(NodeEvent::Divergence {
                index: e.index,
                client: e.client,
                seq: e.seq,
                kind,
            });
        }
        self.record(&e, reply);
        self.ack_due = !self.diverged;
    }

    fn on_snapshot_chunk(&mut self, c: SnapshotChunk) {
        if c.offset == 0 {
            // A new transfer (a primary that re-attached this backup).
            self.incoming.clear();
            self.epoch = c.epoch;
        }
        if c.offset as usize != self.incoming.len() || c.epoch != self.epoch {
            return self.refuse(
                Peer::Primary,
                RefusedWhy::OutOfOrder {
                    expected: self.incoming.len() as u64,
                    got: c.offset as u64,
                },
            );
        }
        self.incoming.extend_from_slice(&c.bytes);
        if self.incoming.len() < c.total as usize {
            return;
        }
        let state = std::mem::take(&mut self.incoming);
        match decode_state::<S>(&state) {
            Ok((applied, last_time, service, sessions)) if applied == c.index => {
                self.applied = applied;
                self.last_time = last_time;
                self.service = Some(service);
                self.sessions = sessions;
                self.role = Role::Backup;
                self.ack_due = true;
            }
            Ok((applied, ..)) => self.refuse(
                Peer::Primary,
                RefusedWhy::OutOfOrder {
                    expected: c.index,
                    got: applied,
                },
            ),
            Err(e) => self.refuse(Peer::Primary, RefusedWhy::Snapshot(e)),
        }
    }

    /// A new backup is connected (its replication connection up): it gets the state as of now,
    /// then every later entry. Replaces any earlier backup.
    pub fn attach_backup(&mut self) -> Result<(), StateTooLarge> {
        assert_eq!(self.role, Role::Primary, "only a primary takes a backup");
        let state = self.encode_state();
        if state.len() > MAX_SNAPSHOT as usize {
            return Err(StateTooLarge(state.len()));
        }
        self.epoch += 1;
        let total = state.len() as u32;
        for (i, piece) in state.chunks(self.cfg.snapshot_chunk.max(1)).enumerate() {
            let chunk = SnapshotChunk {
                epoch: self.epoch,
                index: self.applied,
                total,
                offset: (i * self.cfg.snapshot_chunk.max(1)) as u32,
                bytes: piece.to_vec(),
            };
            self.actions
                .push_back(Action::ToBackup(Msg::Snapshot(chunk).encode()));
        }
        self.backup = BackupState::Syncing {
            index: self.applied,
        };
        self.stalled = false;
        Ok(())
    }

    /// Whether replies are held for want of a backup (see [`BackupLoss::Stall`]).
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// The replication connection to the backup ended.
    pub fn backup_lost(&mut self) {
        if self.role != Role::Primary || self.backup == BackupState::None {
            return;
        }
        self.backup = BackupState::None;
        self.actions.retain(|a| !matches!(a, Action::ToBackup(_)));
        self.events.push_back(NodeEvent::BackupLost {
            held: self.held.len(),
        });
        match self.cfg.backup_loss {
            BackupLoss::Stall if self.cfg.mode == ReplicationMode::Sync => self.stalled = true,
            _ => self.release_through(self.applied),
        }
    }

    /// The backup takes over (its replication connection reported the primary gone): from now on
    /// it answers clients, from its records for requests it has seen.
    pub fn promote(&mut self) -> Result<(), PromoteError> {
        match self.role {
            Role::Primary => Err(PromoteError::AlreadyPrimary),
            Role::Joining => Err(PromoteError::NotSynced),
            Role::Backup if self.diverged => Err(PromoteError::Diverged),
            Role::Backup => {
                self.role = Role::Primary;
                self.ack_due = false;
                self.actions.retain(|a| !matches!(a, Action::ToPrimary(_)));
                // Everything here was applied by the primary, which is gone: it may all leave.
                self.released_through = self.applied;
                self.events.push_back(NodeEvent::Promoted {
                    applied: self.applied,
                });
                Ok(())
            }
        }
    }

    fn refuse(&mut self, from: Peer, error: RefusedWhy) {
        self.events.push_back(NodeEvent::Refused { from, error });
    }

    /// The replicated state: log position, service snapshot, sessions.
    pub fn encode_state(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.u64(self.applied);
        w.u64(self.last_time);
        w.bytes(&self.service.as_ref().map(S::snapshot).unwrap_or_default());
        w.u32(self.sessions.len() as u32);
        for (client, s) in &self.sessions {
            w.u64(*client);
            w.u64(s.session);
            w.u64(s.next_seq);
            w.u32(s.replies.len() as u32);
            for (seq, (index, reply)) in &s.replies {
                w.u64(*seq);
                w.u64(*index);
                w.bytes(reply);
            }
        }
        w.0
    }
}

type State<S> = (u64, u64, S, BTreeMap<u64, Session>);

fn decode_state<S: Service>(bytes: &[u8]) -> Result<State<S>, RestoreError> {
    let bad = |e: DecodeError| RestoreError(e.to_string());
    let mut r = Reader(bytes);
    let applied = r.u64().map_err(bad)?;
    let last_time = r.u64().map_err(bad)?;
    let service = S::restore(&r.bytes().map_err(bad)?)?;
    let mut sessions = BTreeMap::new();
    for _ in 0..r.u32().map_err(bad)? {
        let client = r.u64().map_err(bad)?;
        let session = r.u64().map_err(bad)?;
        let next_seq = r.u64().map_err(bad)?;
        let mut replies = BTreeMap::new();
        for _ in 0..r.u32().map_err(bad)? {
            let seq = r.u64().map_err(bad)?;
            let index = r.u64().map_err(bad)?;
            replies.insert(seq, (index, r.bytes().map_err(bad)?));
        }
        sessions.insert(
            client,
            Session {
                session,
                next_seq,
                replies,
            },
        );
    }
    if !r.is_empty() {
        return Err(RestoreError(format!("{} bytes left over", r.0.len())));
    }
    Ok((applied, last_time, service, sessions))
}
