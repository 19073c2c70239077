//! `cargo +nightly fuzz run mirror_consume` (from segq/): hostile bytes written into a mirror and
//! hostile notifications never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use railover_segq::{Backing, Geometry, MirrorQueue, StreamCursor};

fuzz_target!(|data: &[u8]| {
    let geo = Geometry::new(256, 4, 200).unwrap();
    let mut m = MirrorQueue::new(geo, Backing::Heap).unwrap();
    let (ring, imms) = data.split_at(data.len().min(1024));
    m.write_raw(0, ring);
    let mut cursor = StreamCursor::default();
    for imm in imms.chunks_exact(4) {
        if m.notify(u32::from_le_bytes(imm.try_into().unwrap())).is_ok() {
            let _ = m.consume(&mut cursor, |_, p| assert!(p.len() <= 200));
        }
    }
});
