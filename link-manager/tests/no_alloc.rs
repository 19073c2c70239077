//! Steady-state send (one message or a batch) and poll allocate nothing: a counting global allocator (this thread only,
//! while armed) watches 20,000 messages go through the whole stack — core, runtime, segq — over the
//! simulated fabric, after a warm-up that wraps the rings several times.

use railover::sim::SimPair;
use railover::Config;
use railover_segq::alloc_counter::{count_allocations, CountingAllocator};

#[global_allocator]
static A: CountingAllocator = CountingAllocator;

#[test]
fn steady_state_send_and_poll_allocate_nothing() {
    let cfg = Config::builder().geometry(4096, 16, 512).build().unwrap();
    let mut pair = SimPair::new(cfg, 9, 2_000).unwrap();
    let msg = [0x42u8; 100];
    let mut delivered = 0usize;
    let round = |pair: &mut SimPair, delivered: &mut usize| {
        for _ in 0..4 {
            pair.b.send(&msg[..60]).unwrap();
        }
        pair.a.send(&msg).unwrap();
        pair.a.send(&msg).unwrap();
        pair.a.send_batch(&[&msg, &msg]).unwrap();
        let t = pair.now() + 50_000;
        pair.step(t);
        pair.step(t);
        *delivered += pair.b.poll(|m| assert_eq!(m.len(), 100)).unwrap();
        *delivered += pair.a.poll(|m| assert_eq!(m.len(), 60)).unwrap();
    };
    for _ in 0..2_000 {
        round(&mut pair, &mut delivered); // warm-up: queues reach their working capacity
    }
    let allocations = count_allocations(|| {
        for _ in 0..2_500 {
            round(&mut pair, &mut delivered);
        }
    });
    assert_eq!(allocations, 0, "steady state allocated {allocations} times");
    assert!(delivered > 30_000, "traffic really flowed: {delivered}");
}

#[test]
fn split_sender_and_receiver_allocate_nothing() {
    let cfg = Config::builder().geometry(4096, 16, 512).build().unwrap();
    let SimPair {
        fabric, a, mut b, ..
    } = SimPair::new(cfg, 10, 2_000).unwrap();
    let (mut sender, mut a) = a.split();
    let msg = [0x24u8; 100];
    let mut delivered = 0usize;
    let mut round = || {
        for _ in 0..4 {
            sender.send(&msg).unwrap();
        }
        a.progress(); // posts what the sender committed
        let t = fabric.now() + 50_000;
        fabric.advance_to(t);
        a.progress();
        b.progress();
        fabric.advance_to(t + 50_000);
        a.progress();
        delivered += b.poll(|m| assert_eq!(m.len(), 100)).unwrap();
    };
    for _ in 0..2_000 {
        round();
    }
    let allocations = count_allocations(|| {
        for _ in 0..2_500 {
            round();
        }
    });
    assert_eq!(
        allocations, 0,
        "split steady state allocated {allocations} times"
    );
    assert!(delivered > 15_000, "traffic really flowed: {delivered}");
}

/// The same through an endpoint whose connections share each card's completion queues: routing
/// a completion to its connection allocates nothing either.
#[test]
fn an_endpoints_poll_on_shared_queues_allocates_nothing() {
    let cfg = Config::builder().geometry(4096, 16, 512).build().unwrap();
    let mut hosts = railover::endpoint::SimEndpoints::new(cfg, 11, 2_000).unwrap();
    let ids: Vec<_> = (0..4).map(|_| hosts.connect().unwrap()).collect();
    assert!(hosts.a.completion_queues() > 0, "on shared queues");
    let msg = [0x42u8; 100];
    let mut delivered = 0usize;
    let round = |hosts: &mut railover::endpoint::SimEndpoints, delivered: &mut usize| {
        for &(a, b) in &ids {
            hosts.a.send(a, &msg).unwrap();
            hosts.b.send(b, &msg[..60]).unwrap();
        }
        let t = hosts.now() + 50_000;
        hosts.step(t);
        hosts.step(t);
        *delivered += hosts.b.poll(|_, _, m| assert_eq!(m.len(), 100));
        *delivered += hosts.a.poll(|_, _, m| assert_eq!(m.len(), 60));
    };
    for _ in 0..2_000 {
        round(&mut hosts, &mut delivered);
    }
    let allocations = count_allocations(|| {
        for _ in 0..2_500 {
            round(&mut hosts, &mut delivered);
        }
    });
    assert_eq!(allocations, 0, "steady state allocated {allocations} times");
    assert!(delivered > 30_000, "traffic really flowed: {delivered}");
}
