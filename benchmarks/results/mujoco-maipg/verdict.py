"""MaMuJoCo's default MAIPG against MAPPO, as pre-registered in benchmarks/results/README.md: per robot and seed (1-3)
the final greedy return (the mean of a run's last 10 evaluations); MAIPG *matches* MAPPO if the two means over seeds
differ by at most the larger sample std, *beats* or *loses* if by more. MAPPO's arm is the confirmation's runs
(mujoco-mappo/.../MAPPO__seed*). Also printed: the training return (the mean of the last 10 logged), the medians after
the warm-up (the first fifth of the run) of dpg_grad_ratio, nu and rvar, and the final entropy.

    python benchmarks/results/mujoco-maipg/verdict.py benchmarks/results/mujoco-maipg benchmarks/results/mujoco-mappo
"""

import glob
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROBOTS = ("HalfCheetah", "Hopper")


def seed_numbers(folder):
    """-> the run's numbers, or None if it is not done"""
    if not os.path.exists(os.path.join(folder, "done")):
        return None
    (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    steps = {tag: np.array([s.step for s in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}
    logged = {tag: np.array([s.value for s in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}
    numbers = {"greedy": logged["eval/episodic_return"][-10:].mean(), "train": logged["charts/episodic_return"][-10:].mean()}
    for tag in ("diagnostics/dpg_grad_ratio", "charts/nu", "diagnostics/rvar"):
        numbers[tag.split("/")[1]] = np.median(logged[tag][steps[tag] > steps[tag].max() / 5])
    return numbers | {"entropy": logged["losses/entropy"][-1]}


if __name__ == "__main__":
    maipg_out, mappo_out = sys.argv[1:3]
    complete = True
    for robot in ROBOTS:
        greedy = {}
        for arm, out in (("MAPPO", mappo_out), ("MAIPG", maipg_out)):
            for seed in (1, 2, 3):
                numbers = seed_numbers(f"{out}/maipg_continuous/{robot}/{arm}__seed{seed}")
                text = "not done" if numbers is None else ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
                print(f"{robot} {arm} seed {seed}: {text}")
                if numbers is not None:
                    greedy.setdefault(arm, []).append(numbers["greedy"])
        if any(len(greedy.get(arm, [])) < 3 for arm in ("MAPPO", "MAIPG")):
            complete = False
            continue
        mean = {arm: np.mean(values) for arm, values in greedy.items()}
        std = {arm: np.std(values, ddof=1) for arm, values in greedy.items()}
        difference, margin = mean["MAIPG"] - mean["MAPPO"], max(std.values())
        word = "matches" if abs(difference) <= margin else ("beats" if difference > 0 else "loses")
        print(
            f"{robot}: MAPPO {mean['MAPPO']:.0f} +- {std['MAPPO']:.0f}, MAIPG {mean['MAIPG']:.0f} +- {std['MAIPG']:.0f}: "
            f"MAIPG {word} MAPPO ({difference:+.0f}; larger std {margin:.0f})"
        )
    if not complete:
        sys.exit("not every run is done: no verdict yet")
