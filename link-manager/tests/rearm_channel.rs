//! Re-arming over the connection's TCP stream (railover::rearm), as between two hosts: host 1
//! initiates, host 2 answers, each through its own connection's progress. Both hosts run on the
//! simulated fabric here (the rxe end-to-end tests run the same protocol on real devices).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use railover::rearm::Role;
use railover::sim::SimPair;
use railover::{Config, Event, RailState};

fn pair_with_channels() -> (SimPair, TcpStream) {
    let cfg = config();
    let mut p = SimPair::new(cfg, 21, 5_000).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let initiator = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (acceptor, _) = listener.accept().unwrap();
    let spare = initiator.try_clone().unwrap();
    p.a.attach_rearm_channel(initiator, Role::Initiator)
        .unwrap();
    p.b.attach_rearm_channel(acceptor, Role::Acceptor).unwrap();
    (p, spare)
}

struct Traffic {
    sent: u64,
    delivered: u64,
}

/// Runs `ms` of virtual time: host 1 sends, both progress (the channel is served in progress;
/// no in-process re-arm), host 2 checks order.
fn run(p: &mut SimPair, t: &mut Traffic, ms: u64) {
    let end = p.now() + ms * 1_000_000;
    while p.now() < end {
        if p.a.send(&(t.sent + 1).to_le_bytes()).is_ok() {
            t.sent += 1;
        }
        let next = p.now() + 20_000;
        p.fabric.advance_to(next);
        p.a.progress();
        p.b.poll(|m| {
            t.delivered += 1;
            assert_eq!(
                u64::from_le_bytes(m.try_into().unwrap()),
                t.delivered,
                "order"
            );
        })
        .unwrap();
    }
}

fn standby_again(p: &SimPair, rail: usize) -> bool {
    p.a.core().rail_state(rail) == RailState::Standby
        && p.b.core().rail_state(rail) == RailState::Standby
}

fn config() -> Config {
    Config::builder()
        .rails(2)
        .geometry(16 * 1024, 8, 256)
        .rearm_after(Duration::from_millis(2))
        .build()
        .unwrap()
}

/// Runs traffic for `ms` and checks some of it was delivered.
fn flows(p: &mut SimPair, t: &mut Traffic, ms: u64, what: &str) {
    let before = t.delivered;
    run(p, t, ms);
    assert!(t.delivered > before, "{what}");
}

/// Both hosts started without rail 0 (told, with the reason) and run on rail 1.
fn started_without_rail_0(p: &mut SimPair) {
    for c in [&mut p.a, &mut p.b] {
        let events: Vec<Event> = std::iter::from_fn(|| c.poll_event()).collect();
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::RailDown {
                    rail: 0,
                    reason: railover::FailReason::Unreachable,
                    ..
                }
            )),
            "{events:?}"
        );
        assert_eq!(c.core().active_rail(), 1);
    }
}

/// Runs traffic until `rail` is a standby on both hosts again.
fn until_standby_again(p: &mut SimPair, t: &mut Traffic, rail: usize) {
    let mut waited = 0;
    while !standby_again(p, rail) {
        run(p, t, 1);
        waited += 1;
        assert!(
            waited < 10_000,
            "rail {rail} never came back\nhost 1: {}host 2: {}",
            p.a.core().describe(),
            p.b.core().describe()
        );
    }
}

#[test]
fn a_failed_rail_is_rearmed_over_tcp_and_carries_the_next_failover() {
    let (mut p, _spare) = pair_with_channels();
    let mut t = Traffic {
        sent: 0,
        delivered: 0,
    };
    run(&mut p, &mut t, 5);
    p.fabric.carrier_loss(p.wires[0]);
    run(&mut p, &mut t, 20);
    assert_eq!(p.a.core().active_rail(), 1, "failed over to rail 1");
    p.fabric.carrier_restore(p.wires[0]);
    let mut waited = 0;
    while !standby_again(&p, 0) {
        run(&mut p, &mut t, 1);
        waited += 1;
        assert!(
            waited < 10_000,
            "rail 0 never re-armed\n{}",
            p.a.core().describe()
        );
    }
    // (An attempt can also complete while the wire is still down; that rail then fails again and
    // is re-armed once more: both sides count every completed exchange alike.)
    let done = p.a.rearms_completed().unwrap();
    assert!(done >= 1);
    assert_eq!(p.b.rearms_completed(), Some(done));
    run(&mut p, &mut t, 20); // the re-armed rail proves itself (heartbeats)
                             // Now lose rail 1: traffic must move to the re-armed rail 0.
    p.fabric.carrier_loss(p.wires[1]);
    run(&mut p, &mut t, 20);
    assert_eq!(
        p.a.core().active_rail(),
        0,
        "failed over to the re-armed rail"
    );
    assert!(!p.a.core().is_dead());
    flows(&mut p, &mut t, 10, "traffic flows on the re-armed rail");
    assert_eq!(p.a.stats().failovers, 2);
}

#[test]
fn a_hostile_rearm_message_closes_the_channel_without_harm() {
    let (mut p, mut spare) = pair_with_channels();
    let mut t = Traffic {
        sent: 0,
        delivered: 0,
    };
    run(&mut p, &mut t, 5);
    // Garbage on host 1's side of the stream reaches host 2's channel: kind 9 is no message.
    spare.write_all(&[9u8; 200]).unwrap();
    p.fabric.carrier_loss(p.wires[0]); // a failed rail makes host 2 read its channel
    run(&mut p, &mut t, 30);
    assert_eq!(p.a.core().active_rail(), 1);
    p.fabric.carrier_restore(p.wires[0]);
    run(&mut p, &mut t, 30);
    // No re-arm could happen (host 2 closed its channel), but nothing broke either, and the user
    // was told redundancy can't come back.
    assert_eq!(p.b.rearms_completed(), Some(0));
    let events: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RearmChannelLost { .. })),
        "{events:?}"
    );
    assert_eq!(p.a.core().rail_state(0), RailState::Failed);
    flows(&mut p, &mut t, 5, "traffic keeps flowing on rail 1");
}

/// A wire down at start-up (its queue pairs can't be connected) doesn't fail the connection: it
/// starts on the other rail, and the missing one joins over the control channel once the wire
/// is back.
#[test]
fn a_connection_starts_with_one_wire_down_and_gains_its_redundancy_when_it_comes_back() {
    let cfg = config();
    let mut p = SimPair::new_with(cfg, 22, 5_000, |fabric, wires| {
        fabric.carrier_loss(wires[0]);
    })
    .unwrap();
    p.use_control_channel();
    started_without_rail_0(&mut p);
    let mut t = Traffic {
        sent: 0,
        delivered: 0,
    };
    run(&mut p, &mut t, 20);
    assert!(t.delivered > 0, "traffic flows on the rail that came up");
    p.fabric.carrier_restore(p.wires[0]);
    until_standby_again(&mut p, &mut t, 0);
    assert!(p.a.rearms_completed().unwrap() >= 1);
    flows(&mut p, &mut t, 10, "traffic flows");
}

/// A control channel that breaks comes back: here host 2 reads garbage and hangs up; both hosts
/// say the channel was lost, no rail is re-armed without one, and once a new stream can be had
/// both take it, say so, and the rail cut meanwhile is re-armed over it.
#[test]
fn a_broken_control_channel_is_re_established_and_re_arms_again() {
    let cfg = config();
    let mut p = SimPair::with_control_channel(cfg, 23, 5_000).unwrap();
    let control = p.control().expect("a control channel").clone();
    let mut t = Traffic {
        sent: 0,
        delivered: 0,
    };
    run(&mut p, &mut t, 5);
    control.inject_garbage(true, &[9u8; 200]);
    p.fabric.carrier_loss(p.wires[0]); // a failed rail makes host 2 read its channel
    run(&mut p, &mut t, 30);
    assert!(control.is_broken(), "host 2 hung up on the garbage");
    p.fabric.carrier_restore(p.wires[0]);
    run(&mut p, &mut t, 30);
    assert_eq!(
        p.a.core().rail_state(0),
        RailState::Failed,
        "no re-arm without a channel"
    );
    let before = (p.a.rearms_completed(), p.b.rearms_completed());
    control.restore();
    until_standby_again(&mut p, &mut t, 0);
    assert!(p.a.rearms_completed() > before.0 && p.b.rearms_completed() > before.1);
    for c in [&mut p.a, &mut p.b] {
        let said: Vec<&str> = std::iter::from_fn(|| c.poll_event())
            .filter_map(|e| match e {
                Event::RearmChannelLost { .. } => Some("lost"),
                Event::RearmChannelRestored { .. } => Some("restored"),
                _ => None,
            })
            .collect();
        assert_eq!(said, ["lost", "restored"]);
    }
    flows(&mut p, &mut t, 10, "traffic keeps flowing");
}

/// A card that can't be opened at set-up (missing after a restart) doesn't fail the connection:
/// the peer is told the rail is absent, both start it failed and run on the other rail, and once
/// the card is back the re-arm opens it again by name, registers the rings on it and the rail
/// joins over the control channel.
#[test]
fn a_card_missing_at_start_is_opened_when_it_comes_back_and_its_rail_joins() {
    let cfg = config();
    let mut p = SimPair::new_with_card_missing(cfg, 24, 5_000, true, 0).unwrap();
    p.use_control_channel();
    started_without_rail_0(&mut p);
    let mut t = Traffic {
        sent: 0,
        delivered: 0,
    };
    run(&mut p, &mut t, 20);
    assert!(
        t.delivered > 0,
        "traffic flows on the rail that has both cards"
    );
    assert_eq!(
        p.b.core().rail_state(0),
        RailState::Failed,
        "no card, no rail"
    );
    p.fabric.restore_card(&p.cards[0].1);
    until_standby_again(&mut p, &mut t, 0);
    // The re-armed rail carries the next failover.
    p.fabric.carrier_loss(p.wires[1]);
    let before = t.delivered;
    run(&mut p, &mut t, 30);
    assert_eq!(p.a.core().active_rail(), 0);
    assert!(
        t.delivered > before,
        "traffic flows on the rail whose card came back"
    );
}
