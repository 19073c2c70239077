//! The failover state machine, sans I/O (in the manner of quinn-proto): it owns the rings and the
//! rail states but no sockets, threads or clocks. A driver feeds it completions, device events and
//! the time, and carries out the [`Io`] it asks for. The deterministic simulation drives it through
//! thousands of fault schedules; the verbs runtime drives it over real NICs. Same code.
//!
//! Per rail, each side has: a send ring (its outgoing stream, used while the rail is the active
//! one), a mirror ring (the peer's stream, consumed whenever data arrives on the rail), and a
//! control slot pair (heartbeat + acknowledgement + fault reports, see [`crate::ctrl`]).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use railover_rdma::{AsyncEvent, Completion, CompletionKind, WcStatus};
use railover_segq::{
    LaneControl, LaneError, LaneWriter, MirrorQueue, PushError, Region, Reservation, SendQueue,
    StreamCursor, NOTIFY_BITS,
};

use crate::config::{Config, RailMode, MAX_RAILS};
use crate::ctrl::{
    CtrlBlock, CTRL_CRC_OFFSET, CTRL_LEN, STATUS_ACK_NOW, STATUS_AVOIDING_SHIFT, STATUS_CLOSED,
    STATUS_ENDED, STATUS_LIVE, STATUS_MASK,
};

/// Virtual or real time in nanoseconds, from the driver's clock.
pub type Nanos = u64;

/// What a rail is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RailState {
    /// Carries this side's outgoing stream.
    Active,
    /// Connected and heart-beating, ready to take over.
    Standby,
    /// Failed; waiting to be re-armed.
    Failed,
}

/// Why a rail was declared failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// A work request completed in error (retry exceeded, flushed, remote access...).
    Completion(WcStatus),
    PortDown,
    DeviceFatal,
    QpFatal,
    /// The peer's heartbeat stopped arriving (silent black hole).
    HeartbeatMiss,
    /// The peer reported the rail failed (over another rail).
    PeerReport,
    /// A record failed its crc, length or sequence check at this receiver.
    Corruption,
    /// The peer sent something no honest peer would (impossible ack or notification).
    Protocol,
    /// The driver re-armed a rail that this side still thought healthy.
    Rearm,
    /// The rail could not be connected when the connection was set up (a wire or port down at
    /// start-up); it joins later through re-arm.
    Unreachable,
}

/// Why a session ended. After it, `send` and `poll` fail with this reason and
/// [`Core::unacked`] lists every record accepted but not known delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// Every rail failed.
    AllRailsDown,
    /// The peer stayed unresponsive (every rail silent) for the whole session timeout.
    SessionTimeout,
    /// This side closed the connection.
    Closed,
    /// The peer closed its connection gracefully.
    PeerClosed,
    /// The peer's session ended (it timed out or lost every rail) and it said so.
    PeerEnded,
}

/// What a refused write into the lanes means for the sender.
pub fn send_error_of(e: LaneError) -> SendError {
    match e {
        LaneError::Push(PushError::TooLarge { len, max }) => SendError::TooLarge { len, max },
        LaneError::Push(PushError::Full) | LaneError::Switching => SendError::Backpressure,
        LaneError::Push(PushError::BatchTooLarge { bytes, room }) => {
            SendError::BatchTooLarge { bytes, room }
        }
        LaneError::Closed(code) => closed_send_error(code),
        // Through the public API a connection's own sends and a split writer never coexist
        // (`split` consumes the connection); a caller of the core that mixes them is told so.
        LaneError::WriterElsewhere => SendError::WriterElsewhere,
    }
}

/// An [`EndReason`] as the code the send lanes are closed with (a split sender reads it).
pub fn reason_code(r: EndReason) -> u8 {
    match r {
        EndReason::AllRailsDown => 1,
        EndReason::SessionTimeout => 2,
        EndReason::Closed => 3,
        EndReason::PeerClosed => 4,
        EndReason::PeerEnded => 5,
    }
}

/// The [`SendError`] for lanes closed with `code` (see [`reason_code`]).
pub fn closed_send_error(code: u8) -> SendError {
    match code {
        2 => SendError::Ended(EndReason::SessionTimeout),
        3 => SendError::Ended(EndReason::Closed),
        4 => SendError::Ended(EndReason::PeerClosed),
        5 => SendError::Ended(EndReason::PeerEnded),
        _ => SendError::AllRailsDown,
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndReason::AllRailsDown => "every rail is down",
            EndReason::SessionTimeout => "the peer was unresponsive for the whole session timeout",
            EndReason::Closed => "the connection was closed",
            EndReason::PeerClosed => "the peer closed the connection",
            EndReason::PeerEnded => "the peer ended the session",
        })
    }
}

/// What happened, for the user (also logged with `tracing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    RailDown {
        rail: usize,
        reason: FailReason,
        at: Nanos,
    },
    /// Unacknowledged records moved from `from` to the standby `to` and are being resent.
    Failover {
        from: usize,
        to: usize,
        records: usize,
        bytes: usize,
        at: Nanos,
    },
    /// The peer acknowledged the first record sent over the new rail.
    FailoverComplete { rail: usize, blackout_ns: Nanos },
    /// A re-armed rail is the new standby.
    RailUp { rail: usize, at: Nanos },
    /// No rail is left: sending and receiving now fail.
    AllRailsDown { at: Nanos },
    /// Every rail went silent at once: the peer is not running (paused, descheduled, stopped), or
    /// every wire failed together. Nothing is failed over; sends queue; traffic resumes by itself
    /// when the peer answers, or the session ends after the session timeout.
    PeerUnresponsive { at: Nanos },
    /// The peer answered again after being unresponsive for `silent_ns`.
    PeerResponsive { silent_ns: Nanos, at: Nanos },
    /// The re-arm channel to the peer broke: failed rails can't be re-armed until it is back
    /// ([`Event::RearmChannelRestored`]; the connection re-establishes it by itself where it can).
    RearmChannelLost { at: Nanos },
    /// A new re-arm channel is in place: failed rails are re-armed again.
    RearmChannelRestored { at: Nanos },
    /// The session is over (for every reason; [`Event::AllRailsDown`] also comes for that one).
    Ended { reason: EndReason, at: Nanos },
    /// A planned switch of the active rail while both rails work (no failure): `from` stays a
    /// standby. What `from` had posted was delivered first (it stopped posting until the peer
    /// said so); `records` moved to `to`, of which `resent` had been posted on `from` already
    /// (0 unless the drain outlasted its deadline).
    Switched {
        from: usize,
        to: usize,
        reason: SwitchReason,
        records: usize,
        resent: usize,
        at: Nanos,
    },
    /// A planned switch was given up: its target failed (or was re-armed) during the drain, or
    /// could not take the records (the active rail stays active).
    SwitchAbandoned { from: usize, to: usize, at: Nanos },
}

/// Why a planned switch happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SwitchReason {
    /// The active rail's write-completion latency exceeded the standby's by more than the
    /// configured margin for the configured window (gray failure).
    Degraded {
        active_latency_ns: Nanos,
        standby_latency_ns: Nanos,
    },
    /// The active rail's card retransmitted at least the configured number of times in one
    /// window (a lossy link), the standby's fewer.
    Retransmitting { active: u64, standby: u64 },
    /// The peer left this rail by a planned switch of its own (its side of the wire was slow or
    /// lossy, and the wire carries both directions): this side follows it.
    PeerLeft { rail: usize },
}

/// Which registered buffer of a rail an [`RdmaWrite`] reads, and the peer's it targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The ring (local: this side's send ring; remote: the peer's mirror of it).
    Ring,
    /// The control slot (local: what this side sends; remote: the peer's slot for it).
    Ctrl,
}

/// An RDMA write (with immediate when `imm` is set) for the driver to post on `rail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaWrite {
    pub rail: usize,
    pub wr_id: u64,
    /// The buffer read here and written at the peer: the ring into its mirror, or the control
    /// block into its slot.
    pub buf: Buf,
    /// The same offset on both sides (a mirror has its ring's geometry).
    pub offset: usize,
    pub len: usize,
    pub imm: Option<u32>,
    /// Whether it completes on success (see [`SIGNAL_EVERY`]); it always does in error.
    pub signaled: bool,
}

/// Work for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Post an RDMA write.
    Write(RdmaWrite),
    /// Post `count` receives on `rail` (they catch write-with-immediate notifications).
    PostRecvs { rail: usize, count: u32 },
    /// Move the rail's queue pair to the error state (flush what is outstanding).
    ShutDown { rail: usize },
    /// Connect a fresh queue pair pair on this rail (with the peer), then call
    /// [`Core::rail_rearmed`] on both sides.
    Rearm { rail: usize },
}

/// A data write (the ring's bytes into the peer's mirror, with the immediate that announces
/// them), as [`Core::poll_new_data`] hands it over without an [`Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataWrite {
    pub write: RdmaWrite,
    /// Whether it carries every record committed when it was taken (else more wait to go).
    pub reaches_commit: bool,
}

/// A send that could not be accepted. Nothing accepted earlier is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("message of {len} bytes exceeds the maximum record size {max}")]
    TooLarge { len: usize, max: usize },
    #[error("send ring full: the peer has not acknowledged enough yet (back-pressure)")]
    Backpressure,
    /// A batch that could not fit in the ring even with everything acknowledged: split it.
    /// Nothing was queued.
    #[error(
        "batch of {bytes} ring bytes can never fit ({room} from the ring's position): split it"
    )]
    BatchTooLarge { bytes: usize, room: usize },
    #[error("every rail is down; records accepted but unacknowledged are available via unacked()")]
    AllRailsDown,
    #[error("session ended: {0}; records accepted but unacknowledged are available via unacked()")]
    Ended(EndReason),
    #[error("the connection was split: send through its Sender")]
    WriterElsewhere,
    #[error("no such connection on this endpoint (removed, or never made here)")]
    UnknownConnection,
    /// `send_timeout` on a connection of an [`crate::Endpoint`] whose ring is full: only the
    /// endpoint's `poll` frees space (its completions come through the endpoint), so it can't
    /// wait here. Nothing was queued.
    #[error("the ring is full and only the endpoint's poll frees space: send and poll there")]
    DrivenByEndpoint,
}

/// Receiving failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    #[error("every rail is down")]
    AllRailsDown,
    #[error("session ended: {0}")]
    Ended(EndReason),
    #[error("receive buffer of {len} bytes is smaller than the maximum record size {max}")]
    BufferTooSmall { len: usize, max: usize },
    /// A blocking receive on a connection of an [`crate::Endpoint`]: its completions come through
    /// the endpoint's shared completion queues, so wait with [`crate::Endpoint::poll_blocking`].
    #[error("the connection is driven by its endpoint: wait with Endpoint::poll_blocking")]
    DrivenByEndpoint,
}

/// Counters a user can read at any time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    pub sent: u64,
    pub delivered: u64,
    pub duplicates_discarded: u64,
    pub failovers: u64,
    pub records_resent: u64,
    pub bytes_resent: u64,
    pub last_blackout_ns: Option<Nanos>,
    /// Every blackout (failover to the first record the peer acknowledged over the new rail),
    /// by size: bucket 0 counts those under 2 us (0 included: a hot-hot failover), bucket k
    /// those from 2^k to 2^(k+1) us, the last everything from 2^23 us (8.4 s) up. See
    /// [`Stats::blackout_quantile`].
    pub blackouts: [u64; BLACKOUT_BUCKETS],
    pub rail_states: [Option<RailState>; MAX_RAILS],
    /// RDMA writes posted carrying records (several small records coalesce into one).
    pub data_writes: u64,
    /// RDMA writes posted carrying control blocks (heartbeats, acknowledgements, reports).
    pub control_writes: u64,
    /// Write completions handled (writes are signaled selectively: see [`SIGNAL_EVERY`]).
    pub write_completions: u64,
    /// Bytes of the data writes (records and padding, every rail): the wire cost of the stream.
    pub data_bytes: u64,
    /// Data writes posted on standbys (hot-hot copies; padding after a planned switch).
    pub standby_writes: u64,
    /// Planned switches of the active rail (gray failure), and ones abandoned.
    pub planned_switches: u64,
    pub abandoned_switches: u64,
    /// Per rail: the moving average of its write-completion latency (0: no sample yet).
    pub rail_latency_ns: [Nanos; MAX_RAILS],
    /// Per rail: data writes, their bytes, and control writes posted on it.
    pub rail_data_writes: [u64; MAX_RAILS],
    pub rail_data_bytes: [u64; MAX_RAILS],
    pub rail_control_writes: [u64; MAX_RAILS],
    /// Events dropped, oldest first, because nobody read them (the queue holds 1,024; the
    /// counters above still count everything).
    pub events_dropped: u64,
    /// Polls (`progress`) that ran the whole turn: timers, posting, the control plane, every
    /// rail. A busy loop's idle steady state runs one per quiet-rail period
    /// ([`crate::runtime::QUIET_RAIL_POLL_NS`]); the others stop at the nothing-due check.
    /// (Counted by the connection's driver; the core alone leaves it 0.)
    pub full_turns: u64,
}

/// Buckets of [`Stats::blackouts`].
pub const BLACKOUT_BUCKETS: usize = 24;

impl Stats {
    fn record_blackout(&mut self, ns: Nanos) {
        self.last_blackout_ns = Some(ns);
        self.blackouts[blackout_bucket(ns)] += 1;
    }

    /// An upper bound of the `q`-quantile (0.0..=1.0) of the blackouts so far: the top of its
    /// bucket, within a factor of two (None: no failover completed yet).
    pub fn blackout_quantile(&self, q: f64) -> Option<Nanos> {
        let total: u64 = self.blackouts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (k, &n) in self.blackouts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(if k + 1 == BLACKOUT_BUCKETS {
                    Nanos::MAX
                } else {
                    (2_000u64 << k) - 1
                });
            }
        }
        None
    }
}

/// Which bucket of [`Stats::blackouts`] a blackout of `ns` goes in.
fn blackout_bucket(ns: Nanos) -> usize {
    let us = ns / 1_000;
    if us < 2 {
        0
    } else {
        (us.ilog2() as usize).min(BLACKOUT_BUCKETS - 1)
    }
}

/// Events kept for the user before the oldest is dropped (and counted).
const MAX_EVENTS: usize = 1024;

const KIND_DATA: u64 = 1;
const KIND_CTRL: u64 = 2;
/// The last control block of a session that ended (status closed or ended).
const KIND_BYE: u64 = 3;

fn wr_id(generation: u16, kind: u64, rail: usize) -> u64 {
    ((generation as u64) << 16) | (kind << 8) | rail as u64
}

/// One data write in this many asks for a completion (and so does every control write, and a
/// data write that would leave the send queue half full): a completion reports every write
/// before it on its queue pair (RC completes in order), so the others need none, and the NIC
/// writes and the driver polls a completion per batch instead of per write. Errors complete
/// whether signaled or not.
pub const SIGNAL_EVERY: u32 = 16;

/// A signaled write's id also says how many unsignaled writes before it its completion reports.
fn covering(wr_id: u64, unsignaled: u32) -> u64 {
    wr_id | ((unsignaled.min(0xffff) as u64) << 32)
}

fn wr_covered(wr_id: u64) -> u32 {
    ((wr_id >> 32) & 0xffff) as u32
}

fn wr_generation(wr_id: u64) -> u16 {
    (wr_id >> 16) as u16
}

fn wr_kind(wr_id: u64) -> u64 {
    (wr_id >> 8) & 0xff
}

/// The write of a rail's control block (already stored in its `ctrl_out`) into the peer's slot:
/// signaled, reporting the `unsignaled` data writes before it.
fn ctrl_write(rail: usize, generation: u16, kind: u64, unsignaled: u32) -> Io {
    Io::Write(RdmaWrite {
        rail,
        wr_id: covering(wr_id(generation, kind, rail), unsignaled),
        buf: Buf::Ctrl,
        offset: 0,
        len: CTRL_LEN,
        imm: None,
        signaled: true,
    })
}

struct Rail {
    rx: MirrorQueue,
    ctrl_out: Arc<Region>,
    ctrl_in: Arc<Region>,
    state: RailState,
    generation: u16,
    /// The last heartbeat number the peer sent on this rail (0: none since it (re)connected).
    peer_heartbeat: u64,
    /// The highest heartbeat number heard on any rail when this one (re)connected: the beats it
    /// is measured against start there.
    beat_floor: u64,
    peer_seen_at: Nanos,
    outstanding: u32,
    /// Writes posted unsignaled since the last signaled one (outstanding until it completes).
    unsignaled: u32,
    /// A data write posted since the last heartbeat tick: its immediate carried the heartbeat
    /// number, so the tick's control block may be skipped (see [`Core::check_liveness`]).
    beat_in_data: bool,
    /// The beat of the last block this side posted on this rail since it (re)connected (0: none
    /// yet, so the peer has no full beat number from it: no block is skipped until there is).
    block_beat: u64,
    /// The latest beat this side conveyed on this rail, by a block or carried by a data write:
    /// the peer reads a write's carried low bits against it (see [`BEAT_REFRESH`]).
    conveyed_beat: u64,
    /// The peer's data arrived on this rail since the last block that brought a new beat: the
    /// peer may skip its next block here (its next data write carries the beat).
    data_since_block: bool,
    recv_credits: u32,
    ctrl_due: bool,
    reported_consumed: u64,
    failed_at: Nanos,
    port_active: bool,
    rearm_requested: bool,
    last_failure: Option<FailReason>,
    /// Writes with immediate posted on this rail (each consumes one of the peer's receives).
    imm_posted: u64,
    /// How many of them the peer reported processed (its receives are replenished by then).
    peer_notified: u64,
    /// Notifications this side processed on this rail, and the count last reported (by a block,
    /// or by the credit bits of its data writes).
    notified: u64,
    reported_notified: u64,
    /// The notifications this side's data writes on this rail announced by their credit bits
    /// ([`CREDIT_QUANTUM`] each), and those the peer's announced.
    carried_notified: u64,
    peer_carried: u64,
    /// What the last block posted here said was delivered, and which rails had failed (with
    /// `reported_consumed` and `reported_notified`: a heartbeat block without news may be
    /// skipped when liveness is shared, see [`SharedLiveness`]).
    reported_delivered: u64,
    reported_fault_gens: u64,
    /// The rails the last block said this side avoids (see [`Core::avoiding`]).
    reported_avoiding: u8,
    /// The rails the peer's last block on this rail said it avoids, and that block's beat.
    peer_avoiding: u8,
    peer_avoiding_beat: u64,
    /// The peer's control block as last processed: an unchanged block is not decoded again
    /// (processing it is idempotent; the crc alone was a quarter of a round trip's work).
    ctrl_seen: [u64; 7],
    /// Signaled writes posted and completed since the rail (re)connected: RC completes them in
    /// order, so the n-th completion is the n-th signaled write's.
    signaled_posted: u64,
    signaled_done: u64,
    /// The signaled write being timed (its number and when it was posted): one at a time, the
    /// next one posted after its completion (a few instructions per write, no queue).
    probe: Option<(u64, Nanos)>,
    /// Moving average of the write-completion latency (weight 1/4: one write is timed at a
    /// time, so samples are few); 0 until the first sample past the warm-up.
    latency_ns: Nanos,
    /// Completions since the rail (re)connected: the first [`LATENCY_WARMUP`] are not samples.
    completions: u32,
    /// A planned switch left this rail: no later one chooses it before this time.
    avoid_until: Nanos,
    /// The card's RC retransmission counter as last reported by the driver, where it was at
    /// the start of the current window (None: not reported yet), and the count of the last
    /// complete window.
    retransmissions: u64,
    retransmissions_base: Option<u64>,
    retransmissions_in_window: u64,
    /// This side drains the rail (a planned switch) and asks the peer to acknowledge at once.
    ack_request: bool,
    /// The peer drains its stream on this rail: acknowledge each consumption at once.
    peer_wants_ack: bool,
}

/// Completions of a fresh connection that don't count as latency samples: its first writes wait
/// for address resolution and the like (3-22 ms on rxe against ~1 ms after).
const LATENCY_WARMUP: u32 = 8;

/// A planned switch under way: the active rail posts nothing new until the peer delivered what
/// it posted (then the rest moves to `to` and nothing is sent twice).
#[derive(Debug, Clone, Copy)]
struct Switch {
    to: usize,
    reason: SwitchReason,
    deadline: Nanos,
}

/// A data write's immediate, above the [`NOTIFY_BITS`] position bits: the low [`BEAT_BITS`] bits
/// of the writer's heartbeat number, then one credit bit.
const BEAT_BITS: u32 = 7;
/// The immediate's top bit: the writer processed another [`CREDIT_QUANTUM`] of the reader's
/// notifications on this rail (receive credits ride on data flowing back; a control block
/// carries them only when none does).
const CREDIT_BIT: u32 = 1 << (NOTIFY_BITS + BEAT_BITS);
/// Notifications one credit bit stands for (a protocol constant: both sides count in it). Each
/// set bit is counted once, in order, by the reader (a rail's receive completions come in
/// the order of its writes), so the sum is exact and never more than the writer processed.
pub const CREDIT_QUANTUM: u64 = 16;
/// A data write's carried beat is read against the last beat heard on its rail, and counts only
/// if less than half the low bits' range ahead. A rail's blocks can pause for longer than that
/// (a connection sharing liveness beats its own rails once a period: 64 intervals or more), so
/// the first write whose beat is this far past the last one conveyed on the rail waits for a
/// block with the full number (half the reach: a margin, not a bound anything depends on).
const BEAT_REFRESH: u64 = 1 << (BEAT_BITS - 2);
const _: () = assert!(NOTIFY_BITS + BEAT_BITS + 1 == 32);

/// The heartbeat number's low bits, placed above the position bits of a data write's immediate.
fn beat_bits(beat: u64) -> u32 {
    ((beat as u32) & ((1 << BEAT_BITS) - 1)) << NOTIFY_BITS
}

impl Rail {
    /// A data write on this rail carried the peer's heartbeat number's low bits (`low`): if that
    /// is a later beat than the last one heard here, it counts as that beat (the peer ran and
    /// this rail carried it). Returns whether it was new. Beats on a rail arrive in order, and
    /// the writer sends a full number in a block before a write whose beat is [`BEAT_REFRESH`]
    /// past the last it conveyed there, so the low bits are ahead by less than half their range;
    /// a value behind (an older beat than a block already brought) is not news. A rail that has
    /// heard no full beat number yet (its first block was lost) takes the one nearest `base`, the
    /// latest beat heard on any rail (0: none, nothing learnt).
    fn heard_beat_low_bits(&mut self, low: u32, base: u64, now: Nanos) -> bool {
        let range = 1u64 << BEAT_BITS;
        let low = u64::from(low) & (range - 1);
        let beat = if self.peer_heartbeat != 0 {
            let ahead = low.wrapping_sub(self.peer_heartbeat) & (range - 1);
            if ahead == 0 || ahead >= range / 2 {
                return false;
            }
            self.peer_heartbeat + ahead
        } else {
            let ahead = low.wrapping_sub(base) & (range - 1);
            let beat = if ahead < range / 2 {
                base + ahead
            } else {
                (base + ahead).saturating_sub(range)
            };
            if base == 0 || beat == 0 {
                return false;
            }
            beat
        };
        self.peer_heartbeat = beat;
        self.peer_seen_at = now;
        true
    }

    /// Whether a control block is due on this rail and a work request is free for it.
    /// Whether a block posted now would tell the peer anything beyond the beat itself.
    fn has_news(&self, delivered: u64, fault_gens: u64, avoiding: u8) -> bool {
        self.rx.read_pos() != self.reported_consumed
            || self.notified != self.reported_notified
            || delivered != self.reported_delivered
            || fault_gens != self.reported_fault_gens
            || avoiding != self.reported_avoiding
            || self.ack_request
    }

    fn ctrl_postable(&self, max_wr: u32) -> bool {
        self.state != RailState::Failed && self.ctrl_due && self.outstanding < max_wr
    }

    /// Retransmissions its card counted so far in the gray switch's current window (0 before
    /// its first report).
    fn retransmissions_so_far(&self) -> u64 {
        self.retransmissions_base
            .map_or(0, |base| self.retransmissions.saturating_sub(base))
    }

    /// The rail's write latency now: the moving average, or the age of the write being timed if
    /// that is longer (a stalled rail shows before its writes complete).
    fn current_latency(&self, now: Nanos) -> Nanos {
        let waiting = self
            .probe
            .map_or(0, |(_, posted)| now.saturating_sub(posted));
        self.latency_ns.max(waiting)
    }

    /// A signaled write is posted now: timed if none is.
    #[inline]
    fn signaled_posted(&mut self, now: Nanos) {
        self.signaled_posted += 1;
        if self.probe.is_none() {
            self.probe = Some((self.signaled_posted, now));
        }
    }

    /// A write completed successfully (a signaled one; those it covers had no completion): if it
    /// was the timed one, its latency is a sample.
    #[inline]
    fn completion_latency(&mut self, now: Nanos) {
        self.signaled_done += 1;
        if let Some((_, posted)) = self.probe.filter(|(n, _)| self.signaled_done >= *n) {
            self.probe = None;
            if self.completions < LATENCY_WARMUP {
                self.completions += 1;
                return;
            }
            let sample = now.saturating_sub(posted).max(1);
            self.latency_ns = if self.latency_ns == 0 {
                sample
            } else {
                self.latency_ns - self.latency_ns / 4 + sample / 4
            };
        }
    }
}

/// Where a new connection picks up the stream of one that ended (see [`Core::resume_state`]): the
/// application never filters duplicates itself, and nothing accepted is lost.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumeState {
    /// Highest sequence number this side delivered from the peer (later ones are new).
    pub delivered: u64,
    /// Every record accepted but not known delivered, in order, with its sequence number
    /// (contiguous, ending at `last_sent`).
    pub unacked: Vec<(u64, Vec<u8>)>,
    /// Highest sequence number this side accepted for sending.
    pub last_sent: u64,
}

impl ResumeState {
    /// The first sequence number the resumed connection (re)sends.
    pub fn first_unacked(&self) -> u64 {
        self.unacked.first().map_or(self.last_sent + 1, |(s, _)| *s)
    }
}

/// One side of a connection: its rails, its outgoing stream and its incoming stream.
pub struct Core {
    cfg: Config,
    rails: Vec<Rail>,
    /// Every rail's send queue (its lane); the application writes into the active one through
    /// the [`LaneWriter`] returned by [`Core::new`].
    lanes: LaneControl,
    active: usize,
    cursor: StreamCursor,
    /// Set once the session is over (terminal).
    ended: Option<EndReason>,
    /// Since when every rail has been silent (the peer is not running), if it is.
    unresponsive_since: Option<Nanos>,
    /// Closing: the deadline for the peer to deliver what was sent before the goodbye.
    closing_until: Option<Nanos>,
    /// After the session ended: rails still owed the goodbye control block.
    bye_due: [bool; MAX_RAILS],
    /// Goodbye writes posted and not yet completed.
    bye_outstanding: u32,
    now: Nanos,
    next_heartbeat: Nanos,
    /// Heartbeat ticks fall on multiples of the interval (see [`Core::align_heartbeats`]).
    aligned_ticks: bool,
    /// Heartbeats sent, numbered alike on every rail: the peer compares rails by the numbers
    /// they carried, not by when they arrived (a rail's queue can deliver old beats late).
    beat: u64,
    /// A heartbeat the active rail skipped at the last tick, expecting a data write to carry
    /// it: by then its block goes after all (see [`Core::check_liveness`]).
    beat_owed_at: Option<Nanos>,
    /// Whether the last receive found anything announced (else it changed nothing).
    recv_touched: bool,
    /// Between a lost re-arm channel and its restoration.
    rearm_channel_down: bool,
    /// The rails (a bit each) whose write-with-immediate notifications may have announced records
    /// not yet consumed: a receive looks at these alone, and with none returns at once (the
    /// common empty poll).
    arrived: u8,
    /// The rail the peer's records last arrived on (its active rail, as far as this side knows).
    inbound: usize,
    /// The rails a driver polls every time (see [`Core::busy_rails`]).
    busy_rails: u8,
    /// Whether anything but the application's new records may have made I/O due since
    /// [`Core::poll_io`] last found none (a completion, an event, a timer, a receive, a failure).
    /// Until then an empty poll checks the active lane alone, not every rail.
    rescan: bool,
    io: VecDeque<Io>,
    events: VecDeque<Event>,
    stats: Stats,
    /// (when the failover happened, first sequence number it resends or sends).
    blackout_from: Option<(Nanos, u64)>,
    peer_delivered: u64,
    /// When handle_timeout last ran (to tell our own stalls from the peer's silence).
    last_tick: Nanos,
    /// A standby lane may have records to post (hot-hot copies, or padding after a planned
    /// switch): [`Core::poll_io`]'s fast path must not skip it.
    standby_due: bool,
    /// Since when the active rail has been degraded against a standby (gray switch).
    degraded_since: Option<Nanos>,
    /// A planned switch draining the active rail.
    switching: Option<Switch>,
    /// Some rail's peer asks for immediate acknowledgements (it drains for a planned switch).
    peer_draining: bool,
    /// When the current retransmission-counting window began (gray switch).
    retransmit_window_start: Nanos,
    /// Liveness shared with the other connections between the same two endpoints (None: this
    /// connection heart-beats and judges its rails alone).
    shared: Option<SharedLiveness>,
    /// Per rail: the last tick at which this connection's beat went out on it (a block, or a
    /// data write's immediate); 0: never.
    beat_sent_at: [Nanos; MAX_RAILS],
    /// Rails this connection failed for missed heartbeats since [`Core::take_missed_rails`].
    missed_rails: u8,
}

/// Liveness shared by the connections between the same two endpoints, which use the same card
/// pairs (see [`crate::endpoint`]). Silence is a property of a card pair's path, so one beat per
/// rail and interval from any of the connections proves the path for all of them, and any of
/// them hearing the peer endpoint on a rail counts for every one. The endpoint hands each
/// connection this view before its turn ([`Core::share_liveness`]); each still posts its own
/// beat on every rail once every `max(`[`OWN_BEAT_EVERY`]`, members)` intervals, so that a queue
/// pair of its own that broke (or a peer connection that vanished) shows up as the RC error of a
/// write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SharedLiveness {
    /// Per rail: another connection of the group sent its beat on it within the last
    /// interval; this one may skip a heartbeat block that would carry nothing else.
    pub covered: [bool; MAX_RAILS],
    /// Per rail: the latest time any connection of the group heard the peer endpoint on it.
    pub heard_at: [Nanos; MAX_RAILS],
    /// How many connections the group has: each posts its own beats once every
    /// `max(OWN_BEAT_EVERY, members)` intervals, so the group's own beats stay at most one per
    /// rail and interval however many connections it has (0 counts as 1).
    pub members: u64,
    /// Where in that period this connection's own beats fall (its place in the group), so the
    /// members' own beats spread over the period instead of bunching in one interval.
    pub phase: u64,
}

impl SharedLiveness {
    /// Whether a tick in interval number `interval` (the clock's time divided by the interval:
    /// the same numbering for every connection of an endpoint, which share a clock) is this
    /// connection's own-beat turn. A tick that comes late enough to skip a number may miss a
    /// turn: the own beat then comes one period later.
    fn own_turn(&self, interval: u64) -> bool {
        (interval + self.phase) % OWN_BEAT_EVERY.max(self.members) == 0
    }
}

/// With shared liveness, a connection still heart-beats every rail of its own at least once
/// every this many intervals (more rarely in a group of more connections, see
/// [`SharedLiveness::members`]).
pub const OWN_BEAT_EVERY: u64 = 64;

impl Core {
    /// Allocates the rings and control slots of every rail. All rails start connected: rail 0
    /// active, the others warm standbys.
    pub fn new(cfg: Config, now: Nanos) -> std::io::Result<Core> {
        Core::new_numbered(cfg, now, 1)
    }

    fn new_numbered(cfg: Config, now: Nanos, first_seq: u64) -> std::io::Result<Core> {
        let mut rails = Vec::with_capacity(cfg.rails);
        let mut queues = Vec::with_capacity(cfg.rails);
        for i in 0..cfg.rails {
            queues.push(SendQueue::new(cfg.geometry, cfg.backing, first_seq)?);
            rails.push(Rail {
                rx: MirrorQueue::new(cfg.geometry, cfg.backing)?,
                ctrl_out: Arc::new(Region::new(CTRL_LEN, cfg.backing)?),
                ctrl_in: Arc::new(Region::new(CTRL_LEN, cfg.backing)?),
                state: if i == 0 {
                    RailState::Active
                } else {
                    RailState::Standby
                },
                generation: 0,
                peer_heartbeat: 0,
                beat_floor: 0,
                peer_seen_at: now,
                outstanding: 0,
                unsignaled: 0,
                beat_in_data: false,
                data_since_block: false,
                block_beat: 0,
                conveyed_beat: 0,
                recv_credits: 0,
                ctrl_due: true,
                reported_consumed: 0,
                failed_at: 0,
                port_active: false,
                rearm_requested: false,
                last_failure: None,
                imm_posted: 0,
                peer_notified: 0,
                notified: 0,
                reported_notified: 0,
                carried_notified: 0,
                peer_carried: 0,
                reported_delivered: 0,
                reported_fault_gens: 0,
                reported_avoiding: 0,
                peer_avoiding: 0,
                peer_avoiding_beat: 0,
                ctrl_seen: [0; 7],
                signaled_posted: 0,
                signaled_done: 0,
                probe: None,
                latency_ns: 0,
                completions: 0,
                avoid_until: 0,
                retransmissions: 0,
                retransmissions_base: None,
                retransmissions_in_window: 0,
                ack_request: false,
                peer_wants_ack: false,
            });
        }
        let lanes = railover_segq::lanes(queues, 0);
        let mut core = Core {
            cfg,
            rails,
            lanes,
            active: 0,
            cursor: StreamCursor::default(),
            ended: None,
            unresponsive_since: None,
            closing_until: None,
            bye_due: [false; MAX_RAILS],
            bye_outstanding: 0,
            now,
            next_heartbeat: now + cfg.heartbeat_interval_ns,
            aligned_ticks: false,
            beat: 1, // (from 1: a rail's first block already proves it; 0 means none heard)
            beat_owed_at: None,
            recv_touched: false,
            arrived: 0,
            inbound: 0,
            busy_rails: 0, // (set below)
            rearm_channel_down: false,
            rescan: true,
            io: VecDeque::with_capacity(4 * MAX_RAILS),
            events: VecDeque::with_capacity(64), // grows only if the user leaves events unread
            stats: Stats::default(),
            blackout_from: None,
            peer_delivered: 0,
            last_tick: now,
            standby_due: false,
            degraded_since: None,
            switching: None,
            peer_draining: false,
            retransmit_window_start: now,
            shared: None,
            beat_sent_at: [0; MAX_RAILS],
            missed_rails: 0,
        };
        core.note_busy_rails();
        core.refresh_rail_stats();
        Ok(core)
    }

    /// Like [`Core::new`], continuing the stream of a connection that ended: the unacknowledged
    /// records are queued again under their own sequence numbers (the peer discards those it
    /// already delivered), and incoming records up to `state.delivered` are discarded here.
    pub fn new_resuming(cfg: Config, now: Nanos, state: &ResumeState) -> std::io::Result<Core> {
        let first = state.first_unacked();
        let mut core = Core::new_numbered(cfg, now, first)?;
        core.lanes.resume_after(first - 1);
        core.cursor = StreamCursor::resuming_after(state.delivered);
        core.peer_delivered = first - 1;
        for (seq, payload) in &state.unacked {
            match core.lanes.push_local(payload) {
                Ok(s) if s == *seq => {}
                r => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("resumed record {seq} could not be queued again: {r:?}"),
                    ))
                }
            }
        }
        Ok(core)
    }

    /// Where a new connection would pick up this one's stream (allocates: call it once the
    /// session ended, to open the next one with).
    pub fn resume_state(&self) -> ResumeState {
        let mut unacked = Vec::new();
        self.unacked(|seq, p| unacked.push((seq, p.to_vec())));
        ResumeState {
            delivered: self.cursor.last_delivered(),
            unacked,
            last_sent: self.last_sent_seq(),
        }
    }

    /// Every rail is connected at both ends: heartbeat timers start now (connection set-up can
    /// take far longer than a heartbeat timeout, so they must not run during it).
    pub fn start(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        for r in &mut self.rails {
            r.peer_seen_at = self.now;
        }
        self.last_tick = self.now;
        self.next_heartbeat = self.now + self.cfg.heartbeat_interval_ns;
        self.rescan = true;
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Memory the driver registers for a rail: (send ring, mirror ring, ctrl out, ctrl in).
    pub fn rail_memory(
        &self,
        rail: usize,
    ) -> (
        railover_segq::Memory,
        railover_segq::Memory,
        Arc<Region>,
        Arc<Region>,
    ) {
        let r = &self.rails[rail];
        (
            self.lanes.poster_ref(rail).memory(),
            r.rx.memory(),
            r.ctrl_out.clone(),
            r.ctrl_in.clone(),
        )
    }

    /// `rail`'s state. The rail accessors below panic for a rail the connection doesn't have
    /// (`rail >= Config::rails()`), as a slice index does; the calls that report to the core
    /// ignore one.
    pub fn rail_state(&self, rail: usize) -> RailState {
        self.rails[rail].state
    }

    /// Whether the next [`Core::handle_timeout`] runs the heartbeat tick.
    #[inline]
    pub fn heartbeat_due(&self, now: Nanos) -> bool {
        now >= self.next_heartbeat && self.ended.is_none()
    }

    /// Runs the heartbeat ticks on multiples of the interval (of the clock's time) instead of
    /// one interval after the previous tick. An endpoint driven by a blocking wait asks for
    /// this: its connections' ticks then fall together and it wakes once per interval for them
    /// all, not once per connection. A tick never comes later than unaligned (the first
    /// aligned one comes earlier).
    pub fn align_heartbeats(&mut self, on: bool) {
        self.aligned_ticks = on;
    }

    /// The group's liveness view, from the endpoint, before this connection's tick (used by
    /// that tick only: a connection driven without it heart-beats every rail itself).
    pub fn share_liveness(&mut self, view: SharedLiveness) {
        self.shared = Some(view);
    }

    /// When this connection last heard the peer on `rail` itself (None: the rail is down, or
    /// has not heard the peer since it (re)connected): what it adds to its group's view.
    pub fn rail_heard_at(&self, rail: usize) -> Option<Nanos> {
        let r = &self.rails[rail];
        (r.state != RailState::Failed && r.peer_heartbeat != 0).then_some(r.peer_seen_at)
    }

    /// The last tick at which this connection's beat went out on `rail` (0: never).
    pub fn beat_sent_at(&self, rail: usize) -> Nanos {
        self.beat_sent_at[rail]
    }

    /// The rails (bit i: rail i) this connection failed for missed heartbeats since the last
    /// call: with shared liveness, the endpoint fails the same rail of the group's other
    /// connections ([`Core::fail_silent_rail`]).
    pub fn take_missed_rails(&mut self) -> u8 {
        std::mem::take(&mut self.missed_rails)
    }

    /// Another connection between the same endpoints found `rail`'s path silent: fails it here
    /// too, unless this connection heard the peer on it within the heartbeat timeout itself (a
    /// queue pair of its own that is newer than the silence, say).
    pub fn fail_silent_rail(&mut self, rail: usize) {
        let Some(r) = self.rails.get(rail) else {
            return;
        };
        if r.state != RailState::Failed
            && r.peer_heartbeat != 0
            && self.now.saturating_sub(r.peer_seen_at) > self.cfg.heartbeat_timeout_ns()
        {
            self.fail_rail(rail, FailReason::HeartbeatMiss);
        }
    }

    /// Whether some rail is down (waiting for a re-arm).
    #[inline]
    pub fn any_rail_failed(&self) -> bool {
        self.rails.iter().any(|r| r.state == RailState::Failed)
    }

    /// Whether the rail has heard the peer since it (re)connected.
    pub fn rail_proven(&self, rail: usize) -> bool {
        self.rails[rail].peer_heartbeat != 0
    }

    pub fn rail_generation(&self, rail: usize) -> u16 {
        self.rails[rail].generation
    }

    /// The rail carrying this side's outgoing stream.
    pub fn active_rail(&self) -> usize {
        self.active
    }

    /// The rails whose completions can't wait, as a bit mask: the one carrying this side's
    /// stream, the one the peer's records last arrived on, a planned switch's target; every
    /// rail in hot-hot mode. The others carry heartbeats alone until a failover, so a driver
    /// may poll them less often (see [`crate::Receiver::progress`]).
    #[inline]
    pub fn busy_rails(&self) -> u8 {
        const _: () = assert!(MAX_RAILS <= 8, "a rail mask is a u8");
        self.busy_rails
    }

    /// Every rail, as a bit mask.
    pub fn all_rails(&self) -> u8 {
        ((1u16 << self.rails.len()) - 1) as u8
    }

    /// Sets `busy_rails` (see [`Core::busy_rails`]).
    fn note_busy_rails(&mut self) {
        self.busy_rails = if self.cfg.mode == RailMode::HotHot {
            self.all_rails()
        } else {
            let target = self.switching.as_ref().map_or(0, |s| 1 << s.to);
            (1 << self.active) | (1 << self.inbound) | target
        };
    }

    /// Whether the session is over (see [`Core::end_reason`]).
    pub fn is_dead(&self) -> bool {
        self.ended.is_some()
    }

    /// Why the session ended, once it has.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.ended
    }

    /// Whether the peer is unresponsive right now (every rail silent).
    pub fn peer_unresponsive(&self) -> bool {
        self.unresponsive_since.is_some()
    }

    /// Whether [`Core::close`] was called and the session has not ended yet.
    pub fn is_closing(&self) -> bool {
        self.closing_until.is_some() && self.ended.is_none()
    }

    /// Whether the goodbye of an ended session is still to be posted or completed (a driver about
    /// to destroy its queue pairs waits for this, briefly).
    pub fn bye_pending(&self) -> bool {
        self.bye_outstanding > 0 || self.bye_due.iter().any(|d| *d)
    }

    /// Starts a graceful close: no new record is accepted; once the peer delivered every record
    /// sent (or `linger_ns` passed) the session ends with [`EndReason::Closed`] and the peer is
    /// told ([`EndReason::PeerClosed`] there). Drive the core until [`Core::is_dead`].
    pub fn close(&mut self, now: Nanos, linger_ns: Nanos) {
        self.now = self.now.max(now);
        if self.ended.is_some() || self.closing_until.is_some() {
            return;
        }
        self.closing_until = Some(self.now.saturating_add(linger_ns));
        self.lanes.close_with(reason_code(EndReason::Closed));
        self.rescan = true;
        self.check_close();
    }

    fn end_error(&self) -> Option<EndReason> {
        self.ended
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.sent = self.last_sent_seq();
        s.delivered = self.cursor.delivered;
        s.duplicates_discarded = self.cursor.duplicates;
        for (i, r) in self.rails.iter().enumerate() {
            s.rail_latency_ns[i] = r.latency_ns;
        }
        s.data_writes = s.rail_data_writes.iter().sum();
        s.data_bytes = s.rail_data_bytes.iter().sum();
        s
    }

    /// `rail`'s write-completion latency as the gray switch judges it: the moving average, or
    /// the age of the write being timed if longer (0: no sample yet).
    pub fn rail_latency_ns(&self, rail: usize) -> Nanos {
        let r = &self.rails[rail];
        if r.latency_ns == 0 {
            0
        } else {
            r.current_latency(self.now)
        }
    }

    /// The driver read `rail`'s card's RC retransmission counter (see
    /// [`GraySwitch::retransmits_per_window`](crate::config::GraySwitch)): `total` so far.
    pub fn note_retransmissions(&mut self, rail: usize, total: u64) {
        if let Some(r) = self.rails.get_mut(rail) {
            r.retransmissions = total;
            r.retransmissions_base.get_or_insert(total); // counted from the first report on
        }
    }

    /// How many retransmissions `rail`'s card counted in the gray switch's last whole window
    /// (0 before its first report, or when the switch does not count them).
    pub fn rail_retransmissions_in_window(&self, rail: usize) -> u64 {
        self.rails
            .get(rail)
            .map_or(0, |r| r.retransmissions_in_window)
    }

    /// Whether the gray switch counts retransmissions (the driver then reports them about
    /// once per heartbeat interval).
    pub fn wants_retransmissions(&self) -> bool {
        self.cfg.gray.is_some_and(|g| g.retransmits_per_window > 0)
    }

    /// Whether a planned switch is draining the active rail right now.
    pub fn is_switching(&self) -> bool {
        self.switching.is_some()
    }

    /// Whether a failover kept records aside that the new active rail had no room for yet (a
    /// hot standby whose ring the peer had not freed): they go out as the peer frees it, and
    /// sends are refused with [`SendError::Backpressure`] until then (none may overtake them;
    /// a message too large for any rail is still [`SendError::TooLarge`]).
    pub fn keeps_records(&self) -> bool {
        self.lanes.keeps_records()
    }

    /// Highest sequence number the peer is known to have delivered.
    pub fn peer_delivered(&self) -> u64 {
        self.peer_delivered
    }

    /// Highest sequence number this side accepted for sending (0: none).
    pub fn last_sent_seq(&self) -> u64 {
        self.lanes.last_committed_seq()
    }

    /// One line per rail of internal state, for diagnosing a stuck connection.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "active={} ended={:?} unresponsive_since={:?} delivered={} peer_delivered={} last_sent={}\n",
            self.active,
            self.ended,
            self.unresponsive_since,
            self.cursor.delivered,
            self.peer_delivered,
            self.last_sent_seq()
        );
        for (i, r) in self.rails.iter().enumerate() {
            out += &format!(
                "  rail {i}: {:?} gen={} outstanding={} recv_credits={} tx_next_seq={} tx_acked_seq={} rx_complete={} rx_read={} beat_floor={} peer_hb={} peer_seen_at={} last_failure={:?}\n",
                r.state, r.generation, r.outstanding, r.recv_credits, self.lanes.poster_ref(i).committed_seq() + 1, self.lanes.poster_ref(i).acked_seq(), r.rx.complete_pos(), r.rx.read_pos(), r.beat_floor, r.peer_heartbeat, r.peer_seen_at, r.last_failure
            );
        }
        out
    }

    // ---- the application's side ----

    /// Queues `msg` as the next record (on the driver's thread; posting is [`Core::poll_io`]'s).
    /// Returns its sequence number.
    #[inline]
    pub fn push(&mut self, msg: &[u8]) -> Result<u64, SendError> {
        self.lanes.push_local(msg).map_err(send_error_of)
    }

    /// Queues `msgs` as consecutive records with one commit, all or none (on the driver's
    /// thread). Returns their sequence numbers.
    #[inline]
    pub fn push_batch(&mut self, msgs: &[&[u8]]) -> Result<Range<u64>, SendError> {
        self.lanes.push_local_batch(msgs).map_err(send_error_of)
    }

    /// A zero-copy slot of `len` bytes for the next record (on the driver's thread).
    pub fn reserve(&mut self, len: usize) -> Result<Reservation<'_>, SendError> {
        self.lanes.reserve_local(len).map_err(send_error_of)
    }

    /// Hands out the writer for another thread (once): from then on records are pushed through
    /// it, not [`Core::push`].
    pub fn take_writer(&mut self) -> Option<LaneWriter> {
        self.lanes.writer()
    }

    /// Delivers every message that has arrived, in order and exactly once, to `deliver` (zero-copy).
    /// Returns how many it delivered.
    #[inline]
    pub fn poll_recv(&mut self, mut deliver: impl FnMut(&[u8])) -> Result<usize, RecvError> {
        self.poll_recv_limit(usize::MAX, |_, p| deliver(p))
    }

    /// [`Core::poll_recv`] with each record's sequence number (the sender's, from 1: what its
    /// `send` returned).
    #[inline]
    pub fn poll_recv_seq(&mut self, deliver: impl FnMut(u64, &[u8])) -> Result<usize, RecvError> {
        self.poll_recv_limit(usize::MAX, deliver)
    }

    /// Copies the next message, if one has arrived, into `buf` (which must hold the largest
    /// record, so nothing is ever consumed and then truncated). Returns its length.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, RecvError> {
        let max = self.cfg.geometry.max_record();
        if buf.len() < max {
            return Err(RecvError::BufferTooSmall {
                len: buf.len(),
                max,
            });
        }
        let mut len = None;
        self.poll_recv_limit(1, |_, p| {
            railover_segq::copy_message(buf, p);
            len = Some(p.len());
        })?;
        Ok(len)
    }

    #[inline]
    fn poll_recv_limit(
        &mut self,
        limit: usize,
        deliver: impl FnMut(u64, &[u8]),
    ) -> Result<usize, RecvError> {
        self.recv_touched = false;
        if self.arrived == 0 && self.ended.is_none() {
            return Ok(0); // no notification since everything announced was consumed
        }
        self.consume_arrived(limit, deliver)
    }

    fn consume_arrived(
        &mut self,
        limit: usize,
        mut deliver: impl FnMut(u64, &[u8]),
    ) -> Result<usize, RecvError> {
        match self.end_error() {
            Some(EndReason::AllRailsDown) => return Err(RecvError::AllRailsDown),
            Some(reason) => return Err(RecvError::Ended(reason)),
            None => {}
        }
        let mut total = 0;
        // The rails still holding announced records once this receive is done.
        let mut more = 0u8;
        let mut left = self.arrived;
        while left != 0 {
            let r = left.trailing_zeros() as usize;
            let bit = left & left.wrapping_neg();
            left &= left - 1;
            if self.rails[r].state == RailState::Failed {
                continue; // late writes on a dead rail are ignored: the sender resends
            }
            if total >= limit {
                more |= bit | left; // stopped early: what is left is looked at next time
                break;
            }
            if !self.rails[r].rx.has_arrived() {
                continue; // everything announced was consumed: no parsing, no ack due
            }
            self.recv_touched = true;
            match self.rails[r]
                .rx
                .consume_limit(&mut self.cursor, limit - total, &mut deliver)
            {
                Ok(n) => total += n,
                Err(e) => {
                    self.bad_data(r, e);
                    continue;
                }
            }
            let rail = &mut self.rails[r];
            let pos = rail.rx.read_pos();
            // Acknowledge the first data on a rail at once (ends a failover's blackout quickly),
            // then every quarter ring; heartbeat blocks carry the rest (the active rail's skip
            // them while it carries data: then the threshold does).
            if pos != rail.reported_consumed
                && (rail.reported_consumed == 0
                    || rail.peer_wants_ack
                    || pos - rail.reported_consumed >= self.cfg.ack_every_bytes)
            {
                rail.ctrl_due = true;
                self.rescan = true; // (consuming changes nothing else a scan looks at)
            }
            if rail.state != RailState::Failed && rail.rx.has_arrived() {
                more |= bit;
            }
        }
        self.arrived = more;
        if total > 0 && self.peer_draining {
            // The peer drains a rail for a planned switch: every rail it asked on says at once
            // what was delivered (the fastest one ends its wait).
            for rail in self.rails.iter_mut().filter(|r| r.peer_wants_ack) {
                rail.ctrl_due = true;
                self.rescan = true;
            }
        }
        Ok(total)
    }

    /// Whether the last receive may have made I/O due: it found records, and what consuming
    /// them made due (an acknowledgement, a failed rail, a drain's answer) set the rescan, or
    /// a split-off writer may have committed records meanwhile (a reply sent from the delivery
    /// callback through a `Sender`, which goes out in the same poll). Nothing else a post
    /// depends on changes during a receive: a driver that posted everything it could before
    /// it has nothing to post after it otherwise.
    #[inline]
    pub fn recv_made_io_due(&self) -> bool {
        self.recv_touched && (self.rescan || (self.lanes.writer_elsewhere() && self.has_unposted()))
    }

    /// Whether the application committed records that wait to be posted.
    pub fn has_unposted(&self) -> bool {
        self.ended.is_none() && self.lanes.poster_ref(self.active).has_pending()
    }

    /// Visits every record accepted for sending but not known delivered, in order. After the
    /// session ended these are the records the user must treat as not sent. They may include
    /// records the peer delivered but whose acknowledgement never arrived; a connection that
    /// resumes the stream ([`Core::new_resuming`]) discards those by sequence number.
    pub fn unacked(&self, f: impl FnMut(u64, &[u8])) {
        self.lanes.for_each_unacked(f)
    }

    /// Next user-visible event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- the driver's side ----

    /// Next I/O to carry out, if any. Call until it returns None.
    #[inline]
    pub fn poll_io(&mut self) -> Option<Io> {
        if self.nothing_to_post() {
            return None;
        }
        self.poll_io_scan()
    }

    /// The data write of records the application just committed, when that is all there is to
    /// do (the common `send`): nothing else queued or due since the last full scan, the active
    /// rail in plain active-standby use. Otherwise `None`, and [`Core::poll_io`] does the rest.
    #[inline]
    pub fn poll_new_data(&mut self) -> Option<DataWrite> {
        if self.rescan
            || !self.io.is_empty()
            || self.ended.is_some()
            || self.standby_due
            || self.switching.is_some()
            || self.cfg.mode == RailMode::HotHot
        {
            return None;
        }
        self.post_lane(self.active)
    }

    /// Whether something since the last full scan may have made I/O due (a completion, event,
    /// timer, receive or failure: see [`Core::nothing_to_post`]).
    #[inline]
    pub fn rescan_due(&self) -> bool {
        self.rescan
    }

    /// Whether [`Core::poll_io`] would find nothing, known cheaply: nothing queued, nothing
    /// happened since the last full scan found nothing to do, and no new record from the
    /// application (one load). The steady-state empty poll ends here.
    #[inline]
    pub fn nothing_to_post(&self) -> bool {
        !self.rescan
            && self.io.is_empty()
            && self.ended.is_none()
            && !self.standby_due
            && !self.lanes.poster_ref(self.active).has_pending()
    }

    #[inline]
    fn poll_io_scan(&mut self) -> Option<Io> {
        if let Some(io) = self.io.pop_front() {
            return Some(io);
        }
        if self.ended.is_some() {
            return self.poll_bye();
        }
        if !self.rescan {
            // Only the application's new records can be due.
            return self.poll_data();
        }
        let max_recv = self.cfg.link.max_recv_wr;
        // Receives first: the credits a control write reports must already be posted.
        for (r, rail) in self.rails.iter_mut().enumerate() {
            if rail.state != RailState::Failed && rail.recv_credits <= max_recv / 2 {
                let count = max_recv - rail.recv_credits;
                rail.recv_credits = max_recv;
                return Some(Io::PostRecvs { rail: r, count });
            }
        }
        if self.lanes.keeps_records() {
            // A failover kept records the new active rail had no room for: in they go as the
            // peer frees it (its acknowledgements rescan).
            self.lanes.move_kept();
        }
        if let Some(io) = self.poll_data() {
            return Some(io);
        }
        let max_wr = self.cfg.link.max_send_wr;
        if !self.rails.iter().any(|rail| rail.ctrl_postable(max_wr)) {
            self.rescan = false; // a completion, timer or receive sets it again
            return None;
        }
        self.poll_ctrl()
    }

    /// The next data write, coalesced: on the active rail if the application committed records
    /// not yet posted (unless a planned switch drains it), then on the standbys (hot-hot copies,
    /// padding left by a planned switch).
    #[inline]
    fn poll_data(&mut self) -> Option<Io> {
        if self.switching.is_none() {
            if let Some(w) = self.post_lane(self.active) {
                if self.cfg.mode == RailMode::HotHot {
                    self.standby_due = true; // its copies go next
                }
                return Some(Io::Write(w.write));
            }
        }
        // Hot-hot: the copies go even when the active rail can't post (a rail slow to complete
        // holds its send queue full; the standby must not wait for it).
        if self.standby_due || self.cfg.mode == RailMode::HotHot {
            return self.poll_standbys();
        }
        None
    }

    /// The standbys' data writes: in hot-hot mode each first takes copies of the active lane's
    /// new records. (Kept out of line: active-standby's data path doesn't come here.)
    #[inline(never)]
    fn poll_standbys(&mut self) -> Option<Io> {
        let hot = self.cfg.mode == RailMode::HotHot;
        // Stays set while a standby holds records it can't post yet (its send queue or the
        // peer's receive credits are full): the completion or control block that frees them
        // comes through `poll_io`, which must then look here again.
        let mut left = false;
        for r in 0..self.rails.len() {
            // Not before the rail heard the peer: a re-armed rail's peer may not have posted its
            // receives yet (a write with immediate would meet none); its first control block
            // says it has (and rescans).
            if r == self.active
                || self.rails[r].state != RailState::Standby
                || self.rails[r].peer_heartbeat == 0
            {
                continue;
            }
            if hot {
                // A stalled copy (the standby's ring full) resumes when its acknowledgement
                // arrives (a control block: that rescans, and hot-hot looks here every scan).
                let _ = self.lanes.shadow(r);
            }
            if let Some(w) = self.post_lane(r) {
                self.standby_due = true;
                return Some(Io::Write(w.write));
            }
            left |= self.lanes.poster_ref(r).has_pending();
        }
        self.standby_due = left;
        None
    }

    /// The next data write of lane `a`'s committed, unposted records on its rail. Two work
    /// requests stay free for control writes, and at most half the peer's receive queue is in
    /// flight beyond what it reported processed.
    #[inline(always)]
    fn post_lane(&mut self, a: usize) -> Option<DataWrite> {
        let max_wr = self.cfg.link.max_send_wr;
        let max_recv = self.cfg.link.max_recv_wr;
        let rail = &mut self.rails[a];
        if rail.state != RailState::Failed
            && rail.outstanding + 2 < max_wr
            && rail.imm_posted - rail.peer_notified < (max_recv / 2) as u64
        {
            if let Some(range) = self.lanes.poster(a).pending(self.cfg.max_write_bytes) {
                if !rail.beat_in_data {
                    // The interval's first write on this rail: its carried beat must be within
                    // reach of the last full number the peer has from here.
                    if self.beat >= rail.conveyed_beat + BEAT_REFRESH {
                        rail.ctrl_due = true; // that block goes first, then this write
                        self.rescan = true;
                        return None;
                    }
                    rail.conveyed_beat = self.beat;
                }
                self.lanes.poster(a).mark_posted(&range);
                rail.outstanding += 1;
                rail.imm_posted += 1;
                rail.beat_in_data = true;
                if a == self.active {
                    self.beat_owed_at = None; // this write carries the current beat
                } else {
                    self.stats.standby_writes += 1;
                }
                // (The totals are summed from these in `stats`.)
                self.stats.rail_data_writes[a] += 1;
                self.stats.rail_data_bytes[a] += range.len() as u64;
                // Receive credits ride on the write when another quantum of the peer's writes
                // was processed here since the last one said so.
                let credit = if rail.notified - rail.carried_notified >= CREDIT_QUANTUM {
                    rail.carried_notified += CREDIT_QUANTUM;
                    rail.reported_notified = rail.reported_notified.max(rail.carried_notified);
                    CREDIT_BIT
                } else {
                    0
                };
                let id = wr_id(rail.generation, KIND_DATA, a);
                let signaled =
                    rail.unsignaled + 1 >= SIGNAL_EVERY || rail.outstanding * 2 >= max_wr;
                let wr_id = if signaled {
                    rail.signaled_posted(self.now);
                    covering(id, std::mem::take(&mut rail.unsignaled))
                } else {
                    rail.unsignaled += 1;
                    id
                };
                return Some(DataWrite {
                    write: RdmaWrite {
                        rail: a,
                        wr_id,
                        buf: Buf::Ring,
                        offset: range.offset,
                        len: range.len(),
                        imm: Some(range.notify_imm() | beat_bits(self.beat) | credit),
                        signaled,
                    },
                    reaches_commit: range.reaches_commit,
                });
            }
        }
        None
    }

    /// The control block due on some rail (acknowledgement, credits, heartbeat, fault report).
    fn poll_ctrl(&mut self) -> Option<Io> {
        let max_wr = self.cfg.link.max_send_wr;
        let fault_gens = self.fault_gens();
        let avoiding = self.avoiding();
        let delivered = self.cursor.last_delivered();
        for (r, rail) in self.rails.iter_mut().enumerate() {
            if rail.ctrl_postable(max_wr) {
                rail.ctrl_due = false;
                rail.block_beat = self.beat;
                rail.conveyed_beat = self.beat;
                if r == self.active {
                    self.beat_owed_at = None; // this block carries the beat
                }
                rail.reported_consumed = rail.rx.read_pos();
                rail.reported_notified = rail.notified;
                rail.reported_delivered = delivered;
                rail.reported_fault_gens = fault_gens;
                rail.reported_avoiding = avoiding;
                let ack_now = if rail.ack_request { STATUS_ACK_NOW } else { 0 };
                CtrlBlock {
                    heartbeat: self.beat,
                    delivered_seq: delivered,
                    consumed_pos: rail.reported_consumed,
                    fault_gens,
                    notified: rail.notified,
                    status: STATUS_LIVE | ack_now | u64::from(avoiding) << STATUS_AVOIDING_SHIFT,
                }
                .store(&rail.ctrl_out);
                rail.outstanding += 1;
                self.stats.control_writes += 1;
                self.stats.rail_control_writes[r] += 1;
                rail.signaled_posted(self.now);
                let covered = std::mem::take(&mut rail.unsignaled);
                return Some(ctrl_write(r, rail.generation, KIND_CTRL, covered));
            }
        }
        None
    }

    /// The goodbye control block of an ended session, once per rail still alive: the peer ends
    /// its side at once instead of waiting out silence.
    fn poll_bye(&mut self) -> Option<Io> {
        let status = match self.ended? {
            EndReason::Closed => STATUS_CLOSED,
            EndReason::PeerClosed | EndReason::PeerEnded => return None, // the peer knows
            _ => STATUS_ENDED,
        };
        let delivered = self.cursor.last_delivered();
        let fault_gens = self.fault_gens();
        let max_wr = self.cfg.link.max_send_wr;
        for (r, rail) in self.rails.iter_mut().enumerate() {
            if !self.bye_due[r] || rail.outstanding >= max_wr {
                continue;
            }
            self.bye_due[r] = false;
            if rail.state == RailState::Failed {
                continue;
            }
            CtrlBlock {
                heartbeat: self.beat + 1,
                delivered_seq: delivered,
                consumed_pos: rail.rx.read_pos(),
                fault_gens,
                notified: rail.notified,
                status,
            }
            .store(&rail.ctrl_out);
            rail.outstanding += 1;
            self.bye_outstanding += 1;
            self.stats.control_writes += 1;
            self.stats.rail_control_writes[r] += 1;
            rail.signaled_posted(self.now);
            let covered = std::mem::take(&mut rail.unsignaled);
            return Some(ctrl_write(r, rail.generation, KIND_BYE, covered));
        }
        None
    }

    /// When [`Core::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.ended.is_some() {
            return None;
        }
        let rearm = self
            .rails
            .iter()
            .filter(|r| r.state == RailState::Failed && !r.rearm_requested)
            .map(|r| r.failed_at + self.cfg.rearm_after_ns)
            .min();
        let next = rearm.map_or(self.next_heartbeat, |t| t.min(self.next_heartbeat));
        let next = self.beat_owed_at.map_or(next, |t| t.min(next));
        Some(self.closing_until.map_or(next, |t| t.min(next)))
    }

    /// Tells the core the time before the driver hands it completions (a beat a data write
    /// carries is heard at this time); [`Core::handle_timeout`] still runs the timers.
    #[inline]
    pub fn observe_time(&mut self, now: Nanos) {
        self.now = self.now.max(now);
    }

    /// Advances the clock: heartbeats, heartbeat-miss detection, acknowledgements, re-arm requests.
    #[inline]
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.handle_timeout_watching(now, u8::MAX);
    }

    /// [`Core::handle_timeout`] that, while no timer is due, looks for changed peer control
    /// blocks among `rails` (a bit mask) alone: for a driver that polls the other rails less
    /// often (see [`Core::busy_rails`]) and watches them when it does. A failed rail anywhere,
    /// and every timer tick, makes it look at all.
    #[inline]
    pub fn handle_timeout_watching(&mut self, now: Nanos, rails: u8) {
        if !self.quiet_tick(now, rails) {
            self.handle_timeout_full(now);
        }
    }

    /// The steady-state timer tick: when no timer is due, no rail failed, the session is not
    /// closing and no peer control block on `rails` changed since it was last processed (a load
    /// per watched rail), notes the time and says true. Otherwise does nothing and says false:
    /// [`Core::handle_timeout_watching`] has work to do.
    #[inline]
    pub fn quiet_tick(&mut self, now: Nanos, rails: u8) -> bool {
        if now < self.next_heartbeat
            && self.beat_owed_at.is_none()
            && now >= self.now
            && self.closing_until.is_none()
            && self.ended.is_none()
            && self.rails_quiet(rails)
        {
            self.now = now;
            self.last_tick = now;
            return true;
        }
        false
    }

    /// Whether every rail is up (none waits for a re-arm) and no peer control block on a rail in
    /// `watched` changed since it was last processed, judged by its crc word alone: one load per
    /// watched rail. A block
    /// whose crc collides with the last one's (one change in 2^32) waits for the next timer
    /// tick, which compares every word.
    #[inline]
    fn rails_quiet(&self, watched: u8) -> bool {
        // Every rail's state: a failed one's re-arm timer is not among those checked before.
        let mut watched = watched;
        self.rails.iter().all(|rail| {
            let watch = watched & 1 != 0;
            watched >>= 1;
            rail.state != RailState::Failed
                && (!watch
                    || rail.ctrl_in.read_u64(CTRL_CRC_OFFSET)
                        == rail.ctrl_seen[CTRL_CRC_OFFSET / 8])
        })
    }

    fn handle_timeout_full(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        // If this side itself did not run for a whole heartbeat timeout (descheduled, stopped,
        // blocked in set-up), the silence it sees is its own: give every peer a fresh window
        // instead of declaring all rails dead at once.
        if self.now.saturating_sub(self.last_tick) > self.cfg.heartbeat_timeout_ns() {
            tracing::warn!(
                stalled_ns = self.now - self.last_tick,
                "driver stalled; restarting heartbeat windows"
            );
            for r in &mut self.rails {
                r.peer_seen_at = self.now;
            }
        }
        self.last_tick = self.now;
        self.process_ctrl();
        if self.closing_until.is_some() {
            self.check_close();
        }
        if self.ended.is_some() {
            return;
        }
        if self.now >= self.next_heartbeat {
            let interval = self.cfg.heartbeat_interval_ns;
            self.next_heartbeat = if self.aligned_ticks {
                (self.now / interval + 1) * interval
            } else {
                self.now + interval
            };
            self.rescan = true;
            self.check_liveness();
            self.check_gray();
            self.follow_peer_switch();
            self.check_switch();
        } else if self.beat_owed_at.is_some_and(|t| self.now >= t) {
            // No data write carried the skipped beat in time: its block goes now.
            self.beat_owed_at = None;
            self.rescan = true;
            let active = &mut self.rails[self.active];
            if active.state != RailState::Failed {
                active.ctrl_due = true;
            }
        }
        if self.ended.is_some() {
            return;
        }
        for (r, rail) in self.rails.iter_mut().enumerate() {
            if rail.state == RailState::Failed
                && !rail.rearm_requested
                && (rail.port_active || self.now >= rail.failed_at + self.cfg.rearm_after_ns)
            {
                rail.rearm_requested = true;
                self.io.push_back(Io::Rearm { rail: r });
            }
        }
    }

    /// Heart-beats every live rail and tells a dead wire from a peer that is not running. A rail
    /// has failed when it stayed silent for the heartbeat timeout while another rail carried the
    /// peer's later heartbeats: at least `heartbeat_misses` more of them (by number), and heard
    /// after this rail's silence began. The peer ran; this wire didn't carry it. Comparing beat
    /// numbers, not only arrival times, keeps a rail whose queue delivers old beats late (a
    /// backlog of data before them) from condemning the other when the peer stops or is
    /// descheduled. When the peer itself stops, its rails fall silent with the same last beat
    /// (give or take one), and none is failed: once every rail is silent the peer is
    /// unresponsive (a wire that really died meanwhile is still caught by the RC retry budget of
    /// the heartbeats posted on it). A peer silent past the session timeout ends the session.
    fn check_liveness(&mut self) {
        let timeout = self.cfg.heartbeat_timeout_ns();
        let misses = u64::from(self.cfg.heartbeat_misses());
        self.beat += 1;
        // Per live rail: since when it is silent past its limit (None: not silent).
        let mut silent_since = [None; MAX_RAILS];
        let mut all_silent = true;
        let mut latest_heard: Option<Nanos> = None;
        let mut latest_beat = 0;
        let live = self
            .rails
            .iter()
            .filter(|r| r.state != RailState::Failed)
            .count();
        let owed_at = self.now + self.cfg.heartbeat_interval_ns / 4;
        self.beat_owed_at = None;
        let shared = self.shared;
        let (delivered, fault_gens) = (self.cursor.last_delivered(), self.fault_gens());
        let avoiding = self.avoiding();
        let own_turn = shared.is_none_or(|s| s.own_turn(self.now / self.cfg.heartbeat_interval_ns));
        for (r, rail) in self.rails.iter_mut().enumerate() {
            if rail.state == RailState::Failed {
                continue;
            }
            // The active rail carried data writes (their immediates carry the beat) and another
            // live rail's block carries the beat and what this side delivered: this beat rides
            // on the next data write instead of a block of its own, unless none is posted within
            // a quarter interval (then the block goes after all). The active rail's own
            // acknowledgements and credits go when their thresholds make a block due. Only once
            // a block gave the peer this rail's full beat number.
            if rail.state == RailState::Active
                && rail.beat_in_data
                && live > 1
                && rail.block_beat != 0
            {
                self.beat_owed_at = Some(owed_at);
                self.beat_sent_at[r] = self.now;
            } else if shared.is_some_and(|s| s.covered[r])
                && rail.peer_heartbeat != 0
                && rail.block_beat != 0
                && !own_turn
                && !rail.has_news(delivered, fault_gens, avoiding)
            {
                // Another connection between the same endpoints beat this rail this interval:
                // that proves the path; this block would say nothing more.
            } else {
                rail.ctrl_due = true;
                self.beat_sent_at[r] = self.now;
            }
            rail.beat_in_data = false;
            // A rail that has not yet heard the peer since it (re)connected gets a longer grace:
            // the first packets of a new connection can take tens of ms (address resolution).
            let proven = rail.peer_heartbeat != 0;
            // A rail the peer's data arrived on since its last block: the peer may hold the
            // next beat back for a quarter interval, for a data write to carry it.
            let held_back = if rail.data_since_block {
                self.cfg.heartbeat_interval_ns / 4
            } else {
                0
            };
            let limit = if proven {
                timeout + held_back
            } else {
                timeout.max(self.cfg.first_contact_grace_ns)
            };
            // With shared liveness, a proven rail is heard whenever any connection between the
            // same endpoints heard the peer on it.
            let seen = match shared {
                Some(s) if proven => rail.peer_seen_at.max(s.heard_at[r]),
                _ => rail.peer_seen_at,
            };
            if self.now.saturating_sub(seen) > limit {
                silent_since[r] = Some(seen + limit);
            } else {
                all_silent = false;
            }
            if proven {
                latest_heard = latest_heard.max(Some(seen));
                latest_beat = latest_beat.max(rail.peer_heartbeat);
            }
        }
        if let Some(s) = &mut self.shared {
            s.covered = [false; MAX_RAILS];
        }
        let mut failed_any = false;
        for (r, since) in silent_since.into_iter().enumerate() {
            let Some(since) = since else { continue };
            let rail = &self.rails[r];
            // A rail carrying the peer's data may lack the one beat the peer skipped (it rides on
            // the next data write): one beat more before it counts as missed.
            let skipped = u64::from(rail.data_since_block);
            let missed = latest_beat >= rail.peer_heartbeat.max(rail.beat_floor) + misses + skipped;
            // Otherwise silent, but the others carried nothing it missed: the peer fell silent.
            if missed && latest_heard.is_some_and(|heard| heard > since) {
                self.fail_rail(r, FailReason::HeartbeatMiss);
                if self.shared.is_some() {
                    self.missed_rails |= 1 << r;
                }
                failed_any = true;
            }
        }
        if failed_any || !all_silent || self.ended.is_some() {
            return;
        }
        if !silent_since.iter().any(|s| s.is_some()) {
            return; // no live rail at all (the session ends elsewhere)
        }
        match self.unresponsive_since {
            None => {
                tracing::warn!("every rail silent: peer unresponsive");
                self.unresponsive_since = Some(self.now);
                self.push_event(Event::PeerUnresponsive { at: self.now });
            }
            Some(since) if self.now.saturating_sub(since) >= self.cfg.session_timeout_ns => {
                self.end(EndReason::SessionTimeout);
            }
            Some(_) => {}
        }
    }

    /// The peer answered on some rail: if it was unresponsive, every rail gets a fresh window
    /// (the peer's blocks on the other rails may be a moment behind).
    fn peer_heard(&mut self) {
        if let Some(since) = self.unresponsive_since.take() {
            let silent_ns = self.now.saturating_sub(since);
            tracing::info!(silent_ns, "peer responsive again");
            for r in self.rails.iter_mut() {
                r.peer_seen_at = self.now;
            }
            self.push_event(Event::PeerResponsive {
                silent_ns,
                at: self.now,
            });
        }
    }

    /// Ends a graceful close once the peer delivered everything sent, or the linger ran out.
    fn check_close(&mut self) {
        let Some(until) = self.closing_until else {
            return;
        };
        if self.ended.is_some() {
            return;
        }
        let drained = self.peer_delivered >= self.last_sent_seq();
        if drained || self.now >= until {
            if !drained {
                tracing::warn!(
                    undelivered = self.last_sent_seq() - self.peer_delivered,
                    "close: linger ran out; unacknowledged records stay in unacked()"
                );
            }
            self.end(EndReason::Closed);
        }
    }

    /// A completion from `rail`'s queue pair.
    pub fn handle_completion(&mut self, rail: usize, c: &Completion) {
        // An unproven rail reads a beat carried by data against the latest heard on any rail.
        let beat_base = match self.rails.get(rail) {
            Some(r)
                if r.peer_heartbeat == 0 && matches!(c.kind, CompletionKind::RecvImm { .. }) =>
            {
                self.latest_peer_beat()
            }
            _ => 0,
        };
        let Some(r) = self.rails.get_mut(rail) else {
            return;
        };
        // A full `poll_io` scan follows only what can make a receive post or a control block
        // due (the common completion, a data write's or a record's, changes neither: new
        // records are looked for on every poll anyway).
        let recvs_low = self.cfg.link.max_recv_wr / 2;
        match c.kind {
            CompletionKind::Write => {
                if wr_generation(c.wr_id) != r.generation {
                    return; // from a queue pair since replaced
                }
                self.stats.write_completions += 1;
                // A signaled write's completion reports the unsignaled ones before it too.
                r.outstanding = r.outstanding.saturating_sub(1 + wr_covered(c.wr_id));
                if wr_kind(c.wr_id) == KIND_BYE {
                    self.bye_outstanding = self.bye_outstanding.saturating_sub(1);
                }
                if self.ended.is_some() {
                    self.rescan = true;
                    return; // the session is over: nothing more to fail
                }
                if c.status != WcStatus::Success {
                    self.rescan = true;
                    self.fail_rail(rail, FailReason::Completion(c.status));
                } else {
                    r.completion_latency(self.now);
                    // A block waiting for a free work request may go now.
                    self.rescan |= r.ctrl_due;
                }
            }
            CompletionKind::RecvImm { imm, .. } => {
                r.recv_credits = r.recv_credits.saturating_sub(1);
                self.rescan |= r.recv_credits <= recvs_low;
                if r.state == RailState::Failed {
                    return; // a late write on a dead rail: ignored
                }
                r.notified += 1;
                // Return credits well before the sender runs out of them.
                if r.notified - r.reported_notified >= (self.cfg.link.max_recv_wr / 8).max(1) as u64
                {
                    r.ctrl_due = true;
                    self.rescan = true;
                }
                match r.rx.notify(imm) {
                    Ok(()) => {
                        self.arrived |= 1 << rail;
                        r.data_since_block = true;
                        let heard = r.heard_beat_low_bits(imm >> NOTIFY_BITS, beat_base, self.now);
                        if self.inbound != rail {
                            self.inbound = rail;
                            self.note_busy_rails();
                        }
                        if heard {
                            self.rescan = true;
                            self.peer_heard();
                        }
                        if imm & CREDIT_BIT != 0 {
                            self.credits_carried(rail);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(rail, error = %e, "impossible notification");
                        self.rescan = true;
                        self.fail_rail(rail, FailReason::Protocol);
                    }
                }
            }
            CompletionKind::Recv => {
                r.recv_credits = r.recv_credits.saturating_sub(1);
                self.rescan |= r.recv_credits <= recvs_low;
            }
        }
    }

    /// The peer's data write on `rail` carried a credit bit: it processed another
    /// [`CREDIT_QUANTUM`] of this side's writes there. Out of line: one write in 16 at most.
    #[inline(never)]
    fn credits_carried(&mut self, rail: usize) {
        let max_recv = u64::from(self.cfg.link.max_recv_wr);
        let r = &mut self.rails[rail];
        r.peer_carried += CREDIT_QUANTUM;
        if r.peer_carried > r.imm_posted {
            tracing::warn!(
                rail,
                carried = r.peer_carried,
                posted = r.imm_posted,
                "peer's credit bits count more notifications than were sent"
            );
            self.rescan = true;
            self.fail_rail(rail, FailReason::Protocol);
            return;
        }
        // Writes held back for want of credits may go now.
        self.rescan |= r.imm_posted - r.peer_notified >= max_recv / 2;
        r.peer_notified = r.peer_notified.max(r.peer_carried);
    }

    /// A rail whose mirror held a record that failed its checks (length, crc, sequence):
    /// out of line, so that the receive path doesn't save registers for the logging call.
    #[cold]
    #[inline(never)]
    fn bad_data(&mut self, rail: usize, e: railover_segq::ConsumeError) {
        tracing::warn!(rail, error = %e, "bad data on rail");
        self.fail_rail(rail, FailReason::Corruption);
    }

    /// An asynchronous event of `rail`'s card (or its queue pair).
    pub fn handle_event(&mut self, rail: usize, ev: AsyncEvent) {
        if rail >= self.rails.len() {
            return;
        }
        self.rescan = true;
        match ev {
            AsyncEvent::PortDown => self.fail_rail(rail, FailReason::PortDown),
            AsyncEvent::DeviceFatal => self.fail_rail(rail, FailReason::DeviceFatal),
            AsyncEvent::QpFatal { .. } => self.fail_rail(rail, FailReason::QpFatal),
            AsyncEvent::PortActive => self.rails[rail].port_active = true,
            AsyncEvent::Other(_) => {}
        }
    }

    /// The driver connected a fresh queue pair pair on `rail` (both sides call this). The rail's
    /// rings restart empty and it becomes a standby.
    pub fn rail_rearmed(&mut self, rail: usize, now: Nanos) {
        self.now = self.now.max(now);
        // Ended (terminal: the user was told, and holds the unacknowledged records), or no
        // such rail.
        if self.ended.is_some() || rail >= self.rails.len() {
            return;
        }
        if self.rails[rail].state != RailState::Failed {
            self.fail_rail(rail, FailReason::Rearm);
            if self.ended.is_some() {
                return;
            }
        }
        let now = self.now;
        if !self.lanes.reset(rail, 1) {
            // Unreachable: a failed rail is never the active lane while the core lives.
            tracing::error!(rail, "refusing to reset the active lane");
            return;
        }
        // Measured against the beats the other rails carried so far.
        let floor = self.latest_peer_beat();
        let r = &mut self.rails[rail];
        r.rx.reset();
        for word in (0..CTRL_LEN).step_by(8) {
            r.ctrl_in.write_u64(word, 0);
        }
        r.generation = r.generation.wrapping_add(1);
        r.state = RailState::Standby;
        r.peer_heartbeat = 0;
        r.peer_seen_at = now;
        r.beat_floor = floor;
        r.outstanding = 0;
        r.unsignaled = 0;
        r.beat_in_data = false;
        r.data_since_block = false;
        r.block_beat = 0;
        r.conveyed_beat = 0;
        r.recv_credits = 0;
        r.ctrl_due = true;
        r.reported_consumed = 0;
        r.port_active = false;
        r.rearm_requested = false;
        r.imm_posted = 0;
        r.peer_notified = 0;
        r.notified = 0;
        r.reported_notified = 0;
        r.carried_notified = 0;
        r.peer_carried = 0;
        r.reported_delivered = 0;
        r.reported_fault_gens = 0;
        r.reported_avoiding = 0;
        r.peer_avoiding = 0;
        r.peer_avoiding_beat = 0;
        r.ctrl_seen = [0; 7];
        r.signaled_posted = 0;
        r.signaled_done = 0;
        r.probe = None;
        r.latency_ns = 0;
        r.completions = 0;
        r.ack_request = false;
        r.peer_wants_ack = false;
        self.rescan = true;
        tracing::info!(rail, generation = r.generation, "rail re-armed as standby");
        self.peer_draining = self.rails.iter().any(|x| x.peer_wants_ack);
        self.push_event(Event::RailUp { rail, at: now });
        self.refresh_rail_stats();
    }

    /// The rail could not be connected at set-up: it starts failed (the others carry the
    /// traffic) and joins through re-arm once its wire is back.
    pub fn rail_unreachable(&mut self, rail: usize) {
        if rail < self.rails.len() {
            self.fail_rail(rail, FailReason::Unreachable);
        }
    }

    /// The driver could not post to `rail` (the queue pair is unusable).
    pub fn link_error(&mut self, rail: usize) {
        if rail < self.rails.len() {
            self.fail_rail(rail, FailReason::Completion(WcStatus::Other(u32::MAX)));
        }
    }

    /// The driver lost the channel it re-arms rails over: redundancy lost from now on can't be
    /// restored (the user is told).
    pub fn rearm_channel_lost(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        self.rearm_channel_down = true;
        self.push_event(Event::RearmChannelLost { at: self.now });
    }

    /// The driver has a re-arm channel again.
    pub fn rearm_channel_restored(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        self.rearm_channel_down = false;
        self.push_event(Event::RearmChannelRestored { at: self.now });
    }

    /// Whether the re-arm channel is lost right now (between [`Event::RearmChannelLost`] and
    /// [`Event::RearmChannelRestored`]): a rail that fails meanwhile can't come back yet.
    pub fn rearm_channel_down(&self) -> bool {
        self.rearm_channel_down
    }

    /// The driver could not re-arm `rail` now; it will be asked again later.
    pub fn rearm_failed(&mut self, rail: usize, now: Nanos) {
        self.now = self.now.max(now);
        let Some(r) = self.rails.get_mut(rail) else {
            return;
        };
        if r.state == RailState::Failed {
            r.rearm_requested = false;
            r.port_active = false;
            r.failed_at = self.now;
        }
        self.rescan = true;
    }

    // ---- internals ----

    /// The highest heartbeat number the peer sent that any live rail carried.
    fn latest_peer_beat(&self) -> u64 {
        self.rails
            .iter()
            .filter(|r| r.state != RailState::Failed)
            .map(|r| r.peer_heartbeat)
            .max()
            .unwrap_or(0)
    }

    /// The rails the peer avoids, as its newest block says (a lossy rail's blocks arrive late:
    /// an older one must not undo what a newer one on another rail said).
    fn peer_avoiding(&self) -> u8 {
        let live = || self.rails.iter().filter(|r| r.state != RailState::Failed);
        let newest = live().map(|r| r.peer_avoiding_beat).max().unwrap_or(0);
        live()
            .filter(|r| r.peer_avoiding_beat == newest)
            .fold(0, |bits, r| bits | r.peer_avoiding)
    }

    /// The standbys a planned switch left within its hold-down (bit per rail): the peer follows.
    fn avoiding(&self) -> u8 {
        let now = self.now;
        (self.rails.iter().enumerate())
            .filter(|(_, r)| r.avoid_until > now && r.state == RailState::Standby)
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }

    fn fault_gens(&self) -> u64 {
        let mut c = CtrlBlock::default();
        for (r, rail) in self.rails.iter().enumerate() {
            if rail.state == RailState::Failed {
                c.set_fault_gen(r, rail.generation.wrapping_add(1));
            }
        }
        c.fault_gens
    }

    /// Reads the peer's control blocks: heartbeats, acknowledgements, fault reports.
    fn process_ctrl(&mut self) {
        for r in 0..self.rails.len() {
            if self.rails[r].state == RailState::Failed {
                continue;
            }
            let raw = CtrlBlock::read_raw(&self.rails[r].ctrl_in);
            // Word by word, not `==` (which calls memcmp on every progress).
            let seen = &self.rails[r].ctrl_seen;
            if raw.iter().zip(seen).fold(0, |diff, (a, b)| diff | (a ^ b)) == 0 {
                continue; // nothing new (no heartbeat, acknowledgement or report since)
            }
            self.rescan = true;
            let Some(c) = CtrlBlock::decode(&raw) else {
                // Torn (the write is still landing) or corrupt: not remembered, so the next poll
                // looks again even if the crc word is the one that already landed.
                continue;
            };
            self.rails[r].ctrl_seen = raw;
            let now = self.now;
            let rail = &mut self.rails[r];
            // Beats only move forward: a data write's immediate may have carried a later one.
            if c.heartbeat > rail.peer_heartbeat {
                rail.peer_heartbeat = c.heartbeat;
                rail.data_since_block = false;
                rail.peer_seen_at = now;
                self.peer_heard();
            }
            let rail = &mut self.rails[r];
            if c.notified > rail.imm_posted {
                tracing::warn!(
                    rail = r,
                    notified = c.notified,
                    posted = rail.imm_posted,
                    "peer processed more notifications than were sent"
                );
                self.fail_rail(r, FailReason::Protocol);
                continue;
            }
            rail.peer_notified = rail.peer_notified.max(c.notified);
            let last_sent = self.lanes.last_committed_seq();
            if c.delivered_seq > last_sent.max(self.peer_delivered) {
                tracing::warn!(
                    rail = r,
                    delivered = c.delivered_seq,
                    last_sent,
                    "peer acknowledged unsent records"
                );
                self.fail_rail(r, FailReason::Protocol);
                continue;
            }
            self.peer_delivered = self.peer_delivered.max(c.delivered_seq);
            // What the peer delivered counts on the active lane too, whichever rail said so:
            // its own blocks may be skipped while it carries data.
            let active = self.active;
            self.lanes
                .poster(active)
                .note_delivered(self.peer_delivered);
            if let Err(e) = self
                .lanes
                .poster(r)
                .ack(c.consumed_pos, self.peer_delivered)
            {
                tracing::warn!(rail = r, error = %e, "impossible acknowledgement");
                self.fail_rail(r, FailReason::Protocol);
                continue;
            }
            let wants_ack = c.status & STATUS_ACK_NOW != 0;
            if wants_ack && !self.rails[r].peer_wants_ack {
                self.rails[r].ctrl_due = true; // what is consumed already, at once
            }
            self.rails[r].peer_wants_ack = wants_ack;
            self.peer_draining = self.rails.iter().any(|x| x.peer_wants_ack);
            self.rails[r].peer_avoiding = (c.status >> STATUS_AVOIDING_SHIFT) as u8;
            self.rails[r].peer_avoiding_beat = c.heartbeat;
            match c.status & STATUS_MASK {
                STATUS_LIVE => {}
                STATUS_CLOSED => {
                    tracing::info!(rail = r, "peer closed the connection");
                    self.end(EndReason::PeerClosed);
                    return;
                }
                _ => {
                    tracing::warn!(rail = r, status = c.status, "peer's session ended");
                    self.end(EndReason::PeerEnded);
                    return;
                }
            }
            for other in 0..self.rails.len() {
                let g = c.fault_gen(other);
                if g != 0
                    && g == self.rails[other].generation.wrapping_add(1)
                    && self.rails[other].state != RailState::Failed
                {
                    self.fail_rail(other, FailReason::PeerReport);
                }
            }
        }
        self.check_switch();
        if let Some((since, first_seq)) = self.blackout_from {
            if self.peer_delivered >= first_seq {
                let blackout_ns = self.now.saturating_sub(since);
                self.blackout_from = None;
                self.stats.record_blackout(blackout_ns);
                tracing::info!(rail = self.active, blackout_ns, "failover complete");
                self.push_event(Event::FailoverComplete {
                    rail: self.active,
                    blackout_ns,
                });
            }
        }
    }

    /// Gray failure: at a heartbeat tick, whether the active rail's card has counted the
    /// configured retransmissions in the current window, or the rail has been slower than the
    /// best standby by more than the margin for the whole window; if so, a planned switch
    /// begins.
    fn check_gray(&mut self) {
        let Some(gray) = self.cfg.gray else { return };
        let now = self.now;
        // Retransmissions: counted per window (the cards' counters, reported by the driver),
        // and judged at every tick on the count so far, so the switch comes as soon as the
        // window holds enough of them rather than at its end.
        let limit = u64::from(gray.retransmits_per_window);
        let window_done =
            limit > 0 && now.saturating_sub(self.retransmit_window_start) >= gray.window_ns;
        // (No switch while a failover's kept records wait for room: see `begin_switch`.)
        let may_switch = self.switching.is_none()
            && self.ended.is_none()
            && self.unresponsive_since.is_none()
            && !self.lanes.keeps_records();
        let a = self.active;
        let peer_avoiding = self.peer_avoiding();
        if may_switch && limit > 0 && self.rails[a].retransmissions_so_far() >= limit {
            let calm = (0..self.rails.len())
                .filter(|&i| {
                    self.switch_target(i, peer_avoiding)
                        && self.rails[i].retransmissions_base.is_some()
                        && self.rails[i].retransmissions_so_far() < limit
                })
                .min_by_key(|&i| self.rails[i].retransmissions_so_far());
            if let Some(to) = calm {
                let reason = SwitchReason::Retransmitting {
                    active: self.rails[a].retransmissions_so_far(),
                    standby: self.rails[to].retransmissions_so_far(),
                };
                tracing::warn!(
                    from = a,
                    to,
                    ?reason,
                    "active rail retransmitting: switching"
                );
                self.degraded_since = None;
                // A fresh window: the new active rail's count starts from zero, as it did when
                // the count was judged only at a window's end (a standby one short of the limit
                // must not be left again at its next retransmission).
                self.roll_retransmit_window(true);
                self.begin_switch(to, reason);
                return;
            }
        }
        self.roll_retransmit_window(window_done);
        if !may_switch {
            return;
        }
        let eligible = |i: usize| self.switch_target(i, peer_avoiding);
        let active_latency_ns = self.rails[a].current_latency(now);
        let best = (0..self.rails.len())
            .filter(|&i| eligible(i) && self.rails[i].latency_ns != 0)
            .min_by_key(|&i| self.rails[i].current_latency(now));
        match best {
            Some(to)
                if active_latency_ns
                    > self.rails[to]
                        .current_latency(now)
                        .saturating_add(gray.margin_ns) =>
            {
                let since = *self.degraded_since.get_or_insert(now);
                if now - since >= gray.window_ns {
                    self.degraded_since = None;
                    let reason = SwitchReason::Degraded {
                        active_latency_ns,
                        standby_latency_ns: self.rails[to].current_latency(now),
                    };
                    tracing::warn!(from = a, to, ?reason, "active rail degraded: switching");
                    self.begin_switch(to, reason);
                }
            }
            _ => self.degraded_since = None,
        }
    }

    /// At a retransmission window's end, the next one starts: each rail's count of the window
    /// just done is kept (for [`Core::rail_retransmissions_in_window`]) and counting starts
    /// again from its card's total.
    fn roll_retransmit_window(&mut self, window_done: bool) {
        if !window_done {
            return;
        }
        self.retransmit_window_start = self.now;
        for r in &mut self.rails {
            if let Some(base) = r.retransmissions_base {
                r.retransmissions_in_window = r.retransmissions.saturating_sub(base);
                r.retransmissions_base = Some(r.retransmissions);
            }
        }
    }

    /// Whether a planned switch may go to rail `i`: a standby that heard the peer, and neither
    /// side's planned switches left it within their hold-downs (else this side would sit on a
    /// rail the peer avoids, or go there only to follow the peer off again).
    fn switch_target(&self, i: usize, peer_avoiding: u8) -> bool {
        let r = &self.rails[i];
        i != self.active
            && r.state == RailState::Standby
            && r.peer_heartbeat != 0
            && r.avoid_until <= self.now
            && peer_avoiding & (1 << i) == 0
    }

    /// The peer left this side's active rail by a planned switch (it found it slow or lossy;
    /// the wire carries both directions): at a heartbeat tick, leave it too, for a rail neither
    /// side avoids. Whether or not this side runs a gray switch of its own.
    fn follow_peer_switch(&mut self) {
        let a = self.active;
        let peer_avoiding = self.peer_avoiding();
        if peer_avoiding & (1 << a) == 0
            || self.switching.is_some()
            || self.ended.is_some()
            || self.unresponsive_since.is_some()
            || self.lanes.keeps_records()
        {
            return;
        }
        let now = self.now;
        let to = (0..self.rails.len())
            .filter(|&i| self.switch_target(i, peer_avoiding))
            .min_by_key(|&i| self.rails[i].current_latency(now));
        if let Some(to) = to {
            let reason = SwitchReason::PeerLeft { rail: a };
            tracing::warn!(from = a, to, "the peer left the active rail: following");
            self.degraded_since = None;
            self.begin_switch(to, reason);
        }
    }

    /// Starts a planned switch to `to`. Hot-hot: at once (the standby already holds the
    /// stream). Otherwise the active rail stops posting and asks the peer to acknowledge at
    /// once; [`Core::check_switch`] finishes when the peer delivered what it posted.
    fn begin_switch(&mut self, to: usize, reason: SwitchReason) {
        if self.lanes.keeps_records() {
            // A failover's kept records wait for room on the active rail: they go first (the
            // lanes would refuse the switch); a later tick may switch.
            return;
        }
        if self.cfg.mode == RailMode::HotHot {
            self.finish_switch(to, reason);
            return;
        }
        self.switching = Some(Switch {
            to,
            reason,
            deadline: self.now + self.cfg.heartbeat_interval_ns,
        });
        // The target's block carries the answer the drain waits for.
        self.note_busy_rails();
        // Asked on every live rail: the answer comes back on the fastest.
        for rail in self
            .rails
            .iter_mut()
            .filter(|r| r.state != RailState::Failed)
        {
            rail.ack_request = true;
            rail.ctrl_due = true;
        }
        self.rescan = true;
        self.check_switch();
    }

    /// Finishes a planned switch once the drain is done (or, past its deadline of a heartbeat
    /// interval, with what is still unacknowledged sent again on the new rail: a rail this slow
    /// is not waited for), or abandons it if the target failed.
    fn check_switch(&mut self) {
        let Some(sw) = self.switching else { return };
        let a = self.active;
        if self.ended.is_some() || self.rails[sw.to].state != RailState::Standby {
            self.abandon_switch(sw);
            return;
        }
        if self.peer_delivered >= self.lanes.poster_ref(a).last_posted_seq() {
            self.finish_switch(sw.to, sw.reason);
        } else if self.now >= sw.deadline {
            tracing::warn!(
                from = a,
                to = sw.to,
                "planned switch: drain not acknowledged in time; resending the rest"
            );
            self.finish_switch(sw.to, sw.reason);
        }
    }

    /// The drain is over: a block without the request goes on every rail that carried it (else
    /// the peer, whose last block said so, would go on acknowledging every receive).
    fn end_ack_requests(&mut self) {
        for rail in &mut self.rails {
            if std::mem::take(&mut rail.ack_request) && rail.state != RailState::Failed {
                rail.ctrl_due = true;
            }
        }
    }

    fn abandon_switch(&mut self, sw: Switch) {
        let a = self.active;
        self.switching = None;
        self.note_busy_rails();
        self.end_ack_requests();
        self.rescan = true;
        if self.ended.is_none() {
            self.stats.abandoned_switches += 1;
            self.push_event(Event::SwitchAbandoned {
                from: a,
                to: sw.to,
                at: self.now,
            });
        }
    }

    /// Makes `to` the active rail while the old one works: it keeps what it posted (delivered,
    /// or in hot-hot also held by `to`), its unposted records move to `to`, and it stays a
    /// standby that later planned switches avoid for the hold-down.
    fn finish_switch(&mut self, to: usize, reason: SwitchReason) {
        let from = self.active;
        self.switching = None;
        self.note_busy_rails();
        self.end_ack_requests();
        self.rescan = true;
        let posted_before = self.lanes.poster_ref(from).last_posted_seq();
        match self.lanes.switch_to(to) {
            Ok((rep, _)) => {
                // The copy is a run of sequence numbers; those up to `posted_before` went out
                // on `from` already.
                let resent = match (rep.first_seq, rep.last_seq) {
                    (Some(first), Some(last)) if first <= posted_before => {
                        (last.min(posted_before) - first + 1) as usize
                    }
                    _ => 0,
                };
                self.stats.records_resent += resent as u64;
                self.rails[to].state = RailState::Active;
                self.rails[from].state = RailState::Standby;
                self.active = to;
                self.note_busy_rails();
                let hold = self.cfg.gray.map_or(0, |g| g.hold_down_ns);
                self.rails[from].avoid_until = self.now.saturating_add(hold);
                if hold > 0 {
                    // Tell the peer at once that this side avoids `from` (it follows).
                    for rail in self.rails.iter_mut() {
                        rail.ctrl_due |= rail.state != RailState::Failed;
                    }
                }
                if self.cfg.mode != RailMode::HotHot {
                    // They went to `to`: padding replaces them here, posted to keep the peer's
                    // mirror in step. (Hot-hot: `from` is a standby holding the stream.)
                    self.lanes.retire_unposted(from);
                }
                self.standby_due = true;
                self.stats.planned_switches += 1;
                tracing::info!(from, to, records = rep.records, "planned switch");
                self.push_event(Event::Switched {
                    from,
                    to,
                    reason,
                    records: rep.records,
                    resent,
                    at: self.now,
                });
                self.refresh_rail_stats();
            }
            Err(e) => {
                tracing::error!(from, to, error = %e, "planned switch: standby could not take the records");
                self.stats.abandoned_switches += 1;
                self.push_event(Event::SwitchAbandoned {
                    from,
                    to,
                    at: self.now,
                });
            }
        }
    }

    fn fail_rail(&mut self, r: usize, reason: FailReason) {
        if self.rails[r].state == RailState::Failed || self.ended.is_some() {
            return; // (after the session ended nothing is failed over: it is over)
        }
        let was_active = self.rails[r].state == RailState::Active;
        if let Some(sw) = self.switching.filter(|sw| sw.to == r) {
            self.abandon_switch(sw); // (a re-arm fails it and makes it a fresh standby at once)
        }
        let now = self.now;
        self.rescan = true;
        let rail = &mut self.rails[r];
        rail.state = RailState::Failed;
        rail.failed_at = now;
        rail.port_active = false;
        rail.rearm_requested = false;
        rail.last_failure = Some(reason);
        tracing::warn!(rail = r, ?reason, "rail down");
        self.io.push_back(Io::ShutDown { rail: r });
        self.push_event(Event::RailDown {
            rail: r,
            reason,
            at: now,
        });
        // Tell the peer over every rail still alive (an owed beat goes with it).
        self.beat_owed_at = None;
        for other in self
            .rails
            .iter_mut()
            .filter(|x| x.state != RailState::Failed)
        {
            other.ctrl_due = true;
        }
        if was_active && self.ended.is_none() {
            self.failover_from(r);
        }
        if self.ended.is_none() && self.rails.iter().all(|x| x.state == RailState::Failed) {
            self.end(EndReason::AllRailsDown);
        }
        self.refresh_rail_stats();
    }

    fn failover_from(&mut self, from: usize) {
        if let Some(sw) = self.switching.take() {
            tracing::warn!(from, to = sw.to, "planned switch overtaken by a failure");
            self.end_ack_requests();
        }
        // Prefer a standby that has proven its path (heard the peer), and of those the one
        // holding most of the stream (hot-hot); any standby beats none.
        // Active-standby: one a planned switch of either side left recently (slow) comes last.
        let standby = |i: &usize| self.rails[*i].state == RailState::Standby;
        let hot = self.cfg.mode == RailMode::HotHot;
        let now = self.now;
        let peer_avoiding = self.peer_avoiding();
        let proven = (0..self.rails.len())
            .filter(standby)
            .filter(|&i| self.rails[i].peer_heartbeat != 0)
            .max_by_key(|&i| {
                let holds = if hot {
                    self.lanes.poster_ref(i).committed_seq()
                } else {
                    0
                };
                (
                    holds,
                    self.rails[i].avoid_until <= now && peer_avoiding & (1 << i) == 0,
                    std::cmp::Reverse(i),
                )
            });
        let Some(to) = proven.or_else(|| (0..self.rails.len()).find(standby)) else {
            self.end(EndReason::AllRailsDown);
            return;
        };
        let (rep, next_seq) = self.lanes.fail_over(to);
        self.rails[to].state = RailState::Active;
        self.active = to;
        self.note_busy_rails();
        self.stats.failovers += 1;
        self.stats.records_resent += rep.records as u64;
        self.stats.bytes_resent += rep.bytes as u64;
        let first = rep.first_seq.unwrap_or(next_seq);
        self.blackout_from = Some((self.now, first));
        let caught_up = self.cfg.mode == RailMode::HotHot && rep.records == 0;
        let kept = self.lanes.keeps_records();
        tracing::warn!(
            from,
            to,
            records = rep.records,
            bytes = rep.bytes,
            kept,
            "failover"
        );
        self.push_event(Event::Failover {
            from,
            to,
            records: rep.records,
            bytes: rep.bytes,
            at: self.now,
        });
        if caught_up {
            // Hot-hot: the standby already carried every record; nothing waits.
            self.blackout_from = None;
            self.stats.record_blackout(0);
            self.push_event(Event::FailoverComplete {
                rail: to,
                blackout_ns: 0,
            });
        }
    }

    /// Ends the session (terminal): no more sends; the peer is told over every rail still alive.
    fn end(&mut self, reason: EndReason) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(reason);
        self.rescan = true;
        self.unresponsive_since = None;
        self.lanes.close_with(reason_code(reason));
        // The goodbye goes on every live rail, unless the peer's own goodbye ended it (the peer
        // knows; a goodbye left due would keep `bye_pending` true, and a dropped connection
        // would wait out its whole linger for it).
        let tell = !matches!(reason, EndReason::PeerClosed | EndReason::PeerEnded);
        for (r, rail) in self.rails.iter().enumerate() {
            self.bye_due[r] = tell && rail.state != RailState::Failed;
        }
        if reason == EndReason::AllRailsDown {
            tracing::error!("all rails down");
            self.push_event(Event::AllRailsDown { at: self.now });
        } else {
            tracing::warn!(%reason, "session ended");
        }
        self.push_event(Event::Ended {
            reason,
            at: self.now,
        });
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            // A user who never reads events still has the counters; the loss is counted.
            if self.stats.events_dropped == 0 {
                tracing::warn!("event queue full: dropping the oldest (see Stats::events_dropped)");
            }
            self.stats.events_dropped += 1;
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn refresh_rail_stats(&mut self) {
        for (i, r) in self.rails.iter().enumerate() {
            self.stats.rail_states[i] = Some(r.state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver's report about a rail the connection doesn't have is ignored, not a panic (an
    /// index out of bounds, before session 22, for `rail_rearmed`, `rearm_failed` and
    /// `fail_silent_rail`), and changes nothing.
    #[test]
    fn reports_about_a_rail_the_core_does_not_have_are_ignored() {
        let cfg = Config::builder().rails(2).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        core.rail_rearmed(2, 10);
        core.rearm_failed(9, 10);
        core.fail_silent_rail(2);
        core.handle_event(7, AsyncEvent::PortDown);
        core.rail_unreachable(3);
        core.link_error(4);
        core.note_retransmissions(5, 1);
        assert_eq!(core.rail_state(0), RailState::Active);
        assert_eq!(core.rail_state(1), RailState::Standby);
        assert_eq!(core.stats().failovers, 0);
        assert!(core.end_reason().is_none());
    }

    /// A peer whose credit bits claim more processed notifications than this side ever sent
    /// (buggy or hostile) gets its rail failed as a protocol error; the count is not trusted, so
    /// no write could overrun its receive queue.
    #[test]
    fn credit_bits_beyond_the_writes_sent_fail_the_rail_as_a_protocol_error() {
        let cfg = Config::builder().rails(2).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        let forged = Completion {
            wr_id: 0,
            kind: CompletionKind::RecvImm {
                imm: railover_segq::notify_imm_of(0) | CREDIT_BIT,
                byte_len: 0,
            },
            status: WcStatus::Success,
        };
        core.handle_completion(1, &forged);
        assert_eq!(core.rail_state(1), RailState::Failed);
        assert_eq!(core.rail_state(0), RailState::Active);
        assert_eq!(
            core.rails[1].peer_notified, 0,
            "the forged credits were not taken"
        );
        let mut down = None;
        while let Some(e) = core.poll_event() {
            if let Event::RailDown { rail, reason, .. } = e {
                down = Some((rail, reason));
            }
        }
        assert_eq!(down, Some((1, FailReason::Protocol)));
    }

    #[test]
    fn blackouts_fall_in_power_of_two_buckets_and_give_quantiles() {
        assert_eq!(blackout_bucket(0), 0);
        assert_eq!(blackout_bucket(1_999), 0);
        assert_eq!(blackout_bucket(2_000), 1);
        assert_eq!(blackout_bucket(3_999), 1);
        assert_eq!(blackout_bucket(4_000), 2);
        assert_eq!(blackout_bucket(1_000_000), 9); // 1 ms: [512, 1024) us
        assert_eq!(blackout_bucket(u64::MAX), BLACKOUT_BUCKETS - 1);
        let mut stats = Stats::default();
        assert_eq!(stats.blackout_quantile(0.5), None);
        for ns in [1_000, 3_000, 3_500, 900_000] {
            stats.record_blackout(ns);
        }
        assert_eq!(stats.last_blackout_ns, Some(900_000));
        assert_eq!(stats.blackouts.iter().sum::<u64>(), 4);
        assert_eq!(stats.blackout_quantile(0.25), Some(1_999));
        assert_eq!(stats.blackout_quantile(0.5), Some(3_999));
        assert_eq!(stats.blackout_quantile(1.0), Some(1_023_999));
    }

    fn block(heartbeat: u64) -> [u64; 7] {
        let r = Region::new(CTRL_LEN, railover_segq::Backing::Heap).unwrap();
        CtrlBlock {
            heartbeat,
            ..CtrlBlock::default()
        }
        .store(&r);
        r.read_words(0)
    }

    #[test]
    fn unread_events_are_dropped_oldest_first_and_counted() {
        let cfg = Config::builder()
            .backing(railover_segq::Backing::Heap)
            .build()
            .unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        for rail in 0..MAX_EVENTS + 10 {
            core.push_event(Event::RailUp { rail, at: 0 });
        }
        assert_eq!(core.stats().events_dropped, 10);
        assert_eq!(core.poll_event(), Some(Event::RailUp { rail: 10, at: 0 }));
    }

    /// A data write's immediate carries the beat number's low 7 bits: a later beat counts
    /// (across the wrap of the low bits), an earlier or equal one does not, and an unproven rail
    /// (no full beat number yet) learns nothing from it.
    #[test]
    fn beats_carried_by_data_count_only_forward() {
        let cfg = Config::builder().rails(2).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        let rail = &mut core.rails[0];
        assert!(
            !rail.heard_beat_low_bits(5, 0, 10),
            "unproven, and no beat heard anywhere"
        );
        assert_eq!(rail.peer_heartbeat, 0);
        // Unproven: the beat nearest the latest heard on another rail (600 = 4 * 128 + 88).
        assert!(rail.heard_beat_low_bits(89, 600, 15));
        assert_eq!(rail.peer_heartbeat, 601);
        rail.peer_heartbeat = 0;
        assert!(
            rail.heard_beat_low_bits(87, 600, 15),
            "one behind the other rail"
        );
        assert_eq!(rail.peer_heartbeat, 599);
        rail.peer_heartbeat = 126;
        assert!(rail.heard_beat_low_bits(127, 0, 20));
        assert_eq!((rail.peer_heartbeat, rail.peer_seen_at), (127, 20));
        assert!(rail.heard_beat_low_bits(1, 0, 30), "across the wrap");
        assert_eq!(rail.peer_heartbeat, 129);
        assert!(!rail.heard_beat_low_bits(1, 0, 40), "the same beat again");
        assert!(!rail.heard_beat_low_bits(127, 0, 50), "an older beat");
        assert_eq!((rail.peer_heartbeat, rail.peer_seen_at), (129, 30));
        assert_eq!(beat_bits(129) >> NOTIFY_BITS, 1);
        assert_eq!(beat_bits(129) & railover_segq::NOTIFY_MASK, 0);
        assert_eq!(
            beat_bits(u64::MAX) & CREDIT_BIT,
            0,
            "the beat leaves the credit bit"
        );
    }

    /// The poll's fast path compares only the crc word. A block whose crc word landed before the
    /// rest (a torn read) must still be processed on the poll after the rest lands, not a whole
    /// heartbeat interval later.
    #[test]
    fn a_block_read_torn_is_processed_once_it_has_landed() {
        let cfg = Config::builder().rails(2).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        core.start(0);
        let ctrl_in = core.rail_memory(1).3;
        let whole = block(7);
        // The crc word first, the rest still old (zero).
        ctrl_in.write_u64(CTRL_CRC_OFFSET, whole[CTRL_CRC_OFFSET / 8]);
        core.handle_timeout(1);
        assert!(!core.rail_proven(1), "a torn block was trusted");
        for (i, w) in whole.iter().enumerate() {
            ctrl_in.write_u64(i * 8, *w);
        }
        core.handle_timeout(2); // long before the next heartbeat tick
        assert!(core.rail_proven(1), "the landed block was not processed");
        // And a block that did not change is not processed again: a new one is.
        let next = block(8);
        for (i, w) in next.iter().enumerate() {
            ctrl_in.write_u64(i * 8, *w);
        }
        core.handle_timeout(3);
        assert_eq!(core.rails[1].peer_heartbeat, 8);
    }

    /// The rails a driver must poll every time: the one this side sends on and the one the
    /// peer's records arrive on; all of them when both sides send on all (hot-hot).
    #[test]
    fn the_busy_rails_are_those_carrying_records() {
        let cfg = |rails, mode| {
            Config::builder()
                .rails(rails)
                .rail_mode(mode)
                .build()
                .unwrap()
        };
        let core = Core::new(cfg(2, RailMode::ActiveStandby), 0).unwrap();
        assert_eq!(core.busy_rails(), 0b01);
        let core = Core::new(cfg(2, RailMode::HotHot), 0).unwrap();
        assert_eq!(core.busy_rails(), 0b11);
        let core = Core::new(cfg(3, RailMode::HotHot), 0).unwrap();
        assert_eq!(core.busy_rails(), 0b111);
    }

    /// The rail the peer's records arrive on is busy (polled every time) from its first
    /// notification, and quiet again once the peer writes elsewhere.
    #[test]
    fn the_rail_the_peer_writes_on_is_busy() {
        let cfg = Config::builder().rails(3).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        core.start(0);
        assert_eq!(core.busy_rails(), 0b001);
        // A write with immediate on each rail (its first 8 bytes, never parsed here), first on
        // rail 2.
        let write = Completion {
            wr_id: 0,
            kind: CompletionKind::RecvImm {
                imm: 1,
                byte_len: 8,
            },
            status: WcStatus::Success,
        };
        core.handle_completion(2, &write);
        assert_eq!(core.busy_rails(), 0b101);
        core.handle_completion(1, &write);
        assert_eq!(core.busy_rails(), 0b011, "rail 2 is quiet again");
        core.handle_completion(0, &write);
        assert_eq!(core.busy_rails(), 0b001);
    }

    /// A planned switch's target is busy while the drain waits for the answer its block
    /// carries, and quiet again once the switch is given up.
    #[test]
    fn a_planned_switchs_target_is_busy_while_it_drains() {
        let cfg = Config::builder().rails(3).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        core.start(0);
        let reason = SwitchReason::Retransmitting {
            active: 9,
            standby: 0,
        };
        // A record in flight on rail 0: the switch drains it first.
        core.push(&[1; 64]).unwrap();
        while let Some(io) = core.poll_io() {
            let _ = io; // posted (never completes here)
        }
        core.begin_switch(2, reason);
        let sw = core.switching.expect("a switch under way");
        assert_eq!(core.active_rail(), 0);
        assert_eq!(core.busy_rails(), 0b101);
        core.abandon_switch(sw);
        assert_eq!(core.busy_rails(), 0b001);
    }

    /// A quiet tick watching some rails does not see a block land on another (its driver looks
    /// at that rail later), but a failed rail anywhere makes it give way to the full tick: a
    /// failed rail's re-arm timer is due on no other clock.
    #[test]
    fn a_quiet_tick_watches_the_rails_it_is_given_and_every_rails_state() {
        let cfg = Config::builder().rails(2).build().unwrap();
        let mut core = Core::new(cfg, 0).unwrap();
        core.start(0);
        let ctrl_in = core.rail_memory(1).3;
        for (i, w) in block(7).iter().enumerate() {
            ctrl_in.write_u64(i * 8, *w);
        }
        assert!(core.quiet_tick(1, 0b01), "rail 1 is not watched");
        assert!(!core.rail_proven(1));
        assert!(!core.quiet_tick(2, 0b10), "rail 1's block changed");
        core.handle_timeout_watching(2, 0b10);
        assert!(core.rail_proven(1), "the block was processed");
        assert!(core.quiet_tick(3, 0b11));
        core.rails[1].state = RailState::Failed;
        assert!(!core.quiet_tick(4, 0b01), "a failed rail, watched or not");
    }
}
