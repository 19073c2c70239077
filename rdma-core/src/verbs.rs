//! Real RDMA verbs on the `sideway` crate.
//!
//! One [`VerbsNic`] per card (device context + protection domain); one [`VerbsLink`] per RC queue
//! pair, each with its own extended CQ or on a card's shared one ([`VerbsSharedCq`]). Writes use
//! the extended post-send API (`ibv_wr_rdma_write[_imm]`; small ones `ibv_post_send` inline). libibverbs is loaded at run time, so on a machine without it or
//! without devices, [`VerbsNic::open`] returns [`FabricError::Unavailable`] and nothing crashes.
//!
//! Completions are taken in batches with `ibv_poll_cq`, not the extended CQ's poll API, whose
//! rxe implementation in rdma-core 44 replays completions when a batch ends (see `poll_cq`).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_mummy_sys as sys;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{
    CompletionChannel, CompletionQueue, ExtendedCompletionQueue, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SendOperationFlags, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::{
    Access, AsyncEvent, Completion, CompletionKind, Endpoint, FabricError, Link, LinkParams,
    MemoryRegistration, Nic, RegisterableMemory, RemoteRegion, SharedCompletion, SharedCq,
    WcStatus,
};

/// Queue pairs and memory registrations this process holds right now (a leak check: a
/// connection holds exactly rails x 1 queue pairs and rails x 4 registrations).
static LIVE_LINKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static LIVE_MRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Completion-channel system calls this process made to sleep: CQ armings
/// (`ibv_req_notify_cq`) and event reads (`ibv_get_cq_event`, one per read attempt).
static NOTIFY_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EVENT_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// (CQ armings, completion-event reads) this process made so far: what blocking waits cost in
/// system calls on rxe (both are commands to the kernel there).
pub fn wakeup_calls() -> (u64, u64) {
    // Relaxed: counters for reports, nothing is published through them.
    (
        NOTIFY_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
        EVENT_READS.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// (queue pairs, memory registrations) alive in this process.
pub fn live_objects() -> (usize, usize) {
    // Relaxed: counters for reports, nothing is published through them.
    (
        LIVE_LINKS.load(std::sync::atomic::Ordering::Relaxed),
        LIVE_MRS.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// wr_id reserved for receives (which carry no buffer of their own).
pub const RECV_WR_ID: u64 = u64::MAX;

fn verbs_err(op: &'static str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Verbs {
        op,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Lists the RDMA devices present (an error when libibverbs or devices are missing).
pub fn device_names() -> Result<Vec<String>, FabricError> {
    let list = DeviceList::new().map_err(|e| FabricError::Unavailable(e.to_string()))?;
    Ok(list.iter().map(|d| d.name()).collect())
}

/// One RDMA card. A clone shares the device context and protection domain (an endpoint's
/// connections all use one of each per card).
#[derive(Clone)]
pub struct VerbsNic {
    name: String,
    pd: Arc<ProtectionDomain>,
    ctx: Arc<DeviceContext>,
}

impl VerbsNic {
    /// Opens the device called `name`.
    pub fn open(name: &str) -> Result<VerbsNic, FabricError> {
        let list = DeviceList::new().map_err(|e| FabricError::Unavailable(e.to_string()))?;
        let dev = list
            .iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| FabricError::NoSuchDevice(name.to_string()))?;
        let ctx = dev.open().map_err(|e| verbs_err("ibv_open_device", e))?;
        let pd = ctx.alloc_pd().map_err(|e| verbs_err("ibv_alloc_pd", e))?;
        // SAFETY: the context pointer is valid while `ctx` lives; async_fd is a plain int field.
        let fd = unsafe { (*ctx.context().as_ptr()).async_fd };
        // SAFETY: fcntl on a descriptor owned by the open device context.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above; making it non-blocking so poll_event never blocks.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(FabricError::Verbs {
                op: "fcntl(async_fd)",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(VerbsNic {
            name: name.to_string(),
            pd,
            ctx,
        })
    }

    fn pick_gid(&self, params: &LinkParams) -> Result<(u8, Gid), FabricError> {
        if let Some(i) = params.gid_index {
            let gid = self
                .ctx
                .query_gid(params.port, i as u32)
                .map_err(|e| verbs_err("ibv_query_gid", e))?;
            return Ok((i, gid));
        }
        let table = self
            .ctx
            .query_gid_table()
            .map_err(|e| verbs_err("ibv_query_gid_table", e))?;
        table
            .iter()
            .find(|e| {
                let raw = e.gid().raw;
                e.port_num() == params.port as u32
                    && e.gid_type() == GidType::RoceV2
                    && raw[..10].iter().all(|&b| b == 0)
                    && raw[10..12] == [0xff, 0xff]
            })
            .map(|e| (e.gid_index() as u8, e.gid()))
            .ok_or(FabricError::NoGid)
    }
}

/// A registration with a card. Deregisters before releasing the memory (field order).
pub struct VerbsMr {
    mr: Arc<MemoryRegion>,
    _mem: Arc<dyn RegisterableMemory>,
    lkey: u32,
    addr: u64,
    len: usize,
}

impl MemoryRegistration for VerbsMr {
    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr,
            rkey: self.mr.rkey(),
            len: self.len as u64,
        }
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// One RC queue pair with its own completion queue.
pub struct VerbsLink {
    // Field order is teardown order: QP (moved to error, and drained in Drop unless its CQ is a
    // shared one, whose holder polls what it flushed), CQ, then the card.
    qp: ExtendedQueuePair,
    cq: Arc<ExtendedCompletionQueue>,
    /// The CQ's completion channel: its descriptor wakes a blocking receiver.
    channel: Arc<CompletionChannel>,
    pd: Arc<ProtectionDomain>,
    ctx: Arc<DeviceContext>,
    params: LinkParams,
    psn: u32,
    gid: Gid,
    gid_index: u8,
    /// Whether arming the CQ again would be a wasted system call.
    wake: ArmState,
    /// Writes up to this many bytes go inline (0: none; what the device accepted).
    max_inline: u32,
    /// The CQ is a card's shared one ([`VerbsSharedCq`]): whoever holds that polls and arms it.
    shared: bool,
}

/// A completion queue shared by links of one card (see [`SharedCq`]).
pub struct VerbsSharedCq {
    cq: Arc<ExtendedCompletionQueue>,
    channel: Arc<CompletionChannel>,
    /// The card it belongs to (links of other cards are refused).
    ctx: Arc<DeviceContext>,
    wake: ArmState,
}

/// Where a CQ's wake-up stands. It was armed, and neither was a completion polled nor an event
/// consumed since: it is still armed (it disarms by raising its one event, and only a new
/// completion raises it), so arming again would be a wasted system call on rxe. (Its event may
/// still come late, after its completion was polled: the waiter clears a descriptor it saw
/// readable.)
#[derive(Default)]
struct ArmState {
    armed: bool,
    polled_since_arm: bool,
}

impl ArmState {
    /// Costs nothing while the CQ is still armed from the last call; otherwise consumes the
    /// event the completions polled since may have raised, then arms.
    fn arm(
        &mut self,
        cq: &ExtendedCompletionQueue,
        channel: &CompletionChannel,
    ) -> Result<(), FabricError> {
        if self.armed && !self.polled_since_arm {
            return Ok(());
        }
        self.clear(channel);
        self.armed = false;
        self.polled_since_arm = false;
        arm_cq(cq)?;
        self.armed = true;
        Ok(())
    }

    /// Takes the channel's events (see [`clear_channel`]); one disarmed the CQ.
    fn clear(&mut self, channel: &CompletionChannel) -> u32 {
        let fired = clear_channel(channel);
        if fired > 0 {
            self.armed = false;
        }
        fired
    }
}

/// Names a [`VerbsSharedCq`] to make links on, from any thread (see [`SharedCq::Attach`]).
#[derive(Clone)]
pub struct VerbsCqAttach {
    cq: Arc<ExtendedCompletionQueue>,
    channel: Arc<CompletionChannel>,
    ctx: Arc<DeviceContext>,
}

impl SharedCq for VerbsSharedCq {
    type Attach = VerbsCqAttach;

    fn attach(&self) -> VerbsCqAttach {
        VerbsCqAttach {
            cq: self.cq.clone(),
            channel: self.channel.clone(),
            ctx: self.ctx.clone(),
        }
    }

    fn poll(&mut self, out: &mut [SharedCompletion]) -> usize {
        let n = poll_cq(&self.cq, out, |qpn, completion| SharedCompletion {
            qpn,
            completion,
        });
        self.wake.polled_since_arm |= n > 0;
        n
    }

    fn arm_wakeup(&mut self) -> Result<(), FabricError> {
        self.wake.arm(&self.cq, &self.channel)
    }

    fn wakeup_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the channel's descriptor is open while the channel lives, which `self` keeps
        // alive; the borrow cannot outlive `self`.
        Some(unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) })
    }

    fn clear_wakeups(&mut self) -> u32 {
        self.wake.clear(&self.channel)
    }
}

impl Drop for VerbsSharedCq {
    fn drop(&mut self) {
        // A safety net: the CQ goes with its last holder (links keep it too), and ibv_destroy_cq
        // waits until every event fetched was acknowledged, which clear_channel does.
        clear_channel(&self.channel);
    }
}

/// A completion channel and an extended CQ on it, for `entries` completions.
fn new_cq(
    ctx: &Arc<DeviceContext>,
    entries: u32,
) -> Result<(Arc<ExtendedCompletionQueue>, Arc<CompletionChannel>), FabricError> {
    let channel =
        CompletionChannel::new(ctx).map_err(|e| verbs_err("ibv_create_comp_channel", e))?;
    channel
        .set_nonblocking(true)
        .map_err(|e| verbs_err("fcntl(comp_channel)", e))?;
    let cq = ctx
        .create_cq_builder()
        .setup_cqe(entries)
        .setup_comp_channel(&channel, 0)
        .build_ex()
        .map_err(|e| verbs_err("ibv_create_cq_ex", e))?;
    Ok((cq, channel))
}

/// Most completions one `ibv_poll_cq` call takes: the callers' buffers (32 in the link manager).
const POLL_BATCH: usize = 32;

/// Up to `out.len()` completions from `cq`, each made into an element of `out` by
/// `make(queue pair number, completion)`; returns how many. One `ibv_poll_cq` per
/// [`POLL_BATCH`] (one in the link manager, whose buffers hold 32).
///
/// `ibv_poll_cq` on the extended CQ rather than its `ibv_start_poll`/`ibv_next_poll`/
/// `ibv_end_poll` API: one provider call and lock per batch, not per completion, and every
/// provider implements it, while rdma-core 44's rxe provider advances the consumer index once
/// more when an extended poll batch ends (stale or duplicate completions follow; fixed in
/// rdma-core 55). The classic path is the one perftest polls with; the contract test
/// `completions_in_order_exactly_once` checks it on rxe.
fn poll_cq<T>(
    cq: &ExtendedCompletionQueue,
    out: &mut [T],
    make: impl Fn(u32, Completion) -> T,
) -> usize {
    let mut taken = 0;
    for chunk in out.chunks_mut(POLL_BATCH) {
        let got = poll_cq_batch(cq, chunk, &make);
        taken += got;
        if got < chunk.len() {
            break; // the queue is drained
        }
    }
    taken
}

/// One `ibv_poll_cq` into `out` (at most [`POLL_BATCH`] long): see [`poll_cq`].
fn poll_cq_batch<T>(
    cq: &ExtendedCompletionQueue,
    out: &mut [T],
    make: &impl Fn(u32, Completion) -> T,
) -> usize {
    let mut wcs = std::mem::MaybeUninit::<[sys::ibv_wc; POLL_BATCH]>::uninit();
    let want = out.len().min(POLL_BATCH);
    // SAFETY: the CQ is live while borrowed; an extended CQ begins with an ibv_cq.
    let raw = unsafe { sys::ibv_cq_ex_to_cq(cq.cq().as_ptr().cast()) };
    // SAFETY: `raw` is a live CQ polled only through `&mut` of its one holder (a link or a shared
    // queue); the array has room for `want` (<= POLL_BATCH) work completions.
    let got = unsafe { sys::ibv_poll_cq(raw, want as i32, wcs.as_mut_ptr().cast()) };
    // A negative count is the provider's error (an overrun CQ): nothing taken, as when empty.
    let got = usize::try_from(got).unwrap_or(0).min(want);
    // SAFETY: the provider wrote the first `got` work completions of the array.
    let wcs = unsafe { std::slice::from_raw_parts(wcs.as_ptr().cast::<sys::ibv_wc>(), got) };
    for (slot, wc) in out.iter_mut().zip(wcs) {
        let status = map_status(wc.status);
        let kind = if wc.wr_id != RECV_WR_ID {
            CompletionKind::Write
        } else if status == WcStatus::Success {
            // A receive without an immediate (a peer's SEND; railover never posts one) reads as
            // immediate 0, judged by the mirror queue's notification check like any other.
            let imm = if wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
                // SAFETY: both members are a plain u32; the flag says it is the immediate.
                u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
            } else {
                0
            };
            CompletionKind::RecvImm {
                imm,
                byte_len: wc.byte_len,
            }
        } else {
            CompletionKind::Recv
        };
        *slot = make(
            wc.qp_num,
            Completion {
                wr_id: wc.wr_id,
                kind,
                status,
            },
        );
    }
    got
}

/// Arms `cq` to raise one event on its channel at its next completion.
fn arm_cq(cq: &ExtendedCompletionQueue) -> Result<(), FabricError> {
    // SAFETY: the CQ is live while borrowed; an extended CQ begins with an ibv_cq.
    let raw = unsafe { sys::ibv_cq_ex_to_cq(cq.cq().as_ptr().cast()) };
    // SAFETY: `raw` is a live CQ of an open context; arming has no other precondition.
    let rc = unsafe { sys::ibv_req_notify_cq(raw, 0) };
    NOTIFY_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if rc != 0 {
        return Err(FabricError::Verbs {
            op: "ibv_req_notify_cq",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Takes and acknowledges every event queued on `channel` (non-blocking); returns how many.
fn clear_channel(channel: &CompletionChannel) -> u32 {
    let mut fired = 0u32;
    let mut cq = std::ptr::null_mut();
    let mut ctx = std::ptr::null_mut();
    loop {
        // SAFETY: the channel is live and non-blocking (set in new_cq): -1 at once when empty.
        let rc =
            unsafe { sys::ibv_get_cq_event(channel.comp_channel().as_ptr(), &mut cq, &mut ctx) };
        EVENT_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if rc != 0 {
            break;
        }
        fired += 1;
    }
    if fired > 0 {
        // SAFETY: `cq` is the one CQ on this channel; every event obtained is acknowledged
        // exactly once, here, before the CQ can be destroyed.
        unsafe { sys::ibv_ack_cq_events(cq, fired) };
    }
    fired
}

impl VerbsNic {
    fn make_link(
        &self,
        params: &LinkParams,
        shared: Option<&VerbsCqAttach>,
    ) -> Result<VerbsLink, FabricError> {
        params.validate()?;
        let (gid_index, gid) = self.pick_gid(params)?;
        let (cq, channel) = match shared {
            Some(s) => (s.cq.clone(), s.channel.clone()),
            None => new_cq(&self.ctx, params.max_send_wr + params.max_recv_wr)?,
        };
        let build = |max_inline: u32| {
            self.pd
                .create_qp_builder()
                .setup_max_send_wr(params.max_send_wr)
                .setup_max_recv_wr(params.max_recv_wr)
                .setup_max_send_sge(1)
                .setup_max_recv_sge(1)
                .setup_max_inline_data(max_inline)
                .setup_send_cq(GenericCompletionQueue::from(cq.clone()))
                .setup_recv_cq(GenericCompletionQueue::from(cq.clone()))
                .setup_send_ops_flags(
                    SendOperationFlags::Write | SendOperationFlags::WriteWithImmediate,
                )
                .build_ex()
        };
        // A device that can't take the inline size still gets a queue pair, without inline.
        let (mut qp, max_inline) = match build(params.max_inline) {
            Ok(qp) => (qp, params.max_inline),
            Err(_) if params.max_inline > 0 => {
                (build(0).map_err(|e| verbs_err("ibv_create_qp_ex", e))?, 0)
            }
            Err(e) => return Err(verbs_err("ibv_create_qp_ex", e)),
        };
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(params.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&attr)
            .map_err(|e| verbs_err("ibv_modify_qp(INIT)", e))?;
        let mut psn_bytes = [0u8; 4];
        // SAFETY: getrandom into a 4-byte stack buffer we own.
        let got = unsafe { libc::getrandom(psn_bytes.as_mut_ptr().cast(), 4, 0) };
        let psn = if got == 4 {
            u32::from_le_bytes(psn_bytes) & 0x00ff_ffff
        } else {
            0x1234
        };
        LIVE_LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(VerbsLink {
            qp,
            cq,
            channel,
            pd: self.pd.clone(),
            ctx: self.ctx.clone(),
            params: *params,
            psn,
            gid,
            gid_index,
            wake: ArmState::default(),
            max_inline,
            shared: shared.is_some(),
        })
    }
}

impl Nic for VerbsNic {
    type Mr = VerbsMr;
    type Link = VerbsLink;
    type SharedCq = VerbsSharedCq;

    /// The device's name.
    type Reopen = String;

    fn reopen_token(&self) -> String {
        self.name.clone()
    }

    fn reopen(name: &String) -> Result<VerbsNic, FabricError> {
        VerbsNic::open(name)
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// The port counters that count a retransmission by this card's requester: rxe's
    /// `completer_retry_err`, ConnectX's `local_ack_timeout_err` (summed over its ports).
    fn retransmissions(&self) -> Option<u64> {
        const COUNTERS: [&str; 2] = ["completer_retry_err", "local_ack_timeout_err"];
        let ports = std::fs::read_dir(format!("/sys/class/infiniband/{}/ports", self.name)).ok()?;
        let mut total = None;
        for port in ports.flatten() {
            for counter in COUNTERS {
                let path = port.path().join("hw_counters").join(counter);
                if let Some(v) = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    *total.get_or_insert(0) += v;
                }
            }
        }
        total
    }

    fn register(
        &self,
        mem: Arc<dyn RegisterableMemory>,
        access: Access,
    ) -> Result<VerbsMr, FabricError> {
        let flags = match access {
            Access::Local => AccessFlags::LocalWrite,
            Access::RemoteWrite => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        };
        let (addr, len) = (mem.addr() as usize, mem.len());
        // Valid while `mem` lives (RegisterableMemory); VerbsMr drops the MR before `mem`.
        // SAFETY: addr..addr+len stays valid and registered memory outlives the MR (see above).
        let mr = unsafe { self.pd.reg_mr(addr, len, flags) };
        let mr = mr.map_err(|e| verbs_err("ibv_reg_mr", e))?;
        LIVE_MRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(VerbsMr {
            lkey: mr.lkey(),
            mr,
            _mem: mem,
            addr: addr as u64,
            len,
        })
    }

    fn create_link(&self, params: &LinkParams) -> Result<VerbsLink, FabricError> {
        self.make_link(params, None)
    }

    fn create_shared_cq(&self, entries: u32) -> Result<VerbsSharedCq, FabricError> {
        if entries == 0 {
            return Err(FabricError::InvalidParams(
                "a completion queue needs entries",
            ));
        }
        let (cq, channel) = new_cq(&self.ctx, entries)?;
        Ok(VerbsSharedCq {
            cq,
            channel,
            ctx: self.ctx.clone(),
            wake: ArmState::default(),
        })
    }

    fn create_link_on(
        &self,
        params: &LinkParams,
        cq: &VerbsCqAttach,
    ) -> Result<VerbsLink, FabricError> {
        if !Arc::ptr_eq(&cq.ctx, &self.ctx) {
            return Err(FabricError::InvalidParams(
                "the shared completion queue belongs to another card",
            ));
        }
        self.make_link(params, Some(cq))
    }

    fn poll_event(&self) -> Option<AsyncEvent> {
        let mut ev = std::mem::MaybeUninit::<sys::ibv_async_event>::uninit();
        // SAFETY: the context is open; async_fd is non-blocking (set in open), so this returns -1
        // at once when no event is queued; `ev` is only read after success.
        let rc = unsafe { sys::ibv_get_async_event(self.ctx.context().as_ptr(), ev.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        // SAFETY: filled by a successful ibv_get_async_event. event_type is read as a raw u32 so an
        // event kind newer than the bindings' enum can't be undefined behaviour.
        let kind = unsafe {
            std::ptr::addr_of!((*ev.as_ptr()).event_type)
                .cast::<u32>()
                .read()
        };
        let event = match kind {
            k if k == sys::ibv_event_type::IBV_EVENT_PORT_ACTIVE as u32 => AsyncEvent::PortActive,
            k if k == sys::ibv_event_type::IBV_EVENT_PORT_ERR as u32 => AsyncEvent::PortDown,
            k if k == sys::ibv_event_type::IBV_EVENT_DEVICE_FATAL as u32 => AsyncEvent::DeviceFatal,
            k if k == sys::ibv_event_type::IBV_EVENT_QP_FATAL as u32 => {
                // SAFETY: for QP events the element is the QP, valid until the event is acked.
                let qpn = unsafe { (*(*ev.as_ptr()).element.qp).qp_num };
                AsyncEvent::QpFatal { qpn }
            }
            k => AsyncEvent::Other(k),
        };
        // SAFETY: every event obtained must be acknowledged exactly once; this is that once.
        unsafe { sys::ibv_ack_async_event(ev.as_mut_ptr()) };
        Some(event)
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: async_fd is open for as long as the context, which `self` keeps alive; the
        // borrow cannot outlive `self`.
        Some(unsafe { BorrowedFd::borrow_raw((*self.ctx.context().as_ptr()).async_fd) })
    }
}

fn map_status(status: u32) -> WcStatus {
    use sys::ibv_wc_status::*;
    match status {
        IBV_WC_SUCCESS => WcStatus::Success,
        IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
        other => WcStatus::Other(other),
    }
}

impl VerbsLink {
    /// Writes of at most this many bytes go inline: [`LinkParams::max_inline`], or 0 where the
    /// device refused that size.
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    fn raw_qp(&self) -> NonNull<sys::ibv_qp> {
        // SAFETY: the pointer is only used while self (and so the QP) lives.
        unsafe { self.qp.qp() }
    }

    /// A small write with its bytes in the work request (`IBV_SEND_INLINE`), through
    /// `ibv_post_send`: rdma-core 44's rxe provider completed inline writes posted through the
    /// extended API with an error (status 2), while this path is the one perftest uses. The
    /// caller checked the ranges.
    #[allow(clippy::too_many_arguments)]
    fn post_inline(
        &mut self,
        wr_id: u64,
        local: &VerbsMr,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), FabricError> {
        let mut sge = sys::ibv_sge {
            addr: local.addr + local_offset as u64,
            length: len as u32,
            lkey: local.lkey,
        };
        let mut flags = sys::ibv_send_flags::IBV_SEND_INLINE;
        if signaled {
            flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED;
        }
        // SAFETY: all zeroes is a valid ibv_send_wr (integers, null pointers, unions of those).
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = flags.0;
        wr.opcode = match imm {
            Some(imm) => {
                // imm travels big-endian on the wire; the receiver converts back.
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            }
            None => sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        wr.wr.rdma = sys::rdma_t {
            remote_addr: remote.addr + remote_offset,
            rkey: remote.rkey,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: one well-formed request on a live QP; its bytes are in a checked registered
        // range and copied before the call returns; `wr` and `sge` outlive the call.
        let rc = unsafe { sys::ibv_post_send(self.raw_qp().as_ptr(), &mut wr, &mut bad) };
        match rc {
            0 => Ok(()),
            // Providers differ in the sign (rxe returns -ENOMEM).
            rc if rc.abs() == libc::ENOMEM => Err(FabricError::SendQueueFull),
            rc => Err(FabricError::Verbs {
                op: "ibv_post_send",
                source: std::io::Error::from_raw_os_error(rc.abs()),
            }),
        }
    }
}

impl Link for VerbsLink {
    type Mr = VerbsMr;

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: self.gid.raw,
            lid: 0,
        }
    }

    fn connect(&mut self, remote: &Endpoint) -> Result<(), FabricError> {
        let port = self
            .ctx
            .query_port(self.params.port)
            .map_err(|e| verbs_err("ibv_query_port", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(port.active_mtu())
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(0)
            .setup_min_rnr_timer(1);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(self.params.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs_err("ibv_modify_qp(RTR)", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(self.params.timeout)
            .setup_retry_cnt(self.params.retry_cnt)
            .setup_rnr_retry(self.params.rnr_retry)
            .setup_max_read_atomic(0);
        self.qp
            .modify(&attr)
            .map_err(|e| verbs_err("ibv_modify_qp(RTS)", e))?;
        Ok(())
    }

    fn post_write(
        &mut self,
        wr_id: u64,
        local: &VerbsMr,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), FabricError> {
        if wr_id == RECV_WR_ID {
            return Err(FabricError::InvalidParams(
                "wr_id u64::MAX is reserved for receives",
            ));
        }
        if local_offset > local.len || len > local.len - local_offset {
            return Err(FabricError::OutOfRange {
                offset: local_offset as u64,
                len,
                region_len: local.len,
            });
        }
        if remote_offset > remote.len || len as u64 > remote.len - remote_offset {
            return Err(FabricError::OutOfRange {
                offset: remote_offset,
                len,
                region_len: remote.len as usize,
            });
        }
        if len > 0 && len <= self.max_inline as usize {
            return self.post_inline(
                wr_id,
                local,
                local_offset,
                len,
                remote,
                remote_offset,
                imm,
                signaled,
            );
        }
        let mut guard = self.qp.start_post_send();
        let flags = if signaled {
            WorkRequestFlags::Signaled
        } else {
            WorkRequestFlags::none()
        };
        let wr = guard.construct_wr(wr_id, flags);
        let addr = remote.addr + remote_offset;
        let buf = match imm {
            // imm travels big-endian on the wire; the receiver converts back.
            Some(imm) => wr.setup_write_imm(remote.rkey, addr, imm.to_be()),
            None => wr.setup_write(remote.rkey, addr),
        };
        // SAFETY: the range was checked against the registration above, and the MR (with its
        // memory) outlives the request: the caller keeps it registered until completion.
        unsafe { buf.setup_sge(local.lkey, local.addr + local_offset as u64, len as u32) };
        guard.post().map_err(|e| match e {
            sideway::ibverbs::queue_pair::PostSendError::NotEnoughResources(_) => {
                FabricError::SendQueueFull
            }
            e => verbs_err("ibv_wr_complete", e),
        })
    }

    fn post_recvs(&mut self, count: u32) -> Result<(), FabricError> {
        const BATCH: usize = 32;
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(BATCH);
            let mut wrs = [sys::ibv_recv_wr {
                wr_id: RECV_WR_ID,
                next: std::ptr::null_mut(),
                sg_list: std::ptr::null_mut(),
                num_sge: 0,
            }; BATCH];
            let base = wrs.as_mut_ptr();
            for (i, wr) in wrs.iter_mut().enumerate().take(n - 1) {
                // SAFETY: i + 1 < n <= BATCH: in bounds of the stack array.
                wr.next = unsafe { base.add(i + 1) };
            }
            let mut bad = std::ptr::null_mut();
            // SAFETY: a well-formed chain of n receive WRs without buffers on a live QP; the array
            // outlives the call (the provider copies WRs into its queue).
            let rc = unsafe { sys::ibv_post_recv(self.raw_qp().as_ptr(), base, &mut bad) };
            if rc != 0 {
                return Err(FabricError::Verbs {
                    op: "ibv_post_recv",
                    source: std::io::Error::from_raw_os_error(rc),
                });
            }
            left -= n;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.shared {
            return 0; // the shared queue's holder polls
        }
        let n = poll_cq(&self.cq, out, |_, completion| completion);
        self.wake.polled_since_arm |= n > 0;
        n
    }

    fn shut_down(&mut self) {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = self.qp.modify(&attr) {
            tracing::warn!(error = %e, "moving QP to error failed");
        }
    }

    /// Costs nothing while the CQ is still armed from the last call (no completion polled
    /// since); otherwise consumes the event those completions may have raised, then arms.
    fn arm_wakeup(&mut self) -> Result<(), FabricError> {
        if self.shared {
            return Ok(());
        }
        self.wake.arm(&self.cq, &self.channel)
    }

    fn wakeup_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.shared {
            return None;
        }
        // SAFETY: the channel's descriptor is open while the channel lives, which `self` keeps
        // alive; the borrow cannot outlive `self`.
        Some(unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) })
    }

    fn clear_wakeups(&mut self) -> u32 {
        if self.shared {
            return 0;
        }
        self.wake.clear(&self.channel)
    }
}

impl Drop for VerbsMr {
    fn drop(&mut self) {
        LIVE_MRS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for VerbsLink {
    fn drop(&mut self) {
        LIVE_LINKS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // QP to error, drain what it flushes, then the fields drop in order: QP, CQ, PD, context.
        self.shut_down();
        let mut sink = [Completion::EMPTY; 16];
        while self.poll(&mut sink) > 0 {}
        // Every completion event fetched must be acknowledged before the CQ is destroyed
        // (ibv_destroy_cq waits for that): take and acknowledge whatever is still queued.
        self.clear_wakeups();
        let _ = (&self.pd, &self.ctx);
    }
}
