"""maipg_smac.py: the smax backend for real (smoke runs, masking over many steps, save then --eval-only), the sc2 backend's
worker and pipe code driven by a stand-in for StarCraft2Env (tests/sc2_standin.py), backend choice, presets, the
one-line errors, and checkpoints: a SIGKILLed SMAX run resumed is the uninterrupted run; SIGTERM and Ctrl-C checkpoint and
exit 0, and a stand-in run resumes with its episodes afresh; bad --resume is one line."""

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import sc2_standin
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import maipg_smac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "maipg_smac.py")
TESTS = os.path.dirname(os.path.abspath(__file__))
TINY = ["--num-envs", "2", "--num-steps", "20", "--total-timesteps", "80", "--update-epochs", "2", "--eval-episodes", "3"]


def script_env(cwd, **env):
    return {**os.environ, "OMP_NUM_THREADS": "1", "SC2PATH": os.path.join(cwd, "no_game_here"), **env}


def run(args, cwd, check=True, **env):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=script_env(cwd, **env)
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def start(args, cwd, **env):
    """The script in a session of its own (so that a signal to its process group reaches it and its workers only)."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(str(cwd), **env),
        start_new_session=True,
    )


def scalars(cwd, map_name):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", f"{map_name}__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return events


def random_actor(envs):
    torch.manual_seed(0)
    return maipg_smac.Actor(envs.obs_dim + envs.num_agents, envs.n_actions, 16, True)


def check_masking(envs, steps, no_op):
    """Samples the script's masked policy for many steps; every action taken must be available, and dead agents must
    see zeros and have exactly one action (no_op). -> how many agent-steps were dead"""
    actor, dead_seen = random_actor(envs), 0
    env_step = envs.reset()
    hidden = torch.zeros(envs.num_envs, envs.num_agents, 16)
    for _ in range(steps):
        obs, avail = torch.as_tensor(env_step.obs)[None], torch.as_tensor(env_step.avail_actions)[None]
        masks = torch.as_tensor(1.0 - env_step.dones, dtype=torch.float32).expand(envs.num_agents, -1).T[None]
        with torch.no_grad():
            logits, hidden = actor(maipg_smac.actor_input(obs), hidden, masks, avail)
        actions = torch.distributions.Categorical(logits=logits[0]).sample()
        assert (avail[0].gather(-1, actions.unsqueeze(-1)) == 1).all(), "an unavailable action was sampled"
        dead = ~env_step.alive
        if dead.any():
            dead_seen += dead.sum()
            assert (env_step.obs[dead] == 0).all()
            assert (env_step.avail_actions[dead] == np.eye(envs.n_actions)[no_op]).all()
        assert env_step.avail_actions[env_step.alive].sum(-1).min() >= 1
        env_step = envs.step(actions.numpy())
        assert not env_step.won[~env_step.dones].any()
    return dead_seen


@pytest.fixture(scope="module")
def smax_dir(tmp_path_factory):
    """One working dir for the smax runs: they share runs/jax_cache, so each map's step is compiled once."""
    return str(tmp_path_factory.mktemp("smax"))


@pytest.fixture
def fake_game(tmp_path):
    """An importable `smac.env` whose StarCraft2Env is the stand-in, and a $SC2PATH holding Versions/ and the 3m map."""
    package = tmp_path / "shim" / "smac" / "env"
    package.mkdir(parents=True)
    (tmp_path / "shim" / "smac" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from sc2_standin import StarCraft2Env  # noqa: F401\n")
    sc2_path = tmp_path / "StarCraftII"
    (sc2_path / "Versions").mkdir(parents=True)
    (sc2_path / "Maps" / "SMAC_Maps").mkdir(parents=True)
    (sc2_path / "Maps" / "SMAC_Maps" / "3m.SC2Map").write_text("")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), TESTS]), "SC2PATH": str(sc2_path)}


def test_sc2_workers_and_pipes_with_the_standin():
    envs = maipg_smac.Sc2Envs("3m", [0, 1], env_factory=sc2_standin.StarCraft2Env)
    try:
        assert (envs.num_agents, envs.obs_dim, envs.state_dim, envs.n_actions) == (3, 30, 48, 9)  # read from the env
        assert check_masking(envs, 200, no_op=0) > 0  # agents died and could only no-op
        returns, wins = maipg_smac.evaluate(random_actor(envs), envs, 5, 16, torch.device("cpu"))
        assert len(returns) == len(wins) == 5  # exactly the episodes asked for, shared by the envs
    finally:
        envs.close()
    assert not any(process.is_alive() for process in envs.processes)


def test_sc2_workers_ignore_sigterm_and_still_close():
    """A signal to the process group must leave the workers (and the games they start) to the main process, which
    checkpoints and then closes them: they ignore SIGTERM, close() still ends them, and so does an exit without close()
    (multiprocessing's terminate() at exit would not, and its join would wait forever)."""
    envs = maipg_smac.Sc2Envs("3m", [0, 1], env_factory=sc2_standin.StarCraft2Env)
    try:
        envs.reset()  # every worker is up
        for process in envs.processes:
            os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(process.is_alive() for process in envs.processes)
        envs.reset()  # and still serves
    finally:
        envs.close()
    assert not any(process.is_alive() for process in envs.processes)
    code = "import sys, maipg_smac, sc2_standin as s; maipg_smac.Sc2Envs('3m', [0], env_factory=s.StarCraft2Env); sys.exit(3)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 3


def test_sc2_smoke_run_through_workers(tmp_path, fake_game):
    """The whole sc2 path: auto finds `smac`, $SC2PATH/Versions and the map, then workers built by the script's own
    factory (absl flags, `from smac.env import StarCraft2Env`) play the stand-in; an unavailable action would raise."""
    result = run(["--map", "3m", "--eval-interval", "0", *TINY], str(tmp_path), **fake_game)
    assert "--env-backend auto: SMAC on StarCraft II, map 3m" in result.stdout
    assert "update 2/2" in result.stdout
    assert "charts/win_rate" in scalars(str(tmp_path), "3m").Tags()["scalars"]


def test_smax_smoke_2s3z_and_auto_says_smax(smax_dir):
    result = run(["--map", "2s3z", "--eval-interval", "1", "--log-grad-var", *TINY], smax_dir)
    # auto: no StarCraft II here, so SMAX, said in one line with the caveat
    assert "--env-backend auto: using smax" in result.stdout and "not comparable to StarCraft II" in result.stdout
    assert "update 2/2" in result.stdout and "env stepping took" in result.stdout
    events = scalars(smax_dir, "2s3z")
    new_diagnostics = {"charts/nu", "diagnostics/mixer_slope", "diagnostics/q_gap", "diagnostics/dpg_grad_ratio"}
    new_diagnostics |= {"diagnostics/cv_corr", "diagnostics/rvar_own", "diagnostics/q_explained_variance"}
    assert {"eval/win_rate", "eval/episodic_return", "diagnostics/rvar", "diagnostics/grad_var", *new_diagnostics} <= set(
        events.Tags()["scalars"]
    )
    assert len(events.Scalars("eval/win_rate")) == 2
    assert "presets/text_summary" in events.Tags()["tensors"]
    losses = [tag for tag in events.Tags()["scalars"] if tag.startswith("losses/")]
    assert {"losses/policy_loss", "losses/dpg_loss", "losses/value_loss", "losses/q_loss"} <= set(losses)
    assert all(np.isfinite([scalar.value for scalar in events.Scalars(tag)]).all() for tag in losses)


def test_learning_rate_zero_gives_exactly_zero_kl_and_clipfrac(smax_dir):
    """With lr 0 the training pass must give back the rollout's log-probabilities bit for bit: a slip in the chunks (25
    steps in chunks of 10, the last padded), their start hidden states, the dead agents' masks or the minibatch indexing
    shows as approx_kl or clipfrac != 0. On 3m agents die within 25 steps, so the active masks are exercised."""
    flags = ["--map", "3m", "--env-backend", "smax", "--learning-rate", "0", "--num-minibatches", "2", "--eval-interval", "0"]
    run([*flags, *TINY, "--num-steps", "25", "--total-timesteps", "150", "--exp-name", "lr0"], smax_dir)
    (run_dir,) = glob.glob(os.path.join(smax_dir, "runs", "3m__lr0__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    shutil.rmtree(run_dir)  # the other 3m tests of this folder expect one 3m run
    for tag in ("losses/approx_kl", "losses/clipfrac"):
        assert [scalar.value for scalar in events.Scalars(tag)] == [0.0] * 3, tag


def test_value_norm_keeps_q_tot_at_the_scale_of_the_returns_on_2s3z(smax_dir):
    """Q_tot learns its TD(lambda) targets in ValueNorm's units (V's statistics). Statistics of its own targets would
    feed on themselves, as the targets bootstrap on Q_tot' denormalised by them: here charts/q_tot_mean would reach 236 by
    update 8 and 9,872 by update 12. With V's statistics it stays at the scale of the returns (below 6 here; a 2s3z
    episode returns about 20 at most)."""
    flags = ["--map", "2s3z", "--nu", "0", "--num-envs", "4", "--num-steps", "100", "--total-timesteps", "4800"]
    run([*flags, "--eval-interval", "0", "--exp-name", "qnorm"], smax_dir)
    (run_dir,) = glob.glob(os.path.join(smax_dir, "runs", "2s3z__qnorm__*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    shutil.rmtree(run_dir)  # the other 2s3z tests of this folder expect one 2s3z run
    q_tot_means = [scalar.value for scalar in events.Scalars("charts/q_tot_mean")]
    assert len(q_tot_means) == 12 and max(map(abs, q_tot_means)) < 20, q_tot_means


def test_smax_smoke_3m_save_model_then_eval_only(smax_dir):
    flags = ["--map", "3m", "--env-backend", "smax", "--no-recurrent", "--save-model", "--eval-interval", "2"]
    result = run([*flags, "--exp-name", "saved", *TINY], smax_dir)
    assert "update 2/2" in result.stdout
    assert {"charts/win_rate", "eval/win_rate"} <= set(scalars(smax_dir, "3m").Tags()["scalars"])
    (path,) = glob.glob(os.path.join(smax_dir, "runs", "*", "saved.pt"))
    checkpoint = torch.load(path, weights_only=True)
    assert {"args", "actor", "critic", "agent_q", "mixer", "value_norm"} <= set(checkpoint)
    assert checkpoint["args"]["env_backend"] == "smax" and checkpoint["args"]["recurrent"] is False
    assert checkpoint["args"]["nu"] == 0.4 and checkpoint["args"]["update_epochs"] == 2  # preset, then the flag
    assert not glob.glob(os.path.join(smax_dir, "runs", "*", "*.tmp"))
    result = run(["--eval-only", path, "--eval-episodes", "5"], smax_dir)
    assert "3m, 5 greedy episodes, win rate" in result.stdout


def saved_model(cwd, map_name, exp_name):
    """The model a run of `exp_name` saved (--save-model); its run folder is removed, as other tests count 3m runs."""
    (path,) = glob.glob(os.path.join(cwd, "runs", f"{map_name}__{exp_name}__*", f"{exp_name}.pt"))
    model = torch.load(path, weights_only=True)
    shutil.rmtree(os.path.dirname(path))
    return model


def test_nu_zero_is_mappo(smax_dir):
    """With nu = 0 the actor and V must not depend on the Q branch at all: two runs from the same seed whose Q branches
    differ completely (mixer, TD(lambda), target rate, and every flag of L_dpg) end with identical actor and V
    parameters, so they also saw the same rollouts, agents dying on 3m. The control: with nu > 0 from the first update
    the same change does move the actor, so the comparison can fail."""
    common = ["--map", "3m", "--env-backend", "smax", "--save-model", "--eval-interval", "0", *TINY]
    q_branch = ["--mixer", "vdn", "--td-lambda", "0.3", "--target-tau", "0.5", "--dpg-scale", "advantage"]
    runs = {}
    for name, extra in {
        "nu0_qmix": ["--nu", "0"],
        "nu0_vdn": ["--nu", "0", *q_branch, "--nu-warmup", "40"],
        "nu_qmix": ["--nu", "0.5", "--nu-warmup", "0"],
        "nu_vdn": ["--nu", "0.5", "--nu-warmup", "0", *q_branch],
    }.items():
        run([*common, *extra, "--exp-name", name], smax_dir)
        runs[name] = saved_model(smax_dir, "3m", name)
    for net in ("actor", "critic"):
        for key, value in runs["nu0_qmix"][net].items():
            assert torch.equal(value, runs["nu0_vdn"][net][key]), f"nu = 0: {net}.{key} depends on the Q branch"
    assert not torch.equal(runs["nu0_qmix"]["agent_q"]["head.weight"], runs["nu0_vdn"]["agent_q"]["head.weight"])
    assert not torch.equal(runs["nu_qmix"]["actor"]["head.weight"], runs["nu_vdn"]["actor"]["head.weight"])


def test_log_grad_var_leaves_training_as_it_was(smax_dir):
    """diagnostics/grad_var's 8 extra actor losses draw Gumbel noise of their own: with nu > 0 from the first update the
    run's weights are the same with and without --log-grad-var."""
    common = ["--map", "3m", "--env-backend", "smax", "--save-model", "--eval-interval", "0", "--nu", "0.5", *TINY]
    models = {}
    for name in ("plain", "grad_var"):
        run([*common, "--nu-warmup", "0", "--exp-name", name, *(["--log-grad-var"] if name == "grad_var" else [])], smax_dir)
        models[name] = saved_model(smax_dir, "3m", name)
    for part in maipg_smac.MODEL_PARTS:
        for key, value in models["plain"][part].items():
            assert torch.equal(value, models["grad_var"][part][key]), f"--log-grad-var changed {part}.{key}"


def test_dpg_loss_weighs_every_alive_agent_as_eq_10():
    """L_clip is a mean over alive agent-steps, so L_dpg divides Q_tot at each step by the number of agents alive
    there: with VDN (dQ_tot/dQ_i = 1) and ValueNorm's scale s, d L_dpg / d mu_i = -s * Q_i / (n_alive * steps). Where
    every agent lives the factor is exactly 1: the loss is -Q_tot / N bit for bit."""
    torch.manual_seed(0)
    steps, n_agents, n_actions = 3, 3, 4
    q_values = torch.randn(steps, n_agents, n_actions)
    mu = F.one_hot(torch.randint(n_actions, (steps, n_agents)), n_actions).float().requires_grad_()
    active = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # 3, 2 and 1 agents alive
    value_norm, mixer, state, weights = maipg_smac.ValueNorm(), maipg_smac.VDNMixer(), torch.zeros(steps, 2), torch.ones(steps)
    value_norm.update(torch.tensor([1.0, 5.0]))
    scale = value_norm.mean_var()[1].sqrt()
    (grad,) = torch.autograd.grad(maipg_smac.dpg_loss(mu, q_values, state, mixer, weights, active, value_norm), mu)
    weight_per_alive_agent = grad / (-scale * q_values / steps)
    assert torch.allclose(weight_per_alive_agent, (1 / active.sum(-1))[:, None, None].expand_as(grad))
    all_alive = maipg_smac.dpg_loss(mu, q_values, state, mixer, weights, torch.ones(steps, n_agents), value_norm)
    q_tot = value_norm.denormalize(mixer((mu * q_values).sum(-1), state))
    assert torch.equal(all_alive, -maipg_smac.weighted_mean(q_tot, weights) / n_agents)


def test_smax_masking_holds_over_many_steps(smax_dir):
    envs = maipg_smac.SmaxEnvs("3m", 2, 0, os.path.join(smax_dir, "runs", "jax_cache"))
    state = envs.reset().state  # on SMAC's scale: raw SMAX positions (up to 32) would swamp the QMIX hypernetworks
    assert state.shape == (2, envs.state_dim) and state.min() >= 0 and state.max() <= 2.5
    assert (envs.num_agents, envs.n_actions, envs.episode_limit) == (3, 8, 60)  # 3m: 5 moves + 3 enemies, SMAC's limit
    assert check_masking(envs, 200, no_op=4) > 0  # SMAX's only action of a dead unit is stop (4)


def test_sc2_without_the_game_is_one_line(tmp_path, fake_game):
    result = run(
        ["--env-backend", "sc2", "--map", "3m", *TINY], str(tmp_path), check=False, **{**fake_game, "SC2PATH": str(tmp_path)}
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"maipg_smac.py: error: --env-backend sc2: StarCraft II not found: {tmp_path / 'Versions'} does not exist "
        "(install StarCraft II 4.10 and set SC2PATH)"
    ]


def resolve(flags, capsys):
    args = maipg_smac.tyro.cli(maipg_smac.Args, args=flags)
    with pytest.raises(SystemExit) as exit_info:
        maipg_smac.resolve_backend(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_sc2_problems_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smac", None)  # `import smac` fails, as here
    assert "SMAC is not installed: pip install git+https://github.com/oxwhirl/smac.git" in resolve(
        ["--env-backend", "sc2"], capsys
    )
    smac = types.ModuleType("smac")
    monkeypatch.setitem(sys.modules, "smac", smac)
    monkeypatch.setitem(sys.modules, "smac.env", types.SimpleNamespace(StarCraft2Env=sc2_standin.StarCraft2Env))
    (tmp_path / "Versions").mkdir()
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    err = resolve(["--env-backend", "sc2", "--map", "MMM2"], capsys)
    assert f"SMAC map not found: {tmp_path / 'Maps' / 'SMAC_Maps' / 'MMM2.SC2Map'}" in err


def test_map_not_in_smax_is_one_line(capsys):
    err = resolve(["--env-backend", "smax", "--map", "MMM2"], capsys)
    assert "--map MMM2 is not in SMAX, whose SMAC maps are 3m, 2s3z, 25m, 3s5z, 8m," in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--map", "4m"], "--map must be a SMAC map (3m, 8m, 25m,"),
        (["--env-backend", "starcraft"], "--env-backend must be auto, sc2 or smax"),
        (["--nu", "1.5"], "--nu must be in [0, 1]"),
        (["--update-epochs", "0"], "--update-epochs must be >= 1"),
        (["--num-minibatches", "400"], "--num-minibatches must be in [1, 320]"),
    ],
)
def test_bad_input_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        maipg_smac.check_args(maipg_smac.tyro.cli(maipg_smac.Args, args=flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--map", "2s3z"], {"nu": (0.4, "Table 3, easy map"), "update_epochs": (5, "Table 3, easy map")}),
        (["--map", "5m_vs_6m"], {"nu": (0.3, "Table 3, hard map"), "clip_coef": (0.05, "MAPPO's 5m_vs_6m script")}),
        (["--map", "MMM2"], {"update_epochs": (15, "Table 3, super hard map"), "num_minibatches": (2, "MAPPO's MMM2 script")}),
        (["--map", "corridor"], {"recurrent": (False, "MAPPO's corridor script"), "clip_coef": (0.2, "MAPPO default")}),
        (
            ["--map", "corridor", "--recurrent", "--nu", "0.1", "--update-epochs", "3"],
            {"recurrent": (True, "command line"), "nu": (0.1, "command line"), "update_epochs": (3, "command line")},
        ),
    ],
)
def test_presets_and_the_command_line_beating_them(flags, expected):
    args = maipg_smac.tyro.cli(maipg_smac.Args, args=flags)
    final = maipg_smac.apply_presets(args)
    for name, (value, source) in expected.items():
        assert final[name] == (value, source) and getattr(args, name) == value
    assert None not in (args.nu, args.update_epochs, args.clip_coef, args.num_minibatches, args.recurrent)


def test_critic_input_is_zeros_and_id_for_dead_agents():
    obs, state = torch.rand(2, 3, 4) + 1, torch.rand(2, 5) + 1
    alive = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    x = maipg_smac.critic_input(obs, state, alive)  # [2, 3, 5 + 4 + 3]
    assert x.shape == (2, 3, 12)
    assert (x[0, 1, :9] == 0).all() and (x[1, 0, :9] == 0).all()
    assert torch.equal(x[0, 1, 9:], torch.tensor([0.0, 1.0, 0.0])) and torch.equal(x[1, 0, 9:], torch.tensor([1.0, 0, 0]))
    assert torch.equal(x[0, 0, :5], state[0]) and torch.equal(x[0, 0, 5:9], obs[0, 0])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, --resume and preemption
# ---------------------------------------------------------------------------------------------------------------------
# 10 updates, a checkpoint after update 5 (and 10); --update-epochs overrides a preset and --env-backend auto resolves
# to smax: the resumed run repeats these flags, as sweep.py does
RESUMABLE = ["--map", "3m", "--env-backend", "auto", "--num-envs", "2", "--num-steps", "20", "--update-epochs", "2"]
RESUMABLE += ["--eval-interval", "2", "--eval-episodes", "2", "--save-model", "--checkpoint-interval", "5"]
RESUMABLE += ["--total-timesteps", "400"]


def logged(run_dir):
    """Every logged scalar but the wall-clock SPS, as (step, value) pairs per tag."""
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag != "charts/SPS"}


def last_logged_step(run_dir):
    return max((step for pairs in logged(run_dir).values() for step, _ in pairs), default=0)


def test_a_killed_and_resumed_smax_run_is_the_uninterrupted_run(smax_dir):
    """SIGKILL after the checkpoint of update 5, once the process has logged later steps, then --resume: final weights,
    ValueNorm statistics and every logged scalar, step for step, equal those of the same run left alone (SMAX's JAX key
    and env states, train and eval, the generators and the carried-over rollout slot are all in the checkpoint; the
    killed process's later points are purged)."""
    runs, process = os.path.join(smax_dir, "runs"), None
    try:
        run([*RESUMABLE, "--exp-name", "resume_alone"], smax_dir)
        process = start([*RESUMABLE, "--exp-name", "resume_killed"], smax_dir)
        pattern, deadline = os.path.join(runs, "3m__resume_killed__*", "checkpoint.pt"), time.time() + 300
        # until it has checkpointed update 5 (step 200) and logged a later step, which the resumed run must purge
        checkpoints = []
        while not checkpoints or last_logged_step(os.path.dirname(checkpoints[0])) <= 200:
            assert process.poll() is None and time.time() < deadline, process.stderr.read()
            time.sleep(0.05)
            checkpoints = glob.glob(pattern)
        process.kill()
        process.wait()
        (checkpoint,) = glob.glob(pattern)
        assert torch.load(checkpoint, weights_only=False)["update"] == 5, "it checkpointed update 10 before the kill"
        assert not glob.glob(os.path.join(runs, "*", "resume_killed.pt")), "it finished before the kill"
        result = run([*RESUMABLE, "--exp-name", "resume_killed", "--resume", os.path.dirname(checkpoint)], smax_dir)
        assert "update 10/10" in result.stdout and "afresh" not in result.stdout
        ((alone_dir, alone_model), (killed_dir, resumed_model)) = [
            (os.path.dirname(path), torch.load(path))
            for name in ("alone", "killed")
            for path in glob.glob(os.path.join(runs, f"3m__resume_{name}__*", f"resume_{name}.pt"))
        ]
        for part in ("actor", "critic", "agent_q", "mixer", "value_norm"):
            for key, value in alone_model[part].items():
                assert torch.equal(value, resumed_model[part][key]), f"{part}.{key}"
        alone_logged = logged(alone_dir)
        assert alone_logged == logged(killed_dir)
        assert len(alone_logged["losses/q_loss"]) == 10 and len(alone_logged["eval/win_rate"]) == 5
    finally:  # the other 3m tests of this folder expect one 3m run
        if process is not None:
            process.kill()
            process.wait()
        for run_dir in glob.glob(os.path.join(runs, "3m__resume_*")):
            shutil.rmtree(run_dir)


@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGTERM to the script", "SIGINT to its group (Ctrl-C)", "SIGTERM to its group (Slurm)"],
)
def test_a_signal_checkpoints_exits_0_and_the_sc2_run_resumes_afresh(tmp_path, fake_game, signum, to_group):
    """SIGTERM to the script (sweep.py), SIGINT to its whole process group (Ctrl-C) or SIGTERM to the group (Slurm may
    signal every process of a job step): the signal reaches the SC2 workers too, which ignore it; the script checkpoints
    at the end of the update, closes its workers and exits 0 naming the checkpoint; --resume completes the run,
    StarCraft II's episodes starting afresh (said in one line)."""
    flags = ["--map", "3m", "--num-envs", "2", "--num-steps", "20", "--update-epochs", "1", "--eval-interval", "0"]
    process = start([*flags, "--checkpoint-interval", "0", "--total-timesteps", "400000"], tmp_path, **fake_game)
    line = ""
    while not line.startswith("update ") and process.poll() is None:
        line = process.stdout.readline()  # update 1 is printed after it ends: the loop is running
    assert line.startswith("update 1/10000"), line + process.stderr.read()
    os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and not stderr, stderr  # the workers too stopped without a traceback
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    stopped_at = torch.load(checkpoint, weights_only=False)["update"]
    assert (
        f"{signum.name}: stopped after update {stopped_at}; continue with --resume {os.path.relpath(checkpoint, tmp_path)}"
        in stdout
    )
    assert "done:" not in stdout
    total = ["--total-timesteps", str(40 * (stopped_at + 1)), "--checkpoint-interval", "1"]
    result = run([*flags, *total, "--resume", checkpoint], str(tmp_path), **fake_game)
    assert [line for line in result.stdout.splitlines() if "afresh" in line] == [
        "--resume: StarCraft II cannot be saved, so its episodes start afresh (SMAX's continue)"
    ]
    assert f"update {stopped_at + 1}/{stopped_at + 1}" in result.stdout and "done:" in result.stdout
    assert torch.load(checkpoint, weights_only=False)["update"] == stopped_at + 1


SC2_RUN = ["--map", "3m", "--num-envs", "2", "--num-steps", "20", "--update-epochs", "1", "--eval-episodes", "2"]
SC2_RUN += ["--total-timesteps", "120", "--eval-interval", "2", "--checkpoint-interval", "2", "--torch-threads", "2"]


def checkpointed_sc2_run(tmp_path, fake_game):
    """A finished stand-in run of 3 updates whose checkpoint holds update 2 (--checkpoint-interval 2). -> its folder"""
    run(SC2_RUN, str(tmp_path), **fake_game)
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "3m__*", "checkpoint.pt"))
    assert torch.load(checkpoint, weights_only=False)["update"] == 2
    return os.path.dirname(checkpoint)


def test_a_bare_resume_keeps_every_flag_of_the_run(tmp_path, fake_game, monkeypatch):
    """`--resume RUN` and no other flag continues the run as it was started: it does update 3 of 3 and stops (not
    update 3 of 250,000 at the default --total-timesteps), and every RESUME_FLAG keeps the run's value unless given."""
    run_dir = checkpointed_sc2_run(tmp_path, fake_game)
    process = start(["--resume", run_dir], tmp_path, **fake_game)
    try:
        line = next((line for line in process.stdout if line.startswith("update ")), "")
        assert line.startswith("update 3/3 "), line
        assert "done: 120 env steps" in process.stdout.read()  # (communicate() would skip what the loop buffered)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, checkpoint = maipg_smac.load_checkpoint(run_dir, "maipg_smac.py")
    checkpoint["args"] |= {"track": True, "cuda": True}  # as a run started with them would have saved them

    def resumed(*flags):
        monkeypatch.setattr(sys, "argv", ["maipg_smac.py", "--resume", run_dir, *flags])
        return maipg_smac.resume_args(maipg_smac.tyro.cli(maipg_smac.Args, args=sys.argv[1:]), checkpoint)

    args = resumed()
    assert all(getattr(args, name) == checkpoint["args"][name] for name in maipg_smac.RESUME_FLAGS)
    assert (args.total_timesteps, args.eval_interval, args.checkpoint_interval, args.torch_threads) == (120, 2, 2, 2)
    assert (args.track, args.cuda) == (True, True)
    assert resumed("--total-timesteps", "160", "--no-track").total_timesteps == 160 and not resumed("--no-track").track


def test_save_model_may_be_given_on_resume(tmp_path, fake_game):
    """A run started without --save-model can still save its final model: --save-model is an output, not a setting."""
    run_dir = checkpointed_sc2_run(tmp_path, fake_game)
    result = run(["--resume", run_dir, "--save-model"], str(tmp_path), **fake_game)
    assert f"model saved to {os.path.join(run_dir, 'maipg_smac.pt')}" in result.stdout
    assert os.path.isfile(os.path.join(run_dir, "maipg_smac.pt"))


def test_bad_resume_is_one_line(tmp_path, fake_game, capsys, monkeypatch):
    run(["--map", "3m", "--eval-interval", "0", "--checkpoint-interval", "1", *TINY], str(tmp_path), **fake_game)
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    with open(checkpoint, "rb") as f:
        (tmp_path / "truncated.pt").write_bytes(f.read()[:1000])
    torch.save({"script": "maipg_mpe.py", "args": {}}, tmp_path / "foreign.pt")
    stale = torch.load(checkpoint, weights_only=False)  # as an older version of the script wrote it
    stale["args"] = {**{name: value for name, value in stale["args"].items() if name != "nu"}, "q_norm": True}
    torch.save(stale, tmp_path / "stale.pt")
    before = sorted(glob.glob(os.path.join(tmp_path, "runs", "**"), recursive=True))
    result = run(["--resume", checkpoint, "--map", "2s3z"], str(tmp_path), check=False, **fake_game)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--map cannot change on --resume (the run has '3m')" in result.stderr
    assert sorted(glob.glob(os.path.join(tmp_path, "runs", "**"), recursive=True)) == before  # nothing written
    monkeypatch.chdir(tmp_path)
    for path, message in [  # in-process: the function the command line calls first
        ("no/such/run", "--resume: no such checkpoint 'no/such/run'"),
        ("truncated.pt", "--resume: 'truncated.pt' is not a readable checkpoint, perhaps truncated"),
        ("foreign.pt", "--resume: 'foreign.pt' is not a checkpoint of maipg_smac.py"),
        ("stale.pt", "--resume: 'stale.pt' was written by another version of maipg_smac.py (flags that differ: nu, q_norm)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            maipg_smac.load_checkpoint(path, "maipg_smac.py")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
