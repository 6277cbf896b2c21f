"""MaMuJoCo's MAPPO screening rule, as pre-registered in benchmarks/results/README.md: an arm's score is the mean over
seeds 1 and 2 of the final training return (the mean of the last 10 logged charts/episodic_return); the best arm
becomes the default if it beats M0 (the confirmation's A0 seeds 1 and 2) by more than the larger of the two arms' seed
spreads |seed 1 - seed 2|; of arms within 5% of the best score the cheaper (wall time) is taken. Also printed: the
greedy return (the mean of the last 10 evaluations), approx_kl, clipfrac and entropy at the end, and the wall time.

    python benchmarks/results/mujoco-mappo/verdict.py benchmarks/results/mujoco-mappo benchmarks/results/confirmation
"""

import glob
import os
import re
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir):
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: np.array([s.value for s in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}


def seed_numbers(folder):
    """-> the seed's numbers, or None if the run is not done"""
    if not os.path.exists(os.path.join(folder, "done")):
        return None
    (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
    logged = scalars(run_dir)
    with open(os.path.join(folder, "log.txt")) as f:
        walls = re.findall(r"done: \d+ env steps in (\d+) s", f.read())
    numbers = {"train": logged["charts/episodic_return"][-10:].mean(), "greedy": logged["eval/episodic_return"][-10:].mean()}
    numbers |= {name: logged[f"losses/{name}"][-1] for name in ("approx_kl", "clipfrac", "entropy")}
    return numbers | {"wall_s": float(walls[-1]) if walls else float("nan")}


if __name__ == "__main__":
    screening, confirmation = sys.argv[1:3]
    folders = {"M0": f"{confirmation}/maipg_continuous/HalfCheetah/A0__seed{{}}"}
    folders |= {arm: f"{screening}/maipg_continuous/HalfCheetah/{arm}__seed{{}}" for arm in ("M1", "M2", "M3", "M4")}
    scores, spreads = {}, {}
    for arm, folder in folders.items():
        seeds = [seed_numbers(folder.format(seed)) for seed in (1, 2)]
        for seed, numbers in zip((1, 2), seeds, strict=True):
            text = "not done" if numbers is None else ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
            print(f"{arm} seed {seed}: {text}")
        if all(seeds):
            scores[arm] = np.mean([numbers["train"] for numbers in seeds])
            spreads[arm] = abs(seeds[0]["train"] - seeds[1]["train"])
            walls = np.mean([numbers["wall_s"] for numbers in seeds])
            print(f"{arm}: score {scores[arm]:.1f}, seed spread {spreads[arm]:.1f}, mean wall {walls:.0f} s")
    if len(scores) < 5:
        sys.exit("not every arm is done: no verdict yet")
    best = max((arm for arm in scores if arm != "M0"), key=scores.get)
    margin = max(spreads[best], spreads["M0"])
    if scores[best] - scores["M0"] > margin:
        near = [arm for arm in scores if arm != "M0" and scores[arm] >= 0.95 * scores[best]]
        print(f"best {best} beats M0 by {scores[best] - scores['M0']:.1f} (> {margin:.1f}); within 5% of it: {near}")
        print("  (of those, the cheaper one by wall time, on the same machine, becomes the default)")
    else:
        print(f"best {best} does not beat M0 by more than {margin:.1f}: the defaults stay")
