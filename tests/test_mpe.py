"""maipg_mpe.py end to end: smoke runs of every task on both backends, save then --eval-only, bad input, a NaN stop,
nu = 0 being MAPPO update for update, and a short learning test."""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import imageio
import numpy as np
import pytest
import torch

import maipg_mpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "maipg_mpe.py")
TINY = ["--num-envs", "3", "--num-steps", "25", "--total-timesteps", "150", "--update-epochs", "2", "--eval-episodes", "2"]


def run(args, cwd, check=True):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def saved_model(cwd):
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", "maipg_mpe.pt"))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("backend", ["numpy", "mpe2"])
@pytest.mark.parametrize("task", ["spread", "line", "formation"])
def test_smoke(task, backend, tmp_path):
    result = run(["--task", task, "--env-backend", backend, "--num-agents", "3", "--eval-interval", "1", *TINY], tmp_path)
    assert "update 2/2" in result.stdout and "SPS" in result.stdout
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    logged = scalars(run_dir)
    losses = {tag: values for tag, values in logged.items() if tag.startswith("losses/")}
    assert {"losses/policy_loss", "losses/dpg_loss", "losses/value_loss", "losses/q_loss"} <= set(losses)
    assert {"eval/episodic_return", "charts/episodic_return", "diagnostics/rvar"} <= set(logged)
    assert all(len(values) == 2 and np.isfinite(values).all() for values in losses.values()), losses


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [scalar.value for scalar in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("recurrent", ["--recurrent", "--no-recurrent"])
def test_learning_rate_zero_gives_exactly_zero_kl_and_clipfrac(recurrent, tmp_path):
    """With lr 0 the policy never moves, so the training pass must give back the rollout's log-probabilities bit for
    bit: any slip in the chunks (25 steps in chunks of 10, the last padded), the hidden states entering them, the
    padding or the minibatch indexing shows as approx_kl or clipfrac != 0."""
    flags = ["--num-agents", "3", "--num-minibatches", "2", "--learning-rate", "0", "--eval-interval", "0", recurrent]
    run([*flags, *TINY, "--total-timesteps", "225"], tmp_path)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    logged = scalars(run_dir)
    assert logged["losses/approx_kl"] == [0.0] * 3 and logged["losses/clipfrac"] == [0.0] * 3


def test_logged_keys(tmp_path):
    run(
        ["--task", "spread", "--num-agents", "3", "--log-grad-var", "--joint-q-diagnostic", "--eval-interval", "1", *TINY],
        tmp_path,
    )
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    logged = scalars(run_dir)
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate", "charts/q_tot_mean"}
    expected |= {f"losses/{name}" for name in ("policy_loss", "dpg_loss", "value_loss", "q_loss", "entropy", "approx_kl")}
    expected |= {"losses/clipfrac", "losses/explained_variance", "losses/joint_q_loss", "eval/episodic_return"}
    expected |= {"diagnostics/rvar", "diagnostics/rvar_joint", "diagnostics/grad_var", "charts/nu"}
    expected |= {"diagnostics/mixer_slope", "diagnostics/q_gap", "diagnostics/dpg_grad_ratio"}
    expected |= {"diagnostics/cv_corr", "diagnostics/rvar_own", "diagnostics/q_explained_variance"}
    expected |= {"diagnostics/q_explained_variance_mc"}
    assert expected <= set(logged), expected - set(logged)
    assert all(len(values) == 2 for values in logged.values())  # one value per update
    assert all(value > 0 for value in logged["diagnostics/rvar"] + logged["diagnostics/grad_var"])


def test_save_model_then_eval_only(tmp_path):
    run(["--task", "line", "--num-agents", "3", "--no-recurrent", "--save-model", *TINY], tmp_path)
    (path,) = glob.glob(os.path.join(tmp_path, "runs", "*", "maipg_mpe.pt"))
    checkpoint = torch.load(path, weights_only=True)
    assert {"args", "actor", "critic", "agent_q", "mixer", "value_norm"} <= set(checkpoint)
    assert checkpoint["value_norm"]["debiasing_term"] > 0  # the normaliser's state travels with the model
    assert not glob.glob(os.path.join(tmp_path, "runs", "*", "*.tmp"))
    result = run(["--eval-only", path, "--eval-episodes", "3", "--capture-video"], tmp_path)
    assert "3 greedy episodes" in result.stdout and "line" in result.stdout
    (gif,) = glob.glob(os.path.join(tmp_path, "videos", "*.gif"))  # rendered by mpe2, a frame per step of the episode
    frames = imageio.mimread(gif)  # (the GIF writer may merge identical consecutive frames)
    assert len(frames) >= 20 and frames[0].shape == (700, 700, 3)


def test_nu_zero_is_mappo(tmp_path):
    """With nu = 0 the actor and V must not depend on the Q branch at all: runs from the same seed whose Q branches
    differ completely (mixer, TD(lambda), target rate; the diagnostics that train a joint Q and take extra actor
    gradients) end with identical actor and V parameters (so they also saw the same rollouts). The control: with nu > 0
    the same change of the Q branch does move the actor. (The flags of L_dpg alone, which nu = 0 skips, are tested at
    nu > 0 below.)"""
    common = ["--task", "spread", "--num-agents", "3", "--save-model", "--eval-interval", "0", *TINY]
    runs = {}
    for name, extra in {
        "qmix": ["--nu", "0", "--mixer", "qmix"],
        "vdn": ["--nu", "0", "--mixer", "vdn", "--td-lambda", "0.3", "--target-tau", "0.5"],
        "qmix_nu": ["--nu", "0.5", "--mixer", "qmix"],
        "vdn_nu": ["--nu", "0.5", "--mixer", "vdn", "--td-lambda", "0.3", "--target-tau", "0.5"],
        # the flags that still act at nu = 0, on the Q branch or beside it: none of them may touch the actor or V
        "flags": ["--nu", "0", "--joint-q-diagnostic", "--log-grad-var"],
    }.items():
        os.makedirs(tmp_path / name)
        run(extra + common, tmp_path / name)
        runs[name] = saved_model(tmp_path / name)
    for net in ("actor", "critic"):
        for key, value in runs["qmix"][net].items():
            for other in ("vdn", "flags"):
                assert torch.equal(value, runs[other][net][key]), f"nu = 0, {other}: {net}.{key} depends on the Q branch"
    assert not torch.equal(runs["qmix"]["agent_q"]["head.weight"], runs["vdn"]["agent_q"]["head.weight"])
    assert not torch.equal(runs["qmix_nu"]["actor"]["head.weight"], runs["vdn_nu"]["actor"]["head.weight"])


def test_the_flags_of_l_dpg_change_a_run_with_nu_above_0(tmp_path):
    """--dpg-scale and --nu-warmup act only through L_dpg, which nu = 0 skips: at nu > 0 each must move the actor."""
    common = ["--task", "spread", "--num-agents", "3", "--save-model", "--eval-interval", "0", "--nu", "0.5", *TINY]
    actors = {}
    for name, extra in {
        "base": ["--nu-warmup", "0"],  # --dpg-scale advantage, MPE's default
        "dpg_scale": ["--nu-warmup", "0", "--dpg-scale", "raw"],
        "nu_warmup": ["--nu-warmup", "75"],  # nu = 0 in update 1, 0.5 in update 2
    }.items():
        os.makedirs(tmp_path / name)
        run(extra + common, tmp_path / name)
        actors[name] = saved_model(tmp_path / name)["actor"]
    for flag in ("dpg_scale", "nu_warmup"):
        assert not torch.equal(actors["base"]["head.weight"], actors[flag]["head.weight"]), f"--{flag} changed nothing"


def run_main_in_process(flags, cwd, monkeypatch, patch):
    """Runs maipg_mpe.py's __main__ in this process on the script's own functions, after patch(namespace) has wrapped
    some of them: a test can watch what the training loop passes them."""
    with open(SCRIPT) as f:
        definitions, main = f.read().split('\nif __name__ == "__main__":\n')
    module = types.ModuleType("maipg_mpe_main")
    module.__file__ = SCRIPT
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(definitions, SCRIPT, "exec"), module.__dict__)
    patch(module.__dict__)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    try:
        exec(compile(textwrap.dedent(main), SCRIPT, "exec"), module.__dict__)
    finally:  # Preemption and the seeding changed process-wide settings
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dpg_scale", ["advantage", "raw"])
def test_the_training_loop_divides_l_dpg_by_the_raw_advantages_std(dpg_scale, tmp_path, monkeypatch):
    """--dpg-scale advantage (MPE's default): every actor loss of an update divides L_dpg by the std of that rollout's
    raw advantages (+ 1e-5), the number that normalises them; --dpg-scale raw: by 1."""
    updates = []

    def patch(namespace):
        normalize_advantages, weighted_var = namespace["normalize_advantages"], namespace["weighted_var"]
        dpg_loss, actor_loss = namespace["dpg_loss"], namespace["actor_loss"]

        def watched_normalize_advantages(raw_advantages, weights):
            raw_std = weighted_var(raw_advantages, weights).sqrt() + 1e-5
            updates.append({"raw_std": raw_std, "dpg": [], "divided": []})
            return normalize_advantages(raw_advantages, weights)

        def watched_dpg_loss(*args):
            updates[-1]["dpg"].append(dpg_loss(*args))
            return updates[-1]["dpg"][-1]

        def watched_actor_loss(*args):
            loss, parts = actor_loss(*args)
            updates[-1]["divided"].append(parts["dpg_loss"])
            return loss, parts

        namespace |= {"normalize_advantages": watched_normalize_advantages, "dpg_loss": watched_dpg_loss}
        namespace["actor_loss"] = watched_actor_loss

    flags = ["--num-agents", "3", "--nu", "0.5", "--nu-warmup", "0", "--eval-interval", "0", "--dpg-scale", dpg_scale]
    run_main_in_process([*flags, *TINY], tmp_path, monkeypatch, patch)
    assert len(updates) == 2
    for update in updates:
        assert len(update["dpg"]) == len(update["divided"]) == 2  # --update-epochs 2, one minibatch
        divisor = update["raw_std"] if dpg_scale == "advantage" else 1.0
        if dpg_scale == "advantage":
            assert abs(update["raw_std"].item() - 1) > 0.1  # so that dividing by it shows
        for dpg, divided in zip(update["dpg"], update["divided"], strict=True):
            assert torch.equal(divided, dpg / divisor)


def test_log_grad_var_does_not_change_training(tmp_path):
    """--log-grad-var is a diagnostic: at nu > 0 its extra actor losses draw their own Gumbel noise, so the run trains
    exactly as it does without it (the same saved weights)."""
    common = ["--task", "spread", "--num-agents", "3", "--save-model", "--eval-interval", "0", "--nu", "0.5"]
    models = {}
    for name, extra in {"plain": [], "grad_var": ["--log-grad-var"]}.items():
        os.makedirs(tmp_path / name)
        run([*common, "--nu-warmup", "0", *extra, *TINY], tmp_path / name)
        models[name] = saved_model(tmp_path / name)
    for part in maipg_mpe.MODEL_PARTS:
        for key, value in models["plain"][part].items():
            assert torch.equal(value, models["grad_var"][part][key]), f"--log-grad-var changed {part}.{key}"


def test_l_dpg_weighs_each_alive_agent_as_eq_10_does():
    """L_dpg = -Q_tot / N_alive at each step, so that per alive agent the terms weigh (1 - nu) : nu like L_clip's mean
    over alive agent-steps: with agents dead each alive agent's gradient is 1 / n_alive of its step's; with all alive
    it is the mean over N, bit for bit (so MPE's runs, where no agent dies, are unchanged)."""
    torch.manual_seed(0)
    T, N, A = 4, 3, 5
    q_values, state = torch.randn(T, N, A), torch.randn(T, 2)
    mu = torch.nn.functional.one_hot(torch.randint(0, A, (T, N)), A).float().requires_grad_()
    value_norm = maipg_mpe.ValueNorm()
    value_norm.update(torch.randn(100) * 5 - 3)
    mixer, weights = maipg_mpe.VDNMixer(), torch.ones(T)
    q_tot = value_norm.denormalize((mu * q_values).sum(-1).sum(-1))
    all_alive = maipg_mpe.dpg_loss(mu, q_values, state, mixer, weights, torch.ones(T, N), value_norm)
    assert torch.equal(all_alive, -maipg_mpe.weighted_mean(q_tot, weights) / N)
    active_masks = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1]])
    loss = maipg_mpe.dpg_loss(mu, q_values, state, mixer, weights, active_masks, value_norm)
    n_alive = active_masks.sum(-1)
    torch.testing.assert_close(loss, -(q_tot / n_alive).mean())
    (grad,) = torch.autograd.grad(loss, mu)
    scale = value_norm.mean_var()[1].sqrt()
    torch.testing.assert_close(grad, -scale * q_values / (T * n_alive[:, None, None]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "tag"], "--task must be one of spread, line, formation"),
        (["--nu", "1.5"], "--nu must be in [0, 1]"),
        (["--nu", "-0.1"], "--nu must be in [0, 1]"),
        (["--num-envs", "0"], "--num-envs must be >= 1"),
        (["--num-steps", "0"], "--num-steps must be >= 1"),
        (["--total-timesteps", "100"], "--total-timesteps (100) is smaller than one rollout"),
        (["--mixer", "qtran"], "--mixer must be qmix or vdn"),
        (["--env-backend", "gym"], "--env-backend must be numpy or mpe2"),
        (["--num-minibatches", "0"], "--num-minibatches must be in [1, 384]"),
        (["--eval-only", "no/such/model.pt"], "--eval-only: no such file"),
    ],
)
def test_bad_input_is_one_line(flags, message, capsys):
    args = maipg_mpe.tyro.cli(maipg_mpe.Args, args=flags)
    with pytest.raises(SystemExit) as exit_info:
        maipg_mpe.check_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_input_from_the_command_line(tmp_path):
    result = run(["--nu", "2"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["maipg_mpe.py: error: --nu must be in [0, 1], got 2.0"]


def test_missing_optional_package_is_one_line(tmp_path):
    # wandb is not a requirement: --track without it must say how to install it, not raise ImportError
    if subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True).returncode == 0:
        pytest.skip("wandb is installed here")
    result = run(["--track", *TINY], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["maipg_mpe.py: error: --track needs wandb: pip install wandb"]


def test_nan_loss_stops_with_the_update_number(tmp_path):
    result = run(["--learning-rate", "1e30", *TINY], tmp_path, check=False)
    assert result.returncode != 0
    assert "update 1: losses/" in result.stderr and "Traceback" not in result.stderr


def test_a_diverged_last_minibatch_stops_at_the_next_rollout(tmp_path):
    """No loss follows an update's last minibatch: parameters it breaks are caught by the next rollout's logits check."""
    flags = ["--num-envs", "3", "--num-steps", "25", "--total-timesteps", "150", "--update-epochs", "1"]
    result = run([*flags, "--num-minibatches", "1", "--learning-rate", "1e30"], tmp_path, check=False)
    assert result.returncode != 0
    assert "update 2: the actor's logits are not finite" in result.stderr and "Traceback" not in result.stderr


def test_learning_improves_the_greedy_return(tmp_path):
    """Spread with 2 agents, 32 envs, 50 updates (~30 s): the greedy return of the last three evaluations must beat
    that of the first two by a clear margin. Measured on seeds 1, 2, 3 (per-agent L_dpg weight, Q_tot in ValueNorm's
    units, independent env seeds): margins 15.0, 7.0 and 16.4 (returns from about -45 to about -27; seed 2's first
    evaluation was already -33), so seed 1 against a threshold of 8."""
    flags = ["--task", "spread", "--num-agents", "2", "--num-envs", "32", "--update-epochs", "5"]
    run([*flags, "--total-timesteps", "40000", "--eval-interval", "5", "--eval-episodes", "32", "--seed", "1"], tmp_path)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    evals = scalars(run_dir)["eval/episodic_return"]
    assert len(evals) == 10
    assert sum(evals[-3:]) / 3 > sum(evals[:2]) / 2 + 8, evals


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, --resume and preemption
# ---------------------------------------------------------------------------------------------------------------------
RESUMABLE = ["--num-agents", "3", "--num-envs", "8", "--update-epochs", "2", "--eval-interval", "2", "--eval-episodes", "2"]
RESUMABLE += ["--joint-q-diagnostic", "--save-model", "--checkpoint-interval", "3", "--total-timesteps", "2400"]


def run_state(cwd):
    """-> (the saved model, every logged scalar but the wall-clock SPS, as (step, value) pairs)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    logged = {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag != "charts/SPS"}
    return saved_model(cwd), logged


def start(args, cwd):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def last_logged_step(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    return max((s.step for tag in events.Tags()["scalars"] for s in events.Scalars(tag)), default=0)


def test_a_killed_and_resumed_run_is_the_uninterrupted_run(tmp_path):
    """SIGKILL after a checkpoint (every 3 updates of 12), once the process has logged a later step, then --resume: final
    weights, normaliser statistics and every logged scalar, step for step, equal those of the same run left alone (the
    NumPy port's envs, generators and the carried-over rollout slot are all in the checkpoint; the killed process's
    later points are purged)."""
    os.makedirs(tmp_path / "alone")
    os.makedirs(tmp_path / "killed")
    run(RESUMABLE, tmp_path / "alone")
    process = start(RESUMABLE, tmp_path / "killed")
    pattern, deadline, checkpoints = os.path.join(tmp_path, "killed", "runs", "*", "checkpoint.pt"), time.time() + 120, []
    # until it has checkpointed update 3 (step 600) and logged a later step, which the resumed run must purge
    while not checkpoints or last_logged_step(os.path.dirname(checkpoints[0])) <= 600:
        assert process.poll() is None and time.time() < deadline, "no checkpoint and later step before the end"
        time.sleep(0.05)
        checkpoints = glob.glob(pattern)
    process.kill()
    process.wait()
    (checkpoint,) = glob.glob(pattern)
    assert not glob.glob(os.path.join(tmp_path, "killed", "runs", "*", "maipg_mpe.pt")), "it finished before the kill"
    saved_step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert last_logged_step(os.path.dirname(checkpoint)) > saved_step, "nothing logged after the checkpoint to purge"
    result = run([*RESUMABLE, "--resume", os.path.dirname(checkpoint)], tmp_path / "killed")
    assert "update 12/12" in result.stdout
    (alone_model, alone_logged), (resumed_model, resumed_logged) = (
        run_state(tmp_path / "alone"),
        run_state(tmp_path / "killed"),
    )
    for part in ("actor", "critic", "agent_q", "mixer", "value_norm"):
        for key, value in alone_model[part].items():
            assert torch.equal(value, resumed_model[part][key]), f"{part}.{key}"
    assert alone_logged == resumed_logged
    assert len(alone_logged["charts/episodic_return"]) == 12 and len(alone_logged["eval/episodic_return"]) == 6


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, monkeypatch):
    flags = ["--num-agents", "3", "--num-envs", "32", "--eval-interval", "0", "--checkpoint-interval", "0"]
    process = start([*flags, "--total-timesteps", "100000"], tmp_path)
    first_line = process.stdout.readline()  # printed after update 1: the loop is running
    assert first_line.startswith("update 1/125"), first_line + process.stderr.read()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    assert (
        "SIGTERM: stopped after update " in stdout
        and f"continue with --resume {os.path.relpath(checkpoint, tmp_path)}" in stdout
    )
    saved = torch.load(checkpoint, weights_only=False)
    stopped_at, resumed_budget = saved["update"], ["--total-timesteps", str(800 * (saved["update"] + 1))]
    # the default warm-up, a fifth of the budget, is fixed at the start: resumed with another budget, the run keeps it
    monkeypatch.setattr(sys, "argv", ["maipg_mpe.py", *resumed_budget, "--resume", checkpoint])
    resumed = maipg_mpe.resume_args(maipg_mpe.tyro.cli(maipg_mpe.Args, args=sys.argv[1:]), saved)
    assert saved["args"]["nu_warmup"] == resumed.nu_warmup == 100000 // 5
    assert saved["args"]["dpg_scale"] == "advantage"  # MPE's default
    result = run([*flags, *resumed_budget, "--resume", checkpoint], tmp_path)
    assert f"update {stopped_at + 1}/{stopped_at + 1}" in result.stdout and "done:" in result.stdout


def test_a_bare_resume_keeps_every_flag_of_the_run(tmp_path, monkeypatch):
    """--resume RUN alone continues the run as it was started: every flag keeps the run's value, the RESUME_FLAGS
    (--total-timesteps, --eval-interval, --checkpoint-interval, ...) included; only a flag given now changes one."""
    flags = ["--num-agents", "3", "--eval-interval", "1", "--checkpoint-interval", "1", "--torch-threads", "2"]
    flags += ["--save-model", *TINY]
    run(flags, tmp_path)
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    saved = torch.load(checkpoint, weights_only=False)
    saved["args"] |= {"track": True, "cuda": True}  # as a run started with them would have it
    defaults = maipg_mpe.Args()
    assert all(saved["args"][name] != getattr(defaults, name) for name in maipg_mpe.RESUME_FLAGS), "no flag to keep"
    for given in ([], ["--total-timesteps", "300"]):
        argv = ["--resume", os.path.dirname(checkpoint), *given]
        monkeypatch.setattr(sys, "argv", ["maipg_mpe.py", *argv])
        resumed = maipg_mpe.resume_args(maipg_mpe.tyro.cli(maipg_mpe.Args, args=argv), saved)
        expected = {**saved["args"], "total_timesteps": 300 if given else 150}
        assert {name: getattr(resumed, name) for name in expected if name != "resume"} == {
            name: value for name, value in expected.items() if name != "resume"
        }
    # from the command line: the finished run stays finished (not resumed towards the default 10,000,000 steps)
    try:
        result = subprocess.run(
            [sys.executable, SCRIPT, "--resume", os.path.dirname(checkpoint)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a bare --resume of a finished run went on training")
    assert result.returncode == 0 and "done: 150 env steps" in result.stdout, result.stdout + result.stderr


def test_save_model_may_be_given_on_resume(tmp_path):
    """--save-model is an output, not a setting of the run: a run started without it can save its model when resumed."""
    run(["--num-agents", "3", "--checkpoint-interval", "1", *TINY], tmp_path)
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    assert not glob.glob(os.path.join(tmp_path, "runs", "*", "maipg_mpe.pt"))
    result = run(["--resume", checkpoint, "--total-timesteps", "225", "--save-model"], tmp_path)
    assert "update 3/3" in result.stdout and "model saved to" in result.stdout
    assert saved_model(tmp_path)["args"]["total_timesteps"] == 225


def test_bad_resume_is_one_line(tmp_path, monkeypatch, capsys):
    run(["--num-agents", "3", "--checkpoint-interval", "1", *TINY], tmp_path)
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    with open(checkpoint, "rb") as f:
        (tmp_path / "truncated.pt").write_bytes(f.read()[:1000])
    torch.save({"script": "maipg_smac.py", "args": {}}, tmp_path / "foreign.pt")
    stale = torch.load(checkpoint, weights_only=False)  # as an older version of the script wrote it
    stale["args"] = {**{name: value for name, value in stale["args"].items() if name != "dpg_scale"}, "gone": 1}
    torch.save(stale, tmp_path / "stale.pt")
    # from the command line: one line, exit status 2, nothing written
    for flags, message in [
        (["--resume", checkpoint, "--task", "line"], "--task cannot change on --resume (the run has 'spread')"),
        (["--eval-only", checkpoint], "is not a model saved by --save-model (UnpicklingError)"),
    ]:
        before = sorted(glob.glob(os.path.join(tmp_path, "runs", "*", "*")))
        result = run(flags, tmp_path, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
        assert sorted(glob.glob(os.path.join(tmp_path, "runs", "*", "*"))) == before  # nothing written
    # the other refusals, in-process (the functions the command line calls first)
    monkeypatch.chdir(tmp_path)
    for flags, message in [
        (["--resume", "no/such/run"], "--resume: no such checkpoint 'no/such/run'"),
        (["--resume", "truncated.pt"], "--resume: 'truncated.pt' is not a readable checkpoint, perhaps truncated"),
        (["--resume", "foreign.pt"], "--resume: 'foreign.pt' is not a checkpoint of maipg_mpe.py"),
        (["--resume", "stale.pt"], "was written by another version of maipg_mpe.py (flags that differ: dpg_scale, gone)"),
        (["--resume", checkpoint, "--no-recurrent"], "--recurrent cannot change on --resume (the run has True)"),
    ]:
        monkeypatch.setattr(sys, "argv", ["maipg_mpe.py", *flags])
        args = maipg_mpe.tyro.cli(maipg_mpe.Args, args=flags)
        with pytest.raises(SystemExit) as exit_info:
            maipg_mpe.resume_args(args, maipg_mpe.load_checkpoint(args.resume, "maipg_mpe.py")[1])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
