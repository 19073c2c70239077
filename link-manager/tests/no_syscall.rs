//! Steady-state send and poll make no system call. The test runs itself again under `strace -f`
//! (child mode, chosen by an environment variable): the child warms up, marks the start of a
//! window with a `statx` of a path that does not exist, runs 10,000 messages each way through the
//! whole stack (core, runtime, segq, simulated fabric, plus a wall-clock read per round: the
//! vDSO, not a syscall), and marks the end. The parent counts the child thread's system calls
//! between the two marks in strace's log.
//!
//! On real verbs the NIC's doorbell is a memory write on hardware providers (mlx5), but a
//! `write()` on rxe (a software provider), so this proof is made on the simulated fabric.
//! Needs `strace` (installed by `ci/softroce setup`).

use std::process::Command;

use railover::sim::SimPair;
use railover::Config;

const CHILD_ENV: &str = "RAILOVER_SYSCALL_CHILD";
const BEGIN: &str = "/railover-syscall-window/begin";
const END: &str = "/railover-syscall-window/end";
const TEST_NAME: &str = "steady_state_send_and_poll_make_no_syscall";

fn child() {
    let cfg = Config::builder().geometry(4096, 16, 512).build().unwrap();
    let mut pair = SimPair::new(cfg, 11, 2_000).unwrap();
    let msg = [0x5au8; 100];
    let started = std::time::Instant::now();
    let mut delivered = 0usize;
    let mut round = |pair: &mut SimPair| {
        for _ in 0..4 {
            pair.a.send(&msg).unwrap();
            pair.b.send(&msg[..60]).unwrap();
        }
        let t = pair.now() + 50_000;
        pair.step(t);
        pair.step(t);
        delivered += pair.b.poll(|m| assert_eq!(m.len(), 100)).unwrap();
        delivered += pair.a.poll(|m| assert_eq!(m.len(), 60)).unwrap();
        std::hint::black_box(started.elapsed());
    };
    for _ in 0..2_000 {
        round(&mut pair); // warm-up: rings wrap, every lazy initialisation has happened
    }
    let _ = std::fs::metadata(BEGIN);
    for _ in 0..2_500 {
        round(&mut pair);
    }
    let _ = std::fs::metadata(END);
    assert!(delivered > 30_000, "traffic really flowed: {delivered}");
}

/// The system calls thread `tid` made between the two marks (the marks excluded).
fn calls_in_window(log: &str) -> Result<Vec<String>, String> {
    let begin = log
        .lines()
        .find(|l| l.contains(BEGIN))
        .ok_or("no begin mark in the strace log")?;
    let tid = begin
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let mut inside = false;
    let mut calls = Vec::new();
    for line in log.lines() {
        if line.split_whitespace().next() != Some(tid.as_str()) {
            continue;
        }
        if line.contains(BEGIN) {
            inside = true;
        } else if line.contains(END) {
            return Ok(calls);
        } else if inside && !line.contains("resumed>") && line.contains('(') {
            calls.push(line.to_string());
        }
    }
    Err("no end mark in the strace log (did the child fail?)".into())
}

#[test]
fn steady_state_send_and_poll_make_no_syscall() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child();
    }
    let log_path = std::env::temp_dir().join(format!("railover-strace-{}.log", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&log_path)
        .arg(&exe)
        .args(["--exact", TEST_NAME, "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap_or_else(|e| panic!("running strace ({e}): install it (ci/softroce setup does)"));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        out.status.success(),
        "child under strace failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = calls_in_window(&log).unwrap();
    assert!(
        calls.is_empty(),
        "{} system calls in steady state, first: {:?}",
        calls.len(),
        &calls[..calls.len().min(10)]
    );
}

#[test]
fn the_window_parser_sees_calls_between_the_marks() {
    let log = format!(
        "7 statx(AT_FDCWD, \"{BEGIN}\", ...) = -1 ENOENT\n\
         8 futex(0x1, FUTEX_WAIT, 0) = 0\n\
         7 write(1, \"x\", 1) = 1\n\
         7 <... read resumed>) = 0\n\
         7 statx(AT_FDCWD, \"{END}\", ...) = -1 ENOENT\n\
         7 write(1, \"y\", 1) = 1\n"
    );
    assert_eq!(
        calls_in_window(&log).unwrap(),
        vec!["7 write(1, \"x\", 1) = 1".to_string()]
    );
    assert!(calls_in_window("1 read(0) = 0\n").is_err());
}
