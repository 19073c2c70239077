//! A stream of orders survives the primary cable being pulled, then the standby card dying too.
//! `cargo run -p railover --example failover_demo`

use railover::core::Event;
use railover::sim::SimPair;
use railover::{Config, SendError};
use std::time::Duration;

fn main() {
    let cfg = Config::builder()
        .rails(2)
        .rearm_after(Duration::from_millis(20))
        .build()
        .expect("config");
    let mut pair = SimPair::new(cfg, 7, 5_000).expect("connect");
    let (mut sent, mut delivered) = (0u64, 0u64);
    let tick = |pair: &mut SimPair, sent: &mut u64, delivered: &mut u64| {
        let order = format!("order {} BUY 100 XYZ @ 42.17", *sent + 1);
        match pair.a.send(order.as_bytes()) {
            Ok(_) => *sent += 1,
            Err(SendError::AllRailsDown) => {}
            Err(e) => println!("send: {e}"),
        }
        let next = pair.now() + 50_000;
        while pair.now() < next {
            pair.step(next);
        }
        let _ = pair.b.poll(|m| {
            *delivered += 1;
            let want = format!("order {} ", *delivered);
            assert!(m.starts_with(want.as_bytes()), "out of order");
        });
        for (who, c) in [("host 1", &mut pair.a), ("host 2", &mut pair.b)] {
            while let Some(e) = c.poll_event() {
                println!(
                    "  t={:>8.3} ms {who}: {e:?}",
                    pair.fabric.now() as f64 / 1e6
                );
            }
        }
    };
    println!("streaming orders host 1 -> host 2 over rail 0 (rail 1 is the warm standby)");
    for _ in 0..100 {
        tick(&mut pair, &mut sent, &mut delivered);
    }
    println!("pulling rail 0's cable");
    pair.fabric.carrier_loss(pair.wires[0]);
    for _ in 0..200 {
        tick(&mut pair, &mut sent, &mut delivered);
    }
    println!("plugging rail 0 back in (it comes back as the standby)");
    pair.fabric.carrier_restore(pair.wires[0]);
    for _ in 0..600 {
        tick(&mut pair, &mut sent, &mut delivered);
    }
    println!("rail 1's card fails silently (black hole): the heartbeat catches it");
    pair.fabric.black_hole(pair.wires[1]);
    for _ in 0..200 {
        tick(&mut pair, &mut sent, &mut delivered);
    }
    let s = pair.a.stats();
    let r = pair.b.stats();
    println!("\nsent {sent}, delivered {delivered} in order, exactly once");
    println!(
        "failovers {}, records resent {}, duplicates discarded by the receiver {}, last blackout {:?} ns",
        s.failovers, s.records_resent, r.duplicates_discarded, s.last_blackout_ns
    );
    assert_eq!(sent, delivered, "nothing lost");
    let _ = Event::AllRailsDown { at: 0 };
}
