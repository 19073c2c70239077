#!/usr/bin/env bash
# The rounds of bench/perftest-compare, inside a SoftRoCE guest: ROUNDS alternating rounds of
# perftest's ib_write_lat, railover-bench's two-process ping-pong, ib_write_bw, railover-bench's
# two-process flood, perftest's ib_send_lat and the fabric layer alone (`raw-pingpong`), 64 B, each tool as two processes pinned to vCPU 0 and 1. Sourced with `out`
# (where the outputs go), `bench` (railover-bench), ITER and RAILOVER_ROUNDS set: by
# bench/perftest-compare in ci/softroce's guest, and by bench/rxe-vm-compare in the minimal one.
cat /proc/sys/kernel/osrelease >"$out/kernel.txt" # (the minimal guest has no uname)
pt() { # output tag, tool, size, extra args: server on rxe_a1 (vCPU 0), client on rxe_a2 (vCPU 1)
  local tag=$1 tool=$2 size=$3; shift 3
  timeout 300 taskset -c 0 "$tool" -d rxe_a1 -x 1 -s "$size" "$@" >"$out/$tag-srv.txt" 2>&1 &
  local srv=$!
  sleep 1 # perftest's server has no readiness signal; the client retries below regardless
  local i
  for i in 1 2 3 4 5; do
    timeout 300 taskset -c 1 "$tool" -d rxe_a2 -x 1 -s "$size" "$@" 10.99.0.1 >"$out/$tag.txt" 2>&1 && break
    sleep 1
  done
  wait "$srv" || true
}
rl() { # output tag, mode (pingpong|flood), count, extra arguments for both sides:
  # railover-bench serve (host 2's cards, vCPU 0) and connect (host 1's cards, vCPU 1), one
  # process each, as perftest runs
  local tag=$1 mode=$2 n=$3
  shift 3
  # Under TCG the busy-polling processes starve rxe's kernel work on the 2 emulated CPUs and
  # heartbeats arrive tens of ms late: 200 missed 1 ms beats (real NICs: 3).
  timeout 300 taskset -c 0 "$bench" --json serve -d rxe_a2,rxe_b2 "$@" --"$mode" \
    >"$out/$tag-serve.json" 2>"$out/$tag-serve.err" &
  local srv=$! port="" i
  for i in $(seq 1 300); do # the serve side prints its port once it listens
    port=$(sed -n 's/^listening //p' "$out/$tag-serve.json")
    [ -n "$port" ] && break
    sleep 0.1
  done
  timeout 300 taskset -c 1 "$bench" --json connect -d rxe_a1,rxe_b1 "$@" \
    --"$mode" "$n" --addr "127.0.0.1:$port" >"$out/$tag-connect.json" 2>"$out/$tag-connect.err" || true
  wait "$srv" || true
}
ROUNDS=${RAILOVER_ROUNDS:-5}
echo "$ROUNDS" >"$out/rounds.txt"
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r/$ROUNDS: ib_write_lat, railover ping-pong (beat 1 ms, then 10 ms), ib_write_bw, railover flood (committed 16 a post, then send_batch of 16), ib_send_lat, raw verbs (64 B)"
  pt "r$r-ib_write_lat" ib_write_lat 64 -n "$ITER"
  rl "r$r-railover-pingpong" pingpong "$ITER" --hb-misses 200
  # The same detection time (200 ms) from a tenth of the beats: each of the standby's beats is a
  # system call and rxe kernel work on both emulated CPUs (bench/results/rxe-vs-perftest-vm.md).
  rl "r$r-railover-pingpong-beat10ms" pingpong "$ITER" --hb-interval-us 10000 --hb-misses 20
  pt "r$r-ib_write_bw" ib_write_bw 64 -n 20000
  rl "r$r-railover-flood" flood 200000 --hb-misses 200
  # The same flood sent with `send_batch`, 16 records a call (one commit, one write each).
  rl "r$r-railover-flood-send-batch" flood 200000 --hb-misses 200 --send-batch 16
  # A receive that ends in a completion (a receive work request consumed, a completion queue
  # entry written and polled), as railover's RDMA WRITE WITH IMM does: ib_write_lat's receiver
  # polls the buffer's last byte instead, which the design rules out (placement order).
  pt "r$r-ib_send_lat" ib_send_lat 64 -n "$ITER"
  # The fabric layer alone (railover-rdma's verbs: a write with immediate, inline, polled
  # completions; no railover work), two threads of one process, pinned as perftest's processes.
  timeout 300 "$bench" --json raw-pingpong --size 64 --iterations "$ITER" --warmup 200 \
    --client rxe_a1 --client-cpu 1 --server rxe_a2 --server-cpu 0 \
    >"$out/r$r-raw-pingpong.json" 2>&1 || true
done
