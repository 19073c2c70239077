//! Deterministic simulation (VOPR-style): two endpoints over the simulated fabric, random
//! workloads in both directions, random fault schedules of every kind (carrier loss, black hole,
//! ACK loss, card removal, corruption, latency spikes, flapping, faults during failover, and
//! all-rails-dead) and peer pauses (a host's process stops running, from one heartbeat interval to
//! past the session timeout). After every step: each side delivered exactly the sent stream, in
//! order, with no duplicate. At the end: everything delivered and every rail back (redundancy
//! restored once the wires are), or the session ended — every rail dead, or a pause past the
//! session timeout — and each side reports every record the other did not deliver as
//! unacknowledged. A third of the seeds run hot-hot rails, a quarter the gray-failure switch
//! (with partial loss and slow rails among the faults).
//!
//! `cargo test` runs RAILOVER_SEEDS seeds (default 1000); a failure prints its seed, and
//! `RAILOVER_SEED=<n> cargo test -p railover --test simulation -- --nocapture` replays it exactly.

use railover::core::Event;
use railover::sim::{SimConnection, SimPair};
use railover::{Config, EndReason, GraySwitch, RailMode, RailState, SendError};
use railover_rdma::LinkParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

const MS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
enum Fault {
    CarrierLoss {
        wire: usize,
        restore_after: u64,
    },
    BlackHole {
        wire: usize,
        restore_after: u64,
    },
    AckLoss {
        wire: usize,
        restore_after: u64,
    },
    RemoveCard {
        wire: usize,
        host2: bool,
        restore_after: u64,
    },
    Corrupt {
        wire: usize,
        writes: u32,
    },
    Spike {
        wire: usize,
        extra: u64,
        duration: u64,
    },
    /// Partial loss: a share of the writes arrive after an RC retransmission.
    Lossy {
        wire: usize,
        per_mille: u32,
        retransmit: u64,
        duration: u64,
    },
    Flap {
        wire: usize,
        times: u32,
        period: u64,
    },
    /// Every wire dies for good: must end in AllRailsDown with a correct report.
    AllDead,
    /// Host 1's or host 2's process stops running for `duration` (its cards keep answering).
    Pause {
        host2: bool,
        duration: u64,
    },
    /// What one host sends on the control channel arrives `delay` late, for `duration` (past
    /// the exchange timeout, exchanges are given up and retried).
    ControlDelay {
        from_host2: bool,
        delay: u64,
        duration: u64,
    },
    /// The control channel breaks; a new one can be had after `duration` (each side reconnects
    /// and starts the re-arm protocol afresh on it).
    ControlBreak {
        duration: u64,
    },
}

/// The simulation's re-arm exchange timeout (seeds that re-arm over the control channel).
const EXCHANGE_TIMEOUT: u64 = 30 * MS;

/// The simulation's session timeout: a pause longer than this ends the session.
const SESSION_TIMEOUT: u64 = 200 * MS;

/// Deferred fault actions (restores, flaps), by virtual time.
type Pending = Vec<(u64, Box<dyn FnOnce(&mut SimPair)>)>;

struct Direction {
    sent: Vec<Vec<u8>>, // index i = sequence number i + 1
    delivered: usize,
}

struct Outcome {
    failovers: u64,
    rearms: u64,
    dead: bool,
    delivered: usize,
    pauses: u64,
    unresponsive: u64,
    timeouts: u64,
    /// Re-arms completed over the control channel (host 1's count; host 2's must match).
    channel_rearms: u64,
    /// Control channels re-established after a break (both hosts).
    channel_restores: u64,
    /// Planned switches away from a degraded rail (both hosts).
    switches: u64,
    hot_hot: bool,
    /// A failover kept records its new active rail had no room for yet (a full hot standby).
    kept: bool,
}

fn payload(rng: &mut ChaCha8Rng, seq: usize, max: usize) -> Vec<u8> {
    let len = if rng.random_bool(0.1) {
        max
    } else {
        rng.random_range(0..=max.min(200))
    };
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    if len >= 8 {
        v[..8].copy_from_slice(&(seq as u64).to_le_bytes());
    }
    v
}

/// How long a host pauses: mostly a few heartbeat timeouts, sometimes tens of them, rarely past
/// the session timeout (which ends the session).
fn pause_duration(rng: &mut ChaCha8Rng, past_session_timeout: bool) -> u64 {
    match rng.random_range(0..10) {
        0 if past_session_timeout => SESSION_TIMEOUT + rng.random_range(10..200) * MS,
        0..=2 => rng.random_range(20..150) * MS,
        _ => rng.random_range(1_000..20_000) * 1000,
    }
}

fn schedule(
    rng: &mut ChaCha8Rng,
    rails: usize,
    all_dead: bool,
    channel: bool,
) -> Vec<(u64, Fault)> {
    let mut out = Vec::new();
    let mut t = rng.random_range(1..5) * MS;
    // A pause ends the session only when it is the last thing that happens (the run ends there).
    let mut session_may_end = false;
    // No rail is re-armed while a host is paused, so wires faulted before or during a pause stay
    // busy until it ends.
    let mut pause_end = 0u64;
    // A wire is "busy" from its fault until it is restored and re-armed; never fault the last
    // healthy wire (that case is the explicit AllDead schedule).
    let mut busy_until = vec![0u64; rails];
    for _ in 0..rng.random_range(1..6) {
        let free: Vec<usize> = (0..rails).filter(|&w| busy_until[w] <= t).collect();
        let busy = rails - free.len();
        if free.is_empty() || busy + 1 >= rails {
            t += 30 * MS;
            continue;
        }
        let wire = free[rng.random_range(0..free.len())];
        let restore_after = rng.random_range(1..15) * MS;
        let fault = match rng.random_range(0..10) {
            0 => Fault::CarrierLoss {
                wire,
                restore_after,
            },
            1 => Fault::BlackHole {
                wire,
                restore_after,
            },
            2 => Fault::AckLoss {
                wire,
                restore_after,
            },
            3 => Fault::RemoveCard {
                wire,
                host2: rng.random_bool(0.5),
                restore_after,
            },
            4 => Fault::Corrupt {
                wire,
                writes: rng.random_range(1..4),
            },
            5 => Fault::Spike {
                wire,
                extra: rng.random_range(10..2000) * 1000,
                duration: rng.random_range(1..5) * MS,
            },
            9 => Fault::Lossy {
                wire,
                per_mille: rng.random_range(10..300),
                retransmit: rng.random_range(100..3_000) * 1000,
                duration: rng.random_range(1..10) * MS,
            },
            7 if channel => Fault::ControlDelay {
                from_host2: rng.random_bool(0.5),
                delay: rng.random_range(1..2 * EXCHANGE_TIMEOUT / MS) * MS,
                duration: rng.random_range(5..100) * MS,
            },
            8 if channel => Fault::ControlBreak {
                duration: rng.random_range(1..60) * MS,
            },
            6 => {
                let duration = pause_duration(rng, !all_dead && !session_may_end);
                session_may_end |= duration > SESSION_TIMEOUT;
                Fault::Pause {
                    host2: rng.random_bool(0.5),
                    duration,
                }
            }
            _ => Fault::Flap {
                wire,
                times: rng.random_range(2..5),
                period: rng.random_range(1..4) * MS,
            },
        };
        let span = match fault {
            Fault::Flap { times, period, .. } => times as u64 * period,
            Fault::Corrupt { .. } | Fault::Spike { .. } => 5 * MS,
            Fault::Lossy { duration, .. } => duration,
            Fault::Pause { .. } | Fault::ControlDelay { .. } | Fault::ControlBreak { .. } => 0, // they fault no wire
            _ => restore_after,
        };
        // Generous margin: detection, re-arm timer, heartbeat probation.
        match fault {
            Fault::Pause { duration, .. } => {
                for b in busy_until.iter_mut().filter(|b| **b > t) {
                    *b += duration;
                }
                pause_end = pause_end.max(t + duration);
            }
            // A slow control channel delays re-arms like a pause (plus the exchanges it timed
            // out, retried a re-arm interval later).
            Fault::ControlDelay { duration, .. } | Fault::ControlBreak { duration } => {
                let slow = duration + 2 * EXCHANGE_TIMEOUT + 20 * MS;
                for b in busy_until.iter_mut().filter(|b| **b > t) {
                    *b += slow;
                }
                pause_end = pause_end.max(t + slow);
            }
            _ => busy_until[wire] = (t + span).max(pause_end) + 40 * MS,
        }
        out.push((t, fault));
        // Sometimes the next fault lands during this failover (on another wire, if one is spare).
        t += if rng.random_bool(0.3) {
            rng.random_range(0..200) * 1000
        } else {
            rng.random_range(5..40) * MS
        };
    }
    if all_dead {
        out.push((t + rng.random_range(0..20) * MS, Fault::AllDead));
    }
    out
}

fn inject(pair: &mut SimPair, f: Fault, pending: &mut Pending) {
    let now = pair.now();
    let fab = pair.fabric.clone();
    match f {
        Fault::CarrierLoss {
            wire,
            restore_after,
        } => {
            let w = pair.wires[wire];
            fab.carrier_loss(w);
            pending.push((
                now + restore_after,
                Box::new(move |p: &mut SimPair| p.fabric.carrier_restore(w)),
            ));
        }
        Fault::BlackHole {
            wire,
            restore_after,
        } => {
            let w = pair.wires[wire];
            fab.black_hole(w);
            pending.push((
                now + restore_after,
                Box::new(move |p: &mut SimPair| p.fabric.clear_black_hole(w)),
            ));
        }
        Fault::AckLoss {
            wire,
            restore_after,
        } => {
            let w = pair.wires[wire];
            fab.ack_loss(w);
            pending.push((
                now + restore_after,
                Box::new(move |p: &mut SimPair| p.fabric.clear_black_hole(w)),
            ));
        }
        Fault::RemoveCard {
            wire,
            host2,
            restore_after,
        } => {
            let card = if host2 {
                pair.cards[wire].1.clone()
            } else {
                pair.cards[wire].0.clone()
            };
            fab.remove_card(&card);
            pending.push((
                now + restore_after,
                Box::new(move |p: &mut SimPair| p.fabric.restore_card(&card)),
            ));
        }
        Fault::Corrupt { wire, writes } => fab.corrupt_next(pair.wires[wire], writes),
        Fault::Spike {
            wire,
            extra,
            duration,
        } => fab.latency_spike(pair.wires[wire], extra, duration),
        Fault::Lossy {
            wire,
            per_mille,
            retransmit,
            duration,
        } => fab.lossy(pair.wires[wire], per_mille, retransmit, duration),
        Fault::Flap {
            wire,
            times,
            period,
        } => {
            let w = pair.wires[wire];
            for i in 0..times as u64 {
                pending.push((
                    now + i * period,
                    Box::new(move |p: &mut SimPair| p.fabric.carrier_loss(w)),
                ));
                pending.push((
                    now + i * period + period / 2,
                    Box::new(move |p: &mut SimPair| p.fabric.carrier_restore(w)),
                ));
            }
        }
        Fault::AllDead => {
            for &w in &pair.wires {
                fab.carrier_loss(w);
            }
        }
        Fault::Pause { host2, duration } => pair.pause(host2, now + duration),
        Fault::ControlDelay {
            from_host2,
            delay,
            duration,
        } => {
            let control = pair.control().expect("scheduled with a channel").clone();
            control.set_delay(from_host2, delay);
            pending.push((
                now + duration,
                Box::new(move |_: &mut SimPair| control.set_delay(from_host2, 0)),
            ));
        }
        Fault::ControlBreak { duration } => {
            let control = pair.control().expect("scheduled with a channel").clone();
            control.break_channel();
            pending.push((
                now + duration,
                Box::new(move |_: &mut SimPair| control.restore()),
            ));
        }
    }
}

/// Delivers what arrived at `conn`, checking it against what the peer sent.
fn receive(conn: &mut SimConnection, from: &mut Direction, seed: u64, who: &str) {
    let mut err = None;
    let _ = conn.poll(|msg| {
        let i = from.delivered;
        match from.sent.get(i) {
            Some(expect) if expect.as_slice() == msg => from.delivered += 1,
            Some(_) => {
                err.get_or_insert(format!("seed {seed}: {who} got a wrong message at seq {} (reordered, duplicated or corrupted)", i + 1));
            }
            None => {
                err.get_or_insert(format!("seed {seed}: {who} got seq {} that was never sent (duplicate)", i + 1));
            }
        }
    });
    if let Some(e) = err {
        panic!("{e}");
    }
}

/// Sends `n` messages: mostly one by one, now and then two to four as one batch (one commit,
/// one write; all or none).
fn send_some(
    conn: &mut SimConnection,
    dir: &mut Direction,
    rng: &mut ChaCha8Rng,
    n: usize,
    max: usize,
) {
    let mut left = n;
    while left > 0 {
        let k = if left > 1 && rng.random_bool(0.25) {
            rng.random_range(2..=4).min(left)
        } else {
            1
        };
        let msgs: Vec<Vec<u8>> = (0..k)
            .map(|i| payload(rng, dir.sent.len() + 1 + i, max))
            .collect();
        let sent = if k == 1 {
            conn.send(&msgs[0]).map(|seq| seq..seq + 1)
        } else {
            let batch: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
            conn.send_batch(&batch)
        };
        match sent {
            Ok(seqs) => {
                assert_eq!(
                    (seqs.start as usize, seqs.end as usize),
                    (dir.sent.len() + 1, dir.sent.len() + 1 + k),
                    "sequence numbers are dense"
                );
                dir.sent.extend(msgs);
                left -= k;
            }
            Err(SendError::Backpressure | SendError::AllRailsDown | SendError::Ended(_)) => return,
            Err(e) => panic!("unexpected send error {e}"),
        }
    }
}

/// After a side died: nothing was lost silently. Every record it accepted and the peer did not
/// deliver is in its unacked() report, in order.
fn check_report(conn: &SimConnection, dir: &Direction, seed: u64, who: &str) {
    let mut reported = Vec::new();
    conn.unacked(|seq, p| reported.push((seq, p.to_vec())));
    for (i, msg) in dir.sent.iter().enumerate().skip(dir.delivered) {
        let seq = (i + 1) as u64;
        assert!(
            reported.iter().any(|(s, p)| *s == seq && p == msg),
            "seed {seed}: {who} lost seq {seq}: neither delivered nor reported unacknowledged"
        );
    }
    assert!(
        reported.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "seed {seed}: {who}'s report is not in order"
    );
}

fn run_seed(seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rails = rng.random_range(2..=3);
    let all_dead = rng.random_bool(0.1);
    let max_record = [64usize, 256, 1000][rng.random_range(0..3)];
    // A third of the seeds write every record on every rail; a quarter switch away from a
    // degraded rail before it fails (chosen by the seed alone, so each schedule stays its own).
    let mode = if seed % 3 == 1 {
        RailMode::HotHot
    } else {
        RailMode::ActiveStandby
    };
    let mut cfg = Config::builder()
        .rails(rails)
        .geometry(4096, 8, max_record)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .rearm_after(Duration::from_millis(10))
        .session_timeout(Duration::from_nanos(SESSION_TIMEOUT))
        .rearm_exchange_timeout(Duration::from_nanos(EXCHANGE_TIMEOUT))
        .link_params(LinkParams {
            timeout: 8,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .backing(railover_segq::Backing::Heap)
        .rail_mode(mode);
    if seed % 4 == 2 {
        // Half of those also count retransmissions (partial loss).
        let counted = if seed % 8 == 2 { 3 } else { 0 };
        cfg = cfg.gray_switch(
            GraySwitch::new(
                Duration::from_micros(300),
                Duration::from_millis(2),
                Duration::from_millis(20),
            )
            .retransmits_per_window(counted),
        );
    }
    let cfg = cfg.build().unwrap();
    let latency = rng.random_range(1..30) * 1000;
    // Half the seeds re-arm over the simulated control channel, as two processes do (the rest
    // in-process, which isolates the failover logic from the control plane's).
    let channel = rng.random_bool(0.5);
    let mut pair = if channel {
        let mut pair = SimPair::with_control_channel(cfg, seed, latency).unwrap();
        // Half of those hand re-arm results to the data path late, as a control thread does
        // (its results wait for the data thread's next progress; frames, faults and the peer
        // carry on meanwhile).
        if rng.random_bool(0.5) {
            pair.set_handover_lag(rng.random_range(100..3_000) * 1000);
        }
        pair
    } else {
        SimPair::new(cfg, seed, latency).unwrap()
    };
    let faults = schedule(&mut rng, rails, all_dead, channel);
    if std::env::var_os("RAILOVER_SEED").is_some() {
        println!("seed {seed}: {rails} rails, schedule {faults:?}");
    }
    let pauses = faults
        .iter()
        .filter(|(_, f)| matches!(f, Fault::Pause { .. }))
        .count() as u64;
    let session_may_end = faults
        .iter()
        .any(|(_, f)| matches!(f, Fault::Pause { duration, .. } if *duration > SESSION_TIMEOUT));
    let mut faults = faults.into_iter().peekable();
    let mut pending: Pending = Vec::new();
    let mut ab = Direction {
        sent: Vec::new(),
        delivered: 0,
    };
    let mut ba = Direction {
        sent: Vec::new(),
        delivered: 0,
    };
    let target = rng.random_range(100..600);
    let mut next_send = 0u64;
    let horizon = 3_000 * MS;
    let mut kept = false;
    loop {
        let now = pair.now();
        while faults.peek().is_some_and(|(t, _)| *t <= now) {
            let (_, f) = faults.next().unwrap();
            inject(&mut pair, f, &mut pending);
        }
        pending.sort_by_key(|(t, _)| *t);
        while pending.first().is_some_and(|(t, _)| *t <= now) {
            let (_, f) = pending.remove(0);
            f(&mut pair);
        }
        let (a_paused, b_paused) = (pair.is_paused(false), pair.is_paused(true));
        if now >= next_send {
            // (The draws happen either way, so a pause does not change the rest of the run.)
            let (na, nb) = (rng.random_range(1..20), rng.random_range(1..20));
            if ab.sent.len() < target && !a_paused {
                send_some(&mut pair.a, &mut ab, &mut rng, na, max_record);
            }
            if ba.sent.len() < target && !b_paused {
                send_some(&mut pair.b, &mut ba, &mut rng, nb, max_record);
            }
            next_send = now + rng.random_range(10..500) * 1000;
        }
        if !b_paused {
            receive(&mut pair.b, &mut ab, seed, "host 2");
        }
        if !a_paused {
            receive(&mut pair.a, &mut ba, seed, "host 1");
        }
        kept |= pair.a.core().keeps_records() || pair.b.core().keeps_records();
        let a_dead = pair.a.core().is_dead();
        let b_dead = pair.b.core().is_dead();
        let done_ab = ab.sent.len() >= target && ab.delivered == ab.sent.len();
        let done_ba = ba.sent.len() >= target && ba.delivered == ba.sent.len();
        // Redundancy restored: once the wires are back, every rail is up again on both sides,
        // and so is the re-arm channel (a rail failing later could come back).
        let restored = (0..rails).all(|r| {
            pair.a.core().rail_state(r) != RailState::Failed
                && pair.b.core().rail_state(r) != RailState::Failed
        }) && !pair.a.core().rearm_channel_down()
            && !pair.b.core().rearm_channel_down();
        let quiet = faults.peek().is_none() && pending.is_empty() && !a_paused && !b_paused;
        if (done_ab && done_ba && quiet && restored) || (a_dead && b_dead) {
            break;
        }
        assert!(
            now < horizon,
            "seed {seed}: stuck at {now} ns: a {}/{} b {}/{}, dead a={a_dead} b={b_dead}, redundancy restored={restored}\nhost 1: {}host 2: {}",
            ab.delivered,
            ab.sent.len(),
            ba.delivered,
            ba.sent.len(),
            pair.a.core().describe(),
            pair.b.core().describe()
        );
        let mut limit = next_send;
        if let Some((t, _)) = faults.peek() {
            limit = limit.min(*t);
        }
        if let Some(t) = pending.iter().map(|(t, _)| *t).min() {
            limit = limit.min(t);
        }
        pair.step(limit.max(now + 1));
    }
    let dead = pair.a.core().is_dead() || pair.b.core().is_dead();
    let mut timeouts = 0;
    if dead {
        let reasons = (pair.a.core().end_reason(), pair.b.core().end_reason());
        assert!(
            all_dead || session_may_end,
            "seed {seed}: the session ended ({reasons:?}) although a rail always remained and no pause outlasted the session timeout"
        );
        // Both sides surface the error, and each reports what the other did not get.
        assert!(
            pair.a.core().is_dead() && pair.b.core().is_dead(),
            "seed {seed}: only one side noticed"
        );
        if let (Some(EndReason::SessionTimeout), other) | (other, Some(EndReason::SessionTimeout)) =
            reasons
        {
            // The side that waited out the pause says why; the paused side hears it on resume.
            assert!(
                session_may_end,
                "seed {seed}: a session timeout without a long pause"
            );
            assert!(
                matches!(
                    other,
                    Some(EndReason::PeerEnded | EndReason::SessionTimeout)
                ),
                "seed {seed}: {reasons:?}"
            );
            timeouts += 1;
        } else {
            assert!(
                all_dead,
                "seed {seed}: ended {reasons:?} without every wire dead"
            );
        }
        assert!(pair.a.send(b"x").is_err());
        assert!(pair.b.poll(|_| {}).is_err());
        check_report(&pair.a, &ab, seed, "host 1");
        check_report(&pair.b, &ba, seed, "host 2");
    }
    let channel_rearms = pair.a.rearms_completed().unwrap_or(0);
    // The initiator counts an exchange when it sends READY, the acceptor when READY arrives: one
    // that arrives after the acceptor gave up is counted by the initiator alone (its rail then
    // fails and is re-armed again), never the other way round.
    assert!(
        pair.b.rearms_completed().unwrap_or(0) <= channel_rearms,
        "seed {seed}: the acceptor completed an exchange the initiator did not"
    );
    let (mut failovers, mut rearms, mut unresponsive, mut channel_restores) = (0, 0, 0, 0);
    let mut switches = 0;
    let dead = pair.a.core().is_dead();
    for (c, who) in [(&mut pair.a, "host 1"), (&mut pair.b, "host 2")] {
        let (mut lost, mut restored) = (0, 0);
        while let Some(e) = c.poll_event() {
            match e {
                Event::Failover { .. } => failovers += 1,
                Event::Switched { .. } => switches += 1,
                Event::RailUp { .. } => rearms += 1,
                Event::PeerUnresponsive { .. } => unresponsive += 1,
                Event::RearmChannelLost { .. } => lost += 1,
                Event::RearmChannelRestored { .. } => restored += 1,
                _ => {}
            }
        }
        // Every control channel that broke came back (and was said to).
        assert!(
            restored == lost || (dead && restored + 1 == lost),
            "seed {seed}: {who}: control channel lost {lost} times, restored {restored}"
        );
        channel_restores += restored;
    }
    Outcome {
        failovers,
        rearms,
        dead,
        delivered: ab.delivered + ba.delivered,
        pauses,
        unresponsive,
        timeouts,
        channel_rearms,
        channel_restores,
        switches,
        hot_hot: mode == RailMode::HotHot,
        kept,
    }
}

#[test]
fn seeded_fault_schedules_never_lose_duplicate_or_reorder() {
    if let Ok(seed) = std::env::var("RAILOVER_SEED") {
        let seed: u64 = seed.parse().expect("RAILOVER_SEED is a number");
        // RUST_LOG=railover=info shows what each side decided, with virtual time in the fields.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let o = run_seed(seed);
        println!(
            "seed {seed}: {} delivered, {} failovers, {} re-arms, dead={}",
            o.delivered, o.failovers, o.rearms, o.dead
        );
        return;
    }
    let seeds: u64 = std::env::var("RAILOVER_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let (mut failovers, mut rearms, mut dead, mut delivered) = (0, 0, 0, 0);
    let (mut pauses, mut unresponsive, mut timeouts, mut channel_rearms) = (0, 0, 0, 0);
    let (mut channel_restores, mut switches, mut hot_hot_seeds, mut kept_seeds) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let o = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|_| {
            panic!("seed {seed} failed; replay: RAILOVER_SEED={seed} cargo test -p railover --test simulation -- --nocapture")
        });
        failovers += o.failovers;
        rearms += o.rearms;
        dead += (o.dead && o.timeouts == 0) as u64;
        delivered += o.delivered;
        pauses += o.pauses;
        unresponsive += o.unresponsive;
        timeouts += o.timeouts;
        channel_rearms += o.channel_rearms;
        channel_restores += o.channel_restores;
        switches += o.switches;
        hot_hot_seeds += o.hot_hot as u64;
        kept_seeds += o.kept as u64;
    }
    println!("{seeds} seeds: {delivered} messages delivered, {failovers} failovers, {rearms} re-arms, {dead} all-rails-dead endings, {pauses} peer pauses ({unresponsive} seen as unresponsive, {timeouts} session timeouts), {channel_rearms} re-arms over the control channel, {channel_restores} control channels re-established, {hot_hot_seeds} hot-hot seeds ({kept_seeds} with a failover keeping records a full standby had no room for), {switches} planned switches away from a degraded rail");
    assert!(
        seeds < 50 || switches > seeds / 100,
        "too few planned switches ({switches}) for {seeds} seeds"
    );
    // The schedules must actually exercise failover and the all-dead path.
    assert!(
        failovers > seeds / 2,
        "too few failovers ({failovers}) for {seeds} seeds"
    );
    assert!(
        seeds < 50 || dead > 0,
        "no all-rails-dead ending in {seeds} seeds"
    );
    assert!(
        seeds < 50 || rearms > seeds / 2,
        "too few re-arms ({rearms}) for {seeds} seeds"
    );
    assert!(
        seeds < 50 || channel_rearms > seeds / 4,
        "too few re-arms over the control channel ({channel_rearms}) for {seeds} seeds"
    );
    assert!(
        seeds < 50 || channel_restores > seeds / 50,
        "too few control channels re-established ({channel_restores}) for {seeds} seeds"
    );
    assert!(
        seeds < 50 || (unresponsive > 0 && timeouts > 0),
        "pauses exercised neither unresponsiveness ({unresponsive}) nor the session timeout ({timeouts})"
    );
}

#[test]
fn same_seed_replays_exactly() {
    let a = run_seed(4242);
    let b = run_seed(4242);
    assert_eq!(
        (a.failovers, a.rearms, a.dead, a.delivered),
        (b.failovers, b.rearms, b.dead, b.delivered)
    );
}

/// A paused peer is not a fault: pauses alone (1 ms to 150 ms, the session timeout is 200 ms)
/// fail no rail over, lose nothing, and every pause past the heartbeat timeout is reported as
/// the peer unresponsive, then responsive again, with traffic resuming by itself.
#[test]
fn peer_pauses_alone_fail_nothing_over_and_resume_by_themselves() {
    for seed in 0..200u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cfg = Config::builder()
            .rails(2)
            .geometry(4096, 8, 256)
            .heartbeat_interval(Duration::from_millis(1))
            .heartbeat_misses(3)
            .session_timeout(Duration::from_nanos(SESSION_TIMEOUT))
            .backing(railover_segq::Backing::Heap)
            .build()
            .unwrap();
        let mut pair = SimPair::new(cfg, seed, 5_000).unwrap();
        let mut ab = Direction {
            sent: Vec::new(),
            delivered: 0,
        };
        let mut ba = Direction {
            sent: Vec::new(),
            delivered: 0,
        };
        let mut long_pauses = 0;
        let mut next_pause = 5 * MS;
        let mut pauses_left = 3;
        let mut spike: Option<u64> = None;
        let mut next_send = 0;
        let horizon = 2_000 * MS;
        loop {
            let now = pair.now();
            if pauses_left > 0
                && now >= next_pause
                && !pair.is_paused(false)
                && !pair.is_paused(true)
            {
                // Half the pauses come while one wire is slower than the other. Either a little
                // (well within the heartbeat timeout): the paused host's rails then fall silent
                // up to ~1.5 ms apart at the other end, as on real machines, and the first one
                // silent must not be taken for a dead wire. The spike starts 2 ms before the
                // pause, so the paused host's last blocks travel through it. Or a lot, for its
                // last two beats only: a send queue's backlog (data posted before the beats)
                // delivers them past the heartbeat timeout, after the other rail fell silent;
                // late arrivals of beats the other rail already carried must not condemn it.
                if spike.is_none() && rng.random_bool(0.5) {
                    let wire = pair.wires[rng.random_range(0..2)];
                    let (extra, lasting, lead) = if rng.random_bool(0.5) {
                        (rng.random_range(100..1_500) * 1000, 10 * MS, 2 * MS)
                    } else {
                        (rng.random_range(3_200..8_000) * 1000, 1_500_000, 1_500_000)
                    };
                    pair.fabric.latency_spike(wire, extra, lasting);
                    spike = Some(extra);
                    next_pause = now + lead;
                    pair.step(next_send.min(next_pause).max(now + 1));
                    continue;
                }
                // A pause outlasts a spike before it, so the spiked beats are in when it ends.
                let shortest = spike.take().map_or(1_000, |extra| extra / 1000 + 5_000);
                let duration = rng.random_range(shortest..150_000) * 1000;
                // Past the heartbeat timeout plus a beat, the peer must notice.
                long_pauses += (duration > 5 * MS) as u32;
                pair.pause(rng.random_bool(0.5), now + duration);
                pauses_left -= 1;
                next_pause = now + duration + rng.random_range(5..30) * MS;
            }
            let (a_paused, b_paused) = (pair.is_paused(false), pair.is_paused(true));
            if now >= next_send {
                if !a_paused && ab.sent.len() < 400 {
                    send_some(&mut pair.a, &mut ab, &mut rng, 8, 256);
                }
                if !b_paused && ba.sent.len() < 400 {
                    send_some(&mut pair.b, &mut ba, &mut rng, 8, 256);
                }
                next_send = now + 200_000;
            }
            if !b_paused {
                receive(&mut pair.b, &mut ab, seed, "host 2");
            }
            if !a_paused {
                receive(&mut pair.a, &mut ba, seed, "host 1");
            }
            let done = ab.sent.len() >= 400
                && ba.sent.len() >= 400
                && ab.delivered == ab.sent.len()
                && ba.delivered == ba.sent.len();
            let heard = !pair.a.core().peer_unresponsive() && !pair.b.core().peer_unresponsive();
            if done && pauses_left == 0 && !a_paused && !b_paused && heard {
                break;
            }
            assert!(now < horizon, "seed {seed}: stuck at {now}");
            pair.step(next_send.min(next_pause).max(now + 1));
        }
        let (mut unresponsive, mut responsive) = (0, 0);
        for c in [&mut pair.a, &mut pair.b] {
            assert!(
                !c.core().is_dead(),
                "seed {seed}: a pause ended the session"
            );
            while let Some(e) = c.poll_event() {
                match e {
                    Event::PeerUnresponsive { .. } => unresponsive += 1,
                    Event::PeerResponsive { .. } => responsive += 1,
                    Event::RailDown { .. } | Event::Failover { .. } => {
                        panic!("seed {seed}: a pause was taken for a fault: {e:?}")
                    }
                    _ => {}
                }
            }
        }
        assert!(
            unresponsive >= long_pauses && unresponsive == responsive,
            "seed {seed}: {long_pauses} long pauses, {unresponsive} unresponsive, {responsive} responsive"
        );
    }
}
