//! Out-of-band connection set-up: each side sends one versioned, length-prefixed [`Hello`] per rail
//! over TCP and validates the peer's. Decoding trusts nothing: wrong magic, unknown version, bad or
//! mismatched geometry, impossible address ranges, truncated or oversized input are typed errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::{Endpoint, RemoteRegion};

pub const MAGIC: [u8; 4] = *b"RLVR";
/// 4: a control block's status may carry the ack-now flag of a planned switch. 6: a data
/// write's immediate carries 7 heartbeat bits (were 8) and a receive-credit bit.
pub const VERSION: u16 = 6;
/// Encoded size of a [`Hello`] body.
pub const HELLO_LEN: usize = 4 + 2 + 2 + 2 + 2 + 4 + 4 + 2 + 2 + 16 + 4 * 3 + (8 + 4 + 8) * 2;
/// Largest body accepted before reading it.
pub const MAX_MESSAGE: usize = 4096;
/// Smallest control slot a peer may offer.
pub const MIN_CTRL_LEN: u64 = 64;

/// Queue geometry as carried on the wire (validated here, interpreted by the transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireGeometry {
    pub segment_size: u32,
    pub segment_count: u32,
    pub max_record: u32,
}

/// The hello's flag for a rail whose card this side could not open (see [`Hello::absent`]).
const FLAG_ABSENT: u16 = 1;

/// One side's description of one rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hello {
    pub rail_index: u16,
    pub rail_count: u16,
    pub endpoint: Endpoint,
    pub geometry: WireGeometry,
    /// Where the peer writes records (this side's mirror ring).
    pub ring: RemoteRegion,
    /// Where the peer writes heartbeats and acknowledgements.
    pub ctrl: RemoteRegion,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad magic {0:02x?}: not a railover peer")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u16),
    #[error("message of {0} bytes is truncated")]
    Truncated(usize),
    #[error("message of {0} bytes exceeds the limit")]
    Oversized(usize),
    #[error("invalid geometry {0:?}")]
    Geometry(WireGeometry),
    #[error("geometry mismatch: local {local:?}, peer {remote:?}")]
    GeometryMismatch {
        local: WireGeometry,
        remote: WireGeometry,
    },
    #[error("rail mismatch: local rail {local}/{local_count}, peer rail {remote}/{remote_count}")]
    RailMismatch {
        local: u16,
        local_count: u16,
        remote: u16,
        remote_count: u16,
    },
    #[error("invalid {what} region {region:?}")]
    Region {
        what: &'static str,
        region: RemoteRegion,
    },
    #[error("reserved field {field} is {value:#x}: a protocol feature this side doesn't know")]
    Reserved { field: &'static str, value: u16 },
    #[error("the peer is this side itself (its own hello or greeting came back)")]
    SelfConnection,
    #[error("the peer's greeting answers another session (replayed or stale)")]
    Replay,
    #[error("cannot resume: {0}")]
    Resume(&'static str),
    #[error("the peer wants {remote} rails, this side {local}")]
    RailCount { local: u16, remote: u16 },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl WireGeometry {
    pub fn capacity(&self) -> u64 {
        self.segment_size as u64 * self.segment_count as u64
    }

    fn check(&self) -> Result<(), HandshakeError> {
        let ok = self.segment_size.is_power_of_two()
            && self.segment_size >= 64
            && self.segment_count.is_power_of_two()
            && self.segment_count >= 2
            && self.capacity() <= 1 << 25 // segq's MAX_CAPACITY
            && self.max_record > 0
            && self.max_record as u64 + 16 <= self.segment_size as u64;
        if ok {
            Ok(())
        } else {
            Err(HandshakeError::Geometry(*self))
        }
    }
}

fn check_region(what: &'static str, r: RemoteRegion, min_len: u64) -> Result<(), HandshakeError> {
    if r.len < min_len || r.addr.checked_add(r.len).is_none() || r.addr == 0 {
        return Err(HandshakeError::Region { what, region: r });
    }
    Ok(())
}

impl Hello {
    /// A rail this side has no card for now (it could not be opened at set-up): no queue pair
    /// and no memory to write into. The peer starts that rail failed; it joins through re-arm
    /// once the card is back. On the wire: flag 1, every address and number zero.
    pub fn absent(rail_index: u16, rail_count: u16, geometry: WireGeometry) -> Hello {
        Hello {
            rail_index,
            rail_count,
            geometry,
            ..Hello::default()
        }
    }

    /// Whether this is an [`Hello::absent`] rail (a real queue pair number is never 0).
    pub fn is_absent(&self) -> bool {
        self.endpoint.qpn == 0
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        let mut w = Cursor { buf: &mut b, at: 0 };
        w.put(&MAGIC);
        w.put(&VERSION.to_le_bytes());
        let flags = if self.is_absent() { FLAG_ABSENT } else { 0 };
        w.put(&flags.to_le_bytes());
        w.put(&self.rail_index.to_le_bytes());
        w.put(&self.rail_count.to_le_bytes());
        w.put(&self.endpoint.qpn.to_le_bytes());
        w.put(&self.endpoint.psn.to_le_bytes());
        w.put(&self.endpoint.lid.to_le_bytes());
        w.put(&0u16.to_le_bytes());
        w.put(&self.endpoint.gid);
        w.put(&self.geometry.segment_size.to_le_bytes());
        w.put(&self.geometry.segment_count.to_le_bytes());
        w.put(&self.geometry.max_record.to_le_bytes());
        for r in [self.ring, self.ctrl] {
            w.put(&r.addr.to_le_bytes());
            w.put(&r.rkey.to_le_bytes());
            w.put(&r.len.to_le_bytes());
        }
        debug_assert_eq!(w.at, HELLO_LEN);
        b
    }

    /// Decodes and validates a body (without its length prefix).
    pub fn decode(b: &[u8]) -> Result<Hello, HandshakeError> {
        if b.len() > MAX_MESSAGE {
            return Err(HandshakeError::Oversized(b.len()));
        }
        if b.len() < 6 {
            return Err(HandshakeError::Truncated(b.len()));
        }
        let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(HandshakeError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(HandshakeError::Version(version));
        }
        if b.len() < HELLO_LEN {
            return Err(HandshakeError::Truncated(b.len()));
        }
        if b.len() > HELLO_LEN {
            return Err(HandshakeError::Oversized(b.len()));
        }
        let mut r = Reader { buf: b, at: 6 };
        let flags = r.u16();
        if flags & !FLAG_ABSENT != 0 {
            return Err(HandshakeError::Reserved {
                field: "flags",
                value: flags,
            });
        }
        let rail_index = r.u16();
        let rail_count = r.u16();
        let qpn = r.u32();
        let psn = r.u32();
        let lid = r.u16();
        r.reserved("padding")?;
        let gid: [u8; 16] = r.take(16).try_into().expect("16 bytes");
        let geometry = WireGeometry {
            segment_size: r.u32(),
            segment_count: r.u32(),
            max_record: r.u32(),
        };
        let mut region = || RemoteRegion {
            addr: r.u64(),
            rkey: r.u32(),
            len: r.u64(),
        };
        let ring = region();
        let ctrl = region();
        geometry.check()?;
        if rail_count == 0 || rail_index >= rail_count {
            return Err(HandshakeError::RailMismatch {
                local: rail_index,
                local_count: rail_count,
                remote: 0,
                remote_count: 0,
            });
        }
        if flags == FLAG_ABSENT {
            // Nothing to write into: every field but the rail and geometry must be zero.
            let zero = RemoteRegion::default();
            if (qpn, psn, lid, gid, ring, ctrl) != (0, 0, 0, [0; 16], zero, zero) {
                return Err(HandshakeError::Reserved {
                    field: "absent rail",
                    value: flags,
                });
            }
            return Ok(Hello::absent(rail_index, rail_count, geometry));
        }
        check_region("ring", ring, geometry.capacity())?;
        check_region("ctrl", ctrl, MIN_CTRL_LEN)?;
        if qpn == 0 || qpn > 0x00ff_ffff || psn > 0x00ff_ffff {
            return Err(HandshakeError::Region {
                what: "queue pair",
                region: RemoteRegion {
                    addr: qpn as u64,
                    rkey: psn,
                    len: 0,
                },
            });
        }
        Ok(Hello {
            rail_index,
            rail_count,
            endpoint: Endpoint { qpn, psn, gid, lid },
            geometry,
            ring,
            ctrl,
        })
    }

    /// Checks that a decoded peer hello belongs with ours.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), HandshakeError> {
        if self.geometry != peer.geometry {
            return Err(HandshakeError::GeometryMismatch {
                local: self.geometry,
                remote: peer.geometry,
            });
        }
        if self.rail_index != peer.rail_index || self.rail_count != peer.rail_count {
            return Err(HandshakeError::RailMismatch {
                local: self.rail_index,
                local_count: self.rail_count,
                remote: peer.rail_index,
                remote_count: peer.rail_count,
            });
        }
        Ok(())
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}
impl Cursor<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}
impl Reader<'_> {
    /// A reserved u16 that must be zero (a feature this side doesn't know otherwise).
    fn reserved(&mut self, field: &'static str) -> Result<(), HandshakeError> {
        match self.u16() {
            0 => Ok(()),
            value => Err(HandshakeError::Reserved { field, value }),
        }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().expect("2"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().expect("4"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().expect("8"))
    }
}

/// The first message of a connection, before any hello: who this side is (a random nonce) and
/// what it wants (rails, geometry). The listener answers only a valid greeting, and only then
/// (after the dialler's hellos are validated too) sends anything the dialler could use to write
/// into its memory; a greeting or hello that comes back reflected, or answers another session,
/// is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Random per connection attempt.
    pub nonce: u64,
    /// The dialler's nonce, echoed by the listener (0 from the dialler).
    pub echo: u64,
    pub rails: u16,
    pub geometry: WireGeometry,
    /// Set when this side continues the stream of a connection that ended: (the highest
    /// sequence number it delivered, the first it still holds unacknowledged). Both sides resume,
    /// or neither; and each must still hold what the other has not delivered.
    pub resume: Option<(u64, u64)>,
    /// The endpoint this side's connection belongs to, when it shares liveness with the other
    /// connections between the same two endpoints (random per endpoint; 0: it does not). Both
    /// sides share, or neither.
    pub endpoint: u64,
}

pub const GREETING_MAGIC: [u8; 4] = *b"RLVG";
/// Encoded size of a [`Greeting`].
pub const GREETING_LEN: usize = 4 + 2 + 2 + 2 + 2 + 8 + 8 + 12 + 8 + 8 + 8;
const FLAG_RESUME: u16 = 1;

impl Greeting {
    /// A greeting with a fresh random nonce.
    pub fn new(rails: u16, geometry: WireGeometry) -> Greeting {
        Greeting {
            nonce: rand::random::<u64>() | 1, // never 0: 0 is "no echo"
            echo: 0,
            rails,
            geometry,
            resume: None,
            endpoint: 0,
        }
    }

    /// The peer's endpoint, when both sides share liveness between their endpoints (each
    /// greeting names one); None otherwise.
    pub fn shared_endpoint(ours: &Greeting, theirs: &Greeting) -> Option<u64> {
        (ours.endpoint != 0 && theirs.endpoint != 0).then_some(theirs.endpoint)
    }

    /// The session both sides now share: both nonces.
    pub fn session_id(client: &Greeting, server: &Greeting) -> u64 {
        client.nonce ^ server.nonce.rotate_left(32)
    }

    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        let mut w = Cursor { buf: &mut b, at: 0 };
        w.put(&GREETING_MAGIC);
        w.put(&VERSION.to_le_bytes());
        let flags = if self.resume.is_some() {
            FLAG_RESUME
        } else {
            0
        };
        w.put(&flags.to_le_bytes());
        w.put(&self.rails.to_le_bytes());
        w.put(&0u16.to_le_bytes()); // padding
        w.put(&self.nonce.to_le_bytes());
        w.put(&self.echo.to_le_bytes());
        w.put(&self.geometry.segment_size.to_le_bytes());
        w.put(&self.geometry.segment_count.to_le_bytes());
        w.put(&self.geometry.max_record.to_le_bytes());
        let (delivered, first) = self.resume.unwrap_or((0, 0));
        w.put(&delivered.to_le_bytes());
        w.put(&first.to_le_bytes());
        w.put(&self.endpoint.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; GREETING_LEN]) -> Result<Greeting, HandshakeError> {
        let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
        if magic != GREETING_MAGIC {
            return Err(HandshakeError::BadMagic(magic));
        }
        let mut r = Reader { buf: b, at: 4 };
        let version = r.u16();
        if version != VERSION {
            return Err(HandshakeError::Version(version));
        }
        let flags = r.u16();
        if flags & !FLAG_RESUME != 0 {
            return Err(HandshakeError::Reserved {
                field: "flags",
                value: flags,
            });
        }
        let rails = r.u16();
        r.reserved("padding")?;
        let nonce = r.u64();
        let echo = r.u64();
        let geometry = WireGeometry {
            segment_size: r.u32(),
            segment_count: r.u32(),
            max_record: r.u32(),
        };
        let (delivered, first) = (r.u64(), r.u64());
        let endpoint = r.u64();
        geometry.check()?;
        if nonce == 0 {
            return Err(HandshakeError::Replay);
        }
        let resume = if flags & FLAG_RESUME != 0 {
            if first == 0 {
                return Err(HandshakeError::Resume(
                    "first unacknowledged sequence number 0",
                ));
            }
            Some((delivered, first))
        } else if delivered != 0 || first != 0 {
            return Err(HandshakeError::Resume(
                "resume fields set without the resume flag",
            ));
        } else {
            None
        };
        Ok(Greeting {
            nonce,
            echo,
            rails,
            geometry,
            resume,
            endpoint,
        })
    }

    fn check_wants(&self, theirs: &Greeting) -> Result<(), HandshakeError> {
        if theirs.nonce == self.nonce {
            return Err(HandshakeError::SelfConnection);
        }
        if theirs.rails != self.rails {
            return Err(HandshakeError::RailCount {
                local: self.rails,
                remote: theirs.rails,
            });
        }
        if theirs.geometry != self.geometry {
            return Err(HandshakeError::GeometryMismatch {
                local: self.geometry,
                remote: theirs.geometry,
            });
        }
        match (self.resume, theirs.resume) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(HandshakeError::Resume(
                    "one side resumes a stream, the other starts a new one",
                ))
            }
            (Some((our_delivered, our_first)), Some((their_delivered, their_first))) => {
                // Each side must still hold everything the other has not delivered.
                if their_first > our_delivered + 1 || our_first > their_delivered + 1 {
                    return Err(HandshakeError::Resume(
                        "records between the two streams are gone (not the same session?)",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, HandshakeError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(HandshakeError::Timeout(timeout))
}

fn timed_out(timeout: Duration) -> impl Fn(std::io::Error) -> HandshakeError {
    move |e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            HandshakeError::Timeout(timeout)
        }
        _ => HandshakeError::Io(e),
    }
}

fn write_by(
    stream: &mut TcpStream,
    bytes: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    stream.set_write_timeout(Some(remaining(deadline, timeout)?))?;
    stream.write_all(bytes).map_err(timed_out(timeout))
}

fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    stream.set_read_timeout(Some(remaining(deadline, timeout)?))?;
    stream.read_exact(buf).map_err(timed_out(timeout))
}

/// The dialler's greeting: sends `ours`, then checks the listener's answer (it must echo our
/// nonce and want what we want).
pub fn greet_as_client(
    stream: &mut TcpStream,
    ours: &Greeting,
    timeout: Duration,
) -> Result<Greeting, HandshakeError> {
    let deadline = Instant::now() + timeout;
    stream.set_nodelay(true)?;
    write_by(stream, &ours.encode(), deadline, timeout)?;
    let mut b = [0u8; GREETING_LEN];
    read_by(stream, &mut b, deadline, timeout)?;
    let theirs = Greeting::decode(&b)?;
    ours.check_wants(&theirs)?;
    if theirs.echo != ours.nonce {
        return Err(HandshakeError::Replay);
    }
    Ok(theirs)
}

/// The listener's greeting: reads and checks the dialler's first (sending nothing before), then
/// answers with `ours`, echoing the dialler's nonce.
pub fn greet_as_server(
    stream: &mut TcpStream,
    ours: &Greeting,
    timeout: Duration,
) -> Result<Greeting, HandshakeError> {
    let deadline = Instant::now() + timeout;
    stream.set_nodelay(true)?;
    let mut b = [0u8; GREETING_LEN];
    read_by(stream, &mut b, deadline, timeout)?;
    let theirs = Greeting::decode(&b)?;
    if theirs.echo != 0 {
        return Err(HandshakeError::Replay);
    }
    ours.check_wants(&theirs)?;
    let answer = Greeting {
        echo: theirs.nonce,
        ..*ours
    };
    write_by(stream, &answer.encode(), deadline, timeout)?;
    Ok(theirs)
}

/// Sends one hello (length-prefixed).
pub fn send_hello(
    stream: &mut TcpStream,
    ours: &Hello,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let body = ours.encode();
    let mut msg = [0u8; 4 + HELLO_LEN];
    msg[..4].copy_from_slice(&(HELLO_LEN as u32).to_le_bytes());
    msg[4..].copy_from_slice(&body);
    write_by(stream, &msg, deadline, timeout)
}

/// Receives and validates the peer's hello for the rail `ours` describes: it must belong with
/// ours and must not be ours (a reflected hello would connect this side to itself).
pub fn recv_hello(
    stream: &mut TcpStream,
    ours: &Hello,
    timeout: Duration,
) -> Result<Hello, HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut len = [0u8; 4];
    read_by(stream, &mut len, deadline, timeout)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(HandshakeError::Oversized(len));
    }
    let mut body = vec![0u8; len];
    read_by(stream, &mut body, deadline, timeout)?;
    let peer = Hello::decode(&body)?;
    ours.check_peer(&peer)?;
    if peer.endpoint == ours.endpoint || peer.ring == ours.ring || peer.ctrl == ours.ctrl {
        return Err(HandshakeError::SelfConnection);
    }
    Ok(peer)
}

/// Sends `ours` and receives and validates the peer's hello, within `timeout`.
pub fn exchange(
    stream: &mut TcpStream,
    ours: &Hello,
    timeout: Duration,
) -> Result<Hello, HandshakeError> {
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    let map_timeout = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            HandshakeError::Timeout(timeout)
        }
        _ => HandshakeError::Io(e),
    };
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(remaining().ok_or(HandshakeError::Timeout(timeout))?))?;
    let body = ours.encode();
    let mut msg = Vec::with_capacity(4 + body.len());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(&body);
    stream.write_all(&msg).map_err(map_timeout)?;
    stream.set_read_timeout(Some(remaining().ok_or(HandshakeError::Timeout(timeout))?))?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(map_timeout)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(HandshakeError::Oversized(len));
    }
    let mut body = vec![0u8; len];
    stream.set_read_timeout(Some(remaining().ok_or(HandshakeError::Timeout(timeout))?))?;
    stream.read_exact(&mut body).map_err(map_timeout)?;
    let peer = Hello::decode(&body)?;
    ours.check_peer(&peer)?;
    Ok(peer)
}

/// Both sides call this once their queue pairs are connected: returns when the peer's are too.
pub fn barrier(stream: &mut TcpStream, timeout: Duration) -> Result<(), HandshakeError> {
    const READY: [u8; 4] = *b"RDY1";
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let to = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            HandshakeError::Timeout(timeout)
        }
        _ => HandshakeError::Io(e),
    };
    stream.write_all(&READY).map_err(to)?;
    let mut got = [0u8; 4];
    stream.read_exact(&mut got).map_err(to)?;
    if got != READY {
        return Err(HandshakeError::BadMagic(got));
    }
    Ok(())
}

/// Connects with a timeout.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, HandshakeError> {
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            HandshakeError::Timeout(timeout)
        }
        _ => HandshakeError::Io(e),
    })
}

/// Accepts one connection, giving up after `timeout` (the listener is polled non-blocking).
pub fn accept(listener: &TcpListener, timeout: Duration) -> Result<TcpStream, HandshakeError> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(HandshakeError::Timeout(timeout));
                }
                // Set-up path only (never the data path): wait a little before polling again.
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> WireGeometry {
        WireGeometry {
            segment_size: 4096,
            segment_count: 8,
            max_record: 256,
        }
    }

    /// A connected loopback pair (client, server).
    fn streams() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    #[test]
    fn greetings_agree_on_a_session_and_refuse_reflection_replay_and_mismatch() {
        let t = Duration::from_secs(5);
        let (mut c, mut s) = streams();
        let (gc, gs) = (Greeting::new(2, geometry()), Greeting::new(2, geometry()));
        let server = std::thread::spawn(move || greet_as_server(&mut s, &gs, t).map(|g| (g, gs)));
        let theirs = greet_as_client(&mut c, &gc, t).unwrap();
        let (seen, gs) = server.join().unwrap().unwrap();
        assert_eq!(seen.nonce, gc.nonce);
        assert_eq!(theirs.nonce, gs.nonce);
        assert_eq!(
            Greeting::session_id(&gc, &theirs),
            Greeting::session_id(&seen, &gs)
        );

        // A client that reflects the server's own greeting (it cannot know it: it sends first,
        // so this is a replay of an earlier one) is refused, and gets nothing back.
        let (mut c, mut s) = streams();
        let gs = Greeting::new(2, geometry());
        c.write_all(&gs.encode()).unwrap();
        assert!(matches!(
            greet_as_server(&mut s, &gs, t),
            Err(HandshakeError::Replay | HandshakeError::SelfConnection)
        ));
        let replayed = Greeting { echo: 0, ..gs };
        let (mut c2, mut s2) = streams();
        c2.write_all(&replayed.encode()).unwrap();
        assert!(matches!(
            greet_as_server(&mut s2, &gs, t),
            Err(HandshakeError::SelfConnection)
        ));
        drop(s2);
        let mut got = Vec::new();
        c2.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "a refused client learns nothing");

        // Another session's answer (wrong echo) is refused by the client.
        let (mut c, mut s) = streams();
        let gc = Greeting::new(2, geometry());
        let stale = Greeting {
            echo: 12345,
            ..Greeting::new(2, geometry())
        };
        s.write_all(&stale.encode()).unwrap();
        assert!(matches!(
            greet_as_client(&mut c, &gc, t),
            Err(HandshakeError::Replay)
        ));

        // Wanting something else is a typed error.
        let (mut c, mut s) = streams();
        c.write_all(&Greeting::new(3, geometry()).encode()).unwrap();
        assert!(matches!(
            greet_as_server(&mut s, &Greeting::new(2, geometry()), t),
            Err(HandshakeError::RailCount {
                local: 2,
                remote: 3
            })
        ));
        // A silent client times out.
        let (_c, mut s) = streams();
        assert!(matches!(
            greet_as_server(
                &mut s,
                &Greeting::new(2, geometry()),
                Duration::from_millis(50)
            ),
            Err(HandshakeError::Timeout(_))
        ));
    }

    #[test]
    fn an_absent_rail_round_trips_and_carries_nothing_else() {
        let absent = Hello::absent(1, 2, geometry());
        assert!(absent.is_absent());
        let back = Hello::decode(&absent.encode()).unwrap();
        assert_eq!(back, absent);
        assert!(!sample().is_absent());
        // The flag with an address or a queue pair beside it is no honest hello.
        let mut b = absent.encode();
        b[12] = 7; // the queue pair number's low byte
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Reserved {
                field: "absent rail",
                ..
            })
        ));
        // Unknown flags are refused.
        let mut b = sample().encode();
        b[6] = 2;
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Reserved { field: "flags", .. })
        ));
    }

    #[test]
    fn a_reflected_hello_is_a_self_connection() {
        let t = Duration::from_secs(5);
        let (mut c, mut s) = streams();
        let ours = sample();
        send_hello(&mut c, &ours, t).unwrap();
        assert!(matches!(
            recv_hello(&mut s, &ours, t),
            Err(HandshakeError::SelfConnection)
        ));
    }

    fn sample() -> Hello {
        Hello {
            rail_index: 1,
            rail_count: 2,
            endpoint: Endpoint {
                qpn: 0x123,
                psn: 0x45,
                gid: [7; 16],
                lid: 0,
            },
            geometry: WireGeometry {
                segment_size: 4096,
                segment_count: 16,
                max_record: 1024,
            },
            ring: RemoteRegion {
                addr: 0x7f00_0000_0000,
                rkey: 9,
                len: 65536,
            },
            ctrl: RemoteRegion {
                addr: 0x7f00_1000_0000,
                rkey: 10,
                len: 4096,
            },
        }
    }

    #[test]
    fn roundtrip() {
        assert_eq!(Hello::decode(&sample().encode()).unwrap(), sample());
    }

    #[test]
    fn hostile_inputs_are_typed_errors() {
        let good = sample().encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::BadMagic(_))
        ));
        let mut b = good;
        b[4] = 9;
        assert!(matches!(Hello::decode(&b), Err(HandshakeError::Version(9))));
        assert!(matches!(
            Hello::decode(&good[..20]),
            Err(HandshakeError::Truncated(20))
        ));
        assert!(matches!(
            Hello::decode(&[good.as_slice(), &[0]].concat()),
            Err(HandshakeError::Oversized(_))
        ));
        assert!(matches!(
            Hello::decode(&vec![0u8; 5000]),
            Err(HandshakeError::Oversized(5000))
        ));
        let mut h = sample();
        h.geometry.segment_size = 1000;
        assert!(matches!(
            Hello::decode(&h.encode()),
            Err(HandshakeError::Geometry(_))
        ));
        let mut h = sample();
        h.ring.len = 100; // smaller than the ring it claims
        assert!(matches!(
            Hello::decode(&h.encode()),
            Err(HandshakeError::Region { what: "ring", .. })
        ));
        let mut h = sample();
        h.ctrl.addr = u64::MAX - 10;
        assert!(matches!(
            Hello::decode(&h.encode()),
            Err(HandshakeError::Region { what: "ctrl", .. })
        ));
        let mut h = sample();
        h.rail_index = 2;
        assert!(matches!(
            Hello::decode(&h.encode()),
            Err(HandshakeError::RailMismatch { .. })
        ));
        let mut b = good;
        b[6] = 4; // unknown flag
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Reserved {
                field: "flags",
                value: 4
            })
        ));
        let mut b = good;
        b[23] = 0x80; // padding after the LID (found by the hello_decode fuzzer)
        assert!(matches!(
            Hello::decode(&b),
            Err(HandshakeError::Reserved {
                field: "padding",
                ..
            })
        ));
        let mut peer = sample();
        peer.geometry.segment_count = 32;
        assert!(matches!(
            sample().check_peer(&peer),
            Err(HandshakeError::GeometryMismatch { .. })
        ));
    }

    #[test]
    fn exchange_over_loopback_and_timeouts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = accept(&listener, Duration::from_secs(10)).unwrap();
            exchange(&mut s, &sample(), Duration::from_secs(10)).unwrap()
        });
        let mut c = connect(addr, Duration::from_secs(10)).unwrap();
        let got = exchange(&mut c, &sample(), Duration::from_secs(10)).unwrap();
        assert_eq!(got, sample());
        assert_eq!(t.join().unwrap(), sample());

        // A peer that accepts but never speaks: the exchange times out instead of hanging.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = connect(listener.local_addr().unwrap(), Duration::from_secs(10)).unwrap();
        let r = exchange(&mut c, &sample(), Duration::from_millis(100));
        assert!(matches!(r, Err(HandshakeError::Timeout(_))), "{r:?}");
        // Nobody connects: accept times out.
        let lonely = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            accept(&lonely, Duration::from_millis(20)),
            Err(HandshakeError::Timeout(_))
        ));
    }
}
