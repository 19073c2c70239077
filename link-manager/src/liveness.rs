//! Liveness shared by the connections between the same two endpoints.
//!
//! Connections an [`crate::Endpoint`] holds with the same peer endpoint use the same card
//! pairs, and a silent black hole is a property of a card pair's path, not of one queue pair.
//! So each rail needs one heartbeat per interval from any of those connections, and any of them
//! hearing the peer on a rail proves the path for all. A `LivenessGroup` is that shared state;
//! each connection in it is a `Member` that reads the group's view before its heartbeat tick
//! and publishes what it sent and heard after its turn. The decisions stay in the sans-IO core
//! ([`crate::core::SharedLiveness`]). A rail one member finds silent is failed in the others
//! at their next tick.
//!
//! Control writes per second then depend on the number of card pairs, not of connections.
//! Each connection still beats its own queue pairs, once every
//! `max(`[`crate::core::OWN_BEAT_EVERY`]`, members)` intervals, at its own place in that
//! period: at most one such beat per rail and interval for the whole group, however many
//! connections it has.
//!
//! Both endpoints must share, or neither: a connection that skips its beats relies on the peer
//! counting the other connections' beats. Each endpoint's greeting names it (or says 0, for a
//! plain connection or an endpoint with [`crate::Endpoint::set_shared_liveness`] off), and a
//! connection joins a group only when both greetings name an endpoint.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::MAX_RAILS;
use crate::core::{Core, Nanos, SharedLiveness};

/// The state the connections to one peer endpoint share. Every access is Relaxed: the values
/// are times and a member token compared against each other, never a handover of other data;
/// the connections of an endpoint are driven by one thread (or a few, when moved out), and a
/// stale value costs at most one beat posted that was not needed, or one skipped that the
/// peer's three-interval timeout absorbs.
#[derive(Default)]
pub(crate) struct LivenessGroup {
    /// Per rail: the latest tick at which a member's beat went out on it, and which member.
    beat_at: [AtomicU64; MAX_RAILS],
    beat_by: [AtomicU32; MAX_RAILS],
    /// Per rail: the latest time a member heard the peer endpoint on it.
    heard_at: [AtomicU64; MAX_RAILS],
    /// Per rail: when a member last failed it for missed heartbeats.
    missed_at: [AtomicU64; MAX_RAILS],
    /// Members alive (each connection's own beats spread over this many intervals).
    members: AtomicU32,
}

/// One connection's place in a [`LivenessGroup`].
pub(crate) struct Member {
    group: Arc<LivenessGroup>,
    /// Never 0 (0 is "no member" in `beat_by`).
    token: u32,
    /// What this member published last (stores only when something changed).
    published_beat: [Nanos; MAX_RAILS],
    published_heard: [Nanos; MAX_RAILS],
    /// The group's last miss on each rail that this member acted on.
    missed_seen: [Nanos; MAX_RAILS],
}

impl Member {
    pub(crate) fn new(group: Arc<LivenessGroup>, token: u32) -> Member {
        // Misses before it joined are not about its queue pairs.
        let missed_seen = std::array::from_fn(|r| group.missed_at[r].load(Ordering::Relaxed));
        group.members.fetch_add(1, Ordering::Relaxed);
        Member {
            group,
            token: token.max(1),
            published_beat: [0; MAX_RAILS],
            published_heard: [0; MAX_RAILS],
            missed_seen,
        }
    }

    /// Before the core's timers run: at a heartbeat tick, hands it the group's view and fails
    /// the rails another member found silent since this one last looked.
    #[inline]
    pub(crate) fn before_tick(&mut self, core: &mut Core, now: Nanos) {
        if !core.heartbeat_due(now) {
            return;
        }
        let interval = core.config().heartbeat_interval_ns();
        let g = &self.group;
        let rails = core.config().rails();
        let mut view = SharedLiveness {
            members: u64::from(g.members.load(Ordering::Relaxed)),
            phase: u64::from(self.token),
            ..SharedLiveness::default()
        };
        for r in 0..rails {
            let at = g.beat_at[r].load(Ordering::Relaxed);
            let by = g.beat_by[r].load(Ordering::Relaxed);
            view.covered[r] = by != self.token && at != 0 && at + interval > now;
            view.heard_at[r] = g.heard_at[r].load(Ordering::Relaxed);
        }
        core.share_liveness(view);
        for r in 0..rails {
            let missed = g.missed_at[r].load(Ordering::Relaxed);
            if missed > self.missed_seen[r] {
                self.missed_seen[r] = missed;
                core.fail_silent_rail(r);
            }
        }
    }

    /// After the core's turn: publishes the beats it sent, what it heard, and the rails it
    /// found silent. A few compares per rail when nothing changed.
    #[inline]
    pub(crate) fn after_turn(&mut self, core: &mut Core, now: Nanos) {
        let g = &self.group;
        for r in 0..core.config().rails() {
            let sent = core.beat_sent_at(r);
            if sent > self.published_beat[r] {
                self.published_beat[r] = sent;
                g.beat_at[r].fetch_max(sent, Ordering::Relaxed);
                g.beat_by[r].store(self.token, Ordering::Relaxed);
            }
            if let Some(heard) = core.rail_heard_at(r) {
                if heard > self.published_heard[r] {
                    self.published_heard[r] = heard;
                    g.heard_at[r].fetch_max(heard, Ordering::Relaxed);
                }
            }
        }
        let missed = core.take_missed_rails();
        if missed != 0 {
            for r in (0..MAX_RAILS).filter(|r| missed & (1 << r) != 0) {
                let at = now.max(1);
                g.missed_at[r].fetch_max(at, Ordering::Relaxed);
                self.missed_seen[r] = self.missed_seen[r].max(at);
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.group.members.fetch_sub(1, Ordering::Relaxed);
    }
}
