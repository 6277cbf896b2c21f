"""Speed of maipg_mpe.py's two env backends, on this machine, in one run:

(a) env-only throughput (env steps/s, random actions) of the NumPy port and of mpe2, 128 envs x 5 agents, per task;
(b) full training SPS of the default spread setting (128 envs x 25 steps, 10 epochs) on each backend, with 1 torch
thread (the default) and with 2; and their ratios.

    python benchmarks/mpe_speed.py                 # about 2 minutes on 2 cores
    python benchmarks/mpe_speed.py --updates 2     # shorter training runs
"""

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import maipg_mpe  # noqa: E402


def env_steps_per_second(make, num_envs, seconds):
    envs = make()
    envs.reset()
    rng = np.random.default_rng(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        envs.step(rng.integers(0, envs.n_actions, size=(num_envs, envs.num_agents)))
        steps += num_envs
    rate = steps / (time.perf_counter() - start)
    envs.close()
    return rate


def training_sps(backend, threads, updates):
    command = [sys.executable, os.path.join(ROOT, "maipg_mpe.py"), "--task", "spread", "--env-backend", backend]
    command += ["--torch-threads", str(threads)]
    command += ["--total-timesteps", str(updates * 128 * 25), "--eval-interval", "0"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=os.path.join(ROOT, "benchmarks")).stdout
    return int(re.search(r"done: .* (\d+) SPS", out).group(1)), float(re.search(r"env stepping took (\d+)%", out).group(1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, default=128)
    parser.add_argument("--num-agents", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per env-only measurement")
    parser.add_argument("--updates", type=int, default=3, help="updates per training measurement")
    args = parser.parse_args()

    print(f"(a) env-only, {args.num_envs} envs x {args.num_agents} agents, random actions, env steps/s")
    print("| task | numpy port | mpe2 | ratio |\n|---|---|---|---|")
    for task in ("spread", "line", "formation"):
        rates = [
            env_steps_per_second(
                lambda cls=cls, task=task: cls(task, args.num_agents, list(range(args.num_envs))), args.num_envs, args.seconds
            )
            for cls in (maipg_mpe.NumpyMPE, maipg_mpe.MPE2Envs)
        ]
        print(f"| {task} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.0f}x |", flush=True)

    print(f"\n(b) training, default spread setting (128 envs x 25 steps, 10 epochs), {args.updates} updates, SPS")
    print("| torch threads | numpy port SPS (env share) | mpe2 SPS (env share) | ratio |\n|---|---|---|---|")
    for threads in (1, 2):
        (port_sps, port_env), (mpe2_sps, mpe2_env) = [training_sps(b, threads, args.updates) for b in ("numpy", "mpe2")]
        print(
            f"| {threads} | {port_sps} ({port_env:.0f}%) | {mpe2_sps} ({mpe2_env:.0f}%) | {port_sps / mpe2_sps:.1f}x |",
            flush=True,
        )
