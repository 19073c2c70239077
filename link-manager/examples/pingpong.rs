//! Ping-pong between two hosts over the simulated fabric (two rails, virtual clock).
//! `cargo run -p railover --example pingpong`

use railover::sim::SimPair;
use railover::Config;

fn main() {
    let cfg = Config::builder().rails(2).build().expect("config");
    let mut pair = SimPair::new(cfg, 1, 2_000).expect("connect");
    let mut rtts = Vec::new();
    for i in 0u64..1000 {
        let t0 = pair.now();
        pair.a.send(&i.to_le_bytes()).expect("ping");
        let mut got = None;
        while got.is_none() {
            pair.step(pair.now() + 1_000_000);
            pair.b
                .poll(|m| got = Some(u64::from_le_bytes(m.try_into().expect("8 bytes"))))
                .expect("poll");
        }
        assert_eq!(got, Some(i));
        pair.b.send(&i.to_le_bytes()).expect("pong");
        let mut back = false;
        while !back {
            pair.step(pair.now() + 1_000_000);
            pair.a.poll(|_| back = true).expect("poll");
        }
        rtts.push(pair.now() - t0);
    }
    rtts.sort_unstable();
    println!("1000 ping-pongs over the simulated fabric (2 us one-way wire latency)");
    println!(
        "virtual RTT p50 {} ns, p99 {} ns, max {} ns",
        rtts[500], rtts[990], rtts[999]
    );
}
