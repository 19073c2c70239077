//! A busy loop polls the completion queue of the rails carrying records every time, and the
//! others (a standby with heartbeats alone) and the cards' device events once per
//! `QUIET_RAIL_POLL_NS`. These tests hold it to that, and to its bound: records the peer moves
//! to a quiet rail are found within the period, busy-polled or blocking, and from then on at
//! once.

use railover::core::Event;
use railover::runtime::QUIET_RAIL_POLL_NS;
use railover::sim::SimPair;
use railover::Config;
use railover_rdma::AsyncEvent;
use std::time::Duration;

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
/// The simulated wires' one-way latency.
const WIRE_NS: u64 = 2 * US;

/// Two rails, 1 ms heartbeats; run for 5 ms so that both are proven.
fn pair(seed: u64) -> SimPair {
    let cfg = Config::builder()
        .rails(2)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, seed, WIRE_NS).unwrap();
    let until = p.now() + 5 * MS;
    while p.now() < until {
        p.step(until);
        p.a.poll(|_| panic!("nothing was sent")).unwrap();
        p.b.poll(|_| panic!("nothing was sent")).unwrap();
    }
    p
}

/// Host 1's polls of its cards' completion queues: (rail 0's, rail 1's).
fn host1_polls(p: &SimPair) -> (u64, u64) {
    (
        p.fabric.cq_polls(p.wires[0])[0],
        p.fabric.cq_polls(p.wires[1])[0],
    )
}

#[test]
fn a_busy_loop_polls_the_standby_once_a_period() {
    let mut p = pair(21);
    assert_eq!(p.a.core().active_rail(), 0);
    // 10,000 polls at one instant of virtual time: the active rail's queue every time, the
    // standby's at most once (the first poll, if a period had passed).
    let before = host1_polls(&p);
    for _ in 0..10_000 {
        p.a.poll(|_| panic!("nothing was sent")).unwrap();
    }
    let after = host1_polls(&p);
    assert_eq!(after.0 - before.0, 10_000, "the active rail, every poll");
    assert!(
        after.1 - before.1 <= 1,
        "the standby: {}",
        after.1 - before.1
    );
    // A period later the next poll looks at the standby too, and then not again at once.
    p.fabric.advance_to(p.now() + QUIET_RAIL_POLL_NS);
    p.a.poll(|_| {}).unwrap();
    p.a.poll(|_| {}).unwrap();
    let last = host1_polls(&p);
    assert_eq!(last.1 - after.1, 1, "the standby, once the period passed");
    assert_eq!(last.0 - after.0, 2);
    // The connection asks to be driven again by then, so a caller that sleeps until its
    // next timeout misses nothing.
    let next = p.a.next_timeout().expect("a timer");
    assert!(next <= p.now() + QUIET_RAIL_POLL_NS, "next timeout {next}");
}

/// Host 2 alone loses rail 0 (a port event on its card): it fails over and sends on rail 1,
/// which host 1 (still sending on rail 0) polls once a period. Returns the pair then.
fn peer_moved_to_the_standby(seed: u64) -> SimPair {
    let mut p = pair(seed);
    p.fabric.card_event(&p.cards[0].1, AsyncEvent::PortDown);
    let until = p.now() + MS;
    while p.b.core().active_rail() != 1 {
        assert!(p.now() < until, "host 2 did not fail over");
        p.step(until);
        p.a.poll(|_| panic!("nothing was sent")).unwrap();
        p.b.poll(|_| panic!("nothing was sent")).unwrap();
    }
    assert_eq!(p.a.core().active_rail(), 0, "host 1 still sends on rail 0");
    p
}

#[test]
fn records_moved_to_a_quiet_rail_are_found_within_the_period_then_at_once() {
    let mut p = peer_moved_to_the_standby(22);
    let mut delays = Vec::new();
    for i in 0..10u8 {
        let sent_at = p.now();
        p.b.send(&[i; 64]).unwrap();
        let mut got = 0;
        while got == 0 {
            assert!(
                p.now() < sent_at + MS,
                "record {i} not delivered within 1 ms"
            );
            p.step(sent_at + MS);
            got = p.a.poll(|m| assert_eq!(m, &[i; 64])).unwrap();
            p.b.poll(|_| {}).unwrap();
        }
        delays.push(p.now() - sent_at);
    }
    println!("delivery after the peer moved to the standby (ns): {delays:?}");
    assert!(
        delays[0] <= WIRE_NS + QUIET_RAIL_POLL_NS,
        "the first record on the quiet rail: {} ns",
        delays[0]
    );
    // From then on the rail is polled every time: each record as soon as it lands. (Here host 1
    // follows the peer to rail 1 at the poll that finds the first record, so this holds by its
    // own active rail; the rail a record last arrived on counts as busy too, for the window
    // before a side follows.)
    for (i, d) in delays.iter().enumerate().skip(1) {
        assert!(*d <= 2 * WIRE_NS, "record {i}: {d} ns");
    }
    assert_ne!(p.a.core().busy_rails() & 0b10, 0, "rail 1 is busy now");
    while let Some(e) = p.a.poll_event() {
        assert!(!matches!(e, Event::AllRailsDown { .. }), "{e:?}");
    }
}

#[test]
fn a_blocking_receive_wakes_for_records_on_a_quiet_rail() {
    let mut p = peer_moved_to_the_standby(23);
    let sent_at = p.now();
    p.b.send(&[9; 64]).unwrap();
    p.b.progress();
    // Host 1 alone, blocking (virtual time moves to the next packet or timer): before it waits
    // it looks at every rail, quiet ones included, as arming a real wait does.
    let got =
        p.a.poll_blocking(10 * MS, |m| assert_eq!(m, &[9; 64]))
            .unwrap();
    assert_eq!(got, 1, "nothing delivered within 10 ms");
    let delay = p.now() - sent_at;
    println!("blocking receive on the quiet rail: {delay} ns");
    assert!(delay <= WIRE_NS + QUIET_RAIL_POLL_NS, "{delay} ns");
}
