#!/usr/bin/env bash
# Deterministic instruction counts of the hot path, on the simulated fabric, with callgrind
# (instruction counts repeat exactly for the same binary: no timing noise; no hardware counters
# needed). Each figure is the difference of two runs of different lengths divided by the
# difference in work, so set-up and teardown cancel. The simulator's own functions (its event
# queue, its "NIC": self cost, inlined code included) are subtracted, and the ping-pong runs
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

# Runs the bench under callgrind; prints "<all instructions> <the simulator's>".
count() {
  local f="$out/$1.cg"
  shift
  valgrind --tool=callgrind --callgrind-out-file="$f" "$bin" "$@" >/dev/null 2>&1
  callgrind_annotate --threshold=100 --auto=no "$f" 2>/dev/null | awk '
    /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
    /^ *[0-9,]+ \(/ {
      line = $0
      sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line)   # the cost
      sub(/^[^:]*:/, "", line)                       # the file
      if (line ~ /^<?railover(_rdma)?::sim::/) { c = $1; gsub(",", "", c); sim += c }
    }
    END { printf "%d %d\n", total, sim }'
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
