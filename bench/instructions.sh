#!/usr/bin/env bash
# Deterministic instruction counts of the hot path, on the simulated fabric, with callgrind
# (instruction counts repeat exactly for the same binary: no timing noise; no hardware counters
# needed). Each figure is the difference of two runs of different lengths divided by the
# difference in work, so set-up and teardown cancel. The simulator's work (its "NIC", its event
# queue, the harness stepping the two hosts: see `count`) is subtracted, and the ping-pong runs
# `--untimed` (no clock reads or histogram records of its own): what is left is railover's work
# and the loop calling it, both hosts together for a round trip.
#   bash bench/instructions.sh
# prints `instructions per round trip: N` and `instructions per empty poll: N`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 2; }
cargo build --release -q -p railover-bench
bin=target/release/railover-bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Runs the bench under callgrind; prints "<all instructions> <the simulator's>". The simulator's
# are every call from outside the simulated fabric (`railover_rdma::sim`) into it, with all it
# calls (the fabric never calls back into railover's logic: only into the registered memory's
# address), and the self cost of the in-process harness (`railover::sim`: SimPair, SimClock),
# inlined code included. Calls, not names: the fabric's event heap and searches are generic
# code of the standard library, named after it, not after the simulator.
count() {
  local f="$out/$1.cg"
  shift
  valgrind --tool=callgrind --callgrind-out-file="$f" "$bin" "$@" >/dev/null 2>&1
  awk '
    function named(spec,   id, rest) { # "(id) name" names id; "(id)" refers back to it
      if (match(spec, /^\([0-9]+\)/)) {
        id = substr(spec, 2, RLENGTH - 2); rest = substr(spec, RLENGTH + 2)
        if (rest != "") names[id] = rest
        return names[id]
      }
      return spec
    }
    function fabric(f) { return f ~ /^<?railover_rdma::sim::/ }
    /^summary:/ { total = $2; next }
    /^fn=/ { fn = named(substr($0, 4)); next }
    /^cfn=/ { callee = named(substr($0, 5)); next }
    /^calls=/ { call = 1; next }
    /^[0-9+*-]/ {
      if (call) { call = 0; if (fabric(callee) && !fabric(fn)) sim += $NF; next }
      if (fn ~ /^<?railover::sim::/) sim += $NF
    }
    END { printf "%d %d\n", total, sim }' "$f"
}

per() { # name short-args long-args units-short units-long
  read -r t1 s1 < <(count "$1-short" $2)
  read -r t2 s2 < <(count "$1-long" $3)
  local units=$(($5 - $4))
  echo "$(( (t2 - t1) / units )) $(( ((t2 - s2) - (t1 - s1)) / units ))"
}

read -r rt_all rt < <(per pingpong "pingpong --fabric sim --untimed --size 64 --iterations 1000 --warmup 200" \
  "pingpong --fabric sim --untimed --size 64 --iterations 3000 --warmup 200" 1200 3200)
read -r poll_all poll < <(per idle "idle-poll --count 20000" "idle-poll --count 120000" 20000 120000)
echo "64 B ping-pong, both hosts, simulated fabric: $rt_all instructions per round trip with the simulator"
echo "instructions per round trip: $rt"
echo "idle connection: $poll_all instructions per empty poll with the simulator"
echo "instructions per empty poll: $poll"
