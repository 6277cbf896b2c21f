"""Run a grid of MAIPG runs (envs x nu x seeds of one script), several at once on this machine, or write a Slurm array.

    python benchmarks/sweep.py --script maipg_mpe.py --envs spread line formation --nu 0 0.05 --seeds 1 2 3 \\
        --out benchmarks/out/mpe -- --total-timesteps 1000000
    python benchmarks/sweep.py --script maipg_smac.py --envs 3m 2s3z --nu 0 0.05 --seeds 1 2 3 --out benchmarks/out/smax
    python benchmarks/sweep.py ... --slurm --slurm-option=--time=24:00:00     # writes OUT/sweep.sbatch, runs nothing
    python benchmarks/plot.py benchmarks/out/mpe                               # curves and table of the finished runs

Everything after `--` is passed unchanged to every run. The flag naming the env comes from the script
(maipg_mpe.py --task, maipg_smac.py --map, maipg_grf.py --scenario, maipg_continuous.py --env; --env-flag for others).

Each run has its own folder OUT/{script}/{env}/nu{nu}__seed{seed}/ and runs there (so its runs/ lands there) with --nu
{nu} --exp-name {script}_nu{nu}, nu spelled as given (0.050 stays 0.050; of two spellings of one value, the first
runs); its stdout and stderr go to log.txt in that folder. Only after the script exits 0 is a `done` file written
there (atomically, holding the run's flags): a later sweep over the same OUT skips runs that have it, and reruns, from
a clean folder, runs that do not. A `done` run whose flags differ from the requested ones is an error (use another
--out). With --jobs J on C cores each run gets OMP_NUM_THREADS (and --torch-threads for the four maipg_*.py scripts,
--num-workers for maipg_grf.py's env processes) = max(1, C // min(J, runs to do)), so that the runs fill the cores
without oversubscribing them.
Failed runs are listed at the end, with the tail of their logs, and the exit status is 1.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_FLAGS = {"maipg_mpe.py": "--task", "maipg_smac.py": "--map", "maipg_grf.py": "--scenario", "maipg_continuous.py": "--env"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        fail(message)


def fail(message):
    print(f"sweep.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def safe_name(text):
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def make_runs(args, extra):
    """The grid, seed-major (a sweep cut short still has every env and nu at the first seeds), as dicts."""
    script_path = args.script if os.path.isfile(args.script) else os.path.join(ROOT, args.script)
    if not os.path.isfile(script_path):
        fail(f"--script: {args.script} not found (here or in {ROOT})")
    script_path = os.path.abspath(script_path)
    script = os.path.basename(script_path)
    env_flag = args.env_flag or ENV_FLAGS.get(script)
    if env_flag is None:
        fail(f"--env-flag: needed for {script} (known scripts: {', '.join(ENV_FLAGS)})")
    for flag in extra:
        if flag.split("=")[0] in {env_flag, "--nu", "--seed", "--exp-name", "--exp_name"}:
            fail(f"the flags after -- must not set {flag.split('=')[0]}: the sweep sets it (use --envs, --nu, --seeds)")
    bad = [nu for nu in args.nu if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", nu)]
    if bad:
        fail(f"--nu: expected numbers such as 0 or 0.05, got {' '.join(bad)}")
    nus = {}  # as spelled (0.050 stays 0.050, in the folder names and the flags); a value given twice runs once
    for nu in args.nu:
        nus.setdefault(float(nu), nu)
    stem = script[: -len(".py")]
    runs = []
    for seed in dict.fromkeys(args.seeds):  # dict.fromkeys: each value once, in the given order
        for env in dict.fromkeys(args.envs):
            for nu in nus.values():
                flags = [env_flag, env, "--nu", nu, "--seed", str(seed), "--exp-name", f"{stem}_nu{nu}", *extra]
                folder = os.path.join(os.path.abspath(args.out), safe_name(stem), safe_name(env), f"nu{nu}__seed{seed}")
                runs.append(
                    {
                        "script": script,
                        "env": env,
                        "nu": nu,
                        "seed": seed,
                        "flags": flags,
                        "folder": folder,
                        "command": [args.python, script_path, *flags],
                    }
                )
    return runs


def is_done(run):
    """True if the run finished with these flags; an error if it finished with others."""
    marker = os.path.join(run["folder"], "done")
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        finished_flags = json.load(f)["flags"]
    if finished_flags != run["flags"]:
        fail(
            f"--out: {run['folder']} holds a finished run with other flags ({shlex.join(finished_flags)}); "
            "use another --out, or delete that folder"
        )
    return True


def done_record(run):
    return json.dumps({key: run[key] for key in ("script", "env", "nu", "seed", "flags", "command")})


def write_done(run):
    marker = os.path.join(run["folder"], "done")
    with open(marker + ".tmp", "w") as f:
        f.write(done_record(run) + "\n")
    os.replace(marker + ".tmp", marker)


def describe(run):
    return f"{run['script']} {run['env']} nu={run['nu']} seed={run['seed']}"


def log_tail(run, lines=5):
    try:
        with open(os.path.join(run["folder"], "log.txt"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def launch_command(run, threads):
    """The run's command, with --torch-threads for our scripts (they default to 1 thread and ignore OMP_NUM_THREADS), and
    --num-workers for maipg_grf.py (it defaults to a gfootball process per core, however many runs share the cores)."""
    extra = ["--torch-threads", str(threads)] if run["script"] in ENV_FLAGS else []
    return run["command"] + extra + (["--num-workers", str(threads)] if run["script"] == "maipg_grf.py" else [])


def run_locally(runs, jobs, threads):
    """Keeps up to `jobs` runs going; returns the failed runs with their exit status."""
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    pending, running, failed, finished = list(runs), [], [], 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                shutil.rmtree(run["folder"], ignore_errors=True)  # leftovers of an attempt that did not finish
                os.makedirs(run["folder"])
                log = open(os.path.join(run["folder"], "log.txt"), "w")
                command = launch_command(run, threads)
                process = subprocess.Popen(command, cwd=run["folder"], env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((process, log, run, time.time()))
                print(f"started  {describe(run)}", flush=True)
            time.sleep(0.2)
            for item in [item for item in running if item[0].poll() is not None]:
                process, log, run, start = item
                running.remove(item)
                log.close()
                finished += 1
                status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                if process.returncode == 0:
                    write_done(run)
                else:
                    failed.append((run, process.returncode))
                print(f"[{finished}/{len(runs)}] {status:<8} {describe(run)} in {time.time() - start:.0f} s", flush=True)
    except KeyboardInterrupt:
        for process, log, _, _ in running:
            process.terminate()
            process.wait()
            log.close()
        print(f"interrupted: {len(running)} runs stopped, {len(pending)} not started", file=sys.stderr)
        sys.exit(130)
    return failed


def write_sbatch(runs, path, threads, options):
    """One array task per run: the same command, folder, log and `done` marker as a local run."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=maipg-sweep",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --cpus-per-task={threads}",
        f"#SBATCH --output={os.path.join(os.path.dirname(path), 'slurm-%A_%a.out')}",
        *[f"#SBATCH {option}" for option in options],
        f"# written by: {shlex.join(sys.argv)}",
        *[f"export {name}={threads}" for name in THREAD_VARIABLES],
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for index, run in enumerate(runs):
        lines += [
            f"{index})  # {describe(run)}",
            f"    folder={shlex.quote(run['folder'])}",
            f"    command=({shlex.join(launch_command(run, threads))})",
            f"    record={shlex.quote(done_record(run))} ;;",
        ]
    lines += [
        '*) echo "no run for array task $SLURM_ARRAY_TASK_ID"; exit 1 ;;',
        "esac",
        'if [ -f "$folder/done" ]; then echo "already done: $folder"; exit 0; fi',
        'rm -rf "$folder" && mkdir -p "$folder" && cd "$folder" || exit 1',
        '"${command[@]}" > log.txt 2>&1 || exit $?',
        "printf '%s\\n' \"$record\" > done.tmp && mv done.tmp done",
    ]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--script", required=True, help="the script to run, e.g. maipg_mpe.py (looked up here, then in the repo)"
    )
    parser.add_argument("--envs", nargs="+", required=True, help="the tasks / maps / scenarios / envs to run")
    parser.add_argument(
        "--env-flag", help="the script's flag naming the env, e.g. --env-flag=--task (known for the maipg_*.py scripts)"
    )
    parser.add_argument("--nu", nargs="+", default=["0", "0.05"], help="the nu values (default: 0 0.05)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="the seeds (default: 1 2 3)")
    parser.add_argument("--out", required=True, help="the sweep's folder: one subfolder per run")
    parser.add_argument("--jobs", type=int, default=available_cores(), help="runs at once (default: the number of cores)")
    parser.add_argument("--threads", type=int, help="threads per run (default: max(1, cores // runs at once); 1 with --slurm)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the scripts (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs to do, run nothing")
    parser.add_argument("--slurm", action="store_true", help="write OUT/sweep.sbatch (a job array, one task per run to do)")
    parser.add_argument(
        "--slurm-option", action="append", default=[], help="an #SBATCH line, e.g. --slurm-option=--time=8:00:00"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        fail("--jobs and --threads must be at least 1")

    runs = make_runs(args, extra)
    todo = [run for run in runs if not is_done(run)]
    threads = args.threads or (1 if args.slurm else max(1, available_cores() // min(args.jobs, max(1, len(todo)))))
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already done, {len(todo)} to do", flush=True)
    if args.dry_run:
        for run in todo:
            print(f"cd {shlex.quote(run['folder'])} && {shlex.join(launch_command(run, threads))}")
    elif args.slurm:
        if todo:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(os.path.abspath(args.out), "sweep.sbatch")
            write_sbatch(todo, path, threads, args.slurm_option)
            print(f"wrote {path} ({len(todo)} array tasks); submit it with: sbatch {path}")
    elif todo:
        print(f"running {min(args.jobs, len(todo))} at once, OMP_NUM_THREADS={threads} each", flush=True)
        failed = run_locally(todo, args.jobs, threads)
        print(f"{len(todo) - len(failed)} runs finished, {len(failed)} failed", flush=True)
        for run, returncode in failed:
            print(
                f"FAILED (exit {returncode}): {describe(run)}; log: {os.path.join(run['folder'], 'log.txt')}", file=sys.stderr
            )
            print("    " + log_tail(run).rstrip().replace("\n", "\n    "), file=sys.stderr)
        sys.exit(1 if failed else 0)
