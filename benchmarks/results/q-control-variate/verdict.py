"""The CV arm's numbers against the confirmation's A0 (MAPPO): per seed the final greedy return / win rate (mean of the
last 10 evaluations), the median rvar_cv and cv_eta over the updates after the first fifth, and rvar_own.

    python benchmarks/results/q-control-variate/verdict.py benchmarks/results/q-control-variate benchmarks/results/confirmation
"""

import glob
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load(run_dir):
    e = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    e.Reload()
    return {t: np.array([(s.step, s.value) for s in e.Scalars(t)]) for t in e.Tags()["scalars"]}


base_cv, base_a0 = sys.argv[1], sys.argv[2]
for script, env, metric, total in [
    ("maipg_mpe", "spread", "eval/episodic_return", 1001600),
    ("maipg_smac", "3m", "eval/win_rate", 320000),
]:
    print(f"== {env} ({metric})")
    finals = {}
    for arm, base in [("A0", base_a0), ("CV", base_cv)]:
        finals[arm] = []
        for seed in (1, 2, 3):
            dirs = [x for x in glob.glob(f"{base}/{script}/{env}/{arm}__seed{seed}/runs/*") if not x.endswith("jax_cache")]
            done = glob.glob(f"{base}/{script}/{env}/{arm}__seed{seed}/done")
            if not dirs or not done:
                print(f"  {arm} seed {seed}: not done")
                continue
            d = load(dirs[0])
            ev = d[metric][:, 1]
            final = ev[-10:].mean()
            finals[arm].append(final)
            line = f"  {arm} seed {seed}: final {final:.3f}"
            if "diagnostics/rvar_cv" in d:
                r = d["diagnostics/rvar_cv"]
                late = r[r[:, 0] > total / 5, 1]
                eta = d["diagnostics/cv_eta"]
                late_eta = eta[eta[:, 0] > total / 5, 1]
                line += f" | median rvar_cv after 1/5 {np.median(late):.3f}"
                line += f" | median eta {np.median(late_eta):.3f} mean eta {late_eta.mean():.3f}"
            ro = d.get("diagnostics/rvar_own")
            line += "" if ro is None else f" | median rvar_own after 1/5 {np.median(ro[ro[:, 0] > total / 5, 1]):.3f}"
            print(line)
    for arm, f in finals.items():
        if len(f) > 1:
            print(f"  {arm}: {np.mean(f):.3f} +- {np.std(f, ddof=1):.3f} (n={len(f)})")
