"""maipg_grf.py on the real Google Research Football engine: the scenario table against the installed package, the
env's wrappers, smoke runs of the paper's five scenarios with env processes (their event files read back), save then
--eval-only, env determinism, rendering, bad input. A stand-in env (StubFootballEnv) in the script's real env processes
checks what needs exact episodes: success counted once per episode, the env seeds, a dead or hung env process, nu = 0
still MAPPO whatever the Q branch, the DPG-only flags acting at nu > 0, and --resume (the restored training state, the
normaliser's statistics included, SIGTERM and Ctrl-C's SIGINT, bad checkpoints).

Without gfootball the engine tests skip with the reason (install it with `bash scripts/install_grf.sh`); under CI
(CI=true) a missing gfootball fails them instead, so CI cannot pass without running them."""

import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import maipg_grf

try:
    import gfootball.env  # noqa: F401

    GFOOTBALL_MISSING = None
except ImportError as error:
    GFOOTBALL_MISSING = f"gfootball is not installed ({error}); run `bash scripts/install_grf.sh`"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "maipg_grf.py")
PAPER_SCENARIOS = {
    "academy_3_vs_1_with_keeper": 3,
    "academy_counterattack_easy": 4,
    "academy_counterattack_hard": 4,
    "academy_corner": 10,
    "academy_run_pass_and_shoot_with_keeper": 2,
}
TINY = ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "32", "--update-epochs", "1", "--num-workers", "2"]
# scalars every update logs, whatever the episodes did
LOGGED_EVERY_UPDATE = {
    "charts/SPS",
    "charts/learning_rate",
    "charts/nu",
    "charts/q_tot_mean",
    "losses/policy_loss",
    "losses/dpg_loss",
    "losses/value_loss",
    "losses/q_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "diagnostics/rvar",
    "diagnostics/mixer_slope",
    "diagnostics/q_gap",
    "diagnostics/dpg_grad_ratio",
    "diagnostics/cv_corr",
    "diagnostics/rvar_own",
    "diagnostics/q_explained_variance",
    "diagnostics/q_explained_variance_mc",
}

# The stand-in's episodes: STUB_EPISODE_LENGTH steps each, and episode k scores STUB_GOALS[k % 4] (step -> score_reward):
# a goal, a goal conceded, none, three goals. Success is scoring, once per episode: 2 of every 4 episodes.
STUB_EPISODE_LENGTH = 4
STUB_GOALS = [{4: 1}, {4: -1}, {}, {1: 1, 2: 1, 4: 1}]
STUB_FATAL_STEP = 3  # a stand-in with a fate dies or hangs at its 3rd step
STUB_RUN = ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", "64", "--num-workers", "2", "--eval-interval", "1"]


class StubFootballEnv:
    """Stands in for gfootball's env (create_environment's keywords, reset, step, close, unwrapped._config) inside the
    script's real env processes. Like the engine it reads game_engine_random_seed at every reset, and its observations
    are drawn from that seed, so equal observations mean equal engine seeds; with repeat, they are drawn from the
    episode's number modulo 4 instead, so that every env plays the same 4 episodes over and over, whatever its seeds.
    fate "die" (SIGKILL) or "hang" applies to the stand-in built with fatal_seed, at its STUB_FATAL_STEP-th step."""

    def __init__(
        self, number_of_left_players_agent_controls, other_config_options, fate=None, fatal_seed=None, repeat=False, **_
    ):
        self.num_agents, self._config = number_of_left_players_agent_controls, dict(other_config_options)
        self.fate = fate if self._config["game_engine_random_seed"] == fatal_seed else None
        self.repeat, self.episode, self.episode_steps, self.total_steps = repeat, -1, 0, 0

    @property
    def unwrapped(self):
        return self

    def reset(self):
        self.episode, self.episode_steps = self.episode + 1, 0
        self.rng = np.random.default_rng(self.episode % 4 if self.repeat else self._config["game_engine_random_seed"])
        return self.rng.uniform(-1, 1, (self.num_agents, 115)).astype(np.float32)

    def step(self, actions):
        assert len(actions) == self.num_agents and all(0 <= action < 19 for action in actions)
        self.episode_steps, self.total_steps = self.episode_steps + 1, self.total_steps + 1
        if self.fate == "die" and self.total_steps == STUB_FATAL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fate == "hang" and self.total_steps == STUB_FATAL_STEP:
            time.sleep(3600)
        score = STUB_GOALS[self.episode % 4].get(self.episode_steps, 0)
        obs = self.rng.uniform(-1, 1, (self.num_agents, 115)).astype(np.float32)
        rewards = np.full(self.num_agents, float(score), dtype=np.float32)
        return obs, rewards, self.episode_steps == STUB_EPISODE_LENGTH, {"score_reward": score}

    def close(self):
        pass


def stub_create_environment(**config):
    """gfootball.env.create_environment of the shadowing package (stub_gfootball): a StubFootballEnv, whose fate and
    fatal seed come from $STUB_FATE and $STUB_FATAL_SEED, repeat from $STUB_REPEAT; its process id goes to a file in
    $STUB_PIDS."""
    with open(os.path.join(os.environ["STUB_PIDS"], str(os.getpid())), "w"):
        pass
    fatal_seed = int(os.environ["STUB_FATAL_SEED"]) if "STUB_FATAL_SEED" in os.environ else None
    repeat = os.environ.get("STUB_REPEAT") == "1"
    return StubFootballEnv(**config, fate=os.environ.get("STUB_FATE"), fatal_seed=fatal_seed, repeat=repeat)


@pytest.fixture
def gfootball():
    """Skips a test that needs the engine when it is missing, except under CI, where that is a failure."""
    if GFOOTBALL_MISSING is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {GFOOTBALL_MISSING}")
        pytest.skip(GFOOTBALL_MISSING)


def run(args, cwd, check=True, env=None, timeout=None):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def stub_gfootball(tmp_path, **env):
    """The environment of a subprocess whose `gfootball.env` is a package that builds StubFootballEnvs."""
    package = tmp_path / "stub" / "gfootball" / "env"
    package.mkdir(parents=True)
    (tmp_path / "stub" / "gfootball" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from test_grf import stub_create_environment as create_environment  # noqa: F401\n")
    (tmp_path / "pids").mkdir()
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), TESTS, ROOT]), "STUB_PIDS": str(tmp_path / "pids"), **env}


def scalars(cwd) -> dict[str, list[float]]:
    """The event file of the one run under cwd -> {tag: its values, in logging order}"""
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_logged_and_finite(logged, num_updates):
    """Every per-update scalar is there once per update, and every scalar logged is finite."""
    assert LOGGED_EVERY_UPDATE <= set(logged), LOGGED_EVERY_UPDATE - set(logged)
    assert all(len(logged[tag]) == num_updates for tag in LOGGED_EVERY_UPDATE)
    assert all(math.isfinite(value) for values in logged.values() for value in values), logged


def running(pid):
    """Whether a process runs (a zombie, state Z, waiting for its parent to reap it, has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def random_rollout(envs, num_steps, seed=0):
    """Steps envs with uniformly random actions -> every array envs returned, stacked over time."""
    rng = np.random.default_rng(seed)
    outputs = [(envs.reset(),)]
    for _ in range(num_steps):
        outputs.append(envs.step(rng.integers(0, envs.n_actions, size=(envs.num_envs, envs.num_agents))))
    return outputs


def test_scenario_table_matches_the_installed_scenarios(gfootball):
    """Every academy scenario gfootball ships is in the table (and nothing else), the paper's five with MAPPO's player
    counts, and each one runs with its count: one step gives [N, 115] observations and N rewards."""
    import gfootball.scenarios

    scenario_dir = os.path.dirname(gfootball.scenarios.__file__)
    installed = {os.path.basename(path)[:-3] for path in glob.glob(os.path.join(scenario_dir, "academy_*.py"))}
    assert set(maipg_grf.ACADEMY_SCENARIOS) == installed
    assert {name: maipg_grf.ACADEMY_SCENARIOS[name] for name in PAPER_SCENARIOS} == PAPER_SCENARIOS
    for scenario, num_agents in maipg_grf.ACADEMY_SCENARIOS.items():
        env = maipg_grf.make_football_env(scenario, seed=0)
        try:
            obs = maipg_grf.reset_football_env(env, np.random.default_rng(0), num_agents)
            step_obs, reward, _, info = env.step([0] * num_agents)
        finally:
            env.close()
        assert obs.shape == (num_agents, 115) and np.reshape(step_obs, (num_agents, 115)).shape == (num_agents, 115)
        assert np.size(reward) == num_agents and "score_reward" in info, scenario


def test_env_is_simple115v2_with_checkpoint_rewards(gfootball):
    """simple115 also gives 115 features (without fixed positions), so the wrapper chain itself is checked."""
    import gfootball.env.wrappers as wrappers

    env = maipg_grf.make_football_env("academy_counterattack_easy", seed=7)
    chain = [env]
    while hasattr(chain[-1], "env"):
        chain.append(chain[-1].env)
    env.close()
    (representation,) = [layer for layer in chain if isinstance(layer, wrappers.Simple115StateWrapper)]
    assert representation._fixed_positions  # simple115v2
    assert any(isinstance(layer, wrappers.CheckpointRewardWrapper) for layer in chain)
    config = env.unwrapped._config
    assert config["game_engine_random_seed"] == 7 and config.number_of_left_players() == 4


@pytest.mark.parametrize("scenario", PAPER_SCENARIOS)
def test_smoke(scenario, tmp_path, gfootball):
    result = run(["--scenario", scenario, "--eval-interval", "0", *TINY], tmp_path)
    assert "update 1/1" in result.stdout and "SPS" in result.stdout
    assert glob.glob(os.path.join(tmp_path, "runs", f"{scenario}__*", "events.out.tfevents.*"))
    assert_logged_and_finite(scalars(tmp_path), num_updates=1)


def test_save_model_then_eval_only(tmp_path, gfootball):
    """Training with an evaluation and --log-grad-var, the saved model, then --eval-only on it."""
    flags = ["--scenario", "academy_3_vs_1_with_keeper", "--eval-interval", "1", "--eval-episodes", "1"]
    run([*flags, "--save-model", "--log-grad-var", *TINY], tmp_path)
    logged = scalars(tmp_path)
    assert_logged_and_finite(logged, num_updates=1)
    assert len(logged["diagnostics/grad_var"]) == 1 and logged["eval/success_rate"][0] in (0.0, 1.0)
    (path,) = glob.glob(os.path.join(tmp_path, "runs", "*", "maipg_grf.pt"))
    checkpoint = torch.load(path, weights_only=True)
    assert {"args", "actor", "critic", "agent_q", "mixer", "value_norm"} <= set(checkpoint)
    assert checkpoint["args"]["scenario"] == "academy_3_vs_1_with_keeper" and checkpoint["value_norm"]["debiasing_term"] > 0
    assert not glob.glob(os.path.join(tmp_path, "runs", "*", "*.tmp"))
    result = run(["--eval-only", path, "--eval-episodes", "1", "--num-workers", "1"], tmp_path)
    assert "academy_3_vs_1_with_keeper, 1 greedy episodes, success rate" in result.stdout


def test_envs_are_deterministic_whatever_the_number_of_workers(gfootball):
    """Same seed and actions -> the same observations, rewards, dones and scores with 1 or 2 env processes; another
    seed -> other episodes."""
    rollouts = {}
    for seed, num_workers in [(3, 1), (3, 2), (4, 2)]:
        envs = maipg_grf.FootballEnvs("academy_3_vs_1_with_keeper", maipg_grf.env_seeds(seed, "train", 2), num_workers, 60)
        try:
            rollouts[seed, num_workers] = random_rollout(envs, 40)
        finally:
            envs.close()
    for first, second in zip(rollouts[3, 1], rollouts[3, 2], strict=True):
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
    obs = lambda rollout: np.stack([out[0] for out in rollout])  # noqa: E731
    assert not np.array_equal(obs(rollouts[3, 2]), obs(rollouts[4, 2]))


def test_each_episode_gets_its_own_engine_seed(gfootball):
    """gfootball re-seeds its engine at every reset: with one fixed seed, the same actions replay the same episode.
    Two consecutive episodes of one env under identical (idle) actions must differ."""
    envs = maipg_grf.FootballEnvs("academy_3_vs_1_with_keeper", [5], 1, 60)
    idle = np.zeros((1, envs.num_agents), dtype=np.int64)
    episodes, current = [], [envs.reset()[0]]
    try:
        while len(episodes) < 2:
            obs, rewards, dones, _ = envs.step(idle)
            if dones[0]:
                episodes.append(np.stack(current))
                current = []
            current.append(obs[0])
    finally:
        envs.close()
    assert episodes[0].shape != episodes[1].shape or not np.array_equal(episodes[0], episodes[1])


def test_an_evaluation_depends_only_on_its_seeds(gfootball):
    """An evaluation whose envs start their streams of engine seeds anew plays the same episodes whatever the
    evaluations before it (so a resumed run evaluates as the run it continues would have); other seeds, others."""
    envs = maipg_grf.FootballEnvs("academy_3_vs_1_with_keeper", [7, 8], 2, 60)
    torch.manual_seed(0)  # an actor that moves: one that stands still may leave the engine's randomness unseen
    actor, step = maipg_grf.Actor(115 + 3, 19, 8, True), envs.step

    def evaluate(seeds):  # -> every observation the evaluation saw
        seen = []
        envs.step = lambda *args, **kwargs: seen.append(step(*args, **kwargs)) or seen[-1]
        maipg_grf.evaluate(actor, envs, 2, 8, torch.device("cpu"), seeds=seeds)
        return np.concatenate([out[0] for out in seen])

    try:
        first = evaluate([1, 2])
        evaluate(None)  # an evaluation in between draws further engine seeds from the streams
        again, other = evaluate([1, 2]), evaluate([3, 4])
    finally:
        envs.close()
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


class RecordingEnvs:
    """Envs of 1 agent whose episodes end after env i's lengths[i] steps; records which envs each step stepped."""

    num_agents, n_actions = 1, 19

    def __init__(self, lengths):
        self.lengths, self.num_envs, self.stepped = np.array(lengths), len(lengths), []

    def reset(self, seeds=None):
        self.steps = np.zeros(self.num_envs, dtype=int)
        return np.zeros((self.num_envs, 1, 115), dtype=np.float32)

    def step(self, actions, stepping=None):
        stepping = np.ones(self.num_envs, dtype=bool) if stepping is None else stepping
        self.stepped.append(stepping.copy())
        self.steps += stepping
        dones = stepping & (self.steps % self.lengths == 0)
        zeros = np.zeros(self.num_envs, dtype=np.float32)
        return np.zeros((self.num_envs, 1, 115), np.float32), zeros[:, None] + stepping[:, None], dones, zeros


def test_an_env_whose_evaluation_share_is_done_does_not_step():
    """Env 0 plays 2 episodes of 3 steps, env 1 two of 10: env 0 steps 6 times, not 20 (each step costs the engine)."""
    envs = RecordingEnvs([3, 10])
    returns, _ = maipg_grf.evaluate(maipg_grf.Actor(116, 19, 8, True), envs, 4, 8, torch.device("cpu"))
    stepped = np.array(envs.stepped)
    assert stepped.sum(0).tolist() == [6, 20]
    assert sorted(returns.tolist()) == [3.0, 3.0, 10.0, 10.0]


def test_env_processes_end_when_the_main_process_dies(tmp_path, gfootball):
    """A main process that dies without closing its envs (os._exit skips every clean-up) leaves no env process behind."""
    code = (
        "import os, maipg_grf\n"
        "envs = maipg_grf.FootballEnvs('academy_3_vs_1_with_keeper', [0, 1], 2, 60)\n"
        "envs.reset()\n"
        "print(' '.join(str(process.pid) for process in envs.processes), flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2, result.stdout + result.stderr
    deadline = time.time() + 30
    while time.time() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(running(pid) for pid in pids)


def test_render_gives_frames_and_a_failure_is_one_line(capsys, tmp_path, gfootball):
    envs = maipg_grf.FootballEnvs("academy_empty_goal_close", [0], 1, 60)
    try:
        envs.reset()
        frame = envs.render()
    finally:
        envs.close()
    assert frame.shape == (270, 480, 3) and frame.dtype == np.uint8 and frame.std() > 0

    class CannotRender:  # stands in for an engine without OpenGL: its render() fails as FootballEnvs.render does
        num_envs, num_agents, n_actions = 1, 1, 19

        def reset(self, seeds=None):
            return np.zeros((1, 1, 115), dtype=np.float32)

        def render(self):
            raise RuntimeError("gfootball could not render: no GL context")

    actor = maipg_grf.Actor(115 + 1, 19, 8, True)
    assert maipg_grf.record_video(actor, CannotRender(), 8, torch.device("cpu"), str(tmp_path / "v.gif")) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--capture-video: no video" in out and "OpenGL" in out


def test_unknown_scenario_is_one_line_listing_the_academy(capsys):
    with pytest.raises(SystemExit) as exit_info:
        maipg_grf.check_args(maipg_grf.Args(scenario="11_vs_11_stochastic"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scenario must be one of" in err
    assert all(name in err for name in maipg_grf.ACADEMY_SCENARIOS)


def test_missing_gfootball_is_one_line_naming_the_install_script(tmp_path):
    """A gfootball that cannot be imported (a stand-in package raising ImportError shadows any real one)."""
    fake = tmp_path / "fake" / "gfootball"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no module named gfootball_engine')\n")
    result = run(
        TINY,
        tmp_path,
        check=False,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "gfootball" in line and "scripts/install_grf.sh" in line


@pytest.fixture(scope="module")
def stub_run(tmp_path_factory):
    """One run of the script on StubFootballEnvs, shared by the tests that read its event file: 2 updates of 2 envs x 16
    steps (4 episodes of 4 steps per env and update), an evaluation of 6 episodes after each, --learning-rate 0."""
    cwd = tmp_path_factory.mktemp("stub_run")
    run([*STUB_RUN, "--update-epochs", "2", "--eval-episodes", "6", "--learning-rate", "0"], cwd, env=stub_gfootball(cwd))
    return scalars(cwd)


def test_stub_run_logs_every_update_finite(stub_run):
    assert_logged_and_finite(stub_run, num_updates=2)


def test_success_is_counted_once_per_episode(stub_run):
    """Each update ends 8 episodes (2 envs x 16 steps / 4), 4 of which scored (2 of them three times); each evaluation
    plays 3 episodes per env, patterns 0-2 (a goal, one conceded, none)."""
    assert stub_run["charts/success_rate"] == [0.5, 0.5]
    assert stub_run["charts/goals"] == [0.75, 0.75]  # the goal difference per episode: (1 - 1 + 0 + 3) / 4
    assert stub_run["charts/episodic_return"] == [2.25, 2.25]  # each of the 3 agents is rewarded for each goal
    assert stub_run["charts/episodic_length"] == [STUB_EPISODE_LENGTH] * 2
    assert stub_run["eval/success_rate"] == pytest.approx([1 / 3, 1 / 3])  # in [0, 1]: episodes, not goals, counted


def test_learning_rate_zero_leaves_the_policy_unchanged(stub_run):
    """With a learning rate of 0 the update starts from and keeps the rollout's policy: the ratios are exactly 1."""
    assert stub_run["losses/approx_kl"] == [0.0, 0.0]
    assert stub_run["losses/clipfrac"] == [0.0, 0.0]


def stub_envs(monkeypatch, seeds, num_workers, fate=None, timeout=60.0):
    """FootballEnvs whose workers build StubFootballEnvs (forked, they inherit the patched make_football_env)."""
    monkeypatch.setattr(
        maipg_grf,
        "make_football_env",
        lambda scenario, seed: StubFootballEnv(3, {"game_engine_random_seed": seed}, fate=fate, fatal_seed=seeds[-1]),
    )
    return maipg_grf.FootballEnvs("academy_3_vs_1_with_keeper", seeds, num_workers, timeout)


def test_env_seeds_share_no_engine_seeds_across_runs_and_streams(monkeypatch):
    """With seed + i, --seed 1 and --seed 2 would share all envs but one. No env of --seed 1 and --seed 2, or
    of the train and eval envs of one seed, draws the same first engine seed (the stand-in's first observations are
    drawn from it); and the engine seeds do not depend on --num-workers."""
    first_obs = {}
    for seed, stream, num_workers in [(1, "train", 2), (2, "train", 2), (1, "eval", 2), (1, "train", 1)]:
        envs = stub_envs(monkeypatch, maipg_grf.env_seeds(seed, stream, 8), num_workers)
        first_obs[seed, stream, num_workers] = [obs.tobytes() for obs in envs.reset()]
        envs.close()
    assert first_obs[1, "train", 2] == first_obs[1, "train", 1]
    for other in [(2, "train", 2), (1, "eval", 2)]:
        shared = set(first_obs[1, "train", 2]) & set(first_obs[other])
        assert not shared, f"{len(shared)} of the 8 train envs of --seed 1 share their first engine seed with {other}"
    assert len(set(first_obs[1, "train", 2])) == 8


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_dead_or_hung_env_process_is_one_line_and_closes(monkeypatch, failure):
    """A worker killed mid-run, or one whose engine hangs, stops the envs with EnvProcessError (a SystemExit: one line,
    no traceback) naming the worker and the scenario; every worker is ended and close() does not raise."""
    envs = stub_envs(monkeypatch, [11, 12], 2, fate="hang" if failure == "hung" else None, timeout=1.0)
    idle = np.zeros((2, 3), dtype=np.int64)
    envs.reset()
    with pytest.raises(maipg_grf.EnvProcessError) as error:
        for step in range(1, STUB_FATAL_STEP + 1):
            if failure == "killed" and step == 2:
                os.kill(envs.processes[1].pid, signal.SIGKILL)
            envs.step(idle)
    problem = "has not answered in 1 s (a hung engine?)" if failure == "hung" else "died (SIGKILL)"
    assert str(error.value) == f"academy_3_vs_1_with_keeper: env process 1 (envs 1-1) {problem}"
    assert step == (STUB_FATAL_STEP if failure == "hung" else 2)
    envs.close()
    assert not any(process.is_alive() for process in envs.processes)


def test_video_env_whose_process_dies_is_no_video_not_the_end(monkeypatch, capsys, tmp_path):
    """Rendering without OpenGL can crash the video env's process: record_video says so in one line and the run goes on."""
    envs = stub_envs(monkeypatch, [7], 1)
    os.kill(envs.processes[0].pid, signal.SIGKILL)
    actor = maipg_grf.Actor(115 + 3, 19, 8, True)
    assert maipg_grf.record_video(actor, envs, 8, torch.device("cpu"), str(tmp_path / "v.gif")) is None
    envs.close()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--capture-video: no video" in out and "env process 0 (envs 0-0) died (SIGKILL)" in out


def test_run_whose_env_process_dies_stops_with_one_line(tmp_path):
    """The script, with an eval env process killed (SIGKILL) in the first evaluation: exit status 1, one line naming
    the process and the scenario on stderr and no traceback, the scalars of update 1, logged just before, in the event
    file (the writer was closed), and no env process left, of the train or the eval envs."""
    fatal_seed = maipg_grf.env_seeds(1, "eval", 2)[1]
    env = stub_gfootball(tmp_path, STUB_FATE="die", STUB_FATAL_SEED=str(fatal_seed))
    result = run([*STUB_RUN, "--update-epochs", "1", "--eval-episodes", "2"], tmp_path, check=False, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == ["academy_3_vs_1_with_keeper: env process 1 (envs 1-1) died (SIGKILL)"]
    logged = scalars(tmp_path)
    assert_logged_and_finite(logged, num_updates=1)
    assert "eval/success_rate" not in logged
    pids = [int(pid) for pid in os.listdir(tmp_path / "pids")]
    assert len(pids) == 4  # 2 train and 2 eval env processes
    deadline = time.time() + 10
    while time.time() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(running(pid) for pid in pids)


def test_bad_env_timeout_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        maipg_grf.check_args(maipg_grf.Args(env_timeout=0))
    assert exit_info.value.code == 2 and "--env-timeout must be > 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, --resume and preemption (on stand-in envs in the script's real env processes)
# ---------------------------------------------------------------------------------------------------------------------
STUB_UPDATE_STEPS = 32  # 2 envs x 16 steps: every env ends 4 whole episodes per update, so updates end between episodes
RESUMABLE = [*STUB_RUN[:-2], "--eval-interval", "2", "--eval-episodes", "6", "--update-epochs", "2", "--save-model"]


def logged_points(cwd) -> dict[str, list[tuple[int, float]]]:
    """The event file of the one run under cwd -> {tag: its (step, value) pairs}, but the wall-clock charts/SPS"""
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag != "charts/SPS"}


def saved_model(cwd) -> dict:
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", "maipg_grf.pt"))
    return torch.load(path, weights_only=True)


def assert_same_tensors(expected: dict, got: dict, parts):
    for part in parts:
        assert expected[part].keys() == got[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key}"


def test_a_resumed_run_continues_with_the_restored_training_state(tmp_path):
    """A run that went on past its checkpoint (update 2 of 3, as if killed after it), resumed twice: first with
    --total-timesteps at the checkpoint (no update left), whose saved model is the checkpoint's networks and ValueNorm
    tensor for tensor; then up to update 4 (and on 1 env process instead of 2), after the one line saying that the
    episodes start afresh. The stand-in envs repeat 4 episodes, so a fresh env continues exactly as the running one
    would: the final model and every logged scalar, step for step (update 3's points of the first process purged),
    equal those of the same 4 updates run uninterrupted. That fails if any network, target copy, optimiser, ValueNorm
    or generator (the diagnostics one included: rvar) is not restored."""
    alone, resumed = tmp_path / "alone", tmp_path / "resumed"
    run([*RESUMABLE, "--total-timesteps", str(4 * STUB_UPDATE_STEPS)], alone, env=stub_gfootball(alone, STUB_REPEAT="1"))
    env = stub_gfootball(resumed, STUB_REPEAT="1")
    run([*RESUMABLE, "--total-timesteps", str(3 * STUB_UPDATE_STEPS), "--checkpoint-interval", "2"], resumed, env=env)
    (checkpoint_path,) = glob.glob(os.path.join(resumed, "runs", "*", "checkpoint.pt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["update"] == 2 and checkpoint["global_step"] == 2 * STUB_UPDATE_STEPS
    stateful = ["target_agent_q", "target_mixer", "actor_optimizer", "critic_optimizer", "q_optimizer"]
    assert set(maipg_grf.MODEL_PARTS + ("rng", "last_success", "eval_success", *stateful)) <= set(checkpoint)

    result = run([*RESUMABLE, "--total-timesteps", str(2 * STUB_UPDATE_STEPS), "--resume", checkpoint_path], resumed, env=env)
    assert "update " not in result.stdout and f"done: {2 * STUB_UPDATE_STEPS} env steps" in result.stdout
    assert_same_tensors(checkpoint, saved_model(resumed), maipg_grf.MODEL_PARTS)

    flags = [*RESUMABLE, "--total-timesteps", str(4 * STUB_UPDATE_STEPS), "--num-workers", "1"]
    result = run([*flags, "--resume", os.path.dirname(checkpoint_path)], resumed, env=env)
    assert result.stdout.splitlines()[0] == (
        "--resume: gfootball's engines cannot be saved, so the episodes start afresh (with engine seeds of their own)"
    )
    assert "update 4/4" in result.stdout and "update 1/" not in result.stdout and result.stderr == ""
    assert_same_tensors(saved_model(alone), saved_model(resumed), maipg_grf.MODEL_PARTS)
    alone_logged, resumed_logged = logged_points(alone), logged_points(resumed)
    assert alone_logged == resumed_logged
    assert [step for step, _ in resumed_logged["diagnostics/rvar"]] == [32, 64, 96, 128]
    assert [step for step, _ in resumed_logged["eval/success_rate"]] == [64, 128]


def stub_models(tmp_path, variants: dict, *flags) -> dict:
    """One 2-update run on the stand-in envs per variant (name -> extra flags) -> {name: its saved model}"""
    models = {}
    for name, extra in variants.items():
        cwd = tmp_path / name
        cwd.mkdir()
        two_updates = ["--eval-interval", "0", "--total-timesteps", str(2 * STUB_UPDATE_STEPS)]
        run([*RESUMABLE, *two_updates, *flags, *extra], cwd, env=stub_gfootball(cwd))
        models[name] = saved_model(cwd)
    return models


def test_nu_zero_is_mappo_whatever_the_q_branch(tmp_path):
    """With nu = 0 the actor and V must not depend on the Q branch: two runs from the same seed whose Q branches differ
    completely (mixer, TD(lambda), target rate: the flags that act at nu = 0) end with identical actor and V parameters
    (so they also saw the same rollouts), and different Q-networks. (The DPG-only flags cannot act at nu = 0, where
    actor_loss skips L_dpg: test_dpg_only_flags_change_a_run_with_nu_above_zero shows they act at nu > 0.)"""
    q_branch = ["--mixer", "vdn", "--td-lambda", "0.3", "--target-tau", "0.5"]
    runs = stub_models(tmp_path, {"default": [], "flags": q_branch}, "--nu", "0")
    assert runs["flags"]["args"]["mixer"] == "vdn" and runs["flags"]["args"]["td_lambda"] == 0.3
    assert_same_tensors(runs["default"], runs["flags"], ["actor", "critic", "value_norm"])
    assert not torch.equal(runs["default"]["agent_q"]["head.weight"], runs["flags"]["agent_q"]["head.weight"])


def test_dpg_only_flags_change_a_run_with_nu_above_zero(tmp_path):
    """At nu = 0.5 --dpg-scale advantage (L_dpg divided by the advantages' std) and a --nu-warmup (nu = 0 in update 1,
    half of it in update 2) each change the actor that a run without them trains, from the same seed."""
    no_warmup = ["--nu-warmup", "0"]
    variants = {"plain": no_warmup, "dpg_scale": [*no_warmup, "--dpg-scale", "advantage"]}
    variants["warmup"] = ["--nu-warmup", str(2 * STUB_UPDATE_STEPS)]
    runs = stub_models(tmp_path, variants, "--nu", "0.5")
    for name in ("dpg_scale", "warmup"):
        assert not torch.equal(runs["plain"]["actor"]["head.weight"], runs[name]["actor"]["head.weight"]), name


def test_resumed_envs_draw_engine_seeds_of_their_own():
    """A resumed run's envs start afresh: with the run's seeds they would replay its first episodes."""
    fresh = maipg_grf.env_seeds(1, "train", 50)
    after_3, after_4 = maipg_grf.resumed_seeds(fresh, 3), maipg_grf.resumed_seeds(fresh, 4)
    assert maipg_grf.resumed_seeds(fresh, None) == fresh
    assert len(set(fresh) | set(after_3) | set(after_4)) == 150
    assert after_3 == maipg_grf.resumed_seeds(fresh, 3)  # reproducible: a second resume from it draws the same


@pytest.mark.parametrize(
    "stop", ["SIGTERM to the main process", "SIGTERM to the process group", "SIGINT to the process group"]
)
def test_a_signal_checkpoints_closes_the_env_processes_exits_0_and_resumes(tmp_path, stop):
    """Slurm's SIGTERM reaches the main process, or every process of the job step; Ctrl-C's SIGINT the whole process
    group. The env processes ignore both, so the main process ends the update, checkpoints, closes them and exits 0;
    the run then resumes."""
    env = stub_gfootball(tmp_path)
    flags = [*STUB_RUN[:-2], "--eval-interval", "0", "--update-epochs", "2", "--checkpoint-interval", "0"]
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *flags, "--total-timesteps", str(1000 * STUB_UPDATE_STEPS)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        start_new_session=True,  # its own process group, which a signal to the group goes to
    )
    first_line = process.stdout.readline()  # printed after update 1: the loop is running
    assert first_line.startswith("update 1/1000"), first_line + process.stderr.read()
    signum = signal.Signals[stop.split()[0]]
    if stop.endswith("group"):
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and stderr == "", stderr
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    assert f"{stop.split()[0]}: stopped after update " in stdout and "done:" not in stdout
    assert f"; continue with --resume {os.path.relpath(checkpoint, tmp_path)}\n" in stdout
    pids = [int(pid) for pid in os.listdir(tmp_path / "pids")]
    assert len(pids) == 2 and not any(running(pid) for pid in pids)  # closed, and reaped by the main process
    stopped_at = torch.load(checkpoint, weights_only=False)["update"]
    total = str(STUB_UPDATE_STEPS * (stopped_at + 1))
    result = run([*flags, "--total-timesteps", total, "--resume", checkpoint], tmp_path, env=env)
    assert f"update {stopped_at + 1}/{stopped_at + 1}" in result.stdout and "done:" in result.stdout


def test_bad_resume_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    run([*TINY, "--eval-interval", "0", "--checkpoint-interval", "1"], tmp_path, env=stub_gfootball(tmp_path))
    (checkpoint,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    with open(checkpoint, "rb") as f:
        (tmp_path / "truncated.pt").write_bytes(f.read()[:1000])
    torch.save({"script": "maipg_mpe.py", "args": {}}, tmp_path / "foreign.pt")
    stale = torch.load(checkpoint, weights_only=False)  # as an older version of the script wrote it
    stale["args"] = {**{name: value for name, value in stale["args"].items() if name != "mixer"}, "gone": 1}
    torch.save(stale, tmp_path / "stale.pt")
    before = sorted(glob.glob(os.path.join(tmp_path, "runs", "**"), recursive=True))
    result = run(["--resume", checkpoint, "--scenario", "academy_corner"], tmp_path, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--scenario cannot change on --resume (the run has 'academy_3_vs_1_with_keeper')" in result.stderr
    assert sorted(glob.glob(os.path.join(tmp_path, "runs", "**"), recursive=True)) == before  # nothing written
    monkeypatch.chdir(tmp_path)
    for path, message in [  # in-process: the function the command line calls first
        ("no/such/run", "--resume: no such checkpoint 'no/such/run'"),
        ("truncated.pt", "--resume: 'truncated.pt' is not a readable checkpoint, perhaps truncated"),
        ("foreign.pt", "--resume: 'foreign.pt' is not a checkpoint of maipg_grf.py"),
        ("stale.pt", "--resume: 'stale.pt' was written by another version of maipg_grf.py (flags that differ: gone, mixer)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            maipg_grf.load_checkpoint(path, "maipg_grf.py")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_bare_resume_keeps_every_flag_of_the_run(tmp_path):
    """--resume RUN and no other flag: every flag keeps the run's value, those that may be given on --resume too. A
    finished run resumed bare runs no update (its --total-timesteps), and the model it saves holds the run's
    --eval-interval, --checkpoint-interval, --num-workers, --env-timeout and --torch-threads, not their defaults."""
    env = stub_gfootball(tmp_path)
    flags = ["--num-envs", "2", "--num-steps", "16", "--total-timesteps", str(2 * STUB_UPDATE_STEPS), "--update-epochs", "1"]
    flags += ["--eval-interval", "2", "--eval-episodes", "2", "--checkpoint-interval", "1", "--save-model"]
    own = {"num_workers": 1, "env_timeout": 50.0, "torch_threads": 2}
    run([*flags, "--num-workers", "1", "--env-timeout", "50", "--torch-threads", "2"], tmp_path, env=env)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    os.remove(os.path.join(run_dir, "maipg_grf.pt"))
    result = run(["--resume", run_dir], tmp_path, env=env, timeout=60)  # with the defaults it would train 25M steps
    assert "update " not in result.stdout and f"done: {2 * STUB_UPDATE_STEPS} env steps" in result.stdout
    args = saved_model(tmp_path)["args"]
    kept = {"total_timesteps": 2 * STUB_UPDATE_STEPS, "eval_interval": 2, "checkpoint_interval": 1, "save_model": True}
    assert {name: args[name] for name in {**kept, **own}} == {**kept, **own}


def test_log_grad_var_leaves_training_unchanged(tmp_path):
    """--log-grad-var's 8 extra actor losses draw their Gumbel noise from a forked generator: at nu > 0, with and
    without it, the same seed trains the same networks, bit for bit."""
    runs = stub_models(tmp_path, {"plain": [], "grad_var": ["--log-grad-var"]}, "--nu", "0.5", "--nu-warmup", "0")
    assert_same_tensors(runs["plain"], runs["grad_var"], maipg_grf.MODEL_PARTS)


def test_save_model_may_be_given_on_resume(tmp_path):
    """--save-model is an output, not a setting of the run: a run started without it, resumed with it, saves its model."""
    env = stub_gfootball(tmp_path)
    run([*TINY, "--eval-interval", "0", "--checkpoint-interval", "1"], tmp_path, env=env)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    assert not os.path.exists(os.path.join(run_dir, "maipg_grf.pt"))
    result = run(["--resume", run_dir, "--save-model"], tmp_path, env=env, timeout=120)
    assert "model saved to" in result.stdout and saved_model(tmp_path)["args"]["save_model"]


def test_dpg_loss_weighs_each_alive_agent_as_eq_10():
    """L_dpg per alive agent: at a step with n agents alive, each alive agent's gradient through mu is 1 / n of the raw
    Q_tot gradient (as L_clip, a mean over alive agent-steps, weighs it); with every agent alive the divisor is N."""
    torch.manual_seed(0)
    q_values, state, value_norm = torch.randn(2, 3, 4), torch.zeros(2, 5), maipg_grf.ValueNorm()
    scale = value_norm.mean_var()[1].sqrt()  # d raw Q_tot / d normalised Q_tot
    active_masks = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # step 1: agent 1 is dead
    mu = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2], [3, 0, 1]]), 4).float().requires_grad_()
    loss = maipg_grf.dpg_loss(mu, q_values, state, maipg_grf.VDNMixer(), torch.ones(2), active_masks, value_norm)
    (grad,) = torch.autograd.grad(loss, mu)
    alive = torch.tensor([3.0, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(grad, -scale * q_values / alive / 2)  # / 2: the mean over the 2 steps
