//! Lanes across two real threads: the writer pushes a numbered stream while the control posts,
//! "delivers", acknowledges and fails over between three lanes (sometimes between delivery and
//! acknowledgement, so copies carry records already delivered); some records go in batches of two
//! or three (one commit each). Every record is delivered exactly
//! once, in order, with its payload intact, and failovers never lose a record the writer was
//! committing. Miri runs it too (fewer records), checking the cross-thread accesses for races.

use railover_segq::{lanes, Backing, Geometry, LaneControl, LaneError, PushError, SendQueue};

const RECORDS: u64 = if cfg!(miri) { 150 } else { 100_000 };

/// `count` lanes of four 256-byte segments (records up to 64 bytes), numbered from 1, lane 0
/// active.
fn lane_set(count: usize) -> LaneControl {
    let geo = Geometry::new(256, 4, 64).unwrap();
    let queues = (0..count)
        .map(|_| SendQueue::new(geo, Backing::Heap, 1).unwrap())
        .collect();
    lanes(queues, 0)
}

fn payload(seq: u64, out: &mut [u8]) -> usize {
    let len = 1 + (seq as usize * 13) % out.len();
    for (i, b) in out[..len].iter_mut().enumerate() {
        *b = (seq as u8) ^ (i as u8);
    }
    len
}

#[test]
fn failovers_under_a_concurrent_writer_lose_and_duplicate_nothing() {
    let mut control = lane_set(3);
    let mut writer = control.writer().expect("first writer");
    let writer_thread = std::thread::spawn(move || {
        let mut bufs = [[0u8; 64]; 3];
        let (mut seq, mut switching) = (1, 0u64);
        while seq <= RECORDS {
            // One record, or a batch of two or three (one commit) every other time.
            let n = (1 + seq % 4).min(3).min(RECORDS - seq + 1) as usize;
            let mut lens = [0; 3];
            for (i, (buf, len)) in bufs.iter_mut().zip(&mut lens).take(n).enumerate() {
                *len = payload(seq + i as u64, buf);
            }
            let batch: [&[u8]; 3] = [
                &bufs[0][..lens[0]],
                &bufs[1][..lens[1]],
                &bufs[2][..lens[2]],
            ];
            let pushed = if n == 1 {
                writer.push(batch[0]).map(|s| s..s + 1)
            } else {
                writer.push_batch(&batch[..n])
            };
            match pushed {
                Ok(seqs) => {
                    assert_eq!(
                        seqs,
                        seq..seq + n as u64,
                        "sequence numbers continue across failovers"
                    );
                    seq += n as u64;
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
            control.fail_over(to);
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
    let mut control = lane_set(2);
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
    let (report, next) = control.fail_over(1);
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
    let mut control = lane_set(2);
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
    let (report, next_seq) = control.fail_over(1);
    assert_eq!(
        (report.records, report.first_seq, next_seq),
        (2, Some(4), 6)
    );
}

/// Parses every record of `lane` in `[from, to)` the way the peer's mirror would (padding
/// skipped): `(seq, payload)` in ring order.
fn records_posted(control: &mut railover_segq::LaneControl, lane: usize) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(range) = control.poster(lane).pending(usize::MAX) {
        let (first, last) = match range.seqs {
            Some(s) => s,
            None => {
                control.poster(lane).mark_posted(&range);
                continue;
            }
        };
        control.poster_ref(lane).for_each_unacked(|seq, p| {
            if (first..=last).contains(&seq) {
                out.push((seq, p.to_vec()));
            }
        });
        control.poster(lane).mark_posted(&range);
    }
    out
}

/// A hot standby gets every record of the active lane, in order, once; a standby that fell
/// behind (its ring full) skips only records the peer has consumed, so it never shows the
/// receiver a gap; a failover to it copies nothing it already holds.
#[test]
fn a_hot_standby_holds_the_stream_in_order_and_a_failover_to_it_copies_nothing_twice() {
    let mut control = lane_set(2);
    for i in 1..=3u8 {
        control.push_local(&[i; 10]).unwrap();
    }
    assert!(
        control.shadow(0).is_none(),
        "the active lane is not its own standby"
    );
    let rep = control.shadow(1).unwrap();
    assert_eq!((rep.records, rep.bytes, rep.stalled), (3, 30, false));
    assert_eq!(control.shadow(1).unwrap().records, 0, "nothing twice");
    control.push_local(&[4; 10]).unwrap();
    assert_eq!(control.shadow(1).unwrap().records, 1);
    let on_standby: Vec<u64> = records_posted(&mut control, 1)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(on_standby, [1, 2, 3, 4]);

    // The standby's peer stops consuming: its ring fills and the copy stalls there, while the
    // active lane's peer consumes everything and the writer goes on.
    let mut seq = 4;
    let mut stalled = false;
    for _ in 0..40 {
        seq += 1;
        control.push_local(&[seq as u8; 40]).unwrap();
        stalled |= control.shadow(1).unwrap().stalled;
        ack_all(&mut control, 0, seq);
    }
    assert!(stalled, "a standby whose peer consumes nothing fills up");
    let held: Vec<u64> = records_posted(&mut control, 1)
        .iter()
        .map(|r| r.0)
        .collect();
    assert!(
        held.windows(2).all(|w| w[1] == w[0] + 1) && *held.last().unwrap() < seq,
        "the standby holds a run of the stream and fell behind: {held:?}"
    );
    // One record the active lane's peer has not consumed yet; then the standby's peer catches
    // up. The copy resumes with that record alone: every record skipped was delivered.
    seq += 1;
    control.push_local(&[7; 8]).unwrap();
    ack_all(&mut control, 1, seq - 1);
    let rep = control.shadow(1).unwrap();
    assert_eq!((rep.records, rep.stalled), (1, false));
    let resumed: Vec<u64> = records_posted(&mut control, 1)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(resumed, [seq]);
    // A record not yet copied goes with the failover; none the standby holds is copied again.
    control.push_local(b"last").unwrap();
    let (report, next) = control.fail_over(1);
    assert_eq!(
        (report.records, report.first_seq, next),
        (1, Some(seq + 1), seq + 2)
    );
}

/// Posts and acknowledges everything on `lane` (its peer consumed it all, delivering up to `seq`).
fn ack_all(control: &mut railover_segq::LaneControl, lane: usize, seq: u64) {
    while let Some(r) = control.poster(lane).pending(usize::MAX) {
        control.poster(lane).mark_posted(&r);
    }
    let posted = posted_pos(control, lane);
    control.poster(lane).ack(posted, seq).unwrap();
}

/// The poster's posted position, found by asking for an ack one byte beyond it (refused with the
/// position in the error).
fn posted_pos(control: &mut railover_segq::LaneControl, lane: usize) -> u64 {
    match control.poster(lane).ack(u64::MAX, 0) {
        Err(railover_segq::AckError::BeyondPosted { posted, .. }) => posted,
        Ok(_) => unreachable!("nothing is posted up to u64::MAX"),
    }
}

/// A planned switch retires the old lane's unposted records (they went to the new lane): the
/// old lane posts only padding for them, which the peer skips, and its ring is freed by it.
#[test]
fn retired_records_are_never_posted_and_their_space_comes_back() {
    let mut control = lane_set(2);
    control.push_local(&[1; 30]).unwrap();
    let r = control.poster(0).pending(usize::MAX).unwrap();
    control.poster(0).mark_posted(&r);
    control.poster(0).ack(r.end, 1).unwrap();
    for i in 2..=9u8 {
        control.push_local(&[i; 30]).unwrap(); // spans segments, never posted
    }
    let (report, _) = control.fail_over(1);
    assert_eq!((report.records, report.first_seq), (8, Some(2)));
    assert_eq!(control.retire_unposted(1), None, "not the active lane");
    assert_eq!(control.retire_unposted(0), Some(8));
    // What lane 0 still posts holds no record: a mirror parsing it delivers nothing.
    let mut ranges = 0;
    while let Some(r) = control.poster(0).pending(usize::MAX) {
        assert_eq!((r.records, r.seqs), (0, None), "padding only");
        control.poster(0).mark_posted(&r);
        ranges += 1;
    }
    assert!(ranges >= 1);
    let posted = posted_pos(&mut control, 0);
    assert_eq!(posted % 256, 0, "the producer moved on to a fresh segment");
    control.poster(0).ack(posted, 9).unwrap();
    assert!(control.poster_ref(0).all_acked());
    // The retired lane is clean: a later failover back to it numbers on correctly.
    control.push_local(b"ten").unwrap();
    let (report, next) = control.fail_over(0);
    assert_eq!((report.records, report.first_seq, next), (9, Some(2), 11));
}

/// A hot standby whose peer has consumed nothing (paused, or slow on that wire) has no room
/// for the records it lacks. A failover to it keeps them aside, in order, with the writer out
/// (nothing may overtake them); they go in as the standby's peer frees its ring, those
/// delivered meanwhile dropped; then the writer numbers on after them. A second failover
/// before then carries them along.
#[test]
fn a_failover_to_a_full_hot_standby_keeps_what_it_lacks_until_there_is_room() {
    let mut control = lane_set(3);
    // Lane 1's peer consumes nothing; lane 0's peer consumes and delivers everything.
    let mut seq = 0;
    loop {
        seq += 1;
        control.push_local(&[seq as u8; 40]).unwrap();
        let stalled = control.shadow(1).unwrap().stalled;
        ack_all(&mut control, 0, seq);
        if stalled {
            break;
        }
    }
    // Three records nobody delivered yet, which lane 1 has no room for.
    let first = seq + 1;
    for s in first..first + 3 {
        control.push_local(&[s as u8; 40]).unwrap();
    }
    assert!(control.shadow(1).unwrap().stalled);
    let (report, next) = control.fail_over(1);
    assert_eq!(
        (report.records, report.first_seq, report.last_seq, next),
        (3, Some(first), Some(first + 2), first + 3)
    );
    assert_eq!(control.active(), 1);
    assert!(control.keeps_records());
    assert_eq!(
        control.push_local(b"new"),
        Err(LaneError::Push(PushError::Full)),
        "no room before the kept records"
    );
    assert_eq!(
        control.push_local(&[0; 65]),
        Err(LaneError::Push(PushError::TooLarge { len: 65, max: 64 })),
        "a payload that never fits is told so at once, not to wait"
    );
    let unacked = |control: &railover_segq::LaneControl| {
        let mut seqs = Vec::new();
        control.for_each_unacked(|s, p| {
            assert_eq!(p, [s as u8; 40]);
            seqs.push(s)
        });
        seqs
    };
    assert_eq!(unacked(&control), [first, first + 1, first + 2]);
    assert_eq!(
        control.move_kept(),
        0,
        "no room until lane 1's peer consumes"
    );
    assert_eq!(
        control.switch_to(2),
        Err(PushError::Full),
        "no planned switch before the kept records are in"
    );
    assert!(control.keeps_records());
    assert_eq!(control.active(), 1);

    // A second failover, to a fresh lane, takes them along.
    let (report, next) = control.fail_over(2);
    assert_eq!(
        (report.records, report.first_seq, next),
        (3, Some(first), first + 3)
    );
    assert!(!control.keeps_records(), "the fresh lane had room");
    let on_2: Vec<u64> = records_posted(&mut control, 2)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(on_2, [first, first + 1, first + 2]);
    assert_eq!(control.push_local(&[(first + 3) as u8; 40]), Ok(first + 3));

    // Back to lane 1, still full: kept again (lane 2's four records, none delivered).
    let (report, _) = control.fail_over(1);
    assert_eq!(report.records, 4);
    assert!(control.keeps_records());
    // Lane 1's peer consumes what it was sent, having delivered up to `first` by now: that
    // one is dropped, the rest go in, and the writer is back.
    ack_all(&mut control, 1, first);
    assert_eq!(control.move_kept(), 3);
    assert!(!control.keeps_records());
    assert_eq!(unacked(&control)[..2], [first + 1, first + 2]);
    let on_1: Vec<u64> = records_posted(&mut control, 1)
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(on_1, [first + 1, first + 2, first + 3]);
    assert_eq!(control.push_local(&[0; 40]), Ok(first + 4));
}

/// While a failover's kept records wait, a split writer is refused with `Full` (retry later),
/// but a payload too large for any lane is refused as `TooLarge` at once: waiting would never
/// make it fit.
#[test]
fn a_writer_held_out_by_kept_records_is_told_at_once_of_a_payload_that_never_fits() {
    let mut control = lane_set(2);
    let mut writer = control.writer().expect("first writer");
    // Lane 1's peer consumes nothing; lane 0's delivers everything, until lane 1 is full.
    let mut seq;
    loop {
        seq = writer.push(&[1; 40]).unwrap();
        let stalled = control.shadow(1).unwrap().stalled;
        ack_all(&mut control, 0, seq);
        if stalled {
            break;
        }
    }
    writer.push(&[2; 40]).unwrap(); // not delivered: kept by the failover
    let (report, _) = control.fail_over(1);
    assert_eq!(report.records, 1);
    assert!(control.keeps_records());
    assert_eq!(writer.push(b"new"), Err(LaneError::Push(PushError::Full)));
    let too_large = LaneError::Push(PushError::TooLarge { len: 65, max: 64 });
    assert_eq!(writer.push(&[0; 65]), Err(too_large));
    assert_eq!(writer.reserve(65).err(), Some(too_large));
    // Once the kept record is in, the writer numbers on after it.
    ack_all(&mut control, 1, seq);
    assert_eq!(control.move_kept(), 1);
    assert_eq!(writer.push(b"new"), Ok(seq + 2));
}

/// A batch on the control's own thread: numbered on from single records, refused whole when one
/// record is too large for any lane, and refused once a writer is handed out.
#[test]
fn a_local_batch_is_numbered_on_and_refused_whole() {
    let mut control = lane_set(2);
    assert_eq!(control.push_local(b"one"), Ok(1));
    assert_eq!(control.push_local_batch(&[b"two", b"three"]), Ok(2..4));
    assert_eq!(
        control.push_local_batch(&[b"four", &[0; 65]]),
        Err(LaneError::Push(PushError::TooLarge { len: 65, max: 64 }))
    );
    let range = control.poster(0).pending(usize::MAX).unwrap();
    assert_eq!((range.seqs, range.records), (Some((1, 3)), 3));
    let mut writer = control.writer().expect("first writer");
    assert_eq!(
        control.push_local_batch(&[b"x"]),
        Err(LaneError::WriterElsewhere)
    );
    assert_eq!(writer.push_batch(&[b"four", b"five"]), Ok(4..6));
}
