//! Lanes across two real threads: the writer pushes a numbered stream while the control posts,
//! "delivers", acknowledges and fails over between three lanes (sometimes between delivery and
//! acknowledgement, so copies carry records already delivered). Every record is delivered exactly
//! once, in order, with its payload intact, and failovers never lose a record the writer was
//! committing. Miri runs it too (fewer records), checking the cross-thread accesses for races.

use railover_segq::{lanes, Backing, Geometry, LaneError, PushError, SendQueue};

const RECORDS: u64 = if cfg!(miri) { 150 } else { 100_000 };

fn payload(seq: u64, out: &mut [u8]) -> usize {
    let len = 1 + (seq as usize * 13) % out.len();
    for (i, b) in out[..len].iter_mut().enumerate() {
        *b = (seq as u8) ^ (i as u8);
    }
    len
}

#[test]
fn failovers_under_a_concurrent_writer_lose_and_duplicate_nothing() {
    let geo = Geometry::new(256, 4, 64).unwrap();
    let queues = (0..3)
        .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
        .collect();
    let mut control = lanes(queues, 0);
    let mut writer = control.writer().expect("first writer");
    let writer_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (mut seq, mut switching) = (1, 0u64);
        while seq <= RECORDS {
            let len = payload(seq, &mut buf);
            match writer.push(&buf[..len]) {
                Ok(s) => {
                    assert_eq!(s, seq, "sequence numbers continue across failovers");
                    seq += 1;
                }
                Err(LaneError::Switching) => switching += 1,
                Err(LaneError::Push(PushError::Full)) => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        switching
    });

    let (mut delivered, mut duplicates, mut failovers, mut round) = (0u64, 0u64, 0u64, 0u64);
    let mut expected = [0u8; 64];
    while delivered < RECORDS {
        round += 1;
        let lane = control.active();
        if let Some(range) = control.poster(lane).pending(512) {
            control.poster(lane).mark_posted(&range);
            // The peer receives the range: check each record, discard what it already has.
            // (A range of padding alone, where a segment was closed, holds no record.)
            let (first, last) = range.seqs.unwrap_or((delivered + 1, delivered));
            let mut bad = None;
            control.poster_ref(lane).for_each_unacked(|seq, bytes| {
                if (first..=last).contains(&seq) {
                    let len = payload(seq, &mut expected);
                    if bytes != &expected[..len] {
                        bad = Some(seq);
                    }
                }
            });
            assert_eq!(bad, None, "payload corrupted");
            for seq in first..=last {
                if seq <= delivered {
                    duplicates += 1;
                } else {
                    assert_eq!(seq, delivered + 1, "gap: a record was lost");
                    delivered = seq;
                }
            }
            // Every 7th round, fail over before acknowledging: the copy resends delivered records.
            if round % 7 != 0 {
                control.poster(lane).ack(range.end, delivered).unwrap();
            }
        }
        if round % 7 == 0 || round % 11 == 0 {
            let to = (lane + 1) % 3;
            control.fail_over(to).unwrap();
            assert!(
                control.reset(lane, 1),
                "the old lane is inactive: it can be reset"
            );
            assert!(!control.reset(to, 1), "the active lane can't be reset");
            failovers += 1;
        }
    }
    let switching = writer_thread.join().unwrap();
    assert_eq!(delivered, RECORDS);
    assert!(failovers > 10, "{failovers} failovers");
    assert!(
        duplicates > 0,
        "copies after unacknowledged deliveries were discarded"
    );
    assert_eq!(control.last_committed_seq(), RECORDS);
    eprintln!("{failovers} failovers, {duplicates} duplicates discarded, writer retried {switching} times");
}

#[test]
fn a_closed_lane_set_refuses_records_and_the_local_path_needs_no_protocol() {
    let geo = Geometry::new(256, 4, 64).unwrap();
    let queues = (0..2)
        .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
        .collect();
    let mut control = lanes(queues, 0);
    // On the control's own thread: `&mut` access, no protocol.
    assert_eq!(control.push_local(b"one"), Ok(1));
    {
        let mut slot = control.reserve_local(3).unwrap();
        slot.payload_mut().copy_from_slice(b"two");
        assert_eq!(slot.commit(), 2);
    }
    let _abandoned = control.reserve_local(5).unwrap(); // takes no sequence number
    assert_eq!(
        control.push_local(&[0; 65]),
        Err(LaneError::Push(PushError::TooLarge { len: 65, max: 64 }))
    );
    let (report, next) = control.fail_over(1).unwrap();
    assert_eq!((report.records, report.first_seq, next), (2, Some(1), 3));
    // Once a writer is handed out, it is the only way in.
    let mut writer = control.writer().expect("first writer");
    assert!(control.writer().is_none(), "one writer only");
    assert_eq!(control.push_local(b"x"), Err(LaneError::WriterElsewhere));
    assert_eq!(writer.push(b"three"), Ok(3));
    // Lane 0 is left behind and reset: what it held still counts as sent.
    assert!(control.reset(0, 1));
    assert_eq!(control.last_committed_seq(), 3);
    let mut seen = Vec::new();
    control
        .poster_ref(1)
        .for_each_unacked(|seq, p| seen.push((seq, p.to_vec())));
    assert_eq!(
        seen,
        vec![
            (1, b"one".to_vec()),
            (2, b"two".to_vec()),
            (3, b"three".to_vec())
        ]
    );
    control.close_with(7);
    assert_eq!(writer.push(b"four"), Err(LaneError::Closed(7)));
    assert!(matches!(writer.reserve(1), Err(LaneError::Closed(7))));
}

/// A delivery learnt elsewhere (another rail's acknowledgement) takes records out of the
/// unacknowledged list and out of a failover copy, though their ring space is not freed yet.
#[test]
fn records_noted_delivered_are_neither_unacked_nor_copied() {
    let geo = Geometry::new(256, 4, 64).unwrap();
    let queues = (0..2)
        .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
        .collect();
    let mut control = lanes(queues, 0);
    for i in 0..5u8 {
        control.push_local(&[i; 8]).unwrap();
    }
    let range = control.poster(0).pending(usize::MAX).unwrap();
    control.poster(0).mark_posted(&range);
    control.poster(0).note_delivered(3);
    let mut unacked = Vec::new();
    control
        .poster_ref(0)
        .for_each_unacked(|seq, _| unacked.push(seq));
    assert_eq!(unacked, [4, 5]);
    let (report, next_seq) = control.fail_over(1).unwrap();
    assert_eq!(
        (report.records, report.first_seq, next_seq),
        (2, Some(4), 6)
    );
}
