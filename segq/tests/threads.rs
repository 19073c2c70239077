//! The producer and the poster on two real threads, with a mirror fed by copying the posted
//! bytes (what the NIC's RDMA WRITE does). Under `cargo test` it pushes enough records to wrap the
//! ring many times; under Miri (`cargo +nightly miri test -p railover-segq --test threads`) it runs
//! a short stream, and Miri's data-race detector checks every access to the ring's bytes and
//! indices. loom (tests/loom.rs) covers every interleaving of a tiny model; this covers the real
//! code paths with real threads.

use railover_segq::{Backing, Geometry, MirrorQueue, PushError, SendQueue, StreamCursor};

const RECORDS: u64 = if cfg!(miri) { 300 } else { 200_000 };

fn payload_for(seq: u64, out: &mut [u8]) -> usize {
    let len = 1 + (seq as usize * 7) % out.len();
    for (i, b) in out[..len].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8);
    }
    len
}

#[test]
fn cross_thread_stream_is_delivered_exactly_once_in_order() {
    let geo = Geometry::new(256, 4, 96).unwrap();
    let q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
    let mem = q.memory();
    let (mut producer, mut poster) = q.split();

    let producer_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 96];
        let mut seq = 1;
        while seq <= RECORDS {
            let len = payload_for(seq, &mut buf);
            match producer.push(&buf[..len]) {
                Ok(s) => {
                    assert_eq!(s, seq);
                    seq += 1;
                }
                Err(PushError::Full) => std::thread::yield_now(),
                Err(e) => panic!("push: {e}"),
            }
        }
    });

    let mut mirror = MirrorQueue::new(geo, Backing::Heap).unwrap();
    let mut cursor = StreamCursor::default();
    let mut wire = vec![0u8; geo.capacity()];
    let mut expected = [0u8; 96];
    while cursor.last_delivered() < RECORDS {
        let Some(range) = poster.pending(usize::MAX) else {
            std::thread::yield_now();
            continue;
        };
        poster.mark_posted(&range);
        // The "NIC": read the posted bytes out of the sender's ring, place them in the mirror.
        // SAFETY: a posted range is committed and not yet released: the producer thread does
        // not write it until the mirror's consumption is acknowledged (below).
        unsafe { mem.read(range.offset, &mut wire[..range.len()]) };
        mirror.write_raw(range.offset, &wire[..range.len()]);
        mirror.notify(range.notify_imm()).unwrap();
        mirror
            .consume(&mut cursor, |seq, bytes| {
                let len = payload_for(seq, &mut expected);
                assert_eq!(bytes, &expected[..len], "record {seq} corrupted");
            })
            .unwrap();
        poster
            .ack(mirror.read_pos(), cursor.last_delivered())
            .unwrap();
    }
    producer_thread.join().unwrap();
    assert_eq!(cursor.delivered, RECORDS);
    assert_eq!(cursor.duplicates, 0);
    assert!(poster.all_acked());
}
