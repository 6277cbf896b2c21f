"""benchmarks/sweep.py and benchmarks/plot.py: the runner on a tiny grid of maipg_mpe.py runs (then skipping them, and
the plot of their logs), the runner's threads, folders, nu spellings, GRF env workers, named arms, failures, resumption
from checkpoints, stopping and bad input on stand-in scripts, the Slurm array file (its SIGTERM, requeue and resume),
and the plot's grouping (by settings and arm, not threads), alignment, common last step and final values on event
files with known values."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "benchmarks", "sweep.py")
PLOT = os.path.join(ROOT, "benchmarks", "plot.py")
TINY = "--num-agents 2 --num-envs 4 --num-steps 25 --total-timesteps 200 --update-epochs 1 --eval-interval 1 --eval-episodes 2"
STAND_IN = """import json, os, sys
seed = int(sys.argv[sys.argv.index("--seed") + 1])
with open("seen.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "threads": os.environ.get("OMP_NUM_THREADS")}, f)
print("stand-in ran with seed", seed)
sys.exit(3 if seed == 2 else 0)
"""

RESUMABLE = """import json, os, signal, sys, time
argv = sys.argv[1:]
calls = json.load(open("calls.json")) if os.path.exists("calls.json") else []
json.dump(calls + [argv], open("calls.json", "w"))
print("attempt", len(calls) + 1, flush=True)
if "--resume" in argv:
    sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
os.makedirs("runs/x", exist_ok=True)
if os.environ.get("STAND_IN_WAIT"):  # like the scripts: on SIGTERM, a checkpoint and exit 0
    open("ready", "w").close()
    deadline = time.time() + 20
    while not stop and time.time() < deadline:
        time.sleep(0.02)
    open("runs/x/checkpoint.pt", "w").close()
    sys.exit(0 if stop else 5)
open("runs/x/checkpoint.pt", "w").close()
sys.exit(4)
"""


def run(script, args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, env=env)


def load_plot_module():
    spec = importlib.util.spec_from_file_location("benchmarks_plot", PLOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_runs_the_grid_skips_finished_runs_and_plots(tmp_path):
    out = str(tmp_path / "sweep")
    grid = ["--script", "maipg_mpe.py", "--envs", "spread", "--nu", "0", "0.05", "--seeds", "1", "--out", out]

    # --slurm writes one array task per run and runs nothing
    result = run(SWEEP, [*grid, "--slurm", "--slurm-option=--time=1:00:00", "--", *TINY.split()])
    assert result.returncode == 0, result.stderr
    sbatch = os.path.join(out, "sweep.sbatch")
    text = open(sbatch).read()
    assert "#SBATCH --array=0-1\n" in text and "#SBATCH --time=1:00:00\n" in text
    assert text.count("maipg_mpe.py --task spread --nu ") == 2
    assert subprocess.run(["bash", "-n", sbatch]).returncode == 0
    assert os.listdir(out) == ["sweep.sbatch"]

    result = run(SWEEP, [*grid, "--jobs", "2", "--", *TINY.split()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 runs finished, 0 failed" in result.stdout
    folders = sorted(glob.glob(os.path.join(out, "maipg_mpe", "spread", "nu*__seed1")))
    assert [os.path.basename(f) for f in folders] == ["nu0.05__seed1", "nu0__seed1"]
    for folder in folders:
        record = json.load(open(os.path.join(folder, "done")))
        assert os.path.basename(folder) == f"nu{record['nu']}__seed1"
        assert record["flags"][:4] == ["--task", "spread", "--nu", record["nu"]]
        assert "update 2/2" in open(os.path.join(folder, "log.txt")).read()
        assert glob.glob(os.path.join(folder, "runs", "spread__maipg_mpe_nu*__1__*", "events.out.tfevents.*"))
    stamps = [os.path.getmtime(os.path.join(f, "done")) for f in folders]

    # a second invocation skips both; so does an array task of the sbatch file written before
    result = run(SWEEP, [*grid, "--jobs", "2", "--", *TINY.split()])
    assert result.returncode == 0 and "2 already done, 0 to do" in result.stdout, result.stdout + result.stderr
    result = subprocess.run(["bash", sbatch], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True, text=True)
    assert result.returncode == 0 and "already done" in result.stdout, result.stdout + result.stderr
    assert stamps == [os.path.getmtime(os.path.join(f, "done")) for f in folders]

    # the same grid with other flags is refused: its folders hold runs made with the old ones
    result = run(SWEEP, [*grid, "--", *TINY.split(), "--mixer", "vdn"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "another --out" in result.stderr

    result = run(PLOT, [out])
    assert result.returncode == 0, result.stderr
    plots = os.path.join(out, "plots")
    assert sorted(os.listdir(plots)) == ["results.md", "spread__diagnostics_rvar.png", "spread__eval_episodic_return.png"]
    table = open(os.path.join(plots, "results.md")).read()
    for metric in ("eval/episodic_return", "diagnostics/rvar"):
        section = table.split(f"## {metric}\n")[1].split("##")[0]
        rows = [line for line in section.splitlines() if line.startswith("| spread")]
        assert [row.split(" | ")[1:4] for row in rows] == [["nu=0 (MAPPO)", "1", "200"], ["nu=0.05", "1", "200"]]


def test_sweep_threads_folders_and_failures(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = str(tmp_path / "sweep")
    # nu as spelled: 0.50 stays 0.50 (0.5, the same value, runs once)
    grid = ["--script", str(script), "--env-flag=--level", "--envs", "a", "b", "--nu", "0.50", "0.5", "--seeds", "1", "2", "2"]
    result = run(SWEEP, [*grid, "--out", out, "--jobs", "2", "--threads", "3", "--", "--extra", "x y"])
    assert result.returncode == 1
    assert "2 runs finished, 2 failed" in result.stdout
    assert result.stderr.count("FAILED (exit 3)") == 2 and "stand-in ran with seed 2" in result.stderr
    for env in ("a", "b"):
        for seed in (1, 2):
            folder = os.path.join(out, "stand_in", env, f"nu0.50__seed{seed}")
            seen = json.load(open(os.path.join(folder, "seen.json")))
            assert seen["cwd"] == folder and seen["threads"] == "3"
            flags = ["--level", env, "--nu", "0.50", "--seed", str(seed), "--exp-name", "stand_in_nu0.50", "--extra", "x y"]
            assert seen["argv"] == flags
            assert os.path.isfile(os.path.join(folder, "log.txt"))
            assert os.path.isfile(os.path.join(folder, "done")) == (seed == 1)
    # only the failed runs are run again, from a clean folder
    stale = os.path.join(out, "stand_in", "a", "nu0.50__seed2", "stale.txt")
    open(stale, "w").close()
    result = run(SWEEP, [*grid, "--out", out, "--jobs", "1", "--", "--extra", "x y"])
    assert result.returncode == 1 and "4 runs in the grid, 2 already done, 2 to do" in result.stdout
    assert f"OMP_NUM_THREADS={len(os.sched_getaffinity(0))} each" in result.stdout and not os.path.exists(stale)


def test_sweep_gives_grf_runs_as_many_env_workers_as_threads(tmp_path):
    (tmp_path / "maipg_grf.py").write_text(STAND_IN)
    grid = ["--script", str(tmp_path / "maipg_grf.py"), "--envs", "academy_3_vs_1_with_keeper", "--nu", "0.050"]
    result = run(SWEEP, [*grid, "--seeds", "1", "--out", str(tmp_path / "o"), "--threads", "2", "--dry-run"])
    assert result.returncode == 0, result.stderr
    assert "nu0.050__seed1 && " in result.stdout and " --nu 0.050 " in result.stdout
    assert result.stdout.rstrip().endswith("--exp-name maipg_grf_nu0.050 --torch-threads 2 --num-workers 2")


def test_slurm_array_tasks_run_like_local_runs(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = str(tmp_path / "sweep")
    grid = ["--script", str(script), "--env-flag=--level", "--envs", "a", "--nu", "0", "--seeds", "1", "2", "--out", out]
    result = run(SWEEP, [*grid, "--slurm", "--threads", "2"])
    assert result.returncode == 0 and "(2 array tasks)" in result.stdout, result.stdout + result.stderr
    sbatch = os.path.join(out, "sweep.sbatch")
    assert "#SBATCH --cpus-per-task=2\n" in open(sbatch).read()
    tasks = [subprocess.run(["bash", sbatch], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}) for i in (0, 1)]
    assert [task.returncode for task in tasks] == [0, 3]
    seen = json.load(open(os.path.join(out, "stand_in", "a", "nu0__seed1", "seen.json")))
    assert seen["threads"] == "2" and seen["argv"][:6] == ["--level", "a", "--nu", "0", "--seed", "1"]
    assert not os.path.exists(os.path.join(out, "stand_in", "a", "nu0__seed2", "done"))
    # the `done` an array task writes is the one a local sweep writes: the local sweep skips that run
    result = run(SWEEP, [*grid, "--dry-run"])
    assert result.returncode == 0 and "2 runs in the grid, 1 already done, 1 to do" in result.stdout
    assert "--seed 2" in result.stdout and "--seed 1" not in result.stdout


def test_sweep_runs_named_arms_into_one_folder(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = str(tmp_path / "study")
    arms = ["--arm", "A0=", "--arm", "A2=--nu 0.05 --mix 'a b'", "--arm=big-1.x=--nu=1"]
    grid = ["--script", str(script), "--env-flag=--level", "--envs", "a", *arms, "--seeds", "1", "--out", out]
    result = run(SWEEP, [*grid, "--jobs", "1", "--", "--extra", "x"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started  stand_in.py a arm=A2 seed=1" in result.stdout
    expected = {
        "A0": [],
        "A2": ["--nu", "0.05", "--mix", "a b"],
        "big-1.x": ["--nu=1"],
    }
    for arm, flags in expected.items():
        folder = os.path.join(out, "stand_in", "a", f"{arm}__seed1")
        argv = ["--level", "a", "--seed", "1", "--exp-name", f"stand_in_{arm}", *flags, "--extra", "x"]
        assert json.load(open(os.path.join(folder, "seen.json")))["argv"] == argv
        record = json.load(open(os.path.join(folder, "done")))
        assert record["arm"] == arm and record["flags"] == argv and "nu" not in record
    result = run(SWEEP, [*grid, "--dry-run", "--", "--extra", "x"])
    assert result.returncode == 0 and "3 runs in the grid, 3 already done, 0 to do" in result.stdout, result.stderr


def test_sweep_resumes_an_unfinished_run_from_its_checkpoint(tmp_path):
    (tmp_path / "stand_in.py").write_text(RESUMABLE)
    out = tmp_path / "sweep"
    grid = ["--script", str(tmp_path / "stand_in.py"), "--env-flag=--level", "--envs", "a", "--nu", "0", "--seeds", "1"]
    grid += ["--out", str(out), "--threads", "1"]
    result = run(SWEEP, [*grid, "--", "--extra", "x"])
    assert result.returncode == 1 and "FAILED (exit 4)" in result.stderr, result.stdout + result.stderr
    folder = out / "stand_in" / "a" / "nu0__seed1"
    checkpoint, flags = str(folder / "runs" / "x" / "checkpoint.pt"), ["--level", "a", "--nu", "0", "--seed", "1"]
    flags += ["--exp-name", "stand_in_nu0", "--extra", "x"]
    assert json.load(open(folder / "started"))["flags"] == flags and os.path.isfile(checkpoint)

    # a checkpoint made with other flags is not resumed, nor deleted
    result = run(SWEEP, [*grid, "--", "--extra", "y"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds a checkpoint of a run started with other flags" in result.stderr and os.path.isfile(checkpoint)

    result = run(SWEEP, [*grid, "--dry-run", "--", "--extra", "x"])
    assert "1 to do (1 resumed from their checkpoints)" in result.stdout and f"--resume {checkpoint}" in result.stdout
    result = run(SWEEP, [*grid, "--", "--extra", "x"])
    assert result.returncode == 0 and "resumed  stand_in.py a nu=0 seed=1" in result.stdout, result.stdout + result.stderr
    assert json.load(open(folder / "calls.json")) == [flags, [*flags, "--resume", checkpoint]]
    log = open(folder / "log.txt").read()  # appended to
    assert log.index("attempt 1") < log.index(f"resuming from {checkpoint}") < log.index("attempt 2")
    assert json.load(open(folder / "done"))["flags"] == flags


def test_a_stopped_sweep_stops_its_runs_with_sigterm_and_marks_none_done(tmp_path):
    (tmp_path / "stand_in.py").write_text(RESUMABLE)
    grid = ["--script", str(tmp_path / "stand_in.py"), "--env-flag=--level", "--envs", "a", "--nu", "0", "--seeds", "1"]
    grid += ["--out", str(tmp_path / "sweep")]
    folder = tmp_path / "sweep" / "stand_in" / "a" / "nu0__seed1"
    sweep = subprocess.Popen(
        [sys.executable, SWEEP, *grid], env={**os.environ, "STAND_IN_WAIT": "1"}, stderr=subprocess.PIPE, text=True
    )
    for _ in range(1000):
        if (folder / "ready").exists() or sweep.poll() is not None:
            break
        time.sleep(0.02)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=30) == 130 and "interrupted: 1 runs stopped" in sweep.stderr.read()
    assert (folder / "runs" / "x" / "checkpoint.pt").exists() and not (folder / "done").exists()
    result = run(SWEEP, grid)  # the next sweep resumes it
    assert result.returncode == 0 and json.load(open(folder / "calls.json"))[1][-2] == "--resume", result.stderr


def test_slurm_task_checkpoints_on_sigterm_requeues_itself_and_resumes(tmp_path):
    (tmp_path / "stand_in.py").write_text(RESUMABLE)
    out = tmp_path / "sweep"
    grid = ["--script", str(tmp_path / "stand_in.py"), "--env-flag=--level", "--envs", "a", "--nu", "0", "--seeds", "1"]
    result = run(SWEEP, [*grid, "--out", str(out), "--slurm"])
    assert result.returncode == 0, result.stderr
    sbatch = str(out / "sweep.sbatch")
    text = open(sbatch).read()
    for line in ("--requeue", "--signal=B:TERM@120", "--open-mode=append"):
        assert f"\n#SBATCH {line}\n" in text
    assert subprocess.run(["bash", "-n", sbatch]).returncode == 0
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77"}
    env.update(SLURM_ARRAY_TASK_ID="0", STAND_IN_WAIT="1")

    # SIGTERM to the batch shell (--signal=B:TERM): passed on to the script, which checkpoints; the task requeues itself
    task = subprocess.Popen(["bash", sbatch], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / "stand_in" / "a" / "nu0__seed1"
    for _ in range(1000):
        if (folder / "ready").exists() or task.poll() is not None:
            break
        time.sleep(0.02)
    task.send_signal(signal.SIGTERM)
    stdout, stderr = task.communicate(timeout=30)
    assert task.returncode == 0 and "requeueing 77_0" in stdout, stdout + stderr
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 77_0\n"
    checkpoint = str(folder / "runs" / "x" / "checkpoint.pt")
    assert os.path.isfile(checkpoint) and not (folder / "done").exists()

    # the requeued task starts the file again: it resumes from that checkpoint, then marks the run done
    result = subprocess.run(["bash", sbatch], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = json.load(open(folder / "calls.json"))
    assert len(calls) == 2 and calls[1] == [*calls[0], "--resume", checkpoint]
    assert "attempt 1" in open(folder / "log.txt").read() and (folder / "done").exists()
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 77_0\n"  # not requeued again


@pytest.mark.parametrize(
    "arms, message",
    [
        (["--arm", "A1"], "--arm: expected LABEL=FLAGS"),
        (["--arm", "=--nu 0"], "--arm: a label is letters"),
        (["--arm", "A/1=--nu 0"], "--arm: a label is letters"),
        (["--arm", "A1=--nu 0", "--arm", "a1=--nu 0.1"], "--arm a1: that label is given twice"),
        (["--arm", "A1=nu 0"], "--arm A1: its flags must start with an option"),
        (["--arm", "A1=--mixer 'vdn"], "--arm A1: its flags do not split"),
        (["--arm", "A1=--seed 3"], "--arm A1: must not set --seed: the sweep sets it"),
        (["--arm", "A1=--task line"], "--arm A1: must not set --task"),
        (["--arm", "A1=--ent-coef 0", "--", "--ent-coef", "0.1"], "--arm A1: must not set --ent-coef: the flags after --"),
        (["--arm", "A1=--nu 0", "--arm", "A2=--nu 0"], "--arm A2: the same flags as --arm A1"),
        (["--arm", "A1=--nu 0", "--nu", "0"], "--nu: not with --arm"),
    ],
)
def test_sweep_bad_arms_are_one_line(arms, message, tmp_path):
    result = run(SWEEP, ["--script", "maipg_mpe.py", "--envs", "spread", "--out", "o", *arms], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--script", "no_such_script.py", "--envs", "spread", "--out", "o"], "--script"),
        (["--script", "stand_in.py", "--envs", "x", "--out", "o"], "--env-flag"),
        (["--script", "maipg_mpe.py", "--envs", "spread", "--out", "o", "--", "--seed", "4"], "--seed"),
        (["--script", "maipg_mpe.py", "--envs", "spread", "--out", "o", "--", "--resume=runs/x"], "--resume"),
        (["--script", "maipg_mpe.py", "--envs", "spread", "--nu", "big", "--out", "o"], "--nu"),
        (["--script", "maipg_mpe.py", "--envs", "spread", "--out", "o", "--jobs", "0"], "--jobs"),
    ],
)
def test_sweep_bad_input_is_one_line(args, message, tmp_path):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    result = run(SWEEP, args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "o")


def write_run(folder, task, nu, seed, steps, done=True, record=None, **more):
    """A run folder as sweep.py leaves it, with the hyperparameters text and scalars the scripts log."""
    writer = SummaryWriter(os.path.join(folder, "runs", f"{task}__maipg_mpe_nu{nu}__{seed}__0"))
    hyperparameters = {"exp_name": f"maipg_mpe_nu{nu}", "seed": seed, "task": task, "nu": float(nu), "num_agents": 3, **more}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items()))
    for step in steps:
        writer.add_scalar("eval/episodic_return", seed * 10 + step / 100, step)
        writer.add_scalar("diagnostics/rvar", 0.5, step)
    writer.close()
    if done:
        with open(os.path.join(folder, "done"), "w") as f:
            f.write(json.dumps(record) if record else "")


def test_plot_groups_seeds_aligns_steps_and_tabulates_final_values(tmp_path):
    for task in ("spread", "line"):
        for nu in ("0", "0.05"):
            for seed, offset in ((1, 0), (2, 10)):
                steps = range(100 + offset, 2100 + offset, 100)  # 20 evaluations, seed 2 logged 10 steps later
                write_run(str(tmp_path / task / f"nu{nu}__seed{seed}"), task, nu, seed, steps)
    write_run(str(tmp_path / "spread" / "nu0__seed3"), "spread", "0", 3, [100], done=False)  # unfinished: left out

    result = run(PLOT, [str(tmp_path), "--out", str(tmp_path / "plots")])
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unfinished runs" in result.stdout
    expected = [
        f"{task}__{metric}.png" for task in ("line", "spread") for metric in ("diagnostics_rvar", "eval_episodic_return")
    ]
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(["results.md", *expected])
    table = open(tmp_path / "plots" / "results.md").read()
    returns = table.split("## eval/episodic_return\n")[1].split("##")[0]
    # the last 10 evaluations up to step 2000, where seed 1 stops: seed 1's average 10 + 1550 / 100 = 25.5, seed 2's (its
    # 2010 left out) 20 + 1460 / 100 = 34.6; so 30.05 +- 9.1 / sqrt(2) (sample standard deviation)
    for task in ("line", "spread"):
        assert f"| {task} | nu=0 (MAPPO) | 2 | 2000 | 30.05 ± 6.435 |" in returns
        assert f"| {task} | nu=0.05 | 2 | 2000 | 30.05 ± 6.435 |" in returns
    assert "| spread | nu=0 (MAPPO) | 2 | 2000 | 0.5 ± 0 |" in table.split("## diagnostics/rvar\n")[1]
    assert "spread, nu=0 (MAPPO): eval/episodic_return of seed 2 goes past step 2000, where seed 1 stops" in result.stderr

    # alignment: both seeds are interpolated onto the steps where both have data
    plot = load_plot_module()
    curves = [(np.arange(100, 2100, 100), np.arange(100, 2100, 100) / 100.0), (np.arange(110, 2110, 100), np.ones(20))]
    grid, values = plot.align(curves, window=1)
    assert grid[0] == 110 and grid[-1] == 2000 and len(grid) == 38
    np.testing.assert_allclose(values[0], grid / 100.0)
    np.testing.assert_allclose(values[1], 1.0)


def test_plot_log_y_changes_only_its_metrics_and_rejects_unplotted_ones(tmp_path):
    for seed in (1, 2):
        write_run(str(tmp_path / "runs" / f"nu0__seed{seed}"), "spread", "0", seed, range(100, 1100, 100))
    linear, logarithmic = tmp_path / "linear", tmp_path / "log"
    assert run(PLOT, [str(tmp_path / "runs"), "--out", str(linear)]).returncode == 0
    result = run(PLOT, [str(tmp_path / "runs"), "--out", str(logarithmic), "--log-y", "diagnostics/rvar"])
    assert result.returncode == 0, result.stderr
    rvar, returns = "spread__diagnostics_rvar.png", "spread__eval_episodic_return.png"
    assert (linear / rvar).read_bytes() != (logarithmic / rvar).read_bytes()
    assert (linear / returns).read_bytes() == (logarithmic / returns).read_bytes()  # the same figure, byte for byte

    result = run(PLOT, [str(tmp_path / "runs"), "--metrics", "eval/episodic_return", "--log-y", "diagnostics/rvar"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--log-y: diagnostics/rvar not among the plotted metrics" in result.stderr, result.stderr


def test_plot_compares_seeds_at_a_common_step_ignores_threads_and_has_no_spread_for_one_seed(tmp_path):
    steps = range(100, 2100, 100)
    write_run(str(tmp_path / "nu0__seed1"), "spread", "0", 1, steps, torch_threads=1)
    more = {"torch_threads": 2, "num_workers": 4, "env_timeout": 60.0, "nu_warmup": 200}
    write_run(str(tmp_path / "nu0__seed2"), "spread", "0", 2, steps, **more)
    write_run(str(tmp_path / "nu0__seed3"), "spread", "0", 3, range(100, 1100, 100), torch_threads=1)  # cut short
    write_run(str(tmp_path / "nu0.05__seed1"), "spread", "0.05", 1, steps)
    # a warm-up of nu splits runs with nu > 0, not MAPPO's (nu = 0: the DPG term is off)
    write_run(str(tmp_path / "nu0.05__seed2"), "spread", "0.05", 2, steps, nu_warmup=200)
    result = run(PLOT, [str(tmp_path), "--out", str(tmp_path / "plots"), "--metrics", "eval/episodic_return"])
    assert result.returncode == 0, result.stderr
    rows = [line for line in open(tmp_path / "plots" / "results.md") if line.startswith("| spread")]
    # one group whatever the threads (at nu = 0, the warm-up too); every seed's last 10 evaluations up to step 1000
    # (steps 100-1000) average seed * 10 + 5.5: 15.5, 25.5, 35.5, so 25.5 +- 10; one seed has no spread
    assert rows == [
        "| spread | nu=0 (MAPPO) | 3 | 1000 | 25.5 ± 10 |\n",
        "| spread | nu=0.05, nu_warmup=200 | 1 | 2000 | 35.5 ± n/a |\n",
        "| spread | nu=0.05, nu_warmup=unset | 1 | 2000 | 25.5 ± n/a |\n",
    ]
    assert "of seed 1, 2 goes past step 1000, where seed 3 stops" in result.stderr
    assert "sample standard deviation (ddof = 1)" in open(tmp_path / "plots" / "results.md").read()


def test_plot_groups_and_labels_runs_by_arm(tmp_path):
    for seed in (1, 2):
        # two arms of the same settings (the exp_name aside) stay apart; a run without an arm comes first
        for arm in ("A10", "A2"):
            write_run(str(tmp_path / f"{arm}__seed{seed}"), "spread", "0.05", seed, range(100, 1100, 100), record={"arm": arm})
        write_run(str(tmp_path / f"nu0__seed{seed}"), "spread", "0", seed, range(100, 1100, 100), record={"nu": "0"})
    result = run(PLOT, [str(tmp_path), "--out", str(tmp_path / "plots"), "--metrics", "eval/episodic_return"])
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ")[1:3] for line in open(tmp_path / "plots" / "results.md") if line.startswith("| spread")]
    assert rows == [["nu=0 (MAPPO)", "2"], ["A2", "2"], ["A10", "2"]]


def test_plot_draws_each_band_in_its_curves_colour_after_a_group_without_one(tmp_path):
    write_run(str(tmp_path / "A1__seed1"), "spread", "0.05", 1, range(100, 1100, 100), record={"arm": "A1"})
    for seed in (1, 5):  # A2's seeds lie 40 apart: a wide band
        write_run(str(tmp_path / f"A2__seed{seed}"), "spread", "0.05", seed, range(100, 1100, 100), record={"arm": "A2"})
    result = run(PLOT, [str(tmp_path), "--out", str(tmp_path / "plots"), "--metrics", "eval/episodic_return"])
    assert result.returncode == 0, result.stderr
    pixels = np.round(matplotlib.image.imread(tmp_path / "plots" / "spread__eval_episodic_return.png")[..., :3] * 255)
    tint = {name: 255 - 0.2 * (255 - np.array(rgb)) for name, rgb in {"C0": (31, 119, 180), "C1": (255, 127, 14)}.items()}
    count = {name: int((np.abs(pixels - rgb).max(-1) <= 2).sum()) for name, rgb in tint.items()}
    assert count["C1"] > 1000 and count["C0"] == 0, count  # A2's band is orange like its line, not A1's blue


def test_select_arm_applies_the_studys_rule():
    spec = importlib.util.spec_from_file_location("select_arm", os.path.join(ROOT, "benchmarks", "select_arm.py"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # it imports plot.py, as it does when run from the command line
    select_arm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(select_arm)
    sys.path.pop(0)
    own_flags = {"A1": 0, "A2": 1, "A4": 1, "A4x2": 2, "A5": 1}
    finals = {
        "s1": {"A1": 0, "A2": 1, "A4": 3, "A4x2": 2, "A5": 1.5},
        "s2": {"A1": 0, "A2": 1, "A4": 3, "A4x2": 2, "A5": 1},
        "s3": {"A1": 0, "A2": -1, "A4": 2, "A4x2": 3, "A5": 1},
        "s4": {"A1": 0, "A2": -1, "A4": -1, "A4x2": 3},  # no A5 here: its mean rank is over the settings it ran
    }
    ranks, mean_rank, beats, chosen = select_arm.select(finals, own_flags)
    assert ranks["s2"] == {"A4": 1, "A4x2": 2, "A2": 3.5, "A5": 3.5, "A1": 5}  # equal means share their mean rank
    assert mean_rank["A4"] == 1.875 and mean_rank["A4x2"] == 1.5 and mean_rank["A5"] == pytest.approx(9.5 / 3)
    assert beats == {"A1": 0, "A2": 2, "A4": 3, "A4x2": 4, "A5": 3}
    # A4x2 has the best mean rank; A5 beat A1 in 3 settings and joins; so did A4, but of A4 and A4x2 only one stays
    assert chosen == ["A4x2", "A5"]
    # a tie in mean rank goes to the arm with fewer flags of its own
    assert select_arm.select({"s1": {"A1": 0, "A2": 1, "A4x2": 1}}, own_flags)[3] == ["A2"]


def test_select_arm_reads_a_study_folder_and_refuses_missing_seeds(tmp_path):
    steps = range(100, 1100, 100)
    for arm, seeds in (("A0", (8, 9)), ("A1", (1, 2)), ("A2", (3, 4)), ("A4", (2, 3))):  # returns grow with the seed
        flags = {"A2": ["--dpg-clip"], "A4": ["--dpg-scale", "advantage"]}.get(arm, [])
        for seed in seeds:
            record = {"arm": arm, "flags": ["--task", "spread", "--exp-name", f"maipg_mpe_{arm}", *flags]}
            write_run(str(tmp_path / f"{arm}__seed{seed}"), "spread", "0.05", seed, steps, record=record)
    result = run(os.path.join(ROOT, "benchmarks", "select_arm.py"), [str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "| spread | 20.5 (3) | 40.5 (1) | 30.5 (2) |" in result.stdout and "A0" not in result.stdout.split("\n")[0]
    assert "A6 = A2 (the best mean rank: A2)" in result.stdout
    result = run(os.path.join(ROOT, "benchmarks", "select_arm.py"), [str(tmp_path), "--seeds", "3"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--seeds: spread has 2 seed(s) of arm" in result.stderr and "the rule needs 3" in result.stderr
