//! Steady-state reserve/commit/post/ack/consume allocate nothing: a counting global allocator
//! (counting only this thread while armed) proves it.

use railover_segq::alloc_counter::{count_allocations, CountingAllocator};
use railover_segq::{Backing, Geometry, MirrorQueue, SendQueue, StreamCursor};

#[global_allocator]
static A: CountingAllocator = CountingAllocator;

#[test]
fn steady_state_allocates_nothing() {
    let geo = Geometry::new(4096, 8, 1024).unwrap();
    let mut tx = SendQueue::new(geo, Backing::Anonymous, 1).unwrap();
    let mut rx = MirrorQueue::new(geo, Backing::Anonymous).unwrap();
    let mem = tx.memory();
    let mut cursor = StreamCursor::default();
    let mut buf = [0u8; 4096];
    let mut sum = 0u64;
    let mut round = |tx: &mut SendQueue, rx: &mut MirrorQueue, i: u64| {
        let mut r = tx.reserve(64 + (i as usize % 200)).unwrap();
        r.payload_mut()[0] = i as u8;
        r.commit();
        tx.push(&buf[..64]).unwrap();
        let p = tx.poster().pending(1 << 16).unwrap();
        tx.poster().mark_posted(&p);
        // SAFETY: posted bytes: committed, not released; this thread is the only producer.
        unsafe { mem.read(p.offset, &mut buf[..p.len()]) };
        rx.write_raw(p.offset, &buf[..p.len()]);
        rx.notify(p.notify_imm()).unwrap();
        rx.consume(&mut cursor, |s, b| sum += s + b.len() as u64)
            .unwrap();
        tx.poster()
            .ack(rx.read_pos(), cursor.last_delivered())
            .unwrap();
    };
    for i in 0..1000 {
        round(&mut tx, &mut rx, i); // warm-up: wraps the ring several times
    }
    let allocations = count_allocations(|| {
        for i in 0..10_000 {
            round(&mut tx, &mut rx, i);
        }
    });
    assert_eq!(allocations, 0, "steady state allocated");
    assert_eq!(cursor.delivered, 22_000);
    assert!(sum > 0);
}
