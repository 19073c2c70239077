//! An endpoint on a thread of its own, for users who don't want to own the loop.
//!
//! [`Endpoint::spawn`] moves the endpoint onto a driver thread that polls every connection (busy
//! or blocking, see [`Driving`]) and calls a [`Handler`] on that thread: each message with its
//! connection and sequence number, each event, and each connection set up in the background
//! together with its lock-free [`Sender`]. Senders work from any thread (the handler's own
//! included: an echo is `sender.send(msg)` inside [`Handler::message`]); a sleeping driver is
//! woken by a send through the connection's doorbell. Dropping a sender closes its connection
//! gracefully. [`Driver::stop`] ends the thread and gives the endpoint back.
//!
//! The simulated fabric is single-threaded by design (deterministic, replayable), so a driver
//! runs on real cards; its test runs on rxe (`tests/rxe_e2e.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use railover_rdma::Nic;

use crate::core::Event;
use crate::endpoint::{ConnectionId, Endpoint};
use crate::runtime::{Clock, ConnectError, Sender};

/// What a driver thread does for the application, on that thread. Keep each call short: the
/// thread drives every connection between them.
pub trait Handler: Send + 'static {
    /// A message of connection `id`: in order and exactly once per connection, `seq` being what
    /// the peer's `send` returned for it.
    fn message(&mut self, id: ConnectionId, seq: u64, msg: &[u8]);

    /// One of connection `id`'s events. After [`Event::Ended`] the driver removes the
    /// connection (its id then names nothing).
    fn event(&mut self, id: ConnectionId, event: Event) {
        let _ = (id, event);
    }

    /// A connection set up in the background ([`Endpoint::listen`](crate::Endpoint) or a
    /// background dial, on real cards) or held by the endpoint when it was spawned: its sending
    /// half, for any thread. Dropping it closes the connection.
    fn connected(&mut self, id: ConnectionId, sender: Sender) {
        let _ = (id, sender);
    }

    /// A background set-up failed (a hostile or unreachable peer, a time-out).
    fn connect_failed(&mut self, error: ConnectError) {
        let _ = error;
    }
}

/// How a driver thread waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Driving {
    /// Spin on [`Endpoint::poll`]: the lowest latency, one core kept busy.
    BusyPoll,
    /// Sleep in [`Endpoint::poll_blocking`] between bursts: no core burnt while idle, a wake-up's
    /// latency added to the first message of a burst.
    Blocking,
}

/// A running driver thread; [`Driver::stop`] it to get the endpoint back. Dropping it stops the
/// thread too (and drops the endpoint, closing its connections).
pub struct Driver<N: Nic, C: Clock> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Endpoint<N, C>>>,
}

impl<N: Nic, C: Clock> Driver<N, C> {
    /// Stops the thread (within about a heartbeat interval when it sleeps) and returns the
    /// endpoint with its connections, still connected.
    pub fn stop(mut self) -> Endpoint<N, C> {
        self.halt().expect("a driver's thread runs until stopped")
    }

    /// Whether the thread ended by itself (it panicked: the handler did).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn halt(&mut self) -> Option<Endpoint<N, C>> {
        // Relaxed: a stop flag, seen within one turn of the thread's loop.
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(endpoint) => Some(endpoint),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl<N: Nic, C: Clock> Drop for Driver<N, C> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = self.halt();
        }
    }
}

impl<N, C> Endpoint<N, C>
where
    N: Nic + 'static,
    C: Clock + Clone + 'static,
    Endpoint<N, C>: Send,
{
    /// Moves the endpoint onto a driver thread of its own that runs `handler` (see the module
    /// docs). The senders of the connections it already holds go to
    /// [`Handler::connected`] first, on that thread.
    pub fn spawn<H: Handler>(self, handler: H, driving: Driving) -> std::io::Result<Driver<N, C>> {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("railover-driver".into())
            .spawn(move || drive(self, handler, driving, &halt))?;
        Ok(Driver {
            stop,
            thread: Some(thread),
        })
    }
}

fn drive<N, C, H>(
    mut endpoint: Endpoint<N, C>,
    mut handler: H,
    driving: Driving,
    stop: &AtomicBool,
) -> Endpoint<N, C>
where
    N: Nic,
    C: Clock + Clone,
    H: Handler,
{
    let held: Vec<ConnectionId> = endpoint.ids().collect();
    for id in held {
        hand_over(&mut endpoint, &mut handler, id);
    }
    // A sleeping driver wakes at least this often to see the stop flag.
    let nap = endpoint.config().heartbeat_interval_ns();
    while !stop.load(Ordering::Relaxed) {
        let deliver = |id, seq, msg: &[u8]| handler.message(id, seq, msg);
        match driving {
            Driving::BusyPoll => endpoint.poll(deliver),
            Driving::Blocking => endpoint.poll_blocking(nap, deliver),
        };
        while let Some(ready) = endpoint.poll_connected() {
            match ready {
                Ok(id) => hand_over(&mut endpoint, &mut handler, id),
                Err(e) => handler.connect_failed(e),
            }
        }
        while let Some((id, event)) = endpoint.poll_event() {
            let ended = matches!(event, Event::Ended { .. });
            handler.event(id, event);
            if ended {
                endpoint.remove(id);
            }
        }
    }
    endpoint
}

fn hand_over<N, C, H>(endpoint: &mut Endpoint<N, C>, handler: &mut H, id: ConnectionId)
where
    N: Nic,
    C: Clock + Clone,
    H: Handler,
{
    if let Some(sender) = endpoint.get_mut(id).and_then(|c| c.take_sender()) {
        handler.connected(id, sender);
    }
}
