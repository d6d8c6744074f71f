#!/usr/bin/env bash
# Runs dedi's benchmarks COUNT times (default 5) and prints the median of
# every figure, with the machine and the date, for docs/BENCHMARKS.md.
# Usage: scripts/bench.sh [COUNT] [BENCH-REGEXP]
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-5}
pattern=${2:-.}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(go version | cut -d' ' -f3)"
# Each benchmark gets an iteration count that fits its cost: "PACKAGE NAME ITERATIONS".
runs=(
  "./test/e2e BenchmarkSpawnToReady 30x"
  "./test/e2e BenchmarkSpawn100 3x"
  "./test/e2e BenchmarkCrashDetection 30x"
  "./test/e2e BenchmarkLSPMMemory 1x"
  "./test/e2e BenchmarkHeartbeats 20000x"
  "./test/e2e BenchmarkNodeEchoReady 1x"
  "./test/e2e BenchmarkPlacementWarm 480x"
  "./test/e2e BenchmarkColdStartLocal 20x"
  "./test/e2e BenchmarkColdStartDocker 5x"
  "./test/e2e BenchmarkColdStartQEMU 3x"
  "./internal/vmm BenchmarkReportIngest 2000x"
  "./internal/rest BenchmarkDecodeStatus 2000x"
  "./internal/lspm BenchmarkCheckPeer 2000x"
)
# The status ingest (10,000 simulated LSPMs, about 2 minutes) runs alone:
#   go test ./test/e2e -run '^$' -bench '^BenchmarkStatusIngest$' -benchtime 1x -count 1 -timeout 30m
for r in "${runs[@]}"; do
  set -- $r
  [[ "$2" =~ $pattern ]] || continue
  echo "command: go test $1 -run '^\$' -bench '^$2\$' -benchtime $3 -count $count"
  go test "$1" -run '^$' -bench "^$2\$" -benchtime "$3" -count "$count" | tee -a "$out" >&2
done
echo
echo "medians of $count runs:"
# Each result line: name iterations value unit [value unit]...
awk '/^Benchmark/ {
  name=$1; sub(/-[0-9]+$/, "", name)
  for (i = 3; i + 1 <= NF; i += 2) { key = name " " $(i+1); vals[key] = vals[key] " " $i; order[key] = ++n }
}
END {
  for (k in vals) {
    m = split(substr(vals[k], 2), a, " ")
    # insertion sort
    for (i = 2; i <= m; i++) { v = a[i]; j = i - 1; while (j > 0 && a[j] + 0 > v + 0) { a[j+1] = a[j]; j-- } a[j+1] = v }
    med = a[int((m + 1) / 2)]
    split(k, parts, " ")
    if (parts[2] == "ns/op") printf "%-40s %12.3f ms/op\n", parts[1], med / 1e6
    else printf "%-40s %12s %s\n", parts[1], med, parts[2]
  }
}' "$out" | sort
