"""The numeric pieces every script repeats (CleanRL's single-file way), checked in EVERY maipg_*.py against one
reference written here: GAE, gated TD(lambda), ValueNorm, the mixers, the losses, Gumbel straight-through, the GRU
trunk's resets and the diagnostics. A second test asserts that each piece's source is identical in every script, so
a fix made in one script and forgotten in another fails here."""

import glob
import importlib
import inspect
import os
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "maipg_*.py")))
# Pieces that must be byte-identical in every script. The discrete-action ones (Gumbel, the one-hot dpg loss) are
# checked in the scripts that define them: the continuous script's mu is the Gaussian mean.
SHARED = [
    "layer_init",
    "Trunk",
    "QMixer",
    "VDNMixer",
    "ValueNorm",
    "weighted_mean",
    "weighted_var",
    "gae",
    "td_lambda_targets",
    "ppo_loss",
    "value_loss",
    "soft_update",
    "rvar",
    "grad_variance",
    "env_seeds",
    "resumed_seeds",
    "fail",
    "load_checkpoint",
    "resume_args",
    "rng_states",
    "set_rng_states",
    "save_atomically",
    "Preemption",
    "q_loss",
    "make_writer",
    "stop_if_not_finite",
    "normalize_advantages",
    "nu_at",
    "grad_norm_ratio",
]
DISCRETE = ["gumbel_straight_through", "dpg_loss", "actor_loss", "rollout_diagnostics"]
# the continuous script has a function of the same name with Gaussian arguments: these are compared among the others
DISCRETE_ONLY = ["actor_grad_variance"]
DISCRETE_SCRIPTS = [name for name in SCRIPTS if name != "maipg_continuous"]
# a ValueNorm at mean 0, std 1
IDENTITY_NORM = types.SimpleNamespace(
    normalize=lambda x: x, denormalize=lambda x: x, mean_var=lambda: (torch.zeros(()), torch.ones(()))
)


@pytest.fixture(params=SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


def test_every_script_is_found():
    assert SCRIPTS == ["maipg_continuous", "maipg_grf", "maipg_mpe", "maipg_smac"]


def test_env_seeds_share_nothing_across_seeds_and_streams(script):
    """With seed + i, --seed 1 and --seed 2 shared 127 of 128 env streams."""
    train_1, train_2 = set(script.env_seeds(1, "train", 128)), set(script.env_seeds(2, "train", 128))
    eval_1, video_1 = set(script.env_seeds(1, "eval", 128)), set(script.env_seeds(1, "video", 128))
    assert len(train_1) == 128 and not train_1 & train_2 and not train_1 & eval_1 and not eval_1 & video_1
    assert script.env_seeds(1, "train", 4) == script.env_seeds(1, "train", 128)[:4]  # env i's seed ignores num_envs


@pytest.mark.parametrize("name", SHARED + DISCRETE)
def test_shared_source_is_identical_in_every_script(name):
    reference = inspect.getsource(getattr(importlib.import_module("maipg_mpe"), name))
    for script_name in SCRIPTS:
        module = importlib.import_module(script_name)
        if name in DISCRETE and not hasattr(module, name):
            continue
        assert inspect.getsource(getattr(module, name)) == reference, f"{script_name}.{name} differs from maipg_mpe.{name}"


@pytest.mark.parametrize("name", DISCRETE_ONLY)
def test_discrete_source_is_identical_in_every_discrete_script(name):
    reference = inspect.getsource(getattr(importlib.import_module("maipg_mpe"), name))
    for script_name in DISCRETE_SCRIPTS:
        source = inspect.getsource(getattr(importlib.import_module(script_name), name))
        assert source == reference, f"{script_name}.{name} differs from maipg_mpe.{name}"


# ---------------------------------------------------------------------------------------------------------------------
# GAE and TD(lambda)
# ---------------------------------------------------------------------------------------------------------------------
def reference_gae(rewards, values, masks, gamma, lam):
    """Plain loops over envs, agents and time (MAPPO's compute_returns with ValueNorm off)."""
    T, E = rewards.shape
    N = values.shape[2]
    adv = np.zeros((T, E, N))
    for e in range(E):
        for i in range(N):
            running = 0.0
            for t in reversed(range(T)):
                delta = rewards[t, e] + gamma * values[t + 1, e, i] * masks[t + 1, e] - values[t, e, i]
                running = delta + gamma * lam * masks[t + 1, e] * running
                adv[t, e, i] = running
    return adv


def test_gae_matches_a_plain_loop(script):
    rng = np.random.default_rng(0)
    T, E, N = 13, 3, 4
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T + 1, E, N))
    masks = (rng.random((T + 1, E)) > 0.2).astype(float)
    got = script.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(masks), 0.99, 0.95)
    np.testing.assert_allclose(got.numpy(), reference_gae(rewards, values, masks, 0.99, 0.95), rtol=1e-10, atol=1e-10)


def test_gae_does_not_bootstrap_across_an_episode_end(script):
    rewards = torch.tensor([[1.0], [1.0]])
    values = torch.tensor([[[0.0]], [[0.0]], [[100.0]]])
    masks = torch.tensor([[1.0], [1.0], [0.0]])  # the episode ended at t = 1
    got = script.gae(rewards, values, masks, 0.5, 1.0)
    np.testing.assert_allclose(got[:, 0, 0].numpy(), [1.5, 1.0])


def test_td_lambda_with_an_episode_restarting_mid_segment(script):
    # Worked by hand with gamma = lambda = 0.5; masks[2] = 0: the episode ended at t = 1 and a new one starts at t = 2.
    #   G_4 = Qhat_4 = 50
    #   G_3 = 4 + 0.5 * (0.5 * 50 + 0.5 * 50) = 29
    #   G_2 = 3 + 0.5 * (0.5 * 29 + 0.5 * 40) = 20.25
    #   G_1 = 2 + 0.5 * 0 * (...) = 2                     (no bootstrap across the restart)
    #   G_0 = 1 + 0.5 * (0.5 * 2 + 0.5 * 20) = 6.5
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    q_tot_target = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])[:, None]
    masks = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])[:, None]
    got = script.td_lambda_targets(rewards, q_tot_target, masks, 0.5, 0.5)
    np.testing.assert_allclose(got[:, 0].numpy(), [6.5, 2.0, 20.25, 29.0])


def test_td_lambda_limits(script):
    rng = np.random.default_rng(1)
    T, E = 9, 2
    rewards, q = torch.tensor(rng.normal(size=(T, E))), torch.tensor(rng.normal(size=(T + 1, E)))
    masks = torch.tensor((rng.random((T + 1, E)) > 0.3).astype(float))
    one_step = script.td_lambda_targets(rewards, q, masks, 0.9, 0.0)  # lambda = 0: r + gamma * m * Qhat'
    np.testing.assert_allclose(one_step.numpy(), (rewards + 0.9 * masks[1:] * q[1:]).numpy(), rtol=1e-12)
    monte_carlo = script.td_lambda_targets(rewards, q, masks, 0.9, 1.0)  # lambda = 1: discounted sum + final bootstrap
    expected = np.zeros((T, E))
    for e in range(E):
        g = q[T, e].item()
        for t in reversed(range(T)):
            g = rewards[t, e].item() + 0.9 * masks[t + 1, e].item() * g
            expected[t, e] = g
    np.testing.assert_allclose(monte_carlo.numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# ValueNorm
# ---------------------------------------------------------------------------------------------------------------------
def test_value_norm_round_trip_and_debiasing(script):
    norm = script.ValueNorm()
    x = torch.tensor([3.0, 5.0, 7.0, 13.0])
    norm.update(x)
    mean, var = norm.mean_var()
    # after one update the debiased statistics are exactly the batch's, although the raw EMA holds (1 - beta) of them
    np.testing.assert_allclose(mean.item(), x.mean().item(), rtol=1e-5)
    np.testing.assert_allclose(var.item(), x.var(unbiased=False).item(), rtol=1e-4)
    assert norm.running_mean.item() < 1e-3 * x.mean().item()
    y = torch.randn(50) * 4 + 2
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y)
    norm.update(torch.full((4,), 100.0))  # the second batch weighs as much as the first (beta ~ 1)
    np.testing.assert_allclose(norm.mean_var()[0].item(), (x.mean().item() + 100.0) / 2, rtol=1e-4)


def test_value_norm_variance_floor(script):
    norm = script.ValueNorm()
    norm.update(torch.full((8,), 2.0))
    assert norm.mean_var()[1].item() == pytest.approx(1e-2)  # MAPPO clamps the variance at 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------------------------------
def test_qmix_is_monotonic_in_every_agent_q(script):
    torch.manual_seed(0)
    mixer = script.QMixer(4, 12)
    for param in mixer.parameters():  # random, large weights of both signs: monotonicity must not depend on init
        torch.nn.init.normal_(param, std=2.0)
    agent_qs = torch.randn(256, 4, requires_grad=True)
    state = torch.randn(256, 12)
    (grad,) = torch.autograd.grad(mixer(agent_qs, state).sum(), agent_qs)
    assert (grad >= 0).all()
    assert (grad > 0).any()


def test_qmix_shapes_and_state_dependence(script):
    torch.manual_seed(0)
    mixer = script.QMixer(3, 6)
    agent_qs, state = torch.randn(5, 7, 3), torch.randn(5, 7, 6)
    assert mixer(agent_qs, state).shape == (5, 7)
    assert not torch.allclose(mixer(agent_qs, state), mixer(agent_qs, state + 1.0))


def test_vdn_is_the_sum(script):
    agent_qs = torch.randn(5, 7, 3)
    torch.testing.assert_close(script.VDNMixer()(agent_qs, torch.randn(5, 7, 2)), agent_qs.sum(-1))


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def test_ppo_loss_matches_the_formula(script):
    torch.manual_seed(0)
    logp, old_logp, adv = torch.randn(40), torch.randn(40) * 0.1, torch.randn(40)
    weights = (torch.rand(40) > 0.3).float()
    loss, approx_kl, clipfrac = script.ppo_loss(logp, old_logp, adv, weights, 0.2)
    ratio = (logp - old_logp).exp()
    expected = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)[weights > 0].mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(clipfrac, ((ratio - 1).abs() > 0.2).float()[weights > 0].mean())
    torch.testing.assert_close(approx_kl, ((ratio - 1) - (logp - old_logp))[weights > 0].mean())


def test_value_loss_matches_mappo(script):
    torch.manual_seed(0)
    values, old_values, targets = torch.randn(30) * 20, torch.randn(30) * 20, torch.randn(30) * 20
    weights = (torch.rand(30) > 0.5).float()  # dead agents and padding carry weight 0
    got = script.value_loss(values, old_values, targets, weights, 0.2, 10.0)

    def huber(e, d=10.0):
        return torch.where(e.abs() <= d, e**2 / 2, d * (e.abs() - d / 2))

    clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    kept = weights.bool()
    expected = torch.max(huber(targets - values), huber(targets - clipped))[kept].mean()
    assert 5 < kept.sum() < 25
    torch.testing.assert_close(got, expected)


def test_weighted_mean_ignores_masked_entries(script):
    x = torch.tensor([1.0, 2.0, 100.0])
    assert script.weighted_mean(x, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(1.5)
    assert script.weighted_mean(x, torch.zeros(3)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics: RVar and the sub-batch gradient variance
# ---------------------------------------------------------------------------------------------------------------------
def test_rvar(script):
    torch.manual_seed(0)
    adv, weights = torch.randn(20_000), torch.ones(20_000)
    assert script.rvar(adv, adv, weights).item() == pytest.approx(0.0, abs=1e-6)  # a perfect control variate
    assert script.rvar(adv, adv * 0.5, weights).item() == pytest.approx(0.25, rel=1e-4)
    noise = torch.randn(20_000) * 0.1  # independent of A: Var(A - C) / Var(A) = 1 + Var(C) / Var(A) ~ 1.01
    assert script.rvar(adv, noise, weights).item() == pytest.approx(1.01, abs=0.01)


def test_grad_variance(script):
    same = torch.randn(1, 50).expand(8, 50)
    assert script.grad_variance(same).item() == pytest.approx(0.0, abs=1e-12)
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert script.grad_variance(two).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The GRU trunk and soft target updates
# ---------------------------------------------------------------------------------------------------------------------
def test_trunk_resets_memory_where_masks_are_zero(script):
    torch.manual_seed(0)
    trunk = script.Trunk(6, 16, recurrent=True)
    x, hidden = torch.randn(10, 3, 6), torch.randn(3, 16)
    masks = torch.ones(10, 3)
    masks[4, 1] = 0.0  # env 1 restarts at step 4
    fused, _ = trunk(x, hidden, torch.ones(10, 3))
    stepped, _ = trunk(x, hidden, masks)
    fresh, _ = trunk(x[4:, 1:2], torch.zeros(1, 16), torch.ones(6, 1))
    torch.testing.assert_close(stepped[4:, 1:2], fresh)  # from the restart on: as if from a zero hidden state
    torch.testing.assert_close(stepped[:, 0], fused[:, 0])  # the step-by-step path equals the fused one elsewhere
    torch.testing.assert_close(stepped[:4], fused[:4])


def test_soft_update(script):
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.1 * source.weight.detach() + 0.9 * target.weight.detach()
    script.soft_update(target, source, 0.1)
    torch.testing.assert_close(target.weight.detach(), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Discrete actions: Gumbel straight-through and the dpg loss
# ---------------------------------------------------------------------------------------------------------------------
DISCRETE_SCRIPTS = [name for name in SCRIPTS if hasattr(importlib.import_module(name), "gumbel_straight_through")]


@pytest.fixture(params=DISCRETE_SCRIPTS)
def discrete_script(request):
    return importlib.import_module(request.param)


def test_gumbel_forward_is_one_hot_on_available_actions(discrete_script):
    torch.manual_seed(0)
    avail = (torch.rand(2000, 7) > 0.5).float()
    avail[:, 3] = 1.0  # at least one available action per row
    logits = torch.randn(2000, 7).masked_fill(avail == 0, -1e10)
    mu = discrete_script.gumbel_straight_through(logits)
    assert ((mu == 0) | (mu == 1)).all() and (mu.sum(-1) == 1).all()
    assert (mu * (1 - avail)).sum() == 0  # never an unavailable action


def test_gumbel_samples_follow_the_softmax(discrete_script):
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).expand(40_000, 4)
    frequencies = discrete_script.gumbel_straight_through(logits).mean(0)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


def test_gumbel_backward_is_the_softmax_gradient(discrete_script):
    logits = torch.randn(6, 5, requires_grad=True)
    weights = torch.randn(5)
    torch.manual_seed(3)
    (grad,) = torch.autograd.grad((discrete_script.gumbel_straight_through(logits) * weights).sum(), logits)
    torch.manual_seed(3)  # the same Gumbel noise, drawn as the function draws it
    gumbels = -torch.empty_like(logits).exponential_().log()
    (expected,) = torch.autograd.grad((torch.softmax(logits + gumbels, -1) * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_rollout_diagnostics_split_the_control_variate_and_score_q_on_a_vdn_toy(discrete_script):
    """With VDN and a deterministic pi (every sample is pi's one action g), C(s, a) = sum_i Q_i(a_i) - Q_i(g_i) and agent
    i's own part C_i = Q_i(a_i) - Q_i(g_i), exactly. Advantages 3 C + 1 give cv_corr 1 and RVar Var(2 C) / Var(3 C) =
    4 / 9; advantages C_i give rvar_own 0; TD(lambda) targets equal to Q_tot explain all its variance, Monte Carlo
    targets Q_tot + d explain 1 - Var(d) / Var(Q_tot + d)."""
    T, E, N, A = 6, 5, 3, 4
    torch.manual_seed(0)
    q_values, actions, greedy = torch.randn(T, E, N, A), torch.randint(0, A, (T, E, N)), torch.randint(0, A, (T, E, N))
    probs, ones = torch.nn.functional.one_hot(greedy, A).float(), torch.ones(T, E, N)
    own = (q_values.gather(-1, actions[..., None]) - q_values.gather(-1, greedy[..., None]))[..., 0]  # C_i [T, E, N]
    control, q_tot = own.sum(-1, keepdim=True).expand(T, E, N), q_values.gather(-1, actions[..., None])[..., 0].sum(-1)
    noise = torch.randn(T, E)
    inputs = (q_values, actions, probs, torch.ones(T, E, N, A), torch.zeros(T, E, 1), discrete_script.VDNMixer())
    rng, targets = torch.Generator().manual_seed(0), (q_tot, q_tot + noise)
    stats = discrete_script.rollout_diagnostics(3 * control + 1, ones, *inputs, IDENTITY_NORM, rng, None, targets)
    torch.testing.assert_close(stats["cv_corr"], torch.tensor(1.0))
    torch.testing.assert_close(stats["rvar"], torch.tensor(4 / 9))
    torch.testing.assert_close(stats["q_explained_variance"], torch.tensor(1.0))
    expected_mc = 1 - noise.var(unbiased=False) / (q_tot + noise).var(unbiased=False)
    torch.testing.assert_close(stats["q_explained_variance_mc"], expected_mc)
    stats = discrete_script.rollout_diagnostics(own, ones, *inputs, IDENTITY_NORM, rng, None, targets)
    torch.testing.assert_close(stats["rvar_own"], torch.tensor(0.0))
    # against A = C_i, the joint C = sum_j C_j adds the other agents' parts: RVar Var(C - C_i) / Var(C_i), near N - 1 here
    torch.testing.assert_close(stats["rvar"], (control - own).var(unbiased=False) / own.var(unbiased=False))


def test_dpg_loss_reaches_only_the_actor():
    mpe = importlib.import_module("maipg_mpe")
    torch.manual_seed(0)
    N, D, S, A, H = 3, 4, 12, 5, 16
    actor = mpe.Actor(D + N, A, H, True)
    critic = mpe.Critic(S + D + N, H, True)
    agent_q = mpe.AgentQ(S + D + N, A, H, True)
    mixer = mpe.QMixer(N, S)
    obs, state = torch.randn(4, 2, N, D), torch.randn(4, 2, S)
    masks, avail = torch.ones(4, 2, N), torch.ones(4, 2, N, A)
    logits, _ = actor(mpe.actor_input(obs), torch.zeros(2, N, H), masks, avail)
    critic_in = mpe.critic_input(obs, state)
    q_values, _ = agent_q(critic_in, torch.zeros(2, N, H), masks)
    values, _ = critic(critic_in, torch.zeros(2, N, H), masks)
    loss = mpe.dpg_loss(
        mpe.gumbel_straight_through(logits), q_values, state, mixer, torch.ones(4, 2), torch.ones(4, 2, N), IDENTITY_NORM
    )
    assert q_values.requires_grad and loss.requires_grad  # Q and the mixer are in the forward graph: the check can fail
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    for module in (agent_q, mixer):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def test_dpg_loss_gradient_on_a_vdn_toy(discrete_script):
    """On VDN, L_dpg = -mean_b sum_i <mu_i, q_i>, and the straight-through gradient with respect to the logits is
    -(1/B) p_i * (q_i - <p_i, q_i>) with p_i the softmax of (logits + Gumbel noise): sign and scale in closed form.
    Rows of weight 0 get no gradient."""
    B, N, A = 6, 3, 4
    logits = torch.randn(B, N, A, requires_grad=True)
    q_values, weights = torch.randn(B, N, A), torch.tensor([1.0, 1, 0, 1, 1, 0])
    torch.manual_seed(5)
    mu = discrete_script.gumbel_straight_through(logits)
    loss = discrete_script.dpg_loss(
        mu, q_values, torch.zeros(B, 1), discrete_script.VDNMixer(), weights, torch.ones(B, N), IDENTITY_NORM
    )
    (grad,) = torch.autograd.grad(loss, logits)
    torch.manual_seed(5)  # the same Gumbel noise, drawn as the function draws it
    probs = torch.softmax(logits.detach() - torch.empty_like(logits).exponential_().log(), -1)
    expected = -probs * (q_values - (probs * q_values).sum(-1, keepdim=True)) * weights[:, None, None] / weights.sum() / N
    torch.testing.assert_close(loss, -((mu * q_values).sum((-1, -2)) * weights).sum() / weights.sum() / N)
    torch.testing.assert_close(grad, expected)


def test_dpg_loss_weighs_agents_as_l_clip_does(discrete_script):
    """Eq. (10) sums both terms over agents, L_clip is a mean over them, so L_dpg is divided by N: duplicating every
    agent (2N agents, same logits and Q-values) leaves the gradient of both terms on the shared actor unchanged (without
    the division, L_dpg's doubled: per agent it weighed N times its share)."""
    B, N, A = 5, 3, 4
    shared = torch.randn(B, N, A, requires_grad=True)  # stands for the shared actor's output
    q_values, state, mixer = torch.randn(B, N, A), torch.zeros(B, 1), discrete_script.VDNMixer()
    advantages, old_logprobs, actions = torch.randn(B, N), torch.randn(B, N) - 1.5, torch.randint(0, A, (B, N))

    def gradients(copies):
        logits = torch.cat([shared] * copies, -2)
        alive = torch.ones(B, N * copies)
        dpg = discrete_script.dpg_loss(
            logits.softmax(-1), q_values.repeat(1, copies, 1), state, mixer, torch.ones(B), alive, IDENTITY_NORM
        )
        logprobs = torch.distributions.Categorical(logits=logits).log_prob(actions.repeat(1, copies))
        pg = discrete_script.ppo_loss(
            logprobs, old_logprobs.repeat(1, copies), advantages.repeat(1, copies), torch.ones(B, N * copies), 0.2
        )[0]
        return [torch.autograd.grad(loss, shared)[0] for loss in (dpg, pg)]

    for one, two in zip(gradients(1), gradients(2), strict=True):
        torch.testing.assert_close(one, two)


def test_dpg_loss_weighs_each_alive_agent_as_l_clip_does(discrete_script):
    """L_clip is a mean over alive agent-steps, so at a step with n alive agents L_dpg divides Q_tot by n: on VDN each
    alive agent's Q-value then enters with weight 1 / n at its step (a mean over steps), and with every agent alive the
    loss is the same number, bit for bit, as with the plain 1 / N."""
    B, N, A = 4, 3, 5
    mu, q_values, state = torch.rand(B, N, A, requires_grad=True), torch.randn(B, N, A), torch.zeros(B, 1)
    alive = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    loss = discrete_script.dpg_loss(mu, q_values, state, discrete_script.VDNMixer(), torch.ones(B), alive, IDENTITY_NORM)
    (grad,) = torch.autograd.grad(loss, mu)
    torch.testing.assert_close(grad, -q_values / alive.sum(-1)[:, None, None] / B)
    ones = torch.ones(B)
    every = discrete_script.dpg_loss(mu, q_values, state, discrete_script.VDNMixer(), ones, torch.ones(B, N), IDENTITY_NORM)
    assert torch.equal(every, -discrete_script.weighted_mean((mu * q_values).sum(-1).sum(-1), ones) / N)


def test_normalize_advantages_and_the_advantage_scale(script):
    raw, weights = torch.randn(7, 3, 2) * 40 + 5, (torch.rand(7, 3, 2) > 0.3).float()
    advantages, std = script.normalize_advantages(raw, weights)
    kept = raw[weights.bool()]
    torch.testing.assert_close(std, kept.std(unbiased=False) + 1e-5)  # --dpg-scale advantage divides L_dpg by this
    torch.testing.assert_close(advantages * std + kept.mean(), raw)


def test_nu_warmup(script):
    assert script.nu_at(0, 0.3, 1000) == 0.0 and script.nu_at(1000, 0.3, 1000) == 0.3
    assert script.nu_at(250, 0.4, 1000) == pytest.approx(0.1) and script.nu_at(5000, 0.3, 1000) == 0.3
    assert script.nu_at(0, 0.3, 0) == 0.3  # no warm-up


def test_q_loss_learns_normalised_targets_and_keeps_the_mixer_unsaturated_on_returns_of_minus_70():
    """Fitted to raw returns of about -70 (MPE spread's), a QMIX mixer over agent utilities from a network saturates:
    dQ_tot/dQ_i collapses and Q_tot stops depending on the actions (L_dpg then does nothing). q_loss fits the same
    targets normalised by ValueNorm's statistics, and the slope stays of order 1. (The mixer, ValueNorm and q_loss are
    byte-identical in every script: one script checks them all.)"""
    mpe = importlib.import_module("maipg_mpe")
    slopes = {}
    for normalised in (False, True):
        torch.manual_seed(0)
        targets, state = -70 + 5 * torch.randn(256), torch.randn(256, 6)
        value_norm = mpe.ValueNorm()
        for _ in range(50):
            value_norm.update(targets)
        mixer = mpe.QMixer(3, 6)
        utilities = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))  # the Q_i
        optimizer = torch.optim.Adam([*mixer.parameters(), *utilities.parameters()], lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            q_tot = mixer(utilities(state), state)
            loss = mpe.q_loss(q_tot, targets, torch.ones(256), value_norm) if normalised else ((q_tot - targets) ** 2).mean()
            loss.backward()
            optimizer.step()
        agent_qs = utilities(state).detach().requires_grad_()
        (slope,) = torch.autograd.grad(mixer(agent_qs, state).sum(), agent_qs)
        slopes[normalised] = slope.median().item()
        if normalised:  # Q_tot learnt the targets in the normaliser's units: denormalised, it is in reward units
            torch.testing.assert_close(value_norm.denormalize(q_tot.detach()).mean(), targets.mean(), atol=0.5, rtol=0)
    assert slopes[False] < 1e-3 and 0.3 < slopes[True] < 30, slopes
    weights = torch.tensor([1.0, 0.0, 1.0])
    q_tot, returns, value_norm = torch.tensor([0.5, 9.0, -1.0]), torch.tensor([3.0, 7.0, -5.0]), mpe.ValueNorm()
    value_norm.update(returns)
    expected = ((q_tot - value_norm.normalize(returns))[[0, 2]] ** 2).mean()
    torch.testing.assert_close(mpe.q_loss(q_tot, returns, weights, value_norm), expected)
