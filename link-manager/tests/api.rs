//! The user-facing API on the simulated fabric: recv into a caller buffer, zero-copy reserve,
//! typed errors for bad input, both directions.

use railover::sim::SimPair;
use railover::{Config, RecvError, SendError};

fn pair() -> SimPair {
    SimPair::new(
        Config::builder().geometry(4096, 4, 256).build().unwrap(),
        3,
        1_000,
    )
    .unwrap()
}

fn settle(p: &mut SimPair) {
    let t = p.now() + 100_000;
    while p.now() < t {
        p.step(t);
    }
}

#[test]
fn recv_copies_one_message_at_a_time_in_order() {
    let mut p = pair();
    for i in 0u8..5 {
        p.a.send(&[i; 10]).unwrap();
    }
    settle(&mut p);
    let mut small = [0u8; 100];
    assert_eq!(
        p.b.recv(&mut small),
        Err(RecvError::BufferTooSmall { len: 100, max: 256 })
    );
    let mut buf = [0u8; 256];
    for i in 0u8..5 {
        assert_eq!(p.b.recv(&mut buf), Ok(Some(10)));
        assert_eq!(&buf[..10], &[i; 10]);
    }
    assert_eq!(p.b.recv(&mut buf), Ok(None));
}

#[test]
fn zero_copy_reserve_and_both_directions() {
    let mut p = pair();
    {
        let mut slot = p.a.reserve(5).unwrap();
        slot.payload_mut().copy_from_slice(b"hello");
        assert_eq!(slot.commit(), 1);
    }
    p.a.flush();
    p.b.send(b"world").unwrap();
    settle(&mut p);
    let mut got = Vec::new();
    p.b.poll(|m| got.push(m.to_vec())).unwrap();
    p.a.poll(|m| got.push(m.to_vec())).unwrap();
    assert_eq!(got, vec![b"hello".to_vec(), b"world".to_vec()]);
}

#[test]
fn oversized_and_backpressure_are_typed_errors_and_lose_nothing() {
    let mut p = pair();
    assert_eq!(
        p.a.send(&[0; 257]),
        Err(SendError::TooLarge { len: 257, max: 256 })
    );
    let mut accepted = 0u64;
    loop {
        match p.a.send(&[7; 200]) {
            Ok(seq) => accepted = seq,
            Err(SendError::Backpressure) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted > 10);
    let mut delivered = 0u64;
    while delivered < accepted {
        settle(&mut p);
        delivered += p.b.poll(|m| assert_eq!(m, &[7; 200])).unwrap() as u64;
    }
    assert_eq!(
        delivered, accepted,
        "everything accepted before back-pressure arrives"
    );
    assert!(
        p.a.send(&[1; 10]).is_ok(),
        "space returns once acknowledged"
    );
}

#[test]
fn a_receiver_stall_shorter_than_the_heartbeat_timeout_never_kills_the_rail() {
    // Each send is posted at once as its own WRITE WITH IMM, and each consumes one of the
    // receiver's posted receives. The receiving process stalls for 1.5 ms (less than the 3 ms
    // heartbeat timeout) while the sender posts one write per microsecond: without credit flow
    // control the receives run out, RNR retries are exhausted and the rail dies.
    let cfg = Config::builder()
        .geometry(64 * 1024, 16, 64)
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 4, 1_000).unwrap();
    let (mut accepted, mut delivered) = (0u64, 0u64);
    for _round in 0..5 {
        for _ in 0..1_500 {
            match p.a.send(&[3; 8]) {
                Ok(seq) => accepted = seq,
                Err(SendError::Backpressure) => {}
                Err(e) => panic!("{e}"),
            }
            let t = p.now() + 1_000;
            p.fabric.advance_to(t);
            p.a.progress(); // only the sender runs
        }
        for _ in 0..10 {
            settle(&mut p);
            delivered += p.b.poll(|m| assert_eq!(m, &[3; 8])).unwrap() as u64;
        }
    }
    assert_eq!(p.a.stats().failovers, 0, "{}", p.a.core().describe());
    assert_eq!(delivered, accepted);
    assert!(accepted > 3_000, "{accepted}");
}

/// Fills `a`'s ring; returns the last sequence number accepted.
fn fill(p: &mut SimPair) -> u64 {
    let mut accepted = 0;
    loop {
        match p.a.send(&[9; 200]) {
            Ok(seq) => accepted = seq,
            Err(SendError::Backpressure) => return accepted,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn send_timeout_waits_for_an_acknowledgement_in_flight() {
    let mut p = pair();
    let accepted = fill(&mut p);
    // Let every record land, then the receiver consumes: its acknowledgement is now on the wire.
    while p.fabric.next_event_time().is_some() {
        let t = p.fabric.next_event_time().unwrap();
        p.fabric.advance_to(t);
    }
    let mut delivered = p.b.poll(|m| assert_eq!(m, &[9; 200])).unwrap() as u64;
    assert_eq!(p.a.send(&[1; 200]), Err(SendError::Backpressure));
    let before = p.now();
    let seq = p.a.send_timeout(&[1; 200], 1_000_000).unwrap();
    assert_eq!(
        seq,
        accepted + 1,
        "the next sequence number, nothing skipped"
    );
    assert!(p.now() > before, "it waited (virtual time moved)");
    assert!(p.now() < before + 1_000_000, "and not to the deadline");
    settle(&mut p);
    delivered += p.b.poll(|_| {}).unwrap() as u64;
    assert_eq!(delivered, seq);
}

#[test]
fn send_timeout_gives_up_at_its_deadline_and_loses_nothing() {
    let mut p = pair();
    let accepted = fill(&mut p);
    // The receiver never runs: no acknowledgement can come.
    let before = p.now();
    assert_eq!(
        p.a.send_timeout(&[1; 200], 300_000),
        Err(SendError::Backpressure)
    );
    assert!(p.now() >= before + 300_000, "it waited the whole bound");
    let mut unacked = Vec::new();
    p.a.unacked(|seq, _| unacked.push(seq));
    assert_eq!(unacked, (1..=accepted).collect::<Vec<_>>());
    let mut delivered = 0;
    while delivered < accepted {
        settle(&mut p);
        delivered += p.b.poll(|m| assert_eq!(m, &[9; 200])).unwrap() as u64;
    }
    assert_eq!(delivered, accepted);
}

#[test]
fn recv_blocking_sleeps_until_a_message_lands() {
    let mut p = pair();
    p.a.send(b"order 1").unwrap();
    let before = p.now();
    let mut buf = [0u8; 256];
    assert_eq!(p.b.recv_blocking(&mut buf, 2_000_000), Ok(Some(7)));
    assert_eq!(&buf[..7], b"order 1");
    assert!(p.now() > before, "it slept (virtual time moved)");
    assert!(
        p.now() < before + 2_000_000,
        "and woke on arrival, not at the deadline"
    );
}

#[test]
fn recv_blocking_times_out_heart_beating_and_loses_nothing() {
    let mut p = pair();
    settle(&mut p);
    let before = p.now();
    let writes_before = p.fabric.stats().writes_delivered;
    let mut buf = [0u8; 256];
    // Shorter than the heartbeat timeout: `a` does not run meanwhile.
    assert_eq!(p.b.recv_blocking(&mut buf, 2_000_000), Ok(None));
    assert!(p.now() >= before + 2_000_000, "it waited the whole bound");
    // Only `b` ran: every write that landed meanwhile is one of its heartbeats (1 ms interval,
    // 3 rails), so it woke at its timers while it slept.
    let heartbeats = p.fabric.stats().writes_delivered - writes_before;
    assert!(
        heartbeats >= 3,
        "{heartbeats} heartbeat writes during a 2 ms sleep"
    );
    settle(&mut p);
    assert_eq!(p.a.stats().failovers + p.b.stats().failovers, 0);
    p.a.send(b"late").unwrap();
    let mut got = Vec::new();
    assert_eq!(
        p.b.poll_blocking(1_000_000, |m| got.push(m.to_vec())),
        Ok(1)
    );
    assert_eq!(got, vec![b"late".to_vec()]);
}

/// The delivery callback can have each record's sequence number: the one the sender's `send`
/// returned, across a failover too (records resent over the standby keep their numbers, and
/// duplicates never reach the callback).
#[test]
fn poll_seq_gives_the_senders_sequence_numbers_across_a_failover() {
    let mut p = pair();
    let mut sent = Vec::new();
    for i in 0u8..20 {
        sent.push((p.a.send(&[i; 12]).unwrap(), vec![i; 12]));
        if i == 9 {
            let wire = p.wires[0];
            p.fabric.black_hole(wire); // the next records are lost on rail 0, then resent
        }
    }
    let mut got = Vec::new();
    let deadline = p.now() + 50_000_000;
    while got.len() < sent.len() && p.now() < deadline {
        let t = p.now() + 100_000;
        p.step(t);
        p.b.poll_seq(|seq, m| got.push((seq, m.to_vec()))).unwrap();
        p.a.poll(|_| {}).unwrap();
    }
    assert!(
        p.a.stats().failovers >= 1,
        "the black hole failed rail 0 over"
    );
    assert_eq!(got, sent);
}

#[test]
fn a_send_posts_every_committed_record_even_when_one_write_cannot_carry_them() {
    let cfg = Config::builder()
        .geometry(4096, 4, 256)
        .max_write_bytes(272) // one maximal record: three of these
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 3, 1_000).unwrap();
    settle(&mut p);
    // Committed in place and not flushed: six writes' worth of records.
    for i in 0u8..20 {
        let mut slot = p.a.reserve(64).unwrap();
        slot.payload_mut().fill(i);
        slot.commit();
    }
    let before = p.a.stats().data_writes;
    p.a.send(&[20; 64]).unwrap();
    assert!(
        !p.a.core().has_unposted(),
        "records left unposted after a send"
    );
    assert!(
        p.a.stats().data_writes - before >= 7,
        "more than one write was needed"
    );
    settle(&mut p);
    let mut got = Vec::new();
    p.b.poll(|m| got.push(m[0])).unwrap();
    assert_eq!(got, (0u8..=20).collect::<Vec<_>>());
}

/// A split sender says the largest message it takes, takes exactly that, and refuses one byte
/// more with a typed error (send and reserve), losing nothing already accepted.
#[test]
fn a_split_senders_largest_message_is_what_it_says() {
    let (fabric, a, mut b) = pair().into_parts();
    let (mut tx, mut rx) = a.split();
    let max = tx.max_message();
    assert!(max > 0);
    assert_eq!(tx.send(&vec![1; max]), Ok(1));
    assert_eq!(
        tx.send(&vec![2; max + 1]),
        Err(SendError::TooLarge { len: max + 1, max })
    );
    assert!(matches!(
        tx.reserve(max + 1),
        Err(SendError::TooLarge { len, max: m }) if len == max + 1 && m == max
    ));
    let mut r = tx.reserve(max).unwrap();
    r.payload_mut().copy_from_slice(&vec![3; max]);
    assert_eq!(r.commit(), 2);
    tx.notify(); // nobody sleeps on the simulator: a no-op, never a panic
    let mut got = Vec::new();
    let end = fabric.now() + 1_000_000;
    while fabric.now() < end && got.len() < 2 {
        rx.progress(); // posts what the sender committed
        fabric.advance_to(fabric.now() + 10_000);
        b.poll(|m| got.push(m.to_vec())).unwrap();
    }
    assert_eq!(got, [vec![1; max], vec![3; max]]);
}

/// A batch is one commit and one RDMA write: the peer delivers its messages in order, with
/// consecutive sequence numbers, and the sender posted a single data write for all eight.
#[test]
fn a_batch_goes_in_one_write_and_is_delivered_in_order() {
    let mut p = pair();
    p.a.send(b"first").unwrap();
    settle(&mut p);
    let payloads: Vec<Vec<u8>> = (1u8..=8).map(|i| vec![i; 10 * i as usize]).collect();
    let batch: Vec<&[u8]> = payloads.iter().map(|m| &m[..]).collect();
    let writes = p.a.stats().data_writes;
    assert_eq!(p.a.send_batch(&batch), Ok(2..10));
    assert_eq!(
        p.a.stats().data_writes - writes,
        1,
        "one write for the batch"
    );
    assert_eq!(p.a.send(b"last"), Ok(10));
    settle(&mut p);
    let mut got = Vec::new();
    p.b.poll_seq(|seq, m| got.push((seq, m.to_vec()))).unwrap();
    let want: Vec<(u64, Vec<u8>)> = std::iter::once(b"first".to_vec())
        .chain(payloads)
        .chain(std::iter::once(b"last".to_vec()))
        .enumerate()
        .map(|(i, m)| (i as u64 + 1, m))
        .collect();
    assert_eq!(got, want);
}

/// A batch is all or none: one message too large, no room for the whole batch, or a batch the
/// ring can never hold is a typed error that queues nothing; what was accepted before is
/// delivered, and the batch fits once the peer has acknowledged.
#[test]
fn a_batch_is_accepted_whole_or_refused_with_nothing_queued() {
    let mut p = pair(); // 4 x 4 KiB ring, records up to 256 B
    let big = [5u8; 256];
    assert_eq!(
        p.a.send_batch(&[b"ok", &[0; 257]]),
        Err(SendError::TooLarge { len: 257, max: 256 })
    );
    assert!(matches!(
        p.a.send_batch(&[&big[..]; 64]), // 64 x 272 B: more than a 16 KiB ring
        Err(SendError::BatchTooLarge {
            bytes: 17_408..,
            ..
        })
    ));
    let accepted = fill(&mut p);
    let ten = [&big[..]; 10];
    assert_eq!(p.a.send_batch(&ten), Err(SendError::Backpressure));
    assert_eq!(
        p.a.stats().sent,
        accepted,
        "nothing of the refused batches queued"
    );
    let mut delivered = 0u64;
    let mut next = None;
    while next.is_none() {
        settle(&mut p);
        delivered += p.b.poll(|m| assert_eq!(m, &[9; 200])).unwrap() as u64;
        next = p.a.send_batch(&ten).ok();
    }
    assert_eq!(
        next,
        Some(accepted + 1..accepted + 11),
        "numbered on, no gap"
    );
    while delivered < accepted + 10 {
        settle(&mut p);
        delivered += p.b.poll(|_| {}).unwrap() as u64;
    }
    assert_eq!(delivered, accepted + 10);
}

/// A split sender's batch reaches the peer whole and in order, posted by the receiving half.
#[test]
fn a_split_senders_batch_is_posted_by_the_receiver_half() {
    let (fabric, a, mut b) = pair().into_parts();
    let (mut tx, mut rx) = a.split();
    assert_eq!(tx.send(b"one"), Ok(1));
    assert_eq!(tx.send_batch(&[b"two", b"three", b"four"]), Ok(2..5));
    let mut got = Vec::new();
    let end = fabric.now() + 1_000_000;
    while fabric.now() < end && got.len() < 4 {
        rx.progress(); // posts what the sender committed
        fabric.advance_to(fabric.now() + 10_000);
        b.poll(|m| got.push(m.to_vec())).unwrap();
    }
    assert_eq!(got, [&b"one"[..], b"two", b"three", b"four"]);
}
