//! Repeated faults on whichever rail is active, each cleared and re-armed before the next, for
//! every fault kind: the same cycle the rxe end-to-end test runs, on the simulator (fast, exact).

use railover::sim::SimPair;
use railover::{Config, RailState};
use railover_rdma::LinkParams;
use std::time::Duration;

fn cycle(kind: &str) {
    let cfg = Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(5)
        .rearm_after(Duration::from_millis(500))
        .link_params(LinkParams {
            timeout: 10,
            retry_cnt: 1,
            rnr_retry: 3,
            ..LinkParams::default()
        })
        .build()
        .unwrap();
    let mut p = SimPair::new(cfg, 11, 10_000).unwrap();
    let (mut sent_a, mut got_b, mut sent_b, mut got_a) = (0u64, 0u64, 0u64, 0u64);
    let run = |p: &mut SimPair,
               ms: u64,
               sent_a: &mut u64,
               got_b: &mut u64,
               sent_b: &mut u64,
               got_a: &mut u64| {
        let end = p.now() + ms * 1_000_000;
        while p.now() < end {
            if p.a.send(&(*sent_a + 1).to_le_bytes()).is_ok() {
                *sent_a += 1;
            }
            if p.b.send(&(*sent_b + 1).to_le_bytes()).is_ok() {
                *sent_b += 1;
            }
            let t = p.now() + 50_000;
            p.step(t);
            p.b.poll(|m| {
                *got_b += 1;
                assert_eq!(
                    u64::from_le_bytes(m.try_into().unwrap()),
                    *got_b,
                    "{kind}: host 2 order"
                );
            })
            .unwrap();
            p.a.poll(|m| {
                *got_a += 1;
                assert_eq!(
                    u64::from_le_bytes(m.try_into().unwrap()),
                    *got_a,
                    "{kind}: host 1 order"
                );
            })
            .unwrap();
        }
    };
    for rep in 0..4 {
        let rail = p.a.core().active_rail();
        let w = p.wires[rail];
        match kind {
            "carrier" => p.fabric.carrier_loss(w),
            "blackhole" => p.fabric.black_hole(w),
            "card" => p.fabric.remove_card(&p.cards[rail].1.clone()),
            _ => unreachable!(),
        }
        run(&mut p, 50, &mut sent_a, &mut got_b, &mut sent_b, &mut got_a);
        assert!(
            p.a.core().active_rail() != rail && p.b.core().active_rail() != rail,
            "{kind} rep {rep}: no failover"
        );
        // A removed card raised device-fatal: host 2 let go of it (queue pair, registrations,
        // device); the other fault kinds keep the card.
        assert_eq!(p.b.card_released(rail), kind == "card", "{kind} rep {rep}");
        assert!(!p.a.card_released(rail));
        match kind {
            "carrier" => p.fabric.carrier_restore(w),
            "blackhole" => p.fabric.clear_black_hole(w),
            "card" => p.fabric.restore_card(&p.cards[rail].1.clone()),
            _ => unreachable!(),
        }
        run(
            &mut p,
            600,
            &mut sent_a,
            &mut got_b,
            &mut sent_b,
            &mut got_a,
        );
        assert!(
            !p.b.card_released(rail),
            "{kind} rep {rep}: the re-arm opened the card again"
        );
        for r in 0..2 {
            assert_ne!(
                p.a.core().rail_state(r),
                RailState::Failed,
                "{kind} rep {rep}: host 1 rail {r} not re-armed\n{}",
                p.a.core().describe()
            );
            assert_ne!(
                p.b.core().rail_state(r),
                RailState::Failed,
                "{kind} rep {rep}: host 2 rail {r} not re-armed\n{}",
                p.b.core().describe()
            );
        }
    }
    assert!(!p.a.core().is_dead() && !p.b.core().is_dead());
    assert!(
        got_b + 50 >= sent_a && got_a + 50 >= sent_b,
        "traffic keeps flowing"
    );
}

#[test]
fn carrier_loss_cycles() {
    cycle("carrier");
}

#[test]
fn black_hole_cycles() {
    cycle("blackhole");
}

#[test]
fn card_removal_cycles() {
    cycle("card");
}
