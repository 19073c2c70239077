//! Benchmarks on the deterministic simulated fabric. Times are virtual (the fabric's clock), so
//! they measure railover's protocol (detection, failover, resend), not this machine's noise;
//! `cpu_ns_*` figures are wall-clock cost of the software path on this host.

use std::time::Duration;
use std::time::Instant;

use railover::core::Event;
use railover::sim::SimPair;
use railover::{Config, RailMode};
use railover_rdma::LinkParams;
use serde::Serialize;

use crate::stats::{histogram, summarize_us, Summary};

pub const KINDS: [&str; 6] = [
    "carrier-loss",
    "black-hole",
    "ack-loss",
    "card-removal",
    "corruption",
    "lossy",
];

pub fn config(max_record: usize) -> Config {
    config_in(max_record, RailMode::ActiveStandby)
}

pub fn config_in(max_record: usize, mode: RailMode) -> Config {
    Config::builder()
        .rail_mode(mode)
        .rails(2)
        .geometry(64 * 1024, 16, max_record.max(64))
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .rearm_after(Duration::from_millis(20))
        .link_params(LinkParams {
            timeout: 10,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .build()
        .expect("valid config")
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub kind: String,
    /// "active-standby" or "hot-hot".
    pub mode: String,
    pub reps: usize,
    pub heartbeat_interval_us: f64,
    /// Fault injected -> sender failed over.
    pub detection: Summary,
    /// Failover -> first record delivered over the standby.
    pub blackout: Summary,
    /// Largest gap between deliveries around the fault (what the application sees).
    pub delivery_gap: Summary,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub records_resent: u64,
    pub duplicates_discarded: u64,
    /// Bytes of data writes host 1 posted (every rail), per message: the wire cost of the mode.
    pub wire_bytes_per_message: f64,
    /// First repetition: (send time ms, one-way latency us) per record, for the timeline plot.
    #[serde(skip)]
    pub timeline: Vec<(f64, f64)>,
    #[serde(skip)]
    pub fault_at_ms: f64,
}

/// Undoes an injected fault.
type Restore = Box<dyn Fn(&SimPair)>;

/// Injects `kind` on `rail`'s wire; returns what restores it.
fn inject(pair: &SimPair, kind: &str, rail: usize) -> Restore {
    let w = pair.wires[rail];
    let f = &pair.fabric;
    match kind {
        "carrier-loss" => {
            f.carrier_loss(w);
            Box::new(move |p| p.fabric.carrier_restore(w))
        }
        "black-hole" => {
            f.black_hole(w);
            Box::new(move |p| p.fabric.clear_black_hole(w))
        }
        "ack-loss" => {
            f.ack_loss(w);
            Box::new(move |p| p.fabric.clear_black_hole(w))
        }
        "card-removal" => {
            let card = pair.cards[rail].1.clone();
            f.remove_card(&card);
            Box::new(move |p| p.fabric.restore_card(&card))
        }
        "corruption" => {
            f.corrupt_next(w, 1);
            Box::new(|_| {})
        }
        // A fifth of the writes arrive after a 3 ms RC retransmission, for 10 ms (not a failure:
        // active-standby keeps the rail unless the gray switch is on).
        "lossy" => {
            f.lossy(w, 200, 3_000_000, 10_000_000);
            Box::new(|_| {})
        }
        other => panic!("unknown fault kind {other}"),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn failover(
    kind: &str,
    mode: RailMode,
    reps: usize,
    interval_ns: u64,
    latency_ns: u64,
    seed: u64,
    size: usize,
) -> FailoverReport {
    let cfg = config_in(size, mode);
    let mut wire_bytes = 0u64;
    let (mut det, mut blk, mut gap) = (histogram(), histogram(), histogram());
    let (mut messages, mut lost, mut duplicated, mut reordered, mut resent, mut dups) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut timeline = Vec::new();
    let mut fault_at_ms = 0.0;
    for rep in 0..reps {
        let mut pair =
            SimPair::new(cfg, seed.wrapping_add(rep as u64), latency_ns).expect("sim pair");
        let mut sent_at: Vec<u64> = Vec::new();
        let mut next_expected = 1u64;
        let t_fault = 5_000_000 + (rep as u64 * 7919) % 1_000_000;
        let t_restore = t_fault + 10_000_000;
        let t_end = t_fault + 40_000_000;
        let (mut faulted, mut restored) = (false, false);
        let mut restore: Option<Restore> = None;
        let (mut failover_at, mut first_after) = (None::<u64>, None::<u64>);
        let mut last_delivery = 0u64;
        let mut max_gap = 0u64;
        let mut next_send = 0u64;
        let mut payload = vec![0x5au8; size.max(8)];
        let (mut rep_dup, mut rep_reord) = (0u64, 0u64);
        loop {
            let now = pair.now();
            if !faulted && now >= t_fault {
                restore = Some(inject(&pair, kind, pair.a.core().active_rail()));
                faulted = true;
            }
            if faulted && !restored && now >= t_restore {
                if let Some(r) = restore.take() {
                    r(&pair);
                }
                restored = true;
            }
            // Rate-driven with coordinated omission handled: messages are due on a fixed schedule;
            // one that back-pressure delays is retried, not skipped, and its latency counts from
            // when it was due (sent_at holds the intended send time).
            while now >= next_send && next_send < t_end {
                payload[..8].copy_from_slice(&(sent_at.len() as u64 + 1).to_le_bytes());
                if pair.a.send(&payload).is_err() {
                    break;
                }
                sent_at.push(next_send);
                next_send += interval_ns;
            }
            let _ = pair.b.poll(|m| {
                // Every message carries its sequence number: classify what the transport delivered.
                let seq = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
                if seq < next_expected {
                    rep_dup += 1;
                    return;
                }
                if seq > next_expected {
                    rep_reord += 1;
                }
                next_expected = seq + 1;
                let Some(&at) = sent_at.get((seq - 1) as usize) else {
                    return;
                };
                let lat = now - at;
                if rep == 0 {
                    timeline.push((at as f64 / 1e6, lat as f64 / 1e3));
                }
                if now > t_fault.saturating_sub(1_000_000) && last_delivery > 0 {
                    max_gap = max_gap.max(now - last_delivery);
                }
                last_delivery = now;
                if failover_at.is_some() && first_after.is_none() {
                    first_after = Some(now);
                }
            });
            let _ = pair.a.poll(|_| {});
            while let Some(e) = pair.a.poll_event() {
                if let Event::Failover { at, .. } = e {
                    failover_at.get_or_insert(at);
                }
            }
            if next_send >= t_end && next_expected as usize > sent_at.len() {
                break;
            }
            if now > t_end + 2_000_000_000 {
                break; // never reached with a correct transport: counted as lost below
            }
            let limit = if now < t_end {
                next_send
            } else {
                now + 1_000_000
            };
            let limit = if faulted { limit } else { limit.min(t_fault) };
            pair.step(limit.max(now + 1));
        }
        messages += sent_at.len() as u64;
        // Skipped-over sequence numbers are lost unless they showed up later (as "reordered").
        lost += (sent_at.len() as u64).saturating_sub(next_expected - 1);
        duplicated += rep_dup;
        reordered += rep_reord;
        let s = pair.a.stats();
        resent += s.records_resent;
        wire_bytes += s.data_bytes;
        dups += pair.b.stats().duplicates_discarded;
        if let Some(fa) = failover_at {
            det.record(fa.saturating_sub(t_fault).max(1)).ok();
            if let Some(fd) = first_after {
                blk.record(fd.saturating_sub(fa).max(1)).ok();
            }
        }
        gap.record(max_gap.max(1)).ok();
        if rep == 0 {
            fault_at_ms = t_fault as f64 / 1e6;
        }
    }
    FailoverReport {
        kind: kind.to_string(),
        mode: mode_name(mode).to_string(),
        wire_bytes_per_message: wire_bytes as f64 / messages.max(1) as f64,
        reps,
        heartbeat_interval_us: cfg.heartbeat_interval_ns() as f64 / 1e3,
        detection: summarize_us(&det),
        blackout: summarize_us(&blk),
        delivery_gap: summarize_us(&gap),
        messages,
        lost,
        duplicated,
        reordered,
        records_resent: resent,
        duplicates_discarded: dups,
        timeline,
        fault_at_ms,
    }
}

pub fn mode_name(mode: RailMode) -> &'static str {
    match mode {
        RailMode::HotHot => "hot-hot",
        _ => "active-standby",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PingPongReport {
    pub size: usize,
    pub iterations: usize,
    /// Round trip in the fabric's virtual time (its latency model plus protocol steps).
    pub virtual_rtt: Summary,
    /// Host CPU time per round trip (both endpoints' software path plus the simulator).
    pub cpu_rtt: Summary,
    /// `poll` calls per round trip, both hosts (2 when each host's first poll after an arrival
    /// finds the record; with `step_both_hosts`, the harness's `progress` calls too).
    pub polls_per_round_trip: f64,
}

/// Polls host 1 of an idle pair `count` times (nothing sent, the virtual clock stands still, so
/// no timer falls due either): returns the records found (0).
pub fn idle_polls(count: usize) -> usize {
    let mut pair = SimPair::new(config(64), 1, 2_000).expect("sim pair");
    (0..count).map(|_| pair.a.poll(|_| {}).expect("poll")).sum()
}

/// The same for host 1's [`railover::Endpoint`] with `connections` idle connections (each
/// `Endpoint::poll` polls the cards' shared completion queues and every connection).
pub fn endpoint_idle_polls(count: usize, connections: usize) -> usize {
    let mut eps = railover::sim::SimEndpoints::new(config(64), 1, 2_000).expect("sim endpoints");
    for _ in 0..connections {
        eps.connect().expect("connect");
    }
    // Both sides past their greetings, so that what is left is the steady state.
    let until = eps.now() + 50_000_000;
    while eps.now() < until {
        eps.step(until);
    }
    (0..count).map(|_| eps.a.poll(|_, _, _| {})).sum()
}

/// Reads a [`railover::runtime::RealClock`] `count` times (as `progress` does once per poll on verbs): returns the
/// last time read and how many reads asked the OS.
pub fn clock_reads(count: usize) -> (u64, u64) {
    use railover::runtime::{Clock, RealClock};
    let clock = RealClock::default();
    let last = (0..count).fold(0, |_, _| std::hint::black_box(&clock).now());
    (last, clock.os_reads())
}

/// `timed: false` leaves out the benchmark's own timing of each round trip (two clock reads and
/// two histogram records, ~300 instructions): for an instruction counter, which should count
/// railover's work only (`bench/instructions.sh`).
pub fn pingpong(
    size: usize,
    iterations: usize,
    warmup: usize,
    latency_ns: u64,
    timed: bool,
    step_both_hosts: bool,
) -> PingPongReport {
    let mut pair = SimPair::new(config(size), 1, latency_ns).expect("sim pair");
    let msg = vec![7u8; size];
    let (mut vh, mut ch) = (histogram(), histogram());
    let mut polls = 0u64;
    for i in 0..warmup + iterations {
        let (t0, w0) = (pair.now(), timed.then(Instant::now));
        pair.a.send(&msg).expect("send");
        polls += half_round_trip(&mut pair, true, step_both_hosts);
        pair.b.send(&msg).expect("echo");
        polls += half_round_trip(&mut pair, false, step_both_hosts);
        if let Some(w0) = w0.filter(|_| i >= warmup) {
            vh.record((pair.now() - t0).max(1)).ok();
            ch.record((w0.elapsed().as_nanos() as u64).max(1)).ok();
        }
    }
    PingPongReport {
        size,
        iterations,
        virtual_rtt: summarize_us(&vh),
        cpu_rtt: summarize_us(&ch),
        polls_per_round_trip: polls as f64 / (warmup + iterations).max(1) as f64,
    }
}

/// Moves virtual time until the host that waits (host 2 if `to_host2`) delivers the record sent
/// to it; returns how many `poll` calls both hosts made. Each host makes progress only in its own
/// `poll`, as two busy-polling processes do: time moves to the fabric's next event, then the
/// waiting host polls, and the sender too when that poll found nothing (the event was the
/// sender's). A host's timers (heartbeats, the look at its quiet rails) fire in its first poll
/// after them, as in a process that spins on `poll`; the spinning's empty polls are counted
/// apart (`idle-poll`).
/// `step_both_hosts`: the loop before session 18, which moved time to the next fabric event or
/// host timer, made progress on both hosts and then polled the waiting one (all counted).
fn half_round_trip(pair: &mut SimPair, to_host2: bool, step_both_hosts: bool) -> u64 {
    let mut polls = 0;
    if step_both_hosts {
        loop {
            pair.step(pair.now() + 1_000_000);
            let waiting = if to_host2 { &mut pair.b } else { &mut pair.a };
            polls += 3;
            if waiting.poll(|_| {}).expect("poll") > 0 {
                return polls;
            }
        }
    }
    loop {
        pair.advance_to_fabric_event(pair.now() + 1_000_000);
        let (waiting, sender) = if to_host2 {
            (&mut pair.b, &mut pair.a)
        } else {
            (&mut pair.a, &mut pair.b)
        };
        polls += 1;
        if waiting.poll(|_| {}).expect("poll") > 0 {
            return polls;
        }
        polls += 1;
        sender.poll(|_| {}).expect("poll");
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    pub size: usize,
    pub messages: u64,
    pub virtual_msgs_per_s: f64,
    pub cpu_msgs_per_s: f64,
    pub rdma_writes: u64,
    pub messages_per_write: f64,
    /// Host 1's writes (data and control) per write completion it handled (selective signaling).
    pub writes_per_completion: f64,
}

/// Host 1 sends `count` messages of `size` bytes as fast as its ring takes them, alone or in
/// batches of `batch` (`send_batch`), while host 2 delivers them.
pub fn throughput(size: usize, count: u64, latency_ns: u64, batch: usize) -> ThroughputReport {
    let mut pair = SimPair::new(config(size), 2, latency_ns).expect("sim pair");
    let msg = vec![1u8; size];
    let msgs = vec![&msg[..]; batch.max(1)];
    let (mut sent, mut got) = (0u64, 0u64);
    let (t0, w0) = (pair.now(), Instant::now());
    while got < count {
        loop {
            let n = (count - sent).min(msgs.len() as u64) as usize;
            let ok = match n {
                0 => false,
                1 => pair.a.send(&msg).is_ok(),
                _ => pair.a.send_batch(&msgs[..n]).is_ok(),
            };
            if !ok {
                break;
            }
            sent += n as u64;
        }
        pair.step(pair.now() + 1_000_000);
        got += pair.b.poll(|_| {}).expect("poll") as u64;
    }
    let vt = (pair.now() - t0) as f64 / 1e9;
    let wt = w0.elapsed().as_secs_f64();
    let writes = pair.fabric.stats().writes_delivered;
    let a = pair.a.stats();
    ThroughputReport {
        size,
        messages: count,
        virtual_msgs_per_s: count as f64 / vt,
        cpu_msgs_per_s: count as f64 / wt,
        rdma_writes: writes,
        messages_per_write: count as f64 / writes.max(1) as f64,
        writes_per_completion: (a.data_writes + a.control_writes) as f64
            / a.write_completions.max(1) as f64,
    }
}

/// Resident memory of this process (kB, from /proc/self/status), or 0 where there is none.
fn resident_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `railover-bench endpoint-setup`: makes `n` connections between two endpoints (simulated
/// fabric, the default 2-rail geometry of 16 x 64 KiB segments) and prints the set-up time and
/// the memory each connection costs: resident memory grown (both hosts' sides, all rails,
/// divided by `n`; ring pages count once they are touched) and the ring memory it registers.
pub fn endpoint_setup(n: usize) {
    use railover::endpoint::SimEndpoints;
    let cfg = config(64);
    let g = cfg.geometry();
    // Per rail and host: the send ring and the peer's mirror of it.
    let ring_bytes = 2 * g.segment_size() * g.segment_count();
    let registered_per_side = ring_bytes * cfg.rails();
    let mut hosts = SimEndpoints::new(cfg, 1, 2_000).expect("endpoints");
    let rss_before = resident_kb();
    let started = Instant::now();
    let mut first = None;
    for i in 0..n.max(1) {
        let t = Instant::now();
        hosts.connect().expect("connect");
        if i == 0 {
            first = Some(t.elapsed());
        }
    }
    let setup = started.elapsed();
    // Every connection writes one record both ways: its rings are in use.
    for &(x, y) in &hosts.pairs.clone() {
        hosts.a.send(x, &[1u8; 64]).expect("send");
        hosts.b.send(y, &[2u8; 64]).expect("send");
    }
    let mut delivered = 0;
    while delivered < 2 * n {
        hosts.step(u64::MAX);
        delivered += hosts.a.poll(|_, _, _| {}) + hosts.b.poll(|_, _, _| {});
    }
    let rss_after = resident_kb();
    println!(
        "connections: {n} (x {} rails, both hosts in this process)",
        cfg.rails()
    );
    println!(
        "set-up per connection: {:.1} us (first {:.1} us; both hosts' sides)",
        setup.as_secs_f64() * 1e6 / n as f64,
        first.unwrap_or_default().as_secs_f64() * 1e6
    );
    println!(
        "registered ring memory per connection and host: {} KiB ({} rails x send ring + mirror of {} x {} KiB)",
        registered_per_side / 1024,
        cfg.rails(),
        g.segment_count(),
        g.segment_size() / 1024
    );
    println!(
        "resident memory grown per connection (both hosts): {} KiB",
        rss_after.saturating_sub(rss_before) / n as u64
    );
    // Control writes (heartbeats, acknowledgements, credits) per second of virtual time, summed
    // over host 1's connections: idle, then with a record every millisecond on each connection
    // from host 1 (host 2 only acknowledges). First 50 ms to settle: the acknowledgements of the
    // records above (one write per rail and connection) are not the steady state.
    let settled = hosts.now() + 50_000_000;
    while hosts.now() < settled {
        hosts.step(settled);
        hosts.a.poll(|_, _, _| {});
        hosts.b.poll(|_, _, _| {});
    }
    for streaming in [false, true] {
        let control = |h: &SimEndpoints| -> u64 {
            h.pairs
                .iter()
                .filter_map(|&(x, _)| h.a.stats(x))
                .map(|s| s.control_writes)
                .sum()
        };
        let (start, before) = (hosts.now(), control(&hosts));
        let window = 100_000_000;
        let mut next_record = start;
        while hosts.now() < start + window {
            if streaming && hosts.now() >= next_record {
                next_record += 1_000_000;
                for &(x, _) in &hosts.pairs.clone() {
                    hosts.a.send(x, &[3u8; 64]).expect("send");
                }
            }
            let limit = if streaming {
                next_record
            } else {
                start + window
            };
            hosts.step(limit.min(start + window));
            hosts.a.poll(|_, _, _| {});
            hosts.b.poll(|_, _, _| {});
        }
        let per_second = (control(&hosts) - before) * 1_000_000_000 / window;
        println!(
            "host 1's control writes per second, {}: {per_second} ({:.0} per connection)",
            if streaming {
                "a record per ms on every connection"
            } else {
                "idle"
            },
            per_second as f64 / n as f64
        );
    }
}
