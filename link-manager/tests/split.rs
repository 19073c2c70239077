//! `Connection::split`: host 1's `Sender` runs on its own thread while the test's thread drives
//! host 1's `Receiver` (which posts what the sender commits) and host 2 over the simulated fabric,
//! injecting a fault on the active wire every few thousand messages (carrier loss, black hole,
//! corruption, QP fatal, each later cleared and the rail re-armed). Every message arrives exactly
//! once and in order, failovers happen under a sender that never stops, and the sender's
//! steady state allocates nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use railover::runtime::serve_rearms;
use railover::sim::SimPair;
use railover::{Config, EndReason, RailState, SendError};

/// Virtual time the traffic and the faults run for (then the sender stops and the rest drains).
const RUN_NS: u64 = 150_000_000;

fn payload(seq: u64) -> [u8; 24] {
    let mut m = [0u8; 24];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m[8..16].copy_from_slice(&(!seq).to_le_bytes());
    m
}

#[test]
fn a_sender_thread_keeps_sending_through_failovers() {
    let cfg = Config::builder()
        .rails(3)
        .geometry(16 * 1024, 8, 256)
        .heartbeat_misses(3)
        .rearm_after(Duration::from_millis(2))
        .build()
        .unwrap();
    let SimPair {
        fabric,
        wires,
        a,
        mut b,
        ..
    } = SimPair::new(cfg, 5, 2_000).unwrap();
    let (mut sender, mut a) = a.split();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = stop.clone();
    // The sender says when its first record is in: virtual time runs only from then on (it
    // could otherwise run out before the thread was scheduled at all, and nothing flow).
    let (first_sent, started) = std::sync::mpsc::channel();
    let mut sender_thread = Some(std::thread::spawn(move || {
        let mut next = 1u64;
        // Capped so a fast machine doesn't spend long checking tens of millions of messages.
        while !stop_sender.load(Ordering::Relaxed) && next <= 2_000_000 {
            match sender.send(&payload(next)) {
                Ok(seq) => {
                    assert_eq!(seq, next);
                    if next == 1 {
                        let _ = first_sent.send(());
                    }
                    next += 1;
                }
                Err(SendError::Backpressure) => std::thread::yield_now(),
                Err(e) => panic!("sender: {e}"),
            }
        }
        // The Sender goes back with the count: dropping it would close the connection.
        (next - 1, sender)
    }));

    started.recv().expect("the sender's first record");
    let (mut delivered, mut faults, mut cleared_at) = (0u64, 0u64, None);
    let mut next_fault_at = fabric.now() + 5_000_000;
    let mut active_fault: Option<(u8, usize)> = None;
    let end = fabric.now() + RUN_NS;
    let deadline = end + 10_000_000_000; // virtual time: bounds a failing run
    let mut sent = None;
    let mut kept_sender = None;
    while sent != Some(delivered) {
        // The run ends at `end` in virtual time, and not before the sender's records flowed:
        // on a loaded machine the sender thread may be descheduled for the whole virtual run.
        if sent.is_none() && fabric.now() >= end && delivered > 1_000 {
            stop.store(true, Ordering::Relaxed);
            let (count, sender) = sender_thread.take().unwrap().join().unwrap();
            sent = Some(count);
            kept_sender = Some(sender);
        }
        assert!(
            fabric.now() < deadline,
            "stalled at {delivered}\n{}",
            a.core().describe()
        );
        let t = [fabric.next_event_time(), a.next_timeout(), b.next_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(u64::MAX)
            .min(fabric.now() + 5_000);
        fabric.advance_to(t.max(fabric.now()));
        a.progress();
        b.poll(|m| {
            delivered += 1;
            assert_eq!(
                m,
                &payload(delivered)[..],
                "message {delivered}: lost, duplicated or reordered"
            );
        })
        .unwrap();
        if a.has_rearm_request() || b.has_rearm_request() {
            serve_rearms(&mut a, &mut b);
        }
        // Inject the next fault on the active wire once every rail is healthy again; clear it
        // 5 ms (virtual) later.
        let healthy = (0..3).all(|r| {
            a.core().rail_state(r) != RailState::Failed
                && b.core().rail_state(r) != RailState::Failed
        });
        if active_fault.is_none() && healthy && fabric.now() >= next_fault_at && sent.is_none() {
            let wire = wires[a.core().active_rail()];
            let kind = (faults % 4) as u8;
            match kind {
                0 => fabric.carrier_loss(wire),
                1 => fabric.black_hole(wire),
                2 => fabric.corrupt_next(wire, 1),
                _ => fabric.latency_spike(wire, 20_000_000, 5_000_000),
            }
            active_fault = Some((kind, a.core().active_rail()));
            cleared_at = Some(fabric.now() + 5_000_000);
            faults += 1;
            next_fault_at = fabric.now() + 10_000_000;
        }
        if let (Some((kind, rail)), Some(at)) = (active_fault, cleared_at) {
            if fabric.now() >= at {
                match kind {
                    0 => fabric.carrier_restore(wires[rail]),
                    1 => fabric.clear_black_hole(wires[rail]),
                    _ => {}
                }
                active_fault = None;
            }
        }
    }
    let stats = a.stats();
    // (How many depends on how the two threads are scheduled against virtual time.)
    assert!(delivered > 1_000, "traffic flowed: {delivered}");
    assert!(faults >= 10, "{faults} faults injected");
    assert!(stats.failovers >= 5, "failovers: {}", stats.failovers);
    assert_eq!(stats.sent, delivered);
    // Dropping the Sender closes the connection gracefully, once everything was delivered.
    drop(kept_sender);
    while !b.core().is_dead() {
        let t = fabric.next_event_time().unwrap_or(fabric.now() + 1_000_000);
        fabric.advance_to(t.max(fabric.now()));
        a.progress();
        let _ = b.poll(|_| panic!("nothing was left to deliver"));
        assert!(fabric.now() < deadline, "host 2 never saw the close");
    }
    assert_eq!(a.core().end_reason(), Some(EndReason::Closed));
    assert_eq!(b.core().end_reason(), Some(EndReason::PeerClosed));
    eprintln!(
        "{delivered} messages, {faults} faults, {} failovers, {} records resent, {} duplicates discarded at host 2",
        stats.failovers,
        stats.records_resent,
        b.stats().duplicates_discarded
    );
}

/// A reply committed through the `Sender` from inside the delivery callback goes out in the same
/// poll, not in the next one (checked past the first record, whose acknowledgement is due at
/// once and makes the poll look for I/O anyway).
#[test]
fn a_reply_sent_from_the_delivery_callback_is_posted_by_the_same_poll() {
    let cfg = Config::builder().geometry(4096, 4, 256).build().unwrap();
    let SimPair {
        fabric, a, mut b, ..
    } = SimPair::new(cfg, 7, 1_000).unwrap();
    let (mut sender, mut a) = a.split();
    for round in 0u8..5 {
        b.send(&[round; 8]).unwrap();
        let mut echoed = 0;
        for _ in 0..1_000 {
            if let Some(t) = fabric.next_event_time() {
                fabric.advance_to(t);
            }
            b.progress();
            a.poll(|m| {
                sender.send(m).unwrap();
                echoed += 1;
            })
            .unwrap();
            if echoed > 0 {
                break;
            }
        }
        assert_eq!(echoed, 1, "round {round}: the ping arrived");
        assert!(
            !a.core().has_unposted(),
            "round {round}: the echo waits for the next poll"
        );
        let mut got = Vec::new();
        for _ in 0..1_000 {
            if let Some(t) = fabric.next_event_time() {
                fabric.advance_to(t);
            }
            a.progress();
            b.poll(|m| got.push(m.to_vec())).unwrap();
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got, vec![vec![round; 8]]);
    }
    drop(sender);
}
