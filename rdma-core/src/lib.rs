//! # railover-rdma
//!
//! The few fabric operations railover needs, as traits ([`Nic`], [`Link`]), with two
//! implementations that pass the same contract suite:
//!
//! * `verbs` (cargo feature `verbs`): real RDMA on the `sideway` crate (RC queue pairs, RDMA WRITE WITH IMMEDIATE,
//!   extended CQs, async events). libibverbs is loaded at run time: on a machine without it, or
//!   without devices, every call returns a typed [`FabricError`].
//! * `sim` (cargo feature `test-util`): an in-process, deterministic fabric (seeded RNG, virtual
//!   clock) that really copies bytes between registered regions and injects every fault kind
//!   railover must survive; `contract` (same feature) is the suite both fabrics pass.
//!
//! The fabrics know nothing of queues or failover. [`handshake`] is the out-of-band (TCP) exchange
//! of endpoint information.
#![deny(unsafe_op_in_unsafe_fn)]

use std::os::fd::BorrowedFd;
use std::sync::Arc;

#[cfg(feature = "test-util")]
pub mod contract;
pub mod handshake;
#[cfg(feature = "test-util")]
pub mod sim;
#[cfg(feature = "verbs")]
pub mod verbs;

/// Memory a NIC may access once registered.
///
/// # Safety
/// `addr()..addr()+len()` must stay valid, writable memory for as long as the value lives, and
/// the pair must not change. A fabric keeps an `Arc` of it for as long as the memory is registered,
/// so the memory can't be freed while a NIC may touch it.
pub unsafe trait RegisterableMemory: Send + Sync + 'static {
    fn addr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a registration allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only this host's NIC reads it (the sender's ring): no remote access at all.
    Local,
    /// The peer may write it (a mirror ring, a control slot). Never remote read.
    RemoteWrite,
}

/// What a peer needs to write into a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// Identity of one end of a reliable connection, exchanged out of band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
}

/// RC transport parameters. The defaults are chosen for fast failure detection: a finite retry
/// budget (never the infinite `7`, which rxe treats as "forever") and finite RNR retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkParams {
    /// Local ACK timeout exponent: 4.096 us x 2^timeout per attempt.
    pub timeout: u8,
    /// Transport retries before RETRY_EXC_ERR (0..=6; 7 means infinite on some devices).
    pub retry_cnt: u8,
    /// RNR retries (0..=6; 7 is infinite and never a default).
    pub rnr_retry: u8,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// Writes of at most this many bytes go inline (`IBV_SEND_INLINE`): the NIC takes the bytes
    /// from the work request instead of reading them from memory, one DMA read less per small
    /// record on a hardware NIC. 0: never. A device that refuses the size gets none.
    pub max_inline: u32,
    /// GID index to use; None picks the RoCEv2 IPv4-mapped one automatically.
    pub gid_index: Option<u8>,
    pub port: u8,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            timeout: 10,
            retry_cnt: 1,
            rnr_retry: 3,
            max_send_wr: 512,
            max_recv_wr: 512,
            max_inline: 128,
            gid_index: None,
            port: 1,
        }
    }
}

impl LinkParams {
    /// Checks the values a device would reject or that would hide failures.
    pub fn validate(&self) -> Result<(), FabricError> {
        if self.timeout == 0 || self.timeout > 31 {
            return Err(FabricError::InvalidParams(
                "timeout must be 1..=31 (0 would wait forever)",
            ));
        }
        if self.retry_cnt > 6 {
            return Err(FabricError::InvalidParams(
                "retry_cnt must be 0..=6 (7 retries forever on rxe)",
            ));
        }
        if self.rnr_retry > 6 {
            return Err(FabricError::InvalidParams(
                "rnr_retry must be 0..=6 (7 is infinite)",
            ));
        }
        if self.max_send_wr == 0 || self.max_recv_wr == 0 {
            return Err(FabricError::InvalidParams("queue depths must be > 0"));
        }
        Ok(())
    }

    /// How long a black hole takes to surface as RETRY_EXC_ERR, as hardware computes it:
    /// (retry_cnt + 1) attempts of 4.096 us x 2^timeout each.
    pub fn retry_budget_ns(&self) -> u64 {
        (self.retry_cnt as u64 + 1) * 4096 * (1u64 << self.timeout)
    }
}

/// How a work request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// Flushed because the queue pair entered the error state.
    Flushed,
    /// The transport retry budget ran out (no ACK: black hole, dead peer).
    RetryExceeded,
    /// The receiver had no receive posted for too long.
    RnrRetryExceeded,
    /// The peer refused the access (bad rkey or range).
    RemoteAccess,
    /// Any other status, raw.
    Other(u32),
}

/// What a completion is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// A write this side posted.
    Write,
    /// A peer's write with immediate landed (consumed one posted receive).
    RecvImm { imm: u32, byte_len: u32 },
    /// A receive flushed or failed (no data).
    Recv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub kind: CompletionKind,
    pub status: WcStatus,
}

impl Completion {
    pub const EMPTY: Completion = Completion {
        wr_id: 0,
        kind: CompletionKind::Write,
        status: WcStatus::Success,
    };
}

/// A completion taken from a [`SharedCq`]: whose it is (the queue pair number its link's
/// [`Link::endpoint`] gave) and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCompletion {
    pub qpn: u32,
    pub completion: Completion,
}

impl SharedCompletion {
    pub const EMPTY: SharedCompletion = SharedCompletion {
        qpn: 0,
        completion: Completion::EMPTY,
    };
}

/// One completion queue for many links of one card ([`Nic::create_link_on`]): a driver polls it
/// once for all of them and hands each completion to its link's owner by queue pair number,
/// instead of polling every link (whose own [`Link::poll`] then finds nothing). Per link,
/// completions keep their order. Those a link flushed when it was shut down stay queued after
/// it is destroyed (a provider need not clean them out; rxe does not), counting against the
/// queue's size until polled: the owner drops numbers it no longer knows, and polls a destroyed
/// link's leftovers before it makes a replacement (the provider may give the new queue pair the
/// same number, and an overrun queue fails every link on it).
pub trait SharedCq {
    /// What links are made on ([`Nic::create_link_on`]): a handle that names this queue and may
    /// travel to threads that set links up while the holder of the queue polls it (on verbs it
    /// is `Send`). It keeps the queue alive for the links made on it, but polls and arms nothing.
    type Attach: Clone;

    /// A handle to make links on this queue with.
    fn attach(&self) -> Self::Attach;

    /// Fills `out` with completions of any of its links; returns how many (never blocks).
    fn poll(&mut self, out: &mut [SharedCompletion]) -> usize;

    /// As [`Link::arm_wakeup`], for every link on this queue.
    fn arm_wakeup(&mut self) -> Result<(), FabricError> {
        Ok(())
    }

    /// As [`Link::wakeup_fd`]: one descriptor for all the links on this queue.
    fn wakeup_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// As [`Link::clear_wakeups`].
    fn clear_wakeups(&mut self) -> u32 {
        0
    }
}

/// Asynchronous events of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    PortActive,
    PortDown,
    DeviceFatal,
    /// A queue pair (by number) hit a fatal error.
    QpFatal {
        qpn: u32,
    },
    /// Any other event, raw.
    Other(u32),
}

/// Errors of the fabric layer.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("RDMA is not available on this machine: {0}")]
    Unavailable(String),
    #[error("no RDMA device named {0:?}")]
    NoSuchDevice(String),
    #[error("invalid link parameters: {0}")]
    InvalidParams(&'static str),
    #[error("{op} failed: {source}")]
    Verbs {
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "write of {len} bytes at {offset} is outside the registered region of {region_len} bytes"
    )]
    OutOfRange {
        offset: u64,
        len: usize,
        region_len: usize,
    },
    #[error("the link is not connected or was torn down")]
    NotConnected,
    #[error("peer endpoint unknown or unreachable from this device")]
    Unreachable,
    #[error("the send queue is full")]
    SendQueueFull,
    #[error("no GID usable for RoCEv2 (IPv4-mapped) on this port")]
    NoGid,
}

/// A registration of memory with one NIC.
pub trait MemoryRegistration {
    /// What the peer needs to write into it.
    fn remote(&self) -> RemoteRegion;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One RDMA device (one card): a handle on a device context. Clones share the context (its
/// events, registrations and queues), as every connection of an endpoint shares its cards.
pub trait Nic: Clone {
    type Mr: MemoryRegistration;
    type Link: Link<Mr = Self::Mr>;
    type SharedCq: SharedCq;

    fn name(&self) -> &str;

    /// Registers `mem` with the least access needed. The registration holds `mem` alive.
    fn register(
        &self,
        mem: Arc<dyn RegisterableMemory>,
        access: Access,
    ) -> Result<Self::Mr, FabricError>;

    /// Creates a queue pair (not yet connected) and returns it with its endpoint information.
    fn create_link(&self, params: &LinkParams) -> Result<Self::Link, FabricError>;

    /// A completion queue for `entries` completions, for links made with
    /// [`Nic::create_link_on`] (it must hold every completion its links can have outstanding:
    /// the sum of their send and receive queue depths).
    fn create_shared_cq(&self, entries: u32) -> Result<Self::SharedCq, FabricError>;

    /// Like [`Nic::create_link`], its completions (and wake-ups) going to the queue `cq` names
    /// ([`SharedCq::attach`]), a queue of this card ([`FabricError::InvalidParams`] for another
    /// card's).
    fn create_link_on(
        &self,
        params: &LinkParams,
        cq: &<Self::SharedCq as SharedCq>::Attach,
    ) -> Result<Self::Link, FabricError>;

    /// Next asynchronous event of this device, if any (never blocks).
    fn poll_event(&self) -> Option<AsyncEvent>;

    /// A descriptor that becomes readable when an asynchronous event is pending, for a blocking
    /// wait; `None` on a fabric that has none (the simulator, driven by virtual time).
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// RC retransmissions this card counted so far (all its queue pairs), where it exposes them
    /// (`hw_counters`); `None` where it doesn't. May read files: not for the data path.
    fn retransmissions(&self) -> Option<u64> {
        None
    }

    /// What it takes to open this card again once every handle on it was dropped (after a
    /// device-fatal event the device can only recover when the process lets go of it).
    type Reopen: Clone;

    fn reopen_token(&self) -> Self::Reopen;

    /// Opens the card again (fails while it is still gone).
    fn reopen(token: &Self::Reopen) -> Result<Self, FabricError>
    where
        Self: Sized;
}

/// One reliable-connected queue pair.
pub trait Link {
    type Mr: MemoryRegistration;

    /// This end's identity, to send to the peer.
    fn endpoint(&self) -> Endpoint;

    /// Connects to the peer's endpoint (INIT -> RTR -> RTS).
    fn connect(&mut self, remote: &Endpoint) -> Result<(), FabricError>;

    /// Posts an RDMA WRITE (WITH IMMEDIATE when `imm` is set) of `len` bytes at `local_offset` of
    /// `local` to `remote_offset` of the peer's `remote` region. A `signaled` write completes; an
    /// unsignaled one completes only in error (a flush included), and its send-queue slot is
    /// freed when a later signaled request on the queue pair completes (RC completes in order):
    /// the caller counts it outstanding until then.
    #[allow(clippy::too_many_arguments)]
    fn post_write(
        &mut self,
        wr_id: u64,
        local: &Self::Mr,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
        imm: Option<u32>,
        signaled: bool,
    ) -> Result<(), FabricError>;

    /// Posts `count` receives (no buffers: they only catch immediates).
    fn post_recvs(&mut self, count: u32) -> Result<(), FabricError>;

    /// Fills `out` with completions; returns how many (never blocks).
    fn poll(&mut self, out: &mut [Completion]) -> usize;

    /// Moves the queue pair to the error state (outstanding requests flush).
    fn shut_down(&mut self);

    /// Asks for a wake-up (see [`Link::wakeup_fd`]) at the next completion. One-shot: arm again
    /// before each sleep. Completions that arrived before arming raise nothing, so poll once more
    /// after arming and before sleeping. It costs nothing while no completion was polled since
    /// the last arming and no wake-up was consumed (the queue is still armed), and it consumes
    /// a wake-up that the completions polled since may have raised. A wake-up can still come
    /// late (after its completion was polled): call [`Link::clear_wakeups`] when a wait reports
    /// the descriptor readable (only then: it costs a system call), or the next wait returns
    /// at once.
    fn arm_wakeup(&mut self) -> Result<(), FabricError> {
        Ok(())
    }

    /// A descriptor that becomes readable when an armed completion queue has a new completion
    /// (a completion channel); `None` on a fabric that has none (the simulator).
    fn wakeup_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Consumes the wake-ups that fired (never blocks); returns how many. A queue whose wake-up
    /// fired is no longer armed.
    fn clear_wakeups(&mut self) -> u32 {
        0
    }
}

/// Sleeps until one of `fds` is readable or `timeout_ns` pass; returns how many are readable.
/// An interrupted sleep (a signal) returns 0, as a time-out would: callers re-check and loop.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout_ns: u64) -> std::io::Result<usize> {
    wait_readable_mask(fds, timeout_ns).map(|m| m.count_ones() as usize)
}

/// [`wait_readable`], returning which descriptors are readable: bit i for `fds[i]`.
pub fn wait_readable_mask(fds: &[BorrowedFd<'_>], timeout_ns: u64) -> std::io::Result<u16> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    const MAX_FDS: usize = 16;
    let n = fds.len();
    if n == 0 || n > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("wait_readable takes 1..={MAX_FDS} descriptors, got {n}"),
        ));
    }
    // A fixed array (no allocation); slots past `n` repeat the last descriptor and are not polled.
    let mut set: [PollFd<'_>; MAX_FDS] =
        std::array::from_fn(|i| PollFd::from_borrowed_fd(fds[i.min(n - 1)], PollFlags::IN));
    let timeout = Timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as _,
        tv_nsec: (timeout_ns % 1_000_000_000) as _,
    };
    match poll(&mut set[..n], Some(&timeout)) {
        Ok(_) => Ok(set[..n]
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.revents().is_empty())
            .fold(0, |mask, (i, _)| mask | 1 << i)),
        Err(rustix::io::Errno::INTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A thin owning wrapper so any `Arc<T: RegisterableMemory>` registers.
pub fn as_registerable<T: RegisterableMemory>(mem: Arc<T>) -> Arc<dyn RegisterableMemory> {
    mem
}

#[cfg(test)]
mod wait_tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn wait_readable_sees_a_ready_descriptor_and_times_out_on_an_idle_one() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (idle_reader, _idle_writer) = std::io::pipe().unwrap();
        assert_eq!(super::wait_readable(&[reader.as_fd()], 1_000).unwrap(), 0);
        writer.write_all(b"x").unwrap();
        assert_eq!(
            super::wait_readable(&[idle_reader.as_fd(), reader.as_fd()], 1_000_000_000).unwrap(),
            1
        );
        assert!(
            super::wait_readable(&[], 0).is_err(),
            "no descriptors is an error"
        );
    }
}
