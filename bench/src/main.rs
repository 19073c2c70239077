//! railover-bench: ping-pong, throughput and failover benchmarks on the simulated fabric or on
//! real verbs (cargo feature `verbs`), printed as a table or JSON, with SVG plots.

use clap::{Parser, Subcommand, ValueEnum};
use railover::RailMode;
use serde_json::json;

mod peer;
#[cfg(feature = "verbs")]
mod peer_perf;
mod plot;
#[cfg(feature = "verbs")]
mod raw_verbs;
mod replica_runs;
mod sim_runs;
mod stats;
#[cfg(feature = "verbs")]
mod verbs_runs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fabric {
    /// The deterministic simulated fabric (no set-up needed).
    Sim,
    /// Real RDMA devices (build with --features verbs).
    Verbs,
}

#[derive(Parser)]
#[command(
    name = "railover-bench",
    about = "Latency, throughput and failover benchmarks for railover"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Write SVG plots into this directory.
    #[arg(long, global = true)]
    plot_dir: Option<String>,
}

/// The cards of each host, one per rail (verbs fabric only).
#[derive(clap::Args)]
struct Cards {
    /// Host 1's cards, one per rail.
    #[arg(long, value_delimiter = ',', default_value = "rxe_a1,rxe_b1")]
    host1: Vec<String>,
    /// Host 2's cards, one per rail.
    #[arg(long, value_delimiter = ',', default_value = "rxe_a2,rxe_b2")]
    host2: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Round-trip latency: host 1 sends, host 2 echoes.
    Pingpong {
        #[arg(long, value_enum, default_value = "sim")]
        fabric: Fabric,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10_000)]
        iterations: usize,
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        /// Simulated one-way wire latency (ns).
        #[arg(long, default_value_t = 2_000)]
        latency_ns: u64,
        /// Simulated fabric: don't time the round trips (for an instruction counter, which
        /// should count railover's work, not the benchmark's clock reads and histograms).
        #[arg(long)]
        untimed: bool,
        /// Simulated fabric: after each event, make progress on both hosts, then poll the one
        /// waiting (how the instruction counter ran before session 18: six `progress` calls a
        /// round trip where two processes make two to three).
        #[arg(long)]
        step_both_hosts: bool,
        #[command(flatten)]
        cards: Cards,
    },
    /// Polls an idle connection (simulated fabric) `count` times: what an empty poll costs, for
    /// an instruction counter (`bench/instructions.sh`).
    IdlePoll {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        /// Poll an `Endpoint` holding this many idle connections instead of one connection.
        #[arg(long)]
        endpoint: Option<usize>,
    },
    /// Reads a connection's real clock (`RealClock`) `count` times: what the one read per poll
    /// costs on verbs (the simulated fabric's connections read a virtual clock instead), for
    /// an instruction counter (`bench/instructions.sh`).
    ClockReads {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
    /// Many connections on one endpoint per host (simulated fabric): set-up time and memory per
    /// connection (resident memory and registered bytes), measured at 1 and at N connections.
    EndpointSetup {
        #[arg(long, default_value_t = 256)]
        connections: usize,
    },
    /// One-way message rate with coalescing.
    Throughput {
        #[arg(long, value_enum, default_value = "sim")]
        fabric: Fabric,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 2_000)]
        latency_ns: u64,
        /// Simulated fabric: send in batches of this many messages (`Connection::send_batch`:
        /// one commit, one write); 1 sends each alone.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[command(flatten)]
        cards: Cards,
    },
    /// Injects each fault kind mid-stream and reports detection, blackout, and loss (must be 0).
    Failover {
        #[arg(long, value_enum, default_value = "sim")]
        fabric: Fabric,
        /// Fault kinds (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Rail modes, side by side (active-standby, hot-hot; default both).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Interval between messages (virtual ns).
        #[arg(long, default_value_t = 20_000)]
        interval_ns: u64,
        #[arg(long, default_value_t = 5_000)]
        latency_ns: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        cards: Cards,
        /// verbs: the script that injects and clears faults (inside the SoftRoCE VM).
        #[arg(long, default_value = "ci/fault")]
        fault_script: String,
    },
    /// Two-process mode, host that listens (verbs): streams both ways with the `connect` side,
    /// checks every record, times every call, prints a JSON report.
    Serve {
        #[command(flatten)]
        args: peer::PeerArgs,
        /// TCP port for the set-up (0: any; the chosen one is printed as `listening <port>`).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// The replicated order book (railover-replica): its overhead on the simulated fabric, or its
    /// processes (primary, backup, client) on real cards.
    Replica {
        #[command(subcommand)]
        cmd: replica_runs::ReplicaCmd,
    },
    /// Two-process mode, host that dials a `serve` (verbs).
    Connect {
        #[command(flatten)]
        args: peer::PeerArgs,
        /// The `serve` side's set-up address (loopback or a test host's address).
        #[arg(long)]
        addr: std::net::SocketAddr,
    },
    /// The fabric layer alone (verbs): two threads ping-pong a write with immediate through
    /// railover-rdma on one queue pair, with none of railover's work (a baseline beside
    /// perftest and railover's ping-pong).
    RawPingpong {
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10_000)]
        iterations: u64,
        #[arg(long, default_value_t = 1_000)]
        warmup: u64,
        /// The timing thread's card.
        #[arg(long, default_value = "rxe_a1")]
        client: String,
        /// The echoing thread's card.
        #[arg(long, default_value = "rxe_a2")]
        server: String,
        /// Pin the timing thread to this CPU.
        #[arg(long)]
        client_cpu: Option<usize>,
        /// Pin the echoing thread to this CPU.
        #[arg(long)]
        server_cpu: Option<usize>,
    },
}

fn run_replica(cmd: replica_runs::ReplicaCmd, as_json: bool) {
    use replica_runs::ReplicaCmd;
    match cmd {
        ReplicaCmd::Sim {
            requests,
            latency_ns,
        } => {
            let r = replica_runs::sim_overhead(requests, latency_ns);
            if as_json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else {
                replica_runs::print_overhead(&r);
            }
        }
        #[cfg(feature = "verbs")]
        ReplicaCmd::Backup { net, connect } => {
            replica_runs::serve(net, replica_runs::ServerRole::Backup { connect }, as_json)
        }
        #[cfg(feature = "verbs")]
        ReplicaCmd::Primary { net, backup } => {
            replica_runs::serve(net, replica_runs::ServerRole::Primary { backup }, as_json)
        }
        ReplicaCmd::Client { args } => {
            let r = replica_runs::client(args);
            if as_json {
                println!("{}", serde_json::to_string(&r).expect("json"));
            } else {
                println!("{r:#?}");
            }
            if r.lost > 0 || r.mismatched_duplicates > 0 {
                std::process::exit(1);
            }
        }
    }
}

/// Fault kinds the SoftRoCE harness injects (card removal can't be, on rxe: see the README).
const FAULTS_ON_VERBS: [&str; 3] = ["carrier-loss", "black-hole", "corruption"];

fn print_failover_table(setting: &str, reports: &[sim_runs::FailoverReport], virtual_time: bool) {
    println!("\nrailover failover on {setting}");
    println!("detection = fault -> failover; blackout = failover -> first record delivered over the standby; gap = longest silence the receiver saw\n");
    println!(
        "{:<14} {:<14} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>5} {:>5} {:>9}",
        "fault",
        "mode",
        "reps",
        "det p50",
        "det p99",
        "blk p50",
        "blk p99",
        "blk max",
        "gap p99",
        "resent",
        "lost",
        "dup",
        "reord",
        "wire B/msg"
    );
    for r in reports {
        println!(
            "{:<14} {:<14} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>5} {:>5} {:>5} {:>9.1}",
            r.kind,
            r.mode,
            r.reps,
            r.detection.p50,
            r.detection.p99,
            r.blackout.p50,
            r.blackout.p99,
            r.blackout.max,
            r.delivery_gap.p99,
            r.records_resent,
            r.lost,
            r.duplicated,
            r.reordered,
            r.wire_bytes_per_message
        );
    }
    println!(
        "(times in us, {})",
        if virtual_time { "virtual" } else { "real" }
    );
    let total: u64 = reports
        .iter()
        .map(|r| r.lost + r.duplicated + r.reordered)
        .sum();
    let worst = reports.iter().map(|r| r.blackout.p99).fold(0.0, f64::max);
    println!(
        "\nlost + duplicated + reordered = {total}; worst blackout p99 = {worst:.1} us = {:.3} heartbeat intervals",
        worst / reports[0].heartbeat_interval_us
    );
}

#[cfg(not(feature = "verbs"))]
fn need_verbs() -> ! {
    eprintln!("the verbs fabric needs a build with `--features verbs` (and cmake, clang, libclang-dev, pkg-config)");
    std::process::exit(2)
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::EndpointSetup { connections } => sim_runs::endpoint_setup(connections),
        Cmd::IdlePoll { count, endpoint } => {
            let found = match endpoint {
                Some(n) => sim_runs::endpoint_idle_polls(count, n),
                None => sim_runs::idle_polls(count),
            };
            println!("{count} empty polls found {found} records");
        }
        Cmd::ClockReads { count } => {
            let (last, os_reads) = sim_runs::clock_reads(count);
            println!("{count} clock reads: the last {last} ns, {os_reads} of them asked the OS");
        }
        Cmd::Pingpong {
            fabric,
            size,
            iterations,
            warmup,
            latency_ns,
            untimed,
            step_both_hosts,
            cards: Cards { host1, host2 },
        } => match fabric {
            Fabric::Sim => {
                let r = sim_runs::pingpong(
                    size,
                    iterations,
                    warmup,
                    latency_ns,
                    !untimed,
                    step_both_hosts,
                );
                if cli.json {
                    println!("{}", json!({"fabric": "sim", "pingpong": r}));
                } else {
                    stats::print_table(
                        &format!("ping-pong, simulated fabric, {size} B, {iterations} iterations, one-way wire latency {latency_ns} ns"),
                        &[("virtual RTT".into(), r.virtual_rtt.clone()), ("host CPU per round trip".into(), r.cpu_rtt.clone())],
                    );
                    println!(
                        "polls per round trip, both hosts: {:.2}",
                        r.polls_per_round_trip
                    );
                }
                if let Some(dir) = &cli.plot_dir {
                    let path = format!("{dir}/pingpong-sim.svg");
                    plot::percentiles(
                        &path,
                        "railover ping-pong (sim): host CPU per round trip",
                        &[("cpu rtt".into(), r.cpu_rtt)],
                    )
                    .expect("plot");
                    eprintln!("wrote {path}");
                }
            }
            Fabric::Verbs => {
                if untimed {
                    eprintln!("--untimed is for the simulated fabric (an instruction counter)");
                    std::process::exit(2);
                }
                #[cfg(feature = "verbs")]
                verbs_runs::pingpong(
                    size,
                    iterations,
                    warmup,
                    &host1,
                    &host2,
                    cli.json,
                    cli.plot_dir.as_deref(),
                );
                #[cfg(not(feature = "verbs"))]
                {
                    let _ = (host1, host2);
                    need_verbs()
                }
            }
        },
        Cmd::Throughput {
            fabric,
            size,
            count,
            latency_ns,
            batch,
            cards: Cards { host1, host2 },
        } => match fabric {
            Fabric::Sim => {
                let r = sim_runs::throughput(size, count, latency_ns, batch);
                if cli.json {
                    println!("{}", json!({"fabric": "sim", "throughput": r}));
                } else {
                    println!(
                        "throughput, simulated fabric, {size} B x {count}, batches of {batch}"
                    );
                    println!(
                        "  {:.0} msgs/s (virtual time), {:.0} msgs/s host CPU",
                        r.virtual_msgs_per_s, r.cpu_msgs_per_s
                    );
                    println!(
                        "  {} RDMA writes: {:.1} messages per write (coalescing), {:.1} writes per completion (selective signaling)",
                        r.rdma_writes, r.messages_per_write, r.writes_per_completion
                    );
                }
            }
            Fabric::Verbs => {
                if batch != 1 {
                    eprintln!("--batch is for the simulated fabric (on verbs: connect --flood --send-batch)");
                    std::process::exit(2);
                }
                #[cfg(feature = "verbs")]
                verbs_runs::throughput(size, count, &host1, &host2, cli.json);
                #[cfg(not(feature = "verbs"))]
                {
                    let _ = (host1, host2);
                    need_verbs()
                }
            }
        },
        Cmd::Failover {
            fabric,
            kinds,
            modes,
            reps,
            interval_ns,
            latency_ns,
            size,
            seed,
            cards: Cards { host1, host2 },
            fault_script,
        } => {
            let known: Vec<&str> = match fabric {
                Fabric::Sim => sim_runs::KINDS.to_vec(),
                Fabric::Verbs => FAULTS_ON_VERBS.to_vec(),
            };
            let kinds: Vec<String> = if kinds.is_empty() {
                known.iter().map(|s| s.to_string()).collect()
            } else {
                kinds
            };
            for k in &kinds {
                if !known.contains(&k.as_str()) {
                    eprintln!("unknown fault kind {k}; known here: {}", known.join(", "));
                    std::process::exit(2);
                }
            }
            let modes: Vec<RailMode> = if modes.is_empty() {
                vec![RailMode::ActiveStandby, RailMode::HotHot]
            } else {
                modes.iter().map(|m| peer::rail_mode(m)).collect()
            };
            let mut reports = Vec::new();
            for (i, k) in kinds.iter().enumerate() {
                for &mode in &modes {
                    if !cli.json {
                        eprintln!(
                            "[{}/{}] {k}, {}: {reps} repetitions...",
                            i + 1,
                            kinds.len(),
                            sim_runs::mode_name(mode)
                        );
                    }
                    reports.push(match fabric {
                        Fabric::Sim => {
                            sim_runs::failover(k, mode, reps, interval_ns, latency_ns, seed, size)
                        }
                        Fabric::Verbs => {
                            #[cfg(feature = "verbs")]
                            {
                                verbs_runs::failover(
                                    k,
                                    mode,
                                    reps,
                                    size,
                                    &host1,
                                    &host2,
                                    &fault_script,
                                )
                            }
                            #[cfg(not(feature = "verbs"))]
                            {
                                let _ = (&host1, &host2, &fault_script);
                                need_verbs()
                            }
                        }
                    });
                }
            }
            let name = match fabric {
                Fabric::Sim => "sim",
                Fabric::Verbs => "verbs",
            };
            if cli.json {
                println!("{}", json!({"fabric": name, "failover": reports}));
            } else {
                let setting = match fabric {
                    Fabric::Sim => format!("the simulated fabric: 2 rails, heartbeat 1 ms x 3 misses, one-way latency {} us, a {size} B message every {} us", latency_ns as f64 / 1e3, interval_ns as f64 / 1e3),
                    Fabric::Verbs => format!("rxe {host1:?} <-> {host2:?}: heartbeat 1 ms, {size} B messages streamed; faults by {fault_script}"),
                };
                print_failover_table(&setting, &reports, fabric == Fabric::Sim);
            }
            if let Some(dir) = &cli.plot_dir {
                for r in &reports {
                    let path = format!("{dir}/failover-{}-{}.svg", r.kind, r.mode);
                    plot::timeline(
                        &path,
                        &format!("failover timeline (sim): {}", r.kind),
                        &r.timeline,
                        r.fault_at_ms,
                    )
                    .expect("plot");
                    eprintln!("wrote {path}");
                }
            }
            if reports
                .iter()
                .any(|r| r.lost + r.duplicated + r.reordered > 0)
            {
                std::process::exit(1);
            }
        }
        Cmd::Serve { args, port } => {
            #[cfg(feature = "verbs")]
            peer::serve(args, port, cli.json);
            #[cfg(not(feature = "verbs"))]
            {
                let _ = (args, port);
                need_verbs()
            }
        }
        Cmd::Replica { cmd } => run_replica(cmd, cli.json),
        Cmd::Connect { args, addr } => {
            #[cfg(feature = "verbs")]
            peer::connect_to(args, addr, cli.json);
            #[cfg(not(feature = "verbs"))]
            {
                let _ = (args, addr);
                need_verbs()
            }
        }
        Cmd::RawPingpong {
            size,
            iterations,
            warmup,
            client,
            server,
            client_cpu,
            server_cpu,
        } => {
            #[cfg(feature = "verbs")]
            raw_verbs::raw_pingpong(
                size,
                iterations,
                warmup,
                (&client, client_cpu),
                (&server, server_cpu),
                cli.json,
            );
            #[cfg(not(feature = "verbs"))]
            {
                let _ = (
                    size, iterations, warmup, client, server, client_cpu, server_cpu,
                );
                need_verbs()
            }
        }
    }
}
