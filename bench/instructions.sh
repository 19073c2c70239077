#!/usr/bin/env bash
# Deterministic instruction counts of the hot path, on the simulated fabric, with callgrind
# (instruction counts repeat exactly for the same binary: no timing noise; no hardware counters
# needed). Each figure is the difference of two runs of different lengths divided by the
# difference in work, so set-up and teardown cancel. The simulator's work (its "NIC", its event
# queue, the harness stepping the two hosts: see `count`) is subtracted, and the ping-pong runs
# `--untimed` (no clock reads or histogram records of its own): what is left is railover's work
# and the loop calling it, both hosts together for a round trip. In the ping-pong each host makes
# progress only in its own `poll`, as two busy-polling processes do: after each fabric event the
# waiting host polls, and the sender too when that poll found nothing; a host's timers fire in its
# first poll after them (the spinning's empty polls are the empty-poll figure).
#   bash bench/instructions.sh
# prints `instructions per round trip: N` and `instructions per empty poll: N`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 2; }
cargo build --release -q -p railover-bench
bin=target/release/railover-bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Runs the bench under callgrind; prints "<all instructions> <the simulator's> <the benchmark
# loop's own>". The simulator's
# are, from callgrind's call graph (calls, not names: the fabric's event heap and searches are
# generic code of the standard library, named after it):
# - every call from outside the simulated fabric (`railover_rdma::sim`) into it, with all it
#   calls (the fabric calls nothing of railover's logic back, only the registered memory's
#   address);
# - the harness's scheduler (`SimPair::next_deadline`: when to move virtual time, from the
#   fabric's next event and each host's next timeout, which a busy-polling host never asks),
#   with all it calls;
# - the rest of the harness's own code (`railover::sim`: stepping the hosts, the virtual clock),
#   but not railover's code inlined into it (its source file says which).
# The benchmark loop's own are those of `railover_bench::sim_runs` (the ping-pong's and the idle
# poll's loops: what an application's loop would be), again without railover's code inlined
# into them: counted apart since session 19, as the harness's stepping code always was.
count() {
  local f="$out/$1.cg"
  shift
  valgrind --tool=callgrind --callgrind-out-file="$f" "$bin" "$@" >/dev/null 2>&1
  awk '
    # "(id) name" names id, "(id)" refers back to it; files and functions count apart.
    function named(spec, table,   id, rest) {
      if (match(spec, /^\([0-9]+\)/)) {
        id = table ":" substr(spec, 2, RLENGTH - 2); rest = substr(spec, RLENGTH + 2)
        if (rest != "") names[id] = rest
        return names[id]
      }
      return spec
    }
    function fabric(f) { return f ~ /^<?railover_rdma::sim::/ }
    function scheduler(f) { return f ~ /^railover::sim::Sim[A-Za-z]+::next_deadline/ }
    function harness(f) { return f ~ /^<?railover::sim::/ }
    function bench_loop(f) { return f ~ /^<?railover_bench::sim_runs::/ }
    function railover_source(f) { return f ~ /(link-manager|segq|rdma-core)\/src\// && f !~ /\/sim\.rs$/ }
    /^summary:/ { total = $2; next }
    /^fl=/ { file = named(substr($0, 4), "f"); fn_file = file; next }
    /^f[ie]=/ { file = named(substr($0, 4), "f"); next }
    /^cf[il]=/ { named(substr($0, 5), "f"); next }
    /^fn=/ { fn = named(substr($0, 4), "n"); file = fn_file; next }
    /^cfn=/ { callee = named(substr($0, 5), "n"); next }
    /^calls=/ { call = 1; next }
    /^[0-9+*-]/ {
      inside = fabric(fn) || scheduler(fn)
      if (call) {
        call = 0
        if (!inside && (fabric(callee) || scheduler(callee))) sim += $NF
        next
      }
      if (harness(fn) && !scheduler(fn) && !railover_source(file)) sim += $NF
      if (bench_loop(fn) && !railover_source(file)) loop += $NF
    }
    END { printf "%d %d %d\n", total, sim, loop }' "$f"
}

per() { # name short-args long-args units-short units-long: prints all, railover's, with the loop's
  read -r t1 s1 l1 < <(count "$1-short" $2)
  read -r t2 s2 l2 < <(count "$1-long" $3)
  local units=$(($5 - $4))
  echo "$(( (t2 - t1) / units )) $(( ((t2 - s2 - l2) - (t1 - s1 - l1)) / units )) $(( ((t2 - s2) - (t1 - s1)) / units ))"
}

read -r rt_all rt rt_loop < <(per pingpong "pingpong --fabric sim --untimed --size 64 --iterations 1000 --warmup 200" \
  "pingpong --fabric sim --untimed --size 64 --iterations 3000 --warmup 200" 1200 3200)
# The same with the harness's loop before session 18: time moved to the next fabric event or host
# timer, both hosts made progress, then the waiting one polled (six `progress` calls a round trip
# where two busy-polling processes make two: `polls per round trip` in the bench's output).
read -r rt_both_all rt_both rt_both_loop < <(per pingpong-both "pingpong --fabric sim --untimed --step-both-hosts --size 64 --iterations 1000 --warmup 200" \
  "pingpong --fabric sim --untimed --step-both-hosts --size 64 --iterations 3000 --warmup 200" 1200 3200)
read -r poll_all poll poll_loop < <(per idle "idle-poll --count 20000" "idle-poll --count 120000" 20000 120000)
read -r ep_all ep ep_loop < <(per endpoint "idle-poll --endpoint 16 --count 2000" \
  "idle-poll --endpoint 16 --count 12000" 2000 12000)
read -r clock_all _ _ < <(per clock "clock-reads --count 100000" "clock-reads --count 600000" 100000 600000)
echo "64 B ping-pong, both hosts, simulated fabric: $rt_all instructions per round trip with the simulator"
echo "instructions per round trip: $rt"
echo "(with the benchmark loop's own instructions, as counted until session 19: $rt_loop per round trip)"
echo "(per round trip with the harness stepping both hosts after each event, as before session 18: $rt_both_loop with the loop, $rt_both without; $rt_both_all with the simulator)"
echo "idle connection: $poll_all instructions per empty poll with the simulator"
echo "instructions per empty poll: $poll"
echo "(with the benchmark loop's own instructions: $poll_loop per empty poll)"
echo "an Endpoint with 16 idle connections: $ep instructions per empty Endpoint::poll ($ep_loop with the loop, $ep_all with the simulator)"
# On verbs a poll also reads the real clock once (the simulated connections read a virtual one).
echo "instructions per real clock read (verbs adds one per poll): $clock_all"
