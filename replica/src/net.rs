//! The replicas and clients as processes: clients reach the servers over TCP (length-framed
//! [`crate::wire::Msg`]s), the primary reaches the backup over a railover [`Connection`] (real
//! cards in production, the simulated fabric in tests). Both drivers are non-blocking loops the
//! caller turns ([`Server::run_once`], [`TcpClient::run_once`]).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use railover::core::{EndReason, Event};
use railover::runtime::Clock;
use railover::{Connection, SendError};
use railover_rdma::Nic;

use crate::client::{Client, ClientEvent};
use crate::node::{Action, Node, NodeEvent, Peer, Role, StateTooLarge};
use crate::service::{External, Service};
use crate::wire::{Msg, RefusedRequest};

/// Largest frame a peer may announce; a longer one closes its connection.
pub const MAX_FRAME: usize = 1 << 20;

/// A non-blocking TCP stream carrying `u32` little-endian length-prefixed frames.
pub struct Framed {
    stream: TcpStream,
    read: Vec<u8>,
    write: Vec<u8>,
}

/// Why a framed stream closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    TooLong(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Framed {
    pub fn new(stream: TcpStream) -> io::Result<Framed> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Framed {
            stream,
            read: Vec::new(),
            write: Vec::new(),
        })
    }

    /// Blocks until something can be read (or the peer closed), at most `timeout`.
    pub fn wait_readable(&mut self, timeout: Duration) -> io::Result<()> {
        if timeout.is_zero() {
            return Ok(());
        }
        self.stream.set_nonblocking(false)?;
        self.stream.set_read_timeout(Some(timeout))?;
        let peeked = self.stream.peek(&mut [0u8; 1]);
        self.stream.set_nonblocking(true)?;
        match peeked {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Queues a frame (sent by [`Framed::flush`]).
    pub fn queue(&mut self, msg: &[u8]) {
        self.write
            .extend_from_slice(&(msg.len() as u32).to_le_bytes());
        self.write.extend_from_slice(msg);
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        while !self.write.is_empty() {
            match self.stream.write(&self.write) {
                Ok(0) => return Err(FrameError::Closed),
                Ok(n) => {
                    self.write.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads what arrived and hands over each complete frame.
    pub fn read_frames(&mut self, mut frame: impl FnMut(&[u8])) -> Result<(), FrameError> {
        let mut buf = [0u8; 16 * 1024];
        // What ends the stream is reported after the frames that came before it.
        let mut ended = None;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    ended = Some(FrameError::Closed);
                    break;
                }
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    ended = Some(e.into());
                    break;
                }
            }
        }
        let mut at = 0;
        while self.read.len() - at >= 4 {
            let len =
                u32::from_le_bytes(self.read[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(FrameError::TooLong(len));
            }
            if self.read.len() - at - 4 < len {
                break;
            }
            frame(&self.read[at + 4..at + 4 + len]);
            at += 4 + len;
        }
        self.read.drain(..at);
        ended.map_or(Ok(()), Err)
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn unsent(&self) -> usize {
        self.write.len()
    }
}

/// A client whose unread replies pile up past this is disconnected (it resends on reconnecting).
pub const MAX_UNSENT: usize = 16 << 20;

/// Wall-clock nanoseconds: what [`crate::Ctx::now`] returns on a real primary.
pub fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What happened to a server, for its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    Node(NodeEvent),
    /// The replication connection ended (this server then promotes itself if it was the backup,
    /// or goes on without a backup if it was the primary).
    ReplicationEnded(Option<EndReason>),
}

/// A replica's process: its [`Node`], its clients over TCP, and the replication connection.
pub struct Server<S: Service, E: External, N: Nic, C: Clock> {
    node: Node<S, E>,
    repl: Option<Connection<N, C>>,
    repl_out: VecDeque<Vec<u8>>,
    listener: TcpListener,
    clients: Vec<Option<Framed>>,
    /// Which entries of `clients` are open (read while a connection's frames are handled).
    alive: Vec<bool>,
    /// Which connection each client last wrote from (its replies go there).
    route: BTreeMap<u64, usize>,
    events: VecDeque<ServerEvent>,
    /// The replication connection reported every rail silent.
    peer_silent: bool,
    /// The replication connection's control stream broke.
    channel_lost: bool,
    turns: u64,
    /// What becomes of a replication connection that ended (see [`Server::retire_with`]).
    retire: Option<Retire<N, C>>,
}

/// Takes a replication connection that ended (see [`Server::retire_with`]).
type Retire<N, C> = Box<dyn FnMut(Connection<N, C>)>;

/// New clients are accepted every this many turns of [`Server::run_once`].
const ACCEPT_EVERY: u64 = 64;

impl<S: Service, E: External, N: Nic, C: Clock> Server<S, E, N, C> {
    /// Serves `node` to the clients that connect to `listener`.
    pub fn new(node: Node<S, E>, listener: TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            node,
            repl: None,
            repl_out: VecDeque::new(),
            listener,
            clients: Vec::new(),
            alive: Vec::new(),
            route: BTreeMap::new(),
            events: VecDeque::new(),
            peer_silent: false,
            channel_lost: false,
            turns: 0,
            retire: None,
        })
    }

    /// Hands each replication connection that ended to `retire` instead of dropping it on the
    /// loop's thread (a drop closes gracefully: it may wait up to a heartbeat timeout for a peer
    /// that is gone). A process gives it to another thread.
    pub fn retire_with(&mut self, retire: impl FnMut(Connection<N, C>) + 'static) {
        self.retire = Some(Box::new(retire));
    }

    pub fn node(&self) -> &Node<S, E> {
        &self.node
    }

    /// The replication connection is up: a primary sends the new backup its state, a backup
    /// waits for it.
    pub fn attach_replication(&mut self, conn: Connection<N, C>) -> Result<(), StateTooLarge> {
        if self.node.role() == Role::Primary {
            self.node.attach_backup()?;
        }
        self.repl_out.clear();
        self.repl = Some(conn);
        self.peer_silent = false;
        self.channel_lost = false;
        Ok(())
    }

    /// Takes the replication connection out without ending it (a test forgets it to model a
    /// killed process, whose peer sees nothing but silence and failing writes).
    pub fn take_replication(&mut self) -> Option<Connection<N, C>> {
        self.repl.take()
    }

    pub fn has_replication(&self) -> bool {
        self.repl.is_some()
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// One turn of the loop: new clients, their requests, the replication connection, and
    /// everything the node has to send.
    pub fn run_once(&mut self) {
        // A new client can wait a few microseconds; an accept() per turn would cost every turn
        // a system call (tens of microseconds under emulation).
        self.turns = self.turns.wrapping_add(1);
        if self.turns % ACCEPT_EVERY == 1 {
            self.accept_clients();
        }
        let mut now = None;
        for i in 0..self.clients.len() {
            let Some(conn) = &mut self.clients[i] else {
                continue;
            };
            let (node, route, clients_alive) = (&mut self.node, &mut self.route, &self.alive);
            let mut taken = Vec::new();
            let read = conn.read_frames(|frame| {
                // Decoded once, here: the node takes the request as it is.
                let Ok(Msg::Request(r)) = Msg::decode(frame) else {
                    return node.on_client(frame, 0); // refused by the node, with its reason
                };
                // A client id belongs to one live connection: its replies go there only.
                match route.get(&r.client) {
                    Some(&j) if j != i && clients_alive.get(j) == Some(&true) => {
                        taken.push(r);
                        return;
                    }
                    _ => {
                        route.insert(r.client, i);
                    }
                }
                // The clock is read once a request is there (where it is no vDSO call, as
                // under emulation, it is a system call).
                node.on_request(r, *now.get_or_insert_with(wall_clock_ns));
            });
            for r in taken {
                let msg = Msg::Refused {
                    client: r.client,
                    session: r.session,
                    seq: r.seq,
                    why: RefusedRequest::ClientIdInUse,
                };
                conn.queue(&msg.encode());
            }
            if read.is_err() {
                self.close_client(i);
            }
        }
        self.replicate();
        self.carry_out();
        for i in 0..self.clients.len() {
            let failed = self.clients[i]
                .as_mut()
                .is_some_and(|c| c.flush().is_err() || c.unsent() > MAX_UNSENT);
            if failed {
                self.close_client(i);
            }
        }
    }

    /// Closes client connection `i`; its client ids are free for another connection.
    fn close_client(&mut self, i: usize) {
        self.clients[i] = None;
        self.alive[i] = false;
        self.route.retain(|_, slot| *slot != i);
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Ok(f) = Framed::new(stream) {
                        match self.clients.iter().position(Option::is_none) {
                            Some(free) => {
                                self.clients[free] = Some(f);
                                self.alive[free] = true;
                            }
                            None => {
                                self.clients.push(Some(f));
                                self.alive.push(true);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock, or a failed accept: try again next turn
            }
        }
    }

    fn replicate(&mut self) {
        let Some(conn) = &mut self.repl else { return };
        let node = &mut self.node;
        let mut ended = conn.poll(|m| node.on_replication(m)).is_err();
        while let Some(e) = conn.poll_event() {
            match e {
                Event::Ended { .. } => ended = true,
                Event::PeerUnresponsive { .. } => self.peer_silent = true,
                Event::PeerResponsive { .. } => self.peer_silent = false,
                Event::RearmChannelLost { .. } => self.channel_lost = true,
                Event::RearmChannelRestored { .. } => self.channel_lost = false,
                _ => {}
            }
        }
        // Every rail silent and the peer's TCP control stream closed: its process is gone
        // (a stopped or descheduled one keeps its socket open and waits out the session
        // timeout instead).
        ended |= self.peer_silent && self.channel_lost;
        while let Some(m) = self.repl_out.front() {
            match conn.send(m) {
                Ok(_) => {
                    self.repl_out.pop_front();
                }
                Err(SendError::Backpressure) => break,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        if !ended {
            return;
        }
        let reason = conn.end_reason();
        self.end_replication(reason);
    }

    /// The replication connection is over: it is retired; a primary goes on without its backup,
    /// a backup takes over (unless it diverged or never synced).
    fn end_replication(&mut self, reason: Option<EndReason>) {
        match (self.repl.take(), &mut self.retire) {
            (Some(conn), Some(retire)) => retire(conn),
            (conn, _) => drop(conn),
        }
        self.repl_out.clear();
        self.events.push_back(ServerEvent::ReplicationEnded(reason));
        match self.node.role() {
            Role::Primary => self.node.backup_lost(),
            // The primary is gone (its process, or every rail to it): take over.
            Role::Backup => {
                let _ = self.node.promote();
            }
            Role::Joining => {}
        }
    }

    fn carry_out(&mut self) {
        let mut drop_replication = false;
        while let Some(e) = self.node.poll_event() {
            // A replica out of step with its peer (a diverged backup, a message it had to
            // refuse) must not go on as if it followed: the connection ends and the primary
            // takes a new backup from a snapshot.
            drop_replication |= matches!(
                e,
                NodeEvent::Divergence { .. }
                    | NodeEvent::Refused {
                        from: Peer::Primary | Peer::Backup,
                        ..
                    }
            );
            self.events.push_back(ServerEvent::Node(e));
        }
        if drop_replication {
            self.end_replication(None);
        }
        while let Some(action) = self.node.pop_action() {
            match action {
                Action::ToBackup(m) | Action::ToPrimary(m) => {
                    if self.repl.is_some() {
                        self.repl_out.push_back(m);
                    }
                }
                Action::ToClient { client, msg } => {
                    let conn = self.route.get(&client).copied();
                    if let Some(Some(c)) = conn.map(|i| &mut self.clients[i]) {
                        c.queue(&msg);
                    }
                }
            }
        }
        // Send what the node just produced within this turn.
        if let Some(conn) = &mut self.repl {
            while let Some(m) = self.repl_out.front() {
                match conn.send(m) {
                    Ok(_) => {
                        self.repl_out.pop_front();
                    }
                    _ => break,
                }
            }
        }
    }
}

/// A client process's side: one TCP connection at a time to one of the servers; on a reset or
/// a refusal it moves to the next one (after a backoff) and resends every unanswered request.
pub struct TcpClient {
    client: Client,
    servers: Vec<SocketAddr>,
    conn: Option<Framed>,
    retry_at: Instant,
    backoff: Duration,
    events: VecDeque<ClientEvent>,
    /// Times the client moved to another server.
    pub switches: u64,
    /// How long the client waits for a reply before it tries the other server.
    reply_timeout: Duration,
    /// The last reply (or connection) from the current server.
    heard_at: Instant,
    /// Times the reply timeout moved the client on.
    pub timeouts: u64,
}

impl TcpClient {
    /// Client `id` of the servers at `servers` (the primary first). After a refused or reset
    /// connection it waits `backoff` before the next server. A server that accepts but does not
    /// answer for [`TcpClient::set_reply_timeout`] (default 100 ms) is left too: a dying
    /// process's socket can take that long to close.
    pub fn new(id: u64, servers: Vec<SocketAddr>, backoff: Duration) -> TcpClient {
        TcpClient {
            reply_timeout: Duration::from_millis(100),
            heard_at: Instant::now(),
            timeouts: 0,
            // Each run of a client process is a new, later session (see `Client::with_session`).
            client: Client::new(id, servers.len(), 0).with_session(wall_clock_ns()),
            servers,
            conn: None,
            retry_at: Instant::now(),
            backoff,
            events: VecDeque::new(),
            switches: 0,
        }
    }

    pub fn unanswered(&self) -> usize {
        self.client.unanswered()
    }

    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    pub fn server(&self) -> usize {
        self.client.server()
    }

    /// Sends a new request (queued until connected); returns its sequence number.
    pub fn request(&mut self, body: Vec<u8>) -> u64 {
        let seq = self.client.request(body);
        self.send_outbox();
        seq
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    fn move_on(&mut self, switch: bool) {
        self.conn = None;
        if switch {
            self.client.switch_server();
            self.switches += 1;
        }
        self.retry_at = Instant::now() + self.backoff;
    }

    fn send_outbox(&mut self) {
        let server = self.client.server();
        let out = self.client.take_outbox();
        let Some(conn) = &mut self.conn else { return }; // resent on connecting
        for (to, bytes) in out {
            if to == server {
                conn.queue(&bytes);
            }
        }
        if conn.flush().is_err() {
            self.move_on(true);
        }
    }

    /// Sleeps until a reply may have arrived (or a reconnect is due), at most `timeout`: a client
    /// with nothing to send need not spin (and leaves the CPU to the servers).
    pub fn wait(&mut self, timeout: Duration) {
        match &mut self.conn {
            Some(c) => {
                if c.wait_readable(timeout).is_err() {
                    self.move_on(true);
                }
            }
            None => {
                let left = self.retry_at.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(timeout));
            }
        }
    }

    /// One turn: connects if needed, reads replies, sends what is queued.
    pub fn run_once(&mut self) {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                return;
            }
            let addr = self.servers[self.client.server()];
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .and_then(Framed::new)
            {
                Ok(f) => {
                    self.conn = Some(f);
                    self.heard_at = Instant::now();
                    self.client.take_outbox(); // superseded by the resend
                    self.client.resend_all();
                }
                Err(_) => return self.move_on(true),
            }
        }
        let server = self.client.server();
        let (client, events) = (&mut self.client, &mut self.events);
        let mut redirected = false;
        let mut heard = false;
        let read = self.conn.as_mut().expect("connected").read_frames(|frame| {
            heard = true;
            if let Ok(Some(e)) = client.on_message(server, frame) {
                redirected |= matches!(e, ClientEvent::Redirected { .. });
                events.push_back(e);
            }
        });
        if redirected {
            // `on_message` already moved to the next server.
            self.switches += 1;
            return self.move_on(false);
        }
        if read.is_err() {
            return self.move_on(true);
        }
        let now = Instant::now();
        if heard || self.client.unanswered() == 0 {
            self.heard_at = now;
        } else if now - self.heard_at > self.reply_timeout {
            self.timeouts += 1;
            return self.move_on(true);
        }
        self.send_outbox();
    }
}
