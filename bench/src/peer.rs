//! Two-process mode (`serve` / `connect`): one process per host, as users run railover and as
//! perftest runs (`-d`, `-s`, `--json`). Both sides stream numbered records to each other at a
//! set pace for a set time, check every delivery (lost, duplicated, reordered, corrupted), time
//! every library call (its worst case is what a paused peer or a re-arm costs the data thread),
//! then end the stream with an END record carrying the count; the closing side closes
//! gracefully once it has the peer's END, the other side sees `PeerClosed`. Each prints
//! `listening <port>` (serve) and `connected` lines, then one JSON report.

#![cfg_attr(not(feature = "verbs"), allow(dead_code))]

#[cfg(feature = "verbs")]
use std::io::Write;
#[cfg(feature = "verbs")]
use std::net::{SocketAddr, TcpListener};
#[cfg(feature = "verbs")]
use std::time::{Duration, Instant};

#[cfg(feature = "verbs")]
use hdrhistogram::Histogram;
#[cfg(feature = "verbs")]
use railover::core::Event;
#[cfg(feature = "verbs")]
use railover::verbs::{accept, connect, VerbsConnection};
use railover::Config;
#[cfg(feature = "verbs")]
use railover::SendError;
use railover_rdma::LinkParams;
#[cfg(feature = "verbs")]
use serde_json::json;

/// The END record's marker in the sequence field.
const END: u64 = u64::MAX;

#[derive(clap::Args, Clone)]
pub struct PeerArgs {
    /// This host's cards, one per rail (the first is primary).
    #[arg(short = 'd', long = "dev", value_delimiter = ',', required = true)]
    devices: Vec<String>,
    /// Record size in bytes (at least 16).
    #[arg(short = 's', long, default_value_t = 64)]
    size: usize,
    /// How long each side streams.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Pace: one record every this many microseconds.
    #[arg(long, default_value_t = 200)]
    interval_us: u64,
    /// This side closes the connection (gracefully) once both streams are complete.
    #[arg(long)]
    closer: bool,
    /// Missed 1 ms heartbeats before a rail is declared dead (TCG emulation needs ~30; NICs 3).
    #[arg(long, default_value_t = 30)]
    hb_misses: u32,
    /// How long the peer may be unresponsive before the session ends (ms).
    #[arg(long, default_value_t = 20_000)]
    session_timeout_ms: u64,
    /// Set-up timeout (s).
    #[arg(long, default_value_t = 60)]
    setup_secs: u64,
}

fn config(a: &PeerArgs) -> Config {
    Config::builder()
        .rails(a.devices.len())
        .geometry(64 * 1024, 16, a.size.max(64))
        .heartbeat_interval_ns(1_000_000)
        .heartbeat_misses(a.hb_misses)
        .session_timeout_ns(a.session_timeout_ms * 1_000_000)
        .close_linger_ns(5_000_000_000)
        .link_params(LinkParams {
            timeout: 13,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .first_contact_grace_ns(2_000_000_000)
        .rearm_after_ns(1_000_000_000)
        .build()
        .expect("valid config")
}

fn record(seq: u64, size: usize) -> Vec<u8> {
    let mut m: Vec<u8> = (0..size).map(|i| (seq as usize + i) as u8).collect();
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m
}

/// What one side saw of the peer's stream.
#[derive(Default)]
struct Check {
    next: u64,
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    corrupted: u64,
    peer_total: Option<u64>,
}

impl Check {
    fn deliver(&mut self, m: &[u8]) {
        if m.len() < 16 {
            self.corrupted += 1;
            return;
        }
        let seq = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
        if seq == END {
            self.peer_total = Some(u64::from_le_bytes(m[8..16].try_into().expect("8 bytes")));
            return;
        }
        if seq < self.next {
            self.duplicates += 1;
        } else if seq > self.next {
            self.reordered += 1;
            self.next = seq + 1;
        } else {
            self.next += 1;
            self.delivered += 1;
            if m[..] != record(seq, m.len())[..] {
                self.corrupted += 1;
            }
        }
    }
}

#[cfg(feature = "verbs")]
pub fn serve(args: PeerArgs, port: u16, as_json: bool) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind loopback");
    let port = listener.local_addr().expect("addr").port();
    println!("listening {port}");
    let _ = std::io::stdout().flush();
    let devs: Vec<&str> = args.devices.iter().map(|s| s.as_str()).collect();
    let conn = accept(
        config(&args),
        &devs,
        &listener,
        Duration::from_secs(args.setup_secs),
    )
    .expect("accept");
    stream("serve", conn, &args, as_json);
}

#[cfg(feature = "verbs")]
pub fn connect_to(args: PeerArgs, addr: SocketAddr, as_json: bool) {
    let devs: Vec<&str> = args.devices.iter().map(|s| s.as_str()).collect();
    let conn = connect(
        config(&args),
        &devs,
        addr,
        Duration::from_secs(args.setup_secs),
    )
    .expect("connect");
    stream("connect", conn, &args, as_json);
}

#[cfg(feature = "verbs")]
fn stream(role: &str, mut conn: VerbsConnection, a: &PeerArgs, as_json: bool) {
    println!("connected");
    let _ = std::io::stdout().flush();
    let mut calls = Histogram::<u64>::new(3).expect("histogram");
    let mut timed = |started: Instant| {
        let _ = calls.record(started.elapsed().as_nanos() as u64);
    };
    let start = Instant::now();
    let stream_for = Duration::from_secs_f64(a.secs);
    let interval = Duration::from_micros(a.interval_us);
    let (mut next_out, mut next_at, mut sent_end) = (0u64, start, false);
    let mut check = Check::default();
    let (mut failovers, mut rail_downs, mut rail_ups) = (0u64, 0u64, 0u64);
    let (mut unresponsive, mut responsive, mut longest_silence_ns) = (0u64, 0u64, 0u64);
    let mut close_result = None;
    // What happened when (ms since the stream started): rail downs with their reasons,
    // failovers, re-arms, unresponsive periods.
    let mut timeline: Vec<String> = Vec::new();
    let mut error = None;
    let hard_limit = stream_for + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        if !sent_end && now >= next_at {
            let msg = if now >= start + stream_for {
                let mut m = vec![0u8; a.size.max(16)];
                m[..8].copy_from_slice(&END.to_le_bytes());
                m[8..16].copy_from_slice(&next_out.to_le_bytes());
                m
            } else {
                record(next_out, a.size.max(16))
            };
            let t = Instant::now();
            let r = conn.send(&msg);
            timed(t);
            match r {
                Ok(_) if msg[..8] == END.to_le_bytes() => sent_end = true,
                Ok(_) => {
                    next_out += 1;
                    next_at += interval;
                }
                Err(SendError::Backpressure) => {} // retried on the next turn
                Err(e) => {
                    error = Some(format!("send: {e}"));
                    break;
                }
            }
        }
        let t = Instant::now();
        let r = conn.poll(|m| check.deliver(m));
        timed(t);
        while let Some(e) = conn.poll_event() {
            if !matches!(e, Event::FailoverComplete { .. }) {
                timeline.push(format!(
                    "{:.1} ms {e:?}",
                    start.elapsed().as_secs_f64() * 1e3
                ));
            }
            match e {
                Event::Failover { .. } => failovers += 1,
                Event::RailDown { .. } => rail_downs += 1,
                Event::RailUp { .. } => rail_ups += 1,
                Event::PeerUnresponsive { .. } => unresponsive += 1,
                Event::PeerResponsive { silent_ns, .. } => {
                    responsive += 1;
                    longest_silence_ns = longest_silence_ns.max(silent_ns);
                }
                _ => {}
            }
        }
        if let Err(e) = r {
            if conn.end_reason().is_none() {
                error = Some(format!("poll: {e}"));
            }
            break;
        }
        let complete = sent_end && check.peer_total.is_some_and(|n| n == check.next);
        if complete && a.closer {
            let t = Instant::now();
            close_result = Some(conn.close(5_000_000_000).map_err(|e| e.to_string()));
            timed(t);
            break;
        }
        if start.elapsed() > hard_limit {
            error = Some("stream did not complete".into());
            break;
        }
    }
    let mut unacked = 0u64;
    conn.unacked(|_, _| unacked += 1);
    let rails = conn.core().config().rails();
    let rails_up = (0..rails)
        .filter(|&r| conn.core().rail_state(r) != railover::RailState::Failed)
        .count();
    let lost = check
        .peer_total
        .map_or(0, |n| n.saturating_sub(check.delivered));
    let report = json!({
        "role": role,
        "sent": next_out,
        "delivered": check.delivered,
        "peer_sent": check.peer_total,
        "lost": lost,
        "duplicates": check.duplicates,
        "reordered": check.reordered,
        "corrupted": check.corrupted,
        "failovers": failovers,
        "rail_downs": rail_downs,
        "rail_ups": rail_ups,
        "unresponsive": unresponsive,
        "responsive": responsive,
        "longest_silence_ms": longest_silence_ns as f64 / 1e6,
        "end_reason": conn.end_reason().map(|r| format!("{r:?}")),
        "close": close_result.map(|r| r.err().unwrap_or_else(|| "ok".into())),
        "unacked": unacked,
        "rails_up": rails_up,
        "rails": rails,
        "calls": calls.len(),
        "call_p50_us": calls.value_at_quantile(0.5) as f64 / 1e3,
        "call_p9999_us": calls.value_at_quantile(0.9999) as f64 / 1e3,
        "call_max_us": calls.max() as f64 / 1e3,
        "error": error,
        "timeline": timeline,
    });
    if as_json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    }
    drop(conn); // a graceful close if not closed yet (the non-closer already saw PeerClosed)
}
