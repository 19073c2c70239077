//! Two-process latency and message rate, measured the way perftest measures them, so the two can
//! run side by side on the same cards (`bench/perftest-compare`):
//! - `--pingpong N`: `connect` sends a record and waits for its echo, N times after `--warmup`
//!   (ib_write_lat's round trip); `serve` echoes every record.
//! - `--flood N`: `connect` sends N records as fast as the ring takes them, committing up to
//!   `--batch` records per post, so several go in one RDMA write (ib_write_bw posts one message
//!   per work request); `serve` counts them and reports the rate between its first and last
//!   delivery.
//!
//! Each record carries its number in its first 8 bytes; both sides check them. One JSON line per
//! process.

use std::time::{Duration, Instant};

use railover::runtime::{Clock, RealClock};
use railover::verbs::VerbsConnection;
use railover::SendError;
use serde_json::json;

use crate::peer::END;
use crate::stats::{histogram, summarize_us};
use crate::verbs_runs::send_retry;

/// How long the side that did not close waits for the peer's close before it reports anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

fn seq_of(m: &[u8]) -> u64 {
    u64::from_le_bytes(m[..8].try_into().expect("records are at least 16 bytes"))
}

/// The END record, then a graceful close (the peer delivered everything, or 5 s passed).
fn finish(c: &mut VerbsConnection, size: usize, total: u64) -> String {
    let mut end = vec![0u8; size];
    end[..8].copy_from_slice(&END.to_le_bytes());
    end[8..16].copy_from_slice(&total.to_le_bytes());
    send_retry(c, &end);
    match c.close(5_000_000_000) {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// Keeps the connection running until the peer closed it (or [`CLOSE_WAIT`] passed).
fn await_close(c: &mut VerbsConnection) -> String {
    let deadline = Instant::now() + CLOSE_WAIT;
    while c.end_reason().is_none() && Instant::now() < deadline {
        if c.poll(|_| {}).is_err() {
            break;
        }
    }
    format!("{:?}", c.end_reason())
}

/// The connection's writes over its life (handshake to close), per rail too, and the switches
/// and failovers that moved its data between rails.
fn writes(c: &VerbsConnection) -> serde_json::Value {
    let s = c.stats();
    let rails = c.core().config().rails();
    json!({"data_writes": s.data_writes, "control_writes": s.control_writes,
           "write_completions": s.write_completions,
           "rail_data_writes": &s.rail_data_writes[..rails],
           "rail_control_writes": &s.rail_control_writes[..rails],
           "planned_switches": s.planned_switches, "failovers": s.failovers})
}

/// `connect --pingpong N`: times N round trips (after `warmup` untimed ones).
pub fn pingpong_client(mut c: VerbsConnection, size: usize, iterations: u64, warmup: u64) {
    let mut msg = vec![0u8; size.max(16)];
    let mut buf = vec![0u8; c.core().config().geometry().max_record()];
    let mut rtt = histogram();
    let mut wrong = 0u64;
    let timer = RealClock::default();
    // How often the connection's clock asks the OS during the round trips (not the set-up).
    let os_reads_before = c.clock().os_reads();
    let slow_before = c.clock().slow_os_reads();
    // Receive calls (each reads the connection's clock once): what the OS reads are judged by.
    let mut polls = 0u64;
    for i in 0..warmup + iterations {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        // A counter-based clock of its own (not the connection's), as perftest reads the
        // time-stamp counter: where the OS clock is a system call (this guest's hpet), two per
        // round trip would weigh on the result.
        let t0 = timer.now();
        send_retry(&mut c, &msg);
        let len = loop {
            polls += 1;
            if let Some(len) = c.recv(&mut buf).expect("recv") {
                break len;
            }
        };
        if i >= warmup {
            let _ = rtt.record(timer.now().saturating_sub(t0).max(1));
        }
        wrong += u64::from(len != msg.len() || seq_of(&buf) != i);
    }
    let os_reads = c.clock().os_reads() - os_reads_before;
    let slow_os_reads = c.clock().slow_os_reads() - slow_before;
    let w = writes(&c);
    let close = finish(&mut c, msg.len(), warmup + iterations);
    println!(
        "{}",
        json!({"role": "connect", "pingpong": {"size": msg.len(), "iterations": iterations,
            "warmup": warmup, "rtt": summarize_us(&rtt), "wrong_echoes": wrong, "writes": w,
            "clock_os_reads": os_reads, "clock_slow_os_reads": slow_os_reads,
            "clock_polls": polls, "close": close}})
    );
}

/// `serve --pingpong`: echoes every record until END.
pub fn pingpong_server(mut c: VerbsConnection) {
    let mut buf = vec![0u8; c.core().config().geometry().max_record()];
    let mut echoed = 0u64;
    let os_reads_before = c.clock().os_reads();
    let slow_before = c.clock().slow_os_reads();
    let mut polls = 0u64;
    loop {
        polls += 1;
        let Some(len) = c.recv(&mut buf).expect("recv") else {
            continue;
        };
        if seq_of(&buf) == END {
            break;
        }
        send_retry(&mut c, &buf[..len]);
        echoed += 1;
    }
    let os_reads = c.clock().os_reads() - os_reads_before;
    let slow_os_reads = c.clock().slow_os_reads() - slow_before;
    let w = writes(&c);
    let end = await_close(&mut c);
    println!(
        "{}",
        json!({"role": "serve", "pingpong": {"echoed": echoed, "writes": w,
            "clock_os_reads": os_reads, "clock_slow_os_reads": slow_os_reads,
            "clock_polls": polls, "end": end}})
    );
}

/// `connect --flood N`: sends N records, up to `batch` committed per post.
pub fn flood_client(mut c: VerbsConnection, size: usize, count: u64, batch: u64) {
    let size = size.max(16);
    let start = Instant::now();
    let mut next = 0u64;
    while next < count {
        let mut batched = 0;
        while batched < batch && next < count {
            match c.reserve(size) {
                Ok(mut slot) => {
                    slot.payload_mut()[..8].copy_from_slice(&next.to_le_bytes());
                    slot.commit();
                    next += 1;
                    batched += 1;
                }
                Err(SendError::Backpressure) => break,
                Err(e) => panic!("reserve: {e}"),
            }
        }
        // Posts what was committed (coalesced) and takes in completions and acknowledgements.
        c.progress();
    }
    let secs = start.elapsed().as_secs_f64();
    let s = c.stats();
    let close = finish(&mut c, size, count);
    println!(
        "{}",
        json!({"role": "connect", "flood": {"size": size, "messages": count, "batch": batch,
            "send_msgs_per_s": count as f64 / secs.max(1e-9),
            "data_writes": s.data_writes, "control_writes": s.control_writes,
            "messages_per_data_write": count as f64 / s.data_writes.max(1) as f64,
            "close": close}})
    );
}

/// `connect --flood N --send-batch B`: sends N records, B at a time with one `send_batch` call
/// each (all or none: a full ring refuses the whole batch, which is offered again after a
/// `progress`).
pub fn flood_client_send_batch(mut c: VerbsConnection, size: usize, count: u64, batch: u64) {
    let size = size.max(16);
    let mut records = vec![vec![0u8; size]; batch as usize];
    let start = Instant::now();
    let mut next = 0u64;
    let mut refused = 0u64;
    while next < count {
        let n = batch.min(count - next) as usize;
        for (k, r) in records[..n].iter_mut().enumerate() {
            r[..8].copy_from_slice(&(next + k as u64).to_le_bytes());
        }
        let msgs: [&[u8]; 64] = std::array::from_fn(|k| records.get(k).map_or(&[][..], |r| r));
        match c.send_batch(&msgs[..n]) {
            Ok(seqs) => {
                debug_assert_eq!(seqs.end - seqs.start, n as u64);
                next += n as u64;
            }
            Err(SendError::Backpressure) => {
                refused += 1;
                c.progress();
            }
            Err(e) => panic!("send_batch: {e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let s = c.stats();
    let close = finish(&mut c, size, count);
    println!(
        "{}",
        json!({"role": "connect", "flood": {"size": size, "messages": count,
            "send_batch": batch, "batches_refused": refused,
            "send_msgs_per_s": count as f64 / secs.max(1e-9),
            "data_writes": s.data_writes, "control_writes": s.control_writes,
            "messages_per_data_write": count as f64 / s.data_writes.max(1) as f64,
            "close": close}})
    );
}

/// `serve --flood`: counts and checks every record until END; the rate is taken between the
/// first and the last delivery.
pub fn flood_server(mut c: VerbsConnection) {
    let (mut next, mut wrong, mut total) = (0u64, 0u64, None);
    let (mut first, mut last) = (None, Instant::now());
    while total.is_none() {
        c.poll(|m| match seq_of(m) {
            END => total = Some(u64::from_le_bytes(m[8..16].try_into().expect("8 bytes"))),
            seq => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                wrong += u64::from(seq != next);
                next = seq + 1;
            }
        })
        .expect("poll");
    }
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    let w = writes(&c);
    let end = await_close(&mut c);
    println!(
        "{}",
        json!({"role": "serve", "flood": {"delivered": next, "sent": total, "out_of_order": wrong,
            "msgs_per_s": next.saturating_sub(1) as f64 / secs.max(1e-9), "writes": w,
            "end": end}})
    );
}
