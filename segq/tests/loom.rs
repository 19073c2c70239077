//! Model-checks the producer/poster index protocol with loom (every interleaving, and every
//! read/write of the ring's bytes checked for ordering by per-word cells).
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p railover-segq --test loom --release`
#![cfg(loom)]

use railover_segq::{
    lanes, Backing, Geometry, LaneControl, LaneError, LaneWriter, PushError, SendQueue,
};

/// Two lanes of two 64-byte segments (8-byte records), lane 0 active, and the writer.
fn two_lanes() -> (LaneControl, LaneWriter) {
    let geo = Geometry::new(64, 2, 8).unwrap();
    let queues = (0..2)
        .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
        .collect();
    let mut control = lanes(queues, 0);
    let writer = control.writer().expect("first writer");
    (control, writer)
}

#[test]
fn producer_and_poster_never_touch_the_same_bytes_unordered() {
    loom::model(|| {
        let geo = Geometry::new(64, 2, 24).unwrap();
        let q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
        let (mut producer, mut poster) = q.split();
        let t = loom::thread::spawn(move || {
            let mut seq = 1u8;
            while seq <= 3 {
                match producer.push(&[seq; 24]) {
                    Ok(s) => {
                        assert_eq!(s, seq as u64);
                        seq += 1;
                    }
                    Err(PushError::Full) => loom::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut seen = 0u64;
        while seen < 3 {
            if let Some(r) = poster.pending(usize::MAX) {
                poster.mark_posted(&r);
                poster.for_each_unacked(|seq, p| assert!(p.iter().all(|&b| b as u64 == seq)));
                // The range's numbers and count are one commit's (published under the lock,
                // or walked while the producer publishes): the records after the last seen.
                if let Some((first, last)) = r.seqs {
                    assert_eq!(first, seen + 1, "{r:?}");
                    assert_eq!(last - first + 1, r.records as u64, "{r:?}");
                    seen = last;
                    poster.ack(r.end, last).unwrap();
                }
            } else {
                loom::thread::yield_now();
            }
        }
        t.join().unwrap();
    });
}

/// The lanes' Dekker handshake: whatever the interleaving, a failover either sees a record the
/// writer was committing (and copies it) or the writer sees the switch (and retries into the new
/// lane). Lane 1 ends up holding records 1..=3 exactly once, in order.
#[test]
fn failover_never_loses_a_record_being_committed() {
    // Both sides spin (the writer on a switch, the control on the writer): bound preemptions so
    // the model stays finite; every interleaving with up to 4 preemptions is explored.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(4);
    model.check(|| {
        let (mut control, mut writer) = two_lanes();
        let t = loom::thread::spawn(move || {
            let mut seq = 1u8;
            while seq <= 3 {
                match writer.push(&[seq; 8]) {
                    Ok(s) => {
                        assert_eq!(s, seq as u64);
                        seq += 1;
                    }
                    Err(LaneError::Switching) => loom::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        control.fail_over(1).unwrap();
        t.join().unwrap();
        let mut seen = Vec::new();
        control.poster_ref(1).for_each_unacked(|seq, p| {
            assert!(p.iter().all(|&b| b as u64 == seq));
            seen.push(seq);
        });
        assert_eq!(seen, vec![1, 2, 3]);
    });
}

/// Hot standby: the control copies the active lane's records into a standby lane while the
/// writer commits into the active one (no exclusion). Every copy reads a whole committed record
/// (the per-word cells catch a read racing the writer's bytes), and the standby ends up with
/// records 1..=3 once each, in order. Then a failover to the standby copies nothing twice.
#[test]
fn shadow_copies_race_no_writer_bytes_and_keep_order() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let (mut control, mut writer) = two_lanes();
        let t = loom::thread::spawn(move || {
            for seq in 1..=3u8 {
                assert_eq!(writer.push(&[seq; 8]), Ok(seq as u64));
            }
        });
        let mut copied = 0;
        while copied < 3 {
            let rep = control.shadow(1).expect("a standby lane");
            assert!(!rep.stalled);
            copied += rep.records;
            if rep.records == 0 {
                loom::thread::yield_now();
            }
        }
        t.join().unwrap();
        let mut seen = Vec::new();
        control.poster_ref(1).for_each_unacked(|seq, p| {
            assert!(p.iter().all(|&b| b as u64 == seq));
            seen.push(seq);
        });
        assert_eq!(seen, vec![1, 2, 3]);
        let (report, next) = control.fail_over(1).unwrap();
        assert_eq!((report.records, next), (0, 4));
    });
}
