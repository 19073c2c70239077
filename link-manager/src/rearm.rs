//! Re-arming a rail between two processes (two hosts), over the TCP stream the connection was set
//! up on. One side (the one that dialled) initiates every re-arm, so the two never race:
//!
//! ```text
//! initiator                                    acceptor
//!   core asks to re-arm rail r
//!   fresh QP; REQUEST(r, hello)  ───────────▶  fresh QP, connected to the initiator's
//!                                ◀───────────  ACCEPT(r, hello)    (or REFUSE(r))
//!   connect; READY(r)            ───────────▶
//!   install: rail r is a standby               install on READY: rail r is a standby
//! ```
//!
//! The acceptor's queue pair is ready to receive before it answers, and it writes nothing before
//! READY says the initiator's is too (a write to a queue pair still in INIT is dropped and ends
//! in a retry-exceeded error). A refusal, a bad message or a time-out ends the attempt on both
//! sides; the core asks again later. The stream is non-blocking and only read while a rail is
//! failed or an exchange is under way: no system call in steady state.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use railover_rdma::handshake::{Hello, HELLO_LEN};
use railover_rdma::{Link, Nic};

use crate::core::{Nanos, RailState};
use crate::runtime::{Clock, Receiver};

/// Which side of the re-arm protocol this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialled: starts every re-arm.
    Initiator,
    /// The side that listened: answers.
    Acceptor,
}

const REQUEST: u8 = 1;
const ACCEPT: u8 = 2;
const REFUSE: u8 = 3;
const READY: u8 = 4;
/// kind, rail, two reserved bytes (zero), a hello (zeros when the kind carries none).
const FRAME: usize = 4 + HELLO_LEN;
/// How long one exchange may take before both sides give up on it.
const EXCHANGE_TIMEOUT_NS: Nanos = 5_000_000_000;

enum Exchange<L> {
    Idle,
    /// Initiator: REQUEST sent, waiting for ACCEPT or REFUSE.
    AwaitingAnswer {
        rail: usize,
        link: L,
        ours: Hello,
        since: Nanos,
    },
    /// Acceptor: ACCEPT sent (its queue pair connected), waiting for READY.
    AwaitingReady {
        rail: usize,
        link: L,
        ours: Hello,
        peer: Hello,
        since: Nanos,
    },
}

/// The re-arm side channel of one connection.
pub struct RearmChannel<L> {
    stream: TcpStream,
    role: Role,
    state: Exchange<L>,
    inbox: [u8; FRAME],
    have: usize,
    closed: bool,
    /// Re-arms completed over this channel.
    pub completed: u64,
}

struct Frame {
    kind: u8,
    rail: usize,
    hello: Option<Hello>,
}

impl<L: Link> RearmChannel<L> {
    pub fn new(stream: TcpStream, role: Role) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(RearmChannel {
            stream,
            role,
            state: Exchange::Idle,
            inbox: [0; FRAME],
            have: 0,
            closed: false,
            completed: 0,
        })
    }

    /// Whether the channel is gone for good (closed or failed stream, or a message no honest peer
    /// sends): no rail is re-armed over it any more.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether an exchange is under way (the stream must be read).
    pub fn busy(&self) -> bool {
        !matches!(self.state, Exchange::Idle)
    }

    fn send(&mut self, kind: u8, rail: usize, hello: Option<&Hello>) -> std::io::Result<()> {
        let mut f = [0u8; FRAME];
        f[0] = kind;
        f[1] = rail as u8;
        if let Some(h) = hello {
            f[4..].copy_from_slice(&h.encode());
        }
        // Non-blocking, but 150 bytes on an idle control stream never fill its buffer; a stream
        // that is full anyway is as good as broken.
        self.stream.write_all(&f)
    }

    /// The next whole frame, if one arrived (never blocks). A closed or failed stream, or a frame
    /// no honest peer sends, closes the channel.
    fn receive(&mut self, rails: usize) -> Option<Frame> {
        while self.have < FRAME {
            match self.stream.read(&mut self.inbox[self.have..]) {
                Ok(0) => {
                    tracing::warn!("re-arm channel closed by the peer");
                    self.closed = true;
                    return None;
                }
                Ok(n) => self.have += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "re-arm channel failed");
                    self.closed = true;
                    return None;
                }
            }
        }
        self.have = 0;
        let (kind, rail) = (self.inbox[0], self.inbox[1] as usize);
        let valid_kind = matches!(kind, REQUEST | ACCEPT | REFUSE | READY);
        if !valid_kind || rail >= rails || self.inbox[2..4] != [0, 0] {
            tracing::warn!(kind, rail, "bad re-arm message; closing the channel");
            self.closed = true;
            return None;
        }
        let hello = if matches!(kind, REQUEST | ACCEPT) {
            match Hello::decode(&self.inbox[4..]) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "bad hello in a re-arm message; closing the channel");
                    self.closed = true;
                    return None;
                }
            }
        } else {
            None
        };
        Some(Frame { kind, rail, hello })
    }

    /// Advances the protocol: starts a re-arm the core asked for (initiator), answers the peer's
    /// (acceptor), installs a rail whose exchange completed.
    pub fn serve<N: Nic<Link = L>, C: Clock>(&mut self, rx: &mut Receiver<N, C>) {
        if self.closed {
            // Nothing can be re-armed without the peer; the core keeps its rails failed.
            while let Some(rail) = rx.take_rearm_request() {
                rx.rearm_failed(rail);
            }
            return;
        }
        let rails = rx.core().config().rails();
        let now = rx.now();
        match self.role {
            Role::Initiator => self.serve_initiator(rx, rails, now),
            Role::Acceptor => self.serve_acceptor(rx, rails, now),
        }
    }

    fn serve_initiator<N: Nic<Link = L>, C: Clock>(
        &mut self,
        rx: &mut Receiver<N, C>,
        rails: usize,
        now: Nanos,
    ) {
        if !self.busy() {
            let Some(rail) = rx.take_rearm_request() else {
                return;
            };
            match rx.rearm_prepare(rail) {
                Ok((link, ours)) => {
                    if let Err(e) = self.send(REQUEST, rail, Some(&ours)) {
                        tracing::warn!(rail, error = %e, "re-arm request not sent");
                        self.closed = true;
                        rx.rearm_failed(rail);
                        return;
                    }
                    self.state = Exchange::AwaitingAnswer {
                        rail,
                        link,
                        ours,
                        since: now,
                    };
                }
                Err(e) => {
                    tracing::debug!(rail, error = %e, "re-arm: no fresh queue pair yet");
                    rx.rearm_failed(rail);
                    return;
                }
            }
        }
        let frame = self.receive(rails);
        let Exchange::AwaitingAnswer { rail, since, .. } = self.state else {
            return;
        };
        match frame {
            Some(Frame {
                kind: ACCEPT,
                rail: r,
                hello: Some(peer),
            }) if r == rail => {
                let Exchange::AwaitingAnswer { mut link, ours, .. } =
                    std::mem::replace(&mut self.state, Exchange::Idle)
                else {
                    unreachable!("matched above")
                };
                let connected = ours
                    .check_peer(&peer)
                    .map_err(crate::runtime::ConnectError::from)
                    .and_then(|()| Ok(link.connect(&peer.endpoint)?));
                match connected.and_then(|()| {
                    self.send(READY, rail, None)
                        .map_err(crate::runtime::ConnectError::Channel)
                }) {
                    Ok(()) => {
                        rx.install_rearmed(rail, link, &ours, &peer);
                        self.completed += 1;
                    }
                    Err(e) => {
                        tracing::warn!(rail, error = %e, "re-arm failed after the peer accepted");
                        let _ = self.send(REFUSE, rail, None);
                        rx.rearm_failed(rail);
                    }
                }
            }
            Some(Frame {
                kind: REFUSE,
                rail: r,
                ..
            }) if r == rail => {
                tracing::debug!(rail, "peer refused the re-arm; will retry");
                self.state = Exchange::Idle;
                rx.rearm_failed(rail);
            }
            Some(Frame { kind, rail: r, .. }) => {
                tracing::warn!(
                    kind,
                    rail = r,
                    "unexpected re-arm message; closing the channel"
                );
                self.closed = true;
                self.state = Exchange::Idle;
                rx.rearm_failed(rail);
            }
            None if self.closed || now.saturating_sub(since) > EXCHANGE_TIMEOUT_NS => {
                self.state = Exchange::Idle;
                rx.rearm_failed(rail);
            }
            None => {}
        }
    }

    fn serve_acceptor<N: Nic<Link = L>, C: Clock>(
        &mut self,
        rx: &mut Receiver<N, C>,
        rails: usize,
        now: Nanos,
    ) {
        // The initiator starts every re-arm; this side's own requests wait for its REQUEST.
        while let Some(rail) = rx.take_rearm_request() {
            rx.rearm_failed(rail);
        }
        let frame = self.receive(rails);
        match (frame, &self.state) {
            (
                Some(Frame {
                    kind: REQUEST,
                    rail,
                    hello: Some(peer),
                }),
                Exchange::Idle,
            ) => {
                let prepared = rx.rearm_prepare(rail).and_then(|(mut link, ours)| {
                    ours.check_peer(&peer)?;
                    link.connect(&peer.endpoint)?;
                    Ok((link, ours))
                });
                match prepared {
                    Ok((link, ours)) => match self.send(ACCEPT, rail, Some(&ours)) {
                        Ok(()) => {
                            self.state = Exchange::AwaitingReady {
                                rail,
                                link,
                                ours,
                                peer,
                                since: now,
                            }
                        }
                        Err(e) => {
                            tracing::warn!(rail, error = %e, "re-arm answer not sent");
                            self.closed = true;
                        }
                    },
                    Err(e) => {
                        tracing::debug!(rail, error = %e, "refusing a re-arm for now");
                        if self.send(REFUSE, rail, None).is_err() {
                            self.closed = true;
                        }
                    }
                }
            }
            (
                Some(Frame {
                    kind: READY,
                    rail: r,
                    ..
                }),
                Exchange::AwaitingReady { rail, .. },
            ) if r == *rail => {
                let Exchange::AwaitingReady {
                    rail,
                    link,
                    ours,
                    peer,
                    ..
                } = std::mem::replace(&mut self.state, Exchange::Idle)
                else {
                    unreachable!("matched above")
                };
                rx.install_rearmed(rail, link, &ours, &peer);
                self.completed += 1;
            }
            (
                Some(Frame {
                    kind: REFUSE,
                    rail: r,
                    ..
                }),
                Exchange::AwaitingReady { rail, .. },
            ) if r == *rail => {
                self.state = Exchange::Idle;
            }
            (Some(Frame { kind, rail, .. }), _) => {
                tracing::warn!(kind, rail, "unexpected re-arm message; closing the channel");
                self.closed = true;
                self.state = Exchange::Idle;
            }
            (None, Exchange::AwaitingReady { since, .. })
                if self.closed || now.saturating_sub(*since) > EXCHANGE_TIMEOUT_NS =>
            {
                self.state = Exchange::Idle;
            }
            (None, _) => {}
        }
    }
}

/// Whether the channel needs serving now: an exchange is under way, the core asked for a re-arm,
/// or a rail is failed (the peer may ask). Otherwise the stream is left alone (no syscall).
pub(crate) fn needs_service<L: Link, N: Nic<Link = L>, C: Clock>(
    ch: &RearmChannel<L>,
    rx: &Receiver<N, C>,
) -> bool {
    ch.busy()
        || rx.has_rearm_request()
        || (0..rx.core().config().rails()).any(|r| rx.core().rail_state(r) == RailState::Failed)
}
