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

/// A batch is one commit: the poster sees both of its records or neither, and their bytes
/// are ordered before the commit like a single record's.
#[test]
fn a_batch_reaches_the_poster_whole() {
    loom::model(|| {
        let geo = Geometry::new(64, 2, 24).unwrap();
        let q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
        let (mut producer, mut poster) = q.split();
        let t = loom::thread::spawn(move || {
            let batches: [&[&[u8]]; 2] = [&[&[1; 24], &[2; 24]], &[&[3; 24]]];
            for (batch, first) in batches.into_iter().zip([1u64, 3]) {
                loop {
                    match producer.push_batch(batch) {
                        Ok(seqs) => {
                            assert_eq!(seqs, first..first + batch.len() as u64);
                            break;
                        }
                        Err(PushError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut ranges = Vec::new();
        while ranges.last().is_none_or(|&(_, last)| last < 3) {
            if let Some(r) = poster.pending(usize::MAX) {
                poster.mark_posted(&r);
                poster.for_each_unacked(|seq, p| assert!(p.iter().all(|&b| b as u64 == seq)));
                // (A range may be the padding alone, up to the ring's end, where it wraps.)
                if let Some((first, last)) = r.seqs {
                    assert_eq!(last - first + 1, r.records as u64, "{r:?}");
                    ranges.push((first, last));
                    poster.ack(r.end, last).unwrap();
                }
            } else {
                loom::thread::yield_now();
            }
        }
        assert_eq!(ranges, [(1, 2), (3, 3)], "the first batch split");
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
        control.fail_over(1);
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
        let (report, next) = control.fail_over(1);
        assert_eq!((report.records, next), (0, 4));
    });
}

/// A failover to a hot standby with no room keeps records aside, and the writer stays out
/// until they are in: whatever the interleaving, the writer's records come after the kept
/// ones, numbered on from them, and the standby ends up holding the stream in order.
#[test]
fn records_kept_by_a_failover_are_never_overtaken_by_the_writer() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let geo = Geometry::new(64, 2, 8).unwrap();
        let queues = (0..2)
            .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
            .collect();
        let mut control = lanes(queues, 0);
        // Lane 1's peer consumes nothing until the failover; lane 0's delivers as it goes.
        let mut seq = 0u8;
        loop {
            seq += 1;
            control.push_local(&[seq; 8]).unwrap();
            let stalled = control.shadow(1).unwrap().stalled;
            ack_all(&mut control, 0, seq as u64);
            if stalled {
                break;
            }
        }
        let kept = seq + 1; // undelivered, and lane 1 has no room for it
        control.push_local(&[kept; 8]).unwrap();
        let mut writer = control.writer().expect("first writer");
        let t = loom::thread::spawn(move || {
            let mut next = kept + 1;
            while next <= kept + 2 {
                match writer.push(&[next; 8]) {
                    Ok(s) => {
                        assert_eq!(s, next as u64);
                        next += 1;
                    }
                    Err(LaneError::Switching) | Err(LaneError::Push(PushError::Full)) => {
                        loom::thread::yield_now()
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        });
        control.fail_over(1);
        assert!(control.keeps_records());
        // Lane 1's peer consumes what it holds (delivering nothing new), freeing its ring.
        ack_all(&mut control, 1, seq as u64);
        let mut seen = Vec::new();
        while seen.last() != Some(&(kept as u64 + 2)) {
            control.move_kept();
            while let Some(r) = control.poster(1).pending(usize::MAX) {
                control.poster(1).mark_posted(&r);
                let Some((first, last)) = r.seqs else {
                    continue;
                };
                control.poster_ref(1).for_each_unacked(|s, p| {
                    if (first..=last).contains(&s) {
                        assert!(p.iter().all(|&b| b as u64 == s));
                        seen.push(s);
                    }
                });
                control.poster(1).ack(r.end, last).unwrap();
            }
            loom::thread::yield_now();
        }
        t.join().unwrap();
        let want: Vec<u64> = (kept as u64..=kept as u64 + 2).collect();
        assert_eq!(seen, want);
    });
}

/// Posts and acknowledges everything on `lane` (its peer consumed it all, delivering up to `seq`).
fn ack_all(control: &mut LaneControl, lane: usize, seq: u64) {
    while let Some(r) = control.poster(lane).pending(usize::MAX) {
        control.poster(lane).mark_posted(&r);
    }
    let end = match control.poster(lane).ack(u64::MAX, 0) {
        Err(railover_segq::AckError::BeyondPosted { posted, .. }) => posted,
        Ok(_) => unreachable!("nothing is posted up to u64::MAX"),
    };
    control.poster(lane).ack(end, seq).unwrap();
}
