//! Many connections on one endpoint per host (the simulated fabric): each card is shared by
//! every connection, one `poll` drives them all, and a card's fault fails over every one of
//! them; restored, every connection gets its rail back. Nothing is lost, duplicated or
//! reordered on any connection.

use railover::core::{Event, FailReason, RailState};
use railover::endpoint::SimEndpoints;
use railover::runtime::{PendingConnection, QUIET_RAIL_POLL_NS};
use railover::sim::SimClock;
use railover::{Config, ConnectionId, SendError};
use railover_rdma::sim::SimNic;
use railover_rdma::{AsyncEvent, LinkParams};
use std::time::Duration;

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

fn config() -> Config {
    Config::builder()
        .rails(2)
        .geometry(4096, 8, 256)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .rearm_after(Duration::from_millis(2))
        .link_params(LinkParams {
            timeout: 8,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .build()
        .unwrap()
}

/// Steps both hosts until `until` (virtual ns).
fn settle(hosts: &mut SimEndpoints, until: u64) {
    while hosts.now() < until {
        hosts.step(until);
    }
}

/// Connects two pending connections (host 1's and host 2's) and inserts them into their
/// endpoints; returns their ids.
fn insert_pending(
    hosts: &mut SimEndpoints,
    pa: PendingConnection<SimNic, SimClock>,
    pb: PendingConnection<SimNic, SimClock>,
) -> (ConnectionId, ConnectionId) {
    let (ha, hb) = (pa.hellos().to_vec(), pb.hellos().to_vec());
    let (ca, cb) = (pa.connect(&hb).unwrap(), pb.connect(&ha).unwrap());
    let x = hosts.a.insert(ca);
    let y = hosts.b.insert(cb);
    hosts.pairs.push((x, y));
    (x, y)
}

/// What one side of one connection sent and received.
#[derive(Default, Clone)]
struct Stream {
    sent: u64,
    delivered: u64,
    /// (rail, at) of each rail that went down / came back up.
    downs: Vec<(usize, u64)>,
    ups: Vec<usize>,
    failovers: usize,
}

fn payload(conn: usize, seq: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&(conn as u64).to_le_bytes());
    p[8..].copy_from_slice(&seq.to_le_bytes());
    p
}

/// Streams on `n` connections both ways, with `fault` at 10 ms (on wire 0, restored at 25 ms).
fn run(
    n: usize,
    seed: u64,
    fault: impl Fn(&SimEndpoints, bool),
) -> (SimEndpoints, Vec<[Stream; 2]>) {
    run_with(n, seed, (10 * MS, 25 * MS), [false; 2], fault)
}

/// [`run`] with the fault at `at.0` and its repair at `at.1`. Every delivery is checked as it
/// comes (in order, exactly once, intact); returns once everything sent was delivered both ways
/// on every connection and every rail that went down came back (or 175 ms after the repair).
/// `aligned[h]`: host h+1 runs its heartbeat ticks on the interval grid, as a blocking endpoint
/// does (connections then made in 16 groups a few microseconds apart, so that the alignment
/// has work to do and an unaligned host's ticks are spread, at a bounded cost in steps).
fn run_with(
    n: usize,
    seed: u64,
    at: (u64, u64),
    aligned: [bool; 2],
    fault: impl Fn(&SimEndpoints, bool),
) -> (SimEndpoints, Vec<[Stream; 2]>) {
    let mut hosts = SimEndpoints::new(config(), seed, 2 * US).unwrap();
    hosts.a.set_aligned_heartbeats(aligned[0]);
    hosts.b.set_aligned_heartbeats(aligned[1]);
    for i in 0..n {
        hosts.connect().unwrap();
        if aligned.contains(&true) && (i + 1) % n.div_ceil(16) == 0 {
            let next = hosts.now() + 7 * US;
            while hosts.now() < next {
                hosts.step(next);
            }
        }
    }
    assert_eq!((hosts.a.len(), hosts.b.len()), (n, n));
    let index_of = |hosts: &SimEndpoints, host2: bool, id: ConnectionId| {
        hosts
            .pairs
            .iter()
            .position(|&(x, y)| if host2 { y == id } else { x == id })
            .unwrap()
    };
    let mut streams = vec![<[Stream; 2]>::default(); n];
    let every = 200 * US;
    let (cut_at, restore_at) = at;
    let (stop_at, limit) = (restore_at + 35 * MS, restore_at + 175 * MS);
    let (mut cut, mut restored) = (false, false);
    let mut next_send = 0;
    while hosts.now() < limit {
        let now = hosts.now();
        if !cut && now >= cut_at {
            fault(&hosts, false);
            cut = true;
        }
        if !restored && now >= restore_at {
            fault(&hosts, true);
            restored = true;
        }
        if now >= next_send && now < stop_at {
            next_send = now + every;
            for (i, &(x, y)) in hosts.pairs.clone().iter().enumerate() {
                for (side, id) in [(0, x), (1, y)] {
                    let ep = if side == 0 {
                        &mut hosts.a
                    } else {
                        &mut hosts.b
                    };
                    let s = &mut streams[i][side];
                    match ep.send(id, &payload(i, s.sent + 1)) {
                        Ok(seq) => {
                            s.sent += 1;
                            assert_eq!(seq, s.sent, "connection {i}: sequence numbers count sends");
                        }
                        Err(SendError::Backpressure) => {}
                        Err(e) => panic!("seed {seed}: connection {i} side {side}: {e}"),
                    }
                }
            }
        }
        for side in [0usize, 1] {
            let ep = if side == 0 {
                &mut hosts.a
            } else {
                &mut hosts.b
            };
            let mut got = Vec::new();
            ep.poll(|id, seq, msg| got.push((id, seq, msg.to_vec())));
            for (id, seq, msg) in got {
                let i = index_of(&hosts, side == 1, id);
                let r = &mut streams[i][side];
                assert_eq!(
                    seq,
                    r.delivered + 1,
                    "connection {i}: in order, exactly once"
                );
                assert_eq!(
                    msg,
                    payload(i, seq),
                    "connection {i}: its own records, intact"
                );
                r.delivered += 1;
            }
            let ep = if side == 0 {
                &mut hosts.a
            } else {
                &mut hosts.b
            };
            let mut events = Vec::new();
            while let Some(e) = ep.poll_event() {
                events.push(e);
            }
            for (id, ev) in events {
                let i = index_of(&hosts, side == 1, id);
                let s = &mut streams[i][side];
                match ev {
                    Event::RailDown { rail, at, .. } => s.downs.push((rail, at)),
                    Event::RailUp { rail, .. } => s.ups.push(rail),
                    Event::Failover { .. } => s.failovers += 1,
                    Event::AllRailsDown { .. } | Event::Ended { .. } => {
                        panic!("seed {seed}: connection {i} side {side}: {ev:?}")
                    }
                    _ => {}
                }
            }
        }
        let done = now >= stop_at
            && streams
                .iter()
                .all(|s| s[0].delivered == s[1].sent && s[1].delivered == s[0].sent)
            && streams
                .iter()
                .all(|s| s.iter().all(|x| x.ups.len() == x.downs.len()));
        if done {
            break;
        }
        hosts.step(limit);
    }
    (hosts, streams)
}

/// Both ways on every connection, everything sent was delivered (in order, exactly once and
/// intact is checked as each record arrives).
fn assert_all_delivered(streams: &[[Stream; 2]], context: &str) {
    for (i, s) in streams.iter().enumerate() {
        let host2 = (s[1].delivered, s[0].sent);
        assert_eq!(
            host2.0, host2.1,
            "{context}: connection {i}, host 2 got every record"
        );
        let host1 = (s[0].delivered, s[1].sent);
        assert_eq!(
            host1.0, host1.1,
            "{context}: connection {i}, host 1 got every record"
        );
    }
}

/// Idle connections: no rail of any connection failed and nothing failed over, on either host.
/// Runs both endpoints for 20 ms of virtual time: every rail up and proven by heartbeats.
fn warm_up(hosts: &mut SimEndpoints) {
    let until = hosts.now() + 20 * MS;
    while hosts.now() < until {
        hosts.step(until);
    }
}

fn assert_no_rail_failed(hosts: &SimEndpoints) {
    for &(x, y) in &hosts.pairs {
        for (ep, id) in [(&hosts.a, x), (&hosts.b, y)] {
            let s = ep.stats(id).unwrap();
            assert_eq!(s.failovers, 0, "{id}: no false failover");
            assert!(
                s.rail_states
                    .iter()
                    .flatten()
                    .all(|r| *r != RailState::Failed),
                "{id}: no rail failed: {:?}",
                s.rail_states
            );
        }
    }
}

fn check(n: usize, streams: &[[Stream; 2]]) {
    assert_all_delivered(streams, "rail 0's fault");
    for (i, s) in streams.iter().enumerate() {
        assert!(s[0].sent > 50 && s[1].sent > 50, "connection {i} streamed");
        for side in s {
            assert_eq!(side.downs.iter().map(|d| d.0).collect::<Vec<_>>(), [0]);
            assert_eq!(side.ups, [0], "connection {i}: rail 0 came back");
        }
        assert!(
            s[0].failovers + s[1].failovers >= 1,
            "connection {i} failed over"
        );
    }
    assert_eq!(streams.len(), n);
}

/// 256 connections x 2 rails: wire 0 loses its carrier for 15 ms. The port-down event is read
/// once per card and every connection's rail 0 goes down at the same instant; all fail over,
/// all get rail 0 back, and every record of every connection arrives once, in order.
#[test]
fn a_cut_wire_fails_over_every_connection_of_the_endpoint_in_one_pass() {
    let (hosts, streams) = run(256, 1, |h, restore| {
        if restore {
            h.fabric.carrier_restore(h.wires[0]);
        } else {
            h.fabric.carrier_loss(h.wires[0]);
        }
    });
    check(256, &streams);
    for side in 0..2 {
        let at: Vec<u64> = streams.iter().map(|s| s[side].downs[0].1).collect();
        let (first, last) = (at.iter().min().unwrap(), at.iter().max().unwrap());
        assert_eq!(
            first,
            last,
            "host {}: one pass failed every connection's rail 0",
            side + 1
        );
    }
    // Each completed failover's blackout is in its connection's histogram.
    for &(x, y) in &hosts.pairs {
        let (a, b) = (hosts.a.stats(x).unwrap(), hosts.b.stats(y).unwrap());
        let counted = |s: &railover::Stats| s.blackouts.iter().sum::<u64>();
        assert!(counted(&a) <= a.failovers && counted(&b) <= b.failovers);
        assert!(
            counted(&a) + counted(&b) >= 1,
            "{x}/{y}: a blackout recorded"
        );
        for s in [a, b].iter().filter(|s| counted(s) > 0) {
            assert!(s.blackout_quantile(1.0) >= s.last_blackout_ns);
        }
    }
    assert_eq!(hosts.a.len(), 256);
    // The re-armed rails' queue pairs are on the cards' shared completion queues too: the
    // endpoint still polls a few queues per card, not one per re-armed link.
    for &(x, y) in &hosts.pairs {
        assert_eq!(hosts.a.get(x).unwrap().rails_on_shared_queues(), 2, "{x}");
        assert_eq!(hosts.b.get(y).unwrap().rails_on_shared_queues(), 2, "{y}");
    }
    // 512 + 512 completions per link, 16,384 per queue, twice over: 8 links a queue. While
    // rail 0 is re-armed, each connection has its old and its fresh queue pair at once.
    let per_queue = 8;
    for (host, ep) in [(1, &hosts.a), (2, &hosts.b)] {
        let queues = ep.completion_queues();
        assert!(
            queues <= 2 * 2 * 256 / per_queue,
            "host {host} polls {queues} queues for 512 queue pairs"
        );
    }
}

/// Liveness per card pair: 64 connections' standby rails share one heartbeat per interval (and
/// each its own every `OWN_BEAT_EVERY` intervals), so a black hole on the standby wire, which
/// only heartbeats cross, must be found through the shared view on every connection of both
/// hosts; each gets the rail back once the wire is, and nothing is lost.
#[test]
fn a_black_hole_on_the_standby_wire_is_found_on_every_connection_sharing_liveness() {
    let (hosts, streams) = run(64, 3, |h, restore| {
        if restore {
            h.fabric.clear_black_hole(h.wires[1]);
        } else {
            h.fabric.black_hole(h.wires[1]);
        }
    });
    assert_all_delivered(&streams, "standby black hole");
    for (i, s) in streams.iter().enumerate() {
        for (side, x) in s.iter().enumerate() {
            // Down at least once (re-arms into the black hole fail again), only the standby,
            // and back each time.
            let downs: Vec<usize> = x.downs.iter().map(|d| d.0).collect();
            let host = side + 1;
            assert!(
                !downs.is_empty(),
                "connection {i} host {host}: the standby went down"
            );
            assert!(
                downs.iter().all(|&r| r == 1),
                "connection {i} host {host}: {downs:?}"
            );
            assert_eq!(
                x.ups.len(),
                downs.len(),
                "connection {i} host {host}: back each time"
            );
        }
    }
    assert_eq!(hosts.a.len(), 64);
}

/// An endpoint's connections share liveness (one heartbeat per card pair), and an idle one takes
/// the same quiet fast path as a single connection: 10,000 polls at one virtual instant (no
/// timer can fall due) run at most one whole turn per connection (its first look at every rail
/// in the period), not one per poll, as every group member did before session 15.
#[test]
fn idle_connections_sharing_liveness_stop_at_the_nothing_due_check() {
    let mut hosts = SimEndpoints::new(config(), 6, 2 * US).unwrap();
    for _ in 0..16 {
        hosts.connect().unwrap();
    }
    warm_up(&mut hosts);
    assert_no_rail_failed(&hosts);
    let turns = |h: &SimEndpoints| -> Vec<u64> {
        h.pairs
            .iter()
            .map(|&(x, _)| h.a.stats(x).unwrap().full_turns)
            .collect()
    };
    let (at, before) = (hosts.now(), turns(&hosts));
    for _ in 0..10_000 {
        hosts
            .a
            .poll(|id, _, _| panic!("nothing was sent, {id} delivered"));
    }
    assert_eq!(hosts.now(), at, "the virtual clock stood still");
    for (i, (b, a)) in before.iter().zip(turns(&hosts)).enumerate() {
        assert!(
            a - b <= 2,
            "connection {i}: {} whole turns in 10,000 idle polls",
            a - b
        );
    }
}

/// A beat carried by a data write, taken from a shared completion queue, counts as heard at the
/// `Endpoint::poll` that took it. (Until session 16 the core handled such a completion without
/// learning the time first, so the beat counted as heard at the connection's previous poll.)
/// Host 1 stops polling for 1.5 heartbeat intervals while host 2 streams a record every 100 us:
/// its ticks move its beat on, each write carries it, and its active rail skips its own blocks
/// (data follows within a quarter interval), so only the writes tell host 1 of the new beat.
#[test]
fn a_beat_from_a_shared_queue_is_heard_at_the_poll_that_took_it() {
    let mut hosts = SimEndpoints::new(config(), 8, 2 * US).unwrap();
    let (x, y) = hosts.connect().unwrap();
    warm_up(&mut hosts);
    assert_no_rail_failed(&hosts);
    let rail = hosts.b.get(y).unwrap().core().active_rail();
    let last_poll = hosts.now();
    let until = last_poll + 1_500 * US;
    let mut next_send = last_poll;
    while hosts.now() < until {
        if hosts.now() >= next_send {
            hosts.b.send(y, b"beat").unwrap();
            next_send += 100 * US;
        }
        let next = [hosts.fabric.next_event_time(), hosts.b.next_timeout()]
            .into_iter()
            .flatten()
            .fold(next_send.min(until), u64::min);
        hosts.fabric.advance_to(next.max(hosts.now() + 1));
        hosts.b.poll(|_, _, _| {});
    }
    let polled_at = hosts.now();
    let heard_before = hosts.a.get(x).unwrap().core().rail_heard_at(rail);
    assert!(
        heard_before.is_some_and(|t| t <= last_poll),
        "host 1 heard nothing while it was not polled: {heard_before:?}"
    );
    let delivered = hosts.a.poll(|_, _, _| {});
    assert!(delivered > 0, "the stream arrived");
    let heard = hosts.a.get(x).unwrap().core().rail_heard_at(rail);
    assert_eq!(
        heard,
        Some(polled_at),
        "the carried beat counts at the poll that took it (host 1 last polled at {last_poll})"
    );
    assert_no_rail_failed(&hosts);
}

/// Idle connections between two endpoints: with liveness shared (the default) host 1 posts
/// about two control writes per rail and interval (the group's beat, and one connection's own
/// beat) whether it holds 64 connections or 256, and no interval gets more than a few (the
/// connections' own beats are spread, though they were made over several intervals); with
/// sharing off on both sides, one per rail, interval and connection. The same 100 ms of
/// virtual time each way.
#[test]
fn shared_liveness_makes_control_writes_independent_of_the_connection_count() {
    // (control writes in 100 intervals, the most in any one interval)
    let writes = |conns: usize, share: bool| {
        let mut hosts = SimEndpoints::new(config(), 4, 2 * US).unwrap();
        hosts.a.set_shared_liveness(share);
        hosts.b.set_shared_liveness(share);
        // Made one per interval or so, at different times within them (connections made one
        // interval apart tick alike, beat numbers one apart).
        for _ in 0..conns {
            hosts.connect().unwrap();
            let next = hosts.now() + MS + 13 * US;
            while hosts.now() < next {
                hosts.step(next);
            }
        }
        let control = |h: &SimEndpoints| -> u64 {
            h.pairs
                .iter()
                .map(|&(x, _)| h.a.stats(x).unwrap().control_writes)
                .sum()
        };
        // Past the set-up (every rail proven), then 100 ms.
        warm_up(&mut hosts);
        let (start, before) = (hosts.now(), control(&hosts));
        let mut most = 0;
        for interval in 1..=100 {
            let (end, at_start) = (start + interval * MS, control(&hosts));
            while hosts.now() < end {
                hosts.step(end);
                hosts
                    .a
                    .poll(|id, _, _| panic!("nothing was sent, {id} delivered"));
                hosts
                    .b
                    .poll(|id, _, _| panic!("nothing was sent, {id} delivered"));
            }
            most = most.max(control(&hosts) - at_start);
        }
        assert_no_rail_failed(&hosts);
        (control(&hosts) - before, most)
    };
    let per_connection = 64 * 2 * 100; // 64 connections, 2 rails, 100 intervals
    let (alone, _) = writes(64, false);
    assert!(
        alone >= per_connection * 9 / 10,
        "without sharing {alone} control writes, expected about {per_connection}"
    );
    let per_rail_and_interval = 2 * 100;
    for conns in [64, 256] {
        let (shared, most) = writes(conns, true);
        println!("{conns} connections sharing liveness: {shared} control writes in 100 ms, at most {most} in one interval");
        assert!(
            shared <= per_rail_and_interval * 5 / 2,
            "{conns} connections sharing: {shared} control writes, expected about \
             {} (without sharing, 64 posted {alone})",
            per_rail_and_interval * 2
        );
        // Per rail: the group's beat, one connection's own, and one more where ticks straddle.
        assert!(
            most <= 2 * 3,
            "{conns} connections sharing: {most} control writes in one interval"
        );
    }
}

/// In a group sharing liveness, an idle connection beats its own rails once a period (here 100
/// intervals: 100 connections), so when it starts streaming, the peer's last full beat number
/// from it on its active rail may be further behind than a data write's carried low bits can
/// span (half of 7 bits: 64). The writer then sends a block with the full number before that
/// write. Else the peer reads the carried beats as old (or, once they wrap, 128 too low) and
/// hears nothing on the rail from this connection; where the group's other beats don't cover
/// for it, it fails the healthy rail carrying the data at the connection's next own beat on
/// the standby. Eight connections stream in turn from different points in their periods; on
/// each, the peer hears the carried beats at least once an interval and a quarter.
#[test]
fn a_stream_started_late_in_a_shared_beat_period_is_heard_by_its_carried_beats() {
    let n = 100;
    let mut hosts = SimEndpoints::new(config(), 6, 2 * US).unwrap();
    for _ in 0..n {
        hosts.connect().unwrap();
        let next = hosts.now() + 13 * US;
        settle(&mut hosts, next);
    }
    warm_up(&mut hosts);
    let pairs = hosts.pairs.clone();
    for (i, &(x, y)) in pairs.iter().enumerate().take(8) {
        let quiet_until = hosts.now() + 37 * MS;
        settle(&mut hosts, quiet_until);
        // One record every 200 us, host 1 to host 2: the active rail's beat rides on them.
        let start = hosts.now();
        let stop_at = start + 20 * MS;
        let (mut sent, mut delivered, mut longest_unheard) = (0u64, 0u64, 0u64);
        let mut next_send = 0;
        while hosts.now() < stop_at {
            let now = hosts.now();
            if now >= next_send {
                next_send = now + 200 * US;
                match hosts.a.send(x, &payload(i, sent + 1)) {
                    Ok(_) => sent += 1,
                    Err(e) => panic!("connection {i}: {e}"),
                }
            }
            hosts.b.poll(|id, seq, msg| {
                assert_eq!(id, y, "only connection {i} streams");
                assert_eq!(msg, payload(i, seq), "connection {i}: intact");
                delivered += 1;
            });
            hosts
                .a
                .poll(|id, _, _| panic!("host 2 sent nothing, {id} delivered"));
            if now >= start + 2 * MS {
                let core = hosts.b.get(y).unwrap().core();
                let active = core.active_rail();
                let heard = core.rail_heard_at(active).expect("the active rail is up");
                longest_unheard = longest_unheard.max(now.saturating_sub(heard));
            }
            hosts.step(next_send.min(stop_at));
        }
        settle(&mut hosts, stop_at + 2 * MS);
        hosts.b.poll(|_, _, _| delivered += 1);
        assert_eq!(delivered, sent, "connection {i}: host 2 got every record");
        assert!(
            longest_unheard <= 5 * MS / 4 + 10 * US,
            "connection {i}: host 2 heard nothing on the active rail for {longest_unheard} ns \
             while it carried a record every 200 us"
        );
    }
    assert_no_rail_failed(&hosts);
}

/// An endpoint driven by a blocking poll runs its connections' heartbeat ticks together, so an
/// idle one wakes for its timers about once per interval, not once per connection. Its other
/// wake-ups are the peer's and its own few control writes landing (the simulated clock wakes
/// for every packet). The same 100 ms with the ticks left spread, for comparison.
#[test]
fn a_blocking_endpoint_wakes_once_per_interval_for_all_its_connections() {
    const CONNS: usize = 64;
    let waits = |aligned: Option<bool>| {
        let mut hosts = SimEndpoints::new(config(), 5, 2 * US).unwrap();
        if let Some(on) = aligned {
            hosts.b.set_aligned_heartbeats(on);
        }
        // Made one after the other, as a gateway's sessions are: their ticks start spread out.
        for _ in 0..CONNS {
            hosts.connect().unwrap();
            let next = hosts.now() + 37 * US;
            while hosts.now() < next {
                hosts.step(next);
            }
        }
        warm_up(&mut hosts);
        // Host 2 now only waits in `poll_blocking`; host 1 is polled between its waits.
        let (start, before) = (hosts.now(), hosts.b.blocking_waits());
        while hosts.now() < start + 100 * MS {
            hosts.a.poll_cards();
            hosts
                .a
                .poll(|id, _, _| panic!("nothing was sent, {id} delivered"));
            hosts.b.poll_blocking(100 * US, |id, _, _| {
                panic!("nothing was sent, {id} delivered")
            });
        }
        assert_no_rail_failed(&hosts);
        hosts.b.blocking_waits() - before
    };
    let (aligned, spread) = (waits(None), waits(Some(false)));
    println!("{CONNS} idle connections, blocking, 100 intervals: {aligned} waits ({spread} with the ticks spread)");
    // Ticks one by one wake it once per connection and interval for them alone.
    assert!(
        spread >= 100 * CONNS as u64,
        "spread ticks: {spread} waits in 100 intervals"
    );
    assert!(
        aligned <= spread / 4,
        "aligned ticks: {aligned} waits in 100 intervals (spread: {spread})"
    );
}

/// 64 connections: the card of rail 0 on host 2 is pulled (device fatal) and put back. Every
/// connection lets go of it, fails over, reopens it and re-arms; new connections made after
/// that use the card again.
#[test]
fn a_pulled_card_fails_over_every_connection_and_comes_back() {
    let (mut hosts, streams) = run(64, 2, |h, restore| {
        if restore {
            h.fabric.restore_card(&h.cards[0].1);
        } else {
            h.fabric.remove_card(&h.cards[0].1);
        }
    });
    check(64, &streams);
    // A connection made now has both rails up on both sides.
    let (x, y) = hosts.connect().unwrap();
    for _ in 0..100 {
        hosts.step(u64::MAX);
    }
    assert!(hosts.a.card(0).is_some() && hosts.b.card(0).is_some());
    assert_eq!(hosts.a.send(x, b"late").unwrap(), 1);
    let mut got = None;
    for _ in 0..1000 {
        hosts.step(u64::MAX);
        hosts.b.poll(|id, seq, msg| {
            assert_eq!(id, y);
            got = Some((seq, msg.to_vec()));
        });
        if got.is_some() {
            break;
        }
    }
    assert_eq!(got, Some((1, b"late".to_vec())));
}

/// Ids name one connection for good: a removed connection's id is refused, and a new
/// connection in its slot gets another id.
/// A blocking poll over all of an endpoint's connections wakes when a record lands on any one
/// of them (here the sixth of eight), not at its deadline; with nothing in flight it returns 0
/// once its time is up.
#[test]
fn a_blocking_poll_wakes_for_any_connection_and_times_out_when_nothing_comes() {
    let mut hosts = SimEndpoints::new(config(), 11, 2_000).unwrap();
    let ids: Vec<_> = (0..8).map(|_| hosts.connect().unwrap()).collect();
    let (a5, b5) = ids[5];
    hosts.a.send(a5, b"order 5").unwrap();
    hosts.a.poll(|_, _, _| {});
    let asked = hosts.now();
    let mut got = Vec::new();
    let n = hosts
        .b
        .poll_blocking(100 * MS, |id, seq, msg| got.push((id, seq, msg.to_vec())));
    assert_eq!(n, 1);
    assert_eq!(got, [(b5, 1, b"order 5".to_vec())]);
    let woke_after = hosts.now() - asked;
    assert!(
        woke_after < MS,
        "woke {woke_after} ns later, not when it landed"
    );

    let asked = hosts.now();
    let n = hosts.b.poll_blocking(MS / 2, |id, _, _| {
        panic!("nothing was sent, {id} delivered")
    });
    assert_eq!(n, 0);
    assert!(
        hosts.now() >= asked + MS / 2,
        "returned before its deadline"
    );
}

#[test]
fn a_removed_connections_id_names_nothing() {
    let mut hosts = SimEndpoints::new(config(), 3, 2 * US).unwrap();
    let (x, _) = hosts.connect().unwrap();
    let (x2, _) = hosts.connect().unwrap();
    assert_ne!(x, x2);
    let conn = hosts.a.remove(x).expect("held");
    drop(conn);
    assert!(hosts.a.get(x).is_none());
    assert_eq!(hosts.a.send(x, b"x"), Err(SendError::UnknownConnection));
    let (x3, _) = hosts.connect().unwrap();
    assert_eq!(x3.index(), x.index(), "the slot is reused");
    assert_ne!(x3, x, "under a new id");
    assert_eq!(hosts.a.ids().collect::<Vec<_>>(), {
        let mut v = vec![x2, x3];
        v.sort();
        v
    });
    assert!(hosts.a.send(x3, b"x").is_ok());
}

/// The endpoint reads each card's events once: a port event reaches every connection on the
/// card in the same pass, and a queue pair's fatal error only the connection that owns it.
#[test]
fn a_card_event_reaches_every_connection_and_a_queue_pair_event_only_its_owner() {
    let mut hosts = SimEndpoints::new(config(), 4, 2 * US).unwrap();
    let mut qpns = Vec::new();
    for _ in 0..16 {
        let (pa, pb) = (hosts.a.prepare().unwrap(), hosts.b.prepare().unwrap());
        let (ha, hb) = (pa.hellos().to_vec(), pb.hellos().to_vec());
        qpns.push(hb[0].endpoint.qpn);
        let pair = (
            hosts.a.insert(pa.connect(&hb).unwrap()),
            hosts.b.insert(pb.connect(&ha).unwrap()),
        );
        hosts.pairs.push(pair);
    }
    let downs = |hosts: &mut SimEndpoints| {
        let mut downs = Vec::new();
        while let Some((id, ev)) = hosts.b.poll_event() {
            if let Event::RailDown { rail, reason, at } = ev {
                let i = hosts.pairs.iter().position(|p| p.1 == id).unwrap();
                downs.push((i, rail, reason, at));
            }
        }
        downs
    };
    settle(&mut hosts, 5 * MS);
    assert_eq!(downs(&mut hosts), []);

    let card = hosts.cards[0].1.clone();
    hosts
        .fabric
        .card_event(&card, AsyncEvent::QpFatal { qpn: qpns[5] });
    settle(&mut hosts, 7 * MS);
    let d = downs(&mut hosts);
    assert_eq!(d.len(), 1, "only the owner's rail: {d:?}");
    assert_eq!((d[0].0, d[0].1, d[0].2), (5, 0, FailReason::QpFatal));

    hosts.fabric.card_event(&card, AsyncEvent::PortDown);
    settle(&mut hosts, 9 * MS);
    let d = downs(&mut hosts);
    let mut conns: Vec<usize> = d.iter().map(|x| x.0).collect();
    conns.sort();
    // (Connection 5's rail 0 was re-armed meanwhile: it goes down again too.)
    assert_eq!(
        conns,
        (0..16).collect::<Vec<_>>(),
        "every connection's rail 0: {d:?}"
    );
    assert!(
        d.iter().all(|x| x.1 == 0 && x.3 == d[0].3),
        "at one instant: {d:?}"
    );
}

/// Seeded schedules on many connections (`RAILOVER_ENDPOINT_SEEDS`, default 20; every tenth
/// seed runs 256 connections, the others 16-63): one fault of a random kind on a random wire at a
/// random time, repaired later. On every connection, both ways: every record delivered once and
/// in order, no session lost, and every rail that went down back up by the end.
/// `RAILOVER_ENDPOINT_SEED=<n>` runs one seed.
#[test]
fn seeded_faults_on_many_connections_lose_nothing() {
    use rand::{Rng, SeedableRng};
    let one: Option<u64> = std::env::var("RAILOVER_ENDPOINT_SEED")
        .ok()
        .map(|s| s.parse().expect("a number"));
    let seeds: u64 = std::env::var("RAILOVER_ENDPOINT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (mut connections, mut downs) = (0, 0);
    for seed in one.map_or(0..seeds, |s| s..s + 1) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = if seed % 10 == 0 {
            256
        } else {
            rng.random_range(16..64)
        };
        let wire = rng.random_range(0..2usize);
        let host2 = rng.random_bool(0.5);
        let kind = rng.random_range(0..7u32);
        let from = rng.random_range(3 * MS..15 * MS);
        let until = from + rng.random_range(2 * MS..20 * MS);
        // Half the seeds: one host or both as a blocking endpoint (ticks on the grid).
        let aligned = match rng.random_range(0..4u32) {
            0 => [true, false],
            1 => [false, true],
            2 => [true, true],
            _ => [false, false],
        };
        let fault = |h: &SimEndpoints, repair: bool| {
            let (w, f) = (h.wires[wire], &h.fabric);
            let card = if host2 {
                &h.cards[wire].1
            } else {
                &h.cards[wire].0
            };
            match (kind, repair) {
                (0, false) => f.carrier_loss(w),
                (0, true) => f.carrier_restore(w),
                (1, false) => f.black_hole(w),
                (1, true) => f.clear_black_hole(w),
                (2, false) => f.remove_card(card),
                (2, true) => f.restore_card(card),
                (3, false) => f.corrupt_next(w, 3),
                (4, false) => f.card_event(card, AsyncEvent::PortDown),
                (5, false) => f.latency_spike(w, 2 * MS, until - from),
                (6, false) => f.lossy(w, 200, 300 * US, until - from),
                _ => {}
            }
        };
        let (hosts, streams) = run_with(n, seed, (from, until), aligned, fault);
        let replay = format!("seed {seed} (RAILOVER_ENDPOINT_SEED={seed}): {n} connections, fault {kind} on wire {wire}, aligned ticks {aligned:?}");
        assert_all_delivered(&streams, &replay);
        for (i, s) in streams.iter().enumerate() {
            for side in s {
                assert_eq!(
                    side.downs.len(),
                    side.ups.len(),
                    "{replay}: connection {i} whole again"
                );
                downs += side.downs.len();
            }
        }
        assert_eq!((hosts.a.len(), hosts.b.len()), (n, n));
        connections += n;
    }
    println!(
        "{connections} connections, {downs} rail downs (each came back), 0 lost/dup/reordered"
    );
}

/// Host 1's polls of its cards' shared completion queues: (rail 0's card, rail 1's card).
fn shared_polls(hosts: &SimEndpoints) -> (u64, u64) {
    (
        hosts.fabric.shared_cq_polls(hosts.wires[0])[0],
        hosts.fabric.shared_cq_polls(hosts.wires[1])[0],
    )
}

/// Four connections, warmed up for 20 ms, every one active on rail 0.
fn four_on_rail_0(seed: u64) -> SimEndpoints {
    let mut hosts = SimEndpoints::new(config(), seed, 2 * US).unwrap();
    for _ in 0..4 {
        hosts.connect().unwrap();
    }
    warm_up(&mut hosts);
    assert_no_rail_failed(&hosts);
    for &(x, y) in &hosts.pairs {
        assert_eq!(hosts.a.get(x).unwrap().core().active_rail(), 0);
        assert_eq!(hosts.b.get(y).unwrap().core().active_rail(), 0);
    }
    hosts
}

/// An endpoint polls the shared queues of the cards its connections are busy on at every poll,
/// and a standby card's (heartbeats alone) once per `QUIET_RAIL_POLL_NS`, as a single connection
/// does with queues of its own. (Until session 17 it polled every card's queues every time.)
#[test]
fn an_endpoint_polls_a_standby_cards_queues_once_a_period() {
    let mut hosts = four_on_rail_0(10);
    // 10,000 polls at one instant of virtual time: nothing arrives, so each look at a card is
    // one poll of each of its queues.
    let before = shared_polls(&hosts);
    for _ in 0..10_000 {
        hosts
            .a
            .poll(|id, _, _| panic!("nothing was sent, {id} delivered"));
    }
    let after = shared_polls(&hosts);
    let (busy, standby) = (after.0 - before.0, after.1 - before.1);
    assert!(
        busy >= 10_000 && busy % 10_000 == 0,
        "the active card, every poll: {busy}"
    );
    let per_look = busy / 10_000;
    assert!(
        standby <= per_look,
        "the standby card: {standby} polls in 10,000 (a look is {per_look})"
    );
    // A period later the next poll looks at the standby card too, and then not again at once.
    hosts.fabric.advance_to(hosts.now() + QUIET_RAIL_POLL_NS);
    hosts.a.poll(|_, _, _| {});
    hosts.a.poll(|_, _, _| {});
    let last = shared_polls(&hosts);
    assert_eq!(
        last.1 - after.1,
        per_look,
        "the standby card, once the period passed"
    );
    assert_eq!(last.0 - after.0, 2 * per_look);
    // The endpoint asks to be driven again by then, so a caller sleeping until its next
    // timeout misses nothing.
    let next = hosts.a.next_timeout().expect("a timer");
    assert!(
        next <= hosts.now() + QUIET_RAIL_POLL_NS,
        "next timeout {next}"
    );
}

/// The bound of the above: host 2 alone loses rail 0 and moves every connection to rail 1,
/// whose card host 1 (still sending on rail 0) polls once a period. The first record on it is
/// delivered within a period of landing, and the ones after it at once.
#[test]
fn records_moved_to_a_standby_card_are_found_within_the_period_then_at_once() {
    let mut hosts = four_on_rail_0(11);
    let (a_ids, b_ids): (Vec<_>, Vec<_>) = hosts.pairs.iter().copied().unzip();
    // Drives both endpoints through their own polls, virtual time moving to the next event or
    // timer; returns what host 1 delivered.
    let turn = |hosts: &mut SimEndpoints, limit: u64| -> Vec<(ConnectionId, Vec<u8>)> {
        let next = [
            hosts.fabric.next_event_time(),
            hosts.a.next_timeout(),
            hosts.b.next_timeout(),
        ]
        .into_iter()
        .flatten()
        .fold(limit, u64::min);
        hosts.fabric.advance_to(next.max(hosts.now()));
        let mut got = Vec::new();
        hosts.a.poll(|id, _, m| got.push((id, m.to_vec())));
        hosts
            .b
            .poll(|id, _, m| panic!("host 1 sent nothing, {id} delivered {m:?}"));
        got
    };
    hosts
        .fabric
        .card_event(&hosts.cards[0].1, AsyncEvent::PortDown);
    let until = hosts.now() + 5 * MS;
    while b_ids
        .iter()
        .any(|&y| hosts.b.get(y).unwrap().core().active_rail() != 1)
    {
        assert!(hosts.now() < until, "host 2 did not fail over");
        assert!(turn(&mut hosts, until).is_empty());
    }
    for &x in &a_ids {
        assert_eq!(
            hosts.a.get(x).unwrap().core().active_rail(),
            0,
            "host 1 stays"
        );
    }
    let mut delays = Vec::new();
    for i in 0..6u8 {
        let y = b_ids[i as usize % b_ids.len()];
        let x = a_ids[i as usize % a_ids.len()];
        let sent_at = hosts.now();
        hosts.b.send(y, &[i; 64]).unwrap();
        loop {
            assert!(
                hosts.now() < sent_at + MS,
                "record {i} not delivered in 1 ms"
            );
            let got = turn(&mut hosts, sent_at + MS);
            if !got.is_empty() {
                assert_eq!(got, vec![(x, vec![i; 64])]);
                break;
            }
        }
        delays.push(hosts.now() - sent_at);
    }
    println!("delivery after the peer moved to the standby card (ns): {delays:?}");
    assert!(
        delays[0] <= 2 * US + QUIET_RAIL_POLL_NS,
        "the first record on the standby card: {} ns",
        delays[0]
    );
    // By then the connection that took it is busy on rail 1 (the rail its peer sends on), so
    // the card is polled every time: each later record as soon as it lands, on any connection.
    for (i, d) in delays.iter().enumerate().skip(1) {
        assert!(*d <= 2 * 2 * US, "record {i}: {d} ns");
    }
}

/// A connection whose busy rails grow between two looks at every card (here its own failover:
/// it sends on rail 1 and still hears its peer on rail 0) owes no quiet rail of its own, but
/// the endpoint skips rail 1's card until its next look: the endpoint asks to be driven again
/// by then, so a caller sleeping until `next_timeout` doesn't leave that card unpolled for a
/// heartbeat interval.
#[test]
fn an_endpoint_that_skips_a_card_asks_to_be_driven_within_the_period() {
    let mut hosts = four_on_rail_0(12);
    // The endpoint's own polls from here (the warm-up's drove the cards one by one, which
    // looks at every card): the first looks at every card and finds only card 0 busy.
    hosts.a.poll(|_, _, _| {});
    hosts
        .fabric
        .card_event(&hosts.cards[0].0, AsyncEvent::PortDown);
    let until = hosts.now() + 5 * MS;
    let (x, _) = hosts.pairs[0];
    // Host 1 alone, polled every 3 us until its connections left rail 0: with this seed at a
    // poll between two looks at every card, so the endpoint still skips card 1 after it.
    while hosts.a.get(x).unwrap().core().active_rail() != 1 {
        assert!(hosts.now() < until, "host 1 did not fail over");
        hosts.fabric.advance_to(hosts.now() + 3 * US);
        hosts.a.poll(|_, _, _| {});
    }
    let conn = hosts.a.get(x).unwrap();
    // Sends on 1, hears on 0: every rail busy, none owed a look of its own.
    assert_eq!(conn.core().busy_rails(), 0b11);
    let next = hosts.a.next_timeout().expect("a timer");
    assert!(
        next <= hosts.now() + QUIET_RAIL_POLL_NS,
        "next timeout {} ns away",
        next - hosts.now()
    );
}

/// After a device-fatal event, the card an endpoint's connections re-arm on is the endpoint's
/// handle, opened again once for all (by whichever re-arm came first): one device context, every
/// fresh queue pair on the endpoint's shared completion queues, the card's events read once by
/// the endpoint and handed to every connection (a port going down fails the rail of each within
/// a poll period). Until session 22 each connection opened a handle of its own: a context, a
/// completion queue and an event read per connection, until the connections were replaced.
#[test]
fn after_a_device_reset_every_connection_re_arms_on_the_endpoints_one_handle() {
    let mut hosts = SimEndpoints::new(config(), 7, 2 * US).unwrap();
    let ids: Vec<_> = (0..4).map(|_| hosts.connect().unwrap().1).collect();
    settle(&mut hosts, 5 * MS);
    let card = hosts.cards[0].1.clone();
    hosts.fabric.remove_card(&card);
    settle(&mut hosts, 10 * MS);
    for &y in &ids {
        assert!(hosts.b.get(y).unwrap().card_released(0), "{y} let go");
    }
    assert!(hosts.b.card(0).is_none(), "the endpoint let go");
    // Only the harness's own handle on the card is left open.
    let before = hosts.fabric.open_contexts(&card);
    hosts.fabric.restore_card(&card);
    settle(&mut hosts, 60 * MS);
    for &y in &ids {
        let conn = hosts.b.get(y).unwrap();
        assert!(!conn.card_released(0), "{y}: opened again for the re-arm");
        assert_ne!(conn.core().rail_state(0), RailState::Failed, "{y} re-armed");
        assert_eq!(conn.rails_on_shared_queues(), 2, "{y}");
    }
    assert!(hosts.b.card(0).is_some(), "the endpoint took the handle");
    assert_eq!(
        hosts.fabric.open_contexts(&card),
        before + 1,
        "one device context for the endpoint and its connections"
    );
    while hosts.b.poll_event().is_some() {}

    hosts.fabric.card_event(&card, AsyncEvent::PortDown);
    let t = hosts.now();
    settle(&mut hosts, t + 5 * QUIET_RAIL_POLL_NS);
    let mut downs = Vec::new();
    while let Some((id, ev)) = hosts.b.poll_event() {
        if let Event::RailDown { rail, reason, .. } = ev {
            downs.push((id, rail, reason));
        }
    }
    downs.sort_by_key(|d| d.0.to_string());
    let mut want: Vec<_> = ids.iter().map(|&y| (y, 0, FailReason::PortDown)).collect();
    want.sort_by_key(|d| d.0.to_string());
    assert_eq!(downs, want);
}

/// A connection set up while its card was released (a device-fatal event handled by the
/// endpoint between the set-up's start and the insert, as on a background listener's thread)
/// hears the event at its insert: it lets go of the dead card and its rail starts failed, then
/// comes back when the card does.
#[test]
fn a_connection_set_up_across_a_device_fatal_event_lets_go_of_the_card_at_its_insert() {
    let mut hosts = SimEndpoints::new(config(), 9, 2 * US).unwrap();
    hosts.connect().unwrap();
    settle(&mut hosts, 5 * MS);
    let (pa, pb) = (hosts.a.prepare().unwrap(), hosts.b.prepare().unwrap());
    let card = hosts.cards[0].1.clone();
    hosts.fabric.remove_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + MS);
    assert!(hosts.b.card(0).is_none(), "the endpoint let go");
    let (_, y) = insert_pending(&mut hosts, pa, pb);
    assert!(
        hosts.b.get(y).unwrap().card_released(0),
        "let go at its insert"
    );
    hosts.fabric.restore_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + 60 * MS);
    let conn = hosts.b.get(y).unwrap();
    assert!(!conn.card_released(0), "opened again");
    assert_ne!(
        conn.core().rail_state(0),
        RailState::Failed,
        "the rail came back"
    );
}

/// The same when the card is already open again by the time of the insert (the endpoint's other
/// connection re-armed on it as soon as it was back): the pending connection is still on the
/// opening the endpoint let go of, so it hears the event at its insert, lets go of that handle,
/// and re-arms on the endpoint's new one; one device context is left besides the harness's.
#[test]
fn a_connection_set_up_on_a_card_released_and_opened_again_lets_go_of_the_old_one() {
    let mut hosts = SimEndpoints::new(config(), 9, 2 * US).unwrap();
    let (_, y0) = hosts.connect().unwrap();
    settle(&mut hosts, 5 * MS);
    let card = hosts.cards[0].1.clone();
    let (pa, pb) = (hosts.a.prepare().unwrap(), hosts.b.prepare().unwrap());
    hosts.fabric.remove_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + MS);
    assert!(hosts.b.card(0).is_none(), "the endpoint let go");
    // The old opening, held by the harness (and the pending connection).
    let removed = hosts.fabric.open_contexts(&card);
    hosts.fabric.restore_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + 60 * MS);
    let first = hosts.b.get(y0).unwrap();
    assert_ne!(first.core().rail_state(0), RailState::Failed, "re-armed");
    assert!(hosts.b.card(0).is_some(), "open again, as the endpoint's");
    let (_, y) = insert_pending(&mut hosts, pa, pb);
    assert!(
        hosts.b.get(y).unwrap().card_released(0),
        "let go of the old opening at its insert"
    );
    let t = hosts.now();
    settle(&mut hosts, t + 60 * MS);
    let conn = hosts.b.get(y).unwrap();
    assert_ne!(conn.core().rail_state(0), RailState::Failed, "came back");
    assert_eq!(conn.rails_on_shared_queues(), 2);
    // One new opening for all: the connection's re-arm took the endpoint's.
    assert_eq!(hosts.fabric.open_contexts(&card), removed + 1);
}

/// A connection whose rail runs on a card the user swapped in (`replace_card`: a handle of its
/// own on the device) keeps it apart from the endpoint's through a reset of the device: it reads
/// that handle's events itself, opens it again by its own token (not through the endpoint's
/// pool), and its queue pair stays on a queue of its own; the endpoint's other connection
/// re-arms on the endpoint's handle, on the shared queues.
#[test]
fn a_card_the_user_swapped_in_stays_the_connections_through_a_device_reset() {
    use railover_rdma::Nic;
    let mut hosts = SimEndpoints::new(config(), 11, 2 * US).unwrap();
    let (_, mine) = hosts.connect().unwrap();
    let (_, other) = hosts.connect().unwrap();
    settle(&mut hosts, 5 * MS);
    let card = hosts.cards[1].1.clone();
    let wire = hosts.wires[1];
    // Rail 1 back on both: the user's card on a queue of its own, the endpoint's on the shared.
    let both_back = |hosts: &SimEndpoints, when: &str| {
        for (id, shared) in [(mine, 1), (other, 2)] {
            let conn = hosts.b.get(id).unwrap();
            let state = conn.core().rail_state(1);
            assert_ne!(state, RailState::Failed, "{id} re-armed {when}");
            assert_eq!(conn.rails_on_shared_queues(), shared, "{id} {when}");
        }
    };
    hosts.fabric.carrier_loss(wire);
    let t = hosts.now();
    settle(&mut hosts, t + 20 * MS);
    let conn = hosts.b.get_mut(mine).unwrap();
    assert_eq!(conn.core().rail_state(1), RailState::Failed);
    let users = SimNic::reopen(&card.reopen_token()).unwrap();
    conn.replace_card(1, users)
        .expect("the user's card for the failed rail");
    hosts.fabric.carrier_restore(wire);
    let t = hosts.now();
    settle(&mut hosts, t + 60 * MS);
    both_back(&hosts, "after the swap");

    hosts.fabric.remove_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + 5 * MS);
    for id in [mine, other] {
        let conn = hosts.b.get(id).unwrap();
        assert!(conn.card_released(1), "{id} heard the device-fatal event");
    }
    let removed = hosts.fabric.open_contexts(&card);
    hosts.fabric.restore_card(&card);
    let t = hosts.now();
    settle(&mut hosts, t + 60 * MS);
    both_back(&hosts, "after the reset");
    // The endpoint's new handle and the connection's own.
    assert_eq!(hosts.fabric.open_contexts(&card), removed + 2);
}

/// An endpoint whose card of rail 1 is missing at start (a host booted with one NIC dead) still
/// starts and serves: its connections run on rail 0 with rail 1 failed on both sides; once the
/// card is back their rail 1 re-arms, and a connection made after that has both rails from the
/// start (the endpoint opened the card again for it). Every record arrives once, in order.
#[test]
fn an_endpoint_started_without_a_card_serves_and_gains_the_rail_when_the_card_is_back() {
    let mut hosts = SimEndpoints::new_with_card_missing(config(), 17, 2 * US, true, 1).unwrap();
    assert!(
        hosts.b.card(1).is_none(),
        "host 2 starts without its card of rail 1"
    );
    let (x, y) = hosts.connect().unwrap();
    // Per connection (by its place in `pairs`): records sent by host 1, delivered at host 2.
    let mut sent = vec![0u64; 2];
    let mut got = vec![0u64; 2];
    let drive =
        |hosts: &mut SimEndpoints, ms: u64, sends: bool, sent: &mut [u64], got: &mut [u64]| {
            let until = hosts.now() + ms * MS;
            while hosts.now() < until && (sends || got != sent) {
                let pairs = hosts.pairs.clone();
                for (i, &(id, _)) in pairs.iter().enumerate().filter(|_| sends) {
                    if hosts.a.send(id, &(sent[i] + 1).to_le_bytes()).is_ok() {
                        sent[i] += 1;
                    }
                }
                let t = hosts.now() + 20 * US;
                hosts.step(t);
                hosts.b.poll(|id, _, m| {
                    let i = pairs
                        .iter()
                        .position(|&(_, y)| y == id)
                        .expect("a known connection");
                    got[i] += 1;
                    assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), got[i], "order");
                });
                hosts.a.poll(|_, _, _| {});
            }
        };
    drive(&mut hosts, 10, true, &mut sent, &mut got);
    assert_eq!(
        hosts.b.get(y).unwrap().core().rail_state(1),
        RailState::Failed
    );
    assert_eq!(
        hosts.a.get(x).unwrap().core().rail_state(1),
        RailState::Failed
    );
    assert!(got[0] > 100, "served on rail 0 meanwhile: {got:?}");

    let card = hosts.cards[1].1.clone();
    hosts.fabric.restore_card(&card);
    drive(&mut hosts, 30, true, &mut sent, &mut got);
    for (who, conn) in [("host 1", hosts.a.get(x)), ("host 2", hosts.b.get(y))] {
        let core = conn.unwrap().core();
        assert_eq!(
            core.rail_state(1),
            RailState::Standby,
            "{who}: rail 1 re-armed"
        );
        assert!(core.rail_proven(1), "{who}: rail 1 heard its peer");
    }
    // The re-arm opened the card as the endpoint's: on its shared queues, its handle.
    assert_eq!(hosts.b.get(y).unwrap().rails_on_shared_queues(), 2);
    assert!(
        hosts.b.card(1).is_some(),
        "the endpoint took the re-arm's handle"
    );

    // A new connection, on the endpoint's card: both rails from the start.
    let (x2, y2) = hosts.connect().unwrap();
    drive(&mut hosts, 10, true, &mut sent, &mut got);
    for conn in [hosts.a.get(x2), hosts.b.get(y2)] {
        let core = conn.unwrap().core();
        assert!(core.rail_proven(0) && core.rail_proven(1), "both rails");
        assert_eq!(core.stats().failovers, 0);
    }
    drive(&mut hosts, 10, false, &mut sent, &mut got);
    assert_eq!(got, sent, "every record once, on both connections");
    assert!(
        sent[1] > 100,
        "the second connection carried its stream: {sent:?}"
    );
}

/// An endpoint's connection takes a batch (one commit, one write) and the peer's endpoint
/// delivers it in order on that connection alone; an unknown connection is a typed error.
#[test]
fn a_batch_sent_through_the_endpoint_arrives_in_order_on_its_connection() {
    let mut hosts = SimEndpoints::new(config(), 5, 2 * US).unwrap();
    for _ in 0..2 {
        hosts.connect().unwrap();
    }
    warm_up(&mut hosts);
    let (x, y) = hosts.pairs[1];
    let msgs: Vec<[u8; 16]> = (1..=5).map(|seq| payload(1, seq)).collect();
    let batch: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
    assert_eq!(hosts.a.send_batch(x, &batch), Ok(1..6));
    let until = hosts.now() + MS;
    settle(&mut hosts, until);
    let mut got = Vec::new();
    hosts.b.poll(|id, seq, m| got.push((id, seq, m.to_vec())));
    let want: Vec<_> = (1..=5u64)
        .map(|seq| (y, seq, payload(1, seq).to_vec()))
        .collect();
    assert_eq!(got, want);
    hosts.a.remove(x);
    assert_eq!(
        hosts.a.send_batch(x, &batch),
        Err(SendError::UnknownConnection)
    );
}
