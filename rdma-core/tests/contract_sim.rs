//! The fabric contract on the simulated fabric (runs everywhere).

use railover_rdma::contract::{self, ContractEnv};
use railover_rdma::sim::{SimFabric, SimLink, SimNic, SimSharedCq};
use railover_rdma::{Completion, Link, SharedCompletion, SharedCq};

struct Sim(SimFabric);

impl ContractEnv for Sim {
    type Nic = SimNic;
    fn cards(&mut self) -> (SimNic, SimNic) {
        let (a, b, _) = self.0.add_wire("sim_a1", "sim_a2", 2_000);
        (a, b)
    }
    fn wait(&mut self, link: &mut SimLink, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let mut buf = [Completion::EMPTY; 64];
        loop {
            let k = link.poll(&mut buf[..n.saturating_sub(out.len()).clamp(1, 64)]);
            out.extend_from_slice(&buf[..k]);
            if out.len() >= n {
                return out;
            }
            match self.0.next_event_time() {
                Some(t) => self.0.advance_to(t),
                None => return out, // nothing more can ever happen
            }
        }
    }
    fn wait_shared(&mut self, cq: &mut SimSharedCq, n: usize) -> Vec<SharedCompletion> {
        let mut out = Vec::new();
        let mut buf = [SharedCompletion::EMPTY; 64];
        loop {
            // (n = 0: everything that shows up)
            let want = if n == 0 {
                64
            } else {
                n.saturating_sub(out.len()).clamp(1, 64)
            };
            let k = cq.poll(&mut buf[..want]);
            out.extend_from_slice(&buf[..k]);
            if n > 0 && out.len() >= n {
                return out;
            }
            match self.0.next_event_time() {
                Some(t) => self.0.advance_to(t),
                None => return out,
            }
        }
    }
}

#[test]
fn write_with_imm_lands_bytes_and_imm() {
    contract::write_with_imm_lands_bytes_and_imm(&mut Sim(SimFabric::new(1)));
}
#[test]
fn plain_write_is_silent_at_the_receiver() {
    contract::plain_write_is_silent_at_the_receiver(&mut Sim(SimFabric::new(2)));
}
#[test]
fn completions_in_order_exactly_once() {
    contract::completions_in_order_exactly_once(&mut Sim(SimFabric::new(3)));
}
#[test]
fn bad_rkey_is_a_remote_access_error() {
    contract::bad_rkey_is_a_remote_access_error(&mut Sim(SimFabric::new(4)));
}
#[test]
fn unsignaled_writes_complete_only_in_error() {
    contract::unsignaled_writes_complete_only_in_error(&mut Sim(SimFabric::new(8)));
}
#[test]
fn local_misuse_is_a_typed_error() {
    contract::local_misuse_is_a_typed_error(&mut Sim(SimFabric::new(5)));
}
#[test]
fn shut_down_flushes() {
    contract::shut_down_flushes(&mut Sim(SimFabric::new(6)));
}
#[test]
fn armed_completion_wakes_the_waiter() {
    contract::armed_completion_wakes_the_waiter(&mut Sim(SimFabric::new(7)));
}
#[test]
fn rearming_consumes_the_last_wakeup_and_still_wakes() {
    contract::rearming_consumes_the_last_wakeup_and_still_wakes(&mut Sim(SimFabric::new(8)));
}
#[test]
fn shared_completion_queue_names_each_link() {
    contract::shared_completion_queue_names_each_link(&mut Sim(SimFabric::new(10)));
}
#[test]
fn device_contexts_are_apart() {
    contract::device_contexts_are_apart(&mut Sim(SimFabric::new(11)));
}
