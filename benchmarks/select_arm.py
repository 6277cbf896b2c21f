"""The study's selection rule, written down before any screening run finished: which arms make up A6.

    python benchmarks/select_arm.py benchmarks/results/study

Per setting (env), every arm but the baseline (A0, MAPPO) is ranked by the mean over its seeds of the final greedy win
rate (SMAX, eval/win_rate) or greedy return (the others, eval/episodic_return); a seed's final is the mean of its last
10 evaluations at or before the last step all the arm's seeds reached, as in plot.py. Rank 1 is the best; equal means
share their mean rank. A6 is the arm with the best mean rank over the settings it ran (ties: the arm with fewer flags
of its own), plus every other arm that beat the reference arm (A1) in at least three settings, with at most one of the
exclusive arms (A4 and A4x2: the better ranked one). All arms are A1 plus flags, so A6 is A1 plus their flags.

Prints the table of means and ranks (markdown) and A6; one line and exit status 2 if an arm lacks seeds in a setting.
"""

import argparse
import json
import os

import numpy as np
from plot import Parser, cut_at_common_step, fail, final_values, group_runs


def mean_ranks(means):
    """{arm: mean} -> {arm: rank}: 1 for the highest mean, equal means share the mean of their ranks."""
    ordered = sorted(means.values(), reverse=True)
    return {arm: np.mean([i + 1 for i, value in enumerate(ordered) if value == mean]) for arm, mean in means.items()}


def select(finals, own_flags, reference="A1", exclusive=("A4", "A4x2"), wins_needed=3):
    """finals: {setting: {arm: mean final}} without the baseline; own_flags: {arm: how many flags it adds to A1}.
    Returns ({setting: {arm: rank}}, {arm: mean rank}, {arm: settings where it beat the reference}, [A6's arms])."""
    ranks = {setting: mean_ranks(means) for setting, means in finals.items()}
    arms = sorted({arm for means in finals.values() for arm in means})
    mean_rank = {arm: np.mean([r[arm] for r in ranks.values() if arm in r]) for arm in arms}
    beats = {
        arm: sum(arm in means and reference in means and means[arm] > means[reference] for means in finals.values())
        for arm in arms
    }
    best = min(arms, key=lambda arm: (mean_rank[arm], own_flags[arm], arm))
    chosen = [best] + [arm for arm in arms if arm not in (best, reference) and beats[arm] >= wins_needed]
    both = [arm for arm in chosen if arm in exclusive]
    if len(both) > 1:  # the better ranked of the exclusive arms stays (the best arm, if it is one of them)
        keep = best if best in both else min(both, key=lambda arm: (mean_rank[arm], own_flags[arm], arm))
        chosen = [arm for arm in chosen if arm not in exclusive or arm == keep]
    return ranks, mean_rank, beats, chosen


def arm_finals(folder, baseline, reference, seeds_needed, last):
    """({setting: {arm: mean final}}, {arm: how many flags it adds to the reference}) of the finished runs under
    folder, the baseline left out."""
    finals, records = {}, {}
    for metric in ("eval/win_rate", "eval/episodic_return"):
        for env, groups in group_runs(folder, [metric], include_unfinished=False).items():
            if env in finals:  # SMAX logs both: its win rate was taken first
                continue
            for settings, seeds in groups.items():
                arm = dict(settings).get("arm")
                named = {seed: curves[metric] for seed, (_, curves) in seeds.items() if metric in curves}
                if arm is None or arm == baseline or not named:
                    continue
                if len(named) < seeds_needed:
                    fail(f"--seeds: {env} has {len(named)} seed(s) of arm {arm}, the rule needs {seeds_needed}")
                _, curves = cut_at_common_step(named)
                finals.setdefault(env, {})[arm] = float(final_values(list(curves.values()), last).mean())
                with open(os.path.join(next(iter(seeds.values()))[0], os.pardir, os.pardir, "done")) as f:
                    records.setdefault(env, {})[arm] = json.load(f)["flags"]
    if not finals:
        fail(f"folder: no finished runs with arms under {folder}")
    # an arm's own flags: the flags ("--...") of its sweep.py record that the reference arm's, in the same env, lacks
    own_flags = {}
    for by_arm in records.values():
        for arm, flags in by_arm.items():
            reference_flags = set(by_arm.get(reference, [])) | {"--exp-name"}
            own_flags.setdefault(arm, sum(t.startswith("--") and t not in reference_flags for t in flags))
    return finals, own_flags


if __name__ == "__main__":
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the study's sweep.py --out")
    parser.add_argument("--baseline", default="A0", help="the arm left out of the ranking (MAPPO)")
    parser.add_argument("--reference", default="A1", help="the arm the others must beat to join A6")
    parser.add_argument("--seeds", type=int, default=2, help="the seeds every arm needs in every setting it ran")
    parser.add_argument("--last", type=int, default=10, help="a seed's final is the mean of its last this many evaluations")
    args = parser.parse_args()
    finals, own_flags = arm_finals(args.folder, args.baseline, args.reference, args.seeds, args.last)
    ranks, mean_rank, beats, chosen = select(finals, own_flags, args.reference)
    arms = sorted(mean_rank)
    lines = [f"| setting | {' | '.join(arms)} |", f"|-|{'-|' * len(arms)}"]
    for setting, means in sorted(finals.items()):
        cells = [f"{means[arm]:.4g} ({ranks[setting][arm]:g})" if arm in means else "-" for arm in arms]
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    lines.append(f"| mean rank | {' | '.join(f'{mean_rank[arm]:.2f}' for arm in arms)} |")
    lines.append(f"| beats {args.reference} in | {' | '.join(str(beats[arm]) for arm in arms)} |")
    print("\n".join(lines))
    print(f"A6 = {' + '.join(chosen)} (the best mean rank: {chosen[0]})")
