//! An endpoint's connections share a few completion queues per card (the simulated fabric): the
//! endpoint polls those, not one queue per link, and hands each completion to its link's
//! connection, including what a link completed before its connection was inserted. A connection
//! on them closes through the endpoint, alone or all at once when the endpoint is dropped.

use railover::core::{EndReason, Event};
use railover::endpoint::SimEndpoints;
use railover::{CloseError, Config, RecvError, SendError};
use railover_rdma::LinkParams;
use std::time::Duration;

const MS: u64 = 1_000_000;

fn config() -> Config {
    Config::builder()
        .rails(2)
        .geometry(4096, 8, 256)
        .heartbeat_interval(Duration::from_millis(1))
        .heartbeat_misses(3)
        .close_linger(Duration::from_millis(200))
        .link_params(LinkParams {
            timeout: 8,
            retry_cnt: 1,
            max_send_wr: 256,
            max_recv_wr: 256,
            ..LinkParams::default()
        })
        .build()
        .unwrap()
}

/// Steps both endpoints (delivering into `got`, by host 2's connection index) until `done`, at
/// most `limit` of virtual time.
fn drive(
    hosts: &mut SimEndpoints,
    limit: u64,
    got: &mut Vec<Vec<u64>>,
    done: impl Fn(&SimEndpoints, &Vec<Vec<u64>>) -> bool,
) {
    let end = hosts.now() + limit;
    while !done(hosts, got) && hosts.now() < end {
        let t = hosts.next_deadline(end);
        hosts.fabric.advance_to(t);
        hosts.a.poll(|_, _, _| {});
        hosts.b.poll(|id, seq, _| {
            let i = id.index();
            if got.len() <= i {
                got.resize(i + 1, Vec::new());
            }
            got[i].push(seq);
        });
    }
}

#[test]
fn an_endpoint_polls_a_few_shared_queues_not_one_per_link() {
    let mut hosts = SimEndpoints::new(config(), 11, 2_000).unwrap();
    let n: usize = 40;
    for _ in 0..n {
        hosts.connect().unwrap();
    }
    // 256 + 256 completions per link, 16,384 per queue, twice over: 16 links a queue.
    let per_queue = 16;
    let want = 2 * n.div_ceil(per_queue);
    assert_eq!(hosts.a.completion_queues(), want, "host 1's queues");
    assert_eq!(hosts.b.completion_queues(), want, "host 2's queues");
    for (a, b) in hosts.pairs.clone() {
        assert!(hosts.a.get(a).unwrap().on_shared_queues());
        assert!(hosts.b.get(b).unwrap().on_shared_queues());
        for k in 0..3 {
            assert_eq!(hosts.a.send(a, &[k; 8]), Ok(k as u64 + 1));
        }
    }
    let mut got = Vec::new();
    drive(&mut hosts, 50 * MS, &mut got, |_, got| {
        got.iter().map(Vec::len).sum::<usize>() == 3 * n
    });
    for (_, b) in &hosts.pairs {
        assert_eq!(got[b.index()], [1, 2, 3], "connection {b}, in order, once");
    }
}

#[test]
fn completions_that_come_before_the_insert_wait_for_it() {
    let mut hosts = SimEndpoints::new(config(), 12, 2_000).unwrap();
    let (pa, pb) = (hosts.a.prepare().unwrap(), hosts.b.prepare().unwrap());
    let (ha, hb) = (pa.hellos().to_vec(), pb.hellos().to_vec());
    let (ca, cb) = (pa.connect(&hb).unwrap(), pb.connect(&ha).unwrap());
    let b = hosts.b.insert(cb);
    for k in 1..=5u8 {
        hosts.b.send(b, &[k; 32]).unwrap();
    }
    // Host 1's endpoint polls its queues meanwhile: the records' completions come for a link
    // whose connection it doesn't hold yet.
    let end = hosts.now() + 2 * MS;
    while hosts.now() < end {
        let t = hosts.next_deadline(end);
        hosts.fabric.advance_to(t);
        let n = hosts.a.poll(|id, _, _| panic!("{id} is not inserted yet"));
        assert_eq!(n, 0);
        hosts.b.poll(|_, _, _| {});
    }
    let a = hosts.a.insert(ca);
    let mut seqs = Vec::new();
    hosts.a.poll(|id, seq, msg| {
        assert_eq!(id, a);
        assert_eq!(msg, &[seq as u8; 32]);
        seqs.push(seq);
    });
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5],
        "delivered at the first poll after the insert"
    );
    let stats = hosts.a.stats(a).unwrap();
    assert_eq!(stats.failovers, 0, "nothing had to be sent again");
}

#[test]
fn closing_a_connection_of_the_endpoint_waits_only_for_the_peer() {
    let mut hosts = SimEndpoints::new(config(), 13, 2_000).unwrap();
    let (a, b) = hosts.connect().unwrap();
    let (a2, _) = hosts.connect().unwrap();
    for k in 1..=4u8 {
        hosts.a.send(a, &[k; 16]).unwrap();
    }
    let mut got = Vec::new();
    drive(&mut hosts, 20 * MS, &mut got, |h, _| {
        h.a.get(a).unwrap().core().peer_delivered() == 4
    });
    // Alone, its completions never reach it: the close is started, and the endpoint finishes it.
    let alone = hosts.a.get_mut(a).unwrap().close(200 * MS);
    assert_eq!(alone, Err(CloseError::DrivenByEndpoint));
    let wait = hosts.a.get_mut(a2).unwrap().poll_blocking(MS, |_| {});
    assert_eq!(
        wait,
        Err(RecvError::DrivenByEndpoint),
        "a blocking receive alone"
    );
    let start = hosts.now();
    assert_eq!(hosts.a.close(a, 200 * MS), Ok(()));
    let took = hosts.now() - start;
    assert!(
        took < 10 * MS,
        "the close took {took} ns: it waited out its linger"
    );
    assert_eq!(
        hosts.a.get(a).unwrap().end_reason(),
        Some(EndReason::Closed)
    );
    assert!(
        hosts.a.get(a2).unwrap().end_reason().is_none(),
        "the other one runs on"
    );
    drive(&mut hosts, 20 * MS, &mut got, |h, _| {
        h.b.get(b).unwrap().end_reason().is_some()
    });
    assert_eq!(got[b.index()], [1, 2, 3, 4]);
    assert_eq!(
        hosts.b.get(b).unwrap().end_reason(),
        Some(EndReason::PeerClosed)
    );
}

#[test]
fn dropping_the_endpoint_closes_its_connections_together() {
    let mut hosts = SimEndpoints::new(config(), 14, 2_000).unwrap();
    let n = 8;
    for _ in 0..n {
        hosts.connect().unwrap();
    }
    let mut got = Vec::new();
    drive(&mut hosts, 5 * MS, &mut got, |_, _| false);
    let SimEndpoints {
        fabric, a, mut b, ..
    } = hosts;
    let start = fabric.now();
    drop(a);
    let took = fabric.now() - start;
    assert!(
        took < 200 * MS,
        "the drop took {took} ns: it waited out a linger of 200 ms"
    );
    // Every peer heard a goodbye, not a fault.
    let mut closed = 0;
    let end = fabric.now() + 20 * MS;
    while closed < n && fabric.now() < end {
        let t = [fabric.next_event_time(), b.next_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end)
            .min(end);
        fabric.advance_to(t.max(fabric.now()));
        b.poll(|_, _, _| {});
        while let Some((id, event)) = b.poll_event() {
            if let Event::Ended { reason, .. } = event {
                assert_eq!(reason, EndReason::PeerClosed, "connection {id}");
                closed += 1;
            }
        }
    }
    assert_eq!(closed, n, "every peer saw the goodbye");
}

#[test]
fn a_full_ring_on_an_endpoint_connection_does_not_wait_in_send_timeout() {
    let mut hosts = SimEndpoints::new(config(), 15, 2_000).unwrap();
    let (a, _) = hosts.connect().unwrap();
    let msg = [7u8; 200];
    let mut accepted = 0;
    loop {
        match hosts.a.send(a, &msg) {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e, SendError::Backpressure);
                break;
            }
        }
        assert!(accepted < 10_000, "the ring never filled");
    }
    // Its own wait would never see the acknowledgements (they come through the endpoint).
    let start = hosts.now();
    let full = hosts.a.get_mut(a).unwrap().send_timeout(&msg, 100 * MS);
    assert_eq!(full, Err(SendError::DrivenByEndpoint));
    assert_eq!(hosts.now(), start, "it returned at once");
    // The endpoint's poll frees the space.
    let mut got = Vec::new();
    drive(&mut hosts, 50 * MS, &mut got, |h, _| {
        h.a.get(a).unwrap().core().peer_delivered() == accepted
    });
    assert!(hosts.a.send(a, &msg).is_ok());
}
