//! Benchmarks on real RDMA devices: host 1 and host 2 connections in one process, each busy-polled
//! by its own thread (as perftest does), connected by the TCP handshake over loopback.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use railover::verbs::{accept, connect, VerbsConnection};
use railover::{Config, RailMode, SendError};
use railover_rdma::LinkParams;
use serde_json::json;

use crate::stats::{histogram, print_table, summarize_us};

/// Heartbeat 1 ms; 30 missed beats by default (RAILOVER_HB_MISSES to change) because under qemu TCG
/// two busy-polling threads on two emulated CPUs delay rxe's kernel work by many ms (real NICs: 3).
/// RC timeout 13 (~67 ms budget): a new rxe connection's first write takes 3-22 ms.
fn config_in(size: usize, mode: RailMode) -> Config {
    Config::builder()
        .rail_mode(mode)
        .rails(2)
        .geometry(64 * 1024, 16, size.max(64))
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(
            std::env::var("RAILOVER_HB_MISSES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(30),
        )
        .link_params(LinkParams {
            timeout: 13,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .first_contact_grace(Duration::from_secs(2))
        .build()
        .expect("valid config")
}

fn pair(size: usize, host1: &[String], host2: &[String]) -> (VerbsConnection, VerbsConnection) {
    pair_in(size, RailMode::ActiveStandby, host1, host2)
}

fn pair_in(
    size: usize,
    mode: RailMode,
    host1: &[String],
    host2: &[String],
) -> (VerbsConnection, VerbsConnection) {
    let config = move |size| config_in(size, mode);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    let h2: Vec<String> = host2.to_vec();
    let t = std::thread::spawn(move || {
        let devs: Vec<&str> = h2.iter().map(|s| s.as_str()).collect();
        accept(config(size), &devs, &listener, Duration::from_secs(60)).expect("host 2 accept")
    });
    let devs: Vec<&str> = host1.iter().map(|s| s.as_str()).collect();
    let a = connect(config(size), &devs, addr, Duration::from_secs(60)).expect("host 1 connect");
    (a, t.join().expect("host 2 thread"))
}

/// Sends `m`, letting the connection progress while its ring is full.
pub(crate) fn send_retry(c: &mut VerbsConnection, m: &[u8]) {
    loop {
        match c.send(m) {
            Ok(_) => return,
            Err(SendError::Backpressure) => c.progress(),
            Err(e) => panic!("send: {e}"),
        }
    }
}

pub fn pingpong(
    size: usize,
    iterations: usize,
    warmup: usize,
    host1: &[String],
    host2: &[String],
    as_json: bool,
    plot_dir: Option<&str>,
) {
    let (mut a, mut b) = pair(size, host1, host2);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let msg = vec![0u8; size];
        // Relaxed: a stop flag, no data published through it.
        while !stop2.load(Ordering::Relaxed) {
            let n = b.poll(|_| {}).expect("host 2 poll");
            for _ in 0..n {
                send_retry(&mut b, &msg);
            }
        }
    });
    let msg = vec![1u8; size];
    let mut h = histogram();
    for i in 0..warmup + iterations {
        let t0 = Instant::now();
        send_retry(&mut a, &msg);
        while a.poll(|_| {}).expect("host 1 poll") == 0 {}
        if i >= warmup {
            h.record((t0.elapsed().as_nanos() as u64).max(1)).ok();
        }
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    let s = summarize_us(&h);
    if as_json {
        println!(
            "{}",
            json!({"fabric": "verbs", "pingpong": {"size": size, "iterations": iterations, "rtt": s}})
        );
    } else {
        print_table(
            &format!(
                "ping-pong, verbs {:?} <-> {:?}, {size} B, {iterations} iterations",
                host1, host2
            ),
            &[("RTT".into(), s.clone())],
        );
    }
    if let Some(dir) = plot_dir {
        let path = format!("{dir}/pingpong-verbs.svg");
        crate::plot::percentiles(
            &path,
            "railover ping-pong RTT (verbs)",
            &[("rtt".into(), s)],
        )
        .expect("plot");
        eprintln!("wrote {path}");
    }
}

pub fn throughput(size: usize, count: u64, host1: &[String], host2: &[String], as_json: bool) {
    let (mut a, mut b) = pair(size, host1, host2);
    let rx = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut t0 = None;
        while got < count {
            let n = b.poll(|_| {}).expect("host 2 poll") as u64;
            if n > 0 && t0.is_none() {
                t0 = Some(Instant::now());
            }
            got += n;
        }
        t0.map_or(0.0, |t| t.elapsed().as_secs_f64())
    });
    let msg = vec![2u8; size];
    for _ in 0..count {
        send_retry(&mut a, &msg);
    }
    let secs = rx.join().expect("receiver");
    let rate = count as f64 / secs.max(1e-9);
    let stats = a.stats();
    let per_write = count as f64 / stats.data_writes.max(1) as f64;
    if as_json {
        println!(
            "{}",
            json!({"fabric": "verbs", "throughput": {"size": size, "messages": count, "msgs_per_s": rate,
                "data_writes": stats.data_writes, "control_writes": stats.control_writes,
                "messages_per_data_write": per_write}})
        );
    } else {
        println!(
            "throughput, verbs {host1:?} -> {host2:?}, {size} B x {count}: {rate:.0} msgs/s; {} data writes ({per_write:.1} messages each), {} control writes",
            stats.data_writes, stats.control_writes
        );
    }
    // Keep host 1 alive until the receiver finished (its rings hold unacknowledged data).
    drop(a);
}

/// Fault kinds the SoftRoCE harness can inject: (name, `ci/fault` op, op that clears it).
pub const FAULTS: [(&str, &str, &str); 3] = [
    ("carrier-loss", "carrier-loss", "carrier-restore"),
    ("black-hole", "blackhole", "blackhole-clear"),
    ("corruption", "corrupt", "corrupt-clear"),
];

const WIRES: [&str; 2] = ["a", "b"];

/// One stream from host 1 to host 2 (both driven by this thread, as two hosts would each drive
/// their own), every delivery checked by the sequence number in its payload.
struct Stream {
    a: VerbsConnection,
    b: VerbsConnection,
    size: usize,
    sending: bool,
    sent: u64,
    delivered: u64,
    duplicated: u64,
    reordered: u64,
    last_delivery: Instant,
    longest_gap: Duration,
}

impl Stream {
    /// Sends one message (if the ring has room) and lets both hosts progress and deliver.
    fn step(&mut self) {
        let mut m = vec![0u8; self.size.max(8)];
        m[..8].copy_from_slice(&(self.sent + 1).to_le_bytes());
        if self.sending && self.a.send(&m).is_ok() {
            self.sent += 1;
        }
        let (mut got, mut dup, mut reord) = (self.delivered, 0, 0);
        let now = Instant::now();
        let n = self
            .b
            .poll(|m| {
                let seq = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
                if seq <= got {
                    dup += 1;
                } else if seq != got + 1 {
                    reord += 1;
                    got = seq;
                } else {
                    got = seq;
                }
            })
            .unwrap_or(0);
        if n > 0 {
            self.longest_gap = self.longest_gap.max(now - self.last_delivery);
            self.last_delivery = now;
        }
        (self.delivered, self.duplicated, self.reordered) =
            (got, self.duplicated + dup, self.reordered + reord);
        self.a.progress();
    }

    fn healthy(&self) -> bool {
        (0..2).all(|r| {
            [&self.a, &self.b].iter().all(|c| {
                c.core().rail_state(r) != railover::RailState::Failed && c.core().rail_proven(r)
            })
        })
    }

    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.step();
        }
    }

    fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&Stream) -> bool) {
        let end = Instant::now() + limit;
        while !done(self) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}\nhost 1: {}host 2: {}",
                self.a.core().describe(),
                self.b.core().describe()
            );
            self.step();
        }
    }
}

fn fault(script: &str, op: &str, wire: &str) -> std::process::Child {
    std::process::Command::new(script)
        .args([op, wire])
        .spawn()
        .unwrap_or_else(|e| {
            panic!("running {script} {op} {wire}: {e} (run inside the SoftRoCE VM)")
        })
}

/// Injects `kind` on the active wire `reps` times mid-stream (clearing it and letting the rail
/// re-arm over the TCP stream between repetitions); reports detection and blackout in real time.
pub fn failover(
    kind: &str,
    mode: RailMode,
    reps: usize,
    size: usize,
    host1: &[String],
    host2: &[String],
    fault_script: &str,
) -> crate::sim_runs::FailoverReport {
    let (_, inject, clear) = *FAULTS
        .iter()
        .find(|f| f.0 == kind)
        .unwrap_or_else(|| panic!("fault kind {kind} can't be injected on rxe"));
    let (a, b) = pair_in(size, mode, host1, host2);
    let mut s = Stream {
        a,
        b,
        size,
        sending: true,
        sent: 0,
        delivered: 0,
        duplicated: 0,
        reordered: 0,
        last_delivery: Instant::now(),
        longest_gap: Duration::ZERO,
    };
    let (mut detection, mut blackout, mut gaps) = (histogram(), histogram(), histogram());
    s.until("warm-up", Duration::from_secs(60), |s| s.healthy());
    for rep in 0..reps {
        let failovers_before = s.a.stats().failovers;
        s.run_for(Duration::from_millis(50));
        s.longest_gap = Duration::ZERO;
        let wire = WIRES[s.a.core().active_rail()];
        let at = Instant::now();
        let mut child = fault(fault_script, inject, wire);
        let (mut detected, mut complete) = (None, None);
        let end = Instant::now() + Duration::from_secs(20);
        while complete.is_none() && Instant::now() < end {
            s.step();
            while let Some(e) = s.a.poll_event() {
                match e {
                    railover::Event::Failover { .. } => detected = Some(at.elapsed()),
                    railover::Event::FailoverComplete { blackout_ns, .. } => {
                        complete = Some(blackout_ns)
                    }
                    _ => {}
                }
            }
        }
        assert!(
            child.wait().map(|st| st.success()).unwrap_or(false),
            "{inject} failed"
        );
        s.run_for(Duration::from_millis(100));
        if let (Some(d), Some(bl)) = (detected, complete) {
            detection.record(d.as_nanos().max(1) as u64).ok();
            blackout.record(bl.max(1)).ok();
            gaps.record(s.longest_gap.as_nanos().max(1) as u64).ok();
        }
        let mut child = fault(fault_script, clear, wire);
        while child.try_wait().ok().flatten().is_none() {
            s.step();
        }
        s.until("re-arm", Duration::from_secs(60), |s| s.healthy());
        eprintln!(
            "  {kind} {}/{reps}: failovers {} -> {}",
            rep + 1,
            failovers_before,
            s.a.stats().failovers
        );
    }
    // Stop sending; everything accepted must arrive (a shortfall is reported as lost).
    s.sending = false;
    let sent = s.sent;
    let end = Instant::now() + Duration::from_secs(60);
    while s.delivered < sent && Instant::now() < end {
        s.step();
    }
    let stats = s.a.stats();
    crate::sim_runs::FailoverReport {
        kind: kind.to_string(),
        mode: crate::sim_runs::mode_name(mode).to_string(),
        wire_bytes_per_message: stats.data_bytes as f64 / sent.max(1) as f64,
        reps,
        heartbeat_interval_us: 1_000.0,
        detection: summarize_us(&detection),
        blackout: summarize_us(&blackout),
        delivery_gap: summarize_us(&gaps),
        messages: sent,
        lost: sent.saturating_sub(s.delivered),
        duplicated: s.duplicated,
        reordered: s.reordered,
        records_resent: stats.records_resent,
        duplicates_discarded: s.b.stats().duplicates_discarded,
        timeline: Vec::new(),
        fault_at_ms: 0.0,
    }
}
