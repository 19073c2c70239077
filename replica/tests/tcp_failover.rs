//! The process drivers ([`railover_replica::net`]) end to end on this host: two servers, a client
//! over loopback TCP, the replication connection on railover's simulated fabric. The primary is
//! killed mid-stream (its cards vanish, its sockets close, nothing is said): the backup takes
//! over and the client gets every reply exactly once. (The same with separate processes on real
//! rxe devices: `bench/tests/two_process.rs`.)

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use railover::sim::SimPair;
use railover::Config;
use railover_rdma::LinkParams;
use railover_replica::matching::{OrderBook, OrderReply, OrderRequest, RiskLimits, Side};
use railover_replica::net::{Server, ServerEvent, TcpClient};
use railover_replica::node::{NodeConfig, NodeEvent, Role};
use railover_replica::wire::RefusedRequest;
use railover_replica::{ClientEvent, Node};

fn order(n: u64) -> OrderRequest {
    OrderRequest::New {
        side: if n % 2 == 0 { Side::Buy } else { Side::Sell },
        price: 100 + n % 3,
        qty: 1 + n % 5,
    }
}

#[test]
fn a_killed_primary_is_replaced_by_the_backup_and_every_order_is_answered_once() {
    let cfg = Config::builder()
        .rails(2)
        .geometry(64 * 1024, 16, 2048)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .session_timeout(Duration::from_millis(20))
        .link_params(LinkParams {
            timeout: 8,
            retry_cnt: 1,
            ..LinkParams::default()
        })
        .build()
        .unwrap();
    let pair = SimPair::new(cfg, 7, 2_000).unwrap();
    let cards = pair.cards.clone();
    let (fabric, a, b) = pair.into_parts();
    let (l1, l2) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let servers = vec![l1.local_addr().unwrap(), l2.local_addr().unwrap()];
    let node_cfg = NodeConfig::default();
    let risk = || RiskLimits::new(u64::MAX / 2);
    let mut primary =
        Some(Server::new(Node::primary(node_cfg, OrderBook::new(), risk(), 1), l1).unwrap());
    let mut backup = Server::new(Node::<OrderBook, _>::joining(node_cfg, risk(), 2), l2).unwrap();
    backup.attach_replication(b).unwrap();
    primary.as_mut().unwrap().attach_replication(a).unwrap();
    let mut client = TcpClient::new(1, servers.clone(), Duration::from_millis(2));
    // Another connection claiming client 1's id while it is live is refused (its replies would
    // otherwise go astray).
    let (mut intruder, mut intruder_refused) = (None::<TcpClient>, false);

    const ORDERS: u64 = 600;
    const KILL_AT: usize = 200;
    let (mut sent, mut replies, mut duplicates) = (0u64, BTreeMap::new(), 0);
    let mut promoted = false;
    let mut turns = 0u64;
    while replies.len() < ORDERS as usize {
        turns += 1;
        assert!(turns < 50_000_000, "stuck: {} replies", replies.len());
        while sent < ORDERS && client.unanswered() < 8 {
            sent += 1;
            client.request(order(sent).encode());
        }
        if replies.len() >= 50 && !intruder_refused && intruder.is_none() {
            let mut i = TcpClient::new(1, servers.clone(), Duration::from_millis(2));
            i.request(order(1).encode());
            intruder = Some(i);
        }
        if let Some(i) = &mut intruder {
            i.run_once();
            while let Some(e) = i.poll_event() {
                match e {
                    ClientEvent::Refused {
                        why: RefusedRequest::ClientIdInUse,
                        ..
                    } => intruder_refused = true,
                    e => panic!("the intruder got {e:?}"),
                }
            }
            if intruder_refused {
                intruder = None;
            }
        }
        client.run_once();
        while let Some(e) = client.poll_event() {
            match e {
                ClientEvent::Answered { seq, body } => {
                    assert!(matches!(
                        OrderReply::decode(&body),
                        Some(OrderReply::Accepted { .. })
                    ));
                    replies.insert(seq, body);
                }
                ClientEvent::Duplicate { seq, body } => {
                    duplicates += 1;
                    assert_eq!(
                        replies.get(&seq),
                        Some(&body),
                        "a resent request's reply differs"
                    );
                }
                _ => {}
            }
        }
        if let Some(p) = &mut primary {
            p.run_once();
            if replies.len() >= KILL_AT {
                // kill -9: the cards vanish with the process, its sockets close, it says nothing.
                for (c1, _) in &cards {
                    fabric.remove_card(c1);
                }
                std::mem::forget(p.take_replication());
                primary = None;
            }
        }
        backup.run_once();
        while let Some(e) = backup.poll_event() {
            match e {
                ServerEvent::Node(NodeEvent::Promoted { .. }) => promoted = true,
                ServerEvent::Node(
                    e @ (NodeEvent::Divergence { .. } | NodeEvent::Refused { .. }),
                ) => {
                    panic!("backup: {e:?}")
                }
                _ => {}
            }
        }
        // Virtual time for railover moves 10 us a turn.
        fabric.advance_to(fabric.now() + 10_000);
    }
    // Every order was accepted and the engine numbers what it applies: the ids are 1..=ORDERS
    // exactly when no order was applied twice or lost.
    let mut ids: Vec<u64> = replies
        .values()
        .map(|b| match OrderReply::decode(b) {
            Some(OrderReply::Accepted { order_id, .. }) => order_id,
            r => panic!("{r:?}"),
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=ORDERS).collect::<Vec<_>>());
    assert!(promoted, "the backup took over");
    assert!(intruder_refused);
    assert_eq!(backup.node().role(), Role::Primary);
    assert_eq!(backup.node().applied(), ORDERS, "each order applied once");
    assert!(client.switches > 0);
    println!(
        "{ORDERS} orders, primary killed after {KILL_AT} replies: all answered once \
         ({duplicates} duplicate replies, identical), {} server switches",
        client.switches
    );
}
