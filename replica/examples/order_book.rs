//! A replicated order book, end to end on this host, no RDMA needed:
//!
//!     cargo run --release -p railover-replica --example order_book
//!
//! A primary and its backup, each serving clients over loopback TCP, replicate over railover on
//! the simulated fabric (two rails). A client streams orders; halfway through, the primary is
//! killed (its cards vanish, its sockets close). The backup takes over, the client follows it and
//! resends what was unanswered; every order is answered exactly once. On real cards the same
//! roles run as processes: `railover-bench replica backup|primary|client` (README).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use railover::sim::SimPair;
use railover::Config;
use railover_replica::matching::{OrderBook, OrderReply, OrderRequest, RiskLimits, Side};
use railover_replica::net::{Server, ServerEvent, TcpClient};
use railover_replica::node::{NodeConfig, NodeEvent};
use railover_replica::{ClientEvent, Node};

fn main() {
    const ORDERS: u64 = 1_000;
    let cfg = Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .build()
        .expect("valid config");
    let pair = SimPair::new(cfg, 1, 2_000).expect("simulated fabric");
    let cards = pair.cards.clone();
    let (fabric, to_backup, to_primary) = pair.into_parts();
    let listeners = [
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
    ];
    let servers = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let [l1, l2] = listeners;
    let risk = || RiskLimits::new(1_000_000);
    let mut primary = Some(
        Server::new(
            Node::primary(NodeConfig::default(), OrderBook::new(), risk(), 1),
            l1,
        )
        .expect("primary"),
    );
    let mut backup = Server::new(
        Node::<OrderBook, _>::joining(NodeConfig::default(), risk(), 2),
        l2,
    )
    .expect("backup");
    backup.attach_replication(to_primary).expect("small state");
    primary
        .as_mut()
        .expect("up")
        .attach_replication(to_backup)
        .expect("small state");
    let mut client = TcpClient::new(1, servers, Duration::from_millis(2));

    let started = Instant::now();
    let (mut sent, mut answered, mut trades) = (0u64, BTreeMap::new(), 0usize);
    while answered.len() < ORDERS as usize {
        while sent < ORDERS && client.unanswered() < 8 {
            sent += 1;
            let order = OrderRequest::New {
                side: if sent % 2 == 0 { Side::Buy } else { Side::Sell },
                price: 99 + sent % 3,
                qty: 1 + sent % 7,
            };
            client.request(order.encode());
        }
        client.run_once();
        while let Some(e) = client.poll_event() {
            if let ClientEvent::Answered { seq, body } = e {
                if let Some(OrderReply::Accepted { fills, .. }) = OrderReply::decode(&body) {
                    trades += fills.len();
                }
                answered.insert(seq, body);
            }
        }
        if let Some(p) = &mut primary {
            p.run_once();
            if answered.len() as u64 >= ORDERS / 2 {
                println!(
                    "{:>6.1} ms: {} orders answered; killing the primary",
                    started.elapsed().as_secs_f64() * 1e3,
                    answered.len()
                );
                for (card, _) in &cards {
                    fabric.remove_card(card);
                }
                std::mem::forget(p.take_replication()); // a killed process says nothing
                primary = None;
            }
        }
        backup.run_once();
        while let Some(e) = backup.poll_event() {
            let at = started.elapsed().as_secs_f64() * 1e3;
            match e {
                ServerEvent::Node(NodeEvent::BackupSynced { .. }) => {}
                ServerEvent::Node(NodeEvent::Promoted { applied }) => {
                    println!("{at:>6.1} ms: the backup takes over with {applied} orders applied")
                }
                other => println!("{at:>6.1} ms: backup: {other:?}"),
            }
        }
        fabric.advance_to(fabric.now() + 10_000);
    }
    println!(
        "{:>6.1} ms: all {ORDERS} orders answered exactly once ({trades} fills); the new primary \
         applied {} orders, server switches by the client: {}",
        started.elapsed().as_secs_f64() * 1e3,
        backup.node().applied(),
        client.switches
    );
}
