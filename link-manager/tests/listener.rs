//! The verbs listener against hostile and broken clients (no RDMA needed: the cards it is given
//! do not exist, so a client that gets through the greeting ends in a typed fabric error; one
//! that held the listener up would end in a time-out instead).
#![cfg(feature = "verbs")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use railover::verbs::accept;
use railover::{Config, ConnectError};
use railover_rdma::handshake::{greet_as_client, Greeting, HandshakeError, WireGeometry};

fn config() -> Config {
    Config::builder().geometry(4096, 8, 256).build().unwrap()
}

fn greeting(cfg: &Config) -> Greeting {
    let g = cfg.geometry();
    Greeting::new(
        cfg.rails() as u16,
        WireGeometry {
            segment_size: g.segment_size() as u32,
            segment_count: g.segment_count() as u32,
            max_record: g.max_record() as u32,
        },
    )
}

/// Whatever the listener sent this client (waiting at most `wait` for more).
fn received(mut s: TcpStream, wait: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return got, // nothing more within `wait`
        }
    }
}

#[test]
fn silent_and_hostile_clients_neither_hold_up_a_good_one_nor_learn_anything() {
    let cfg = config();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Queued before the good client, in the order a listener would meet them.
    let silent = TcpStream::connect(addr).unwrap();
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0x5a; 200]).unwrap();
    let mut wrong_geometry = TcpStream::connect(addr).unwrap();
    let mut other = greeting(&Config::builder().geometry(8192, 8, 256).build().unwrap());
    other.rails = cfg.rails() as u16;
    wrong_geometry.write_all(&other.encode()).unwrap();
    let good = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let answer = greet_as_client(&mut s, &greeting(&config()), Duration::from_secs(30));
        (answer, s)
    });
    // The listener's cards don't exist: the good client gets through the greeting, then the
    // set-up fails opening them. A listener held up by the silent client would time out.
    let err = accept(
        cfg,
        &["no_such_card_a", "no_such_card_b"],
        &listener,
        Duration::from_secs(30),
    )
    .err()
    .expect("no cards: no connection");
    assert!(
        matches!(err, ConnectError::Fabric(_)),
        "the good client was greeted, then the cards failed: {err}"
    );
    let (answer, good_stream) = good.join().unwrap();
    let answer = answer.expect("the good client was answered");
    assert_ne!(answer.echo, 0);
    // After its greeting the good client learns nothing more (the listener never got as far
    // as sending a hello).
    assert!(received(good_stream, Duration::from_secs(5)).is_empty());
    // The refused clients were sent nothing at all.
    assert!(received(garbage, Duration::from_secs(5)).is_empty());
    assert!(received(wrong_geometry, Duration::from_secs(5)).is_empty());
    assert!(received(silent, Duration::from_millis(200)).is_empty());
}

#[test]
fn a_listener_with_no_good_client_times_out_with_a_typed_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let err = accept(
        config(),
        &["no_such_card_a", "no_such_card_b"],
        &listener,
        Duration::from_millis(300),
    )
    .err()
    .expect("nobody to connect to");
    assert!(
        matches!(err, ConnectError::Handshake(HandshakeError::Timeout(_))),
        "{err}"
    );
}
