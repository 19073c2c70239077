//! The control channel of a verbs connection, and how it comes back when it breaks.
//!
//! Re-arms travel over the TCP stream the connection was set up on. Streams break (a reset, a
//! half-open connection after a network blip, a peer that sent garbage and was hung up on), and
//! without a channel no failed rail is ever re-armed. So at set-up the listening side opens a
//! *rejoin port* of the connection's own and tells the dialler its number; when the stream
//! breaks, the dialler redials that port (backing off from 50 ms to 1 s) and opens the new stream
//! with a rejoin frame: the session id both greetings made (a random value the two processes
//! share) and an epoch one above the last. The listener takes a new stream only with that
//! session and a newer epoch, echoes the frame, and both sides start the re-arm protocol afresh
//! on it (an exchange half done on the old stream is abandoned; the core asks again). Frames never
//! cross streams, so the epoch and session are checked once per stream, at its start.
//!
//! The listener watches its rejoin port even while its stream looks healthy: a dialler that saw
//! the stream break first (the listener's end half-open) must not wait for the listener to notice.
//! Every step here runs on the connection's control thread, with short time-outs (it blocks at
//! most half a second on a rejoin; the data thread never does).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::control::ControlChannel;

const MAGIC: [u8; 4] = *b"RORJ";
/// magic, epoch (u32 LE), session (u64 LE).
const FRAME: usize = 16;
/// How long one rejoin attempt may take (connect, frame, echo).
const STEP: Duration = Duration::from_millis(500);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn frame(session: u64, epoch: u32) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[..4].copy_from_slice(&MAGIC);
    f[4..8].copy_from_slice(&epoch.to_le_bytes());
    f[8..].copy_from_slice(&session.to_le_bytes());
    f
}

/// (session, epoch) of a well-formed frame.
fn parse(f: &[u8; FRAME]) -> Option<(u64, u32)> {
    if f[..4] != MAGIC {
        return None;
    }
    let epoch = u32::from_le_bytes(f[4..8].try_into().expect("4 bytes"));
    let session = u64::from_le_bytes(f[8..].try_into().expect("8 bytes"));
    Some((session, epoch))
}

/// How this side gets a new stream.
enum Rejoin {
    /// The dialler redials the listener's rejoin port.
    Dial {
        addr: SocketAddr,
        next_try: Instant,
        backoff: Duration,
    },
    /// The listener's rejoin port (non-blocking). After an accept that failed for another
    /// reason than "nothing there" (out of descriptors: EMFILE, ENFILE; memory; a port shut
    /// down), the port rests until `resting_until`, backing off like the dialler: it is not
    /// waited on meanwhile. (A port whose accept keeps failing stays readable, or reports a
    /// hang-up: waited on, it would wake the control thread at once, again and again.)
    Listen {
        port: TcpListener,
        resting_until: Option<Instant>,
        backoff: Duration,
    },
}

/// A verbs connection's control channel: the stream, and its way back.
pub struct TcpControl {
    stream: TcpStream,
    rejoin: Rejoin,
    session: u64,
    epoch: u32,
}

impl TcpControl {
    /// The dialler's side: `rejoin_port` is the listener's, on the address it dialled.
    pub fn dialler(stream: TcpStream, session: u64, rejoin_port: u16) -> std::io::Result<Self> {
        let mut addr = stream.peer_addr()?;
        addr.set_port(rejoin_port);
        Ok(TcpControl {
            stream,
            rejoin: Rejoin::Dial {
                addr,
                next_try: Instant::now(),
                backoff: FIRST_BACKOFF,
            },
            session,
            epoch: 0,
        })
    }

    /// The listener's side, with the rejoin port it opened (see [`offer_rejoin_port`]).
    pub fn listener(stream: TcpStream, session: u64, port: TcpListener) -> std::io::Result<Self> {
        port.set_nonblocking(true)?;
        Ok(TcpControl {
            stream,
            rejoin: Rejoin::Listen {
                port,
                resting_until: None,
                backoff: FIRST_BACKOFF,
            },
            session,
            epoch: 0,
        })
    }

    /// The stream, to wait on.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The rejoin port to wait on too (the listener's side), if any: not while it rests after
    /// a failed accept (see [`TcpControl::next_accept_in`]).
    pub fn rejoin_port(&self) -> Option<&TcpListener> {
        self.rejoin_port_at(Instant::now())
    }

    /// [`TcpControl::rejoin_port`] as it is at `now`.
    pub(crate) fn rejoin_port_at(&self, now: Instant) -> Option<&TcpListener> {
        match &self.rejoin {
            Rejoin::Listen {
                port,
                resting_until,
                ..
            } => resting_until.is_none_or(|t| now >= t).then_some(port),
            Rejoin::Dial { .. } => None,
        }
    }

    /// How long the listener's rejoin port still rests after a failed accept (None: it is
    /// waited on, or this side dials): the wait must end then, to watch it again.
    pub fn next_accept_in(&self) -> Option<Duration> {
        self.next_accept_in_at(Instant::now())
    }

    /// [`TcpControl::next_accept_in`] as it is at `now`.
    pub(crate) fn next_accept_in_at(&self, now: Instant) -> Option<Duration> {
        match &self.rejoin {
            Rejoin::Listen {
                resting_until: Some(t),
                ..
            } => Some(t.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// Whether this side redials (else it waits on its port, always).
    pub fn dials(&self) -> bool {
        matches!(self.rejoin, Rejoin::Dial { .. })
    }

    /// How long until the dialler's next try (zero when it is due); None on the listener's
    /// side, which waits on its port.
    pub fn next_redial_in(&self) -> Option<Duration> {
        match &self.rejoin {
            Rejoin::Dial { next_try, .. } => {
                Some(next_try.saturating_duration_since(Instant::now()))
            }
            Rejoin::Listen { .. } => None,
        }
    }

    /// Streams this channel has had after the first.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    fn install(&mut self, stream: TcpStream, epoch: u32) -> std::io::Result<()> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let _ = self.stream.shutdown(Shutdown::Both);
        self.stream = stream;
        self.epoch = epoch;
        tracing::info!(epoch, "control channel re-established");
        Ok(())
    }

    fn redial(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, STEP)?;
        s.set_read_timeout(Some(STEP))?;
        s.set_write_timeout(Some(STEP))?;
        let ours = frame(self.session, self.epoch + 1);
        s.write_all(&ours)?;
        let mut echo = [0u8; FRAME];
        s.read_exact(&mut echo)?;
        if echo != ours {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "bad rejoin echo",
            ));
        }
        self.install(s, self.epoch + 1)
    }

    /// One client of the rejoin port: a new stream if it proves the session with a newer epoch.
    fn admit(&mut self, mut s: TcpStream, from: SocketAddr) -> std::io::Result<bool> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(STEP))?;
        s.set_write_timeout(Some(STEP))?;
        let mut f = [0u8; FRAME];
        s.read_exact(&mut f)?;
        match parse(&f) {
            Some((session, epoch)) if session == self.session && epoch > self.epoch => {
                s.write_all(&f)?;
                self.install(s, epoch)?;
                Ok(true)
            }
            _ => {
                tracing::warn!(%from, "rejoin refused (wrong session or stale epoch)");
                Ok(false)
            }
        }
    }
}

impl ControlChannel for TcpControl {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }

    fn shutdown(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn reconnect(&mut self) -> std::io::Result<bool> {
        if let Rejoin::Dial {
            addr,
            next_try,
            backoff,
        } = &mut self.rejoin
        {
            let now = Instant::now();
            if now < *next_try {
                return Ok(false);
            }
            let addr = *addr;
            *next_try = now + *backoff;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            return match self.redial(addr) {
                Ok(()) => {
                    if let Rejoin::Dial { backoff, .. } = &mut self.rejoin {
                        *backoff = FIRST_BACKOFF;
                    }
                    Ok(true)
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "rejoin attempt failed; will retry");
                    Ok(false)
                }
            };
        }
        loop {
            let Rejoin::Listen {
                port,
                resting_until,
                backoff,
            } = &mut self.rejoin
            else {
                return Ok(false);
            };
            let now = Instant::now();
            if resting_until.is_some_and(|t| now < t) {
                return Ok(false);
            }
            let (s, from) = match port.accept() {
                Ok(client) => {
                    *resting_until = None;
                    *backoff = FIRST_BACKOFF;
                    client
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // The port works again (nothing is waiting): a later failure starts over.
                    *resting_until = None;
                    *backoff = FIRST_BACKOFF;
                    return Ok(false);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue; // (a client gone before its accept: the next one)
                }
                Err(e) => {
                    tracing::warn!(error = %e, rest = ?*backoff, "rejoin port: accept failed; resting");
                    *resting_until = Some(now + *backoff);
                    *backoff = (*backoff * 2).min(MAX_BACKOFF);
                    return Err(e);
                }
            };
            match self.admit(s, from) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => tracing::warn!(%from, error = %e, "rejoin client dropped"),
            }
        }
    }
}

/// The listener, after the set-up barrier: opens the connection's rejoin port (on the address
/// the dialler reached) and tells the dialler its number.
pub fn offer_rejoin_port(
    stream: &mut TcpStream,
    timeout: Duration,
) -> std::io::Result<TcpListener> {
    let port = TcpListener::bind((stream.local_addr()?.ip(), 0))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&port.local_addr()?.port().to_le_bytes())?;
    Ok(port)
}

/// The dialler, after the set-up barrier: the listener's rejoin port.
pub fn read_rejoin_port(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<u16> {
    stream.set_read_timeout(Some(timeout))?;
    let mut b = [0u8; 2];
    stream.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set-up's stream pair plus the listener's rejoin port, as `verbs` makes them.
    fn pair(session: u64) -> (TcpControl, TcpControl) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut dialled = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let port = offer_rejoin_port(&mut accepted, STEP).unwrap();
        let rejoin_port = read_rejoin_port(&mut dialled, STEP).unwrap();
        (
            TcpControl::dialler(dialled, session, rejoin_port).unwrap(),
            TcpControl::listener(accepted, session, port).unwrap(),
        )
    }

    /// Polls the listener's side until it takes a new stream (on its own thread: the dialler
    /// blocks in its rejoin meanwhile). Gives it back, with whether it took one.
    fn listen(mut l: TcpControl) -> std::thread::JoinHandle<(TcpControl, bool)> {
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if l.reconnect().unwrap() {
                    return (l, true);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (l, false)
        })
    }

    fn exchange(a: &mut TcpControl, b: &mut TcpControl) {
        a.send(b"ping").unwrap();
        let mut got = [0u8; 4];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut n = 0;
        while n < 4 && Instant::now() < deadline {
            match b.recv(&mut got[n..]) {
                Ok(k) => n += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn a_broken_stream_is_replaced_through_the_rejoin_port_with_a_newer_epoch() {
        let (mut d, l) = pair(0xfeed);
        d.shutdown();
        let waiting = listen(l);
        // The first attempt may come before the listener looks: the dialler retries.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !d.reconnect().unwrap() {
            assert!(Instant::now() < deadline, "the dialler never got back in");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (mut l, took) = waiting.join().unwrap();
        assert!(took);
        assert_eq!((d.epoch(), l.epoch()), (1, 1));
        exchange(&mut d, &mut l);
        exchange(&mut l, &mut d);
    }

    #[test]
    fn a_client_without_the_session_or_with_a_stale_epoch_is_refused() {
        let (_d, mut l) = pair(0xfeed);
        let port = l.rejoin_port().unwrap().local_addr().unwrap();
        for (session, epoch) in [(0xbad, 1), (0xfeed, 0)] {
            let mut c = TcpStream::connect(port).unwrap();
            c.write_all(&frame(session, epoch)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                assert!(!l.reconnect().unwrap(), "took a stream it must refuse");
                let mut b = [0u8; 1];
                // Refused: closed without an echo.
                match c.read(&mut b) {
                    Ok(0) => break,
                    Ok(_) => panic!("echoed a refused rejoin"),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        }
        assert_eq!(l.epoch(), 0);
    }
}
