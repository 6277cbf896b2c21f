"""maipg_continuous.py: smoke runs on Multi-Agent MuJoCo (equal, unequal observation and unequal action sizes) and their
logged scalars, save then --eval-only, videos, the training loop's chunks and padding (lr 0 runs), per-env seeds, the
padded action dimensions, Q of the clipped action, the dpg gradient, L_dpg's per-agent weight (1 / N), the time-limit
bootstrap, nu = 0 being MAPPO whatever the Q branch, the DPG-only flags acting at nu > 0, bad input, the NaN stop, and
checkpoints: --resume restoring the training state (the normaliser's statistics included), SIGTERM, and bad checkpoints."""

import glob
import os
import runpy
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import maipg_continuous as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "maipg_continuous.py")
# 2 envs x 32 steps with 20-step episodes: every rollout holds a time-limit end and a reset
TINY = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "64", "--max-episode-steps", "20"]
TINY += ["--update-epochs", "1", "--num-minibatches", "1", "--eval-episodes", "2"]


def run(args, cwd, check=True, **env):
    result = subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def saved_model(cwd):
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", "maipg_continuous.pt"))
    return path


def scalars(cwd):
    """The run's TensorBoard scalars: {tag: [one value per update]}"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [scalar.value for scalar in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


LOGGED = {"charts/SPS", "charts/learning_rate", "charts/q_tot_mean", "charts/episodic_return", "charts/episodic_length"}
LOGGED |= {f"losses/{name}" for name in ("policy_loss", "dpg_loss", "value_loss", "q_loss", "entropy", "approx_kl")}
LOGGED |= {"losses/clipfrac", "losses/explained_variance", "diagnostics/rvar", "eval/episodic_return", "charts/nu"}
LOGGED |= {"diagnostics/mixer_slope", "diagnostics/q_gap", "diagnostics/dpg_grad_ratio", "diagnostics/cv_corr"}
LOGGED |= {"diagnostics/rvar_own", "diagnostics/q_explained_variance", "diagnostics/q_explained_variance_mc"}


def assert_logged_and_finite(cwd, expected):
    logged = scalars(cwd)
    assert expected <= set(logged), expected - set(logged)
    assert all(len(values) == 1 and np.isfinite(values).all() for values in logged.values()), logged  # 1 update


@pytest.mark.parametrize("robot, conf", [("HalfCheetah", "2x3"), ("Hopper", "3x1"), ("Humanoid", "9|8")])
def test_smoke_then_eval_only(robot, conf, tmp_path):
    result = run(["--env", robot, "--agent-conf", conf, "--eval-interval", "1", "--save-model", *TINY], tmp_path)
    assert "update 1/1" in result.stdout and "env stepping took" in result.stdout
    assert_logged_and_finite(tmp_path, LOGGED)
    checkpoint = torch.load(saved_model(tmp_path), weights_only=True)
    assert {"args", "actor", "critic", "agent_q", "mixer", "value_norm"} <= set(checkpoint)
    assert checkpoint["value_norm"]["debiasing_term"] > 0
    assert not glob.glob(os.path.join(tmp_path, "runs", "*", "*.tmp"))
    result = run(["--eval-only", saved_model(tmp_path), "--eval-episodes", "3"], tmp_path)
    assert f"{robot} {conf}, 3 episodes with mu" in result.stdout


def test_video_or_one_line_without_opengl(tmp_path):
    # no X display: GLFW cannot open a context, and the flag says so in one line instead of crashing the training run
    flags = ["--capture-video", "--eval-interval", "1", "--no-recurrent", "--log-grad-var", "--mixer", "vdn", "--save-model"]
    result = run([*flags, *TINY], tmp_path, MUJOCO_GL="glfw", DISPLAY="")
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("--capture-video")]
    assert "cannot render with MUJOCO_GL=glfw" in line and "Traceback" not in result.stderr
    assert "update 1/1" in result.stdout
    assert_logged_and_finite(tmp_path, LOGGED | {"diagnostics/grad_var"})
    result = run(["--eval-only", saved_model(tmp_path), "--capture-video"], tmp_path, MUJOCO_GL="egl")
    if "--capture-video: MuJoCo cannot render" in result.stderr:
        pytest.skip("no EGL here (apt-get install libegl1 libgl1-mesa-dri)")
    assert "video:" in result.stdout and glob.glob(os.path.join(tmp_path, "videos", "*.gif"))


# ---------------------------------------------------------------------------------------------------------------------
# The training loop's bookkeeping: lr 0 runs on Humanoid 9|8 (obs 242 and 170, actions 9 and 8), 25 steps per rollout
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_zero_runs(tmp_path_factory):
    """Two updates with --learning-rate 0, in chunks of 10 (the last padded by 5 steps) and of 25 (no padding)."""
    logged = {}
    for chunk_len in (10, 25):
        cwd = tmp_path_factory.mktemp(f"chunk_len_{chunk_len}")
        flags = ["--env", "Humanoid", "--agent-conf", "9|8", "--num-steps", "25", "--chunk-len", str(chunk_len)]
        flags += ["--total-timesteps", "100", "--update-epochs", "2", "--learning-rate", "0", "--eval-interval", "0"]
        run([*TINY, *flags], cwd)  # the last of a repeated flag wins
        logged[chunk_len] = scalars(cwd)
    return logged


def test_learning_rate_zero_gives_exactly_zero_kl_and_clipfrac(lr_zero_runs):
    """With lr 0 the policy never moves, so the training pass must give back the rollout's log-probabilities bit for
    bit: any slip in the chunks, the hidden states entering them, the padding or the minibatch indexing, or in the
    hidden states carried over to the second update, shows as approx_kl or clipfrac != 0."""
    for logged in lr_zero_runs.values():
        assert logged["losses/approx_kl"] == [0.0, 0.0] and logged["losses/clipfrac"] == [0.0, 0.0]


def test_chunk_padding_carries_no_weight_in_the_training_loop(lr_zero_runs):
    """The first update sees the same rollout in both runs (lr 0; the chunking changes only the training pass, and the
    random numbers from the second rollout on), so every loss must agree: padded steps entering any of them (they did
    in charts/q_tot_mean, which now comes from the rollout, as the other diagnostics do) would move it by ~1/6."""
    padded, unpadded = lr_zero_runs[10], lr_zero_runs[25]
    for tag in [tag for tag in padded if tag.startswith("losses/")] + ["charts/q_tot_mean"]:
        np.testing.assert_allclose(padded[tag][0], unpadded[tag][0], rtol=1e-5, atol=1e-5, err_msg=tag)
    # the padded action dimension of agent 1 carries no entropy: log_std = -1 (the default) gives 0.5 + 0.5 ln(2 pi) - 1
    # per real dimension
    np.testing.assert_allclose(padded["losses/entropy"], (9 + 8) / 2 * (0.5 + 0.5 * np.log(2 * np.pi) - 1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The env interface and the padded action dimensions
# ---------------------------------------------------------------------------------------------------------------------
def test_padded_action_dimensions_never_reach_the_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory
    envs = mc.MaMuJoCoEnvs("Humanoid", "9|8", [0, 1], max_episode_steps=1000)
    assert envs.act_dims == [9, 8] and envs.act_mask.tolist()[1] == [1.0] * 8 + [0.0]
    assert envs.obs_dims == [242, 170] and envs.obs_dim == 242
    envs.reset()
    sent = []
    for env in envs.envs:
        env_step = env.single_agent_env.step
        env.single_agent_env.step = lambda action, env_step=env_step: sent.append(action.copy()) or env_step(action)
    actions = np.full((2, 2, 9), 5.0, dtype=np.float32)  # far outside the bounds [-0.4, 0.4]
    actions[:, 1, 8] = np.nan  # the padded dimension of agent 1: poison that must not travel
    obs, state, rewards, *_ = envs.step(actions)
    assert len(sent) == 2
    for action in sent:  # the robot's 17 actuators, each set once, from the real dimensions only, clipped
        assert action.shape == (17,) and np.isfinite(action).all()
        np.testing.assert_allclose(action, 0.4)
    assert obs.shape == (2, 2, 242) and (obs[:, 1, 170:] == 0).all() and state.shape == (2, 348)
    envs.close()


def test_time_limit_is_truncation_with_the_final_observation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    envs = mc.MaMuJoCoEnvs("HalfCheetah", "2x3", [0, 1], max_episode_steps=5)
    longer = mc.MaMuJoCoEnvs("HalfCheetah", "2x3", [0, 1], max_episode_steps=6)  # the same episodes, one step longer
    envs.reset(), longer.reset()
    zero = np.zeros((2, 2, 3), dtype=np.float32)
    for _ in range(4):
        terminated, truncated = envs.step(zero)[3:5]
        assert not (terminated | truncated).any()
        longer.step(zero)
    obs, state, _, terminated, truncated, final_obs, final_state = envs.step(zero)
    assert truncated.all() and not terminated.any()  # HalfCheetah never falls: the 5-step limit is a truncation
    obs_5, state_5 = longer.step(zero)[:2]
    np.testing.assert_array_equal(final_obs, obs_5)  # what the episode ended in...
    np.testing.assert_array_equal(final_state, state_5)
    assert not np.allclose(obs, obs_5)  # ...while obs already starts the next episode
    hopper = mc.MaMuJoCoEnvs("Hopper", "3x1", [0], max_episode_steps=1000)
    hopper.reset()
    for _ in range(200):
        terminated, truncated = hopper.step(np.ones((1, 3, 1), dtype=np.float32))[3:5]
        if terminated[0] or truncated[0]:
            break
    assert terminated[0] and not truncated[0]  # full torque topples the hopper long before the time limit
    for vec_env in (envs, longer, hopper):
        vec_env.close()


def test_seeds_share_no_env_across_runs_nor_between_train_and_eval(tmp_path, monkeypatch):
    # with seed + i, env 1 of --seed 1 would be env 0 of --seed 2, and so on for all envs but one
    monkeypatch.chdir(tmp_path)
    initial_obs = {}
    for seed, stream in [(1, "train"), (2, "train"), (1, "eval")]:
        envs = mc.make_envs(mc.Args(), mc.env_seeds(seed, stream, 8))
        initial_obs[seed, stream] = envs.reset()[0].reshape(8, -1)  # [envs, agents * obs_dim]
        envs.close()
    for first, second in [((1, "train"), (2, "train")), ((1, "train"), (1, "eval")), ((1, "train"), (1, "train"))]:
        same_start = (initial_obs[first][:, None] == initial_obs[second][None]).all(-1)  # [8, 8]: env i of first, j of second
        assert same_start.sum() == (8 if first == second else 0), (first, second)


def test_padded_dimensions_carry_no_log_prob_or_entropy():
    torch.manual_seed(0)
    act_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # agent 1 has 2 real dimensions out of 3
    actor = mc.Actor(5, 3, 16, True)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([0.3, -0.2, 1.7]))
    mean, _ = actor(torch.randn(4, 6, 2, 5), torch.zeros(6, 2, 16), torch.ones(4, 6, 2), act_mask)
    assert (mean[..., 1, 2] == 0).all()  # mu is 0 on the padded dimension
    actions = torch.randn(4, 6, 2, 3)
    logp, entropy = mc.gaussian_log_prob_entropy(mean, actor.log_std, actions, act_mask)
    moved = actions.clone()
    moved[..., 1, 2] += 100.0
    torch.testing.assert_close(mc.gaussian_log_prob_entropy(mean, actor.log_std, moved, act_mask)[0], logp)
    per_dim_entropy = 0.5 + 0.5 * np.log(2 * np.pi) + actor.log_std.detach()
    torch.testing.assert_close(entropy[..., 0], per_dim_entropy.sum().expand(4, 6))
    torch.testing.assert_close(entropy[..., 1], per_dim_entropy[:2].sum().expand(4, 6))
    expected = torch.distributions.Normal(mean[..., 1, :2], actor.log_std[:2].exp()).log_prob(actions[..., 1, :2]).sum(-1)
    torch.testing.assert_close(logp[..., 1], expected)


def unit_norm():
    """A ValueNorm whose statistics are mean 0, variance 1: denormalize is the identity."""
    value_norm = mc.ValueNorm()
    value_norm.running_mean_sq.fill_(1.0)
    value_norm.debiasing_term.fill_(1.0)
    return value_norm


def test_dpg_gradient_reaches_the_mean_head_and_not_the_log_std():
    torch.manual_seed(0)
    N, D, S, A, H = 2, 4, 7, 3, 16
    act_mask = torch.ones(N, A)
    actor, critic = mc.Actor(D + N, A, H, True), mc.Critic(S + D + N, H, True)
    agent_q, mixer = mc.AgentQ(S + D + N, A, H, True, -torch.ones(N, A), torch.ones(N, A)), mc.QMixer(N, S)
    obs, state, masks = torch.randn(5, 3, N, D), torch.randn(5, 3, S), torch.ones(5, 3, N)
    mean, _ = actor(mc.actor_input(obs), torch.zeros(3, N, H), masks, act_mask)
    critic_in = mc.critic_input(obs, state)
    q_features, _ = agent_q(critic_in, torch.zeros(3, N, H), masks)
    critic(critic_in, torch.zeros(3, N, H), masks)
    mc.gaussian_dpg_loss(mean, q_features, state, agent_q, mixer, torch.ones(5, 3), unit_norm()).backward()
    assert actor.head.weight.grad.abs().sum() > 0 and actor.trunk.gru.weight_ih_l0.grad.abs().sum() > 0
    assert actor.log_std.grad is None or (actor.log_std.grad == 0).all()
    for module in (critic, agent_q, mixer):
        assert all(p.grad is None or (p.grad == 0).all() for p in module.parameters())


def test_agent_q_reuses_the_trunk_for_any_action():
    torch.manual_seed(0)
    agent_q = mc.AgentQ(6, 2, 16, True, torch.full((3, 2), -10.0), torch.full((3, 2), 10.0))  # 3 agents
    features, _ = agent_q(torch.randn(4, 3, 6), torch.zeros(3, 16), torch.ones(4, 3))
    actions = torch.randn(4, 3, 2)
    q = agent_q.q(features, actions)
    assert q.shape == (4, 3)
    assert not torch.allclose(q, agent_q.q(features, actions + 1.0))  # the action matters, after the GRU


def test_q_sees_the_clipped_action_and_dpg_has_no_gradient_beyond_the_bound():
    """Q_i is trained on, bootstraps from and differentiates (L_dpg) at clip(a), the action the env executes;
    agent 1 has bounds +-0.4 on 2 real dimensions and a padded third."""
    torch.manual_seed(0)
    N, S, A, H = 2, 5, 3, 16
    act_low, act_high = torch.tensor([[-1.0, -1.0, -1.0], [-0.4, -0.4, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.4, 0.4, 0.0]])
    agent_q, mixer = mc.AgentQ(S, A, H, True, act_low, act_high), mc.QMixer(N, S)
    state = torch.randn(4, 6, S)
    features, _ = agent_q(torch.randn(4, 6, N, S), torch.zeros(6, N, H), torch.ones(4, 6, N))  # [4, 6, N, H]
    actions = 3 * torch.randn(4, 6, N, A) * torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]).view(N, A)
    clipped = torch.as_tensor(np.clip(actions.numpy(), act_low.numpy(), act_high.numpy()))
    q = agent_q.q(features, actions)
    torch.testing.assert_close(q, agent_q.head(torch.cat([features, clipped], -1)).squeeze(-1))
    assert not torch.allclose(q, agent_q.head(torch.cat([features, actions], -1)).squeeze(-1))  # unclipped differs
    # mu beyond the bound on agent 0's dimensions 0 and 2 and agent 1's dimension 1: no gradient there, some elsewhere
    mu = torch.tensor([[2.0, 0.5, -3.0], [0.1, -0.9, 0.0]]).expand(4, 6, N, A).clone().requires_grad_()
    mc.gaussian_dpg_loss(mu, features, state, agent_q, mixer, torch.ones(4, 6), unit_norm()).backward()
    beyond = torch.tensor([[True, False, True], [False, True, False]])
    assert (mu.grad[..., beyond] == 0).all()
    assert (mu.grad[..., 0, 1] != 0).all() and (mu.grad[..., 1, 0] != 0).all()


def test_dpg_loss_weighs_agents_as_l_clip_does():
    """Eq. (10) sums both terms over agents, L_clip is a mean over them, so L_dpg is divided by N: duplicating every
    agent (2N agents, same means, Q-features and bounds; VDN) leaves the gradient of both terms on the shared actor's
    means unchanged (without the division, L_dpg's doubled: per agent it weighed N times its share)."""
    torch.manual_seed(0)
    B, N, A, H = 5, 3, 2, 8
    shared = torch.empty(B, N, A).uniform_(-0.9, 0.9).requires_grad_()  # the shared actor's means, inside the bounds
    features, log_std, actions = torch.randn(B, N, H), torch.tensor([0.2, -0.3]), torch.randn(B, N, A)
    advantages, old_logprobs = torch.randn(B, N), torch.randn(B, N) - 2.0
    head = mc.AgentQ(H, A, H, False, -torch.ones(N, A), torch.ones(N, A)).head.state_dict()

    def gradients(copies):
        agent_q = mc.AgentQ(H, A, H, False, -torch.ones(copies * N, A), torch.ones(copies * N, A))
        agent_q.head.load_state_dict(head)
        mean, state = torch.cat([shared] * copies, -2), torch.zeros(B, 1)
        dpg = mc.gaussian_dpg_loss(
            mean, features.repeat(1, copies, 1), state, agent_q, mc.VDNMixer(), torch.ones(B), unit_norm()
        )
        act_mask = torch.ones(copies * N, A)
        logprobs = mc.gaussian_log_prob_entropy(mean, log_std, actions.repeat(1, copies, 1), act_mask)[0]
        repeat = [x.repeat(1, copies) for x in (old_logprobs, advantages)]
        pg = mc.ppo_loss(logprobs, *repeat, torch.ones(B, copies * N), 0.2)[0]
        return [torch.autograd.grad(loss, shared)[0] for loss in (dpg, pg)]

    for one, two in zip(gradients(1), gradients(2), strict=True):
        assert one.abs().sum() > 0
        torch.testing.assert_close(one, two)


# ---------------------------------------------------------------------------------------------------------------------
# Returns: a time-limit end bootstraps from the final observation, a termination does not
# ---------------------------------------------------------------------------------------------------------------------
def test_truncation_bootstraps_termination_does_not():
    # Two envs, two steps, both episodes end at t = 1 (masks[2] = 0): env 0 by the time limit with V(o_final) = 10 and
    # Qhat'(s_final, mu(o_final)) = 20, env 1 by termination (no bootstrap). gamma = lambda = 0.5, V = 0, r = 1.
    rewards, masks = torch.ones(2, 2), torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    values = torch.zeros(3, 2, 1)
    time_limits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    final_values = torch.tensor([[[0.0], [0.0]], [[10.0], [3.0]]])  # [T, E, N]: env 1's V(o_final) must not count
    advantages = mc.time_limit_gae(rewards, values, masks, final_values, time_limits, 0.5, 0.5)[..., 0]
    #   env 0: A_1 = 1 + 0.5 * 10 = 6, A_0 = 1 + 0.5 * 0.5 * 6 = 2.5;   env 1: A_1 = 1, A_0 = 1 + 0.25 * 1 = 1.25
    np.testing.assert_allclose(advantages.numpy(), [[2.5, 1.25], [6.0, 1.0]])
    final_q_tot = torch.tensor([[0.0, 0.0], [20.0, 7.0]])
    q_tot_target = torch.full((3, 2), 4.0)
    q_rewards = mc.time_limit_rewards(rewards, final_q_tot, time_limits, 0.5)
    targets = mc.td_lambda_targets(q_rewards, q_tot_target, masks, 0.5, 0.5)
    #   env 0: G_1 = 1 + 0.5 * 20 = 11, G_0 = 1 + 0.5 * (0.5 * 11 + 0.5 * 4) = 4.75;   env 1: G_1 = 1, G_0 = 2.25
    np.testing.assert_allclose(targets.numpy(), [[4.75, 2.25], [11.0, 1.0]])


def test_time_limit_bootstraps_only_the_envs_that_hit_it():
    # The rollout fills final_* for every env at a step where any env hit the time limit. Env 0 hits it at
    # t = 0 while env 1 falls (terminates) at that step and hits it at t = 2; env 2 runs on. Only (t=0, env 0) and
    # (t=2, env 1) bootstrap: the old r + gamma * final_q_tot added the filler to all three envs at t = 0 and t = 2.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # [T, E]
    time_limits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    masks = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # [T+1, E]
    final_q_tot = torch.tensor([[10.0, 20.0, 30.0], [0.0, 0.0, 0.0], [40.0, 50.0, 60.0]])
    q_rewards = mc.time_limit_rewards(rewards, final_q_tot, time_limits, 0.5)
    np.testing.assert_array_equal(q_rewards.numpy(), [[6.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 33.0, 9.0]])
    # V's bootstrap [T, E, N] the same way, per agent: the filler never reaches the advantages
    final_values = torch.stack([final_q_tot, -final_q_tot], -1)
    np.testing.assert_array_equal(
        mc.time_limit_rewards(rewards, final_values, time_limits, 0.5)[..., 1].numpy(),
        [[-4.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, -17.0, 9.0]],
    )
    values = torch.randn(4, 3, 2)
    advantages = mc.time_limit_gae(rewards, values, masks, final_values, time_limits, 0.5, 0.5)
    torch.testing.assert_close(
        advantages, mc.time_limit_gae(rewards, values, masks, final_values * time_limits[..., None], time_limits, 0.5, 0.5)
    )


def test_time_limit_gae_without_time_limits_is_the_shared_gae():
    torch.manual_seed(0)
    T, E, N = 11, 3, 2
    rewards, values = torch.randn(T, E), torch.randn(T + 1, E, N)
    masks = (torch.rand(T + 1, E) > 0.2).float()
    got = mc.time_limit_gae(rewards, values, masks, torch.randn(T, E, N), torch.zeros(T, E), 0.99, 0.95)
    torch.testing.assert_close(got, mc.gae(rewards, values, masks, 0.99, 0.95))


# ---------------------------------------------------------------------------------------------------------------------
# nu = 0 is MAPPO; bad input; the NaN stop
# ---------------------------------------------------------------------------------------------------------------------
def two_updates(flags, cwd, monkeypatch):
    """Runs 2 updates of TINY in this process (see main) -> the state dicts of the run's networks."""
    os.makedirs(cwd)
    run_globals = main([*flags, "--eval-interval", "0", *TINY, "--total-timesteps", "128"], cwd, monkeypatch)
    return {net: run_globals["stateful"][net].state_dict() for net in ("actor", "critic", "agent_q")}


def test_nu_zero_is_mappo(tmp_path, monkeypatch):
    """nu = 0: actor and V do not depend on the flags that still act there, the Q branch's (mixer, TD(lambda), target
    rate: Q_tot learns differently) and --log-grad-var; nu > 0 (the control): they do."""
    q_flags = ["--mixer", "vdn", "--td-lambda", "0.3", "--target-tau", "0.5"]
    params = {
        name: two_updates(flags, tmp_path / name, monkeypatch)
        for name, flags in {
            "qmix": ["--nu", "0"],
            "vdn": ["--nu", "0", *q_flags, "--log-grad-var"],
            "qmix_nu": ["--nu", "0.5"],
            "vdn_nu": ["--nu", "0.5", *q_flags],
        }.items()
    }
    for net in ("actor", "critic"):
        for key, value in params["qmix"][net].items():
            assert torch.equal(value, params["vdn"][net][key]), f"nu = 0: {net}.{key} depends on the Q branch"
    assert not torch.equal(params["qmix"]["agent_q"]["head.0.weight"], params["vdn"]["agent_q"]["head.0.weight"])
    assert not torch.equal(params["qmix_nu"]["actor"]["head.weight"], params["vdn_nu"]["actor"]["head.weight"])


def test_dpg_only_flags_change_a_run_at_nu_above_zero(tmp_path, monkeypatch):
    """--dpg-scale and --nu-warmup act only through L_dpg, which nu = 0 skips, so the test above cannot see them: at
    nu = 0.5 each must change the actor (--dpg-scale advantage divides L_dpg by the advantages' std; --nu-warmup 100
    runs update 1 at nu = 0 and update 2 at nu = 0.5 * 64 / 100 instead of 0.5)."""
    base = ["--nu", "0.5", "--nu-warmup", "0"]
    params = {
        name: two_updates(flags, tmp_path / name, monkeypatch)["actor"]
        for name, flags in {
            "base": base,
            "dpg_scale": [*base, "--dpg-scale", "advantage"],
            "nu_warmup": ["--nu", "0.5", "--nu-warmup", "100"],
        }.items()
    }
    for name in ("dpg_scale", "nu_warmup"):
        assert not torch.equal(params[name]["head.weight"], params["base"]["head.weight"]), f"--{name} changed nothing"


def test_log_std_init_sets_the_policy_std_it_starts_from():
    actor = mc.Actor(5, 3, 16, True, log_std_init=-1.0)
    assert torch.equal(actor.log_std.detach(), torch.full((3,), -1.0))
    assert torch.equal(mc.Actor(5, 3, 16, True).log_std.detach(), torch.zeros(3))  # MAPPO's std 1


def test_log_grad_var_leaves_training_as_it_was(tmp_path, monkeypatch):
    """--log-grad-var is a diagnostic: its 8 extra actor-loss passes (nu > 0, so L_dpg is in them) must not change
    training's random numbers or weights. mu is the Gaussian mean, so they draw nothing."""
    flags = ["--nu", "0.5", "--nu-warmup", "0"]
    with_flag = two_updates([*flags, "--log-grad-var"], tmp_path / "with", monkeypatch)
    without = two_updates(flags, tmp_path / "without", monkeypatch)
    for net, params in without.items():
        for key, value in params.items():
            assert torch.equal(value, with_flag[net][key]), f"--log-grad-var changed {net}.{key}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env", "Swimmer"], "--env must be one of HalfCheetah, Ant, Walker2d, Hopper, Humanoid"),
        (["--env", "Hopper", "--agent-conf", "2x3"], "--agent-conf of Hopper must be one of 3x1"),
        (["--nu", "1.5"], "--nu must be in [0, 1]"),
        (["--log-std-init", "nan"], "--log-std-init must be in [-5, 2]"),
        (["--mixer", "qtran"], "--mixer must be qmix or vdn"),
        (["--dpg-scale", "td"], "--dpg-scale must be raw or advantage"),
        (["--nu-warmup=-1"], "--nu-warmup must be >= 0 env steps"),
        (["--max-episode-steps", "0"], "--max-episode-steps must be >= 1"),
        (["--total-timesteps", "100"], "--total-timesteps (100) is smaller than one rollout"),
        (["--num-minibatches", "801"], "--num-minibatches must be in [1, 800]"),
        (["--eval-only", "no/such/model.pt"], "--eval-only: no such file"),
    ],
)
def test_bad_input_is_one_line(flags, message, capsys):
    args = mc.tyro.cli(mc.Args, args=flags)
    with pytest.raises(SystemExit) as exit_info:
        mc.check_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_input_and_nan_stop_from_the_command_line(tmp_path):
    result = run(["--agent-conf", "7x1"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "maipg_continuous.py: error: --agent-conf of HalfCheetah must be one of 2x3, 6x1, got '7x1'"
    ]
    result = run(["--learning-rate", "1e30", *TINY, "--update-epochs", "2"], tmp_path, check=False)
    assert result.returncode != 0
    assert "update 1: losses/" in result.stderr and "Traceback" not in result.stderr
    # no loss follows an update's last minibatch: parameters it breaks are caught by the next rollout's actions check
    flags = [*TINY, "--total-timesteps", "128", "--update-epochs", "1", "--num-minibatches", "1"]
    result = run(["--learning-rate", "1e30", *flags], tmp_path, check=False)
    assert result.returncode != 0
    assert "update 2: the actor's actions are not finite" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, --resume and preemption
# ---------------------------------------------------------------------------------------------------------------------
def main(args, cwd, monkeypatch):
    """Runs the script as `python maipg_continuous.py ARGS` in this process (no second import of torch and MuJoCo)
    -> its globals, where the state the run ended with can be read. The signal handlers it installs are undone."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    try:
        return runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)


def assert_same(got, expected, where):
    """Equal value for value, tensors and arrays exactly, through dicts, lists and tuples (state dicts, RNG states)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for i, (got_item, expected_item) in enumerate(zip(got, expected, strict=True)):
            assert_same(got_item, expected_item, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor | np.ndarray):
        assert type(got) is type(expected) and np.array_equal(np.asarray(got), np.asarray(expected)), where
    else:
        assert got == expected, where


def logged_steps(cwd):
    """{tag: the steps it was logged at}, as TensorBoard reads them (a resumed run's purge applied)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [scalar.step for scalar in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_resume_restores_the_training_state_and_logs_on(tmp_path, monkeypatch, capsys):
    """A run of 3 updates with a checkpoint after update 2. Resumed with no update left, the process holds the
    checkpoint's networks, target copies, optimisers, ValueNorm and generators, tensor for tensor, and --save-model
    writes them; resumed with 2 updates left, it says that the episodes start afresh, runs updates 3 and 4 only, and
    TensorBoard shows each step once (the first run's update 3 purged)."""
    main([*TINY, "--total-timesteps", "192", "--checkpoint-interval", "2", "--save-model"], tmp_path, monkeypatch)
    (path,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["script"] == "maipg_continuous.py" and (checkpoint["update"], checkpoint["global_step"]) == (2, 128)
    assert checkpoint["value_norm"]["debiasing_term"] > 0  # V's (and Q_tot's) statistics travel with the run
    os.remove(saved_model(tmp_path))  # the resumed run must write its own
    capsys.readouterr()
    resumed = main(["--resume", path, "--total-timesteps", "128"], tmp_path, monkeypatch)
    assert "update " not in capsys.readouterr().out
    assert resumed["global_step"] == 128
    for name, module in resumed["stateful"].items():
        assert_same(module.state_dict(), checkpoint[name], name)
    assert_same(resumed["rng_states"]({"diagnostics": resumed["diagnostics_rng"]}), checkpoint["rng"], "rng")
    model = torch.load(saved_model(tmp_path), weights_only=True)
    for part in mc.MODEL_PARTS:
        assert_same(model[part], checkpoint[part], part)

    main(["--resume", os.path.dirname(path), "--total-timesteps", "256"], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "--resume: Multi-Agent MuJoCo's envs cannot be saved, so their episodes start afresh" in out
    assert "update 3/4" in out and "update 4/4" in out and "update 2/" not in out and "done: 256 env steps" in out
    logged = logged_steps(tmp_path)
    assert logged.pop("eval/episodic_return") == [256]  # the first run's evaluation at its last update, 192, is purged
    assert logged and all(steps == [64, 128, 192, 256] for steps in logged.values()), logged


def test_bare_resume_keeps_every_flag_of_the_run(tmp_path, monkeypatch, capsys):
    """A bare --resume RUN continues the run as it was: a flag not given keeps the run's value, RESUME_FLAGS included
    (--total-timesteps, --eval-interval, --checkpoint-interval and --torch-threads here, none at its default; --track
    needs wandb and --cuda a GPU). A finished run resumed so has nothing left to do."""
    flags = ["--total-timesteps", "128", "--eval-interval", "1", "--checkpoint-interval", "1", "--torch-threads", "2"]
    main([*TINY, *flags], tmp_path, monkeypatch)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--resume", run_dir])  # what resume_args reads the given flags from
    args = mc.resume_args(mc.tyro.cli(mc.Args, args=["--resume", run_dir]), checkpoint)
    assert {name: getattr(args, name) for name in mc.RESUME_FLAGS} == {
        name: checkpoint["args"][name] for name in mc.RESUME_FLAGS
    }
    capsys.readouterr()
    resumed = main(["--resume", run_dir], tmp_path, monkeypatch)
    assert "update " not in capsys.readouterr().out
    assert asdict(resumed["args"]) == {**checkpoint["args"], "resume": os.path.join(run_dir, "checkpoint.pt")}


def test_save_model_may_be_given_on_resume(tmp_path, monkeypatch):
    """--save-model is an output, not a setting of the run: a run started without it, resumed with it, writes the model."""
    main([*TINY, "--checkpoint-interval", "1"], tmp_path, monkeypatch)
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    assert not os.path.exists(os.path.join(run_dir, "maipg_continuous.pt"))
    main(["--resume", run_dir, "--save-model"], tmp_path, monkeypatch)
    assert torch.load(saved_model(tmp_path), weights_only=True)["args"]["save_model"] is True


def test_resumed_envs_draw_new_seeds():
    """Resumed envs cannot continue their episodes; with the same seeds they would replay the run's first ones."""
    seeds = mc.env_seeds(1, "train", 8)
    assert mc.resumed_seeds(seeds, None) == seeds
    after_2, after_3 = set(mc.resumed_seeds(seeds, 2)), set(mc.resumed_seeds(seeds, 3))
    assert len(after_2) == 8 and not after_2 & set(seeds) and not after_2 & after_3
    assert mc.resumed_seeds(seeds, 2) == mc.resumed_seeds(seeds, 2)  # resuming one checkpoint twice: the same run


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, monkeypatch, capsys):
    flags = [*TINY, "--eval-interval", "0", "--checkpoint-interval", "0", "--save-model"]
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *flags, "--total-timesteps", "64000"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    first_line = process.stdout.readline()  # printed after update 1: the loop is running
    assert first_line.startswith("update 1/1000"), first_line + process.stderr.read()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    (path,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    assert f"continue with --resume {os.path.relpath(path, tmp_path)}" in stdout and "SIGTERM: stopped after update" in stdout
    assert "done:" not in stdout and not glob.glob(os.path.join(tmp_path, "runs", "*", "*.pt.tmp"))
    assert not glob.glob(os.path.join(tmp_path, "runs", "*", "maipg_continuous.pt"))  # not complete: no model
    stopped_at = torch.load(path, weights_only=False)["update"]
    main(["--resume", path, "--total-timesteps", str(64 * (stopped_at + 1))], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert f"update {stopped_at + 1}/{stopped_at + 1}" in out and "done:" in out and "model saved" in out


def test_bad_resume_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    main([*TINY, "--checkpoint-interval", "1"], tmp_path, monkeypatch)
    (path,) = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint.pt"))
    with open(path, "rb") as f:
        (tmp_path / "truncated.pt").write_bytes(f.read()[:1000])
    torch.save({"script": "maipg_mpe.py", "args": {}}, tmp_path / "foreign.pt")
    stale = torch.load(path, weights_only=False)  # as an older version of the script wrote it
    stale["args"] = {**{name: value for name, value in stale["args"].items() if name != "mixer"}, "gone": 1}
    torch.save(stale, tmp_path / "stale.pt")
    capsys.readouterr()
    for flags, message in [
        (["--resume", "no/such/run"], "--resume: no such checkpoint 'no/such/run'"),
        (["--resume", "truncated.pt"], "--resume: 'truncated.pt' is not a readable checkpoint, perhaps truncated"),
        (["--resume", "foreign.pt"], "--resume: 'foreign.pt' is not a checkpoint of maipg_continuous.py"),
        (
            ["--resume", "stale.pt"],
            "--resume: 'stale.pt' was written by another version of maipg_continuous.py (flags that differ: gone, mixer)",
        ),
        (["--resume", path, "--env", "Hopper"], "--env cannot change on --resume (the run has 'HalfCheetah')"),
        (["--resume", path, "--agent-conf=6x1"], "--agent-conf cannot change on --resume (the run has '2x3')"),
        (["--resume", path, "--no-recurrent"], "--recurrent cannot change on --resume (the run has True)"),
    ]:
        before = sorted(glob.glob(os.path.join(tmp_path, "**"), recursive=True))
        with pytest.raises(SystemExit) as exit_info:
            main(flags, tmp_path, monkeypatch)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and f"maipg_continuous.py: error: {message}" in err, err
        assert sorted(glob.glob(os.path.join(tmp_path, "**"), recursive=True)) == before  # nothing written
