//! A re-arm driven by hand, for an application with a control channel of its own: each host
//! takes the core's request, makes a fresh queue pair (`rearm_prepare`), the hellos cross, and
//! each completes (`rearm_complete`). The rail comes back as a standby and carries the traffic
//! at the next failover with nothing lost; a bad rail number or hello is a typed error.

use railover::sim::SimConnection;
use railover::{Config, ConnectError, RailState};
use railover_rdma::handshake::HandshakeError;
use railover_rdma::sim::SimFabric;
use railover_rdma::LinkParams;
use std::time::Duration;

const MS: u64 = 1_000_000;

fn config() -> Config {
    Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(5)
        .rearm_after(Duration::from_millis(20))
        .link_params(LinkParams {
            timeout: 10,
            retry_cnt: 1,
            rnr_retry: 3,
            ..LinkParams::default()
        })
        .build()
        .unwrap()
}

/// Two hosts, each driven on its own (no in-process re-arm), streaming one record each way
/// every 50 us of virtual time.
struct Hosts {
    fabric: SimFabric,
    a: SimConnection,
    b: SimConnection,
    sent: [u64; 2],
    got: [u64; 2],
}

impl Hosts {
    fn new(seed: u64) -> (Hosts, Vec<railover_rdma::sim::WireId>) {
        let p = railover::sim::SimPair::new(config(), seed, 2_000).unwrap();
        let wires = p.wires.clone();
        let (fabric, a, b) = p.into_parts();
        let h = Hosts {
            fabric,
            a,
            b,
            sent: [0; 2],
            got: [0; 2],
        };
        (h, wires)
    }

    /// Runs `ms` of virtual time; stops early (returning true) once `until` says so.
    fn run(&mut self, ms: u64, mut until: impl FnMut(&Hosts) -> bool) -> bool {
        let end = self.fabric.now() + ms * MS;
        while self.fabric.now() < end {
            if until(self) {
                return true;
            }
            if self.a.send(&(self.sent[0] + 1).to_le_bytes()).is_ok() {
                self.sent[0] += 1;
            }
            if self.b.send(&(self.sent[1] + 1).to_le_bytes()).is_ok() {
                self.sent[1] += 1;
            }
            self.fabric.advance_to(self.fabric.now() + 50_000);
            for (i, c) in [&mut self.a, &mut self.b].into_iter().enumerate() {
                let got = &mut self.got[1 - i];
                c.poll(|m| {
                    *got += 1;
                    assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), *got, "order");
                })
                .unwrap();
            }
        }
        until(self)
    }
}

#[test]
fn a_rail_re_armed_by_hand_comes_back_and_carries_the_next_failover() {
    let (mut h, wires) = Hosts::new(51);
    h.run(10, |_| false);
    // The standby's cable is pulled and put back: both sides fail it, then ask for a re-arm.
    h.fabric.carrier_loss(wires[1]);
    h.run(10, |_| false);
    h.fabric.carrier_restore(wires[1]);
    assert!(
        h.run(200, |h| h.a.has_rearm_request()),
        "host 1 asks to re-arm"
    );
    assert_eq!(h.a.core().rail_state(1), RailState::Failed);
    let rail = h.a.take_rearm_request().unwrap();
    assert_eq!(rail, 1);
    h.b.cancel_rearm_request(rail);

    // Bad input first: typed errors, nothing changed.
    assert!(matches!(
        h.a.rearm_prepare(7),
        Err(ConnectError::NoSuchRail(7))
    ));
    h.a.rearm_failed(7); // ignored
    let (la, ha) = h.a.rearm_prepare(rail).unwrap();
    let (lb, hb) = h.b.rearm_prepare(rail).unwrap();
    let (l0, h0) = h.b.rearm_prepare(0).unwrap(); // a hello for another rail
    assert!(matches!(
        h.a.rearm_complete(9, l0, &ha, &h0),
        Err(ConnectError::NoSuchRail(9))
    ));
    let (l0, h0) = h.b.rearm_prepare(0).unwrap();
    assert!(
        h.a.rearm_complete(rail, l0, &ha, &h0).is_err(),
        "a hello of rail 0 does not complete rail 1"
    );
    // Rail 1's queue pair and hellos named as rail 0's: refused (rail 0 carries the traffic).
    let (lx, hx) = h.a.rearm_prepare(rail).unwrap();
    let (_ly, hy) = h.b.rearm_prepare(rail).unwrap();
    assert!(matches!(
        h.a.rearm_complete(0, lx, &hx, &hy),
        Err(ConnectError::Handshake(HandshakeError::RailMismatch { .. }))
    ));
    assert_eq!(h.a.core().rail_state(1), RailState::Failed);
    assert_eq!(h.a.core().active_rail(), 0);
    assert_eq!(h.a.stats().failovers, 0, "nothing happened to rail 0");

    // The hellos cross; each side completes.
    h.a.rearm_complete(rail, la, &ha, &hb).unwrap();
    h.b.rearm_complete(rail, lb, &hb, &ha).unwrap();
    assert!(
        h.run(50, |h| {
            h.a.core().rail_state(1) == RailState::Standby
                && h.b.core().rail_state(1) == RailState::Standby
                && h.a.core().rail_proven(1)
                && h.b.core().rail_proven(1)
        }),
        "rail 1 is a proven standby on both sides"
    );

    // The active wire dies: the re-armed rail carries on, nothing lost.
    let failovers = h.a.stats().failovers;
    h.fabric.carrier_loss(wires[0]);
    h.run(50, |_| false);
    assert!(h.a.stats().failovers > failovers, "host 1 failed over");
    assert_eq!(h.a.core().active_rail(), 1);
    // Drain: stop sending, let everything in flight arrive.
    let sent = h.sent;
    let end = h.fabric.now() + 50 * MS;
    while h.fabric.now() < end && h.got != sent {
        h.fabric.advance_to(h.fabric.now() + 50_000);
        for (i, c) in [&mut h.a, &mut h.b].into_iter().enumerate() {
            let got = &mut h.got[1 - i];
            c.poll(|m| {
                *got += 1;
                assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), *got, "order");
            })
            .unwrap();
        }
    }
    assert_eq!(h.got, sent, "every record delivered once, in order");
    assert!(
        sent[0] > 1_000 && sent[1] > 1_000,
        "traffic flowed: {sent:?}"
    );
}
