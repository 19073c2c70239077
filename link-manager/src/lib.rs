//! # railover
//!
//! An RDMA transport for trading engines that survives the loss of a NIC, a cable or a switch port
//! without losing, duplicating or reordering a message.
//!
//! * [`core`]: the failover state machine, sans I/O (liveness, failover, close, resume).
//! * [`rearm`]: re-arming a failed rail with the peer, sans I/O; [`control`] carries it out, on a
//!   control thread of the connection (real devices) or inline (the simulator).
//! * [`Connection`]: drives a [`core::Core`] over any fabric ([`railover_rdma::Nic`]);
//!   [`Connection::split`] gives a lock-free [`Sender`] for another thread and the [`Receiver`].
//! * [`Endpoint`]: each card once and any number of connections on them, driven by one `poll`
//!   (`endpoint::SimEndpoints`: two of them on the simulator); [`Endpoint::spawn`] runs one on
//!   a driver thread of its own, calling a [`Handler`].
//! * `sim::SimPair` (feature `test-util`, as `endpoint::SimEndpoints` and the fabrics'
//!   contract suite): two connected endpoints on the deterministic simulated fabric, with a
//!   simulated control channel and paused hosts when asked.
//! * `verbs` (feature `verbs`): `connect` / `accept` (and their resuming forms) on real cards.
//! * [`shared_queues`]: how an endpoint's connections share a few completion queues per card.
//! * [`liveness`]: how an endpoint's connections to the same peer endpoint share one heartbeat
//!   per card pair (the liveness contract).
//! * [`settings`]: configuration from a JSON file or `RAILOVER_*` environment variables.
//! * [`clock`]: where a connection's time comes from; [`clock::RealClock`] reads the CPU's
//!   counter and asks the OS about once a millisecond.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod clock;
pub mod config;
pub mod control;
pub mod core;
pub mod ctrl;
pub mod driver;
pub mod endpoint;
pub mod liveness;
mod memory;
pub mod rearm;
pub mod rejoin;
pub mod runtime;
pub mod settings;
pub mod shared_queues;
#[cfg(feature = "test-util")]
pub mod sim;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use crate::config::{Config, ConfigBuilder, ConfigError, GraySwitch, RailMode, MAX_RAILS};
pub use crate::core::{
    EndReason, Event, FailReason, Nanos, RailState, RecvError, ResumeState, SendError, Stats,
    SwitchReason,
};
pub use crate::driver::{Driver, Driving, Handler};
pub use crate::endpoint::{ConnectionId, Endpoint};
pub use crate::runtime::{CloseError, ConnectError, Connection, Receiver, Sender};
