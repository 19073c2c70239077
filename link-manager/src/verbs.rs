//! Connecting over real RDMA devices (cargo feature `verbs`): open one card per rail, exchange one
//! handshake per rail over TCP, connect the queue pairs; the TCP stream then carries re-arms
//! ([`crate::rearm`]).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use railover_rdma::handshake::{self, Hello};
use railover_rdma::verbs::VerbsNic;

use crate::config::Config;
use crate::rearm::Role;
use crate::runtime::{ConnectError, Connection, PendingConnection, RealClock};

pub type VerbsConnection = Connection<VerbsNic, RealClock>;

fn open_cards(devices: &[&str]) -> Result<Vec<VerbsNic>, ConnectError> {
    devices
        .iter()
        .map(|d| VerbsNic::open(d).map_err(ConnectError::from))
        .collect()
}

fn handshake(
    cfg: Config,
    devices: &[&str],
    mut stream: TcpStream,
    timeout: Duration,
    role: Role,
) -> Result<VerbsConnection, ConnectError> {
    let pending = PendingConnection::new(cfg, open_cards(devices)?, RealClock::default())?;
    let mut peer = Vec::with_capacity(devices.len());
    for hello in pending.hellos() {
        peer.push(handshake::exchange(&mut stream, hello, timeout)?);
    }
    let mut conn = pending.connect_links(&peer)?;
    // Barrier: neither side writes before both sides' queue pairs are ready to receive (a write to
    // a queue pair still in INIT is dropped and would end in a retry-exceeded error).
    handshake::barrier(&mut stream, timeout)?;
    // The stream stays: failed rails are re-armed over it (the dialling side initiates).
    conn.attach_control_thread(stream, role)
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
    let stream = handshake::connect(peer, timeout)?;
    handshake(cfg, devices, stream, timeout, Role::Initiator)
}

/// Host side that listens.
pub fn accept(
    cfg: Config,
    devices: &[&str],
    listener: &TcpListener,
    timeout: Duration,
) -> Result<VerbsConnection, ConnectError> {
    let stream = handshake::accept(listener, timeout)?;
    handshake(cfg, devices, stream, timeout, Role::Acceptor)
}

/// Exchanges hellos for a re-arm of one rail over an established TCP stream (both sides call it).
pub fn exchange_hello(
    stream: &mut TcpStream,
    ours: &Hello,
    timeout: Duration,
) -> Result<Hello, ConnectError> {
    Ok(handshake::exchange(stream, ours, timeout)?)
}
