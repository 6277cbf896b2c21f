#!/bin/bash
# The exact commands behind benchmarks/results/rvar-ceiling (issue 24, section 2). Each long command ran pinned on core 0
# (taskset -c 0 nice -n 5, one thread), one at a time, on "Intel(R) Xeon(R) Processor @ 2.80GHz" (lscpu), 2 cores shared
# with other jobs.
#
# 1. MAPPO runs (nu = 0), the scripts at commit 38d308ea0f38747f429ba1c11c511fe99eab0e4e (git show 38d308e:maipg_X.py,
#    run from a scratch folder). The confirmation's flags (A0, seed 1) plus checkpoints and --save-model. The early
#    checkpoint is the first checkpoint.pt the run writes (a watcher copied it before the next one replaced it): SMAX
#    update 10 of 100 (32,000 steps), MPE update 31 of 313 (99,200 steps).
taskset -c 0 nice -n 5 python maipg_smac.py --map 3m --nu 0 --seed 1 --total-timesteps 320000 --eval-interval 5 \
    --checkpoint-interval 10 --save-model --torch-threads 1 --exp-name rvarceil_smac
#   -> runs/3m__rvarceil_smac__1__1796304772/{checkpoint.pt (copied at update 10 to rvarceil_smac.early.pt), rvarceil_smac.pt}
taskset -c 0 nice -n 5 python maipg_mpe.py --task spread --nu 0 --seed 1 --total-timesteps 1001600 --eval-interval 5 \
    --checkpoint-interval 31 --save-model --torch-threads 1 --exp-name rvarceil_mpe
#   -> runs/spread__rvarceil_mpe__1__1796305638/checkpoint.pt (copied at update 31 to rvarceil_mpe.early.pt)

# 2. The ceilings (benchmarks/rvar_ceiling.py as committed with these results), from the same scratch folder:
R=/work/main/benchmarks/results/rvar-ceiling
S=runs/3m__rvarceil_smac__1__1796304772
M=runs/spread__rvarceil_mpe__1__1796305638
C="taskset -c 0 nice -n 5 python /work/main/benchmarks/rvar_ceiling.py --torch-threads 1"
$C --checkpoint rvarceil_smac.early.pt --events $S --label smax_3m_early --out $R/smax_3m_early.json
$C --checkpoint $S/rvarceil_smac.pt --events $S --label smax_3m_final --out $R/smax_3m_final.json
$C --checkpoint rvarceil_mpe.early.pt --events $M --label mpe_spread_early --out $R/mpe_spread_early.json
$C --checkpoint $M/rvarceil_mpe.pt --events $M --label mpe_spread_late --out $R/mpe_spread_late.json
# mpe_spread_early.json's "logged" field was read again once the MPE run had finished (the ceiling ran while the run was
# paused at update 31, so its events then stopped there): rvar_ceiling.logged_diagnostics(M, 99200, 3200).
