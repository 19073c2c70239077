//! crc32c of a record's covered bytes (12 header bytes + the payload), side by side in one run:
//! the crate (three interleaved chains, made for long buffers), one inline chain, and what
//! `railover_segq::crc32c` picks (the chain below `CRC_INTERLEAVED_FROM` bytes, the crate from
//! there on).
//!
//! `cargo bench -p railover-segq --bench crc` prints criterion's figures, then a table of ns per
//! call and ratios.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput};

const PAYLOADS: [usize; 6] = [64, 256, 512, 1024, 4096, 8192];

#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
fn one_chain(b: &[u8]) -> u32 {
    railover_segq::crc32c_one_chain(b)
}
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse4.2")))]
fn one_chain(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

type Crc = fn(&[u8]) -> u32;
const KINDS: [(&str, Crc); 3] = [
    ("crate", crc32c::crc32c),
    ("one chain", one_chain),
    ("railover", railover_segq::crc32c),
];

fn criterion_groups(c: &mut Criterion) {
    for payload in PAYLOADS {
        let buf = vec![7u8; 12 + payload];
        let mut g = c.benchmark_group(format!("crc32c_{payload}B"));
        g.throughput(Throughput::Bytes(buf.len() as u64));
        for (name, f) in KINDS {
            g.bench_with_input(BenchmarkId::from_parameter(name), &buf, |b, buf| {
                b.iter(|| f(black_box(buf)))
            });
        }
        g.finish();
    }
}

/// ns per call, median of 5 interleaved rounds.
fn side_by_side() {
    println!(
        "\nside-by-side (5 interleaved rounds, medians): crc32c of 12 + payload bytes, ns per call"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>16} {:>18}",
        "payload", "crate", "one chain", "railover", "chain/crate", "railover/best"
    );
    for payload in PAYLOADS {
        let buf = vec![7u8; 12 + payload];
        let calls = (4_000_000 / (payload / 64 + 1)) as u32;
        let mut rounds: [Vec<f64>; 3] = Default::default();
        for _ in 0..5 {
            for (k, (_, f)) in KINDS.iter().enumerate() {
                let t = Instant::now();
                let mut x = 0u32;
                for _ in 0..calls {
                    x ^= f(black_box(&buf));
                }
                black_box(x);
                rounds[k].push(t.elapsed().as_nanos() as f64 / f64::from(calls));
            }
        }
        let med: Vec<f64> = rounds
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                r[2]
            })
            .collect();
        println!(
            "{:>7}B {:>10.1} {:>10.1} {:>10.1} {:>16.2} {:>18.2}",
            payload,
            med[0],
            med[1],
            med[2],
            med[1] / med[0],
            med[2] / med[0].min(med[1])
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--compare-only") {
        let mut c = Criterion::default()
            .configure_from_args()
            .warm_up_time(std::time::Duration::from_millis(300))
            .measurement_time(std::time::Duration::from_secs(1));
        criterion_groups(&mut c);
        c.final_summary();
    }
    side_by_side();
}
