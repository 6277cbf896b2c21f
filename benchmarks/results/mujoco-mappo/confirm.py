"""The confirmation of MaMuJoCo's new MAPPO defaults, as pre-registered in benchmarks/results/README.md: a run's
training return is the mean of its last 10 logged charts/episodic_return. HalfCheetah 2x3 passes if the mean over
seeds 1-3 is at least 1,500 (CleanRL's single-agent median here) with a sample std below a third of that mean; Hopper
3x1 passes if the mean exceeds the old defaults' best seed (1,334) by more than the sample std. Also printed: the
greedy return (the mean of the last 10 evaluations), approx_kl, clipfrac and entropy at the end, and the wall time.

    python benchmarks/results/mujoco-mappo/confirm.py benchmarks/results/mujoco-mappo
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from verdict import seed_numbers  # noqa: E402  (the screening's reader of one run)

HOPPER_BASELINE = 1334.0  # the old defaults' best Hopper seed (M0 seeds 1 and 2: 1,329 and 1,334)

if __name__ == "__main__":
    out = sys.argv[1]
    verdicts = []
    for robot in ("HalfCheetah", "Hopper"):
        seeds = [seed_numbers(f"{out}/maipg_continuous/{robot}/MAPPO__seed{seed}") for seed in (1, 2, 3)]
        for seed, numbers in zip((1, 2, 3), seeds, strict=True):
            text = "not done" if numbers is None else ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
            print(f"{robot} seed {seed}: {text}")
        if not all(seeds):
            verdicts.append(f"{robot}: not every seed is done")
            continue
        train = np.array([numbers["train"] for numbers in seeds])
        greedy = np.array([numbers["greedy"] for numbers in seeds])
        mean, std = train.mean(), train.std(ddof=1)
        greedy_text = f"greedy {greedy.mean():.0f} +- {greedy.std(ddof=1):.0f}"
        print(f"{robot}: training return {mean:.0f} +- {std:.0f} (sample std), {greedy_text}")
        if robot == "HalfCheetah":
            passed = mean >= 1500 and std < mean / 3
            verdicts.append(
                f"HalfCheetah {'passes' if passed else 'fails'}: mean {mean:.0f} >= 1,500 and std {std:.0f} < {mean / 3:.0f}"
            )
        else:
            passed = mean - HOPPER_BASELINE > std
            verdicts.append(
                f"Hopper {'passes' if passed else 'fails'}: mean {mean:.0f} - {HOPPER_BASELINE:.0f} > std {std:.0f}"
            )
    print("\n".join(verdicts))
