//! The simulator's faults behave as real RC hardware does (so failover tested on it means something).

use std::sync::Arc;

use railover_rdma::contract::{connected_pair, HeapBuffer};
use railover_rdma::sim::{SimFabric, SimLink};
use railover_rdma::{
    Access, AsyncEvent, Completion, CompletionKind, Link, LinkParams, MemoryRegistration, Nic,
    WcStatus,
};

struct Rig {
    fab: SimFabric,
    wire: railover_rdma::sim::WireId,
    a: railover_rdma::sim::SimNic,
    b: railover_rdma::sim::SimNic,
    la: SimLink,
    lb: SimLink,
    src: Arc<HeapBuffer>,
    dst: Arc<HeapBuffer>,
    mr_src: railover_rdma::sim::SimMr,
    mr_dst: railover_rdma::sim::SimMr,
}

fn rig(params: LinkParams) -> Rig {
    let fab = SimFabric::new(7);
    let (a, b, wire) = fab.add_wire("a1", "a2", 1_000);
    let src = HeapBuffer::new(4096);
    let dst = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    struct E;
    impl railover_rdma::contract::ContractEnv for E {
        type Nic = railover_rdma::sim::SimNic;
        fn cards(&mut self) -> (Self::Nic, Self::Nic) {
            unreachable!()
        }
        fn wait(&mut self, _: &mut SimLink, _: usize) -> Vec<Completion> {
            unreachable!()
        }
        fn wait_shared(
            &mut self,
            _: &mut railover_rdma::sim::SimSharedCq,
            _: usize,
        ) -> Vec<railover_rdma::SharedCompletion> {
            unreachable!()
        }
    }
    let (la, mut lb) = connected_pair::<E>(&a, &b, &params);
    lb.post_recvs(16).unwrap();
    Rig {
        fab,
        wire,
        a,
        b,
        la,
        lb,
        src,
        dst,
        mr_src,
        mr_dst,
    }
}

fn drain(l: &mut SimLink) -> Vec<Completion> {
    let mut buf = [Completion::EMPTY; 64];
    let n = l.poll(&mut buf);
    buf[..n].to_vec()
}

#[test]
fn black_hole_fails_at_the_retry_budget_not_before() {
    let params = LinkParams {
        timeout: 10,
        retry_cnt: 1,
        ..LinkParams::default()
    };
    let mut r = rig(params);
    r.fab.black_hole(r.wire);
    r.la.post_write(1, &r.mr_src, 0, 8, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.la.post_write(2, &r.mr_src, 8, 8, &r.mr_dst.remote(), 8, Some(2), true)
        .unwrap();
    let budget = params.retry_budget_ns();
    assert_eq!(
        budget,
        2 * 4096 * 1024,
        "(retry_cnt + 1) x 4.096 us x 2^timeout"
    );
    r.fab.advance_to(budget); // the stall starts when the write reaches the wire (1 us later)
    assert!(
        drain(&mut r.la).is_empty(),
        "silent until the budget runs out"
    );
    assert!(r.a.poll_event().is_none(), "a black hole raises no event");
    r.fab.advance_to(budget + 2_000);
    let c = drain(&mut r.la);
    assert_eq!(
        c.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        vec![(1, WcStatus::RetryExceeded), (2, WcStatus::Flushed)]
    );
    assert!(drain(&mut r.lb).is_empty(), "the receiver never learns");
}

#[test]
fn black_hole_cleared_in_time_retransmits() {
    let mut r = rig(LinkParams::default());
    r.fab.black_hole(r.wire);
    r.src.write(0, b"retransmitted");
    r.la.post_write(1, &r.mr_src, 0, 13, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.fab.advance_to(100_000);
    r.fab.clear_black_hole(r.wire);
    r.fab.advance_to(200_000);
    assert_eq!(drain(&mut r.la)[0].status, WcStatus::Success);
    assert_eq!(r.dst.read(0, 13), b"retransmitted");
}

#[test]
fn carrier_loss_raises_port_events_on_both_cards_and_flushes() {
    let mut r = rig(LinkParams::default());
    r.la.post_write(1, &r.mr_src, 0, 8, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.fab.carrier_loss(r.wire);
    assert_eq!(r.a.poll_event(), Some(AsyncEvent::PortDown));
    assert_eq!(r.b.poll_event(), Some(AsyncEvent::PortDown));
    assert_eq!(drain(&mut r.la)[0].status, WcStatus::Flushed);
    assert!(drain(&mut r.lb)
        .iter()
        .all(|c| c.status == WcStatus::Flushed && c.kind == CompletionKind::Recv));
    r.fab.carrier_restore(r.wire);
    assert_eq!(r.a.poll_event(), Some(AsyncEvent::PortActive));
}

#[test]
fn ack_loss_delivers_the_data_but_fails_the_send() {
    let mut r = rig(LinkParams::default());
    r.fab.ack_loss(r.wire);
    r.src.write(0, b"landed");
    r.la.post_write(1, &r.mr_src, 0, 6, &r.mr_dst.remote(), 0, Some(6), true)
        .unwrap();
    r.fab
        .advance_to(LinkParams::default().retry_budget_ns() + 10_000);
    assert_eq!(r.dst.read(0, 6), b"landed");
    assert_eq!(
        drain(&mut r.lb)[0].kind,
        CompletionKind::RecvImm {
            imm: 6,
            byte_len: 6
        }
    );
    assert_eq!(drain(&mut r.la)[0].status, WcStatus::RetryExceeded);
}

#[test]
fn card_removal_is_device_fatal_locally_and_a_timeout_remotely() {
    let mut r = rig(LinkParams::default());
    r.fab.remove_card(&r.b);
    assert_eq!(r.b.poll_event(), Some(AsyncEvent::DeviceFatal));
    r.la.post_write(1, &r.mr_src, 0, 8, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.fab
        .advance_to(LinkParams::default().retry_budget_ns() + 10_000);
    assert_eq!(drain(&mut r.la)[0].status, WcStatus::RetryExceeded);
    assert!(r.a.poll_event().is_none());
}

#[test]
fn corruption_flips_bytes_of_the_next_write_only() {
    let mut r = rig(LinkParams::default());
    r.src.write(0, &[0xAA; 64]);
    r.fab.corrupt_next(r.wire, 1);
    r.la.post_write(1, &r.mr_src, 0, 64, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.la.post_write(2, &r.mr_src, 0, 64, &r.mr_dst.remote(), 64, Some(2), true)
        .unwrap();
    r.fab.advance_to(100_000);
    assert_ne!(r.dst.read(0, 64), vec![0xAA; 64]);
    assert_eq!(r.dst.read(64, 64), vec![0xAA; 64]);
    assert_eq!(r.fab.stats().corrupted_writes, 1);
    assert_eq!(drain(&mut r.la).len(), 2);
}

#[test]
fn per_qp_order_survives_latency_spikes() {
    let mut r = rig(LinkParams::default());
    r.la.post_write(1, &r.mr_src, 0, 8, &r.mr_dst.remote(), 0, Some(1), true)
        .unwrap();
    r.fab.latency_spike(r.wire, 50_000, 1);
    r.fab.advance_to(0);
    r.la.post_write(2, &r.mr_src, 0, 8, &r.mr_dst.remote(), 0, Some(2), true)
        .unwrap();
    r.fab.advance_to(1_000_000);
    let imms: Vec<_> = drain(&mut r.lb).into_iter().map(|c| c.kind).collect();
    assert_eq!(
        imms,
        vec![
            CompletionKind::RecvImm {
                imm: 1,
                byte_len: 8
            },
            CompletionKind::RecvImm {
                imm: 2,
                byte_len: 8
            }
        ]
    );
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let fab = SimFabric::new(seed);
        let (a, _b, _) = fab.add_wire("x", "y", 10);
        a.create_link(&LinkParams::default())
            .unwrap()
            .endpoint()
            .psn
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

/// A card's events go to every device context open on it, each reading its own copy (as each
/// `ibv_open_device` has its own async-event descriptor); clones of one handle share its
/// context and so its one queue; a queue pair's fatal event goes to the context that made it;
/// a context opened after an event never sees it; a context closes when its handle and its
/// queue pairs are all gone, and closing one takes nothing from the others.
#[test]
fn each_device_context_reads_its_own_copy_of_the_cards_events() {
    use railover_rdma::sim::SimNic;
    let fab = SimFabric::new(9);
    let (a, _b, wire) = fab.add_wire("a1", "a2", 1_000);
    let a_clone = a.clone();
    let a2 = SimNic::reopen(&a.reopen_token()).unwrap();
    fab.carrier_loss(wire);
    assert_eq!(a.poll_event(), Some(AsyncEvent::PortDown));
    assert_eq!(a_clone.poll_event(), None, "a clone read the same queue");
    assert_eq!(a2.poll_event(), Some(AsyncEvent::PortDown), "its own copy");
    assert_eq!(a2.poll_event(), None);

    let link2 = a2.create_link(&LinkParams::default()).unwrap();
    fab.qp_fatal(&link2);
    assert!(matches!(a2.poll_event(), Some(AsyncEvent::QpFatal { .. })));
    assert_eq!(a.poll_event(), None, "not the other context's queue pair");

    fab.carrier_restore(wire);
    let a3 = SimNic::reopen(&a.reopen_token()).unwrap();
    assert_eq!(a3.poll_event(), None, "opened after the event");
    assert_eq!(a.poll_event(), Some(AsyncEvent::PortActive));
    assert_eq!(a2.poll_event(), Some(AsyncEvent::PortActive));

    // The second context closes once its queue pair goes too; the others read on.
    let token = a.reopen_token();
    assert_eq!(fab.open_contexts(&a), 3);
    drop(a2);
    assert_eq!(fab.open_contexts(&a), 3, "its queue pair holds it open");
    fab.card_event(&a, AsyncEvent::Other(99));
    drop(link2);
    assert_eq!(fab.open_contexts(&a), 2, "closed with its queue pair");
    fab.card_event(&a, AsyncEvent::Other(100));
    assert_eq!(a.poll_event(), Some(AsyncEvent::Other(99)));
    assert_eq!(a.poll_event(), Some(AsyncEvent::Other(100)));
    assert_eq!(a3.poll_event(), Some(AsyncEvent::Other(99)));
    drop((a, a_clone));
    assert_eq!(
        fab.open_contexts(&a3),
        1,
        "clones close their one context together"
    );
    drop(a3);
    let a4 = SimNic::reopen(&token).unwrap();
    assert_eq!(fab.open_contexts(&a4), 1);
    assert_eq!(
        a4.poll_event(),
        None,
        "a fresh context sees only what comes after it"
    );
}
