//! Repeated faults on whichever rail is active, each cleared and re-armed before the next, for
//! every fault kind: the same cycle the rxe end-to-end test runs, on the simulator (fast, exact).

use railover::sim::SimPair;
use railover::{Config, ConnectError, RailState};
use railover_rdma::LinkParams;
use std::time::Duration;

fn config() -> Config {
    Config::builder()
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
        .unwrap()
}

/// Records sent and delivered each way (host 1 -> host 2, host 2 -> host 1).
#[derive(Default)]
struct Counts {
    sent_a: u64,
    got_b: u64,
    sent_b: u64,
    got_a: u64,
}

/// Both hosts send one record each 50 us of virtual time for `ms`, and check what arrives is
/// the next in order.
fn run(p: &mut SimPair, ms: u64, c: &mut Counts, kind: &str) {
    let end = p.now() + ms * 1_000_000;
    while p.now() < end {
        if p.a.send(&(c.sent_a + 1).to_le_bytes()).is_ok() {
            c.sent_a += 1;
        }
        if p.b.send(&(c.sent_b + 1).to_le_bytes()).is_ok() {
            c.sent_b += 1;
        }
        let t = p.now() + 50_000;
        p.step(t);
        let got_b = &mut c.got_b;
        p.b.poll(|m| {
            *got_b += 1;
            assert_eq!(
                u64::from_le_bytes(m.try_into().unwrap()),
                *got_b,
                "{kind}: host 2 order"
            );
        })
        .unwrap();
        let got_a = &mut c.got_a;
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
}

fn cycle(kind: &str) {
    let mut p = SimPair::new(config(), 11, 10_000).unwrap();
    let mut c = Counts::default();
    for rep in 0..4 {
        let rail = p.a.core().active_rail();
        let w = p.wires[rail];
        match kind {
            "carrier" => p.fabric.carrier_loss(w),
            "blackhole" => p.fabric.black_hole(w),
            "card" => p.fabric.remove_card(&p.cards[rail].1.clone()),
            _ => unreachable!(),
        }
        run(&mut p, 50, &mut c, kind);
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
        run(&mut p, 600, &mut c, kind);
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
        c.got_b + 50 >= c.sent_a && c.got_a + 50 >= c.sent_b,
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

/// A card the user swaps in for a failed rail (`replace_card`: say the card came back under
/// another name) carries the rail after its re-arm: the rail comes back, and when the other
/// rail fails, the traffic moves to it. A rail that hasn't failed, or doesn't exist, is refused.
#[test]
fn a_card_the_user_swaps_in_carries_its_rail_after_the_re_arm() {
    let mut p = SimPair::new(config(), 12, 10_000).unwrap();
    let mut c = Counts::default();
    run(&mut p, 20, &mut c, "swap");
    let rail = p.a.core().active_rail();
    let other = 1 - rail;
    let card = p.cards[rail].0.clone();
    assert!(matches!(
        p.a.replace_card(rail, card.clone()),
        Err(ConnectError::RailNotFailed(r)) if r == rail
    ));
    assert!(matches!(
        p.a.replace_card(7, card.clone()),
        Err(ConnectError::RailNotFailed(7))
    ));
    let w = p.wires[rail];
    p.fabric.carrier_loss(w);
    run(&mut p, 50, &mut c, "swap");
    assert_eq!(p.a.core().rail_state(rail), RailState::Failed);
    assert_eq!(p.a.core().active_rail(), other, "failed over");
    p.a.replace_card(rail, card)
        .expect("swap in a card for the failed rail");
    p.fabric.carrier_restore(w);
    run(&mut p, 600, &mut c, "swap");
    for host in [&p.a, &p.b] {
        assert_ne!(
            host.core().rail_state(rail),
            RailState::Failed,
            "not re-armed:\n{}",
            host.core().describe()
        );
    }
    // Now the other rail fails: the swapped-in card's rail carries everything.
    let before = p.a.stats().rail_data_writes[rail];
    p.fabric.carrier_loss(p.wires[other]);
    run(&mut p, 100, &mut c, "swap");
    assert_eq!(p.a.core().active_rail(), rail);
    assert!(p.a.stats().rail_data_writes[rail] > before + 100);
    assert!(c.got_b + 50 >= c.sent_a && c.got_a + 50 >= c.sent_b);
}
