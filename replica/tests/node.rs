//! One replica's state machine, message by message: the session manager's exactly-once answers,
//! synchronous holding, what happens on a backup's loss, the verification engine, and a buggy or
//! hostile peer.

use std::cell::Cell;

use railover_replica::node::{
    Action, BackupLoss, DivergenceKind, Node, NodeConfig, NodeEvent, PromoteError, RefusedWhy,
    ReplicationMode, Role,
};
use railover_replica::service::{Ctx, NoExternal, ReplayMismatch, RestoreError, Service};
use railover_replica::wire::{Msg, RefusedRequest, Request};

/// Counts requests; replies with the count and a random number (from its context).
#[derive(Default)]
struct Counter(u64);

impl Service for Counter {
    fn apply(&mut self, ctx: &mut Ctx<'_>, _client: u64, request: &[u8]) -> Vec<u8> {
        self.0 += 1;
        let mut reply = self.0.to_le_bytes().to_vec();
        reply.extend_from_slice(&ctx.random().to_le_bytes());
        reply.extend_from_slice(request);
        reply
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }
    fn restore(s: &[u8]) -> Result<Self, RestoreError> {
        let b: [u8; 8] = s.try_into().map_err(|_| RestoreError("8 bytes".into()))?;
        Ok(Counter(u64::from_le_bytes(b)))
    }
}

fn request(client: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    Msg::Request(Request {
        client,
        session: 0,
        seq,
        answered_below: 1, // the client has no reply yet
        body: body.to_vec(),
    })
    .encode()
}

fn cfg(mode: ReplicationMode, backup_loss: BackupLoss) -> NodeConfig {
    NodeConfig {
        mode,
        backup_loss,
        snapshot_chunk: 4,
        max_request: 64,
    }
}

/// Moves every replication message between the two until neither has anything to say; returns
/// the replies the primary released (seq, body).
fn exchange<S: Service>(
    p: &mut Node<S, NoExternal>,
    b: &mut Node<S, NoExternal>,
) -> Vec<(u64, Vec<u8>)> {
    let mut replies = Vec::new();
    loop {
        let mut moved = false;
        while let Some(a) = p.pop_action() {
            moved = true;
            match a {
                Action::ToBackup(m) => b.on_replication(&m),
                Action::ToClient { msg, .. } => match Msg::decode(&msg).unwrap() {
                    Msg::Reply {
                        client, seq, body, ..
                    } => {
                        assert_eq!(client, 7, "every request here is client 7's");
                        replies.push((seq, body))
                    }
                    m => panic!("{m:?}"),
                },
                Action::ToPrimary(_) => unreachable!(),
            }
        }
        while let Some(a) = b.pop_action() {
            moved = true;
            match a {
                Action::ToPrimary(m) => p.on_replication(&m),
                a => panic!("backup sent {a:?}"),
            }
        }
        if !moved {
            return replies;
        }
    }
}

fn pair(
    mode: ReplicationMode,
    loss: BackupLoss,
) -> (Node<Counter, NoExternal>, Node<Counter, NoExternal>) {
    let mut p = Node::primary(cfg(mode, loss), Counter::default(), NoExternal, 1);
    let mut b = Node::joining(cfg(mode, loss), NoExternal, 2);
    p.attach_backup().unwrap();
    assert!(exchange(&mut p, &mut b).is_empty());
    assert!(p.backup_live());
    assert_eq!(p.poll_event(), Some(NodeEvent::BackupSynced { index: 0 }));
    assert_eq!(b.role(), Role::Backup);
    (p, b)
}

#[test]
fn a_synchronous_reply_waits_for_the_backup_and_a_resend_is_answered_from_the_records() {
    let (mut p, mut b) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    p.on_client(&request(7, 1, b"x"), 0);
    let entry = match p.pop_action() {
        Some(Action::ToBackup(m)) => m,
        a => panic!("the entry goes first: {a:?}"),
    };
    assert_eq!(p.pop_action(), None, "the reply waits for the backup");
    assert_eq!(p.held(), 1);
    // A resend while held: nothing now (the reply leaves once), nothing applied twice.
    p.on_client(&request(7, 1, b"x"), 0);
    assert_eq!(p.pop_action(), None);
    b.on_replication(&entry);
    let replies = exchange(&mut p, &mut b);
    assert_eq!(replies.len(), 1);
    assert_eq!(p.applied(), 1);
    // Resent after the reply: the same bytes, from the records, still applied once.
    p.on_client(&request(7, 1, b"x"), 0);
    let again = exchange(&mut p, &mut b);
    assert_eq!(again, replies);
    assert_eq!((p.applied(), b.applied()), (1, 1));
    assert_eq!(p.encode_state(), b.encode_state());
    // The promoted backup answers it the same way too.
    b.promote().unwrap();
    b.on_client(&request(7, 1, b"x"), 0);
    match b.pop_action() {
        Some(Action::ToClient { msg, .. }) => assert_eq!(
            Msg::decode(&msg).unwrap(),
            Msg::Reply {
                client: 7,
                session: 0,
                seq: 1,
                body: replies[0].1.clone()
            }
        ),
        a => panic!("{a:?}"),
    }
}

#[test]
fn a_request_ahead_of_an_unanswered_one_is_sent_back_not_applied() {
    let (mut p, _b) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    p.on_client(&request(7, 3, b"x"), 0);
    match p.pop_action() {
        Some(Action::ToClient { msg, .. }) => {
            assert_eq!(
                Msg::decode(&msg).unwrap(),
                Msg::OutOfOrder {
                    client: 7,
                    session: 0,
                    expected: 1
                }
            )
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(p.applied(), 0);
}

#[test]
fn losing_the_backup_stalls_or_continues_as_configured() {
    for loss in [BackupLoss::Stall, BackupLoss::ContinueSolo] {
        let (mut p, _b) = pair(ReplicationMode::Sync, loss);
        p.on_client(&request(7, 1, b"x"), 0);
        assert!(matches!(p.pop_action(), Some(Action::ToBackup(_))));
        p.backup_lost();
        assert_eq!(p.poll_event(), Some(NodeEvent::BackupLost { held: 1 }));
        p.on_client(&request(7, 2, b"y"), 0);
        let sent: Vec<Action> = std::iter::from_fn(|| p.pop_action()).collect();
        let decoded = |a: &Action| match a {
            Action::ToClient { msg, .. } => Msg::decode(msg).unwrap(),
            a => panic!("{a:?}"),
        };
        match loss {
            BackupLoss::Stall => {
                // Nothing held leaves, nothing new is applied: the client is sent elsewhere.
                assert_eq!(
                    sent.iter().map(decoded).collect::<Vec<_>>(),
                    [Msg::NotPrimary]
                );
                assert!(p.stalled());
                assert_eq!((p.applied(), p.held()), (1, 1));
                // A new backup joins: its snapshot holds request 1, its ack releases it; the
                // resent request 2 is applied and answered after its own ack.
                let mut b2 = Node::joining(cfg(ReplicationMode::Sync, loss), NoExternal, 3);
                p.attach_backup().unwrap();
                let replies = exchange(&mut p, &mut b2);
                assert_eq!(replies.iter().map(|r| r.0).collect::<Vec<_>>(), [1]);
                p.on_client(&request(7, 2, b"y"), 0);
                let replies = exchange(&mut p, &mut b2);
                assert_eq!(replies.iter().map(|r| r.0).collect::<Vec<_>>(), [2]);
                assert_eq!(p.encode_state(), b2.encode_state());
            }
            BackupLoss::ContinueSolo => assert_eq!(sent.len(), 2, "both replies leave"),
        }
    }
}

thread_local! {
    /// State outside the service (per test thread: tests run in parallel).
    static OUTSIDE: Cell<u64> = const { Cell::new(0) };
}

fn set_outside(n: u64) {
    OUTSIDE.with(|c| c.set(n));
}

/// Reads a counter outside its context: not deterministic.
struct Leaky;

impl Service for Leaky {
    fn apply(&mut self, ctx: &mut Ctx<'_>, _client: u64, _request: &[u8]) -> Vec<u8> {
        let n = OUTSIDE.with(|c| c.replace(c.get() + 1));
        if n % 2 == 0 {
            ctx.now(); // the primary (even call) asks for the time, the backup does not
        }
        n.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(_: &[u8]) -> Result<Self, RestoreError> {
        Ok(Leaky)
    }
}

/// A synced primary and backup of the [`Leaky`] service.
fn leaky_pair() -> (Node<Leaky, NoExternal>, Node<Leaky, NoExternal>) {
    let c = cfg(ReplicationMode::Sync, BackupLoss::Stall);
    let mut p = Node::primary(c, Leaky, NoExternal, 1);
    let mut b = Node::<Leaky, _>::joining(c, NoExternal, 2);
    p.attach_backup().unwrap();
    exchange(&mut p, &mut b);
    (p, b)
}

#[test]
fn the_verification_engine_reports_a_service_that_is_not_deterministic() {
    let (mut p, mut b) = leaky_pair();
    set_outside(0);
    p.on_client(&request(1, 1, b""), 5); // primary: n = 0, asks for the time
    exchange(&mut p, &mut b); // backup: n = 1, does not
    match b.poll_event() {
        Some(NodeEvent::Divergence {
            index: 1,
            kind:
                DivergenceKind::Replay(ReplayMismatch::Unused {
                    used: 0,
                    recorded: 1,
                }),
            ..
        }) => {}
        e => panic!("{e:?}"),
    }
    p.on_client(&request(1, 2, b""), 5); // primary: n = 2 asks; backup: n = 3 does not
    exchange(&mut p, &mut b);
    assert!(matches!(
        b.poll_event(),
        Some(NodeEvent::Divergence { index: 2, .. })
    ));
    set_outside(1); // now neither asks, but the replies differ
    p.on_client(&request(1, 3, b""), 5);
    set_outside(3);
    exchange(&mut p, &mut b);
    assert!(matches!(
        b.poll_event(),
        Some(NodeEvent::Divergence {
            index: 3,
            kind: DivergenceKind::Digest { .. },
            ..
        })
    ));
}

#[test]
fn a_buggy_or_hostile_peer_is_refused_and_nothing_applied_is_lost() {
    let (mut p, mut b) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    p.on_client(&request(7, 1, b"x"), 0);
    let Some(Action::ToBackup(entry)) = p.pop_action() else {
        panic!("entry")
    };
    // The same entry twice, garbage, a message the role does not take.
    b.on_replication(&entry);
    b.on_replication(&entry);
    assert!(matches!(
        b.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::OutOfOrder {
                expected: 2,
                got: 1
            },
            ..
        })
    ));
    b.on_replication(&[1, 2, 3]);
    assert!(matches!(
        b.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::Decode(_),
            ..
        })
    ));
    b.on_replication(
        &Msg::Ack {
            epoch: 1,
            applied: 1,
        }
        .encode(),
    );
    assert!(matches!(
        b.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::Unexpected,
            ..
        })
    ));
    assert_eq!(b.applied(), 1);
    // An acknowledgement of entries the primary never made.
    p.on_replication(
        &Msg::Ack {
            epoch: 1,
            applied: 9,
        }
        .encode(),
    );
    assert!(matches!(
        p.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::AckBeyondLog {
                acked: 9,
                applied: 1
            },
            ..
        })
    ));
    assert_eq!(
        p.held(),
        1,
        "the reply still waits for a real acknowledgement"
    );
    exchange(&mut p, &mut b);
    assert_eq!(p.held(), 0);
    // A snapshot that does not decode leaves the joiner joining.
    let mut j =
        Node::<Counter, _>::joining(cfg(ReplicationMode::Sync, BackupLoss::Stall), NoExternal, 3);
    j.on_replication(
        &Msg::Snapshot(railover_replica::wire::SnapshotChunk {
            epoch: 1,
            index: 0,
            total: 3,
            offset: 0,
            bytes: vec![1, 2, 3],
        })
        .encode(),
    );
    assert!(matches!(
        j.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::Snapshot(_),
            ..
        })
    ));
    assert_eq!(j.role(), Role::Joining);
    assert_eq!(j.promote(), Err(PromoteError::NotSynced));
    assert_eq!(p.promote(), Err(PromoteError::AlreadyPrimary));
    // A client's garbage is refused too; a backup refuses requests.
    p.on_client(&[0xff; 3], 0);
    assert!(matches!(
        p.poll_event(),
        Some(NodeEvent::Refused {
            error: RefusedWhy::Decode(_),
            ..
        })
    ));
    b.on_client(&request(7, 2, b"y"), 0);
    match b.pop_action() {
        Some(Action::ToClient { msg, .. }) => {
            assert_eq!(Msg::decode(&msg).unwrap(), Msg::NotPrimary)
        }
        a => panic!("{a:?}"),
    }
}

#[test]
fn requests_it_cannot_take_are_refused_with_a_reason_and_never_applied() {
    let (mut p, _b) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    let refused = |p: &mut Node<Counter, NoExternal>| match p.pop_action() {
        Some(Action::ToClient { msg, .. }) => match Msg::decode(&msg).unwrap() {
            Msg::Refused { why, .. } => why,
            m => panic!("{m:?}"),
        },
        a => panic!("{a:?}"),
    };
    p.on_client(&request(7, 1, &[0; 65]), 0); // max_request is 64
    assert_eq!(refused(&mut p), RefusedRequest::TooLarge);
    for (seq, answered_below) in [(0, 0), (u64::MAX, 1), (3, 5)] {
        let msg = Msg::Request(Request {
            client: 7,
            session: 0,
            seq,
            answered_below,
            body: vec![],
        });
        p.on_client(&msg.encode(), 0);
        assert_eq!(refused(&mut p), RefusedRequest::BadSequence, "seq {seq}");
    }
    assert_eq!(p.applied(), 0);
    // The sequence is untouched: request 1 is still the next.
    p.on_client(&request(7, 1, b"ok"), 0);
    assert!(matches!(p.pop_action(), Some(Action::ToBackup(_))));
    assert_eq!(p.applied(), 1);
}

#[test]
fn a_diverged_backup_acknowledges_nothing_more_and_cannot_take_over() {
    let (mut p, mut b) = leaky_pair();
    set_outside(1);
    p.on_client(&request(1, 1, b""), 5);
    set_outside(3);
    let released = exchange(&mut p, &mut b);
    assert!(b.diverged());
    assert!(
        released.is_empty(),
        "the primary holds the reply the backup disagrees with"
    );
    assert_eq!(p.held(), 1);
    assert_eq!(b.promote(), Err(PromoteError::Diverged));
}

/// Answers with the time it is given.
struct Clocked;

impl Service for Clocked {
    fn apply(&mut self, ctx: &mut Ctx<'_>, _client: u64, _request: &[u8]) -> Vec<u8> {
        ctx.now().to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(_: &[u8]) -> Result<Self, RestoreError> {
        Ok(Clocked)
    }
}

#[test]
fn the_time_a_service_sees_never_goes_back_across_a_takeover() {
    let c = cfg(ReplicationMode::Sync, BackupLoss::Stall);
    let mut p = Node::primary(c, Clocked, NoExternal, 1);
    let mut b = Node::<Clocked, _>::joining(c, NoExternal, 2);
    p.attach_backup().unwrap();
    exchange(&mut p, &mut b);
    p.on_client(&request(7, 1, b""), 1_000);
    exchange(&mut p, &mut b);
    b.promote().unwrap();
    // The new primary's clock is behind the old one's.
    b.on_client(&request(7, 2, b""), 400);
    match b.pop_action() {
        Some(Action::ToClient { msg, .. }) => match Msg::decode(&msg).unwrap() {
            Msg::Reply { body, .. } => {
                assert_eq!(u64::from_le_bytes(body.try_into().unwrap()), 1_000)
            }
            m => panic!("{m:?}"),
        },
        a => panic!("{a:?}"),
    }
}

#[test]
fn an_earlier_backups_acknowledgement_releases_nothing_for_the_new_one() {
    let (mut p, mut b1) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    p.on_client(&request(7, 1, b"x"), 0);
    let Some(Action::ToBackup(entry)) = p.pop_action() else {
        panic!("entry")
    };
    b1.on_replication(&entry);
    let Some(Action::ToPrimary(stale_ack)) = b1.pop_action() else {
        panic!("ack")
    };
    // The first backup's connection ends before its ack arrives; a new backup is attached, its
    // snapshot (holding entry 1) on the way.
    p.backup_lost();
    let _ = p.poll_event();
    p.attach_backup().unwrap();
    let snapshot: Vec<Action> = std::iter::from_fn(|| p.pop_action()).collect();
    // Taken for the new backup's, the old ack would release reply 1 while only the primary has
    // it (the new backup has no state yet: the primary's loss now would lose the reply's entry).
    p.on_replication(&stale_ack);
    assert_eq!(p.held(), 1, "the old backup's ack is not the new one's");
    assert!(!p.backup_live());
    assert_eq!(p.pop_action(), None);
    let mut b2 = Node::joining(cfg(ReplicationMode::Sync, BackupLoss::Stall), NoExternal, 3);
    for a in snapshot {
        let Action::ToBackup(m) = a else {
            panic!("{a:?}")
        };
        b2.on_replication(&m);
    }
    let replies = exchange(&mut p, &mut b2);
    assert_eq!(replies.iter().map(|r| r.0).collect::<Vec<_>>(), [1]);
    assert!(p.backup_live());
}

#[test]
fn a_restarted_client_starts_a_new_session_and_is_never_answered_from_the_old_one() {
    let (mut p, mut b) = pair(ReplicationMode::Sync, BackupLoss::Stall);
    let req = |session, seq, body: &[u8]| {
        Msg::Request(Request {
            client: 7,
            session,
            seq,
            answered_below: 1,
            body: body.to_vec(),
        })
        .encode()
    };
    p.on_client(&req(100, 1, b"old"), 0);
    p.on_client(&req(100, 2, b"old"), 0);
    let old = exchange(&mut p, &mut b);
    assert_eq!(old.len(), 2);
    // The client process restarts with the same id and a new session: its request 1 is applied,
    // not answered with the old run's reply 1.
    p.on_client(&req(200, 1, b"new"), 0);
    let new = exchange(&mut p, &mut b);
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].1, old[0].1);
    assert_eq!(p.applied(), 3);
    // A late request of the old run is refused, never applied, even its first.
    p.on_client(&req(100, 3, b"late"), 0);
    p.on_client(&req(100, 1, b"late"), 0);
    match p.pop_action() {
        Some(Action::ToClient { msg, .. }) => assert!(matches!(
            Msg::decode(&msg).unwrap(),
            Msg::Refused {
                why: RefusedRequest::StaleSession,
                ..
            }
        )),
        a => panic!("{a:?}"),
    }
    assert!(matches!(p.pop_action(), Some(Action::ToClient { .. })));
    assert_eq!(p.applied(), 3);
    assert_eq!(p.encode_state(), b.encode_state());
}
