//! Ending a session on purpose, on the simulated fabric: a graceful close hands everything over
//! and the peer sees `PeerClosed`, never a fault; a linger that runs out says how much was not
//! delivered and lists it; dropping a connection or either split half closes it.

use railover::core::Event;
use railover::sim::SimPair;
use railover::{CloseError, Config, EndReason, RecvError, SendError};
use std::time::Duration;

const MS: u64 = 1_000_000;

fn pair() -> SimPair {
    SimPair::new(
        Config::builder().geometry(4096, 4, 256).build().unwrap(),
        9,
        2_000,
    )
    .unwrap()
}

/// Steps both sides until `done` or 1 s of virtual time.
fn run_until(p: &mut SimPair, mut done: impl FnMut(&mut SimPair) -> bool) {
    let limit = p.now() + 1_000 * MS;
    while !done(p) {
        assert!(p.now() < limit, "not done within 1 s (virtual)");
        let t = p.now() + 100_000;
        p.step(t);
    }
}

fn events(p: &mut SimPair, host2: bool) -> Vec<Event> {
    let c = if host2 { &mut p.b } else { &mut p.a };
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn is_fault(e: &Event) -> bool {
    matches!(
        e,
        Event::RailDown { .. } | Event::Failover { .. } | Event::PeerUnresponsive { .. }
    )
}

#[test]
fn a_graceful_close_hands_everything_over_and_the_peer_sees_peer_closed() {
    let mut p = pair();
    for i in 0..50u8 {
        p.a.send(&[i; 100]).unwrap();
    }
    p.a.start_close(100 * MS);
    assert_eq!(
        p.a.send(b"late"),
        Err(SendError::Ended(EndReason::Closed)),
        "nothing is accepted once closing"
    );
    let mut got = Vec::new();
    run_until(&mut p, |p| {
        let _ = p.b.poll(|m| got.push(m[0]));
        p.a.core().is_dead() && p.b.core().is_dead()
    });
    assert_eq!(
        got,
        (0..50).collect::<Vec<u8>>(),
        "every record, in order, once"
    );
    assert_eq!(p.a.end_reason(), Some(EndReason::Closed));
    assert_eq!(p.b.end_reason(), Some(EndReason::PeerClosed));
    let mut left = 0;
    p.a.unacked(|_, _| left += 1);
    assert_eq!(left, 0, "the closer knows everything was delivered");
    assert_eq!(
        p.b.poll(|_| {}),
        Err(RecvError::Ended(EndReason::PeerClosed))
    );
    assert_eq!(p.b.send(b"x"), Err(SendError::Ended(EndReason::PeerClosed)));
    for host2 in [false, true] {
        let ev = events(&mut p, host2);
        assert!(!ev.iter().any(is_fault), "a close is not a fault: {ev:?}");
        assert!(ev.iter().any(|e| matches!(e, Event::Ended { .. })));
    }
}

#[test]
fn close_waits_for_the_peer_and_reports_what_a_short_linger_left_undelivered() {
    let mut p = pair();
    for i in 0..10u8 {
        p.a.send(&[i; 10]).unwrap();
    }
    // Host 2 stays paused for longer than the linger: nothing can be delivered meanwhile.
    let now = p.now();
    p.pause(true, now + 50 * MS);
    assert_eq!(
        p.a.close(5 * MS),
        Err(CloseError::Undelivered { records: 10 })
    );
    let mut listed = Vec::new();
    p.a.unacked(|seq, m| listed.push((seq, m[0])));
    assert_eq!(
        listed,
        (0..10u8).map(|i| (i as u64 + 1, i)).collect::<Vec<_>>()
    );
    // Resumed, host 2 learns the session is over instead of waiting out silence. It may have
    // delivered nothing: host 1 lists every record as unacknowledged, so none is lost.
    run_until(&mut p, |p| {
        let _ = p.b.poll(|_| {});
        p.b.core().is_dead()
    });
    assert_eq!(p.b.end_reason(), Some(EndReason::PeerClosed));
}

/// A connection the peer closed owes it no goodbye: dropping it returns at once instead of
/// waiting out its linger (a process holding many such connections hung on exit, a linger each).
#[test]
fn dropping_a_connection_the_peer_closed_does_not_wait_out_the_linger() {
    let mut p = pair();
    p.a.send(b"last words").unwrap();
    p.a.start_close(100 * MS);
    run_until(&mut p, |p| {
        let _ = p.b.poll(|_| {});
        p.a.core().is_dead() && p.b.core().is_dead()
    });
    assert_eq!(p.b.end_reason(), Some(EndReason::PeerClosed));
    assert!(
        !p.b.core().bye_pending(),
        "no goodbye owed to a peer that closed"
    );
    let SimPair { fabric, a, b, .. } = p;
    let before = fabric.now();
    drop(b);
    assert_eq!(
        fabric.now(),
        before,
        "dropped without waiting (virtual time)"
    );
    drop(a);
}

#[test]
fn dropping_a_connection_closes_it_gracefully() {
    let mut p = pair();
    p.a.send(b"last words").unwrap();
    let SimPair { a, mut b, .. } = p;
    drop(a); // closes: waits (virtual time) for host 2 ...
    let mut got = Vec::new();
    // ... which, not being driven meanwhile, delivers after the linger: host 1 listed the record
    // as unacknowledged when it gave up, and host 2 now sees the close and delivers nothing new.
    let _ = b.poll(|m| got.push(m.to_vec()));
    assert_eq!(b.end_reason(), Some(EndReason::PeerClosed));
    let ev: Vec<Event> = std::iter::from_fn(|| b.poll_event()).collect();
    assert!(!ev.iter().any(is_fault), "a drop is not a fault: {ev:?}");
}

#[test]
fn dropping_the_receiver_half_fails_the_sender_with_a_typed_error() {
    let SimPair { a, b: _b, .. } = pair();
    let (mut tx, rx) = a.split();
    tx.send(b"one").unwrap();
    drop(rx);
    assert_eq!(tx.send(b"two"), Err(SendError::Ended(EndReason::Closed)));
}

#[test]
fn dropping_the_sender_half_closes_the_connection_after_handing_everything_over() {
    let SimPair {
        fabric, a, mut b, ..
    } = pair();
    let (mut tx, mut rx) = a.split();
    for i in 0..20u8 {
        tx.send(&[i; 30]).unwrap();
    }
    drop(tx);
    let mut got = Vec::new();
    let limit = fabric.now() + 1_000 * MS;
    while !(rx.core().is_dead() && b.core().is_dead()) {
        assert!(fabric.now() < limit, "the close never finished");
        let t = fabric.next_event_time().unwrap_or(fabric.now() + MS);
        fabric.advance_to(t.max(fabric.now()).min(fabric.now() + MS));
        let _ = rx.poll(|_| {});
        let _ = b.poll(|m| got.push(m[0]));
    }
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
    assert_eq!(rx.end_reason(), Some(EndReason::Closed));
    assert_eq!(b.end_reason(), Some(EndReason::PeerClosed));
}

#[test]
fn a_peer_paused_past_the_session_timeout_ends_the_session_on_both_sides() {
    let cfg = Config::builder()
        .geometry(4096, 4, 256)
        .session_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 4, 2_000).unwrap();
    p.a.send(b"before").unwrap();
    run_until(&mut p, |p| p.b.poll(|_| {}).unwrap() > 0);
    p.a.send(b"during").unwrap();
    let now = p.now();
    p.pause(true, now + 200 * MS);
    run_until(&mut p, |p| p.a.core().is_dead());
    assert_eq!(p.a.end_reason(), Some(EndReason::SessionTimeout));
    let ev = events(&mut p, false);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::PeerUnresponsive { .. })),
        "{ev:?}"
    );
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::RailDown { .. } | Event::Failover { .. })),
        "silence of the whole peer fails no rail: {ev:?}"
    );
    let mut listed = Vec::new();
    p.a.unacked(|seq, m| listed.push((seq, m.to_vec())));
    assert_eq!(listed, vec![(2, b"during".to_vec())]);
    // Host 2 resumes, hears the session ended, and ends too (no waiting out a timeout of its own).
    run_until(&mut p, |p| p.b.core().is_dead());
    assert_eq!(p.b.end_reason(), Some(EndReason::PeerEnded));
}
