"""Football's rules, as pre-registered in benchmarks/results/README.md: MAPPO's sanity check (pass_and_shoot, mean final
greedy success of seeds 1-3 at least 0.6) and MAIPG (nu 0.5) against MAPPO (nu 0): per seed the area under the greedy
success curve (the mean over all evaluations), the final success (the mean of the last 3 evaluations) and the env steps
to first reach the scenario's threshold (the budget if never); the verdict on the area, by the larger sample std.

    python benchmarks/results/grf-mappo/verdict.py benchmarks/results/grf-mappo
"""

import glob
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCENARIOS = {"academy_pass_and_shoot_with_keeper": (0.7, 1_000_000), "academy_3_vs_1_with_keeper": (0.3, 2_000_000)}
ARMS = {"MAPPO": "nu0", "MAIPG": "nu0.5"}


def scalars(run_dir):
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: np.array([(s.step, s.value) for s in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}


def seed_numbers(folder, threshold, budget, warmup):
    """-> {area, final, steps to threshold, medians of the diagnostics after the warm-up}, or None if not done"""
    if not os.path.exists(os.path.join(folder, "done")):
        return None
    (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
    logged = scalars(run_dir)
    steps, success = logged["eval/success_rate"].T
    reached = steps[success >= threshold]
    numbers = {"area": success.mean(), "final": success[-3:].mean(), "steps": reached[0] if len(reached) else budget}
    for tag in ("diagnostics/rvar", "diagnostics/dpg_grad_ratio", "losses/entropy"):
        after = logged[tag][logged[tag][:, 0] > warmup, 1]
        numbers[tag.split("/")[1]] = float(np.median(after))
    return numbers


def verdict(a, b):
    """a against b (lists of per-seed values): matches, beats or loses, by the larger sample std"""
    margin = max(np.std(a, ddof=1), np.std(b, ddof=1))
    difference = np.mean(a) - np.mean(b)
    word = "matches" if abs(difference) <= margin else ("beats" if difference > 0 else "loses")
    return f"{word} ({difference:+.3f}; larger std {margin:.3f})"


if __name__ == "__main__":
    root = sys.argv[1]
    for scenario, (threshold, budget) in SCENARIOS.items():
        print(f"== {scenario} (threshold {threshold}, {budget:,} steps)")
        results = {}
        for arm, folder_arm in ARMS.items():
            warmup = budget // 5  # MAIPG's warm-up; MAPPO's medians over the same window
            for seed in (1, 2, 3):
                numbers = seed_numbers(f"{root}/maipg_grf/{scenario}/{folder_arm}__seed{seed}", threshold, budget, warmup)
                if numbers is None:
                    print(f"  {arm} seed {seed}: not done")
                    continue
                results.setdefault(arm, []).append(numbers)
                print(f"  {arm} seed {seed}: " + ", ".join(f"{k} {v:.3f}" if k != "steps" else f"{k} {v:,.0f}"
                                                         for k, v in numbers.items()))  # fmt: skip
        for arm, seeds in results.items():
            for key in ("area", "final", "steps"):
                values = [numbers[key] for numbers in seeds]
                spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
                print(
                    f"  {arm} {key}: "
                    + (
                        f"{np.mean(values):,.0f} +- {spread:,.0f}"
                        if key == "steps"
                        else f"{np.mean(values):.3f} +- {spread:.3f}"
                    )
                )
        if scenario.startswith("academy_pass") and len(results.get("MAPPO", [])) == 3:
            mean_final = np.mean([numbers["final"] for numbers in results["MAPPO"]])
            print(f"  sanity: MAPPO's mean final {mean_final:.3f}: {'passes' if mean_final >= 0.6 else 'FAILS'} (>= 0.6)")
        if all(len(results.get(arm, [])) == 3 for arm in ARMS):
            for key, sign in (("area", 1), ("final", 1), ("steps", -1)):  # fewer steps to the threshold is better
                arms = [[sign * n[key] for n in results[arm]] for arm in ("MAIPG", "MAPPO")]
                print(f"  MAIPG {key}{' (negated)' if sign < 0 else ''}: " + verdict(*arms))
