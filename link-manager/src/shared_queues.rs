//! An endpoint's completion queues, shared by its connections' links on each card.
//!
//! Without them, an endpoint with `n` connections on `r` rails polls `n * r` completion queues per
//! turn and a blocking wait watches as many descriptors. With them, each card has a few queues
//! (each holds the links of up to `QueuePool::links_per_queue` connections), which the endpoint
//! polls and hands each completion to its link's connection by queue pair number.
//!
//! Links are made at set-up, on the endpoint's thread or on a background set-up thread, so the
//! queues with room are kept in a `QueuePool` behind a lock taken only when a link is made (never
//! when one is dropped: that may happen on the data path). What the endpoint must know travels to
//! it as `QueueNews`, in order: a new queue, a link made on one (its completions may arrive before
//! its connection is inserted: they wait for it), and a link gone (a completion that names it
//! afterwards is a leftover, dropped). Queue pair numbers are unique per card only while it stays
//! open, so every piece of news carries the card's epoch: after a device-fatal release the
//! endpoint ignores news of links on the card it let go of.
//!
//! A queue pair number is reused by the provider only after its queue pair was destroyed, and the
//! news that the older link is gone is sent before it is destroyed, so before the news of a newer
//! link with its number: a number is never routed to two links at once. A destroyed link's
//! leftovers still queued when its number is reused would reach the new link: mlx5 cleans a
//! destroyed queue pair's entries out of its completion queue, and rxe hands out numbers
//! cyclically (`xa_alloc_cyclic`), so that does not happen on either. (A provider that did both
//! the opposite way would hand such a link a flushed completion, which fails that rail over.)
//!
//! A re-armed rail's fresh queue pair goes on the shared queues too, made on the control thread
//! (or inline): its news names the connection that will own it (`SharedLinks::owner`), so the
//! endpoint routes its completions there at once. Those that come before the connection installs
//! it wait in the connection, in order, and are handled right after the install.
//!
//! The pool also holds the endpoint's handle on each card, for whoever makes links away from the
//! endpoint's thread: set-up threads, and connections re-arming a rail whose card a device-fatal
//! event released. Whoever needs a released card first opens it again here (`QueuePool::open_card`),
//! and everyone else, the endpoint included, takes that handle: one device context per card for
//! the whole endpoint, so that every connection's queue pairs go on the shared queues again and
//! the card's events are read once. (Each connection opening its own, as before, left an endpoint
//! after a device reset with a context, a completion queue and an event read per connection.)

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use railover_rdma::{FabricError, Link, LinkParams, Nic, SharedCq};

/// How many completions a card's shared queue holds at most: within every device's limit (rxe's
/// is 32K).
const QUEUE_ENTRIES_BUDGET: u32 = 16_384;

/// What the endpoint learns from the set-ups, in the order it happened. `epoch` names the opening
/// of rail `rail`'s card the news is about (see [`QueuePool::forget_rail`]).
pub(crate) enum QueueNews<N: Nic> {
    /// A new queue on the card, to poll from now on.
    Queue {
        rail: usize,
        epoch: u64,
        cq: N::SharedCq,
    },
    /// A link was made on one of the card's queues, for the connection `owner` names.
    Link {
        rail: usize,
        epoch: u64,
        qpn: u32,
        owner: u64,
    },
    /// That link is gone (or about to be destroyed): its number names nothing any more.
    Gone { rail: usize, epoch: u64, qpn: u32 },
}

/// The shared queues with room for more links, per rail, and the endpoint's cards, for whoever
/// sets a connection up or re-arms one.
pub(crate) struct QueuePool<N: Nic> {
    inner: Mutex<PoolInner<N>>,
    /// Each rail's card's opening, bumped when the card is let go of (device fatal: its queues
    /// are forgotten). Written under the lock; also read without it: a data thread asks whether
    /// a card is still the endpoint's current one at an install, and must not wait behind a
    /// set-up holding the lock through a queue pair's creation.
    epochs: Vec<AtomicU64>,
    /// Set when `open_card` opened a released card: the endpoint takes it as its own at its next
    /// look ([`QueuePool::take_opened`]).
    opened: AtomicBool,
}

/// The last owner token handed out (see [`SharedLinks`]): unique in the process, so that a
/// connection of one endpoint inserted into another (which its links never report to) can't take
/// another connection's routes there.
static OWNERS: AtomicU64 = AtomicU64::new(0);

/// What a connection makes its links with: the endpoint's pool, and the token that names the
/// connection in the pool's news (the endpoint learns which connection it is at the insert).
pub(crate) struct SharedLinks<N: Nic> {
    pool: Arc<QueuePool<N>>,
    owner: u64,
}

impl<N: Nic> Clone for SharedLinks<N> {
    fn clone(&self) -> Self {
        SharedLinks {
            pool: Arc::clone(&self.pool),
            owner: self.owner,
        }
    }
}

impl<N: Nic> SharedLinks<N> {
    /// For a new connection.
    pub(crate) fn new(pool: &Arc<QueuePool<N>>) -> Self {
        // Relaxed: a unique number, nothing published with it.
        let owner = OWNERS.fetch_add(1, Ordering::Relaxed) + 1;
        SharedLinks {
            pool: Arc::clone(pool),
            owner,
        }
    }

    pub(crate) fn owner(&self) -> u64 {
        self.owner
    }

    /// The endpoint's card of rail `rail`, opened again if released, and the epoch of that
    /// opening (see [`QueuePool::open_card`]).
    pub(crate) fn open_card(&self, rail: usize) -> Result<(N, u64), FabricError> {
        self.pool.open_card(rail)
    }

    /// Whether `epoch` is still the current opening of the endpoint's card of rail `rail`
    /// (false once a device-fatal event released it). No lock.
    pub(crate) fn card_is_current(&self, rail: usize, epoch: u64) -> bool {
        self.pool.epoch(rail) == Some(epoch)
    }

    /// A link for this connection's rail `rail` on `nic`, the endpoint's card of opening
    /// `epoch` (see [`QueuePool::make_link`]).
    pub(crate) fn make_link(
        &self,
        rail: usize,
        nic: &N,
        epoch: u64,
        params: &LinkParams,
    ) -> Result<RoutedLink<N>, FabricError> {
        self.pool.make_link(rail, nic, epoch, params, self.owner)
    }
}

/// A queue pair and, when it is on a shared queue, its guard. Field order is drop order: the
/// endpoint hears the link is gone before it is destroyed.
pub(crate) struct RoutedLink<N: Nic> {
    pub(crate) route: Option<RouteGuard<N>>,
    pub(crate) link: N::Link,
}

struct PoolInner<N: Nic> {
    rails: Vec<RailQueues<N>>,
    /// How to open each rail's card again (the endpoint's: a re-arm never opens another card
    /// here).
    reopen: Vec<N::Reopen>,
    news: NewsSender<N>,
}

/// Where set-ups and dropped links send their news, counted so that the endpoint's poll looks at
/// the channel only when there is some (an empty channel's `try_recv` costs ~60 instructions, a
/// load one).
pub(crate) struct NewsSender<N: Nic> {
    tx: mpsc::Sender<QueueNews<N>>,
    sent: Arc<AtomicU64>,
}

impl<N: Nic> Clone for NewsSender<N> {
    fn clone(&self) -> Self {
        NewsSender {
            tx: self.tx.clone(),
            sent: Arc::clone(&self.sent),
        }
    }
}

impl<N: Nic> NewsSender<N> {
    fn send(&self, news: QueueNews<N>) {
        // Counted before it is sent, so that the endpoint never takes more than the count says
        // (counted after, a piece sent but not yet counted could be taken with another, and
        // the count would then hide the next one until the slow sender counted). The endpoint
        // may see the count before the piece is in the channel: it looks again next time.
        self.sent.fetch_add(1, Ordering::Release);
        let _ = self.tx.send(news);
    }
}

/// The endpoint's end of the news.
pub(crate) struct NewsReceiver<N: Nic> {
    rx: mpsc::Receiver<QueueNews<N>>,
    sent: Arc<AtomicU64>,
    /// How many it took out.
    taken: u64,
}

impl<N: Nic> NewsReceiver<N> {
    /// Whether news may wait (one load when there is none). Every piece in the channel was
    /// counted before it was sent, so the count is never behind what was taken, and is ahead
    /// while anything waits.
    #[inline]
    pub(crate) fn any(&self) -> bool {
        // Pairs with the Release in `NewsSender::send`.
        self.sent.load(Ordering::Acquire) != self.taken
    }

    /// The next piece of news, if one is there.
    pub(crate) fn next(&mut self) -> Option<QueueNews<N>> {
        let news = self.rx.try_recv().ok()?;
        self.taken += 1;
        Some(news)
    }
}

struct RailQueues<N: Nic> {
    /// The endpoint's handle on the card (None: released, or missing since the start, until
    /// someone opens it again).
    card: Option<N>,
    queues: Vec<PoolQueue<N>>,
}

struct PoolQueue<N: Nic> {
    attach: <N::SharedCq as SharedCq>::Attach,
    /// Links on it now (their guards give their place back when dropped).
    links: Arc<AtomicU32>,
}

impl<N: Nic> QueuePool<N> {
    /// A pool for the endpoint's `cards` (None: missing) and how to open each again, and where
    /// the endpoint hears what happens in it.
    pub(crate) fn new(cards: Vec<(Option<N>, N::Reopen)>) -> (Arc<QueuePool<N>>, NewsReceiver<N>) {
        let epochs = cards.iter().map(|_| AtomicU64::new(0)).collect();
        let (cards, reopen): (Vec<_>, Vec<_>) = cards.into_iter().unzip();
        let (tx, rx) = mpsc::channel();
        let sent = Arc::new(AtomicU64::new(0));
        let news = NewsSender {
            tx,
            sent: Arc::clone(&sent),
        };
        let heard = NewsReceiver { rx, sent, taken: 0 };
        let pool = QueuePool {
            inner: Mutex::new(PoolInner {
                rails: (cards.into_iter())
                    .map(|card| RailQueues {
                        card,
                        queues: Vec::new(),
                    })
                    .collect(),
                reopen,
                news,
            }),
            epochs,
            opened: AtomicBool::new(false),
        };
        (Arc::new(pool), heard)
    }

    /// How many links one queue takes with these depths, so that it holds all they can have
    /// outstanding, twice over (a dropped link's flushed leftovers stay until the endpoint polls
    /// them, while a new link may already take its place).
    pub(crate) fn links_per_queue(params: &LinkParams) -> u32 {
        (QUEUE_ENTRIES_BUDGET / entries_per_link(params).saturating_mul(2)).max(1)
    }

    /// A link on one of rail `rail`'s shared queues of `nic` (a new queue when none on this card
    /// has room), with the guard that tells the endpoint when it goes. A queue the device
    /// refuses gives a link with a queue of its own instead, polled by its connection: nothing
    /// fails for it. `nic` must be the card of the pool's opening `epoch`, and that opening the
    /// current one: a card the endpoint let go of since (device fatal) gets no link, or a new
    /// queue on it would be filed under the new opening and keep the dead device open.
    fn make_link(
        &self,
        rail: usize,
        nic: &N,
        epoch: u64,
        params: &LinkParams,
        owner: u64,
    ) -> Result<RoutedLink<N>, FabricError> {
        let own = |nic: &N| -> Result<RoutedLink<N>, FabricError> {
            Ok(RoutedLink {
                route: None,
                link: nic.create_link(params)?,
            })
        };
        let per_queue = Self::links_per_queue(params);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let Some(card) = inner.rails.get_mut(rail) else {
            return own(nic);
        };
        if self.epoch_locked(rail) != epoch {
            return Err(FabricError::Unavailable(
                "the card was released after a device-fatal event".into(),
            ));
        }
        // Acquire: pairs with the Release in `RouteGuard::drop`, whose link went before it.
        let room = |q: &PoolQueue<N>| q.links.load(Ordering::Acquire) < per_queue;
        // A queue with room on this card (one on another card, say a card a set-up thread still
        // held when it was released and opened again, refuses at once, without a system call).
        let mut made = None;
        for (at, queue) in card.queues.iter().enumerate().filter(|(_, q)| room(q)) {
            match nic.create_link_on(params, &queue.attach) {
                Ok(link) => {
                    made = Some((at, link));
                    break;
                }
                Err(FabricError::InvalidParams(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let (at, link) = match made {
            Some(made) => made,
            None => {
                let entries = per_queue * entries_per_link(params) * 2;
                let cq = match nic.create_shared_cq(entries) {
                    Ok(cq) => cq,
                    Err(e) => {
                        tracing::warn!(rail, error = %e, "no shared completion queue: the link gets its own");
                        return own(nic);
                    }
                };
                let link = nic.create_link_on(params, &cq.attach())?;
                card.queues.push(PoolQueue {
                    attach: cq.attach(),
                    links: Arc::default(),
                });
                inner.news.send(QueueNews::Queue { rail, epoch, cq });
                (card.queues.len() - 1, link)
            }
        };
        let queue = &card.queues[at];
        // Relaxed: counted under the pool's lock; only the guard's decrement races with it.
        queue.links.fetch_add(1, Ordering::Relaxed);
        let qpn = link.endpoint().qpn;
        inner.news.send(QueueNews::Link {
            rail,
            epoch,
            qpn,
            owner,
        });
        let guard = RouteGuard {
            news: inner.news.clone(),
            links: Arc::clone(&queue.links),
            rail,
            epoch,
            qpn,
        };
        Ok(RoutedLink {
            route: Some(guard),
            link,
        })
    }

    /// Forgets rail `rail`'s card and queues (released after a device-fatal event): links made
    /// from now on go on queues of the card opened again, and news of the old ones is recognised
    /// as such by its epoch. Returns the new epoch.
    pub(crate) fn forget_rail(&self, rail: usize) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let card = &mut inner.rails[rail];
        card.queues.clear();
        let released = card.card.take();
        let epoch = self.epoch_locked(rail) + 1;
        // Release: pairs with the Acquire in `epoch`.
        self.epochs[rail].store(epoch, Ordering::Release);
        drop(inner);
        drop(released); // (its last handle may be a device close: not under the lock)
        epoch
    }

    /// The current epoch of rail `rail`'s card (None: no such rail). No lock.
    pub(crate) fn epoch(&self, rail: usize) -> Option<u64> {
        // Acquire: pairs with the Release in `forget_rail`.
        self.epochs.get(rail).map(|e| e.load(Ordering::Acquire))
    }

    /// [`QueuePool::epoch`] of an existing rail, read under the pool's lock (which orders it
    /// with its writes).
    fn epoch_locked(&self, rail: usize) -> u64 {
        self.epochs[rail].load(Ordering::Relaxed)
    }

    /// How to open rail `rail`'s card again.
    pub(crate) fn reopen_token(&self, rail: usize) -> N::Reopen {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.reopen[rail].clone()
    }

    /// Whether a card was opened again since the last call (the endpoint then takes it: see
    /// [`QueuePool::card`]). One load when none was.
    pub(crate) fn take_opened(&self) -> bool {
        // Acquire (the swap): pairs with the Release in `open_card`, after the card was stored.
        self.opened.load(Ordering::Relaxed) && self.opened.swap(false, Ordering::Acquire)
    }

    /// The endpoint's card of rail `rail` (None: released or missing).
    #[cfg(test)]
    pub(crate) fn card(&self, rail: usize) -> Option<N> {
        self.card_at(rail).0
    }

    /// The endpoint's card of rail `rail` (None: released or missing) and the pool's current
    /// opening of it, read together (a connection set up on the card is checked against it at
    /// its insert).
    #[cfg_attr(not(any(feature = "verbs", test)), allow(dead_code))]
    pub(crate) fn card_at(&self, rail: usize) -> (Option<N>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .rails
            .get(rail)
            .map_or((None, 0), |r| (r.card.clone(), self.epoch_locked(rail)))
    }

    /// [`QueuePool::card`] without waiting: None while another thread holds the pool (a set-up
    /// making a queue pair, which takes system calls): the endpoint's thread asks again later.
    pub(crate) fn try_card(&self, rail: usize) -> Option<Option<N>> {
        let inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(inner.rails.get(rail).and_then(|r| r.card.clone()))
    }

    /// Flags a card as opened again (see [`QueuePool::take_opened`]): the endpoint could not
    /// take it yet.
    pub(crate) fn flag_opened(&self) {
        // Release: pairs with the Acquire in `take_opened`.
        self.opened.store(true, Ordering::Release);
    }

    /// The endpoint's card of rail `rail`, opened again (by the endpoint's reopen token) if it
    /// is released, once for the whole endpoint: whoever comes later gets this handle; with the
    /// epoch of this opening. The open itself runs without the lock (it may take a while: a
    /// set-up or the endpoint's poll must not wait for it); of two racing opens, the first
    /// stored wins.
    pub(crate) fn open_card(&self, rail: usize) -> Result<(N, u64), FabricError> {
        let current = |inner: &PoolInner<N>| {
            let r = inner.rails.get(rail)?;
            Some(r.card.clone().map(|c| (c, self.epoch_locked(rail))))
        };
        let reopen = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match current(&inner) {
                None => return Err(FabricError::InvalidParams("no such rail")),
                Some(Some(open)) => return Ok(open),
                Some(None) => inner.reopen[rail].clone(),
            }
        };
        let nic = N::reopen(&reopen)?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(open)) = current(&inner) {
            drop(inner);
            drop(nic); // another opened it first
            return Ok(open);
        }
        inner.rails[rail].card = Some(nic.clone());
        let epoch = self.epoch_locked(rail);
        // Release: pairs with the Acquire in `take_opened`: the card is stored before the flag.
        self.opened.store(true, Ordering::Release);
        tracing::info!(
            rail,
            card = nic.name(),
            "card opened again for the endpoint"
        );
        Ok((nic, epoch))
    }
}

/// The completions one link can have outstanding: its send and receive queue depths.
fn entries_per_link(params: &LinkParams) -> u32 {
    params.max_send_wr.saturating_add(params.max_recv_wr)
}

/// Held with a link on a shared queue, dropped just before it: the endpoint then stops routing
/// its number, and the queue has room for another link. Dropping it takes no lock.
pub(crate) struct RouteGuard<N: Nic> {
    news: NewsSender<N>,
    links: Arc<AtomicU32>,
    rail: usize,
    epoch: u64,
    qpn: u32,
}

impl<N: Nic> RouteGuard<N> {
    /// The number the link's completions carry.
    pub(crate) fn qpn(&self) -> u32 {
        self.qpn
    }

    /// The opening of the card the link is on.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl<N: Nic> Drop for RouteGuard<N> {
    fn drop(&mut self) {
        let (rail, epoch, qpn) = (self.rail, self.epoch, self.qpn);
        self.news.send(QueueNews::Gone { rail, epoch, qpn });
        // Release: pairs with the Acquire in `QueuePool::make_link`.
        self.links.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use railover_rdma::sim::{SimFabric, SimNic};

    /// A link asked for on a card the endpoint let go of since (its opening is no longer the
    /// pool's) is refused: no queue is made on the dead card and filed under the new opening
    /// (the endpoint would poll it and keep the device open), and no news is sent.
    #[test]
    fn no_link_on_a_card_of_an_opening_the_pool_let_go_of() {
        let fabric = SimFabric::new(1);
        let (nic, _peer, _) = fabric.add_wire("a", "b", 1_000);
        let (pool, mut news) =
            QueuePool::<SimNic>::new(vec![(Some(nic.clone()), nic.reopen_token())]);
        let links = SharedLinks::new(&pool);
        let params = LinkParams::default();
        let first = links
            .make_link(0, &nic, 0, &params)
            .expect("current opening");
        assert!(first.route.is_some());
        let mut heard = 0;
        while news.next().is_some() {
            heard += 1;
        }
        assert_eq!(heard, 2, "a queue and a link");
        assert_eq!(pool.forget_rail(0), 1);
        assert!(pool.card(0).is_none());
        let stale = links.make_link(0, &nic, 0, &params);
        assert!(stale.is_err(), "refused on the released opening");
        assert!(
            news.next().is_none(),
            "no queue filed under the new opening"
        );
        assert!(!news.any());
    }
}
