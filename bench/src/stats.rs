//! Latency summaries as trading users read them: HDR histogram percentiles up to p99.99 and max.

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
    pub unit: &'static str,
}

/// Nanosecond histogram (1 ns .. 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Summary in microseconds.
pub fn summarize_us(h: &Histogram<u64>) -> Summary {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Summary {
        count: h.len(),
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        p999: us(0.999),
        p9999: us(0.9999),
        max: h.max() as f64 / 1e3,
        unit: "us",
    }
}

pub fn print_table(title: &str, rows: &[(String, Summary)]) {
    println!("{title}");
    println!(
        "{:<28} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    for (name, s) in rows {
        println!(
            "{:<28} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            name, s.count, s.p50, s.p90, s.p99, s.p999, s.p9999, s.max
        );
    }
    println!("(latencies in {})", rows.first().map_or("us", |r| r.1.unit));
}
