//! The fabric contract on real verbs: rxe_a1 <-> rxe_a2 across wire A in the SoftRoCE VM. The
//! contract tests are `#[ignore]`d outside it (`ci/vm-tests` runs them with `--include-ignored`),
//! so host summaries never count them; one test checks that opening a card is a typed error
//! where there is no RDMA.
#![cfg(feature = "verbs")]

use std::time::{Duration, Instant};

use railover_rdma::contract::{self, ContractEnv};
use railover_rdma::verbs::{VerbsLink, VerbsNic, VerbsSharedCq};
use railover_rdma::{Completion, FabricError, Link, SharedCompletion, SharedCq};

struct Verbs;

impl ContractEnv for Verbs {
    type Nic = VerbsNic;
    fn cards(&mut self) -> (VerbsNic, VerbsNic) {
        (
            VerbsNic::open("rxe_a1").expect("open rxe_a1"),
            VerbsNic::open("rxe_a2").expect("open rxe_a2"),
        )
    }
    fn wait(&mut self, link: &mut VerbsLink, n: usize) -> Vec<Completion> {
        busy_poll(n, Completion::EMPTY, |buf| link.poll(buf))
    }
    fn wait_shared(&mut self, cq: &mut VerbsSharedCq, n: usize) -> Vec<SharedCompletion> {
        busy_poll(n, SharedCompletion::EMPTY, |buf| cq.poll(buf))
    }
}

/// Busy-polls up to a deadline until `n` arrived: completions are the synchronisation, the
/// deadline only bounds a failing run. Waiting for 0 still gives stale completions a chance to
/// show, and after the n-th a duplicate gets a moment to appear.
fn busy_poll<T: Copy>(n: usize, empty: T, mut poll: impl FnMut(&mut [T]) -> usize) -> Vec<T> {
    let deadline = Instant::now()
        + if n == 0 {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(20)
        };
    let mut out = Vec::new();
    let mut buf = [empty; 16];
    while Instant::now() < deadline {
        let k = poll(&mut buf);
        out.extend_from_slice(&buf[..k]);
        if n > 0 && out.len() >= n {
            let settle = Instant::now() + Duration::from_millis(5);
            while Instant::now() < settle {
                let k = poll(&mut buf);
                out.extend_from_slice(&buf[..k]);
            }
            break;
        }
    }
    out
}

/// Opening a card: inside the harness (RAILOVER_SOFTROCE set) it must work; on a machine
/// without RDMA it must fail with a typed error, never a panic or a crash.
#[test]
fn opening_a_card_works_in_the_vm_and_is_a_typed_error_elsewhere() {
    let opened = VerbsNic::open("rxe_a1");
    if std::env::var_os("RAILOVER_SOFTROCE").is_some() {
        assert!(opened.is_ok(), "rxe_a1 in the VM: {:?}", opened.err());
    } else {
        match opened {
            Ok(_) => {} // a host with rxe devices set up: nothing to refuse
            Err(FabricError::Unavailable(_) | FabricError::NoSuchDevice(_)) => {}
            Err(e) => panic!("opening a device failed with an unexpected error: {e}"),
        }
    }
}

macro_rules! verbs_contract {
    ($($name:ident),*) => {$(
        #[test]
        #[ignore = "needs rxe devices: ci/vm-tests runs it"]
        fn $name() {
            contract::$name(&mut Verbs);
        }
    )*};
}

verbs_contract!(
    write_with_imm_lands_bytes_and_imm,
    plain_write_is_silent_at_the_receiver,
    completions_in_order_exactly_once,
    armed_completion_wakes_the_waiter,
    rearming_consumes_the_last_wakeup_and_still_wakes,
    bad_rkey_is_a_remote_access_error,
    unsignaled_writes_complete_only_in_error,
    local_misuse_is_a_typed_error,
    shut_down_flushes,
    shared_completion_queue_names_each_link,
    device_contexts_are_apart
);

/// rxe accepts the default inline size, so the contract's small writes above really went
/// inline (a device that refused it would have fallen back without one).
#[test]
#[ignore = "needs rxe devices: ci/vm-tests runs it"]
fn rxe_takes_the_default_inline_size() {
    use railover_rdma::{LinkParams, Nic};
    let card = VerbsNic::open("rxe_a1").expect("open rxe_a1");
    let params = LinkParams::default();
    let link = card.create_link(&params).expect("a queue pair");
    assert!(params.max_inline >= 64, "a 64 B record fits inline");
    assert_eq!(link.max_inline(), params.max_inline);
}
