//! Re-arming a failed rail with the peer, sans I/O: the protocol both hosts run over their control
//! channel (the TCP stream the connection was set up on). It owns no socket, queue pair, thread or
//! clock: an executor ([`crate::control`]) feeds it bytes, the time and the results of the steps
//! it asked for, and carries out the [`RearmIo`] it emits — on the data thread (the simulator,
//! single-threaded set-ups) or on a control thread of its own (verbs: the data thread never
//! blocks on queue-pair creation, device reopen or the stream).
//!
//! One side (the one that dialled) initiates every re-arm, so the two never race:
//!
//! ```text
//! initiator                                    acceptor
//!   core asks to re-arm rail r
//!   Prepare r (fresh QP)
//!   REQUEST(r, x, hello)        ───────────▶  Prepare r; Connect r to the initiator's QP
//!                               ◀───────────  ACCEPT(r, x, hello)   (or REFUSE(r, x))
//!   Connect r; READY(r, x)      ───────────▶
//!   Install r: rail r is a standby             Install r on READY: rail r is a standby
//! ```
//!
//! The acceptor's queue pair is ready to receive before it answers, and it writes nothing before
//! READY says the initiator's is too (a write to a queue pair still in INIT is dropped and ends in
//! a retry-exceeded error). Every exchange carries its own id `x`: an answer to an exchange that
//! was given up (timed out, refused) is stale and ignored, so a slow peer never leaves the two
//! sides out of step — the next exchange starts clean. A refusal, a failed step or a time-out
//! ends the attempt on both sides (the core asks again later). Only a frame no honest peer sends
//! (unknown kind, rail out of range, bad hello, non-zero padding) or a broken stream closes the
//! channel: that is reported ([`RearmProtocol::is_closed`]) so the user hears that redundancy
//! can no longer be restored.

use std::collections::VecDeque;

use railover_rdma::handshake::{Hello, HELLO_LEN};

use crate::config::MAX_RAILS;
use crate::core::Nanos;

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
/// kind, rail, exchange id (u16 LE), a hello (zeros when the kind carries none).
pub const FRAME: usize = 4 + HELLO_LEN;
/// How long one exchange may wait for the peer before this side gives up on it, by default
/// ([`crate::ConfigBuilder::rearm_exchange_timeout`]).
pub const EXCHANGE_TIMEOUT_NS: Nanos = 5_000_000_000;

/// Work for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RearmIo {
    /// Write this frame to the peer.
    Send([u8; FRAME]),
    /// Make a fresh queue pair on `rail` (opening its card again if it was released) for this
    /// attempt; answer with [`RearmProtocol::prepared`]. The executor keeps it with the attempt:
    /// the steps below name the attempt they act on, and one made for an attempt given up meanwhile
    /// must never be connected or installed for the next (its hello went to nobody).
    Prepare { rail: usize, attempt: u32 },
    /// Connect the attempt's fresh queue pair to the peer's; answer with
    /// [`RearmProtocol::connected`].
    Connect {
        rail: usize,
        attempt: u32,
        peer: Hello,
    },
    /// Both sides are ready: install the attempt's fresh queue pair (the rail becomes a standby).
    Install {
        rail: usize,
        attempt: u32,
        peer: Hello,
    },
    /// The attempt failed: drop its fresh queue pair, if any; the core asks again later.
    Abandon { rail: usize, attempt: u32 },
    /// This side does not start re-arms (acceptor): the core asks again later, meanwhile the
    /// peer starts it.
    Decline { rail: usize },
}

#[derive(Debug, Clone, Copy)]
enum Exchange {
    Idle,
    /// Initiator: making the fresh queue pair.
    Preparing {
        rail: usize,
        xid: u16,
        since: Nanos,
    },
    /// Initiator: REQUEST sent, waiting for ACCEPT or REFUSE.
    AwaitingAnswer {
        rail: usize,
        xid: u16,
        ours: Hello,
        since: Nanos,
    },
    /// Initiator: connecting to the acceptor's queue pair.
    Connecting {
        rail: usize,
        xid: u16,
        peer: Hello,
        since: Nanos,
    },
    /// Acceptor: making a fresh queue pair for the initiator's REQUEST.
    AcceptPreparing {
        rail: usize,
        xid: u16,
        peer: Hello,
        since: Nanos,
    },
    /// Acceptor: connecting it to the initiator's.
    AcceptConnecting {
        rail: usize,
        xid: u16,
        ours: Hello,
        peer: Hello,
        since: Nanos,
    },
    /// Acceptor: ACCEPT sent (its queue pair connected), waiting for READY.
    AwaitingReady {
        rail: usize,
        xid: u16,
        peer: Hello,
        since: Nanos,
    },
}

impl Exchange {
    fn rail(&self) -> Option<usize> {
        match *self {
            Exchange::Idle => None,
            Exchange::Preparing { rail, .. }
            | Exchange::AwaitingAnswer { rail, .. }
            | Exchange::Connecting { rail, .. }
            | Exchange::AcceptPreparing { rail, .. }
            | Exchange::AcceptConnecting { rail, .. }
            | Exchange::AwaitingReady { rail, .. } => Some(rail),
        }
    }

    fn since(&self) -> Option<Nanos> {
        match *self {
            Exchange::Idle => None,
            Exchange::Preparing { since, .. }
            | Exchange::AwaitingAnswer { since, .. }
            | Exchange::Connecting { since, .. }
            | Exchange::AcceptPreparing { since, .. }
            | Exchange::AcceptConnecting { since, .. }
            | Exchange::AwaitingReady { since, .. } => Some(since),
        }
    }
}

/// A decoded frame.
struct Frame {
    kind: u8,
    rail: usize,
    xid: u16,
    hello: Option<Hello>,
}

/// The re-arm protocol of one connection (one per host).
pub struct RearmProtocol {
    role: Role,
    rails: usize,
    state: Exchange,
    /// Rails the core asked to re-arm, not yet started (initiator).
    wanted: [bool; MAX_RAILS],
    next_xid: u16,
    /// Numbers every fresh queue pair asked of the executor: the current exchange's is the last.
    attempt: u32,
    inbox: [u8; FRAME],
    have: usize,
    closed: bool,
    out: VecDeque<RearmIo>,
    /// Re-arms completed (both sides count alike).
    completed: u64,
    timeout_ns: Nanos,
}

fn encode(kind: u8, rail: usize, xid: u16, hello: Option<&Hello>) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[0] = kind;
    f[1] = rail as u8;
    f[2..4].copy_from_slice(&xid.to_le_bytes());
    if let Some(h) = hello {
        f[4..].copy_from_slice(&h.encode());
    }
    f
}

impl RearmProtocol {
    pub fn new(role: Role, rails: usize) -> RearmProtocol {
        RearmProtocol {
            role,
            rails,
            state: Exchange::Idle,
            wanted: [false; MAX_RAILS],
            next_xid: 1,
            attempt: 0,
            inbox: [0; FRAME],
            have: 0,
            closed: false,
            out: VecDeque::with_capacity(8),
            completed: 0,
            timeout_ns: EXCHANGE_TIMEOUT_NS,
        }
    }

    /// How long an exchange may wait for the peer (default [`EXCHANGE_TIMEOUT_NS`]).
    pub fn with_timeout(mut self, timeout_ns: Nanos) -> RearmProtocol {
        self.timeout_ns = timeout_ns;
        self
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Re-arms completed over this channel.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Whether the channel is gone for good (a broken stream, or a frame no honest peer sends):
    /// no rail is re-armed over it any more.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether an exchange is under way (the stream must be read).
    pub fn busy(&self) -> bool {
        !matches!(self.state, Exchange::Idle) || self.wanted.iter().any(|w| *w)
    }

    /// Next work for the executor.
    pub fn poll(&mut self) -> Option<RearmIo> {
        self.out.pop_front()
    }

    /// The core wants `rail` re-armed.
    pub fn request(&mut self, rail: usize, now: Nanos) {
        if rail >= self.rails {
            return;
        }
        if self.closed {
            self.out.push_back(RearmIo::Decline { rail });
            return;
        }
        match self.role {
            Role::Acceptor => self.out.push_back(RearmIo::Decline { rail }),
            Role::Initiator => {
                if self.state.rail() != Some(rail) {
                    self.wanted[rail] = true;
                }
                self.start_next(now);
            }
        }
    }

    /// The stream broke (closed by the peer, or an I/O error).
    pub fn channel_failed(&mut self) {
        if !self.closed {
            tracing::warn!("re-arm channel lost");
            self.close();
        }
    }

    /// A new stream replaced the old one: the protocol starts afresh on it (an exchange half done
    /// on the old one is abandoned; the core asks for its rail again). Exchange ids and attempt
    /// numbers carry on, so nothing from before is taken for something new.
    pub fn reopen(&mut self) {
        if !self.closed {
            self.close(); // abandons what was under way
        }
        self.closed = false;
        self.have = 0;
    }

    /// Bytes read from the stream.
    pub fn on_bytes(&mut self, mut bytes: &[u8], now: Nanos) {
        while !bytes.is_empty() && !self.closed {
            let n = (FRAME - self.have).min(bytes.len());
            self.inbox[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME {
                self.have = 0;
                if let Some(f) = self.decode() {
                    self.on_frame(f, now);
                }
            }
        }
    }

    /// The fresh queue pair of `rail` is made (its hello), or could not be.
    pub fn prepared<E: std::fmt::Display>(
        &mut self,
        rail: usize,
        attempt: u32,
        result: Result<Hello, E>,
        now: Nanos,
    ) {
        if attempt != self.attempt {
            return; // made for an attempt given up: the executor drops it
        }
        match (self.state, result) {
            (Exchange::Preparing { rail: r, xid, .. }, Ok(ours)) if r == rail => {
                self.send(REQUEST, rail, xid, Some(&ours));
                self.state = Exchange::AwaitingAnswer {
                    rail,
                    xid,
                    ours,
                    since: now,
                };
            }
            (
                Exchange::AcceptPreparing {
                    rail: r, xid, peer, ..
                },
                Ok(ours),
            ) if r == rail => {
                if let Err(e) = ours.check_peer(&peer) {
                    tracing::warn!(rail, error = %e, "re-arm: the peer's hello does not match ours");
                    self.refuse_and_abandon(rail, xid, now);
                    return;
                }
                self.out.push_back(RearmIo::Connect {
                    rail,
                    attempt,
                    peer,
                });
                self.state = Exchange::AcceptConnecting {
                    rail,
                    xid,
                    ours,
                    peer,
                    since: now,
                };
            }
            (Exchange::Preparing { rail: r, .. }, Err(e)) if r == rail => {
                tracing::debug!(rail, error = %e, "re-arm: no fresh queue pair yet");
                self.abandon(rail, now);
            }
            (Exchange::AcceptPreparing { rail: r, xid, .. }, Err(e)) if r == rail => {
                tracing::debug!(rail, error = %e, "refusing a re-arm for now");
                self.refuse_and_abandon(rail, xid, now);
            }
            _ => {} // an answer to an attempt already given up: its queue pair is dropped
        }
    }

    /// The fresh queue pair of `rail` is connected to the peer's, or could not be.
    pub fn connected<E: std::fmt::Display>(
        &mut self,
        rail: usize,
        attempt: u32,
        result: Result<(), E>,
        now: Nanos,
    ) {
        if attempt != self.attempt {
            return;
        }
        match (self.state, result) {
            (
                Exchange::Connecting {
                    rail: r, xid, peer, ..
                },
                Ok(()),
            ) if r == rail => {
                self.send(READY, rail, xid, None);
                self.install(rail, peer, now);
            }
            (
                Exchange::AcceptConnecting {
                    rail: r,
                    xid,
                    ours,
                    peer,
                    ..
                },
                Ok(()),
            ) if r == rail => {
                self.send(ACCEPT, rail, xid, Some(&ours));
                self.state = Exchange::AwaitingReady {
                    rail,
                    xid,
                    peer,
                    since: now,
                };
            }
            (
                Exchange::Connecting { rail: r, xid, .. }
                | Exchange::AcceptConnecting { rail: r, xid, .. },
                Err(e),
            ) if r == rail => {
                tracing::warn!(rail, error = %e, "re-arm: connecting the fresh queue pair failed");
                self.refuse_and_abandon(rail, xid, now);
            }
            _ => {}
        }
    }

    /// Gives up on an exchange the peer has not answered in time.
    pub fn handle_timeout(&mut self, now: Nanos) {
        if let (Some(rail), Some(since)) = (self.state.rail(), self.state.since()) {
            if now.saturating_sub(since) > self.timeout_ns {
                tracing::warn!(rail, "re-arm exchange timed out; will retry");
                self.abandon(rail, now);
            }
        }
    }

    /// When [`RearmProtocol::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.state.since().map(|s| s + self.timeout_ns + 1)
    }

    // ---- internals ----

    fn send(&mut self, kind: u8, rail: usize, xid: u16, hello: Option<&Hello>) {
        self.out
            .push_back(RearmIo::Send(encode(kind, rail, xid, hello)));
    }

    fn install(&mut self, rail: usize, peer: Hello, now: Nanos) {
        self.out.push_back(RearmIo::Install {
            rail,
            attempt: self.attempt,
            peer,
        });
        self.completed += 1;
        self.state = Exchange::Idle;
        self.start_next(now);
    }

    fn abandon(&mut self, rail: usize, now: Nanos) {
        self.out.push_back(RearmIo::Abandon {
            rail,
            attempt: self.attempt,
        });
        self.state = Exchange::Idle;
        self.start_next(now);
    }

    fn refuse_and_abandon(&mut self, rail: usize, xid: u16, now: Nanos) {
        self.send(REFUSE, rail, xid, None);
        self.abandon(rail, now);
    }

    fn close(&mut self) {
        self.closed = true;
        if let Some(rail) = self.state.rail() {
            self.out.push_back(RearmIo::Abandon {
                rail,
                attempt: self.attempt,
            });
        }
        self.state = Exchange::Idle;
        for rail in 0..self.rails {
            if std::mem::take(&mut self.wanted[rail]) {
                self.out.push_back(RearmIo::Decline { rail });
            }
        }
    }

    /// Initiator: starts the next wanted re-arm when idle.
    fn start_next(&mut self, now: Nanos) {
        if self.role != Role::Initiator || self.closed || !matches!(self.state, Exchange::Idle) {
            return;
        }
        let Some(rail) = (0..self.rails).find(|&r| self.wanted[r]) else {
            return;
        };
        self.wanted[rail] = false;
        let xid = self.next_xid;
        self.next_xid = self.next_xid.wrapping_add(1).max(1);
        self.attempt = self.attempt.wrapping_add(1);
        self.out.push_back(RearmIo::Prepare {
            rail,
            attempt: self.attempt,
        });
        self.state = Exchange::Preparing {
            rail,
            xid,
            since: now,
        };
    }

    fn decode(&mut self) -> Option<Frame> {
        let (kind, rail) = (self.inbox[0], self.inbox[1] as usize);
        let xid = u16::from_le_bytes([self.inbox[2], self.inbox[3]]);
        let valid_kind = matches!(kind, REQUEST | ACCEPT | REFUSE | READY);
        if !valid_kind || rail >= self.rails || xid == 0 {
            tracing::warn!(kind, rail, xid, "bad re-arm message; closing the channel");
            self.close();
            return None;
        }
        let hello = if matches!(kind, REQUEST | ACCEPT) {
            match Hello::decode(&self.inbox[4..]) {
                // A re-arm offers a fresh queue pair: an absent rail is no offer.
                Ok(h) if h.is_absent() => {
                    tracing::warn!("absent rail in a re-arm message; closing the channel");
                    self.close();
                    return None;
                }
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "bad hello in a re-arm message; closing the channel");
                    self.close();
                    return None;
                }
            }
        } else if self.inbox[4..].iter().any(|b| *b != 0) {
            tracing::warn!(
                kind,
                "re-arm message with a non-zero body; closing the channel"
            );
            self.close();
            return None;
        } else {
            None
        };
        Some(Frame {
            kind,
            rail,
            xid,
            hello,
        })
    }

    fn on_frame(&mut self, f: Frame, now: Nanos) {
        let current = match self.state {
            Exchange::AwaitingAnswer { rail, xid, .. }
            | Exchange::AwaitingReady { rail, xid, .. }
            | Exchange::Preparing { rail, xid, .. }
            | Exchange::Connecting { rail, xid, .. }
            | Exchange::AcceptPreparing { rail, xid, .. }
            | Exchange::AcceptConnecting { rail, xid, .. } => Some((rail, xid)),
            Exchange::Idle => None,
        };
        let this_exchange = current == Some((f.rail, f.xid));
        match (self.role, f.kind) {
            (Role::Acceptor, REQUEST) => {
                // A new request supersedes one in progress: the initiator gave up on it.
                if let Some(rail) = self.state.rail() {
                    self.out.push_back(RearmIo::Abandon {
                        rail,
                        attempt: self.attempt,
                    });
                }
                let peer = f.hello.expect("decoded with a hello");
                self.attempt = self.attempt.wrapping_add(1);
                self.out.push_back(RearmIo::Prepare {
                    rail: f.rail,
                    attempt: self.attempt,
                });
                self.state = Exchange::AcceptPreparing {
                    rail: f.rail,
                    xid: f.xid,
                    peer,
                    since: now,
                };
            }
            (Role::Initiator, ACCEPT) if this_exchange => {
                if let Exchange::AwaitingAnswer {
                    rail, xid, ours, ..
                } = self.state
                {
                    let peer = f.hello.expect("decoded with a hello");
                    if let Err(e) = ours.check_peer(&peer) {
                        tracing::warn!(rail, error = %e, "re-arm: the peer's hello does not match ours");
                        self.refuse_and_abandon(rail, xid, now);
                        return;
                    }
                    self.out.push_back(RearmIo::Connect {
                        rail,
                        attempt: self.attempt,
                        peer,
                    });
                    self.state = Exchange::Connecting {
                        rail,
                        xid,
                        peer,
                        since: now,
                    };
                }
            }
            (_, REFUSE) if this_exchange => {
                tracing::debug!(rail = f.rail, "peer refused the re-arm; will retry");
                self.abandon(f.rail, now);
            }
            (Role::Acceptor, READY) if this_exchange => {
                if let Exchange::AwaitingReady { rail, peer, .. } = self.state {
                    self.install(rail, peer, now);
                }
            }
            (Role::Initiator, ACCEPT | REFUSE) | (Role::Acceptor, READY | REFUSE) => {
                tracing::debug!(
                    kind = f.kind,
                    rail = f.rail,
                    xid = f.xid,
                    "stale re-arm answer ignored"
                );
            }
            (_, kind) => {
                tracing::warn!(
                    kind,
                    rail = f.rail,
                    "re-arm message this side never receives; closing the channel"
                );
                self.close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use railover_rdma::handshake::WireGeometry;
    use railover_rdma::{Endpoint, RemoteRegion};

    fn hello(rail: u16, qpn: u32) -> Hello {
        Hello {
            rail_index: rail,
            rail_count: 2,
            endpoint: Endpoint {
                qpn,
                ..Endpoint::default()
            },
            geometry: WireGeometry {
                segment_size: 4096,
                segment_count: 4,
                max_record: 256,
            },
            ring: RemoteRegion {
                addr: 0x1000,
                len: 4096 * 4,
                rkey: 1,
            },
            ctrl: RemoteRegion {
                addr: 0x2000,
                len: 64,
                rkey: 2,
            },
        }
    }

    fn drain(p: &mut RearmProtocol) -> Vec<RearmIo> {
        std::iter::from_fn(|| p.poll()).collect()
    }

    /// An initiator and an acceptor of two rails.
    fn pair() -> (RearmProtocol, RearmProtocol) {
        (
            RearmProtocol::new(Role::Initiator, 2),
            RearmProtocol::new(Role::Acceptor, 2),
        )
    }

    /// The initiator's first exchange, for rail 0 (its queue pair 10): the REQUEST frame.
    fn first_request(i: &mut RearmProtocol) -> [u8; FRAME] {
        i.request(0, 0);
        drain(i);
        i.prepared::<String>(0, 1, Ok(hello(0, 10)), 0);
        frames(&drain(i))[0]
    }

    fn frames(io: &[RearmIo]) -> Vec<[u8; FRAME]> {
        io.iter()
            .filter_map(|i| match i {
                RearmIo::Send(f) => Some(*f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_exchange_installs_on_both_sides() {
        let (mut i, mut a) = pair();
        i.request(1, 0);
        assert_eq!(
            drain(&mut i),
            vec![RearmIo::Prepare {
                rail: 1,
                attempt: 1
            }]
        );
        i.prepared::<String>(1, 1, Ok(hello(1, 10)), 1);
        let req = frames(&drain(&mut i));
        a.on_bytes(&req[0], 2);
        assert_eq!(
            drain(&mut a),
            vec![RearmIo::Prepare {
                rail: 1,
                attempt: 1
            }]
        );
        a.prepared::<String>(1, 1, Ok(hello(1, 20)), 3);
        assert!(
            matches!(drain(&mut a)[..], [RearmIo::Connect { rail: 1, attempt: 1, peer }] if peer.endpoint.qpn == 10)
        );
        a.connected::<String>(1, 1, Ok(()), 4);
        let acc = frames(&drain(&mut a));
        // Split across reads: framing holds.
        i.on_bytes(&acc[0][..7], 5);
        i.on_bytes(&acc[0][7..], 5);
        assert!(
            matches!(drain(&mut i)[..], [RearmIo::Connect { rail: 1, attempt: 1, peer }] if peer.endpoint.qpn == 20)
        );
        i.connected::<String>(1, 1, Ok(()), 6);
        let io = drain(&mut i);
        assert!(matches!(
            io[..],
            [RearmIo::Send(_), RearmIo::Install { rail: 1, .. }]
        ));
        a.on_bytes(&frames(&io)[0], 7);
        assert!(
            matches!(drain(&mut a)[..], [RearmIo::Install { rail: 1, attempt: 1, peer }] if peer.endpoint.qpn == 10)
        );
        assert_eq!((i.completed(), a.completed()), (1, 1));
        assert!(!i.busy() && !a.busy());
    }

    #[test]
    fn a_late_answer_to_a_timed_out_exchange_is_ignored_and_the_retry_completes() {
        let (mut i, mut a) = pair();
        let req1 = first_request(&mut i);
        // The acceptor is slow; the initiator gives up.
        i.handle_timeout(EXCHANGE_TIMEOUT_NS + 1);
        assert_eq!(
            drain(&mut i),
            vec![RearmIo::Abandon {
                rail: 0,
                attempt: 1
            }]
        );
        a.on_bytes(&req1, 1);
        drain(&mut a);
        a.prepared::<String>(0, 1, Ok(hello(0, 20)), 2);
        drain(&mut a);
        a.connected::<String>(0, 1, Ok(()), 3);
        let late_accept = frames(&drain(&mut a));
        // The core asks again: a new exchange (new id) starts.
        i.request(0, EXCHANGE_TIMEOUT_NS + 2);
        drain(&mut i);
        i.prepared::<String>(0, 2, Ok(hello(0, 11)), EXCHANGE_TIMEOUT_NS + 3);
        let req2 = frames(&drain(&mut i));
        // The old ACCEPT arrives now: stale, ignored, the channel stays open.
        i.on_bytes(&late_accept[0], EXCHANGE_TIMEOUT_NS + 4);
        assert!(drain(&mut i).is_empty());
        assert!(!i.is_closed());
        // The acceptor drops its half-done exchange for the new request and both complete.
        a.on_bytes(&req2[0], EXCHANGE_TIMEOUT_NS + 5);
        assert_eq!(
            drain(&mut a),
            vec![
                RearmIo::Abandon {
                    rail: 0,
                    attempt: 1
                },
                RearmIo::Prepare {
                    rail: 0,
                    attempt: 2
                }
            ]
        );
        a.prepared::<String>(0, 2, Ok(hello(0, 21)), EXCHANGE_TIMEOUT_NS + 6);
        drain(&mut a);
        a.connected::<String>(0, 2, Ok(()), EXCHANGE_TIMEOUT_NS + 7);
        i.on_bytes(&frames(&drain(&mut a))[0], EXCHANGE_TIMEOUT_NS + 8);
        assert!(
            matches!(drain(&mut i)[..], [RearmIo::Connect { rail: 0, attempt: 2, peer }] if peer.endpoint.qpn == 21)
        );
        i.connected::<String>(0, 2, Ok(()), EXCHANGE_TIMEOUT_NS + 9);
        let io = drain(&mut i);
        a.on_bytes(&frames(&io)[0], EXCHANGE_TIMEOUT_NS + 10);
        assert!(matches!(
            drain(&mut a)[..],
            [RearmIo::Install { rail: 0, .. }]
        ));
    }

    #[test]
    fn garbage_closes_the_channel_and_declines_what_was_wanted() {
        let mut i = RearmProtocol::new(Role::Initiator, 2);
        i.request(0, 0);
        i.request(1, 0);
        drain(&mut i);
        i.on_bytes(&[9u8; FRAME], 1);
        assert!(i.is_closed());
        assert_eq!(
            drain(&mut i),
            vec![
                RearmIo::Abandon {
                    rail: 0,
                    attempt: 1
                },
                RearmIo::Decline { rail: 1 }
            ]
        );
        i.request(0, 2);
        assert_eq!(drain(&mut i), vec![RearmIo::Decline { rail: 0 }]);
    }

    #[test]
    fn the_acceptor_never_starts_and_refuses_what_it_cannot_prepare() {
        let (mut i, mut a) = pair();
        a.request(1, 0);
        assert_eq!(drain(&mut a), vec![RearmIo::Decline { rail: 1 }]);
        i.request(1, 0);
        drain(&mut i);
        i.prepared::<String>(1, 1, Ok(hello(1, 10)), 0);
        a.on_bytes(&frames(&drain(&mut i))[0], 1);
        drain(&mut a);
        a.prepared::<&str>(1, 1, Err("card still down"), 2);
        let io = drain(&mut a);
        assert!(matches!(
            io[..],
            [
                RearmIo::Send(_),
                RearmIo::Abandon {
                    rail: 1,
                    attempt: 1
                }
            ]
        ));
        i.on_bytes(&frames(&io)[0], 3);
        assert_eq!(
            drain(&mut i),
            vec![RearmIo::Abandon {
                rail: 1,
                attempt: 1
            }]
        );
        assert!(!i.is_closed() && !a.is_closed());
    }

    /// A request that supersedes one not yet carried out (both read at once, as after the
    /// acceptor was paused past the initiator's time-out): the queue pair made for the first
    /// must not be answered with, or connected, for the second. It was, before attempts were
    /// numbered: the ACCEPT named one queue pair, another was connected and installed, and the
    /// rail failed with retry-exceeded as soon as it carried a write.
    #[test]
    fn a_superseded_request_never_lends_its_queue_pair_to_the_next() {
        let (mut i, mut a) = pair();
        let req1 = first_request(&mut i);
        i.handle_timeout(EXCHANGE_TIMEOUT_NS + 1);
        drain(&mut i);
        i.request(0, EXCHANGE_TIMEOUT_NS + 2);
        drain(&mut i);
        i.prepared::<String>(0, 2, Ok(hello(0, 11)), EXCHANGE_TIMEOUT_NS + 2);
        let req2 = frames(&drain(&mut i));
        let both: Vec<u8> = [req1, req2[0]].concat();
        a.on_bytes(&both, EXCHANGE_TIMEOUT_NS + 3);
        // Carried out in order, as an executor does: each Prepare makes a new queue pair.
        let mut qpn = 20;
        let mut made = Vec::new();
        let mut answer = None;
        while let Some(io) = a.poll() {
            match io {
                RearmIo::Prepare { rail, attempt } => {
                    made.push((attempt, qpn));
                    a.prepared::<String>(rail, attempt, Ok(hello(0, qpn)), EXCHANGE_TIMEOUT_NS + 4);
                    qpn += 1;
                }
                RearmIo::Connect {
                    rail,
                    attempt,
                    peer,
                } => {
                    assert_eq!(
                        peer.endpoint.qpn, 11,
                        "connected to the live request's queue pair"
                    );
                    let ours = made.iter().find(|(a, _)| *a == attempt).unwrap().1;
                    answer = Some(ours);
                    a.connected::<String>(rail, attempt, Ok(()), EXCHANGE_TIMEOUT_NS + 5);
                }
                RearmIo::Send(frame) => {
                    let accept = Hello::decode(&frame[4..]).unwrap();
                    assert_eq!(
                        Some(accept.endpoint.qpn),
                        answer,
                        "the ACCEPT names the queue pair that was connected"
                    );
                }
                RearmIo::Abandon { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(answer, Some(21));
    }
}
