//! `raw-pingpong`: the fabric layer alone, without railover. Two threads, each with one card of
//! a wire and one queue pair, ping-pong a `size`-byte RDMA WRITE WITH IMM through
//! `railover_rdma`'s verbs fabric, making the calls a railover connection makes for a record
//! (the write inline when it fits, one signaled in 16, receives re-posted 16 at a time, the
//! completion queue polled until the immediate's completion arrives) and nothing else: no
//! framing, crc, queue, acknowledgement, heartbeat or second rail.
//!
//! Beside perftest's `ib_write_lat` and railover's two-process ping-pong in the same VM boot
//! (`bench/perftest-rounds.sh`), it splits railover's gap to perftest into what the fabric layer
//! (sideway, libibverbs, the provider) costs and what railover's own work costs.

use std::sync::mpsc;

use railover::clock::{Clock, RealClock};
use railover_rdma::contract::HeapBuffer;
use railover_rdma::verbs::VerbsNic;
use railover_rdma::{
    Access, Completion, CompletionKind, Endpoint, Link, LinkParams, MemoryRegistration, Nic,
    RemoteRegion, WcStatus,
};
use serde_json::json;

use crate::stats::{histogram, summarize_us};

/// Receives posted at a time (railover re-posts in batches too).
const RECV_BATCH: u32 = 16;
/// One write in this many is signaled (railover's selective signaling is of this order).
const SIGNAL_EVERY: u64 = 16;
const BUF_LEN: usize = 1 << 16;

/// One side's queue pair, its buffers and what the peer told it. (Fields drop in this order:
/// the queue pair before the registrations, the card last.)
struct Side {
    link: <VerbsNic as Nic>::Link,
    src: <VerbsNic as Nic>::Mr,
    _dst: <VerbsNic as Nic>::Mr,
    _nic: VerbsNic,
    buf: std::sync::Arc<HeapBuffer>,
    peer: RemoteRegion,
    recvs_left: u32,
    completions: [Completion; 32],
    posted: u64,
}

impl Side {
    /// Opens `dev`, registers its buffers, swaps endpoints with the other thread and connects.
    fn open(
        dev: &str,
        params: &LinkParams,
        to_peer: mpsc::Sender<(Endpoint, RemoteRegion)>,
        from_peer: mpsc::Receiver<(Endpoint, RemoteRegion)>,
    ) -> Side {
        let nic = VerbsNic::open(dev).unwrap_or_else(|e| panic!("open {dev}: {e}"));
        let buf = HeapBuffer::new(BUF_LEN);
        let dst = HeapBuffer::new(BUF_LEN);
        let src = nic
            .register(buf.clone(), Access::Local)
            .expect("register src");
        let mr_dst = nic
            .register(dst, Access::RemoteWrite)
            .expect("register dst");
        let mut link = nic.create_link(params).expect("create link");
        to_peer
            .send((link.endpoint(), mr_dst.remote()))
            .expect("peer thread gone");
        let (ep, peer) = from_peer.recv().expect("peer thread gone");
        link.connect(&ep).expect("connect");
        link.post_recvs(params.max_recv_wr).expect("post receives");
        Side {
            link,
            src,
            _dst: mr_dst,
            _nic: nic,
            buf,
            peer,
            recvs_left: params.max_recv_wr,
            completions: [Completion::EMPTY; 32],
            posted: 0,
        }
    }

    /// Posts `size` bytes from the buffer's start as a write with immediate `imm`; `last`: the
    /// run's last, signaled and waited for (the queue pair may go once it completed).
    fn write(&mut self, size: usize, imm: u32, last: bool) {
        self.posted += 1;
        let signaled = last || self.posted % SIGNAL_EVERY == 0;
        self.link
            .post_write(
                self.posted,
                &self.src,
                0,
                size,
                &self.peer,
                0,
                Some(imm),
                signaled,
            )
            .expect("post write");
        if !last {
            return;
        }
        loop {
            let n = self.link.poll(&mut self.completions);
            if self.completions[..n]
                .iter()
                .any(|c| c.wr_id == self.posted && c.kind == CompletionKind::Write)
            {
                return;
            }
        }
    }

    /// Polls until the peer's next write arrives; returns its immediate. Send completions are
    /// taken on the way; receives are re-posted in batches.
    fn wait_for_write(&mut self) -> u32 {
        loop {
            let n = self.link.poll(&mut self.completions);
            let mut got = None;
            for c in &self.completions[..n] {
                assert_eq!(c.status, WcStatus::Success, "completion {c:?}");
                if let CompletionKind::RecvImm { imm, .. } = c.kind {
                    got = Some(imm);
                    self.recvs_left -= 1;
                }
            }
            if let Some(imm) = got {
                if self.recvs_left <= RECV_BATCH {
                    self.link.post_recvs(RECV_BATCH).expect("post receives");
                    self.recvs_left += RECV_BATCH;
                }
                return imm;
            }
        }
    }
}

/// Pins the calling thread to `cpu` (as perftest's processes are pinned with `taskset`).
fn pin_to(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set)
            .unwrap_or_else(|e| panic!("pinning a thread to CPU {cpu}: {e}"));
    }
}

/// Times `iterations` round trips of `size` bytes (after `warmup`) between `client` (the
/// timing thread's card and CPU) and `server` (the echoing thread's), each thread on its own
/// card.
pub fn raw_pingpong(
    size: usize,
    iterations: u64,
    warmup: u64,
    client: (&str, Option<usize>),
    server: (&str, Option<usize>),
    as_json: bool,
) {
    let (client_dev, client_cpu) = client;
    let (server_dev, server_cpu) = server;
    let params = LinkParams {
        timeout: 13,
        ..LinkParams::default()
    };
    let size = size.clamp(8, BUF_LEN);
    let (to_server, from_client) = mpsc::channel();
    let (to_client, from_server) = mpsc::channel();
    let total = warmup + iterations;
    let server_card = server_dev.to_string();
    let server = std::thread::spawn(move || {
        pin_to(server_cpu);
        let mut s = Side::open(&server_card, &params, to_client, from_client);
        for i in 0..total {
            let imm = s.wait_for_write();
            s.write(size, imm, i + 1 == total);
        }
    });
    pin_to(client_cpu);
    let mut c = Side::open(client_dev, &params, to_server, from_server);
    let timer = RealClock::default();
    let mut rtt = histogram();
    let mut wrong = 0u64;
    for i in 0..total {
        c.buf.write(0, &i.to_le_bytes());
        let t0 = timer.now();
        c.write(size, i as u32, false);
        let echoed = c.wait_for_write();
        if i >= warmup {
            let _ = rtt.record(timer.now().saturating_sub(t0).max(1));
        }
        wrong += u64::from(echoed != i as u32);
    }
    server.join().expect("server thread");
    let report = json!({"raw_pingpong": {"size": size, "iterations": iterations, "warmup": warmup,
        "client_cpu": client_cpu, "server_cpu": server_cpu,
        "rtt": summarize_us(&rtt), "wrong_echoes": wrong,
        "signal_every": SIGNAL_EVERY, "recv_batch": RECV_BATCH}});
    if as_json {
        println!("{report}");
    } else {
        println!(
            "raw verbs ping-pong ({client_dev} <-> {server_dev}, {size} B, {iterations} round trips): {}",
            serde_json::to_string_pretty(&report["raw_pingpong"]["rtt"]).unwrap_or_default()
        );
    }
}
