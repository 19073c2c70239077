//! Model-checks the producer/poster index protocol with loom (every interleaving, and every
//! read/write of the ring's bytes checked for ordering by per-word cells).
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p railover-segq --test loom --release`
#![cfg(loom)]

use railover_segq::{Backing, Geometry, PushError, SendQueue};

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
                if let Some((_, last)) = r.seqs {
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
