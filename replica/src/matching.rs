//! The example service: a price-time priority order book for one instrument, with a pre-trade
//! risk check as its external call.
//!
//! Requests: `New { side, price, qty }` and `Cancel { order_id }`. Every accepted order is
//! stamped with [`Ctx::now`], gets a token from [`Ctx::random`] (a cancel key, say) and passes the
//! risk system through [`Ctx::external`] first: all three differ between two runs unless the
//! backup replays the primary's values, which is what the replication is for.

use std::collections::{BTreeMap, VecDeque};

use crate::service::{Ctx, External, RestoreError, Service};
use crate::wire::{Reader, Writer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Buy,
    Sell,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRequest {
    New { side: Side, price: u64, qty: u64 },
    Cancel { order_id: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// The resting order it traded against.
    pub maker: u64,
    pub price: u64,
    pub qty: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderReply {
    Accepted {
        order_id: u64,
        at: u64,
        token: u64,
        fills: Vec<Fill>,
        /// What is left resting on the book.
        resting: u64,
    },
    Rejected {
        reason: u8,
    },
    Canceled {
        order_id: u64,
        qty: u64,
    },
    UnknownOrder,
    /// The request did not decode.
    BadRequest,
}

/// Rejection reasons.
pub const REJECT_RISK: u8 = 1;
/// A quantity or price of 0, or past [`MAX_QTY`] / [`MAX_PRICE`].
pub const REJECT_BOUNDS: u8 = 2;

/// Largest quantity and price an order may carry (sums of them never overflow).
pub const MAX_QTY: u64 = 1 << 32;
pub const MAX_PRICE: u64 = 1 << 32;

impl OrderRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(24));
        match self {
            OrderRequest::New { side, price, qty } => {
                w.u8(1);
                w.u8(*side as u8);
                w.u64(*price);
                w.u64(*qty);
            }
            OrderRequest::Cancel { order_id } => {
                w.u8(2);
                w.u64(*order_id);
            }
        }
        w.0
    }

    pub fn decode(b: &[u8]) -> Option<OrderRequest> {
        let mut r = Reader(b);
        let req = match r.u8().ok()? {
            1 => OrderRequest::New {
                side: match r.u8().ok()? {
                    0 => Side::Buy,
                    1 => Side::Sell,
                    _ => return None,
                },
                price: r.u64().ok()?,
                qty: r.u64().ok()?,
            },
            2 => OrderRequest::Cancel {
                order_id: r.u64().ok()?,
            },
            _ => return None,
        };
        r.is_empty().then_some(req)
    }
}

impl OrderReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(48));
        match self {
            OrderReply::Accepted {
                order_id,
                at,
                token,
                fills,
                resting,
            } => {
                w.u8(1);
                w.u64(*order_id);
                w.u64(*at);
                w.u64(*token);
                w.u64(*resting);
                w.u32(fills.len() as u32);
                for f in fills {
                    w.u64(f.maker);
                    w.u64(f.price);
                    w.u64(f.qty);
                }
            }
            OrderReply::Rejected { reason } => {
                w.u8(2);
                w.u8(*reason);
            }
            OrderReply::Canceled { order_id, qty } => {
                w.u8(3);
                w.u64(*order_id);
                w.u64(*qty);
            }
            OrderReply::UnknownOrder => w.u8(4),
            OrderReply::BadRequest => w.u8(5),
        }
        w.0
    }

    pub fn decode(b: &[u8]) -> Option<OrderReply> {
        let mut r = Reader(b);
        let reply = match r.u8().ok()? {
            1 => {
                let (order_id, at, token, resting) =
                    (r.u64().ok()?, r.u64().ok()?, r.u64().ok()?, r.u64().ok()?);
                let n = r.u32().ok()? as usize;
                let mut fills = Vec::with_capacity(n.min(b.len() / 24));
                for _ in 0..n {
                    fills.push(Fill {
                        maker: r.u64().ok()?,
                        price: r.u64().ok()?,
                        qty: r.u64().ok()?,
                    });
                }
                OrderReply::Accepted {
                    order_id,
                    at,
                    token,
                    fills,
                    resting,
                }
            }
            2 => OrderReply::Rejected {
                reason: r.u8().ok()?,
            },
            3 => OrderReply::Canceled {
                order_id: r.u64().ok()?,
                qty: r.u64().ok()?,
            },
            4 => OrderReply::UnknownOrder,
            5 => OrderReply::BadRequest,
            _ => return None,
        };
        r.is_empty().then_some(reply)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Resting {
    id: u64,
    owner: u64,
    qty: u64,
}

/// The order book: the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderBook {
    next_id: u64,
    bids: BTreeMap<u64, VecDeque<Resting>>,
    asks: BTreeMap<u64, VecDeque<Resting>>,
    /// Where each resting order is: (side, price).
    index: BTreeMap<u64, (Side, u64)>,
    pub trades: u64,
}

impl OrderBook {
    pub fn new() -> OrderBook {
        OrderBook {
            next_id: 1,
            ..OrderBook::default()
        }
    }

    /// Resting quantity on each side.
    pub fn depth(&self) -> (u64, u64) {
        let sum = |book: &BTreeMap<u64, VecDeque<Resting>>| {
            book.values()
                .flatten()
                .fold(0u64, |sum, o| sum.saturating_add(o.qty))
        };
        (sum(&self.bids), sum(&self.asks))
    }

    fn new_order(
        &mut self,
        ctx: &mut Ctx<'_>,
        owner: u64,
        side: Side,
        price: u64,
        qty: u64,
    ) -> OrderReply {
        if qty == 0 || price == 0 || qty > MAX_QTY || price > MAX_PRICE {
            return OrderReply::Rejected {
                reason: REJECT_BOUNDS,
            };
        }
        let mut call = Writer(Vec::with_capacity(25));
        call.u64(owner);
        call.u8(side as u8);
        call.u64(price);
        call.u64(qty);
        if ctx.external(&call.0).first() != Some(&1) {
            return OrderReply::Rejected {
                reason: REJECT_RISK,
            };
        }
        let at = ctx.now();
        let token = ctx.random();
        let order_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let (book, crosses): (_, fn(u64, u64) -> bool) = match side {
            Side::Buy => (&mut self.asks, |level, limit| level <= limit),
            Side::Sell => (&mut self.bids, |level, limit| level >= limit),
        };
        let mut left = qty;
        let mut fills = Vec::new();
        while left > 0 {
            let level = match side {
                Side::Buy => book.keys().next().copied(),
                Side::Sell => book.keys().next_back().copied(),
            };
            let Some(level) = level.filter(|l| crosses(*l, price)) else {
                break;
            };
            let queue = book.get_mut(&level).expect("level exists");
            while left > 0 {
                let Some(maker) = queue.front_mut() else {
                    break;
                };
                let traded = left.min(maker.qty);
                maker.qty -= traded;
                left -= traded;
                fills.push(Fill {
                    maker: maker.id,
                    price: level,
                    qty: traded,
                });
                if maker.qty == 0 {
                    let id = maker.id;
                    queue.pop_front();
                    self.index.remove(&id);
                }
            }
            if queue.is_empty() {
                book.remove(&level);
            }
        }
        self.trades = self.trades.wrapping_add(fills.len() as u64);
        if left > 0 {
            let own = match side {
                Side::Buy => &mut self.bids,
                Side::Sell => &mut self.asks,
            };
            own.entry(price).or_default().push_back(Resting {
                id: order_id,
                owner,
                qty: left,
            });
            self.index.insert(order_id, (side, price));
        }
        OrderReply::Accepted {
            order_id,
            at,
            token,
            fills,
            resting: left,
        }
    }

    fn cancel(&mut self, owner: u64, order_id: u64) -> OrderReply {
        let Some(&(side, price)) = self.index.get(&order_id) else {
            return OrderReply::UnknownOrder;
        };
        let book = match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        let queue = book.get_mut(&price).expect("indexed level exists");
        let pos = queue
            .iter()
            .position(|o| o.id == order_id)
            .expect("indexed order rests");
        if queue[pos].owner != owner {
            return OrderReply::UnknownOrder;
        }
        let qty = queue.remove(pos).expect("position found").qty;
        if queue.is_empty() {
            book.remove(&price);
        }
        self.index.remove(&order_id);
        OrderReply::Canceled { order_id, qty }
    }
}

impl Service for OrderBook {
    fn apply(&mut self, ctx: &mut Ctx<'_>, client: u64, request: &[u8]) -> Vec<u8> {
        let reply = match OrderRequest::decode(request) {
            Some(OrderRequest::New { side, price, qty }) => {
                self.new_order(ctx, client, side, price, qty)
            }
            Some(OrderRequest::Cancel { order_id }) => self.cancel(client, order_id),
            None => OrderReply::BadRequest,
        };
        reply.encode()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.u64(self.next_id);
        w.u64(self.trades);
        for book in [&self.bids, &self.asks] {
            w.u32(book.values().map(VecDeque::len).sum::<usize>() as u32);
            for (price, queue) in book {
                for o in queue {
                    w.u64(*price);
                    w.u64(o.id);
                    w.u64(o.owner);
                    w.u64(o.qty);
                }
            }
        }
        w.0
    }

    fn restore(snapshot: &[u8]) -> Result<Self, RestoreError> {
        let bad = |e| RestoreError(format!("order book: {e}"));
        let mut r = Reader(snapshot);
        let mut book = OrderBook {
            next_id: r.u64().map_err(bad)?,
            trades: r.u64().map_err(bad)?,
            ..OrderBook::default()
        };
        for side in [Side::Buy, Side::Sell] {
            for _ in 0..r.u32().map_err(bad)? {
                let (price, id, owner, qty) = (
                    r.u64().map_err(bad)?,
                    r.u64().map_err(bad)?,
                    r.u64().map_err(bad)?,
                    r.u64().map_err(bad)?,
                );
                let levels = match side {
                    Side::Buy => &mut book.bids,
                    Side::Sell => &mut book.asks,
                };
                levels
                    .entry(price)
                    .or_default()
                    .push_back(Resting { id, owner, qty });
                book.index.insert(id, (side, price));
            }
        }
        if !r.is_empty() {
            return Err(RestoreError("order book: bytes left over".into()));
        }
        Ok(book)
    }
}

/// A risk system with state of its own: it refuses every order that would take a client's
/// accepted quantity past `limit`, counting what it approved. Asked twice about the same order
/// it may answer otherwise, which is why the backup must not ask it again.
#[derive(Debug, Clone, Default)]
pub struct RiskLimits {
    pub limit: u64,
    approved: BTreeMap<u64, u64>,
    pub calls: u64,
}

impl RiskLimits {
    pub fn new(limit: u64) -> RiskLimits {
        RiskLimits {
            limit,
            ..RiskLimits::default()
        }
    }
}

impl External for RiskLimits {
    fn call(&mut self, call: &[u8]) -> Vec<u8> {
        self.calls += 1;
        let mut r = Reader(call);
        let (Ok(owner), Ok(_side), Ok(_price), Ok(qty)) = (r.u64(), r.u8(), r.u64(), r.u64())
        else {
            return vec![0];
        };
        let used = self.approved.entry(owner).or_default();
        match used.checked_add(qty).filter(|total| *total <= self.limit) {
            Some(total) => {
                *used = total;
                vec![1]
            }
            None => vec![0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Rng;

    fn apply(
        book: &mut OrderBook,
        risk: &mut RiskLimits,
        client: u64,
        req: OrderRequest,
    ) -> OrderReply {
        let (mut rng, mut rec) = (Rng::new(3), Vec::new());
        let mut ctx = Ctx::record(10, &mut rng, risk, &mut rec);
        OrderReply::decode(&book.apply(&mut ctx, client, &req.encode())).unwrap()
    }

    #[test]
    fn orders_match_by_price_then_time_and_the_book_survives_a_snapshot() {
        let (mut book, mut risk) = (OrderBook::new(), RiskLimits::new(1_000));
        let sell = |price, qty| OrderRequest::New {
            side: Side::Sell,
            price,
            qty,
        };
        apply(&mut book, &mut risk, 1, sell(101, 5));
        apply(&mut book, &mut risk, 2, sell(100, 5));
        apply(&mut book, &mut risk, 3, sell(100, 5));
        let r = apply(
            &mut book,
            &mut risk,
            4,
            OrderRequest::New {
                side: Side::Buy,
                price: 101,
                qty: 12,
            },
        );
        let OrderReply::Accepted { fills, resting, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(resting, 0);
        assert_eq!(
            fills
                .iter()
                .map(|f| (f.maker, f.price, f.qty))
                .collect::<Vec<_>>(),
            [(2, 100, 5), (3, 100, 5), (1, 101, 2)]
        );
        assert_eq!(book.depth(), (0, 3));
        assert_eq!(
            apply(
                &mut book,
                &mut risk,
                2,
                OrderRequest::Cancel { order_id: 1 }
            ),
            OrderReply::UnknownOrder,
            "only the owner cancels"
        );
        let copy = OrderBook::restore(&book.snapshot()).unwrap();
        assert_eq!(copy, book);
        assert_eq!(
            apply(
                &mut book,
                &mut risk,
                1,
                OrderRequest::Cancel { order_id: 1 }
            ),
            OrderReply::Canceled {
                order_id: 1,
                qty: 3
            }
        );
        assert_eq!(book.depth(), (0, 0));
        assert!(OrderBook::restore(&[1, 2, 3]).is_err());
    }

    #[test]
    fn the_risk_system_refuses_past_the_limit() {
        let (mut book, mut risk) = (OrderBook::new(), RiskLimits::new(10));
        let buy = |qty| OrderRequest::New {
            side: Side::Buy,
            price: 50,
            qty,
        };
        assert!(matches!(
            apply(&mut book, &mut risk, 1, buy(8)),
            OrderReply::Accepted { .. }
        ));
        assert_eq!(
            apply(&mut book, &mut risk, 1, buy(8)),
            OrderReply::Rejected {
                reason: REJECT_RISK
            }
        );
        assert_eq!(
            OrderReply::decode(&book.apply(&mut Ctx::replay(&[]), 1, &[9])),
            Some(OrderReply::BadRequest)
        );
        // Hostile quantities: refused by bounds, and the risk system can't be overflowed past
        // its limit (nor panic) however it is called.
        assert_eq!(
            apply(&mut book, &mut risk, 1, buy(u64::MAX)),
            OrderReply::Rejected {
                reason: REJECT_BOUNDS
            }
        );
        let call = |qty: u64| {
            let mut w = Writer(Vec::new());
            w.u64(1);
            w.u8(0);
            w.u64(50);
            w.u64(qty);
            w.0
        };
        assert_eq!(risk.call(&call(u64::MAX)), vec![0]);
        assert_eq!(risk.call(&call(2)), vec![1], "8 + 2 is within 10");
        assert_eq!(risk.call(&call(u64::MAX - 5)), vec![0]);
    }
}
