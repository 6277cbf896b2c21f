"""What a checkpoint costs: its size and the time to write it, at each script's default settings.

Each script trains for one update at its defaults (evaluation off) with --checkpoint-interval 1 in a temporary folder;
the checkpoint it wrote is then loaded and written again with the script's own save_atomically, --repeats times, and
the median write time is printed beside the file's size and the update's wall time.

    python benchmarks/checkpoint_cost.py                                   # MPE spread, SMAX 2s3z, MaMuJoCo HalfCheetah
    python benchmarks/checkpoint_cost.py --scripts maipg_grf.py            # GRF (50 envs, about 6 GB, a minute or more)
"""

import argparse
import glob
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ONE_UPDATE = {  # env steps of one update at the defaults (num_envs x num_steps)
    "maipg_mpe.py": 128 * 25,
    "maipg_smac.py": 8 * 400,  # 2s3z's preset keeps the default 8 envs x 400 steps
    "maipg_continuous.py": 8 * 1000,
    "maipg_grf.py": 50 * 200,
}
SETTING = {"maipg_smac.py": ["--map", "2s3z"]}


def cost(script, repeats):
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, os.path.join(ROOT, script), *SETTING.get(script, [])]
        command += ["--total-timesteps", str(ONE_UPDATE[script]), "--eval-interval", "0", "--checkpoint-interval", "1"]
        start = time.perf_counter()
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
        wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(folder, "runs", "*", "checkpoint.pt"))
        checkpoint = torch.load(path, weights_only=False)
        save_atomically = importlib.import_module(script[:-3]).save_atomically
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            save_atomically(checkpoint, os.path.join(folder, "again.pt"))
            times.append(time.perf_counter() - start)
        return os.path.getsize(path), statistics.median(times), wall


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=["maipg_mpe.py", "maipg_smac.py", "maipg_continuous.py"])
    parser.add_argument("--repeats", type=int, default=5, help="writes timed per checkpoint (the median is printed)")
    args = parser.parse_args()
    print("| script, default setting | checkpoint size | write time (median) | one update, process start included |")
    print("|---|---|---|---|")
    for script in args.scripts:
        size, write, wall = cost(script, args.repeats)
        print(
            f"| {script} {' '.join(SETTING.get(script, []))} | {size / 2**20:.1f} MiB | {write * 1000:.0f} ms | {wall:.0f} s |"
        )
