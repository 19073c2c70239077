//! Steady-state send and poll allocate nothing: a counting global allocator (this thread only,
//! while armed) watches 20,000 messages go through the whole stack — core, runtime, segq — over the
//! simulated fabric, after a warm-up that wraps the rings several times.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use railover::sim::SimPair;
use railover::Config;

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
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ARMED.with(|a| a.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static A: Counting = Counting;

#[test]
fn steady_state_send_and_poll_allocate_nothing() {
    let cfg = Config::builder().geometry(4096, 16, 512).build().unwrap();
    let mut pair = SimPair::new(cfg, 9, 2_000).unwrap();
    let msg = [0x42u8; 100];
    let mut delivered = 0usize;
    let round = |pair: &mut SimPair, delivered: &mut usize| {
        for _ in 0..4 {
            pair.a.send(&msg).unwrap();
            pair.b.send(&msg[..60]).unwrap();
        }
        let t = pair.now() + 50_000;
        pair.step(t);
        pair.step(t);
        *delivered += pair.b.poll(|m| assert_eq!(m.len(), 100)).unwrap();
        *delivered += pair.a.poll(|m| assert_eq!(m.len(), 60)).unwrap();
    };
    for _ in 0..2_000 {
        round(&mut pair, &mut delivered); // warm-up: queues reach their working capacity
    }
    ARMED.with(|a| a.set(true));
    for _ in 0..2_500 {
        round(&mut pair, &mut delivered);
    }
    ARMED.with(|a| a.set(false));
    let allocations = COUNT.with(|c| c.get());
    assert_eq!(allocations, 0, "steady state allocated {allocations} times");
    assert!(delivered > 30_000, "traffic really flowed: {delivered}");
}
