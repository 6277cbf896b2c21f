"""Learning curves and a results table from the TensorBoard logs of finished MAIPG runs.

    python benchmarks/plot.py benchmarks/out/mpe                  # writes benchmarks/out/mpe/plots/
    python benchmarks/plot.py benchmarks/out/smax --metrics eval/win_rate --out results/smax
    python benchmarks/plot.py runs --include-unfinished           # runs made by hand (no sweep.py `done` marker)

Every run folder under FOLDER (any depth) is read with tensorboard's event reader. A run is taken if sweep.py marked
it finished (the `done` file two levels up, in the folder it ran in), or with --include-unfinished. Seeds are grouped
by the run's own hyperparameters (the "hyperparameters" text each script logs) and its sweep.py arm (the label its
`done` record holds, for sweeps with --arm): runs with the same env, arm and settings but the seed are one group;
settings that change only speed or bookkeeping (torch_threads, GRF's num_workers and env_timeout, checkpoint_interval,
resume; see NOT_SETTINGS), and at nu = 0 those of the DPG term alone, do not split a group. Curves and table rows are
labelled by the arm (arms in label order, after the runs without one), else by the settings that differ between an
env's groups (nu first).

Writes, into --out (default FOLDER/plots; each file atomically):
- {env}__{metric}.png: per group, the mean across seeds and a band of one sample standard deviation (ddof 1; no band
  for one seed), x = env steps; seeds logged at different steps are linearly interpolated onto the steps where all of
  them have data (--log-y: on a logarithmic y axis, where a band reaching below 0 is clipped);
- results.md: per metric, one row per (env, group): env steps, the last step every seed of the group reached; the final
  value of each seed, the mean of its last --last logged values at or before that step (its last 10 evaluations for
  eval/*), so a seed that ran longer is compared at the same point; then the mean ± the sample standard deviation of
  those across seeds ("n/a" for one seed). Seeds cut this way are named on stderr.
"""

import argparse
import json
import math
import os
import re
import sys
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

DEFAULT_METRICS = [
    "eval/episodic_return",
    "eval/win_rate",
    "eval/success_rate",
    "diagnostics/rvar",
    "diagnostics/rvar_joint",
    "diagnostics/grad_var",
]
ENV_KEYS = ("task", "map", "scenario", "env")  # the flag naming the env in each maipg_*.py script
# Hyperparameters that do not change what a run learns (only where, how fast, or what else it writes), and the seed
# that groups average over. torch_threads (sweep.py sets it per run from the cores free) and GRF's num_workers (its
# envs are seeded per env, not per worker) change only the speed; GRF's env_timeout only how long a hung env process
# is waited for; checkpoint_interval and resume only when checkpoints are written and where a run continued from. Left
# as settings on purpose: eval_interval and eval_episodes (they change what "final" measures), env_backend (another
# simulator), log_grad_var and joint_q_diagnostic (extra diagnostics, extra metrics).
NOT_SETTINGS = {
    "seed",
    "torch_deterministic",
    "cuda",
    "torch_threads",
    "num_workers",
    "env_timeout",
    "checkpoint_interval",
    "resume",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "save_model",
    "eval_only",
}
# Flags that shape only the DPG term, which nu = 0 switches off: runs with nu = 0 are MAPPO update for update whatever
# they say (tests/test_mpe.py), so MAPPO runs made before and after a default of these changed stay one group.
DPG_ONLY_SETTINGS = {"nu_warmup", "dpg_scale", "dpg_clip", "mu"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        fail(message)


def fail(message):
    print(f"plot.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def safe_name(text):
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def find_event_folders(folder):
    return sorted(path for path, _, files in os.walk(folder) if any(f.startswith("events.out.tfevents.") for f in files))


def load_run(path, metrics):
    """Returns (hyperparameters, {metric: (steps, values)}), or None for a folder without MAIPG hyperparameters."""
    events = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    if "hyperparameters/text_summary" not in tags["tensors"]:
        return None
    text = events.Tensors("hyperparameters/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [line.strip("|").split("|", 1) for line in text.splitlines()[2:]]
    hyperparameters = {row[0]: row[1] for row in rows if len(row) == 2}
    curves = {}
    for metric in metrics:
        if metric in tags["scalars"]:
            # a step logged twice (a resumed writer) keeps its last value
            by_step = {event.step: event.value for event in events.Scalars(metric)}
            steps = np.array(sorted(by_step))
            curves[metric] = (steps, np.array([by_step[step] for step in steps], dtype=float))
    return hyperparameters, curves


def dpg_off(hyperparameters):
    """nu = 0: the DPG term is off, so its settings (DPG_ONLY_SETTINGS) change nothing."""
    return float(hyperparameters.get("nu", "nan")) == 0


def env_label(hyperparameters):
    name = next((hyperparameters[key] for key in ENV_KEYS if key in hyperparameters), "unknown-env")
    return f"{name}-{hyperparameters['agent_conf']}" if "agent_conf" in hyperparameters else name


def sweep_arm(path):
    """The arm (sweep.py --arm) the run at path ran as: the label its `done` record holds, or None."""
    try:
        with open(os.path.join(path, os.pardir, os.pardir, "done")) as f:
            return json.load(f).get("arm")
    except (OSError, ValueError, AttributeError):  # no record, an empty or older one
        return None


def group_runs(folder, metrics, include_unfinished):
    """{env: {settings: {seed: (path, curves)}}}; settings is a sorted tuple of (key, value) pairs."""
    groups, skipped = {}, 0
    for path in find_event_folders(folder):
        if not include_unfinished and not os.path.isfile(os.path.join(path, os.pardir, os.pardir, "done")):
            skipped += 1
            continue
        loaded = load_run(path, metrics)
        if loaded is None:
            print(f"skipped {path}: no hyperparameters text (not a maipg_*.py run)", file=sys.stderr)
            continue
        hyperparameters, curves = loaded
        ignored = NOT_SETTINGS | (DPG_ONLY_SETTINGS if dpg_off(hyperparameters) else set())
        settings = {k: v for k, v in hyperparameters.items() if k not in ignored}
        arm = sweep_arm(path)
        settings = tuple(sorted({**settings, **({"arm": arm} if arm else {})}.items()))  # arms are groups of their own
        seeds = groups.setdefault(env_label(hyperparameters), {}).setdefault(settings, {})
        seed = hyperparameters.get("seed", "?")
        if seed in seeds:
            print(f"seed {seed} twice: kept {path}, dropped {seeds[seed][0]} (same settings and seed)", file=sys.stderr)
        seeds[seed] = (path, curves)
    if skipped:
        print(f"skipped {skipped} unfinished runs (no `done` marker from sweep.py; --include-unfinished takes them)")
    return groups


def curve_labels(settings_list):
    """Labels that tell an env's groups apart: an arm's label (it stands for its flags), else nu first (nu = 0 is MAPPO)
    and the other settings that differ; where that is not enough, the differing settings and the exp_name too."""
    keys = dict.fromkeys(key for settings in settings_list for key, _ in settings)

    def differs(key):  # .get: a setting that runs of an older script version do not log at all
        rows = [dict(settings) for settings in settings_list]
        return len({row.get(key) for row in rows if not (key in DPG_ONLY_SETTINGS and dpg_off(row))}) > 1

    differing = [key for key in keys if differs(key)]

    def others(values):
        skip = {"arm", "nu", "exp_name"} | (DPG_ONLY_SETTINGS if dpg_off(values) else set())
        return [f"{key}={values.get(key, 'unset')}" for key in differing if key not in skip]

    labels = []
    for settings in settings_list:
        values = dict(settings)
        if "arm" in values:
            labels.append(values["arm"])
            continue
        nu = [f"nu={float(values['nu']):g}" + (" (MAPPO)" if float(values["nu"]) == 0 else "")] if "nu" in values else []
        labels.append(", ".join(nu + others(values)))
    counts = Counter(labels)
    for i, values in enumerate(map(dict, settings_list)):
        if counts[labels[i]] > 1:  # one arm label for other settings, or only the exp_name tells them apart
            labels[i] = ", ".join([labels[i], *(others(values) if "arm" in values else []), str(values.get("exp_name"))])
    return labels


def group_order(settings):
    """Groups without an arm by nu, then arms by label (A2 before A10)."""
    values = dict(settings)
    try:
        nu = float(values.get("nu", 0))
    except ValueError:
        nu = math.inf
    return ("arm" in values, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", values.get("arm", ""))], nu, settings)


def smooth(values, window):
    if window <= 1 or len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def align(curves, window, max_points=1000):
    """Interpolates every seed's curve onto the steps where all seeds have data; returns (steps, values [seeds, steps])."""
    curves = [(steps[len(steps) - len(smooth(values, window)) :], smooth(values, window)) for steps, values in curves]
    low, high = max(steps[0] for steps, _ in curves), min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([steps[(steps >= low) & (steps <= high)] for steps, _ in curves]))
    if len(grid) > max_points:
        grid = np.linspace(low, high, max_points)
    return grid, np.stack([np.interp(grid, steps, values) for steps, values in curves])


def cut_at_common_step(named):
    """{seed: (steps, values)} -> (the last step every seed reached, the same curves cut there)."""
    last_step = min(steps[-1] for steps, _ in named.values())
    cut = {seed: (steps[steps <= last_step], values[steps <= last_step]) for seed, (steps, values) in named.items()}
    return last_step, cut


def final_values(curves, last):
    return np.array([values[-last:].mean() for _, values in curves])


def number(x):
    return f"{x:.4g}" if math.isfinite(x) else str(x)


if __name__ == "__main__":
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the folder holding the runs (a sweep.py --out, or a runs/ folder)")
    parser.add_argument("--out", help="where the PNGs and results.md go (default: FOLDER/plots)")
    metrics_help = f"the scalar tags to plot (default: those found among {' '.join(DEFAULT_METRICS)})"
    parser.add_argument("--metrics", nargs="+", help=metrics_help)
    parser.add_argument(
        "--last", type=int, default=10, help="the final value of a seed is the mean of its last this many values"
    )
    parser.add_argument("--smooth", type=int, default=1, help="moving average over this many logged values before plotting")
    log_help = "draw these metrics on a logarithmic y axis (e.g. diagnostics/rvar, whose early values dwarf the rest)"
    parser.add_argument("--log-y", nargs="+", default=[], metavar="METRIC", help=log_help)
    parser.add_argument("--include-unfinished", action="store_true", help="also take runs without sweep.py's `done` marker")
    args = parser.parse_args()
    if not os.path.isdir(args.folder):
        fail(f"folder: {args.folder} is not a folder")
    if args.last < 1 or args.smooth < 1:
        fail("--last and --smooth must be at least 1")
    metrics = args.metrics or DEFAULT_METRICS
    unplotted = sorted(set(args.log_y) - set(metrics))
    if unplotted:
        fail(f"--log-y: {' '.join(unplotted)} not among the plotted metrics ({' '.join(metrics)})")
    out = args.out or os.path.join(args.folder, "plots")

    groups = group_runs(args.folder, metrics, args.include_unfinished)
    if not groups:
        fail(f"folder: no finished runs under {args.folder}")
    os.makedirs(out, exist_ok=True)
    tables = {metric: [] for metric in metrics}
    noted = set()
    for env in sorted(groups):
        settings_list = sorted(groups[env], key=group_order)
        labels = curve_labels(settings_list)
        for metric in metrics:
            figure, axes = plt.subplots(figsize=(6.4, 4.2))
            for settings, label in zip(settings_list, labels, strict=True):
                seeds = groups[env][settings]
                named = {seed: seeds[seed][1][metric] for seed in sorted(seeds) if metric in seeds[seed][1]}
                if not named:
                    continue
                # every seed stops at the last step all of them reached: the curve, the final values and the env steps
                last_step, cut = cut_at_common_step(named)
                longer = [seed for seed, (steps, _) in named.items() if steps[-1] > last_step]
                if longer and (env, label) not in noted:
                    noted.add((env, label))
                    shortest = [seed for seed, (steps, _) in named.items() if steps[-1] == last_step]
                    print(
                        f"{env}, {label}: {metric} of seed {', '.join(longer)} goes past step {int(last_step)}, where seed "
                        f"{', '.join(shortest)} stops: curves and final values of every seed stop there",
                        file=sys.stderr,
                    )
                curves = list(cut.values())
                if any(len(steps) == 0 for steps, _ in curves):
                    print(f"{env}, {label}: skipped {metric}: its seeds logged it at no common step", file=sys.stderr)
                    continue
                grid, values = align(curves, args.smooth)
                mean, n = values.mean(0), len(curves)
                (line,) = axes.plot(grid, mean, label=f"{label} ({n} seed{'s' if n > 1 else ', no band'})")
                if n > 1:  # the band in its line's colour (fills draw their colours apart from lines)
                    std = values.std(0, ddof=1)
                    axes.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
                finals = final_values(curves, args.last)
                final = f"{number(finals.mean())} ± {number(finals.std(ddof=1)) if n > 1 else 'n/a'}"
                tables[metric].append((env, label, n, int(last_step), final))
            if axes.lines:
                axes.set(title=f"{env}: {metric}", xlabel="env steps", ylabel=metric)
                if metric in args.log_y:
                    axes.set_yscale("log")
                    # plain tick labels ("1.01", not "1.01 x 10^0"): RVar often spans less than a decade
                    axes.yaxis.set_major_formatter(LogFormatter())
                    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
                axes.grid(alpha=0.3)
                axes.legend(title="mean ± sample sd (ddof 1) over seeds", title_fontsize="small")
                figure.tight_layout()
                path = os.path.join(out, f"{safe_name(env)}__{safe_name(metric)}.png")
                figure.savefig(path + ".tmp", dpi=120, format="png")
                os.replace(path + ".tmp", path)
                print(f"wrote {path}")
            plt.close(figure)

    lines = [
        f"# Results: {args.folder}",
        "",
        f"Final value: the mean of each seed's last {args.last} logged values (for eval/ metrics: its last {args.last} "
        "evaluations) at or before the env steps column, the last step every seed reached; then the mean ± the sample "
        "standard deviation (ddof = 1) across seeds (n/a for one seed).",
    ]
    for metric, rows in tables.items():
        if rows:
            lines += ["", f"## {metric}", "", "| env | run | seeds | env steps | final |", "|-|-|-|-|-|"]
            lines += [f"| {' | '.join(map(str, row))} |" for row in rows]
    missing = [metric for metric, rows in tables.items() if not rows and args.metrics]
    if missing:
        print(f"not logged by any run: {' '.join(missing)}", file=sys.stderr)
    with open(os.path.join(out, "results.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))
    print("\n".join(lines[4:]))
    print(f"wrote {os.path.join(out, 'results.md')}")
