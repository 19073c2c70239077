//! Steady-state reserve/commit/post/ack/consume allocate nothing: a counting global allocator
//! (counting only this thread while armed) proves it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use railover_segq::{Backing, Geometry, MirrorQueue, SendQueue, StreamCursor};

struct Counting;
thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}
// SAFETY: forwards to System unchanged; only bumps a thread-local counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ARMED.with(|a| a.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static A: Counting = Counting;

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
        mem.read(p.offset, &mut buf[..p.len()]);
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
    ARMED.with(|a| a.set(true));
    for i in 0..10_000 {
        round(&mut tx, &mut rx, i);
    }
    ARMED.with(|a| a.set(false));
    assert_eq!(COUNT.with(|c| c.get()), 0, "steady state allocated");
    assert_eq!(cursor.delivered, 22_000);
    assert!(sum > 0);
}
