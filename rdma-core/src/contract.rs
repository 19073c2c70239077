//! The fabric contract: behaviour railover relies on, checked identically against every fabric
//! (the simulator in plain `cargo test`, real rxe devices in the SoftRoCE VM).

use std::sync::Arc;

use crate::{
    Access, Completion, CompletionKind, FabricError, Link, LinkParams, MemoryRegistration, Nic,
    RegisterableMemory, SharedCompletion, SharedCq, WcStatus,
};

/// Zeroed, page-aligned heap memory for tests.
pub struct HeapBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}
// SAFETY: owns its allocation like a Box<[u8]>.
unsafe impl Send for HeapBuffer {}
// SAFETY: only raw pointers are handed out; tests order their accesses through completions.
unsafe impl Sync for HeapBuffer {}
impl HeapBuffer {
    pub fn new(len: usize) -> Arc<HeapBuffer> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        Arc::new(HeapBuffer {
            ptr: std::ptr::NonNull::new(raw).expect("allocation failed"),
            layout,
        })
    }
    pub fn write(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= self.layout.size());
        // SAFETY: bounds checked; no concurrent NIC access to this range in the tests' protocol.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.as_ptr().add(off), b.len()) }
    }
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.layout.size());
        let mut v = vec![0u8; len];
        // SAFETY: bounds checked; read after the completion that covers the bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), v.as_mut_ptr(), len) }
        v
    }
}
impl Drop for HeapBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
// SAFETY: the allocation lives as long as the value and never moves.
unsafe impl RegisterableMemory for HeapBuffer {
    fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// A fabric under test: two cards joined by one wire, and a way to wait for completions.
pub trait ContractEnv {
    type Nic: Nic;
    /// Host 1's and host 2's card of one wire.
    fn cards(&mut self) -> (Self::Nic, Self::Nic);
    /// Polls until `n` completions arrived (the simulator advances its clock; real devices are
    /// busy-polled up to a deadline). Returns what arrived.
    fn wait(&mut self, link: &mut <Self::Nic as Nic>::Link, n: usize) -> Vec<Completion>;
    /// As [`ContractEnv::wait`], on a shared completion queue.
    fn wait_shared(
        &mut self,
        cq: &mut <Self::Nic as Nic>::SharedCq,
        n: usize,
    ) -> Vec<SharedCompletion>;
}

type L<E> = <<E as ContractEnv>::Nic as Nic>::Link;

/// Connects a queue pair on each card to the other.
pub fn connected_pair<E: ContractEnv>(a: &E::Nic, b: &E::Nic, params: &LinkParams) -> (L<E>, L<E>) {
    let mut la = a.create_link(params).expect("create link a");
    let mut lb = b.create_link(params).expect("create link b");
    let (ea, eb) = (la.endpoint(), lb.endpoint());
    la.connect(&eb).expect("connect a");
    lb.connect(&ea).expect("connect b");
    (la, lb)
}

/// WRITE WITH IMM lands the exact bytes at the offset, consumes one receive, and reports the
/// immediate and length; the sender gets a successful completion.
pub fn write_with_imm_lands_bytes_and_imm<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(8192);
    let dst = HeapBuffer::new(8192);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let params = LinkParams::default();
    let (mut la, mut lb) = connected_pair::<E>(&a, &b, &params);
    lb.post_recvs(8).unwrap();
    // Sizes on both sides of the inline limit (verbs: at most `max_inline` bytes go inline).
    let inline = params.max_inline as usize;
    for (round, len) in [300, inline + 1, inline, 64, 1].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len as u32)
            .map(|i| (i * 7 + round as u32) as u8)
            .collect();
        dst.write(3990, &[0u8; 600]);
        src.write(100, &payload);
        let imm = 0xdead_beef - round as u32;
        la.post_write(
            42 + round as u64,
            &mr_src,
            100,
            payload.len(),
            &mr_dst.remote(),
            4000,
            Some(imm),
            true,
        )
        .unwrap();
        let rx = env.wait(&mut lb, 1);
        assert_eq!(
            rx,
            vec![Completion {
                wr_id: rx[0].wr_id,
                kind: CompletionKind::RecvImm {
                    imm,
                    byte_len: len as u32
                },
                status: WcStatus::Success
            }],
            "{len} bytes"
        );
        let tx = env.wait(&mut la, 1);
        assert_eq!(
            tx,
            vec![Completion {
                wr_id: 42 + round as u64,
                kind: CompletionKind::Write,
                status: WcStatus::Success
            }],
            "{len} bytes"
        );
        assert_eq!(dst.read(4000, len), payload, "{len} bytes");
        assert_eq!(
            dst.read(3999, 1),
            vec![0],
            "{len} bytes: nothing written before the offset"
        );
        assert_eq!(
            dst.read(4000 + len, 1),
            vec![0],
            "{len} bytes: nothing written after the range"
        );
    }
}

/// A plain WRITE (heartbeat / ack slot) lands without consuming a receive or completing on the peer.
pub fn plain_write_is_silent_at_the_receiver<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let dst = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let (mut la, mut lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    lb.post_recvs(1).unwrap();
    src.write(0, &77u64.to_le_bytes());
    la.post_write(1, &mr_src, 0, 8, &mr_dst.remote(), 64, None, true)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert_eq!(tx[0].status, WcStatus::Success);
    assert_eq!(dst.read(64, 8), 77u64.to_le_bytes().to_vec());
    // The one posted receive is still there: a following WRITE WITH IMM uses it.
    la.post_write(2, &mr_src, 0, 8, &mr_dst.remote(), 72, Some(5), true)
        .unwrap();
    let rx = env.wait(&mut lb, 1);
    assert_eq!(rx.len(), 1, "exactly one receive completion: {rx:?}");
    assert_eq!(
        rx[0].kind,
        CompletionKind::RecvImm {
            imm: 5,
            byte_len: 8
        }
    );
}

/// Completions keep per-queue-pair order, each exactly once (catches rdma-core 44's rxe CQ bug,
/// which replays stale completions when a poll batch ends).
pub fn completions_in_order_exactly_once<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let dst = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let params = LinkParams {
        max_send_wr: 64,
        max_recv_wr: 256,
        ..LinkParams::default()
    };
    let (mut la, mut lb) = connected_pair::<E>(&a, &b, &params);
    lb.post_recvs(200).unwrap();
    let mut tx_ids = Vec::new();
    let mut imms = Vec::new();
    let mut next = 0u64;
    while imms.len() < 200 {
        while next < 200 && (next as usize) < tx_ids.len() + 32 {
            src.write((next as usize % 64) * 8, &next.to_le_bytes());
            la.post_write(
                next,
                &mr_src,
                (next as usize % 64) * 8,
                8,
                &mr_dst.remote(),
                (next % 64) * 8,
                Some(next as u32),
                true,
            )
            .unwrap();
            next += 1;
        }
        let want = (next as usize - imms.len()).min(8);
        for c in env.wait(&mut lb, want) {
            match c.kind {
                CompletionKind::RecvImm { imm, .. } => imms.push(imm),
                k => panic!("unexpected {k:?}"),
            }
        }
        let want = next as usize - tx_ids.len();
        for c in env.wait(&mut la, want) {
            assert_eq!(c.status, WcStatus::Success);
            tx_ids.push(c.wr_id);
        }
    }
    let remaining = 200 - tx_ids.len();
    for c in env.wait(&mut la, remaining) {
        tx_ids.push(c.wr_id);
    }
    assert_eq!(imms, (0..200).collect::<Vec<u32>>(), "receive order");
    assert_eq!(
        tx_ids,
        (0..200).collect::<Vec<u64>>(),
        "send completion order"
    );
    assert!(
        env.wait(&mut lb, 1).is_empty(),
        "no stale or duplicate completion after the last"
    );
}

/// A write to an unknown rkey fails with a remote access error (and the link is then dead).
pub fn bad_rkey_is_a_remote_access_error<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let dst = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let (mut la, mut lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    lb.post_recvs(1).unwrap();
    let mut bad = mr_dst.remote();
    bad.rkey ^= 0x5a5a_0000;
    la.post_write(9, &mr_src, 0, 8, &bad, 0, Some(1), true)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert_eq!(tx.len(), 1);
    assert_eq!((tx[0].wr_id, tx[0].status), (9, WcStatus::RemoteAccess));
}

/// An unsignaled write lands like any other but completes only in error: after two unsignaled
/// writes and a signaled one, the signaled one's is the only completion; an unsignaled write
/// that fails (a bad rkey) still completes, with its error.
pub fn unsignaled_writes_complete_only_in_error<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let dst = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let (mut la, _lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    src.write(0, &[1, 2, 3]);
    for (wr_id, signaled) in [(11, false), (12, false), (13, true)] {
        let off = (wr_id - 11) as usize;
        la.post_write(
            wr_id,
            &mr_src,
            off,
            1,
            &mr_dst.remote(),
            off as u64,
            None,
            signaled,
        )
        .unwrap();
    }
    let tx = env.wait(&mut la, 1);
    assert_eq!(
        tx,
        vec![Completion {
            wr_id: 13,
            kind: CompletionKind::Write,
            status: WcStatus::Success
        }]
    );
    assert_eq!(dst.read(0, 3), vec![1, 2, 3], "every write landed");
    let mut bad = mr_dst.remote();
    bad.rkey ^= 0x5a5a_0000;
    la.post_write(14, &mr_src, 0, 1, &bad, 0, None, false)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert_eq!(
        (tx.len(), tx[0].wr_id, tx[0].status),
        (1, 14, WcStatus::RemoteAccess),
        "the error completes (no success of 11 or 12 before it)"
    );
}

/// Local misuse is refused before anything is posted, with typed errors.
pub fn local_misuse_is_a_typed_error<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b
        .register(HeapBuffer::new(4096), Access::RemoteWrite)
        .unwrap();
    let bad = LinkParams {
        retry_cnt: 7,
        ..LinkParams::default()
    };
    assert!(matches!(
        a.create_link(&bad),
        Err(FabricError::InvalidParams(_))
    ));
    let bad = LinkParams {
        rnr_retry: 7,
        ..LinkParams::default()
    };
    assert!(matches!(
        a.create_link(&bad),
        Err(FabricError::InvalidParams(_))
    ));
    let (mut la, _lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    let r = la.post_write(1, &mr_src, 4000, 200, &mr_dst.remote(), 0, None, true);
    assert!(matches!(r, Err(FabricError::OutOfRange { .. })), "{r:?}");
}

/// After shut_down, queued and new requests complete with flush errors (never silently vanish).
pub fn shut_down_flushes<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let src = HeapBuffer::new(4096);
    let mr_src = a.register(src.clone(), Access::Local).unwrap();
    let mr_dst = b
        .register(HeapBuffer::new(4096), Access::RemoteWrite)
        .unwrap();
    let (mut la, _lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    la.shut_down();
    la.post_write(3, &mr_src, 0, 8, &mr_dst.remote(), 0, None, true)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert_eq!(tx.len(), 1);
    assert_eq!((tx[0].wr_id, tx[0].status), (3, WcStatus::Flushed));
}

/// Two connected links, a source registered on `a` and a destination on `b`: what the wake-up
/// checks write with. None on a fabric without wake-up descriptors (virtual time), after
/// checking that neither the links nor the card claim one and that arming is harmless.
#[allow(clippy::type_complexity)]
fn wake_setup<E: ContractEnv>(
    env: &mut E,
) -> Option<(L<E>, L<E>, <E::Nic as Nic>::Mr, <E::Nic as Nic>::Mr)> {
    let (a, b) = env.cards();
    let mr_src = a.register(HeapBuffer::new(4096), Access::Local).unwrap();
    let mr_dst = b
        .register(HeapBuffer::new(4096), Access::RemoteWrite)
        .unwrap();
    let (la, mut lb) = connected_pair::<E>(&a, &b, &LinkParams::default());
    if lb.wakeup_fd().is_none() {
        assert!(la.wakeup_fd().is_none() && b.event_fd().is_none());
        lb.arm_wakeup().unwrap();
        lb.arm_wakeup().unwrap();
        assert_eq!(lb.clear_wakeups(), 0);
        return None;
    }
    assert!(
        b.event_fd().is_some(),
        "a card with completion channels has an event descriptor"
    );
    lb.post_recvs(8).unwrap();
    Some((la, lb, mr_src, mr_dst))
}

/// `la` writes `round` as an immediate to `lb`, whose armed descriptor must be quiet before and
/// readable after; with `clear`, the wake-up is consumed explicitly and the descriptor is quiet
/// again. Then both sides' completions are taken.
fn write_wakes<E: ContractEnv>(
    env: &mut E,
    (la, lb): (&mut L<E>, &mut L<E>),
    (src, dst): (&<E::Nic as Nic>::Mr, &<E::Nic as Nic>::Mr),
    round: u32,
    clear: bool,
) {
    let fd = lb.wakeup_fd().unwrap();
    assert_eq!(
        crate::wait_readable(&[fd], 0).unwrap(),
        0,
        "round {round}: readable before the write"
    );
    la.post_write(round as u64, src, 0, 8, &dst.remote(), 0, Some(round), true)
        .unwrap();
    let fd = lb.wakeup_fd().unwrap();
    assert_eq!(
        crate::wait_readable(&[fd], 20_000_000_000).unwrap(),
        1,
        "round {round}: no wake-up within 20 s"
    );
    if clear {
        assert!(lb.clear_wakeups() >= 1);
        let fd = lb.wakeup_fd().unwrap();
        assert_eq!(crate::wait_readable(&[fd], 0).unwrap(), 0, "cleared");
    }
    let rx = env.wait(lb, 1);
    assert!(
        matches!(rx[..], [Completion { kind: CompletionKind::RecvImm { imm, .. }, .. }] if imm == round),
        "{rx:?}"
    );
    assert_eq!(env.wait(la, 1).len(), 1);
}

/// An armed completion queue makes its wake-up descriptor readable when a completion arrives
/// (blocking receive); re-arming is needed for the next one. A fabric with no descriptors (the
/// simulator, driven by virtual time) must say so for both the link and the card.
pub fn armed_completion_wakes_the_waiter<E: ContractEnv>(env: &mut E) {
    let Some((mut la, mut lb, src, dst)) = wake_setup(env) else {
        return;
    };
    for round in 0..2u32 {
        lb.arm_wakeup().unwrap();
        write_wakes(env, (&mut la, &mut lb), (&src, &dst), round, true);
    }
}

/// The cheap re-arm a blocking driver relies on: after a wake-up it only polls the
/// completions, and arming again consumes the wake-up they raised (the descriptor is quiet
/// again) yet still wakes at the next completion; arming twice with nothing polled in between
/// (the second costs nothing) also still wakes. No `clear_wakeups` anywhere.
pub fn rearming_consumes_the_last_wakeup_and_still_wakes<E: ContractEnv>(env: &mut E) {
    let Some((mut la, mut lb, src, dst)) = wake_setup(env) else {
        return;
    };
    for round in 0..3u32 {
        lb.arm_wakeup().unwrap();
        if round == 2 {
            lb.arm_wakeup().unwrap();
        }
        write_wakes(env, (&mut la, &mut lb), (&src, &dst), round, false);
    }
}

/// Links made on a card's shared completion queue ([`Nic::create_link_on`]) report there, each
/// completion naming its link by queue pair number, in order per link, while their own `poll`
/// finds nothing; one armed descriptor wakes for all of them. Another card's queue is refused.
/// A dropped link may leave flushed completions behind (its receives still posted): they name
/// it, never another link, and the other links carry on.
pub fn shared_completion_queue_names_each_link<E: ContractEnv>(env: &mut E) {
    let (a, b) = env.cards();
    let params = LinkParams::default();
    let entries = 2 * (params.max_send_wr + params.max_recv_wr);
    assert!(matches!(
        a.create_shared_cq(0),
        Err(FabricError::InvalidParams(_))
    ));
    let mut cq_a = a.create_shared_cq(entries).unwrap();
    let mut cq_b = b.create_shared_cq(entries).unwrap();
    assert!(matches!(
        a.create_link_on(&params, &cq_b.attach()),
        Err(FabricError::InvalidParams(_))
    ));
    let mr_src = a.register(HeapBuffer::new(4096), Access::Local).unwrap();
    let mr_dst = b
        .register(HeapBuffer::new(4096), Access::RemoteWrite)
        .unwrap();
    let mut links: Vec<(L<E>, L<E>)> = (0..2)
        .map(|_| {
            let mut la = a.create_link_on(&params, &cq_a.attach()).unwrap();
            let mut lb = b.create_link_on(&params, &cq_b.attach()).unwrap();
            let (ea, eb) = (la.endpoint(), lb.endpoint());
            la.connect(&eb).unwrap();
            lb.connect(&ea).unwrap();
            lb.post_recvs(8).unwrap();
            (la, lb)
        })
        .collect();
    let qpn = |l: &L<E>| l.endpoint().qpn;
    let woken = cq_b.wakeup_fd().is_some();
    if woken {
        cq_b.arm_wakeup().unwrap();
        let fd = cq_b.wakeup_fd().unwrap();
        assert_eq!(crate::wait_readable(&[fd], 0).unwrap(), 0, "quiet before");
    }
    // Three writes on each link, interleaved; the tag (link x 100 + k) is wr_id and immediate.
    for k in 0..3u32 {
        for (i, (la, _)) in links.iter_mut().enumerate() {
            let tag = i as u32 * 100 + k;
            la.post_write(
                tag as u64,
                &mr_src,
                0,
                8,
                &mr_dst.remote(),
                0,
                Some(tag),
                true,
            )
            .unwrap();
        }
    }
    if woken {
        let fd = cq_b.wakeup_fd().unwrap();
        assert_eq!(
            crate::wait_readable(&[fd], 20_000_000_000).unwrap(),
            1,
            "one descriptor wakes for every link on the queue"
        );
        cq_b.clear_wakeups();
    }
    let sent = env.wait_shared(&mut cq_a, 6);
    let got = env.wait_shared(&mut cq_b, 6);
    assert_eq!((sent.len(), got.len()), (6, 6), "{sent:?}\n{got:?}");
    let mut buf = [Completion::EMPTY; 4];
    for (i, (la, lb)) in links.iter_mut().enumerate() {
        let tags: Vec<u32> = (0..3).map(|k| i as u32 * 100 + k).collect();
        let wr_ids: Vec<u32> = sent
            .iter()
            .filter(|c| c.qpn == qpn(la))
            .map(|c| {
                assert_eq!(c.completion.status, WcStatus::Success, "{c:?}");
                assert_eq!(c.completion.kind, CompletionKind::Write, "{c:?}");
                c.completion.wr_id as u32
            })
            .collect();
        assert_eq!(
            wr_ids, tags,
            "link {i}'s writes, in order, named by its number"
        );
        let imms: Vec<u32> = got
            .iter()
            .filter(|c| c.qpn == qpn(lb))
            .map(|c| match c.completion.kind {
                CompletionKind::RecvImm { imm, byte_len: 8 } => imm,
                _ => panic!("{c:?}"),
            })
            .collect();
        assert_eq!(
            imms, tags,
            "link {i}'s receives, in order, named by its number"
        );
        assert_eq!(
            la.poll(&mut buf),
            0,
            "a link on a shared queue polls nothing"
        );
        assert_eq!(lb.poll(&mut buf), 0);
    }
    // Link 1 goes (its 5 receives still posted flush); what it leaves names it.
    let (la1, lb1) = links.pop().unwrap();
    let gone = qpn(&lb1);
    drop(lb1);
    drop(la1);
    let left = env.wait_shared(&mut cq_b, 0);
    println!(
        "a dropped link left {} flushed completions on the shared queue",
        left.len()
    );
    assert!(
        left.iter().all(|c| c.qpn == gone
            && c.completion.status == WcStatus::Flushed
            && c.completion.kind == CompletionKind::Recv),
        "{left:?}"
    );
    let (la0, lb0) = &mut links[0];
    la0.post_write(7, &mr_src, 0, 8, &mr_dst.remote(), 0, Some(7), true)
        .unwrap();
    let rx = env.wait_shared(&mut cq_b, 1);
    assert!(
        matches!(rx[..], [SharedCompletion { qpn: n, completion: Completion { kind: CompletionKind::RecvImm { imm: 7, .. }, .. } }] if n == qpn(lb0)),
        "{rx:?}"
    );
    let tx = env.wait_shared(&mut cq_a, 1);
    assert!(
        tx.iter()
            .any(|c| c.qpn == qpn(la0) && c.completion.wr_id == 7),
        "{tx:?}"
    );
}

/// Two device contexts on one card (the card opened twice, as a connection that opens a card
/// again after a device-fatal event does next to its endpoint's handle) share nothing: a
/// shared completion queue of one takes no queue pair of the other; a write whose buffer is
/// registered on the other context fails with a local error (beyond the inline size: an
/// inline write's bytes are copied at the post, its buffer never checked); a write
/// into a region the peer registered on a context other than its queue pair's is a remote
/// access error. Each context works on its own.
pub fn device_contexts_are_apart<E: ContractEnv>(env: &mut E) {
    // What the requester reports for a local buffer it may not read: rxe (Linux 6.1) says
    // IBV_WC_LOC_QP_OP_ERR, a ConnectX IBV_WC_LOC_PROT_ERR (and so does the simulator).
    const LOCAL_QP_OPERATION: u32 = 2;
    const LOCAL_PROTECTION: u32 = 4;
    const LEN: usize = 4096;
    let (a, b) = env.cards();
    let a2 = E::Nic::reopen(&a.reopen_token()).expect("the card opened again");
    let b2 = E::Nic::reopen(&b.reopen_token()).expect("the card opened again");
    let params = LinkParams::default();
    assert!(LEN > params.max_inline as usize);
    let cq = a.create_shared_cq(64).unwrap();
    assert!(matches!(
        a2.create_link_on(&params, &cq.attach()),
        Err(FabricError::InvalidParams(_))
    ));
    let mr_src = a.register(HeapBuffer::new(LEN), Access::Local).unwrap();
    let foreign = HeapBuffer::new(LEN);
    foreign.write(0, &[0x77; LEN]);
    let mr_src2 = a2.register(foreign, Access::Local).unwrap();
    let dst = HeapBuffer::new(LEN);
    let mr_dst = b.register(dst.clone(), Access::RemoteWrite).unwrap();
    let mr_dst2 = b2
        .register(HeapBuffer::new(LEN), Access::RemoteWrite)
        .unwrap();

    // From a buffer of the other context.
    let (mut la, _lb) = connected_pair::<E>(&a, &b, &params);
    la.post_write(1, &mr_src2, 0, LEN, &mr_dst.remote(), 0, None, true)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert!(
        matches!(
            tx.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>()[..],
            [(1, WcStatus::Other(LOCAL_QP_OPERATION | LOCAL_PROTECTION))]
        ),
        "a local error: {tx:?}"
    );

    // Into a region of the peer's other context.
    let (mut la, _lb) = connected_pair::<E>(&a, &b, &params);
    la.post_write(2, &mr_src, 0, LEN, &mr_dst2.remote(), 0, None, true)
        .unwrap();
    let tx = env.wait(&mut la, 1);
    assert_eq!(
        tx.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(2, WcStatus::RemoteAccess)]
    );

    // Each context on its own: the second contexts' queue pairs carry their own buffers.
    let src2 = HeapBuffer::new(LEN);
    src2.write(0, &[0x5a; LEN]);
    let mr_src2 = a2.register(src2, Access::Local).unwrap();
    let dst2 = HeapBuffer::new(LEN);
    let mr_dst2 = b2.register(dst2.clone(), Access::RemoteWrite).unwrap();
    let (mut la2, _lb2) = connected_pair::<E>(&a2, &b2, &params);
    la2.post_write(3, &mr_src2, 0, LEN, &mr_dst2.remote(), 0, None, true)
        .unwrap();
    let tx = env.wait(&mut la2, 1);
    assert_eq!(
        tx.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(3, WcStatus::Success)]
    );
    assert_eq!(dst2.read(0, LEN), vec![0x5a; LEN]);
    assert_eq!(dst.read(0, 8), vec![0; 8], "nothing landed in the first");
}

/// Runs every contract check against `make()`'s environments.
pub fn run_all<E: ContractEnv>(mut make: impl FnMut() -> E) {
    write_with_imm_lands_bytes_and_imm(&mut make());
    plain_write_is_silent_at_the_receiver(&mut make());
    completions_in_order_exactly_once(&mut make());
    bad_rkey_is_a_remote_access_error(&mut make());
    unsignaled_writes_complete_only_in_error(&mut make());
    local_misuse_is_a_typed_error(&mut make());
    shut_down_flushes(&mut make());
    armed_completion_wakes_the_waiter(&mut make());
    rearming_consumes_the_last_wakeup_and_still_wakes(&mut make());
    shared_completion_queue_names_each_link(&mut make());
    device_contexts_are_apart(&mut make());
}
