//! Connecting over real RDMA devices (cargo feature `verbs`): a greeting, then one hello per
//! rail over TCP, then the queue pairs are connected; the TCP stream then carries re-arms on the
//! connection's control thread ([`crate::control`]).
//!
//! The listener trusts nothing before it has checked it: it reads the dialler's greeting first
//! (nonce, rails, geometry) and answers only a valid one; it opens its cards only then, reads and
//! validates the dialler's hellos, and only then sends its own (queue pair numbers, ring
//! addresses and keys: what lets a peer write into its memory). Greetings are checked on
//! threads of their own, so a slow, silent or hostile client never delays a good one; a
//! greeting or hello that comes back reflected is refused (no connection to oneself).
//!
//! After the barrier the listener opens the connection's rejoin port and tells the dialler its
//! number: a control stream that breaks later is re-established through it
//! ([`crate::rejoin`]), proven by the session id both greetings made.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use railover_rdma::handshake::{self, Greeting, HandshakeError, Hello, WireGeometry};
use railover_rdma::verbs::VerbsNic;

use crate::config::Config;
use crate::control::{ControlPool, PoolHandle};
use crate::core::ResumeState;
use crate::endpoint::{ConnectionId, Endpoint, Incoming, Listening};
use crate::rearm::Role;
use crate::rejoin::{offer_rejoin_port, read_rejoin_port, TcpControl};
use crate::runtime::{ConnectError, Connection, PendingConnection, RailCard, RealClock};
use crate::shared_queues::QueuePool;

pub type VerbsConnection = Connection<VerbsNic, RealClock>;

/// Greetings being checked at once, at most (more clients than that are turned away at once).
const MAX_GREETINGS_IN_FLIGHT: usize = 64;

/// Opens every rail's card. One that can't be opened (missing after a restart, say) is
/// absent: its rail starts failed and joins when the card is back. None at all is an error.
fn open_cards(devices: &[&str]) -> Result<Vec<RailCard<VerbsNic>>, ConnectError> {
    let mut first_error = None;
    let cards: Vec<RailCard<VerbsNic>> = devices
        .iter()
        .map(|d| match VerbsNic::open(d) {
            Ok(nic) => RailCard::Open(nic),
            Err(e) => {
                tracing::warn!(card = d, error = %e, "card can't be opened: its rail starts failed");
                first_error.get_or_insert(e);
                RailCard::Absent(d.to_string())
            }
        })
        .collect();
    match first_error {
        Some(e) if cards.iter().all(|c| matches!(c, RailCard::Absent(_))) => Err(e.into()),
        _ => Ok(cards),
    }
}

/// This side's greeting; `endpoint`: the endpoint's liveness id (0: a connection of its own, or
/// an endpoint that does not share liveness).
fn greeting(cfg: &Config, resume: Option<&ResumeState>, endpoint: u64) -> Greeting {
    let g = cfg.geometry();
    Greeting {
        resume: resume.map(|r| (r.delivered, r.first_unacked())),
        endpoint,
        ..Greeting::new(
            cfg.rails() as u16,
            WireGeometry {
                segment_size: g.segment_size() as u32,
                segment_count: g.segment_count() as u32,
                max_record: g.max_record() as u32,
            },
        )
    }
}

/// A client or server whose greeting checked out: the stream, the session id, and the peer's
/// endpoint when both sides share liveness between endpoints.
type Greeted = (TcpStream, u64, Option<u64>);

/// After the greeting: cards, hellos in the order that keeps the listener safe, queue pairs,
/// barrier, control thread.
/// Sets up a connection over a greeted stream: `pending` makes its queue pairs (on cards of
/// its own, or an endpoint's).
fn handshake(
    pending: impl FnOnce() -> Result<PendingConnection<VerbsNic, RealClock>, ConnectError>,
    (mut stream, session, peer_endpoint): Greeted,
    deadline: Instant,
    timeout: Duration,
    role: Role,
    pool: Option<&PoolHandle<VerbsNic>>,
) -> Result<VerbsConnection, ConnectError> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ConnectError::Handshake(HandshakeError::Timeout(timeout)))
    };
    let pending = pending()?;
    let ours = pending.hellos().to_vec();
    let mut peer: Vec<Hello> = Vec::with_capacity(ours.len());
    match role {
        // The dialler describes itself first ...
        Role::Initiator => {
            for h in &ours {
                handshake::send_hello(&mut stream, h, left()?)?;
            }
            for h in &ours {
                peer.push(handshake::recv_hello(&mut stream, h, left()?)?);
            }
        }
        // ... and the listener answers only once every hello checked out.
        Role::Acceptor => {
            for h in &ours {
                peer.push(handshake::recv_hello(&mut stream, h, left()?)?);
            }
            for h in &ours {
                handshake::send_hello(&mut stream, h, left()?)?;
            }
        }
    }
    let mut conn = pending.connect_links(&peer)?;
    conn.peer_endpoint = peer_endpoint;
    // Barrier: neither side writes before both sides' queue pairs are ready to receive (a write to
    // a queue pair still in INIT is dropped and would end in a retry-exceeded error).
    handshake::barrier(&mut stream, left()?)?;
    // The stream stays: failed rails are re-armed over it, on the control thread; the rejoin
    // port brings it back if it breaks.
    let channel = match role {
        Role::Acceptor => {
            let port = offer_rejoin_port(&mut stream, left()?).map_err(ConnectError::Channel)?;
            TcpControl::listener(stream, session, port)
        }
        Role::Initiator => {
            let port = read_rejoin_port(&mut stream, left()?).map_err(ConnectError::Channel)?;
            TcpControl::dialler(stream, session, port)
        }
    }
    .map_err(ConnectError::Channel)?;
    conn.attach_control(channel, role, pool)
        .map_err(ConnectError::Channel)?;
    conn.start();
    Ok(conn)
}

/// Host side that dials: `devices[i]` is this host's card of rail i (the first is primary).
pub fn connect(
    cfg: Config,
    devices: &[&str],
    peer: SocketAddr,
    timeout: Duration,
) -> Result<VerbsConnection, ConnectError> {
    dial(cfg, devices, peer, timeout, None)
}

/// Like [`connect`], continuing the stream of a connection that ended (`old.resume_state()`):
/// every record is delivered exactly once across the two connections. The listener must
/// [`accept_resuming`] with its own side's state.
pub fn connect_resuming(
    cfg: Config,
    devices: &[&str],
    peer: SocketAddr,
    timeout: Duration,
    state: &ResumeState,
) -> Result<VerbsConnection, ConnectError> {
    dial(cfg, devices, peer, timeout, Some(state))
}

fn dial(
    cfg: Config,
    devices: &[&str],
    peer: SocketAddr,
    timeout: Duration,
    resume: Option<&ResumeState>,
) -> Result<VerbsConnection, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut stream = handshake::connect(peer, timeout)?;
    let ours = greeting(&cfg, resume, 0);
    let theirs = handshake::greet_as_client(&mut stream, &ours, timeout)?;
    let pending = || {
        let cards = open_cards(devices)?;
        PendingConnection::with_cards(cfg, cards, RealClock::default(), resume)
    };
    let session = Greeting::session_id(&ours, &theirs);
    handshake(
        pending,
        (stream, session, None),
        deadline,
        timeout,
        Role::Initiator,
        None,
    )
}

/// Host side that listens: returns the first client whose greeting checks out within `timeout`.
/// Clients are greeted concurrently (a silent or slow one never holds up a good one); the ones
/// that fail, or come after, are closed without having been sent anything.
pub fn accept(
    cfg: Config,
    devices: &[&str],
    listener: &TcpListener,
    timeout: Duration,
) -> Result<VerbsConnection, ConnectError> {
    listen(cfg, devices, listener, timeout, None)
}

/// Like [`accept`], continuing the stream of a connection that ended (see
/// [`connect_resuming`]).
pub fn accept_resuming(
    cfg: Config,
    devices: &[&str],
    listener: &TcpListener,
    timeout: Duration,
    state: &ResumeState,
) -> Result<VerbsConnection, ConnectError> {
    listen(cfg, devices, listener, timeout, Some(state))
}

fn listen(
    cfg: Config,
    devices: &[&str],
    listener: &TcpListener,
    timeout: Duration,
    resume: Option<&ResumeState>,
) -> Result<VerbsConnection, ConnectError> {
    let deadline = Instant::now() + timeout;
    let greeted = accept_greeted(&cfg, listener, deadline, timeout, resume, 0)?;
    let pending = || {
        let cards = open_cards(devices)?;
        PendingConnection::with_cards(cfg, cards, RealClock::default(), resume)
    };
    handshake(pending, greeted, deadline, timeout, Role::Acceptor, None)
}

/// Accepts clients and greets each on its own thread until one greeting checks out: its stream
/// and the session id.
fn accept_greeted(
    cfg: &Config,
    listener: &TcpListener,
    deadline: Instant,
    timeout: Duration,
    resume: Option<&ResumeState>,
    endpoint: u64,
) -> Result<Greeted, ConnectError> {
    listener.set_nonblocking(true)?;
    let ours = greeting(cfg, resume, endpoint);
    let (greeted_tx, greeted) = mpsc::channel::<Greeted>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        loop {
            match listener.accept() {
                Ok((mut stream, from)) => {
                    // Relaxed: a soft cap on threads, no data published through it.
                    if in_flight.load(Ordering::Relaxed) >= MAX_GREETINGS_IN_FLIGHT {
                        tracing::warn!(%from, "too many greetings in progress; client turned away");
                        continue; // dropped: closed, nothing sent
                    }
                    stream.set_nonblocking(false)?;
                    let (tx, count) = (greeted_tx.clone(), in_flight.clone());
                    count.fetch_add(1, Ordering::Relaxed);
                    let left = deadline.saturating_duration_since(Instant::now());
                    let spawned = std::thread::Builder::new()
                        .name("railover-greet".into())
                        .spawn(move || {
                            match handshake::greet_as_server(&mut stream, &ours, left) {
                                Ok(theirs) => {
                                    let session = Greeting::session_id(&theirs, &ours);
                                    let peer = Greeting::shared_endpoint(&ours, &theirs);
                                    let _ = tx.send((stream, session, peer)); // (refused: another won)
                                }
                                Err(e) => tracing::warn!(%from, error = %e, "client refused"),
                            }
                            count.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(timeout).into());
        }
        // Set-up path only: wait briefly for a greeted client, then look for new ones.
        match greeted.recv_timeout(left.min(Duration::from_millis(2))) {
            Ok(greeted) => return Ok(greeted),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
        }
    }
}

/// An endpoint on real cards.
pub type VerbsEndpoint = Endpoint<VerbsNic, RealClock>;

impl Endpoint<VerbsNic, RealClock> {
    /// Opens every rail's card once (`devices[i]` is this host's card of rail i, the first
    /// primary): every connection made here shares its device context and protection domain.
    /// A card that can't be opened (dead at boot, say) is absent: connections start with that
    /// rail failed and gain it once the card is back. None at all is an error.
    pub fn open(cfg: Config, devices: &[&str]) -> Result<VerbsEndpoint, ConnectError> {
        Endpoint::with_cards(cfg, open_cards(devices)?, RealClock::default())
    }

    /// Dials `peer` (whose side accepts with [`accept`] or [`Endpoint::accept`]) and adds the
    /// connection. Blocks for the set-up (at most `timeout`); the endpoint's other connections
    /// are not driven meanwhile.
    pub fn connect(
        &mut self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<ConnectionId, ConnectError> {
        let deadline = Instant::now() + timeout;
        let mut stream = handshake::connect(peer, timeout)?;
        let ours = greeting(self.config(), None, self.liveness_id());
        let theirs = handshake::greet_as_client(&mut stream, &ours, timeout)?;
        let session = Greeting::session_id(&ours, &theirs);
        let pending = self.prepare()?;
        let conn = handshake(
            || Ok(pending),
            (stream, session, Greeting::shared_endpoint(&ours, &theirs)),
            deadline,
            timeout,
            Role::Initiator,
            Some(self.control_pool()?),
        )?;
        Ok(self.insert(conn))
    }

    /// Accepts the first client whose greeting checks out within `timeout` (see [`accept`]) and
    /// adds the connection.
    pub fn accept(
        &mut self,
        listener: &TcpListener,
        timeout: Duration,
    ) -> Result<ConnectionId, ConnectError> {
        let deadline = Instant::now() + timeout;
        let id = self.liveness_id();
        let greeted = accept_greeted(self.config(), listener, deadline, timeout, None, id)?;
        let pending = self.prepare()?;
        let conn = handshake(
            || Ok(pending),
            greeted,
            deadline,
            timeout,
            Role::Acceptor,
            Some(self.control_pool()?),
        )?;
        Ok(self.insert(conn))
    }

    /// Accepts clients on `listener` in the background from now on: each one's greeting and
    /// set-up (hellos, queue pairs, barrier) run on a thread of their own, so neither a slow or
    /// hostile client nor the set-up itself holds up the caller's loop. Ready connections come
    /// from [`Endpoint::poll_connected`]; `timeout` bounds each client's set-up. Replaces an
    /// earlier listener.
    pub fn listen(&mut self, listener: TcpListener, timeout: Duration) -> Result<(), ConnectError> {
        listener.set_nonblocking(true)?;
        let setup = self.background_setup(timeout)?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("railover-listen".into())
            .spawn(move || accept_in_background(&listener, setup, &halt))?;
        self.incoming.get_or_insert_with(Incoming::new).listener = Some(Listening {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Dials `peer` on a thread of its own (greeting, hellos, queue pairs, barrier: at most
    /// `timeout`) and returns at once; the connection comes from [`Endpoint::poll_connected`]
    /// (or the error, if the dial failed). The endpoint's other connections keep being driven
    /// meanwhile.
    pub fn connect_in_background(
        &mut self,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<(), ConnectError> {
        let setup = self.background_setup(timeout)?;
        std::thread::Builder::new()
            .name("railover-dial".into())
            .spawn(move || setup.dial(peer))?;
        Ok(())
    }

    /// What a set-up thread needs: the endpoint's cards, configuration, clock and control
    /// thread, and where to hand the result.
    fn background_setup(&mut self, timeout: Duration) -> Result<BackgroundSetup, ConnectError> {
        // Every card that can be opened (one missing starts its rail failed in each connection).
        self.open_cards_back();
        let pool = self.control_pool()?.clone();
        let (cfg, clock) = (*self.config(), self.clock().clone());
        let ready = self
            .incoming
            .get_or_insert_with(Incoming::new)
            .results
            .clone();
        Ok(BackgroundSetup {
            cfg,
            clock,
            pool,
            queues: self.queue_pool(),
            timeout,
            ready,
            endpoint: self.liveness_id(),
        })
    }

    /// The one control thread of the endpoint's connections (re-arms, the control streams),
    /// started with the first connection.
    fn control_pool(&mut self) -> Result<&PoolHandle<VerbsNic>, ConnectError> {
        if self.control.is_none() {
            self.control = Some(
                ControlPool::spawn(crate::control::CONTROL_IDLE).map_err(ConnectError::Channel)?,
            );
        }
        Ok(self.control.as_ref().expect("just made").handle())
    }
}

/// What a background listener needs to set connections up on an endpoint's cards.
#[derive(Clone)]
struct BackgroundSetup {
    cfg: Config,
    clock: RealClock,
    pool: PoolHandle<VerbsNic>,
    /// The endpoint's shared completion queues, where the queue pairs go.
    queues: Arc<QueuePool<VerbsNic>>,
    timeout: Duration,
    ready: mpsc::Sender<Result<VerbsConnection, ConnectError>>,
    /// The endpoint's liveness id, for its greetings.
    endpoint: u64,
}

impl BackgroundSetup {
    /// The endpoint's queue pairs for a new connection, its card events read by the endpoint.
    fn pending(&self) -> Result<PendingConnection<VerbsNic, RealClock>, ConnectError> {
        // The endpoint's cards, from its pool: none is held while the thread waits (a released
        // one could not recover while any handle on it lives).
        let cards = (0..self.cfg.rails())
            .map(|rail| {
                let (card, epoch) = self.queues.card_at(rail);
                let card = match card {
                    Some(nic) => RailCard::Open(nic),
                    // Released (device fatal): the rail starts failed and joins when it is back.
                    None => RailCard::Absent(self.queues.reopen_token(rail)),
                };
                (card, epoch)
            })
            .collect();
        PendingConnection::on_shared_queues(self.cfg, cards, self.clock.clone(), &self.queues)
    }

    /// Dials `peer` and sets the connection up (on this thread); hands over the result.
    fn dial(self, peer: SocketAddr) {
        let deadline = Instant::now() + self.timeout;
        let conn = (|| {
            let mut stream = handshake::connect(peer, self.timeout)?;
            let ours = greeting(&self.cfg, None, self.endpoint);
            let theirs = handshake::greet_as_client(&mut stream, &ours, self.timeout)?;
            let session = Greeting::session_id(&ours, &theirs);
            handshake(
                || self.pending(),
                (stream, session, Greeting::shared_endpoint(&ours, &theirs)),
                deadline,
                self.timeout,
                Role::Initiator,
                Some(&self.pool),
            )
        })();
        if let Err(e) = &conn {
            tracing::warn!(%peer, error = %e, "dial failed");
        }
        let _ = self.ready.send(conn); // (refused: the endpoint is gone)
    }

    /// Greets `stream`'s client and sets its connection up (on this thread): the connection, or
    /// why not. A greeting that fails is only logged (no connection was promised).
    fn set_up(self, mut stream: TcpStream, from: SocketAddr) {
        let deadline = Instant::now() + self.timeout;
        let ours = greeting(&self.cfg, None, self.endpoint);
        let theirs = match handshake::greet_as_server(&mut stream, &ours, self.timeout) {
            Ok(theirs) => theirs,
            Err(e) => {
                tracing::warn!(%from, error = %e, "client refused");
                return;
            }
        };
        let session = Greeting::session_id(&theirs, &ours);
        let conn = handshake(
            || self.pending(),
            (stream, session, Greeting::shared_endpoint(&ours, &theirs)),
            deadline,
            self.timeout,
            Role::Acceptor,
            Some(&self.pool),
        );
        if let Err(e) = &conn {
            tracing::warn!(%from, error = %e, "set-up failed");
        }
        let _ = self.ready.send(conn); // (refused: the endpoint is gone)
    }
}

/// The background listener's loop: takes clients as they come and sets each up on a thread of
/// its own (at most [`MAX_GREETINGS_IN_FLIGHT`] at once; more are turned away).
fn accept_in_background(listener: &TcpListener, setup: BackgroundSetup, stop: &AtomicBool) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    // After an accept error (out of descriptors, a broken listener): how long to rest before
    // the next try, and whether this run of errors was reported (once, not every try).
    let mut rest = ACCEPT_FIRST_REST;
    let mut reported = false;
    // Relaxed: a stop flag (see Incoming::drop).
    while !stop.load(Ordering::Relaxed) {
        let accepted = listener.accept();
        if accepted
            .as_ref()
            .map_or_else(|e| e.kind() == std::io::ErrorKind::WouldBlock, |_| true)
        {
            (rest, reported) = (ACCEPT_FIRST_REST, false); // the listener works
        }
        match accepted {
            Ok((stream, from)) => {
                // Relaxed: a soft cap on threads, no data published through it.
                if in_flight.load(Ordering::Relaxed) >= MAX_GREETINGS_IN_FLIGHT {
                    tracing::warn!(%from, "too many set-ups in progress; client turned away");
                    continue;
                }
                if let Err(e) = stream.set_nonblocking(false) {
                    tracing::warn!(%from, error = %e, "client dropped");
                    continue;
                }
                let (setup, count) = (setup.clone(), in_flight.clone());
                count.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new()
                    .name("railover-setup".into())
                    .spawn(move || {
                        setup.set_up(stream, from);
                        count.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let fd = rustix::fd::AsFd::as_fd(listener);
                let _ = railover_rdma::wait_readable(&[fd], 5_000_000);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Never a spin on a broken listener (it stays readable, or reports a hang-up),
                // and one error for `poll_connected` per run of them, not one per try.
                if !std::mem::replace(&mut reported, true) {
                    tracing::warn!(error = %e, "accept failed; retrying with a back-off");
                    let _ = setup.ready.send(Err(e.into()));
                }
                std::thread::sleep(rest);
                rest = (rest * 2).min(ACCEPT_MAX_REST);
            }
        }
    }
}

/// The background listener's first rest after an accept error, and its longest (which also
/// bounds how long dropping the listener waits for the thread).
const ACCEPT_FIRST_REST: Duration = Duration::from_millis(5);
const ACCEPT_MAX_REST: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept keeps failing (shut down here: every wait on it ends at once,
    /// every accept is EINVAL; out of descriptors is the same) gives `poll_connected` one error
    /// for the run, not one per try, and the thread rests between tries. Needs no RDMA: the
    /// endpoint's cards are absent.
    #[test]
    fn a_broken_listener_is_reported_once_and_retried_with_a_back_off() {
        let cfg = Config::builder().rails(2).build().expect("config");
        let cards = vec![
            RailCard::Absent("no_such_card_0".to_string()),
            RailCard::Absent("no_such_card_1".to_string()),
        ];
        let mut ep = Endpoint::with_cards(cfg, cards, RealClock::default()).expect("endpoint");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        rustix::net::shutdown(&listener, rustix::net::Shutdown::Read).expect("shut down");
        let setup = ep.background_setup(Duration::from_secs(1)).expect("set-up");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || accept_in_background(&listener, setup, &halt));
        // The first error comes at once (the bound is for a failing run only).
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = loop {
            if let Some(r) = ep.poll_connected() {
                break r;
            }
            assert!(Instant::now() < deadline, "no error reported");
            std::thread::yield_now();
        };
        assert!(first.is_err());
        // Let it fail again and again (this window holds several tries; however long it is,
        // one error is all there may be).
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        thread
            .join()
            .expect("the listener's thread ends at its stop");
        assert!(
            ep.poll_connected().is_none(),
            "one error for the run, not one per try"
        );
    }
}
