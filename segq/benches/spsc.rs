//! Cross-thread SPSC handoff: railover-segq vs rtrb vs crossbeam's ArrayQueue, in one process run,
//! 64 B and 1 KiB messages: throughput (msgs/s, the producer as fast as it can) and one-way
//! handoff latency (p50/p99, paced: the next message goes once the last was taken).
//!
//! `cargo bench -p railover-segq --bench spsc` runs criterion's throughput groups and then prints the
//! side-by-side comparison with ratios (`-- --compare-only` skips criterion).
//! segq's "consumer" is the link's poster thread: it finds committed records, reads them in place
//! (as a NIC would) and frees them, which is the real hand-off in railover. Every consumer reads
//! each message's first word (the send time); `segq/place` is segq written in place through
//! `reserve`, `rtrb/unread` is rtrb with a consumer that never reads the bytes (how this
//! benchmark measured rtrb before 2026-12-01), `rtrb/framed` is rtrb moving as many bytes per
//! message as a segq record occupies (its 16-byte header, the payload padded to 8: 80 B for 64 B).
//! `segq/batch8` and `rtrb/batch8` hand over 8 messages at a time with one commit (segq's
//! `push_batch`, one rtrb chunk); the consumers take them one by one as above.
//! The ratio lines compare `segq` with `rtrb` (and, in brackets, with the other two), and the
//! two batched rows with each other.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use railover_segq::{Backing, Geometry, PushError, SendQueue, HEADER_LEN};

const RING_BYTES: usize = 1 << 20;

/// How many messages the consumer has taken, for a paced latency run: the producer sends the
/// next message only once the last one was taken, so each message's latency is one handoff,
/// not the wait behind a backlog (a saturated queue's latency measures how far ahead the
/// producer runs: the faster the producer, the worse it looks).
#[derive(Clone, Default)]
struct Taken(Arc<AtomicU64>);

impl Taken {
    fn set(&self, n: u64) {
        // Pairs with the Acquire in `wait_for`.
        self.0.store(n, Ordering::Release);
    }

    fn wait_for(&self, n: u64) {
        while self.0.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    }
}

/// segq: the producer copies each message in with `push` (as `Connection::send` does), or
/// writes it in place through `reserve` (`in_place`). The consumer is the poster: it finds
/// the committed records, reads each one's first word in place and frees them.
/// `batch` > 1: the producer pushes that many messages at a time with `push_batch` (one commit
/// for all; each carries its own send time).
fn segq_run_with(
    size: usize,
    n: u64,
    latency: bool,
    in_place: bool,
    batch: usize,
) -> (Duration, Vec<u64>) {
    let geo = Geometry::new(64 * 1024, RING_BYTES / (64 * 1024), 2048).unwrap();
    let (mut prod, mut post) = SendQueue::new(geo, Backing::Anonymous, 1).unwrap().split();
    let epoch = Instant::now();
    let taken = Taken::default();
    let consumer_taken = taken.clone();
    let t = std::thread::spawn(move || {
        let mut lat = Vec::with_capacity(if latency { n as usize } else { 0 });
        let mut got = 0u64;
        let mut sum = 0u64;
        while got < n {
            if let Some(r) = post.pending(usize::MAX) {
                post.mark_posted(&r);
                post.for_each_unacked(|_, p| {
                    let sent = u64::from_le_bytes(p[..8].try_into().unwrap());
                    if latency {
                        lat.push(epoch.elapsed().as_nanos() as u64 - sent);
                    }
                    sum = sum.wrapping_add(sent);
                });
                got += r.records as u64;
                post.ack(r.end, r.seqs.map_or(0, |s| s.1)).unwrap();
                if latency {
                    consumer_taken.set(got);
                }
            } else {
                std::hint::spin_loop();
            }
        }
        black_box(sum);
        lat
    });
    let t0 = Instant::now();
    if batch > 1 {
        let mut msgs = vec![vec![0u8; size]; batch];
        for i in (0..n).step_by(batch) {
            if latency {
                taken.wait_for(i);
            }
            let k = (n - i).min(batch as u64) as usize;
            loop {
                for m in &mut msgs[..k] {
                    m[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                }
                let mut refs = [&[][..]; 8];
                for (r, m) in refs.iter_mut().zip(&msgs) {
                    *r = &m[..];
                }
                match prod.push_batch(&refs[..k]) {
                    Ok(_) => break,
                    Err(PushError::Full) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let lat = t.join().unwrap();
        return (t0.elapsed(), lat);
    }
    let mut msg = vec![0u8; size];
    for i in 0..n {
        if latency {
            taken.wait_for(i);
        }
        loop {
            let ts = epoch.elapsed().as_nanos() as u64;
            let pushed = if in_place {
                prod.reserve(size).map(|mut slot| {
                    slot.payload_mut()[..8].copy_from_slice(&ts.to_le_bytes());
                    slot.commit()
                })
            } else {
                msg[..8].copy_from_slice(&ts.to_le_bytes());
                prod.push(&msg)
            };
            match pushed {
                Ok(_) => break,
                Err(PushError::Full) => std::hint::spin_loop(),
                Err(e) => panic!("{e}"),
            }
        }
    }
    let lat = t.join().unwrap();
    (t0.elapsed(), lat)
}

fn segq_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    segq_run_with(size, n, latency, false, 1)
}

fn segq_in_place_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    segq_run_with(size, n, latency, true, 1)
}

/// Messages per batch in the `/batch8` rows.
const BATCH: usize = 8;

fn segq_batch_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    segq_run_with(size, n, latency, false, BATCH)
}

/// rtrb, fixed-size messages as byte chunks (the closest analogue of a framed record). The
/// consumer reads each message's first word, as any real consumer reads what it takes, or
/// (`unread`, how this benchmark ran before 2026-12-01) takes the chunk without touching it.
/// `framed`: each chunk as long as the record segq stores for the message (its 16-byte header
/// and the payload padded to 8: 80 bytes for 64), so both move the same bytes.
fn rtrb_run_with(
    size: usize,
    n: u64,
    latency: bool,
    unread: bool,
    framed: bool,
    batch: usize,
) -> (Duration, Vec<u64>) {
    let size = if framed {
        HEADER_LEN + size.next_multiple_of(8)
    } else {
        size
    };
    let (mut p, mut c) = rtrb::RingBuffer::<u8>::new(RING_BYTES);
    let epoch = Instant::now();
    let taken = Taken::default();
    let consumer_taken = taken.clone();
    let t = std::thread::spawn(move || {
        let mut lat = Vec::with_capacity(if latency { n as usize } else { 0 });
        let mut got = 0u64;
        let mut sum = 0u64;
        while got < n {
            if let Ok(chunk) = c.read_chunk(size) {
                let (a, b) = chunk.as_slices();
                if latency || !unread {
                    let mut h = [0u8; 8];
                    let k = a.len().min(8);
                    h[..k].copy_from_slice(&a[..k]);
                    h[k..].copy_from_slice(&b[..8 - k]);
                    let sent = u64::from_le_bytes(h);
                    if latency {
                        lat.push(epoch.elapsed().as_nanos() as u64 - sent);
                    }
                    sum = sum.wrapping_add(sent);
                }
                black_box((a, b));
                chunk.commit_all();
                got += 1;
                if latency {
                    consumer_taken.set(got);
                }
            } else {
                std::hint::spin_loop();
            }
        }
        black_box(sum);
        lat
    });
    let t0 = Instant::now();
    if batch > 1 {
        // One chunk of `batch` messages, committed once (rtrb's batched hand-off).
        let mut msgs = vec![0u8; size * batch];
        for i in (0..n).step_by(batch) {
            if latency {
                taken.wait_for(i);
            }
            let k = (n - i).min(batch as u64) as usize;
            loop {
                for m in msgs.chunks_mut(size).take(k) {
                    m[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                }
                if let Ok(chunk) = p.write_chunk_uninit(size * k) {
                    chunk.fill_from_iter(msgs[..size * k].iter().copied());
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let lat = t.join().unwrap();
        return (t0.elapsed(), lat);
    }
    let mut msg = vec![0u8; size];
    for i in 0..n {
        if latency {
            taken.wait_for(i);
        }
        loop {
            // The send time before the whole enqueue (its space check included), as for segq
            // and ArrayQueue. (Until session 19 it was read after rtrb's space check.)
            let ts = epoch.elapsed().as_nanos() as u64;
            if let Ok(chunk) = p.write_chunk_uninit(size) {
                msg[..8].copy_from_slice(&ts.to_le_bytes());
                chunk.fill_from_iter(msg.iter().copied());
                break;
            }
            std::hint::spin_loop();
        }
    }
    let lat = t.join().unwrap();
    (t0.elapsed(), lat)
}

fn rtrb_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    rtrb_run_with(size, n, latency, false, false, 1)
}

fn rtrb_unread_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    rtrb_run_with(size, n, latency, true, false, 1)
}

fn rtrb_framed_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    rtrb_run_with(size, n, latency, false, true, 1)
}

fn rtrb_batch_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    rtrb_run_with(size, n, latency, false, false, BATCH)
}

fn arrayqueue_run(size: usize, n: u64, latency: bool) -> (Duration, Vec<u64>) {
    // ArrayQueue of fixed arrays (by value), the usual way to pass small messages with it.
    macro_rules! run {
        ($N:expr) => {{
            let q = Arc::new(ArrayQueue::<[u8; $N]>::new(RING_BYTES / $N));
            let qc = q.clone();
            let epoch = Instant::now();
            let taken = Taken::default();
            let consumer_taken = taken.clone();
            let t = std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(if latency { n as usize } else { 0 });
                let mut got = 0u64;
                while got < n {
                    if let Some(m) = qc.pop() {
                        if latency {
                            lat.push(
                                epoch.elapsed().as_nanos() as u64
                                    - u64::from_le_bytes(m[..8].try_into().unwrap()),
                            );
                        }
                        black_box(&m);
                        got += 1;
                        if latency {
                            consumer_taken.set(got);
                        }
                    } else {
                        std::hint::spin_loop();
                    }
                }
                lat
            });
            let t0 = Instant::now();
            for i in 0..n {
                if latency {
                    taken.wait_for(i);
                }
                let mut m = [0u8; $N];
                m[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                while let Err(back) = q.push(m) {
                    m = back;
                    std::hint::spin_loop();
                }
            }
            let lat = t.join().unwrap();
            (t0.elapsed(), lat)
        }};
    }
    match size {
        64 => run!(64),
        1024 => run!(1024),
        _ => unreachable!("sizes are 64 and 1024"),
    }
}

type Runner = fn(usize, u64, bool) -> (Duration, Vec<u64>);
const QUEUES: [(&str, Runner); 8] = [
    ("segq", segq_run),
    ("segq/place", segq_in_place_run),
    ("rtrb", rtrb_run),
    ("rtrb/unread", rtrb_unread_run),
    ("rtrb/framed", rtrb_framed_run),
    ("ArrayQueue", arrayqueue_run),
    ("segq/batch8", segq_batch_run),
    ("rtrb/batch8", rtrb_batch_run),
];

fn criterion_groups(c: &mut Criterion) {
    for size in [64usize, 1024] {
        let mut g = c.benchmark_group(format!("spsc_{size}B"));
        g.throughput(Throughput::Elements(100_000));
        g.sample_size(10);
        for (name, run) in QUEUES {
            g.bench_with_input(BenchmarkId::from_parameter(name), &size, |b, &size| {
                b.iter_custom(|iters| (0..iters).map(|_| run(size, 100_000, false).0).sum())
            });
        }
        g.finish();
    }
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize]
}

/// One process run, every queue, interleaved rounds; medians of 5 rounds; ratios vs segq.
fn compare() {
    println!("\nside-by-side (5 interleaved rounds, medians): cross-thread SPSC handoff");
    println!(
        "{:<6} {:<11} {:>14} {:>10} {:>10} {:>12} {:>12}",
        "size", "queue", "msgs/s", "p50 ns", "p99 ns", "segq/x rate", "x/segq p50"
    );
    let mut ratio_lines = Vec::new();
    for size in [64usize, 1024] {
        let n = 1_000_000u64;
        let mut rates = vec![Vec::new(); QUEUES.len()];
        let mut p50s = vec![Vec::new(); QUEUES.len()];
        let mut p99s = vec![Vec::new(); QUEUES.len()];
        for _round in 0..5 {
            for (i, (_, run)) in QUEUES.iter().enumerate() {
                let (d, _) = run(size, n, false);
                rates[i].push(n as f64 / d.as_secs_f64());
                let (_, mut lat) = run(size, 200_000, true);
                p50s[i].push(pct(&mut lat, 0.5));
                p99s[i].push(pct(&mut lat, 0.99));
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let medu = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let segq_rate = med(&mut rates[0].clone());
        let segq_p50 = medu(&mut p50s[0].clone()) as f64;
        let batch_row = QUEUES
            .iter()
            .position(|(n, _)| *n == "segq/batch8")
            .unwrap();
        let batch_rate = med(&mut rates[batch_row].clone());
        let batch_p50 = medu(&mut p50s[batch_row].clone()) as f64;
        for (i, (name, _)) in QUEUES.iter().enumerate() {
            let r = med(&mut rates[i]);
            let p50 = medu(&mut p50s[i]);
            let p99 = medu(&mut p99s[i]);
            println!(
                "{:<6} {:<11} {:>14.0} {:>10} {:>10} {:>12.2} {:>12.2}",
                format!("{size}B"),
                name,
                r,
                p50,
                p99,
                segq_rate / r,
                p50 as f64 / segq_p50
            );
            if *name == "rtrb" {
                ratio_lines.push(format!(
                    "segq/rtrb {size}B rate ratio: {:.2}\nsegq/rtrb {size}B p50 handoff ratio: {:.2}",
                    segq_rate / r,
                    segq_p50 / p50 as f64
                ));
            }
            if *name == "rtrb/framed" {
                ratio_lines.push(format!(
                    "(segq/rtrb {size}B, rtrb moving the {} bytes of segq's record: rate ratio {:.2}, p50 handoff ratio {:.2})",
                    HEADER_LEN + size.next_multiple_of(8),
                    segq_rate / r,
                    segq_p50 / p50 as f64
                ));
            }
            if *name == "rtrb/batch8" {
                ratio_lines.push(format!(
                    "segq/rtrb {size}B batches of {BATCH} (one commit each): rate ratio {:.2}, p50 handoff ratio {:.2}",
                    batch_rate / r,
                    batch_p50 / p50 as f64
                ));
            }
            if *name == "rtrb/unread" {
                ratio_lines.push(format!(
                    "(segq/rtrb {size}B rate ratio, rtrb's consumer not reading: {:.2})",
                    segq_rate / r
                ));
            }
        }
    }
    println!();
    for line in ratio_lines {
        println!("{line}");
    }
}

fn main() {
    let compare_only = std::env::args().any(|a| a == "--compare-only");
    if !compare_only {
        let mut c = Criterion::default().configure_from_args();
        criterion_groups(&mut c);
        c.final_summary();
    }
    compare();
}
