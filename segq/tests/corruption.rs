//! Random bytes written into a mirror, with random notifications, never panic or read out of bounds:
//! every outcome is either a delivered record (crc-valid) or a typed error.

use proptest::prelude::*;
use railover_segq::{Backing, Geometry, MirrorQueue, SendQueue, StreamCursor};

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]
    #[test]
    fn garbage_in_the_mirror_is_an_error_not_a_crash(
        writes in proptest::collection::vec((0usize..512, proptest::collection::vec(any::<u8>(), 1..64)), 0..20),
        imms in proptest::collection::vec(any::<u32>(), 1..10),
    ) {
        let geo = Geometry::new(128, 4, 100).unwrap();
        let mut m = MirrorQueue::new(geo, Backing::Heap).unwrap();
        for (off, bytes) in writes {
            let off = off.min(512 - bytes.len());
            m.write_raw(off, &bytes);
        }
        let mut cursor = StreamCursor::default();
        for imm in imms {
            if m.notify(imm).is_err() { continue; }
            let _ = m.consume(&mut cursor, |_, p| assert!(p.len() <= 100));
        }
    }

    #[test]
    fn flipping_any_byte_of_a_valid_stream_is_caught(flip_at in 0usize..512, xor in 1u8..=255) {
        let geo = Geometry::new(128, 4, 100).unwrap();
        let mut tx = SendQueue::new(geo, Backing::Heap, 1).unwrap();
        let mut n = 0u64;
        while tx.push(&[n as u8; 20]).is_ok() { n += 1; }
        let r = tx.poster().pending(usize::MAX).unwrap();
        let mut bytes = vec![0u8; r.len()];
        // SAFETY: posted bytes: committed, not released; the producer is this thread.
        unsafe { tx.memory().read(0, &mut bytes) };
        let flip_at = flip_at % bytes.len();
        bytes[flip_at] ^= xor;
        let mut m = MirrorQueue::new(geo, Backing::Heap).unwrap();
        m.write_raw(0, &bytes);
        m.notify(r.notify_imm()).unwrap();
        let mut cursor = StreamCursor::default();
        let mut got = Vec::new();
        let res = m.consume(&mut cursor, |seq, p| got.push((seq, p.to_vec())));
        // Everything delivered is exactly what was sent; the flip stops delivery unless it hit padding.
        for (seq, p) in &got { prop_assert_eq!(p, &vec![(*seq - 1) as u8; 20]); }
        if res.is_ok() { prop_assert_eq!(got.len() as u64, n); } else { prop_assert!((got.len() as u64) < n); }
    }
}
