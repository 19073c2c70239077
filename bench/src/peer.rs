//! Two-process mode (`serve` / `connect`): one process per host, as users run railover and as
//! perftest runs (`-d`, `-s`, `--json`). Both sides stream numbered records to each other at a
//! set pace for a set time, check every delivery (lost, duplicated, reordered, corrupted), time
//! every library call (its worst case is what a paused peer or a re-arm costs the data thread),
//! then end the stream with an END record carrying the count; the closing side closes
//! gracefully once it has the peer's END, the other side sees `PeerClosed`. Each prints
//! `listening <port>` (serve) and `connected` lines, then one JSON report. With
//! `--connections N` one thread drives N connections (totals in the report), and the report
//! says how many queue pairs and registrations the process held at the end of the streams.

#![cfg_attr(not(feature = "verbs"), allow(dead_code))]

#[cfg(feature = "verbs")]
use std::io::Write;
#[cfg(feature = "verbs")]
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
#[cfg(feature = "verbs")]
use std::time::Instant;

#[cfg(feature = "verbs")]
use railover::core::Event;
use railover::settings::Settings;
#[cfg(feature = "verbs")]
use railover::verbs::{
    accept, accept_resuming, connect, connect_resuming, VerbsConnection, VerbsEndpoint,
};
#[cfg(feature = "verbs")]
use railover::ConnectionId;
#[cfg(feature = "verbs")]
use railover::SendError;
use railover::{Config, ConfigBuilder, GraySwitch, RailMode};
#[cfg(feature = "verbs")]
use railover::{ConnectError, EndReason, ResumeState};
use railover_rdma::LinkParams;
#[cfg(feature = "verbs")]
use serde_json::json;

/// The END record's marker in the sequence field.
pub(crate) const END: u64 = u64::MAX;

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
    /// Missed heartbeats before a rail is declared dead (TCG emulation needs ~30 of 1 ms; NICs 3).
    #[arg(long, default_value_t = 30)]
    hb_misses: u32,
    /// Heartbeat interval (us).
    #[arg(long, default_value_t = 1000)]
    hb_interval_us: u64,
    /// How long the peer may be unresponsive before the session ends (ms).
    #[arg(long, default_value_t = 20_000)]
    session_timeout_ms: u64,
    /// Set-up timeout (s).
    #[arg(long, default_value_t = 60)]
    setup_secs: u64,
    /// Connections to open between the two processes (each streams; one thread drives all,
    /// as a gateway's event loop would).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Make the connections on one `railover::Endpoint`: each card opened once (one device
    /// context and protection domain per card for all connections), its events read once and
    /// handed to every connection, one control thread; `serve` takes clients with the
    /// endpoint's background listener, `connect` dials them all at once in the background.
    /// (Not with `--resume`, `--pingpong` or `--flood`.)
    #[arg(long, conflicts_with_all = ["resume", "pingpong", "flood"])]
    endpoint: bool,
    /// Print `redundant` once every rail of every connection is up and has heard its peer (a
    /// test injects its fault after that line).
    #[arg(long)]
    say_redundant: bool,
    /// When a session ends other than by a close (every rail down, session timeout), open a new
    /// connection that resumes its stream exactly once (retrying for up to a minute).
    #[arg(long)]
    resume: bool,
    /// Marks a steady-state window (the middle third of the stream) for a system-call tracer:
    /// writes `railover-window-begin` / `railover-window-end` to stderr at its edges and reports
    /// what the connections did inside it (`window` in the report).
    #[arg(long)]
    mark_window: bool,
    /// Instead of the paced stream, a ping-pong (see `peer_perf`): `connect --pingpong N` times
    /// N round trips, `serve --pingpong` echoes.
    #[arg(long, num_args = 0..=1, default_missing_value = "0")]
    pingpong: Option<u64>,
    /// Instead of the paced stream, a flood: `connect --flood N` sends N records as fast as it
    /// can, `serve --flood` counts them and reports the rate.
    #[arg(long, num_args = 0..=1, default_missing_value = "0")]
    flood: Option<u64>,
    /// Iterations, as perftest's `-n`: the timed round trips of `connect --pingpong` or the
    /// records of `connect --flood` (for either, instead of the count after the flag).
    #[arg(short = 'n', long = "iters", conflicts_with = "endpoint")]
    iters: Option<u64>,
    /// Untimed round trips before the timed ones (`--pingpong`).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Records committed per post (`--flood`): they go out coalesced, in as few writes as fit.
    #[arg(long, default_value_t = 16)]
    batch: u64,
    /// Send N records at a time with one `send_batch` call (all or none, one commit, one
    /// write when they fit) instead of one `send` each: on every turn of the paced stream
    /// (its pace is then N records per interval), and for `connect --flood` (instead of
    /// `--batch`'s reserve-and-commit). 1: `send`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    send_batch: u64,
    /// How this side's stream uses the rails: active-standby or hot-hot (every record on every
    /// live rail).
    #[arg(long, default_value = "active-standby")]
    rail_mode: String,
    /// Gray-failure switch: leave the active rail when its write latency exceeds the best
    /// standby's by this much (us; 0: off) ...
    #[arg(long, default_value_t = 0)]
    gray_margin_us: u64,
    /// ... for this long (ms) ...
    #[arg(long, default_value_t = 20)]
    gray_window_ms: u64,
    /// ... and don't choose it again for this long (ms).
    #[arg(long, default_value_t = 10_000)]
    gray_hold_ms: u64,
    /// ... or when its card counted at least this many RC retransmissions in a window (0: off).
    #[arg(long, default_value_t = 0)]
    gray_retransmits: u32,
    /// A JSON settings file (see `railover::settings`), applied over the flags above.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// RC transport retries (each ~33 ms here) before a write fails the rail: more lets a slow
    /// wire be left by the gray switch rather than failed.
    #[arg(long, default_value_t = 1)]
    rc_retries: u8,
    /// RC local ACK timeout exponent (4.096 us x 2^N per attempt; 13: ~33 ms): raise it for a
    /// wire delayed beyond that round trip, or every write is sent again.
    #[arg(long, default_value_t = 13)]
    rc_timeout: u8,
}

/// The rail mode named on the command line.
pub fn rail_mode(name: &str) -> RailMode {
    match name {
        "active-standby" => RailMode::ActiveStandby,
        "hot-hot" => RailMode::HotHot,
        other => {
            eprintln!("unknown rail mode {other}; known: active-standby, hot-hot");
            std::process::exit(2);
        }
    }
}

/// What the connections did inside the marked window.
#[cfg(feature = "verbs")]
#[derive(Default, Clone, Copy)]
struct WindowCounts {
    sent: u64,
    delivered: u64,
    data_writes: u64,
    control_writes: u64,
}

#[cfg(feature = "verbs")]
impl WindowCounts {
    fn now(streams: &[Stream], ep: &Option<VerbsEndpoint>) -> WindowCounts {
        let mut w = WindowCounts::default();
        for st in streams {
            let stats = st.conn.get(ep).core().stats();
            w.sent += st.next_out;
            w.delivered += st.check.delivered;
            w.data_writes += stats.data_writes;
            w.control_writes += stats.control_writes;
        }
        w
    }

    fn since(self, begin: WindowCounts) -> serde_json::Value {
        json!({
            "sent": self.sent - begin.sent,
            "delivered": self.delivered - begin.delivered,
            "data_writes": self.data_writes - begin.data_writes,
            "control_writes": self.control_writes - begin.control_writes,
        })
    }
}

/// One marker line on stderr: a single `write(2, ..)` the tracer finds.
#[cfg(feature = "verbs")]
fn mark(what: &str) {
    let _ = std::io::stderr().write_all(format!("railover-window-{what}\n").as_bytes());
}

fn config(a: &PeerArgs) -> Config {
    let mut b = verbs_config(a.hb_interval_us, a.hb_misses, a.session_timeout_ms)
        .rails(a.devices.len())
        .geometry(64 * 1024, 16, a.size.max(64))
        .close_linger(Duration::from_secs(5))
        .link_params(LinkParams {
            timeout: a.rc_timeout,
            retry_cnt: a.rc_retries,
            ..LinkParams::default()
        })
        .rail_mode(rail_mode(&a.rail_mode));
    if a.gray_margin_us > 0 {
        b = b.gray_switch(
            GraySwitch::new(
                Duration::from_micros(a.gray_margin_us),
                Duration::from_millis(a.gray_window_ms),
                Duration::from_millis(a.gray_hold_ms),
            )
            .retransmits_per_window(a.gray_retransmits),
        );
    }
    if let Some(path) = &a.config {
        let applied = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| Settings::from_json(&text).map_err(|e| e.to_string()))
            .and_then(|s| s.apply(b).map_err(|e| e.to_string()));
        b = applied.unwrap_or_else(|e| {
            eprintln!("{}: {e}", path.display());
            std::process::exit(2);
        });
    }
    b.build().unwrap_or_else(|e| {
        eprintln!("invalid configuration: {e}");
        std::process::exit(2);
    })
}

/// What every two-process tool sets on real cards (under TCG emulation too): heartbeats, session
/// timeout, one transport retry of ~33 ms, two seconds for the first contact, re-arms after 1 s.
pub fn verbs_config(hb_interval_us: u64, hb_misses: u32, session_timeout_ms: u64) -> ConfigBuilder {
    Config::builder()
        .heartbeat_interval(Duration::from_micros(hb_interval_us))
        .heartbeat_misses(hb_misses)
        .session_timeout(Duration::from_millis(session_timeout_ms))
        .link_params(LinkParams {
            timeout: 13,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .first_contact_grace(Duration::from_secs(2))
        .rearm_after(Duration::from_secs(1))
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
    let setup = Duration::from_secs(args.setup_secs);
    if args.endpoint {
        // The endpoint's background listener sets the clients up.
        let mut ep = VerbsEndpoint::open(config(&args), &devs).expect("open the cards");
        ep.listen(listener, setup).expect("listen");
        let ids = gather(&mut ep, args.connections.max(1), setup, None);
        let reconnect = |_: &ResumeState| -> Result<VerbsConnection, ConnectError> {
            unreachable!("--resume is refused with --endpoint")
        };
        return stream(
            "serve",
            Held::Endpoint(Box::new(ep), ids),
            &args,
            as_json,
            &reconnect,
        );
    }
    let conns = (0..args.connections.max(1))
        .map(|_| {
            accept(
                config(&args),
                &devs,
                &listener,
                Duration::from_secs(args.setup_secs),
            )
            .expect("accept")
        })
        .collect();
    let Some(conns) = perf(false, &args, conns) else {
        return;
    };
    let reconnect =
        |state: &ResumeState| accept_resuming(config(&args), &devs, &listener, setup, state);
    stream("serve", Held::Own(conns), &args, as_json, &reconnect);
}

#[cfg(feature = "verbs")]
pub fn connect_to(args: PeerArgs, addr: SocketAddr, as_json: bool) {
    let devs: Vec<&str> = args.devices.iter().map(|s| s.as_str()).collect();
    let setup = Duration::from_secs(args.setup_secs);
    if args.endpoint {
        // Dialled in the background, two at a time.
        let mut ep = VerbsEndpoint::open(config(&args), &devs).expect("open the cards");
        let ids = gather(&mut ep, args.connections.max(1), setup, Some((addr, 2)));
        let reconnect = |_: &ResumeState| -> Result<VerbsConnection, ConnectError> {
            unreachable!("--resume is refused with --endpoint")
        };
        return stream(
            "connect",
            Held::Endpoint(Box::new(ep), ids),
            &args,
            as_json,
            &reconnect,
        );
    }
    let conns = (0..args.connections.max(1))
        .map(|_| {
            connect(
                config(&args),
                &devs,
                addr,
                Duration::from_secs(args.setup_secs),
            )
            .expect("connect")
        })
        .collect();
    let Some(conns) = perf(true, &args, conns) else {
        return;
    };
    let reconnect =
        |state: &ResumeState| connect_resuming(config(&args), &devs, addr, setup, state);
    stream("connect", Held::Own(conns), &args, as_json, &reconnect);
}

/// Waits for `n` connections set up in the background (`--endpoint`), keeping those already
/// there running meanwhile (nothing is delivered before the streams start). With `dial`
/// (address, at most this many set-ups at once), dials them too. (Under TCG, 64 set-ups at once
/// left two connections without a rail before their streams began: rxe's emulated packets fell
/// behind the RC retry budget.)
#[cfg(feature = "verbs")]
fn gather(
    ep: &mut VerbsEndpoint,
    n: usize,
    setup: Duration,
    dial: Option<(SocketAddr, usize)>,
) -> Vec<ConnectionId> {
    let mut ids = Vec::with_capacity(n);
    let mut waiting_since = Instant::now();
    let mut dialled = 0;
    while ids.len() < n {
        if let Some((addr, at_once)) = dial {
            while dialled < n && dialled - ids.len() < at_once {
                ep.connect_in_background(addr, setup).expect("dial");
                dialled += 1;
            }
        }
        match ep.poll_connected() {
            Some(r) => {
                ids.push(r.expect("set-up"));
                waiting_since = Instant::now();
            }
            None => {
                assert!(
                    waiting_since.elapsed() < setup,
                    "no connection within {setup:?}"
                );
                ep.poll_cards();
                for &id in &ids {
                    ep.get_mut(id).expect("held").progress();
                }
                // Pacing this loop only: the set-ups run on threads of their own.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    ids
}

/// Runs `--pingpong` or `--flood` on the first connection (None: it ran); the connections
/// back if neither was asked for.
#[cfg(feature = "verbs")]
fn perf(
    dialler: bool,
    a: &PeerArgs,
    mut conns: Vec<VerbsConnection>,
) -> Option<Vec<VerbsConnection>> {
    use crate::peer_perf as p;
    if a.pingpong.is_none() && a.flood.is_none() {
        if a.iters.is_some() {
            eprintln!("-n counts `--pingpong` or `--flood` runs; the paced stream runs for --secs");
            std::process::exit(2);
        }
        return Some(conns);
    }
    println!("connected");
    let _ = std::io::stdout().flush();
    let conn = conns.swap_remove(0);
    // `-n N` gives the count the same way `--pingpong N` / `--flood N` do (0: not given).
    let count = |n: u64| a.iters.unwrap_or(n);
    match (a.pingpong.map(count), a.flood.map(count), dialler) {
        (Some(n), _, true) => p::pingpong_client(conn, a.size, n, a.warmup),
        (Some(_), _, false) => p::pingpong_server(conn),
        (_, Some(n), true) if a.send_batch > 1 => {
            p::flood_client_send_batch(conn, a.size, n, a.send_batch)
        }
        (_, Some(n), true) => p::flood_client(conn, a.size, n, a.batch.max(1)),
        (_, _, false) => p::flood_server(conn),
        (None, None, true) => unreachable!("checked above"),
    }
    None
}

/// One connection's stream and what it saw.
#[cfg(feature = "verbs")]
struct Stream {
    conn: Slot,
    next_out: u64,
    next_at: Instant,
    sent_end: bool,
    check: Check,
    close_result: Option<Result<(), String>>,
    error: Option<String>,
    done: bool,
    /// When both streams were complete (the closer then waits for every rail to be up).
    complete_at: Option<Instant>,
}

/// The connections a process streams on: its own, or an endpoint's.
#[cfg(feature = "verbs")]
enum Held {
    Own(Vec<VerbsConnection>),
    Endpoint(Box<VerbsEndpoint>, Vec<ConnectionId>),
}

/// One stream's connection: its own, or one of the endpoint's.
#[cfg(feature = "verbs")]
enum Slot {
    Own(Box<VerbsConnection>),
    Id(ConnectionId),
}

#[cfg(feature = "verbs")]
impl Slot {
    fn get<'a>(&'a self, ep: &'a Option<VerbsEndpoint>) -> &'a VerbsConnection {
        match self {
            Slot::Own(c) => c,
            Slot::Id(id) => ep.as_ref().and_then(|e| e.get(*id)).expect("held"),
        }
    }

    fn get_mut<'a>(&'a mut self, ep: &'a mut Option<VerbsEndpoint>) -> &'a mut VerbsConnection {
        match self {
            Slot::Own(c) => c,
            Slot::Id(id) => ep.as_mut().and_then(|e| e.get_mut(*id)).expect("held"),
        }
    }
}

/// With `--resume`: replaces a connection whose session ended (not by a close) with a new one
/// resuming its stream, retrying for up to a minute. Returns whether it did.
#[cfg(feature = "verbs")]
fn resume(
    conn: &mut VerbsConnection,
    reconnect: &dyn Fn(&ResumeState) -> Result<VerbsConnection, ConnectError>,
) -> bool {
    if matches!(
        conn.end_reason(),
        None | Some(EndReason::Closed | EndReason::PeerClosed)
    ) {
        return false;
    }
    let state = conn.resume_state();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match reconnect(&state) {
            Ok(c) => {
                *conn = c;
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "resume: not connected yet; retrying");
                // Pacing the attempts (the wires may still be down).
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    false
}

#[cfg(feature = "verbs")]
fn stream(
    role: &str,
    held: Held,
    a: &PeerArgs,
    as_json: bool,
    reconnect: &dyn Fn(&ResumeState) -> Result<VerbsConnection, ConnectError>,
) {
    println!("connected");
    let _ = std::io::stdout().flush();
    // Sized up front (1 ns to 100 s): a histogram that grew on a long call would allocate on
    // the data thread, a system call in the steady state the strace test watches.
    let mut calls = crate::stats::histogram();
    let mut timed = |started: Instant| {
        calls.saturating_record(started.elapsed().as_nanos() as u64);
    };
    let start = Instant::now();
    let stream_for = Duration::from_secs_f64(a.secs);
    let interval = Duration::from_micros(a.interval_us);
    let (mut ep, slots): (Option<VerbsEndpoint>, Vec<Slot>) = match held {
        Held::Own(conns) => (
            None,
            conns.into_iter().map(|c| Slot::Own(Box::new(c))).collect(),
        ),
        Held::Endpoint(ep, ids) => (Some(*ep), ids.into_iter().map(Slot::Id).collect()),
    };
    let mut streams: Vec<Stream> = slots
        .into_iter()
        .map(|conn| Stream {
            conn,
            next_out: 0,
            next_at: start,
            sent_end: false,
            check: Check::default(),
            close_result: None,
            error: None,
            done: false,
            complete_at: None,
        })
        .collect();
    let (mut failovers, mut rail_downs, mut rail_ups) = (0u64, 0u64, 0u64);
    // Failovers whose new active rail had no room for every record yet (a full hot standby):
    // the rest was kept aside for it.
    let mut failovers_keeping = 0u64;
    let (mut unresponsive, mut responsive, mut longest_silence_ns) = (0u64, 0u64, 0u64);
    // Time between consecutive deliveries (any connection): a blackout shows in its tail.
    let mut gaps = crate::stats::histogram(); // sized up front, as `calls`
    let mut last_delivery: Option<Instant> = None;
    // The three longest gaps and when they ended (ms into the stream): where a tail comes from.
    let mut longest_gaps: Vec<(f64, f64)> = Vec::new();
    let mut switched_at_ms: Vec<f64> = Vec::new();
    // What happened when (ms since the stream started, connection index): rail downs with their
    // reasons, failovers, re-arms, unresponsive periods.
    let mut timeline: Vec<String> = Vec::new();
    let hard_limit = stream_for + Duration::from_secs(120);
    let mut close_max = Duration::ZERO;
    let mut resumed = 0u64;
    let (window_begin, window_end) = (start + stream_for / 3, start + stream_for * 2 / 3);
    let mut window: (Option<WindowCounts>, Option<serde_json::Value>) = (None, None);
    // With the gray switch on: each rail's latency as it judges it, every 250 ms (connection 0).
    let mut next_latency_sample = start;
    // Says `redundant` (once) when every rail of every connection is up and has heard its peer:
    // a test injects its fault after that. Looked at every 50 ms.
    let (mut redundant_said, mut next_redundancy_check) = (!a.say_redundant, start);
    while streams.iter().any(|s| !s.done) {
        if let Some(ep) = &mut ep {
            ep.poll_cards(); // the streams drive their connections one by one
        }
        if !redundant_said && Instant::now() >= next_redundancy_check {
            next_redundancy_check += Duration::from_millis(50);
            redundant_said = streams.iter().all(|st| {
                let core = st.conn.get(&ep).core();
                (0..core.config().rails()).all(|r| {
                    core.rail_state(r) != railover::RailState::Failed && core.rail_proven(r)
                })
            });
            if redundant_said {
                println!("redundant");
                let _ = std::io::stdout().flush();
            }
        }
        if a.gray_margin_us > 0 && Instant::now() >= next_latency_sample {
            next_latency_sample += Duration::from_millis(250);
            let core = streams[0].conn.get(&ep).core();
            let lat: Vec<String> = (0..core.config().rails())
                .map(|r| format!("{:.2}", core.rail_latency_ns(r) as f64 / 1e6))
                .collect();
            timeline.push(format!(
                "{:.1} ms #0 latency ms (active {}): {}",
                start.elapsed().as_secs_f64() * 1e3,
                core.active_rail(),
                lat.join(" / ")
            ));
            if a.gray_retransmits > 0 {
                let counts: Vec<String> = (0..core.config().rails())
                    .map(|r| core.rail_retransmissions_in_window(r).to_string())
                    .collect();
                timeline.push(format!(
                    "{:.1} ms #0 retransmissions in the last window: {}",
                    start.elapsed().as_secs_f64() * 1e3,
                    counts.join(" / ")
                ));
            }
        }
        if a.mark_window && window.1.is_none() {
            let now = Instant::now();
            match window.0 {
                None if now >= window_begin => {
                    window.0 = Some(WindowCounts::now(&streams, &ep));
                    mark("begin");
                }
                Some(begin) if now >= window_end => {
                    mark("end");
                    window.1 = Some(WindowCounts::now(&streams, &ep).since(begin));
                }
                _ => {}
            }
        }
        for (i, st) in streams.iter_mut().enumerate().filter(|(_, s)| !s.done) {
            let now = Instant::now();
            if !st.sent_end && now >= st.next_at {
                let end = now >= start + stream_for;
                let r = if end {
                    let mut m = vec![0u8; a.size.max(16)];
                    m[..8].copy_from_slice(&END.to_le_bytes());
                    m[8..16].copy_from_slice(&st.next_out.to_le_bytes());
                    let t = Instant::now();
                    let r = st.conn.get_mut(&mut ep).send(&m).map(|_| ());
                    timed(t);
                    r
                } else if a.send_batch > 1 {
                    let batch: Vec<Vec<u8>> = (st.next_out..st.next_out + a.send_batch)
                        .map(|seq| record(seq, a.size.max(16)))
                        .collect();
                    let msgs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                    let t = Instant::now();
                    let r = st.conn.get_mut(&mut ep).send_batch(&msgs).map(|_| ());
                    timed(t);
                    r
                } else {
                    let m = record(st.next_out, a.size.max(16));
                    let t = Instant::now();
                    let r = st.conn.get_mut(&mut ep).send(&m).map(|_| ());
                    timed(t);
                    r
                };
                match r {
                    Ok(()) if end => st.sent_end = true,
                    Ok(()) => {
                        st.next_out += a.send_batch;
                        st.next_at += interval;
                    }
                    Err(SendError::Backpressure) => {} // retried on the next turn
                    Err(_) if a.resume && resume(st.conn.get_mut(&mut ep), reconnect) => {
                        resumed += 1;
                        timeline.push(format!(
                            "{:.1} ms #{i} resumed",
                            start.elapsed().as_secs_f64() * 1e3
                        ));
                        continue;
                    }
                    Err(e) => {
                        st.error = Some(format!("send: {e}"));
                        st.done = true;
                        // What led there, for the report.
                        while let Some(e) = st.conn.get_mut(&mut ep).poll_event() {
                            timeline.push(format!(
                                "{:.1} ms #{i} {e:?}",
                                start.elapsed().as_secs_f64() * 1e3
                            ));
                        }
                        continue;
                    }
                }
            }
            let t = Instant::now();
            let check = &mut st.check;
            let before = check.delivered;
            let r = st.conn.get_mut(&mut ep).poll(|m| check.deliver(m));
            timed(t);
            if st.check.delivered > before {
                let now = Instant::now();
                if let Some(last) = last_delivery {
                    let gap = now - last;
                    gaps.saturating_record(gap.as_nanos() as u64);
                    let gap_ms = gap.as_secs_f64() * 1e3;
                    if longest_gaps.len() < 3 || gap_ms > longest_gaps[2].0 {
                        longest_gaps.push((gap_ms, (now - start).as_secs_f64() * 1e3));
                        longest_gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
                        longest_gaps.truncate(3);
                    }
                }
                for _ in 1..st.check.delivered - before {
                    gaps.saturating_record(0);
                }
                last_delivery = Some(now);
            }
            while let Some(e) = st.conn.get_mut(&mut ep).poll_event() {
                if !matches!(e, Event::FailoverComplete { .. }) {
                    timeline.push(format!(
                        "{:.1} ms #{i} {e:?}",
                        start.elapsed().as_secs_f64() * 1e3
                    ));
                }
                match e {
                    Event::Failover { .. } => {
                        failovers += 1;
                        if st.conn.get_mut(&mut ep).core().keeps_records() {
                            failovers_keeping += 1;
                        }
                    }
                    Event::Switched { .. } => {
                        switched_at_ms.push(start.elapsed().as_secs_f64() * 1e3)
                    }
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
            if r.is_err() && a.resume && resume(st.conn.get_mut(&mut ep), reconnect) {
                resumed += 1;
                timeline.push(format!(
                    "{:.1} ms #{i} resumed",
                    start.elapsed().as_secs_f64() * 1e3
                ));
                continue;
            }
            if let Err(e) = r {
                if st.conn.get(&ep).end_reason().is_none() {
                    st.error = Some(format!("poll: {e}"));
                }
                st.done = true;
                continue;
            }
            let complete = st.sent_end && st.check.peer_total.is_some_and(|n| n == st.check.next);
            if complete && st.complete_at.is_none() {
                st.complete_at = Some(Instant::now());
            }
            // The closer closes once every rail is up and has heard the peer (so a rail re-armed
            // late is in place on both sides), or after 30 s of waiting for that.
            let core = st.conn.get(&ep).core();
            let healthy = (0..core.config().rails())
                .all(|r| core.rail_state(r) != railover::RailState::Failed && core.rail_proven(r));
            let waited_enough = st
                .complete_at
                .is_some_and(|t| healthy || t.elapsed() > Duration::from_secs(30));
            if complete && a.closer && waited_enough {
                // (Not a data-path call: it waits for the peer to deliver; timed apart.)
                let t = Instant::now();
                let closed = match &st.conn {
                    Slot::Own(_) => st.conn.get_mut(&mut ep).close(5_000_000_000),
                    // Its completions come through the endpoint's shared queues.
                    Slot::Id(id) => ep.as_mut().expect("held").close(*id, 5_000_000_000),
                };
                st.close_result = Some(closed.map_err(|e| e.to_string()));
                close_max = close_max.max(t.elapsed());
                st.done = true;
            }
            if start.elapsed() > hard_limit {
                st.error = Some("stream did not complete".into());
                st.done = true;
            }
        }
    }
    // Before anything is dropped: what the process holds (a leak would show here).
    let (live_qps, live_mrs) = railover_rdma::verbs::live_objects();
    let mut unacked = 0u64;
    let (mut data_bytes, mut standby_writes, mut records_resent) = (0u64, 0u64, 0u64);
    let (mut data_writes, mut control_writes) = (0u64, 0u64);
    let (mut rails, mut rails_up, mut shared_rails) = (0, 0, 0);
    let (mut sent, mut delivered, mut peer_sent, mut lost) = (0u64, 0u64, Some(0u64), 0u64);
    let (mut duplicates, mut reordered, mut corrupted) = (0u64, 0u64, 0u64);
    let mut end_reasons: Vec<String> = Vec::new();
    let mut closes: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for st in &streams {
        let conn = st.conn.get(&ep);
        conn.unacked(|_, _| unacked += 1);
        let stats = conn.core().stats();
        data_bytes += stats.data_bytes;
        data_writes += stats.data_writes;
        control_writes += stats.control_writes;
        standby_writes += stats.standby_writes;
        records_resent += stats.records_resent;
        let r = conn.core().config().rails();
        rails += r;
        shared_rails += conn.rails_on_shared_queues();
        rails_up += (0..r)
            .filter(|&x| conn.core().rail_state(x) != railover::RailState::Failed)
            .count();
        sent += st.next_out;
        delivered += st.check.delivered;
        peer_sent = peer_sent.zip(st.check.peer_total).map(|(a, b)| a + b);
        lost += st
            .check
            .peer_total
            .map_or(0, |n| n.saturating_sub(st.check.delivered));
        duplicates += st.check.duplicates;
        reordered += st.check.reordered;
        corrupted += st.check.corrupted;
        let reason = conn.end_reason().map(|r| format!("{r:?}"));
        if !end_reasons.contains(&reason.clone().unwrap_or_default()) {
            end_reasons.push(reason.unwrap_or_default());
        }
        if let Some(c) = &st.close_result {
            let c = c.clone().err().unwrap_or_else(|| "ok".into());
            if !closes.contains(&c) {
                closes.push(c);
            }
        }
        errors.extend(st.error.clone());
    }
    // One connection: plain values; several: the distinct values, joined.
    let one = |v: &Vec<String>| {
        if v.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(v.join(","))
        }
    };
    let mut report = json!({
        "role": role,
        "connections": streams.len(),
        "endpoint": ep.is_some(),
        "sent": sent,
        "delivered": delivered,
        "peer_sent": peer_sent,
        "lost": lost,
        "duplicates": duplicates,
        "reordered": reordered,
        "corrupted": corrupted,
        "failovers": failovers,
        "rail_downs": rail_downs,
        "rail_ups": rail_ups,
        "unresponsive": unresponsive,
        "responsive": responsive,
        "longest_silence_ms": longest_silence_ns as f64 / 1e6,
        "end_reason": one(&end_reasons),
        "close": one(&closes),
        "unacked": unacked,
        "rails_up": rails_up,
        "rails": rails,
        "live_qps": live_qps,
        "live_mrs": live_mrs,
        "calls": calls.len(),
        "call_p50_us": calls.value_at_quantile(0.5) as f64 / 1e3,
        "call_p9999_us": calls.value_at_quantile(0.9999) as f64 / 1e3,
        "call_max_us": calls.max() as f64 / 1e3,
        "close_max_us": close_max.as_secs_f64() * 1e6,
        "resumed": resumed,
        "switched_at_ms": switched_at_ms,
        "records_resent": records_resent,
        "data_bytes": data_bytes,
        // Every connection's control writes (heartbeats, acknowledgements, credits, reports)
        // per second, from the start of the stream to this report.
        "control_writes_per_s": control_writes as f64 / start.elapsed().as_secs_f64(),
        "standby_writes": standby_writes,
        "gap_p50_us": gaps.value_at_quantile(0.5) as f64 / 1e3,
        "gap_p999_us": gaps.value_at_quantile(0.999) as f64 / 1e3,
        "gap_max_us": gaps.max() as f64 / 1e3,
        "longest_gaps_ms_at_ms": longest_gaps,
        "window": window.1,
        "error": if errors.is_empty() { serde_json::Value::Null } else { json!(errors.join("; ")) },
        "timeline": timeline,
    });
    // Beside the literal (json! nests only so deep): the failovers that kept records, and an
    // endpoint's connections: how many rails' queue pairs are on its shared completion queues,
    // and how many of those it polls.
    report["failovers_keeping"] = json!(failovers_keeping);
    report["shared_rails"] = json!(shared_rails);
    report["completion_queues"] = json!(ep.as_ref().map_or(0, |e| e.completion_queues()));
    // RDMA writes of records (resends and the standby's copies included).
    report["data_writes"] = json!(data_writes);
    if as_json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    }
    drop(streams); // graceful closes where not closed yet (the non-closer saw PeerClosed)
}
