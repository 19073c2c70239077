//! Heartbeats ride on data: while the active rail carries data writes, their immediates carry
//! the heartbeat number and the rail sends no heartbeat block of its own (the standby still
//! does, with the acknowledgements); once the data stops, the blocks come back. Either way the
//! peer hears every rail and fails none. Receive credits ride on data flowing back too.

use railover::core::Event;
use railover::sim::SimPair;
use railover::{Config, RailState};
use std::time::Duration;

const MS: u64 = 1_000_000;

/// Two rails, 1 ms heartbeats, 3 misses; 2 us wires.
fn pair(seed: u64) -> SimPair {
    let cfg = Config::builder()
        .rails(2)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .build()
        .unwrap();
    SimPair::new(cfg, seed, 2_000).unwrap()
}

/// Host 1's control writes during `intervals` heartbeat intervals, sending one record every
/// `every_ns` (0: none) while host 2 receives; returns (control writes, records delivered).
fn run(p: &mut SimPair, intervals: u64, every_ns: u64) -> (u64, usize) {
    let before = p.a.stats().control_writes;
    let end = p.now() + intervals * MS;
    let mut delivered = 0;
    let mut next_send = p.now();
    while p.now() < end {
        // (A paused host runs nothing: no send, no poll.)
        if every_ns > 0 && p.now() >= next_send {
            if !p.is_paused(false) {
                p.a.send(&[7u8; 64]).expect("send");
            }
            next_send += every_ns;
        }
        let limit = if every_ns > 0 {
            next_send.min(end)
        } else {
            end
        };
        p.step(limit.max(p.now() + 1));
        if !p.is_paused(true) {
            delivered += p.b.poll(|m| assert_eq!(m, &[7u8; 64])).expect("poll");
        }
        if !p.is_paused(false) {
            p.a.poll(|_| {}).expect("poll");
        }
    }
    (p.a.stats().control_writes - before, delivered)
}

#[test]
fn a_rail_carrying_data_sends_no_heartbeat_blocks_and_no_rail_is_failed() {
    let mut p = pair(11);
    run(&mut p, 5, 0); // connected, both rails proven
    let (idle_blocks, _) = run(&mut p, 100, 0);
    let (streaming_blocks, delivered) = run(&mut p, 100, 50_000);
    let (idle_again, _) = run(&mut p, 100, 0);
    eprintln!(
        "host 1's control writes per 100 intervals: idle {idle_blocks}, streaming {streaming_blocks}, idle again {idle_again}"
    );
    assert!(delivered >= 1_990, "the stream was delivered: {delivered}");
    // Idle: a block per rail per interval. Streaming: the standby's alone (the active rail's
    // beats rode on the data).
    assert!(idle_blocks >= 190, "idle: {idle_blocks}");
    assert!(
        streaming_blocks * 10 <= idle_blocks * 6,
        "streaming: {streaming_blocks} blocks against {idle_blocks} idle"
    );
    assert!(idle_again >= 190, "the blocks came back: {idle_again}");
    for (who, c) in [("host 1", &mut p.a), ("host 2", &mut p.b)] {
        while let Some(e) = c.poll_event() {
            assert!(
                !matches!(
                    e,
                    Event::RailDown { .. }
                        | Event::Failover { .. }
                        | Event::PeerUnresponsive { .. }
                ),
                "{who}: {e:?}"
            );
        }
        for r in 0..2 {
            assert_ne!(c.core().rail_state(r), RailState::Failed, "{who}: rail {r}");
        }
    }
}

/// A black hole on the active wire while it carries data is still found by the heartbeat rule
/// (its data, and so its beats, stop arriving while the standby's go on) and failed over, with
/// nothing lost.
#[test]
fn a_black_hole_under_a_stream_is_still_caught_by_the_beats() {
    let mut p = pair(12);
    run(&mut p, 5, 0);
    let (_, before) = run(&mut p, 10, 50_000);
    let wire = p.wires[0];
    p.fabric.black_hole(wire);
    let (_, during) = run(&mut p, 30, 50_000);
    let mut downs = Vec::new();
    while let Some(e) = p.b.poll_event() {
        if let Event::RailDown { rail, reason, .. } = e {
            downs.push((rail, reason));
        }
    }
    while let Some(e) = p.a.poll_event() {
        if let Event::RailDown { rail, reason, .. } = e {
            downs.push((rail, reason));
        }
    }
    assert!(
        downs.iter().any(|(rail, _)| *rail == 0),
        "the black-holed rail was not failed: {downs:?}"
    );
    assert_eq!(p.a.core().active_rail(), 1, "traffic moved to the standby");
    // Everything sent so far arrives (the last records of the run may still be in flight).
    let (_, after) = run(&mut p, 10, 0);
    assert_eq!(
        (before + during + after) as u64,
        p.a.core().last_sent_seq(),
        "lost records"
    );
}

/// Seed 2881's shape: host 1 skips its active rail's block at a tick (its data carried the beat)
/// and stops right then (descheduled, 1.6 ms), while the active wire turns slow (+1.9 ms for
/// 3 ms). The active rail then lacks one beat the standby carried, and its next beats arrive
/// late: it is slow, not dead, and no rail may be failed for it.
#[test]
fn a_sender_stopped_right_after_skipping_a_beat_fails_no_rail_on_a_slow_wire() {
    let mut p = pair(13);
    run(&mut p, 5, 0);
    run(&mut p, 5, 50_000); // ends on a tick, processed with data sent in the interval before
    assert_eq!(p.now() % MS, 0, "on a tick");
    p.pause(false, p.now() + 1_619_000);
    let wire = p.wires[0];
    let spike_at = p.now() + 154_000;
    while p.now() < spike_at {
        p.step(spike_at);
    }
    p.fabric.latency_spike(wire, 1_864_000, 3 * MS);
    run(&mut p, 20, 50_000);
    for (who, c) in [("host 1", &mut p.a), ("host 2", &mut p.b)] {
        while let Some(e) = c.poll_event() {
            assert!(
                !matches!(e, Event::RailDown { .. } | Event::Failover { .. }),
                "{who}: {e:?}"
            );
        }
    }
}

/// A one-way stream from the very start (a flood, or a resumed connection's queued records):
/// the active rail skips no block before one has given the peer its full beat number, so the
/// peer proves the rail and never fails it, and the stream still saves the blocks.
#[test]
fn a_stream_from_the_first_instant_fails_no_rail() {
    let mut p = pair(14);
    let (blocks, delivered) = run(&mut p, 200, 50_000);
    assert!(delivered >= 3_990, "delivered {delivered}");
    assert!(
        blocks <= 260,
        "the active rail's blocks were not skipped: {blocks}"
    );
    for (who, c) in [("host 1", &mut p.a), ("host 2", &mut p.b)] {
        while let Some(e) = c.poll_event() {
            assert!(
                !matches!(e, Event::RailDown { .. } | Event::Failover { .. }),
                "{who}: {e:?}"
            );
        }
        assert!(c.core().rail_proven(0) && c.core().rail_proven(1), "{who}");
    }
}

/// A sender that only sends keeps its connection turning with a `progress` every 64th send;
/// that turn (here a heartbeat tick: the standby's block) comes after the send's own write,
/// not before it: the message does not wait for the housekeeping.
#[test]
fn the_turn_a_send_makes_comes_after_its_own_write() {
    let mut p = pair(41);
    run(&mut p, 5, 0); // connected, both rails proven
                       // 63 sends, each delivered (the 64th send is the one that turns the connection).
    for i in 0..63u8 {
        p.a.send(&[i; 64]).unwrap();
        let t = p.now() + 10_000;
        p.fabric.advance_to(t);
        assert_eq!(p.b.poll(|m| assert_eq!(m, &[i; 64])).unwrap(), 1);
    }
    // Host 1's heartbeat tick falls due while it does not run.
    let tick = p.a.core().poll_timeout().expect("a heartbeat is scheduled");
    p.fabric.advance_to(tick.max(p.now()));
    assert!(p.a.core().heartbeat_due(p.now()));
    let before = p.fabric.stats();
    p.a.send(&[63; 64]).unwrap();
    let after = p.fabric.stats();
    assert_eq!(
        after.last_imm_write_posted,
        before.writes_posted + 1,
        "the message's write was the send's first post"
    );
    assert!(
        after.writes_posted > before.writes_posted + 1,
        "and the heartbeat tick's blocks followed it"
    );
    assert!(!p.a.core().heartbeat_due(p.now()), "the tick ran");
}

/// `n` round trips of 8-byte messages, host 1 to host 2 and back, each checked.
fn ping_pong(p: &mut SimPair, n: u64) {
    for i in 0..n {
        let msg = i.to_le_bytes();
        for (from_a, who) in [(true, "host 2"), (false, "host 1")] {
            if from_a {
                p.a.send(&msg).expect("send");
            } else {
                p.b.send(&msg).expect("send");
            }
            let mut got = 0;
            while got == 0 {
                let next = p.now() + 1_000;
                p.step(next);
                let to = if from_a { &mut p.b } else { &mut p.a };
                got = to.poll(|m| assert_eq!(m, &msg, "{who}")).expect("poll");
            }
        }
    }
}

/// Receive credits ride on data flowing back: every 16th reply's immediate says another 16
/// notifications were processed, so a ping-pong needs no control block for them. With a 1 s
/// beat (no heartbeat block falls due), 2,000 round trips post no control write on either side,
/// though a sender may have at most half the peer's receive queue (256 writes) in flight beyond
/// the credits it was given: the replies' credit bits gave them all. (Before, a block went every
/// 64 receives: ~31 per side here.)
#[test]
fn a_ping_pong_returns_receive_credits_on_its_replies_not_in_control_writes() {
    let cfg = Config::builder()
        .rails(2)
        .heartbeat_interval(Duration::from_secs(1))
        .heartbeat_misses(3)
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 43, 2_000).unwrap();
    ping_pong(&mut p, 10); // connected, the first acknowledgements sent
    let before = (p.a.stats().control_writes, p.b.stats().control_writes);
    let start = p.now();
    ping_pong(&mut p, 2_000);
    let after = (p.a.stats().control_writes, p.b.stats().control_writes);
    assert!(
        p.now() - start < 500 * MS,
        "no heartbeat tick fell inside the run"
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 0),
        "control writes during 2,000 round trips (host 1, host 2)"
    );
    for c in [&mut p.a, &mut p.b] {
        while let Some(e) = c.poll_event() {
            assert!(!matches!(e, Event::RailDown { .. }), "{e:?}");
        }
    }
}

/// Acknowledgements of consumed ring space go in a block once a quarter ring has been consumed
/// since the last one, not per message: a ping-pong's control writes, with no heartbeat block
/// due (1 s beat) and credits riding on the replies, are those blocks alone. With a 64 KiB ring
/// (16 KiB a quarter) and 24-byte records, 8,000 round trips consume ~188 KiB a side: about 11
/// blocks each, where an acknowledgement per message would be 8,000. (With the default 4 MiB
/// ring a 64 B ping-pong sends one every ~13,000 messages a side; the standby's beat, one a
/// millisecond, is far more: hot-path.md, "Acknowledgements in the data direction".)
#[test]
fn a_ping_pong_acknowledges_ring_space_once_a_quarter_ring_not_per_message() {
    const RING: u64 = 4096 * 16;
    let cfg = Config::builder()
        .rails(2)
        .geometry(4096, 16, 1024)
        .heartbeat_interval(Duration::from_secs(1))
        .heartbeat_misses(3)
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 44, 2_000).unwrap();
    ping_pong(&mut p, 10); // connected, the first acknowledgements sent
    let before = (p.a.stats().control_writes, p.b.stats().control_writes);
    let start = p.now();
    let round_trips = 8_000;
    ping_pong(&mut p, round_trips);
    assert!(
        p.now() - start < 500 * MS,
        "no heartbeat tick fell inside the run"
    );
    let writes = [
        p.a.stats().control_writes - before.0,
        p.b.stats().control_writes - before.1,
    ];
    // A record is a 16-byte header and the 8-byte message; a segment's unused tail adds a little.
    let quarters = round_trips * 24 / (RING / 4);
    for (host, w) in writes.into_iter().enumerate() {
        assert!(
            (quarters..=quarters + 2).contains(&w),
            "host {}: {w} control writes for {round_trips} round trips, {quarters} quarter rings consumed",
            host + 1
        );
    }
    for c in [&mut p.a, &mut p.b] {
        while let Some(e) = c.poll_event() {
            assert!(!matches!(e, Event::RailDown { .. }), "{e:?}");
        }
    }
}
