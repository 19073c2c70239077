//! The replication protocol's messages and their encoding.
//!
//! Every message is `version: u8 | tag: u8 | fields`, little-endian; byte strings are a `u32`
//! length and the bytes. Decoding checks every length against what is left, so a hostile or buggy
//! peer gets a [`DecodeError`], never a panic or an allocation it chose.

/// Protocol version; a message with another is refused ([`DecodeError::Version`]).
pub const VERSION: u8 = 1;

/// Largest state a joining backup takes (a snapshot announcing more is refused before anything
/// is allocated for it).
pub const MAX_SNAPSHOT: u32 = 1 << 30;

/// One request of a client, with the client's own sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub client: u64,
    /// Which run of the client process this is (larger for each later run: its start time, say):
    /// a restarted client with the same id starts a new session at sequence 1 instead of being
    /// answered from the old session's records.
    pub session: u64,
    pub seq: u64,
    /// Every request of this client below this sequence number has been answered: the servers
    /// may forget their replies.
    pub answered_below: u64,
    pub body: Vec<u8>,
}

/// What the service used that was not determined by its input, recorded by the primary so the
/// backup replays exactly it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Time(u64),
    Random(u64),
    /// An external call's result; `call_digest` (crc32c of the call) lets the backup check that
    /// it asks the same question.
    External {
        call_digest: u32,
        result: Vec<u8>,
    },
}

/// One input of the log as the primary applied it: what the backup applies in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the input log, from 1, without gaps.
    pub index: u64,
    pub client: u64,
    pub session: u64,
    pub seq: u64,
    pub answered_below: u64,
    pub recorded: Vec<Recorded>,
    /// crc32c of the reply the primary's service produced (checked by the backup).
    pub digest: u32,
    pub body: Vec<u8>,
}

/// A piece of the primary's state (service snapshot and sessions) for a joining backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// Which attachment of a backup this transfer belongs to: the backup's acknowledgements
    /// carry it back, so the primary never takes an earlier backup's for this one's.
    pub epoch: u64,
    /// The state is the one after applying entry `index`.
    pub index: u64,
    pub total: u32,
    pub offset: u32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Client to server.
    Request(Request),
    /// Server to client: the reply to request `seq` of `client` (the client checks both: a
    /// reply is never taken for another client's).
    Reply {
        client: u64,
        session: u64,
        seq: u64,
        body: Vec<u8>,
    },
    /// Server to client: this server is a backup; ask the other one.
    NotPrimary,
    /// Server to client: a request arrived before an earlier one still unanswered (sent while
    /// this server was a backup, say): resend from `expected`.
    OutOfOrder {
        client: u64,
        session: u64,
        expected: u64,
    },
    /// Server to client: request `seq` is refused and will never be applied (see
    /// [`RefusedRequest`]).
    Refused {
        client: u64,
        session: u64,
        seq: u64,
        why: RefusedRequest,
    },
    /// Primary to backup.
    Entry(Entry),
    /// Primary to a joining backup.
    Snapshot(SnapshotChunk),
    /// Backup to primary: every entry up to `applied` is applied (and its reply recorded), by
    /// the backup attached in `epoch` (its snapshot's).
    Ack { epoch: u64, applied: u64 },
}

/// Why a server refused a request (it is not applied, now or later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedRequest {
    /// The body exceeds the server's largest request.
    TooLarge,
    /// A sequence number the server can't take (`u64::MAX`, or an `answered_below` past it).
    BadSequence,
    /// The client id is in use on another live connection.
    ClientIdInUse,
    /// A request of an earlier run of the client than the servers' current one.
    StaleSession,
}

impl RefusedRequest {
    fn code(self) -> u8 {
        match self {
            RefusedRequest::TooLarge => 1,
            RefusedRequest::BadSequence => 2,
            RefusedRequest::ClientIdInUse => 3,
            RefusedRequest::StaleSession => 4,
        }
    }
    fn of(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            1 => RefusedRequest::TooLarge,
            2 => RefusedRequest::BadSequence,
            3 => RefusedRequest::ClientIdInUse,
            4 => RefusedRequest::StaleSession,
            c => return Err(DecodeError::UnknownRefusal(c)),
        })
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("protocol version {got}, expected {VERSION}")]
    Version { got: u8 },
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("unknown recorded value kind {0}")]
    UnknownRecorded(u8),
    #[error("unknown refusal reason {0}")]
    UnknownRefusal(u8),
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("snapshot chunk at {offset} of {len} bytes runs past its total {total} (or the total past the largest snapshot)")]
    ChunkBounds { offset: u32, len: usize, total: u32 },
}

const TAG_REQUEST: u8 = 1;
const TAG_REPLY: u8 = 2;
const TAG_NOT_PRIMARY: u8 = 3;
const TAG_ENTRY: u8 = 4;
const TAG_SNAPSHOT: u8 = 5;
const TAG_ACK: u8 = 6;
const TAG_OUT_OF_ORDER: u8 = 7;
const TAG_REFUSED: u8 = 8;

const REC_TIME: u8 = 1;
const REC_RANDOM: u8 = 2;
const REC_EXTERNAL: u8 = 3;

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.u8(VERSION);
        match self {
            Msg::Request(r) => {
                w.u8(TAG_REQUEST);
                w.u64(r.client);
                w.u64(r.session);
                w.u64(r.seq);
                w.u64(r.answered_below);
                w.bytes(&r.body);
            }
            Msg::Reply {
                client,
                session,
                seq,
                body,
            } => {
                w.u8(TAG_REPLY);
                w.u64(*client);
                w.u64(*session);
                w.u64(*seq);
                w.bytes(body);
            }
            Msg::NotPrimary => w.u8(TAG_NOT_PRIMARY),
            Msg::OutOfOrder {
                client,
                session,
                expected,
            } => {
                w.u8(TAG_OUT_OF_ORDER);
                w.u64(*client);
                w.u64(*session);
                w.u64(*expected);
            }
            Msg::Refused {
                client,
                session,
                seq,
                why,
            } => {
                w.u8(TAG_REFUSED);
                w.u64(*client);
                w.u64(*session);
                w.u64(*seq);
                w.u8(why.code());
            }
            Msg::Entry(e) => {
                w.u8(TAG_ENTRY);
                w.u64(e.index);
                w.u64(e.client);
                w.u64(e.session);
                w.u64(e.seq);
                w.u64(e.answered_below);
                w.u32(e.digest);
                w.u32(e.recorded.len() as u32);
                for r in &e.recorded {
                    match r {
                        Recorded::Time(t) => {
                            w.u8(REC_TIME);
                            w.u64(*t);
                        }
                        Recorded::Random(x) => {
                            w.u8(REC_RANDOM);
                            w.u64(*x);
                        }
                        Recorded::External {
                            call_digest,
                            result,
                        } => {
                            w.u8(REC_EXTERNAL);
                            w.u32(*call_digest);
                            w.bytes(result);
                        }
                    }
                }
                w.bytes(&e.body);
            }
            Msg::Snapshot(c) => {
                w.u8(TAG_SNAPSHOT);
                w.u64(c.epoch);
                w.u64(c.index);
                w.u32(c.total);
                w.u32(c.offset);
                w.bytes(&c.bytes);
            }
            Msg::Ack { epoch, applied } => {
                w.u8(TAG_ACK);
                w.u64(*epoch);
                w.u64(*applied);
            }
        }
        w.0
    }

    pub fn decode(buf: &[u8]) -> Result<Msg, DecodeError> {
        let mut r = Reader(buf);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version { got: version });
        }
        let msg = match r.u8()? {
            TAG_REQUEST => Msg::Request(Request {
                client: r.u64()?,
                session: r.u64()?,
                seq: r.u64()?,
                answered_below: r.u64()?,
                body: r.bytes()?,
            }),
            TAG_REPLY => Msg::Reply {
                client: r.u64()?,
                session: r.u64()?,
                seq: r.u64()?,
                body: r.bytes()?,
            },
            TAG_NOT_PRIMARY => Msg::NotPrimary,
            TAG_OUT_OF_ORDER => Msg::OutOfOrder {
                client: r.u64()?,
                session: r.u64()?,
                expected: r.u64()?,
            },
            TAG_REFUSED => Msg::Refused {
                client: r.u64()?,
                session: r.u64()?,
                seq: r.u64()?,
                why: RefusedRequest::of(r.u8()?)?,
            },
            TAG_ENTRY => {
                let (index, client, session) = (r.u64()?, r.u64()?, r.u64()?);
                let (seq, answered_below) = (r.u64()?, r.u64()?);
                let digest = r.u32()?;
                let count = r.u32()? as usize;
                // Each recorded value takes at least 5 bytes: a count beyond that is a lie.
                r.need(count.saturating_mul(5))?;
                let mut recorded = Vec::with_capacity(count);
                for _ in 0..count {
                    recorded.push(match r.u8()? {
                        REC_TIME => Recorded::Time(r.u64()?),
                        REC_RANDOM => Recorded::Random(r.u64()?),
                        REC_EXTERNAL => Recorded::External {
                            call_digest: r.u32()?,
                            result: r.bytes()?,
                        },
                        k => return Err(DecodeError::UnknownRecorded(k)),
                    });
                }
                Msg::Entry(Entry {
                    index,
                    client,
                    session,
                    seq,
                    answered_below,
                    recorded,
                    digest,
                    body: r.bytes()?,
                })
            }
            TAG_SNAPSHOT => {
                let (epoch, index, total, offset) = (r.u64()?, r.u64()?, r.u32()?, r.u32()?);
                let bytes = r.bytes()?;
                if total > MAX_SNAPSHOT || offset as u64 + bytes.len() as u64 > total as u64 {
                    return Err(DecodeError::ChunkBounds {
                        offset,
                        len: bytes.len(),
                        total,
                    });
                }
                Msg::Snapshot(SnapshotChunk {
                    epoch,
                    index,
                    total,
                    offset,
                    bytes,
                })
            }
            TAG_ACK => Msg::Ack {
                epoch: r.u64()?,
                applied: r.u64()?,
            },
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        match r.0.len() {
            0 => Ok(msg),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends little-endian fields (also used for snapshots).
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// Reads little-endian fields, refusing to read past the end.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        match n.checked_sub(self.0.len()) {
            Some(needed) if needed > 0 => Err(DecodeError::Truncated { needed }),
            _ => Ok(()),
        }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("split at N"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head.to_vec())
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Request(Request {
                client: 7,
                session: 11,
                seq: 3,
                answered_below: 2,
                body: b"buy".to_vec(),
            }),
            Msg::Reply {
                client: 7,
                session: 11,
                seq: 3,
                body: vec![1, 2, 3],
            },
            Msg::NotPrimary,
            Msg::OutOfOrder {
                client: 7,
                session: 11,
                expected: 4,
            },
            Msg::Refused {
                client: 7,
                session: 11,
                seq: 5,
                why: RefusedRequest::TooLarge,
            },
            Msg::Entry(Entry {
                index: 9,
                client: 7,
                session: 11,
                seq: 3,
                answered_below: 2,
                recorded: vec![
                    Recorded::Time(5),
                    Recorded::Random(6),
                    Recorded::External {
                        call_digest: 0xdead,
                        result: b"ok".to_vec(),
                    },
                ],
                digest: 42,
                body: b"buy".to_vec(),
            }),
            Msg::Snapshot(SnapshotChunk {
                epoch: 2,
                index: 9,
                total: 10,
                offset: 8,
                bytes: vec![1, 2],
            }),
            Msg::Ack {
                epoch: 2,
                applied: 9,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(Msg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_a_typed_error() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert!(
                    matches!(
                        Msg::decode(&bytes[..cut]),
                        Err(DecodeError::Truncated { .. })
                    ),
                    "{m:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Msg::decode(&longer), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn a_hostile_peer_gets_typed_errors() {
        assert_eq!(
            Msg::decode(&[VERSION + 1, TAG_ACK]),
            Err(DecodeError::Version { got: VERSION + 1 })
        );
        assert_eq!(
            Msg::decode(&[VERSION, 99]),
            Err(DecodeError::UnknownTag(99))
        );
        // A length claiming 4 GiB is refused before anything is allocated.
        let mut huge = vec![VERSION, TAG_REPLY];
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Msg::decode(&huge),
            Err(DecodeError::Truncated { .. })
        ));
        // So is a count of recorded values the message can't hold.
        let mut entry = Msg::Entry(Entry {
            index: 1,
            client: 1,
            session: 1,
            seq: 1,
            answered_below: 1,
            recorded: vec![],
            digest: 0,
            body: vec![],
        })
        .encode();
        entry[2 + 40 + 4..2 + 40 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Msg::decode(&entry),
            Err(DecodeError::Truncated { .. })
        ));
        let chunk = Msg::Snapshot(SnapshotChunk {
            epoch: 1,
            index: 1,
            total: 1,
            offset: 1,
            bytes: vec![0],
        });
        assert!(matches!(
            Msg::decode(&chunk.encode()),
            Err(DecodeError::ChunkBounds { .. })
        ));
    }
}
