//! A gateway and its client on real cards: one process per host, many connections on one
//! `Endpoint` each (each card opened once, one `poll` for all connections).
//!
//! Host 2 (the gateway echoes every order back on the connection it came on):
//!
//!     cargo run --release -p railover --features verbs --example gateway -- \
//!         serve rxe_a2,rxe_b2 127.0.0.1:18700 8
//!
//! Host 1 (8 connections, 1,000 orders each, every echo checked):
//!
//!     cargo run --release -p railover --features verbs --example gateway -- \
//!         connect rxe_a1,rxe_b1 127.0.0.1:18700 8
//!
//! Cut a wire meanwhile (`ci/fault carrier-loss a` in the SoftRoCE VM): every connection fails over,
//! the events say so, and no order is lost, duplicated or reordered.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use railover::core::{EndReason, Event};
use railover::verbs::VerbsEndpoint;
use railover::{Config, ConnectionId, SendError};
use railover_rdma::LinkParams;

const ORDERS: u64 = 1_000;
const SETUP: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [role, devices, addr, connections] = &args[..] else {
        eprintln!("usage: gateway serve|connect <card,card> <ip:port> <connections>");
        std::process::exit(2);
    };
    let devices: Vec<&str> = devices.split(',').collect();
    let addr: SocketAddr = addr.parse().expect("ip:port");
    let n: usize = connections.parse().expect("a number of connections");
    let cfg = Config::builder()
        .rails(devices.len())
        // Software RoCE (rxe) under emulation is slow to answer: a new connection's first
        // writes take 3-22 ms, more while several set up at once, so the RC budget is ~134 ms
        // here (timeout 13 = 33.5 ms, 3 retries) and the heartbeat allows 100 ms. Real NICs
        // keep the defaults (timeout 10, 1 retry; 3 missed 1 ms beats).
        .link_params(LinkParams {
            timeout: 13,
            retry_cnt: 3,
            ..LinkParams::default()
        })
        .heartbeat_misses(100)
        .first_contact_grace(Duration::from_secs(2))
        .build()
        .expect("config");
    let mut ep = VerbsEndpoint::open(cfg, &devices).expect("open the cards");
    match role.as_str() {
        "serve" => serve(&mut ep, addr, n),
        "connect" => connect(&mut ep, addr, n),
        other => panic!("unknown role {other}"),
    }
}

/// Echoes every message back until `n` connections came and all of them closed.
fn serve(ep: &mut VerbsEndpoint, addr: SocketAddr, n: usize) {
    ep.listen(TcpListener::bind(addr).expect("bind"), SETUP)
        .expect("listen");
    println!("listening on {addr}");
    let (mut accepted, mut ended) = (0, 0);
    // Orders to echo, in arrival order (kept while a connection's ring is full).
    let mut inbox: Vec<(ConnectionId, Vec<u8>)> = Vec::new();
    while accepted < n || ended < accepted {
        if let Some(r) = ep.poll_connected() {
            let id = r.expect("client set-up");
            accepted += 1;
            println!("connection {id} up ({accepted}/{n})");
        }
        ep.poll(|id, _seq, msg| inbox.push((id, msg.to_vec())));
        let mut echoed = 0;
        for (id, msg) in &inbox {
            match ep.send(*id, msg) {
                Ok(_) => echoed += 1,
                Err(SendError::Backpressure) => break, // the rest waits for the next turn
                Err(e) => {
                    println!("connection {id}: {e}");
                    echoed += 1;
                }
            }
        }
        inbox.drain(..echoed);
        while let Some((id, event)) = ep.poll_event() {
            println!("connection {id}: {event:?}");
            if matches!(event, Event::Ended { .. }) {
                ended += 1;
            }
        }
    }
}

/// Sends `ORDERS` orders on each of `n` connections and checks every echo.
fn connect(ep: &mut VerbsEndpoint, addr: SocketAddr, n: usize) {
    for _ in 0..n {
        ep.connect_in_background(addr, SETUP).expect("dial");
    }
    let mut echoed: HashMap<ConnectionId, u64> = HashMap::new();
    while echoed.len() < n {
        if let Some(r) = ep.poll_connected() {
            echoed.insert(r.expect("set-up"), 0);
        }
        ep.poll(|_, _, _| {}); // nothing was sent yet: nothing arrives
    }
    println!("{n} connections up");
    let ids: Vec<ConnectionId> = echoed.keys().copied().collect();
    let mut sent: HashMap<ConnectionId, u64> = ids.iter().map(|&id| (id, 0)).collect();
    while echoed.values().any(|&e| e < ORDERS) {
        for &id in &ids {
            let next = sent[&id] + 1;
            if next <= ORDERS {
                match ep.send(id, &next.to_le_bytes()) {
                    Ok(_) => *sent.get_mut(&id).expect("known") = next,
                    Err(SendError::Backpressure) => {}
                    Err(e) => panic!("connection {id}: {e}"),
                }
            }
        }
        ep.poll(|id, _seq, msg| {
            let order = u64::from_le_bytes(msg.try_into().expect("8 bytes"));
            let e = echoed.get_mut(&id).expect("known");
            assert_eq!(
                order,
                *e + 1,
                "connection {id}: echoes in order, exactly once"
            );
            *e = order;
        });
        while let Some((id, event)) = ep.poll_event() {
            println!("connection {id}: {event:?}");
        }
    }
    println!(
        "{} orders echoed on {n} connections, in order",
        n as u64 * ORDERS
    );
    ep.start_close_all(5_000_000_000);
    let mut open = n;
    while open > 0 {
        ep.poll(|_, _, _| {});
        while let Some((id, event)) = ep.poll_event() {
            if let Event::Ended { reason, .. } = event {
                assert_eq!(reason, EndReason::Closed, "connection {id}");
                open -= 1;
            }
        }
    }
    println!("closed");
}
