#!/usr/bin/env bash
# Every benchmark, one after another (each wants the whole machine): the learning benchmark at
# N=1000 corrections, a cycle every K=100, and the performance benchmarks of the other issues
# (serving, memory, consolidation recipes, engine throughput). Reports land in reports/.
# Wall times on 2 cores are in the reports (zsRE: its report.md, "Where the wall time went").
# N=200 K=50 bash scripts/benchmarks.sh runs the smaller zsRE run, every record measured in full.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
K=${K:-100}
SAMPLE=${SAMPLE:-$((N >= 1000 ? 100 : N))}  # records measured in full (ratchet eval zsre --sample)
PY=.venv/bin/python
.venv/bin/ratchet eval zsre --n "$N" --cycle-every "$K" --merged-lane --concurrency 24 --sample "$SAMPLE" --output "reports/zsre-report-n$N-k$K"
$PY -m evals.serving_bench --rounds 20
$PY -m evals.memory_bench
$PY -m evals.consolidation_bench --n 100 --cycles 2 --variants replay-everyday-quarter-w3-mem-4ep,replay-nq-quarter-w3-mem-4ep,no-replay-quarter
$PY -m evals.throughput
