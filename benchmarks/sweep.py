"""Run a grid of MAIPG runs (envs x nu values or named arms x seeds of one script), several at once on this machine, or
write a Slurm array.

    python benchmarks/sweep.py --script maipg_mpe.py --envs spread line formation --nu 0 0.05 --seeds 1 2 3 \\
        --out benchmarks/out/mpe -- --total-timesteps 1000000
    python benchmarks/sweep.py --script maipg_smac.py --envs 3m 2s3z --nu 0 0.05 --seeds 1 2 3 --out benchmarks/out/smax
    python benchmarks/sweep.py --script maipg_mpe.py --envs spread --arm "A0=--nu 0" --arm "A1=--nu 0.05" \\
        --arm "A2=--nu 0.05 --mixer vdn" --seeds 1 2 3 --out benchmarks/out/study   # a study: one arm per setting
    python benchmarks/sweep.py ... --slurm --slurm-option=--time=24:00:00 -- --checkpoint-interval 20   # sbatch file
    python benchmarks/plot.py benchmarks/out/mpe                               # curves and table of the finished runs

Everything after `--` is passed unchanged to every run. The flag naming the env comes from the script
(maipg_mpe.py --task, maipg_smac.py --map, maipg_grf.py --scenario, maipg_continuous.py --env; --env-flag for others).

The settings compared are either a --nu grid (default 0 0.05) or named arms, not both: --arm LABEL=FLAGS (repeatable)
adds FLAGS (one shell-quoted string, e.g. "--nu 0.05 --mixer vdn"; empty for the script's defaults) to the runs of arm
LABEL, so an arm that wants a nu gives it in its flags. A label is letters, digits, '.', '_' and '-'; labels must
differ (also in case), so must the arms' flags, and an arm must not set what the sweep sets (the env flag, --seed,
--exp-name) nor what the flags after `--` set.

Each run has its own folder OUT/{script}/{env}/{name}__seed{seed}/ and runs there (so its runs/ lands there) with
--exp-name {script}_{name}, where name is nu{nu} for a nu (spelled as given: 0.050 stays 0.050; of two spellings of
one value, the first runs; passed as --nu {nu}) or the arm's label; its stdout and stderr go to log.txt in that folder,
and a `started` file (its settings and flags) is written when it starts. Only after the script exits 0 is a `done`
file written there (atomically, also holding its command; plot.py groups and labels by the arm in it): a later sweep
over the same OUT skips runs that have it. A run without it is resumed if its folder holds a checkpoint (the newest
runs/*/checkpoint.pt, which the maipg_*.py scripts write every --checkpoint-interval updates and on SIGTERM): the
script gets --resume PATH and log.txt is appended to; without a checkpoint it is rerun from a clean folder. A `done`
run, or a checkpoint, made with other flags than the requested ones is an error (use another --out, or delete that
folder). With --jobs J on C cores each run gets OMP_NUM_THREADS (and --torch-threads for the four maipg_*.py scripts,
--num-workers for maipg_grf.py's env processes) = max(1, C // min(J, runs to do)), so that the runs fill the cores
without oversubscribing them. Failed runs are listed at the end, with the tail of their logs, and the exit status is 1.
Ctrl-C or SIGTERM stops the sweep: it sends the runs SIGTERM (they checkpoint at the end of their update and exit;
Ctrl-C again kills them) and marks none of them done, so the next sweep resumes them.

--slurm writes OUT/sweep.sbatch, one array task per run to do, doing what a local run does (skip if `done`, resume
from a checkpoint, else start clean) each time the task starts, and made to survive preemption and time limits:
- #SBATCH --requeue: a task that is preempted (where the partition's PreemptMode is REQUEUE) or whose node fails goes
  back to the queue instead of being cancelled, and Slurm starts the batch script again from its top, so it resumes.
  At preemption Slurm sends SIGTERM at the start of GraceTime and kills the job at its end; where that SIGTERM does
  not reach the batch script (by default it goes to the job's steps only), the script is killed and the task resumes
  from its last periodic checkpoint: pass --checkpoint-interval N after `--` on such partitions.
- #SBATCH --signal=B:TERM@120: about 120 s (Slurm may send it up to 60 s early) before the time limit, and also at
  preemption where the site sets PreemptParameters=send_user_signal, the batch shell gets SIGTERM. It passes it on to
  the script (run in the background, so that the trap runs at once), waits for it to checkpoint and exit, and then,
  if a checkpoint newer than this attempt exists, requeues its own task (scontrol requeue JOB_TASK): a time limit
  does not requeue by itself. It writes `done` only when the script exits 0 and the shell saw no SIGTERM (the scripts
  exit 0 after one too; a SIGTERM sent to the whole batch step reaches the shell as well). A task stopped before it
  writes a new checkpoint is not requeued (so it cannot loop); give long updates more time, e.g.
  --slurm-option=--signal=B:TERM@600.
- #SBATCH --open-mode=append: a requeued task's slurm-*.out keeps the earlier attempts' lines.
"""

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
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


def options(flags):
    return {flag.split("=")[0] for flag in flags if flag.startswith("-")}


def parse_arms(specs, reserved, extra):
    """{label: flags} from --arm LABEL=FLAGS, or one line and exit 2 for a bad arm."""
    arms = {}
    for spec in specs:
        label, sep, text = spec.partition("=")
        if not sep:
            fail(f'--arm: expected LABEL=FLAGS, e.g. --arm "A1=--nu 0.05", got {spec!r}')
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
            fail(f"--arm: a label is letters, digits, '.', '_' and '-', starting with a letter or digit; got {label!r}")
        if label.lower() in map(str.lower, arms):  # lower: A1 and a1 would share a folder on macOS
            fail(f"--arm {label}: that label is given twice")
        try:
            flags = shlex.split(text)
        except ValueError as error:
            fail(f"--arm {label}: its flags do not split like a shell line ({error})")
        if flags and not flags[0].startswith("-"):
            fail(f"--arm {label}: its flags must start with an option such as --nu, got {flags[0]!r}")
        for taken, why in ((reserved, "the sweep sets it"), (options(extra), "the flags after -- set it for every run")):
            if options(flags) & taken:
                fail(f"--arm {label}: must not set {' '.join(sorted(options(flags) & taken))}: {why}")
        same = [other for other, other_flags in arms.items() if other_flags == flags]
        if same:
            fail(f"--arm {label}: the same flags as --arm {same[0]}")
        arms[label] = flags
    return arms


def make_runs(args, extra):
    """The grid, seed-major (a sweep cut short still has every env and nu or arm at the first seeds), as dicts."""
    script_path = args.script if os.path.isfile(args.script) else os.path.join(ROOT, args.script)
    if not os.path.isfile(script_path):
        fail(f"--script: {args.script} not found (here or in {ROOT})")
    script_path = os.path.abspath(script_path)
    script = os.path.basename(script_path)
    env_flag = args.env_flag or ENV_FLAGS.get(script)
    if env_flag is None:
        fail(f"--env-flag: needed for {script} (known scripts: {', '.join(ENV_FLAGS)})")
    reserved = {env_flag, "--seed", "--exp-name", "--exp_name", "--resume"}
    taken = options(extra) & (reserved | (set() if args.arm else {"--nu"}))
    if taken:
        fail(f"the flags after -- must not set {' '.join(sorted(taken))}: the sweep sets it (use --envs, --nu, --seeds)")
    stem = script[: -len(".py")]
    if args.arm:  # (key, value, name in folders and --exp-name, flags before --seed, flags after --exp-name)
        if args.nu is not None:
            fail('--nu: not with --arm; give nu in the arms\' flags, e.g. --arm "A1=--nu 0.05"')
        settings = [("arm", label, label, [], flags) for label, flags in parse_arms(args.arm, reserved, extra).items()]
    else:
        given = args.nu or ["0", "0.05"]
        bad = [nu for nu in given if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", nu)]
        if bad:
            fail(f"--nu: expected numbers such as 0 or 0.05, got {' '.join(bad)}")
        nus = {}  # as spelled (0.050 stays 0.050, in the folder names and the flags); a value given twice runs once
        for nu in given:
            nus.setdefault(float(nu), nu)
        settings = [("nu", nu, f"nu{nu}", ["--nu", nu], []) for nu in nus.values()]
    runs = []
    for seed in dict.fromkeys(args.seeds):  # dict.fromkeys: each value once, in the given order
        for env in dict.fromkeys(args.envs):
            for key, value, name, before, after in settings:
                flags = [env_flag, env, *before, "--seed", str(seed), "--exp-name", f"{stem}_{name}", *after, *extra]
                folder = os.path.join(os.path.abspath(args.out), safe_name(stem), safe_name(env), f"{name}__seed{seed}")
                runs.append(
                    {
                        "script": script,
                        "env": env,
                        key: value,
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


def record(run, *more):
    """The run's record as one line of JSON: `started` (its settings and flags) holds this, `done` also the command."""
    return json.dumps({key: run[key] for key in ("script", "env", "nu", "arm", "seed", "flags", *more) if key in run})


def write_file(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def find_checkpoint(run):
    """The newest runs/*/checkpoint.pt an unfinished attempt left in the run's folder, to resume from, or None; an error
    if the attempt was started with other flags (its `started` record; an attempt without one is trusted)."""
    pattern = os.path.join(glob.escape(run["folder"]), "runs", "*", "checkpoint.pt")
    checkpoints = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not checkpoints:
        return None
    try:
        with open(os.path.join(run["folder"], "started")) as f:
            started = f.read().strip()
    except OSError:
        started = record(run)
    if started != record(run):
        fail(
            f"--out: {run['folder']} holds a checkpoint of a run started with other flags or settings (its `started`: "
            f"{started}); use another --out, or delete that folder"
        )
    return checkpoints[-1]


def describe(run):
    setting = f"arm={run['arm']}" if "arm" in run else f"nu={run['nu']}"
    return f"{run['script']} {run['env']} {setting} seed={run['seed']}"


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


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run_locally(runs, jobs, threads):
    """Keeps up to `jobs` runs going; returns the failed runs with their exit status."""
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    pending, running, failed, finished = list(runs), [], [], 0
    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: stop the runs, so that they write their checkpoints
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                command, log_path = launch_command(run, threads), os.path.join(run["folder"], "log.txt")
                if run["checkpoint"]:
                    command += ["--resume", run["checkpoint"]]
                    log = open(log_path, "a")
                    log.write(f"--- sweep.py: resuming from {run['checkpoint']} ---\n")
                    log.flush()
                else:
                    shutil.rmtree(run["folder"], ignore_errors=True)  # leftovers of an attempt that left no checkpoint
                    os.makedirs(run["folder"])
                    write_file(os.path.join(run["folder"], "started"), record(run))
                    log = open(log_path, "w")
                # a session of its own: Ctrl-C reaches only the sweep, which stops the runs with SIGTERM (see below)
                process = subprocess.Popen(
                    command, cwd=run["folder"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                running.append((process, log, run, time.time()))
                print(f"{'resumed' if run['checkpoint'] else 'started'}  {describe(run)}", flush=True)
            time.sleep(0.2)
            for item in [item for item in running if item[0].poll() is not None]:
                process, log, run, start = item
                running.remove(item)
                log.close()
                finished += 1
                status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                if process.returncode == 0:
                    write_file(os.path.join(run["folder"], "done"), record(run, "command"))
                else:
                    failed.append((run, process.returncode))
                print(f"[{finished}/{len(runs)}] {status:<8} {describe(run)} in {time.time() - start:.0f} s", flush=True)
    except KeyboardInterrupt:  # SIGTERM: the maipg_*.py scripts checkpoint at the end of the update and exit
        print(f"stopping {len(running)} runs (Ctrl-C again kills them)", file=sys.stderr, flush=True)
        for process, *_ in running:
            process.terminate()
        try:
            for process, *_ in running:
                process.wait()
        except KeyboardInterrupt:
            for process, *_ in running:
                process.kill()
                process.wait()
        for _, log, _, _ in running:
            log.close()
        print(
            f"interrupted: {len(running)} runs stopped (not `done`; the next sweep resumes those with a checkpoint), "
            f"{len(pending)} not started",
            file=sys.stderr,
        )
        sys.exit(130)
    return failed


def write_sbatch(runs, path, threads, options):
    """One array task per run: the same command, folder, log, `started` and `done` records and resumption as a local run,
    and, on a SIGTERM before the time limit, a checkpoint and a requeue (see the comments in the file)."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=maipg-sweep",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --cpus-per-task={threads}",
        f"#SBATCH --output={os.path.join(os.path.dirname(path), 'slurm-%A_%a.out')}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
        *[f"#SBATCH {option}" for option in options],
        f"# written by: {shlex.join(sys.argv)}",
        "# --requeue: a task preempted (PreemptMode=REQUEUE) or on a failed node goes back to the queue and starts",
        "#   again, resuming from the newest runs/*/checkpoint.pt of its run (pass --checkpoint-interval N after --).",
        "# --signal=B:TERM@120: about 120 s before the time limit (and at preemption, with send_user_signal) this",
        "#   shell gets SIGTERM and passes it on; the script checkpoints at the end of its update and exits, and the",
        "#   task requeues itself if that wrote a checkpoint. Long updates: --slurm-option=--signal=B:TERM@600",
        *[f"export {name}={threads}" for name in THREAD_VARIABLES],
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for index, run in enumerate(runs):
        lines += [
            f"{index})  # {describe(run)}",
            f"    folder={shlex.quote(run['folder'])}",
            f"    command=({shlex.join(launch_command(run, threads))})",
            f"    started={shlex.quote(record(run))}",
            f"    record={shlex.quote(record(run, 'command'))} ;;",
        ]
    lines += [
        '*) echo "no run for array task $SLURM_ARRAY_TASK_ID"; exit 1 ;;',
        "esac",
        'if [ -f "$folder/done" ]; then echo "already done: $folder"; exit 0; fi',
        'checkpoint=$(ls -t "$folder"/runs/*/checkpoint.pt 2>/dev/null | head -n 1)',
        'if [ -n "$checkpoint" ]; then',
        '    if [ -f "$folder/started" ] && [ "$(cat "$folder/started")" != "$started" ]; then',
        '        echo "$folder holds a checkpoint of a run started with other flags; delete that folder" >&2; exit 2',
        "    fi",
        '    cd "$folder" || exit 1',
        '    command+=(--resume "$checkpoint")',
        '    echo "--- sbatch task ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID: resuming from $checkpoint ---" >> log.txt',
        "else",
        '    rm -rf "$folder" && mkdir -p "$folder" && cd "$folder" || exit 1',
        "    printf '%s\\n' \"$started\" > started.tmp && mv started.tmp started",
        "fi",
        "touch attempt  # a checkpoint newer than this is progress",
        "stopped=0",
        '"${command[@]}" >> log.txt 2>&1 &',
        "pid=$!",
        "trap 'stopped=1; kill -TERM \"$pid\" 2>/dev/null' TERM",
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped SIGTERM interrupts wait: wait on',
        'wait "$pid"; status=$?',
        'if [ "$stopped" = 1 ]; then',
        '    if [ -n "$(find runs -name checkpoint.pt -newer attempt 2>/dev/null)" ]; then',
        '        echo "stopped by SIGTERM with a new checkpoint: requeueing ${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"',
        '        scontrol requeue "${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"; exit 0',
        "    fi",
        '    echo "stopped by SIGTERM without a new checkpoint (exit $status): not requeued" >&2; exit 1',
        "fi",
        '[ "$status" = 0 ] || exit "$status"',
        "printf '%s\\n' \"$record\" > done.tmp && mv done.tmp done",
    ]
    write_file(path, "\n".join(lines))


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
    parser.add_argument("--nu", nargs="+", help="the nu values (default: 0 0.05); not with --arm")
    arm_help = 'a named setting, repeatable: its label and its flags, e.g. --arm "A0=--nu 0" --arm "A2=--nu 0.05 --mixer vdn"'
    parser.add_argument("--arm", action="append", metavar="LABEL=FLAGS", help=arm_help)
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
    todo = [{**run, "checkpoint": find_checkpoint(run)} for run in runs if not is_done(run)]
    threads = args.threads or (1 if args.slurm else max(1, available_cores() // min(args.jobs, max(1, len(todo)))))
    resumed = sum(bool(run["checkpoint"]) for run in todo)
    print(
        f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already done, {len(todo)} to do"
        + (f" ({resumed} resumed from their checkpoints)" if resumed else ""),
        flush=True,
    )
    if args.dry_run:
        for run in todo:
            resume = ["--resume", run["checkpoint"]] if run["checkpoint"] else []
            print(f"cd {shlex.quote(run['folder'])} && {shlex.join(launch_command(run, threads) + resume)}")
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
