#!/usr/bin/env bash
# One Football run on 2 env processes (A) against two 1-process runs side by side, each pinned to a core (B),
# alternated twice; each prints its env steps/s on its last line. Run from the repository root on an idle 2-core
# machine (about 13 minutes): bash benchmarks/grf_workers.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bash benchmarks/grf_workers.sh OUT_DIR}
script=$(pwd)/maipg_grf.py
mkdir -p "$out" && cd "$out"
flags=(--nu 0 --scenario academy_pass_and_shoot_with_keeper --total-timesteps 30000 --eval-interval 0)
for rep in 1 2; do
  python "$script" "${flags[@]}" --num-workers 2 --exp-name "A$rep" > "A$rep.log" 2>&1
  taskset -c 0 python "$script" "${flags[@]}" --num-workers 1 --exp-name "B${rep}c0" > "B${rep}c0.log" 2>&1 &
  taskset -c 1 python "$script" "${flags[@]}" --num-workers 1 --exp-name "B${rep}c1" > "B${rep}c1.log" 2>&1 &
  wait
done
grep -H "done:" ./*.log
