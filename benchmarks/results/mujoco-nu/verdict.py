"""MaMuJoCo's nu check, as pre-registered in benchmarks/results/README.md: per robot an arm's score is the mean over
seeds 4 and 5 of the final greedy return (the mean of a run's last 10 evaluations); arms are ranked per robot (1 best)
and the best mean rank over HalfCheetah and Hopper wins, a tie going to the smaller fixed nu, then to a fixed nu over
the adaptive arm. The adaptive arm may be suggested for a new benchmark only if its score is within the larger of its
and the winner's seed spreads (|seed 4 - seed 5|) of the winner's on both robots. Also printed: the median
dpg_grad_ratio and nu after the warm-up (the first fifth of the run) and the final entropy.

    python benchmarks/results/mujoco-nu/verdict.py benchmarks/results/mujoco-nu
"""

import glob
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ARMS = ("nu0.01", "nu0.03", "nu0.1", "adaptive")  # in the tie-break's order
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
    after_warmup = steps["charts/nu"] > steps["charts/nu"].max() / 5
    return {
        "greedy": logged["eval/episodic_return"][-10:].mean(),
        "train": logged["charts/episodic_return"][-10:].mean(),
        "ratio": np.median(logged["diagnostics/dpg_grad_ratio"][after_warmup]),
        "nu": np.median(logged["charts/nu"][after_warmup]),
        "entropy": logged["losses/entropy"][-1],
    }


if __name__ == "__main__":
    out = sys.argv[1]
    scores, spreads = {}, {}
    for robot in ROBOTS:
        for arm in ARMS:
            seeds = [seed_numbers(f"{out}/maipg_continuous/{robot}/{arm}__seed{seed}") for seed in (4, 5)]
            for seed, numbers in zip((4, 5), seeds, strict=True):
                text = "not done" if numbers is None else ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
                print(f"{robot} {arm} seed {seed}: {text}")
            if all(seeds):
                scores[robot, arm] = np.mean([numbers["greedy"] for numbers in seeds])
                spreads[robot, arm] = abs(seeds[0]["greedy"] - seeds[1]["greedy"])
                print(f"{robot} {arm}: score {scores[robot, arm]:.0f}, seed spread {spreads[robot, arm]:.0f}")
    if len(scores) < len(ROBOTS) * len(ARMS):
        sys.exit("not every run is done: no verdict yet")
    ranks = {arm: [] for arm in ARMS}
    for robot in ROBOTS:
        for rank, arm in enumerate(sorted(ARMS, key=lambda arm: -scores[robot, arm]), start=1):
            ranks[arm].append(rank)
    mean_rank = {arm: np.mean(r) for arm, r in ranks.items()}
    winner = min(ARMS, key=lambda arm: (mean_rank[arm], ARMS.index(arm)))  # ties: the earlier arm in ARMS
    print("mean ranks: " + ", ".join(f"{arm} {mean_rank[arm]:.1f} {ranks[arm]}" for arm in ARMS))
    print(f"winner: {winner}")
    close = all(
        scores[robot, winner] - scores[robot, "adaptive"] <= max(spreads[robot, winner], spreads[robot, "adaptive"])
        for robot in ROBOTS
    )
    print(f"the adaptive arm is {'within' if close else 'not within'} the seed spreads of the winner on both robots")
