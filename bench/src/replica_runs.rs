//! `railover-bench replica ...`: the replicated order book (`railover-replica`) as processes, and
//! its replication overhead.
//! - `replica sim`: reply latency and CPU per request with and without a backup, side by side in
//!   one run, on the simulated fabric (virtual time for the wire, this host's clock for the CPU).
//! - `replica backup` / `replica primary` / `replica client` (verbs): one process each; the
//!   client streams orders over TCP, follows the primary to the backup when it dies, and checks
//!   that every order is answered exactly once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use railover::sim::SimPair;
use railover::Config;
use railover_replica::matching::{OrderBook, OrderReply, OrderRequest, RiskLimits, Side};
use railover_replica::net::TcpClient;
use railover_replica::node::{Action, NodeConfig, NodeEvent};
use railover_replica::{ClientEvent, Node};
use serde::Serialize;

use crate::stats::{histogram, summarize_us, Summary};

#[derive(clap::Subcommand)]
pub enum ReplicaCmd {
    /// Replication overhead on the simulated fabric: reply latency (virtual) and CPU per request,
    /// solo primary against primary + backup, in one run.
    Sim {
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// One-way wire latency of the simulated fabric (ns).
        #[arg(long, default_value_t = 1_000)]
        latency_ns: u64,
    },
    /// The backup's process (verbs): takes the primary's replication connection (or dials a
    /// running primary with `--connect` and joins it from its snapshot), serves clients (refusing
    /// them until it takes over).
    #[cfg(feature = "verbs")]
    Backup {
        #[command(flatten)]
        net: NetArgs,
        /// Joins the running primary whose replication port this is (a restarted backup).
        #[arg(long)]
        connect: Option<SocketAddr>,
    },
    /// The primary's process (verbs): connects to the backup, serves clients.
    #[cfg(feature = "verbs")]
    Primary {
        #[command(flatten)]
        net: NetArgs,
        /// The backup's replication set-up address (`replica backup` prints its port); without
        /// it the primary runs solo (to compare against).
        #[arg(long)]
        backup: Option<SocketAddr>,
    },
    /// A client process: streams orders to the servers (primary first), checks every reply.
    Client {
        #[command(flatten)]
        args: ClientArgs,
    },
}

/// A client process's settings.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// The servers' client addresses, primary first.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<SocketAddr>,
    #[arg(long, default_value_t = 5_000)]
    orders: u64,
    /// Orders outstanding at once.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Pace: at most one new order every this many microseconds.
    #[arg(long, default_value_t = 500)]
    interval_us: u64,
    /// Print `answered <n>` when n orders are answered, for each n (a test kills a server then).
    #[arg(long, value_delimiter = ',')]
    mark_at: Vec<u64>,
    /// Client id.
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// A server that accepted the connection but answers nothing for this long is left for the
    /// other one (ms).
    #[arg(long, default_value_t = 100)]
    reply_timeout_ms: u64,
}

/// A server process's settings (verbs).
#[cfg(feature = "verbs")]
#[derive(clap::Args)]
pub struct NetArgs {
    /// This host's cards, one per rail.
    #[arg(short = 'd', long = "dev", value_delimiter = ',', required = true)]
    devices: Vec<String>,
    /// Port clients connect to (0: any; printed as `clients <port>`).
    #[arg(long, default_value_t = 0)]
    client_port: u16,
    /// Port replication connections are set up on: the primary's at the start, then (once this
    /// server is the primary) each joining backup's (0: any; printed as `replication <port>`).
    #[arg(long, default_value_t = 0)]
    repl_port: u16,
    /// Missed heartbeats before a rail is declared dead (TCG emulation needs ~30 of 1 ms).
    #[arg(long, default_value_t = 30)]
    hb_misses: u32,
    /// How long the peer may be unresponsive before the replication session ends (ms).
    #[arg(long, default_value_t = 2_000)]
    session_timeout_ms: u64,
    #[arg(long, default_value_t = 60)]
    setup_secs: u64,
}

/// The replication link on real cards: the two-process tools' settings (`peer::verbs_config`).
#[cfg(feature = "verbs")]
fn link_config(hb_misses: u32, session_timeout_ms: u64) -> Config {
    crate::peer::verbs_config(1_000, hb_misses, session_timeout_ms)
        .rails(2)
        .geometry(256 * 1024, 16, 2048)
        .build()
        .expect("valid config")
}

fn order(n: u64) -> OrderRequest {
    OrderRequest::New {
        side: if n % 2 == 0 { Side::Buy } else { Side::Sell },
        price: 100 + n % 3,
        qty: 1 + n % 5,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    pub requests: usize,
    pub latency_ns: u64,
    /// Request in -> reply out at the primary, virtual time (the backup's round trip).
    pub solo_reply: Summary,
    pub replicated_reply: Summary,
    /// This host's time per request: the nodes, railover and the simulated fabric, all on one
    /// thread (wall clock over the run).
    pub solo_host_ns: f64,
    pub replicated_host_ns: f64,
    pub host_time_ratio: f64,
}

/// Replication overhead on the simulated fabric: the same requests to a solo primary and to a
/// primary with a backup, one after the other in one run.
pub fn sim_overhead(requests: usize, latency_ns: u64) -> OverheadReport {
    let (solo, solo_host) = overhead_run(requests, latency_ns, false);
    let (repl, repl_host) = overhead_run(requests, latency_ns, true);
    OverheadReport {
        requests,
        latency_ns,
        solo_reply: solo,
        replicated_reply: repl,
        solo_host_ns: solo_host,
        replicated_host_ns: repl_host,
        host_time_ratio: repl_host / solo_host,
    }
}

fn overhead_run(requests: usize, latency_ns: u64, with_backup: bool) -> (Summary, f64) {
    let cfg = Config::builder()
        .rails(2)
        .geometry(256 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .build()
        .expect("valid config");
    let pair = SimPair::new(cfg, 1, latency_ns).expect("sim pair");
    let (fabric, mut a, mut b) = pair.into_parts();
    let node_cfg = NodeConfig::default();
    let mut primary = Node::primary(node_cfg, OrderBook::new(), RiskLimits::new(u64::MAX / 2), 1);
    let mut backup = Node::<OrderBook, _>::joining(node_cfg, RiskLimits::new(u64::MAX / 2), 2);
    if with_backup {
        primary.attach_backup().expect("small state");
    }
    let mut h = histogram();
    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
    let client = railover_replica::Client::new(1, 1, 0);
    let mut client = client;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut answered = 0usize;
    let mut inbox = Vec::new();
    while answered < requests {
        if sent < requests as u64 && pending.is_empty() {
            sent += 1;
            client.request(order(sent).encode());
            for (_, bytes) in client.take_outbox() {
                pending.insert(sent, fabric.now());
                primary.on_client(&bytes, fabric.now());
            }
        }
        while let Some(act) = primary.pop_action() {
            match act {
                Action::ToBackup(m) => {
                    a.send(&m).expect("replicate");
                }
                Action::ToClient { msg, .. } => {
                    if let Ok(Some(ClientEvent::Answered { seq, .. })) = client.on_message(0, &msg)
                    {
                        let t0 = pending.remove(&seq).expect("pending");
                        h.record((fabric.now() - t0).max(1)).ok();
                        answered += 1;
                    }
                }
                Action::ToPrimary(_) => unreachable!("a primary sends no acks"),
            }
        }
        if !with_backup {
            continue;
        }
        b.poll(|m| inbox.push(m.to_vec())).expect("backup link");
        for m in inbox.drain(..) {
            backup.on_replication(&m);
        }
        while let Some(act) = backup.pop_action() {
            if let Action::ToPrimary(m) = act {
                b.send(&m).expect("ack");
            }
        }
        a.poll(|m| inbox.push(m.to_vec())).expect("primary link");
        for m in inbox.drain(..) {
            primary.on_replication(&m);
        }
        if let Some(t) = fabric.next_event_time() {
            fabric.advance_to(t.max(fabric.now()));
        }
    }
    let events = std::iter::from_fn(|| backup.poll_event());
    for e in events.chain(std::iter::from_fn(|| primary.poll_event())) {
        assert!(
            matches!(e, NodeEvent::BackupSynced { .. }),
            "unexpected: {e:?}"
        );
    }
    let cpu = started.elapsed().as_nanos() as f64 / requests as f64;
    (summarize_us(&h), cpu)
}

pub fn print_overhead(r: &OverheadReport) {
    println!(
        "replication overhead, simulated fabric ({} ns one way), {} requests, one run:",
        r.latency_ns, r.requests
    );
    println!(
        "  reply latency at the primary (virtual; solo is no wire at all): solo p50 {:.2} us, replicated p50 {:.2} us p99 {:.2} us",
        r.solo_reply.p50, r.replicated_reply.p50, r.replicated_reply.p99
    );
    println!(
        "  this host's time per request (nodes, railover and the simulated fabric on one thread): solo {:.0} ns, replicated {:.0} ns",
        r.solo_host_ns, r.replicated_host_ns
    );
    println!("replication host time ratio: {:.2}", r.host_time_ratio);
}

#[cfg(feature = "verbs")]
pub fn serve(net: NetArgs, role: ServerRole, as_json: bool) {
    use railover::verbs::{accept, connect};
    use railover_replica::net::{Server, ServerEvent};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let clients = TcpListener::bind(("127.0.0.1", net.client_port)).expect("bind clients");
    let repl = TcpListener::bind(("127.0.0.1", net.repl_port)).expect("bind replication");
    println!("replication {}", repl.local_addr().expect("addr").port());
    println!("clients {}", clients.local_addr().expect("addr").port());
    flush();
    let devs: Vec<String> = net.devices.clone();
    let cfg = link_config(net.hb_misses, net.session_timeout_ms);
    let setup = Duration::from_secs(net.setup_secs);
    // Replication connections are accepted on a thread of their own (a set-up takes
    // milliseconds and must not stall the loop); one at a time is taken, others are closed.
    let (offered, incoming) = mpsc::channel();
    let replicating = Arc::new(AtomicBool::new(false));
    {
        let (devs, replicating) = (devs.clone(), replicating.clone());
        std::thread::spawn(move || {
            let devs: Vec<&str> = devs.iter().map(String::as_str).collect();
            loop {
                match accept(cfg, &devs, &repl, Duration::from_secs(3600)) {
                    // Relaxed: a hint; the loop re-checks before it takes a connection.
                    Ok(c) if !replicating.load(Ordering::Relaxed) => {
                        if offered.send(c).is_err() {
                            return;
                        }
                    }
                    Ok(c) => drop(c), // a second replica: closed
                    Err(e) => eprintln!("replication set-up refused: {e}"),
                }
            }
        });
    }
    let dial = |addr| {
        let devs: Vec<&str> = devs.iter().map(String::as_str).collect();
        connect(cfg, &devs, addr, setup).expect("connect the replication link")
    };
    // Each server process has its own risk system here, with a limit no test reaches; in
    // production it is one external system both replicas call (the simulation models that).
    let risk = RiskLimits::new(u64::MAX / 2);
    let node_cfg = NodeConfig::default();
    let seed = std::process::id() as u64 ^ railover_replica::net::wall_clock_ns();
    let (node, dialled) = match role {
        ServerRole::Backup { connect } => (
            Node::<OrderBook, _>::joining(node_cfg, risk, seed),
            connect.map(dial),
        ),
        ServerRole::Primary { backup } => (
            Node::primary(node_cfg, OrderBook::new(), risk, seed),
            backup.map(dial),
        ),
    };
    let mut server = Server::new(node, clients).expect("server");
    // An ended connection closes on a thread of its own: its goodbye may wait for a peer that
    // is gone.
    server.retire_with(|c| {
        std::thread::spawn(move || drop(c));
    });
    if let Some(conn) = dialled {
        server
            .attach_replication(conn)
            .expect("a new state fits a snapshot");
    }
    let started = Instant::now();
    let mut turns = 0u64;
    loop {
        server.run_once();
        turns += 1;
        if turns % 64 == 0 {
            if !server.has_replication() {
                if let Ok(conn) = incoming.try_recv() {
                    if let Err(e) = server.attach_replication(conn) {
                        eprintln!("a backup can't join: {e}");
                    }
                }
            }
            replicating.store(server.has_replication(), Ordering::Relaxed);
        }
        while let Some(e) = server.poll_event() {
            let at_ms = started.elapsed().as_secs_f64() * 1e3;
            let what = match &e {
                ServerEvent::Node(NodeEvent::Promoted { applied }) => {
                    format!("promoted applied={applied}")
                }
                ServerEvent::Node(NodeEvent::BackupSynced { index }) => {
                    format!("backup-synced index={index}")
                }
                ServerEvent::Node(NodeEvent::BackupLost { held }) => {
                    format!("backup-lost held={held}")
                }
                ServerEvent::ReplicationEnded(r) => format!("replication-ended {r:?}"),
                other => format!("{other:?}"),
            };
            if as_json {
                let wall_ns = railover_replica::net::wall_clock_ns();
                println!(
                    "{}",
                    serde_json::json!({ "event": what, "at_ms": at_ms, "wall_ns": wall_ns })
                );
            } else {
                println!("{at_ms:.1} ms: {what}");
            }
            flush();
        }
    }
}

#[cfg(feature = "verbs")]
pub enum ServerRole {
    Backup { connect: Option<SocketAddr> },
    Primary { backup: Option<SocketAddr> },
}

fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub orders: u64,
    pub answered: u64,
    pub duplicate_replies: u64,
    /// Duplicates whose reply differed from the first (must be 0).
    pub mismatched_duplicates: u64,
    pub lost: u64,
    pub server_switches: u64,
    /// Switches because a server answered nothing for the reply timeout.
    pub reply_timeouts: u64,
    /// Order ids the replies skip or repeat: the engine numbers the orders it applies 1, 2, 3..
    /// and every order this client sends is accepted, so with this client alone on the servers
    /// an order applied twice (or an id handed out by a primary whose entry was lost) shows as a
    /// gap. Must be 0.
    pub order_id_gaps: u64,
    /// Longest time between two replies (around a takeover: the time from the primary's death
    /// to the backup's first reply, plus one order interval).
    pub longest_reply_gap_ms: f64,
    /// When that gap ended (wall clock, ns since the epoch: comparable with the servers' events).
    pub longest_reply_gap_end_wall_ns: u64,
    pub rtt: Summary,
}

pub fn client(args: ClientArgs) -> ClientReport {
    let ClientArgs {
        servers,
        orders,
        window,
        interval_us,
        mark_at,
        id,
        reply_timeout_ms,
    } = args;
    let mut c = TcpClient::new(id, servers, Duration::from_millis(5));
    c.set_reply_timeout(Duration::from_millis(reply_timeout_ms));
    let mut replies: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut sent_at: BTreeMap<u64, Instant> = BTreeMap::new();
    let (mut dups, mut mismatched) = (0, 0);
    let mut h = histogram();
    let mut sent = 0u64;
    let mut next_send = Instant::now();
    let mut last_reply = Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut gap_end_wall_ns = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (replies.len() as u64) < orders && Instant::now() < deadline {
        let now = Instant::now();
        if sent < orders && c.unanswered() < window && now >= next_send {
            sent += 1;
            let seq = c.request(order(sent).encode());
            sent_at.insert(seq, now);
            next_send = now + Duration::from_micros(interval_us);
        }
        c.run_once();
        let mut heard = false;
        while let Some(e) = c.poll_event() {
            heard = true;
            match e {
                ClientEvent::Answered { seq, body } => {
                    let now = Instant::now();
                    if let Some(t) = sent_at.remove(&seq) {
                        h.record((now - t).as_nanos().max(1) as u64).ok();
                    }
                    // (Between replies only: the wait for the first is set-up, not a gap.)
                    if !replies.is_empty() && now - last_reply > longest_gap {
                        longest_gap = now - last_reply;
                        gap_end_wall_ns = railover_replica::net::wall_clock_ns();
                    }
                    last_reply = now;
                    replies.insert(seq, body);
                    if mark_at.contains(&(replies.len() as u64)) {
                        println!("answered {}", replies.len());
                        flush();
                    }
                }
                ClientEvent::Duplicate { seq, body } => {
                    dups += 1;
                    if replies.get(&seq) != Some(&body) {
                        mismatched += 1;
                    }
                }
                _ => {}
            }
        }
        let can_send = sent < orders && c.unanswered() < window;
        if !heard && !can_send {
            // Nothing to do until a reply comes: sleep in the kernel, not on the CPU.
            c.wait(Duration::from_millis(1));
        } else if !heard && sent < orders {
            c.wait(next_send.saturating_duration_since(Instant::now()));
        }
    }
    let mut ids: Vec<u64> = replies
        .values()
        .filter_map(|b| match OrderReply::decode(b) {
            Some(OrderReply::Accepted { order_id, .. }) => Some(order_id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let order_id_gaps = (replies.len() as u64).abs_diff(ids.len() as u64)
        + ids.last().map_or(0, |max| max - ids.len() as u64);
    ClientReport {
        order_id_gaps,
        orders,
        answered: replies.len() as u64,
        duplicate_replies: dups,
        mismatched_duplicates: mismatched,
        lost: orders - replies.len() as u64,
        server_switches: c.switches,
        reply_timeouts: c.timeouts,
        longest_reply_gap_ms: longest_gap.as_secs_f64() * 1e3,
        longest_reply_gap_end_wall_ns: gap_end_wall_ns,
        rtt: summarize_us(&h),
    }
}
