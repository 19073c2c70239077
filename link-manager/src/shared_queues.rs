//! An endpoint's completion queues, shared by its connections' links on each card.
//!
//! Without them, an endpoint with `n` connections on `r` rails polls `n * r` completion queues per
//! turn and a blocking wait watches as many descriptors. With them, each card has a few queues
//! (each holds the links of up to `QueuePool::links_per_queue` connections), which the endpoint
//! polls and hands each completion to its link's connection by queue pair number.
//!
//! Links are made at set-up, on the endpoint's thread or on a background set-up thread, so the
//! queues with room are kept in a `QueuePool` behind a lock taken only when a link is made or
//! dropped. What the endpoint must know travels to it as `QueueNews`, in order: a new queue, a
//! link made on one (its completions may arrive before its connection is inserted: they wait for
//! it), and a link gone (a completion that names it afterwards is a leftover, dropped).
//!
//! A queue pair number is reused by the provider only after its queue pair was destroyed, and the
//! news that the older link is gone is sent before it is destroyed, so before the news of a newer
//! link with its number: a number is never routed to two links at once. A destroyed link's
//! leftovers still queued when its number is reused would reach the new link; mlx5 cleans a
//! destroyed queue pair's entries out of its completion queue, and rxe hands out numbers
//! cyclically, so that does not happen on either. Re-armed rails get a queue pair with a completion queue of its own (the control thread
//! makes them): [`crate::Receiver::progress`] polls those as before.

use std::sync::{mpsc, Arc, Mutex};

use railover_rdma::{FabricError, Link, LinkParams, Nic, SharedCq};

/// How many completions a card's shared queue holds at most: within every device's limit (rxe's
/// is 32K).
const QUEUE_ENTRIES_BUDGET: u32 = 16_384;

/// What the endpoint learns from the set-ups, in the order it happened.
pub(crate) enum QueueNews<N: Nic> {
    /// A new queue on rail `rail`'s card, to poll from now on.
    Queue { rail: usize, cq: N::SharedCq },
    /// A link was made on one of rail `rail`'s queues.
    Link { rail: usize, qpn: u32 },
    /// That link is gone (or about to be destroyed): its number names nothing any more.
    Gone { rail: usize, qpn: u32 },
}

/// The shared queues with room for more links, per rail, for whoever sets a connection up.
pub(crate) struct QueuePool<N: Nic> {
    inner: Mutex<PoolInner<N>>,
}

struct PoolInner<N: Nic> {
    rails: Vec<Vec<PoolQueue<N>>>,
    news: mpsc::Sender<QueueNews<N>>,
    next_id: u64,
}

struct PoolQueue<N: Nic> {
    id: u64,
    attach: <N::SharedCq as SharedCq>::Attach,
    links: u32,
}

impl<N: Nic> QueuePool<N> {
    /// A pool for `rails` cards, and where the endpoint hears what happens in it.
    pub(crate) fn new(rails: usize) -> (Arc<QueuePool<N>>, mpsc::Receiver<QueueNews<N>>) {
        let (news, heard) = mpsc::channel();
        let pool = QueuePool {
            inner: Mutex::new(PoolInner {
                rails: (0..rails).map(|_| Vec::new()).collect(),
                news,
                next_id: 0,
            }),
        };
        (Arc::new(pool), heard)
    }

    /// How many links one queue takes with these depths, so that it holds all they can have
    /// outstanding, twice over (a dropped link's flushed leftovers stay until the endpoint polls
    /// them, while a new link may already take its place).
    pub(crate) fn links_per_queue(params: &LinkParams) -> u32 {
        let per_link = params.max_send_wr.saturating_add(params.max_recv_wr);
        (QUEUE_ENTRIES_BUDGET / per_link.saturating_mul(2)).max(1)
    }

    /// A link on one of rail `rail`'s shared queues of `nic` (a new queue when all are full),
    /// with the guard that tells the endpoint when it goes. A queue that can't be had (the device
    /// refuses one, or the pool's queues are on a card opened again since `nic` was) gives a
    /// link with a queue of its own instead, polled by its connection: nothing fails for it.
    pub(crate) fn make_link(
        self: &Arc<Self>,
        rail: usize,
        nic: &N,
        params: &LinkParams,
    ) -> Result<(N::Link, Option<RouteGuard<N>>), FabricError> {
        let per_queue = Self::links_per_queue(params);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let Some(queues) = inner.rails.get_mut(rail) else {
            return Ok((nic.create_link(params)?, None));
        };
        let at = match queues.iter().position(|q| q.links < per_queue) {
            Some(at) => at,
            None => {
                let entries = per_queue * params.max_send_wr.saturating_add(params.max_recv_wr) * 2;
                let cq = match nic.create_shared_cq(entries) {
                    Ok(cq) => cq,
                    Err(e) => {
                        tracing::warn!(rail, error = %e, "no shared completion queue: the link gets its own");
                        return Ok((nic.create_link(params)?, None));
                    }
                };
                inner.next_id += 1;
                queues.push(PoolQueue {
                    id: inner.next_id,
                    attach: cq.attach(),
                    links: 0,
                });
                let _ = inner.news.send(QueueNews::Queue { rail, cq });
                queues.len() - 1
            }
        };
        let queue = &mut queues[at];
        let link = match nic.create_link_on(params, &queue.attach) {
            Ok(link) => link,
            Err(FabricError::InvalidParams(why)) => {
                tracing::info!(
                    rail,
                    why,
                    "the shared queue is another card's: the link gets its own"
                );
                return Ok((nic.create_link(params)?, None));
            }
            Err(e) => return Err(e),
        };
        queue.links += 1;
        let qpn = link.endpoint().qpn;
        let _ = inner.news.send(QueueNews::Link { rail, qpn });
        let guard = RouteGuard {
            pool: Arc::clone(self),
            rail,
            queue: queue.id,
            qpn,
        };
        Ok((link, Some(guard)))
    }

    /// Forgets rail `rail`'s queues (its card was released after a device-fatal event): links
    /// made from now on go on queues of the card opened again.
    pub(crate) fn forget_rail(&self, rail: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queues) = inner.rails.get_mut(rail) {
            queues.clear();
        }
    }

    fn link_gone(&self, rail: usize, queue: u64, qpn: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = inner.rails[rail].iter_mut().find(|q| q.id == queue) {
            q.links -= 1;
        }
        let _ = inner.news.send(QueueNews::Gone { rail, qpn });
    }
}

/// Held with a link on a shared queue, dropped just before it: the endpoint then stops routing
/// its number, and the queue has room for another link.
pub(crate) struct RouteGuard<N: Nic> {
    pool: Arc<QueuePool<N>>,
    rail: usize,
    queue: u64,
    qpn: u32,
}

impl<N: Nic> RouteGuard<N> {
    /// The number the link's completions carry.
    pub(crate) fn qpn(&self) -> u32 {
        self.qpn
    }
}

impl<N: Nic> Drop for RouteGuard<N> {
    fn drop(&mut self) {
        self.pool.link_gone(self.rail, self.queue, self.qpn);
    }
}
