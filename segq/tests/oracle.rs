//! Property test against a VecDeque oracle: random record sizes, commit/post/deliver/ack
//! interleavings and failover copies at random points. Every committed record must be delivered
//! exactly once, in order, with its exact bytes.

use std::collections::VecDeque;

use proptest::prelude::*;
use railover_segq::{
    notify_imm_of, Backing, Geometry, MirrorQueue, PendingRange, PushError, SendQueue,
    StreamCursor, NOTIFY_BITS,
};

#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    Post(usize),
    Deliver,
    Consume,
    Ack,
    Failover,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..120).prop_map(Op::Push),
        2 => (1usize..400).prop_map(Op::Post),
        2 => Just(Op::Deliver),
        2 => Just(Op::Consume),
        1 => Just(Op::Ack),
        1 => Just(Op::Failover),
    ]
}

/// One rail: a sender queue, the receiver's mirror, and writes "in flight" between them.
struct Rail {
    tx: SendQueue,
    rx: MirrorQueue,
    in_flight: VecDeque<PendingRange>,
}

impl Rail {
    fn new(geo: Geometry, first_seq: u64) -> Rail {
        Rail {
            tx: SendQueue::new(geo, Backing::Heap, first_seq).unwrap(),
            rx: MirrorQueue::new(geo, Backing::Heap).unwrap(),
            in_flight: VecDeque::new(),
        }
    }

    /// What a NIC does: copy the bytes to the same offset of the mirror, then complete with imm.
    fn deliver_one(&mut self) {
        if let Some(r) = self.in_flight.pop_front() {
            let mut buf = vec![0u8; r.len()];
            // SAFETY: posted bytes: committed, not released; the producer is this thread.
            unsafe { self.tx.memory().read(r.offset, &mut buf) };
            self.rx.write_raw(r.offset, &buf);
            self.rx.notify(r.notify_imm()).unwrap();
        }
    }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    #[test]
    fn exactly_once_in_order_across_failovers(ops in proptest::collection::vec(op(), 1..300)) {
        let geo = Geometry::new(256, 4, 120).unwrap();
        let mut active = Rail::new(geo, 1);
        let mut old: Vec<Rail> = Vec::new();
        let mut sent: VecDeque<(u64, Vec<u8>)> = VecDeque::new(); // the oracle: accepted, not yet delivered
        let mut cursor = StreamCursor::default();
        let mut delivered = 0u64;

        for op in ops {
            match op {
                Op::Push(len) => {
                    let seq = active.tx.producer().next_seq();
                    let data = payload(seq, len);
                    match active.tx.push(&data) {
                        Ok(s) => { prop_assert_eq!(s, seq); sent.push_back((s, data)); }
                        Err(PushError::Full) => {}
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Post(max) => {
                    if let Some(r) = active.tx.poster().pending(max) {
                        prop_assert!(!r.is_empty());
                        active.tx.poster().mark_posted(&r);
                        active.in_flight.push_back(r);
                    }
                }
                Op::Deliver => {
                    active.deliver_one();
                    for o in &mut old { o.deliver_one(); }
                }
                Op::Consume => {
                    // Old rails first or last, whichever: dedup makes the order irrelevant.
                    for rail in old.iter_mut().chain(std::iter::once(&mut active)) {
                        let mut err = None;
                        let r = rail.rx.consume(&mut cursor, |seq, bytes| {
                            match sent.pop_front() {
                                Some((s, d)) if s == seq && d == bytes => delivered += 1,
                                other => err = Some(format!("delivered {seq} but oracle had {:?}", other.map(|o| o.0))),
                            }
                        });
                        prop_assert!(err.is_none(), "{}", err.unwrap());
                        prop_assert!(r.is_ok(), "consume failed: {:?}", r);
                    }
                }
                Op::Ack => {
                    let pos = active.rx.read_pos();
                    active.tx.poster().ack(pos, cursor.last_delivered()).unwrap();
                }
                Op::Failover => {
                    // Freeze the active rail; a fresh standby gets every unacknowledged record.
                    let mut standby = Rail::new(geo, 1);
                    let before = active.tx.poster().acked_seq();
                    let rep = active.tx.copy_unacked_into(&mut standby.tx).unwrap();
                    if let Some(first) = rep.first_seq { prop_assert_eq!(first, before + 1); }
                    prop_assert_eq!(standby.tx.producer().next_seq(), active.tx.producer().next_seq());
                    old.push(std::mem::replace(&mut active, standby));
                }
            }
        }
        // Drain: post, deliver and consume everything left.
        loop {
            while let Some(r) = active.tx.poster().pending(usize::MAX) {
                active.tx.poster().mark_posted(&r);
                active.in_flight.push_back(r);
            }
            if active.in_flight.is_empty() && old.iter().all(|o| o.in_flight.is_empty()) { break; }
            active.deliver_one();
            for o in &mut old { o.deliver_one(); }
        }
        for rail in old.iter_mut().chain(std::iter::once(&mut active)) {
            let mut bad = false;
            rail.rx.consume(&mut cursor, |seq, bytes| {
                match sent.pop_front() { Some((s, d)) if s == seq && d == bytes => delivered += 1, _ => bad = true }
            }).unwrap();
            prop_assert!(!bad);
        }
        prop_assert!(sent.is_empty(), "{} accepted records never delivered", sent.len());
        prop_assert_eq!(cursor.delivered, delivered);
    }
}

#[test]
fn full_queue_frees_only_after_ack() {
    let geo = Geometry::new(64, 2, 48).unwrap();
    let mut q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    assert_eq!(q.push(&[1; 48]), Ok(1));
    assert_eq!(q.push(&[2; 48]), Ok(2));
    assert_eq!(q.push(&[3; 8]), Err(PushError::Full));
    let r = q.poster().pending(1 << 20).unwrap();
    assert_eq!(r.seqs, Some((1, 2)));
    q.poster().mark_posted(&r);
    assert_eq!(
        q.push(&[3; 8]),
        Err(PushError::Full),
        "posted is not acknowledged"
    );
    assert_eq!(q.poster().ack(64, 1), Ok(1));
    assert!(q.poster().ack(200, 2).is_err(), "beyond what was posted");
    assert_eq!(q.push(&[3; 8]), Ok(3));
    assert_eq!(
        q.push(&[0; 49]),
        Err(PushError::TooLarge { len: 49, max: 48 })
    );
}

#[test]
fn coalesces_small_records_and_splits_at_ring_wrap() {
    let geo = Geometry::new(64, 2, 48).unwrap();
    let mut q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    for _ in 0..4 {
        q.push(&[7; 8]).unwrap(); // 24 bytes each: two per segment, 16 bytes of padding each
    }
    let r = q.poster().pending(1 << 20).unwrap();
    assert_eq!(
        (r.start, r.end, r.records, r.seqs),
        (0, 112, 4, Some((1, 4)))
    );
    let small = q.poster().pending(30).unwrap();
    assert_eq!(
        (small.end, small.records),
        (24, 1),
        "at most max_bytes unless one record is larger"
    );
    q.poster().mark_posted(&r);
    q.poster().ack(112, 4).unwrap();
    q.push(&[8; 40]).unwrap(); // doesn't fit the 16 bytes left at 112: pads to 128 = the wrap
    let r = q.poster().pending(1 << 20).unwrap();
    assert_eq!(
        (r.start, r.end, r.records, r.seqs),
        (112, 128, 0, None),
        "padding up to the wrap"
    );
    q.poster().mark_posted(&r);
    let r = q.poster().pending(1 << 20).unwrap();
    assert_eq!((r.start, r.offset, r.records), (128, 0, 1));
}

#[test]
fn copy_reports_whether_only_the_current_segment_was_unacked() {
    let geo = Geometry::new(64, 4, 48).unwrap();
    let mut a = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    let mut b = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    a.push(b"one").unwrap();
    let rep = a.copy_unacked_into(&mut b).unwrap();
    assert!(rep.only_current_segment);
    assert_eq!(
        (rep.records, rep.bytes, rep.first_seq, rep.last_seq),
        (1, 3, Some(1), Some(1))
    );
    let mut c = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    a.push(&[0; 40]).unwrap(); // next segment
    let rep = a.copy_unacked_into(&mut c).unwrap();
    assert!(!rep.only_current_segment);
    assert_eq!(rep.records, 2);
    assert_eq!(
        c.push(b"next").unwrap(),
        3,
        "the standby numbers on after the copied records"
    );
}

#[test]
fn stale_or_impossible_notifications_are_refused() {
    let geo = Geometry::new(64, 4, 48).unwrap();
    let mut m = MirrorQueue::new(geo, Backing::Heap).unwrap();
    m.notify(notify_imm_of(24)).unwrap();
    // An old immediate delivered again (rdma-core 44's rxe CQ bug) must not pass as new data.
    assert!(m.notify(notify_imm_of(16)).is_err());
    // The latest one again (it would count twice whatever the caller's bits above say).
    assert!(m.notify(notify_imm_of(24)).is_err(), "no bytes: a replay");
    assert!(
        m.notify(notify_imm_of(24 + 264)).is_err(),
        "beyond one ring ahead of the reader"
    );
    assert_eq!(m.complete_pos(), 24);
    // The bits above the position are the caller's: ignored.
    m.notify(notify_imm_of(32) | 0xab << NOTIFY_BITS).unwrap();
    assert_eq!(m.complete_pos(), 32);
}
