//! # railover-replica
//!
//! Primary/backup replication of a deterministic trading service (an order-matching engine) over
//! the railover transport: a NIC, cable or switch fault is absorbed by railover's rail failover;
//! the loss of the primary itself is absorbed here, by the backup taking over with the same
//! state and the same replies.
//!
//! ```text
//!  clients ──requests──▶ PRIMARY                                   BACKUP
//!     ▲                  session manager (dedup, records)          verification engine
//!     │                  dispatcher ─▶ service(ctx: record) ─entry─▶ service(ctx: replay)
//!     │                                                 (railover)  records (mirror)
//!     └────replies (sync: after the backup's ack) ◀──────────ack────┘
//!  on the primary's loss: backup promotes; clients resend every unanswered request to it;
//!  seen requests are answered from its records, unseen ones are applied.
//! ```
//!
//! * [`node::Node`]: one replica, sans I/O (primary, backup, joining backup).
//! * [`client::Client`]: a client's sequence numbers and resends, sans I/O.
//! * [`service`]: the [`service::Service`] trait and the [`service::Ctx`] library that records the
//!   primary's non-determinism (time, random numbers, external calls) and replays it on the backup.
//! * [`matching`]: the example service, a price-time order book with a risk check.
//! * [`wire`]: the protocol's messages.
//! * [`net`]: the replicas and clients as processes: clients over TCP, replication over a
//!   railover connection.
//! * [`sim`]: clients, primary, backup and railover's simulated fabric in one seeded, replayable
//!   run, with crashes at every step of the request path.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod client;
pub mod matching;
pub mod net;
pub mod node;
pub mod service;
pub mod sim;
pub mod wire;

pub use crate::client::{Client, ClientEvent};
pub use crate::node::{Action, BackupLoss, Node, NodeConfig, NodeEvent, ReplicationMode, Role};
pub use crate::service::{Ctx, External, Service};
