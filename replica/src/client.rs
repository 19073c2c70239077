//! A client of the replicated service, sans I/O: numbers its requests, keeps every unanswered
//! one, and resends them all, in order, to the other server when its server is lost or turns out
//! to be a backup. The servers answer a request they have seen from their records, so a resend
//! is never applied twice.

use std::collections::BTreeMap;

use crate::wire::{DecodeError, Msg, RefusedRequest, Request};

/// What a message from a server meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The first reply to request `seq`.
    Answered { seq: u64, body: Vec<u8> },
    /// Another reply to a request already answered (a resend crossed the first reply).
    Duplicate { seq: u64, body: Vec<u8> },
    /// The server is a backup: the client moved to the next server. Call
    /// [`Client::resend_all`] after a backoff (the other server may not have taken over yet).
    Redirected { to: usize },
    /// The server missed earlier requests: the client resent every unanswered one.
    Resent,
    /// The server refused request `seq`: it will never be applied.
    Refused { seq: u64, why: RefusedRequest },
}

/// A message the client could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("undecodable message from the server: {0}")]
    Decode(#[from] DecodeError),
    #[error("a server sent a message clients don't take")]
    Unexpected,
    #[error("a server sent client {client}'s message (session {session}) here")]
    OtherClient { client: u64, session: u64 },
}

pub struct Client {
    id: u64,
    session: u64,
    servers: usize,
    server: usize,
    next_seq: u64,
    unanswered: BTreeMap<u64, Vec<u8>>,
    /// Messages for the driver to send, with the server each is for.
    outbox: Vec<(usize, Vec<u8>)>,
}

impl Client {
    /// Client `id` of a service on `servers` hosts (tried in turn from `first`).
    pub fn new(id: u64, servers: usize, first: usize) -> Client {
        assert!(servers > 0 && first < servers);
        Client {
            id,
            session: 0,
            servers,
            server: first,
            next_seq: 1,
            unanswered: BTreeMap::new(),
            outbox: Vec::new(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// This run's session number (default 0). A client process that may restart under the same
    /// id takes a larger one at each start (its start time, say): the servers then start it
    /// afresh at sequence 1 instead of answering from the previous run's records, and refuse
    /// what an earlier (smaller) session still sends.
    pub fn with_session(mut self, session: u64) -> Client {
        self.session = session;
        self
    }

    /// The server the client talks to now.
    pub fn server(&self) -> usize {
        self.server
    }

    /// Requests not answered yet.
    pub fn unanswered(&self) -> usize {
        self.unanswered.len()
    }

    /// Every request below this one is answered.
    pub fn answered_below(&self) -> u64 {
        self.unanswered
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_seq)
    }

    /// Sends a new request; returns its sequence number.
    pub fn request(&mut self, body: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unanswered.insert(seq, body);
        self.queue(seq);
        seq
    }

    fn queue(&mut self, seq: u64) {
        let msg = Msg::Request(Request {
            client: self.id,
            session: self.session,
            seq,
            answered_below: self.answered_below(),
            body: self.unanswered[&seq].clone(),
        });
        self.outbox.push((self.server, msg.encode()));
    }

    /// What to send (server, bytes), in order.
    pub fn take_outbox(&mut self) -> Vec<(usize, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// The connection to the current server is gone (or a request timed out there): move to the
    /// next server and resend everything unanswered.
    pub fn server_lost(&mut self) {
        self.switch_server();
        self.resend_all();
    }

    /// Moves to the next server without resending (the caller resends after a backoff).
    pub fn switch_server(&mut self) {
        self.server = (self.server + 1) % self.servers;
    }

    /// Resends every unanswered request to the current server, in order.
    pub fn resend_all(&mut self) {
        let seqs: Vec<u64> = self.unanswered.keys().copied().collect();
        for seq in seqs {
            self.queue(seq);
        }
    }

    /// A message from server `from` (messages from a server the client left are ignored: `None`).
    pub fn on_message(
        &mut self,
        from: usize,
        bytes: &[u8],
    ) -> Result<Option<ClientEvent>, ClientError> {
        let msg = Msg::decode(bytes)?;
        if from != self.server {
            return Ok(None);
        }
        match msg {
            Msg::Reply {
                client, session, ..
            }
            | Msg::OutOfOrder {
                client, session, ..
            }
            | Msg::Refused {
                client, session, ..
            } if client != self.id || session != self.session => {
                // Another client's, or another run's of this client (a reply released after a
                // restart): never taken for this run's.
                Err(ClientError::OtherClient { client, session })
            }
            Msg::Reply { seq, body, .. } => Ok(Some(match self.unanswered.remove(&seq) {
                Some(_) => ClientEvent::Answered { seq, body },
                None => ClientEvent::Duplicate { seq, body },
            })),
            Msg::Refused { seq, why, .. } => Ok(self
                .unanswered
                .remove(&seq)
                .map(|_| ClientEvent::Refused { seq, why })),
            Msg::OutOfOrder { .. } => {
                self.resend_all();
                Ok(Some(ClientEvent::Resent))
            }
            Msg::NotPrimary => {
                self.switch_server();
                Ok(Some(ClientEvent::Redirected { to: self.server }))
            }
            _ => Err(ClientError::Unexpected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Request {
        match Msg::decode(bytes).unwrap() {
            Msg::Request(r) => r,
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn unanswered_requests_are_resent_in_order_to_the_next_server() {
        let mut c = Client::new(9, 2, 0);
        for b in [b"a", b"b", b"c"] {
            c.request(b.to_vec());
        }
        assert_eq!(c.take_outbox().len(), 3);
        let reply = Msg::Reply {
            client: 9,
            session: 0,
            seq: 2,
            body: b"B".to_vec(),
        };
        assert_eq!(
            c.on_message(0, &reply.encode()).unwrap(),
            Some(ClientEvent::Answered {
                seq: 2,
                body: b"B".to_vec()
            })
        );
        assert_eq!(
            c.on_message(0, &reply.encode()).unwrap(),
            Some(ClientEvent::Duplicate {
                seq: 2,
                body: b"B".to_vec()
            })
        );
        c.server_lost();
        let resent: Vec<_> = c.take_outbox();
        assert!(resent.iter().all(|(server, _)| *server == 1));
        let reqs: Vec<_> = resent.iter().map(|(_, b)| decode(b)).collect();
        assert_eq!(reqs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
        assert!(reqs.iter().all(|r| r.answered_below == 1 && r.client == 9));
        // The old server's late reply is ignored; a backup's refusal moves the client on.
        assert_eq!(c.on_message(0, &reply.encode()).unwrap(), None);
        assert_eq!(
            c.on_message(1, &Msg::NotPrimary.encode()).unwrap(),
            Some(ClientEvent::Redirected { to: 0 })
        );
        assert!(
            c.take_outbox().is_empty(),
            "the caller resends after a backoff"
        );
        c.resend_all();
        assert_eq!(c.take_outbox().len(), 2);
        assert_eq!(
            c.on_message(
                0,
                &Msg::OutOfOrder {
                    client: 9,
                    session: 0,
                    expected: 1
                }
                .encode()
            )
            .unwrap(),
            Some(ClientEvent::Resent)
        );
        assert_eq!(c.take_outbox().len(), 2);
        assert!(matches!(
            c.on_message(0, &[0xff]),
            Err(ClientError::Decode(_))
        ));
        assert_eq!(
            c.on_message(
                0,
                &Msg::Ack {
                    epoch: 1,
                    applied: 1,
                }
                .encode()
            ),
            Err(ClientError::Unexpected)
        );
        // Another client's reply is never taken for this one's.
        let other = Msg::Reply {
            client: 8,
            session: 0,
            seq: 1,
            body: vec![],
        };
        assert_eq!(
            c.on_message(0, &other.encode()),
            Err(ClientError::OtherClient {
                client: 8,
                session: 0
            })
        );
        // Nor is a reply to an earlier run of this client (released after it restarted).
        let earlier_run = Msg::Reply {
            client: 9,
            session: 5,
            seq: 1,
            body: vec![],
        };
        assert_eq!(
            c.on_message(0, &earlier_run.encode()),
            Err(ClientError::OtherClient {
                client: 9,
                session: 5
            })
        );
        assert_eq!(c.unanswered(), 2);
    }
}
