//! Benchmarks on real RDMA devices: host 1 and host 2 connections in one process, each busy-polled
//! by its own thread (as perftest does), connected by the TCP handshake over loopback.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use railover::verbs::{accept, connect, VerbsConnection};
use railover::{Config, SendError};
use railover_rdma::LinkParams;
use serde_json::json;

use crate::stats::{histogram, print_table, summarize_us};

/// Heartbeat 1 ms; 30 missed beats by default (RAILOVER_HB_MISSES to change) because under qemu TCG
/// two busy-polling threads on two emulated CPUs delay rxe's kernel work by many ms (real NICs: 3).
/// RC timeout 13 (~67 ms budget): a new rxe connection's first write takes 3-22 ms.
fn config(size: usize) -> Config {
    Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, size.max(64))
        .heartbeat_interval_ns(1_000_000)
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
        .first_contact_grace_ns(2_000_000_000)
        .build()
        .expect("valid config")
}

fn pair(size: usize, host1: &[String], host2: &[String]) -> (VerbsConnection, VerbsConnection) {
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

fn send_retry(c: &mut VerbsConnection, m: &[u8]) {
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
    if as_json {
        println!(
            "{}",
            json!({"fabric": "verbs", "throughput": {"size": size, "messages": count, "msgs_per_s": rate}})
        );
    } else {
        println!("throughput, verbs {host1:?} -> {host2:?}, {size} B x {count}: {rate:.0} msgs/s");
    }
    // Keep host 1 alive until the receiver finished (its rings hold unacknowledged data).
    drop(a);
}
