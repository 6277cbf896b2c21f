"""benchmarks/rvar_ceiling.py: the finite-M-corrected between-action variance and the ceiling formula on a toy whose
answer is known in closed form (A = mu_s + c(a) + noise), that the uncorrected estimate fails the same check, that the
bootstrap error matches the spread over independent repetitions, the per-agent summaries with dead agents left out,
and, on MPE's NumPy port, that a cloned state's continuation gives the script's own GAE of the uninterrupted episode."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import rvar_ceiling  # noqa: E402

P = np.array([0.1, 0.2, 0.3, 0.4])  # pi(a | s), the same in every state
C = np.array([3.0, -1.0, 0.5, 0.0])  # E[A | s, a] - mu_s
BETWEEN = P @ C**2 - (P @ C) ** 2  # Var_{a~pi} E[A | s, a] = 1.1125
MU_STD, NOISE_STD = 1.5, 2.0  # the states' spread of E[A | s] and the continuations' noise


def toy(rng, S, K, M, agents=None):
    """Samples [S, K, M] (or [S, agents, K, M]) of A = mu_s + c(a^k) + noise, a^k ~ pi; -> (samples, true ceiling)."""
    shape = (S,) if agents is None else (S, agents)
    mu = rng.normal(0.0, MU_STD, size=shape)
    actions = rng.choice(len(P), size=(*shape, K), p=P)
    samples = mu[..., None, None] + C[actions][..., None] + NOISE_STD * rng.normal(size=(*shape, K, M))
    return samples, 1.0 - BETWEEN / (MU_STD**2 + BETWEEN + NOISE_STD**2)


def summary(samples, between):
    """One agent: state_summaries of [S, K, M] samples and [S] between-action variances."""
    return rvar_ceiling.state_summaries(samples[:, None], np.ones((len(samples), 1)), between[:, None])


def test_corrected_between_variance_is_unbiased_and_the_uncorrected_is_not():
    rng = np.random.default_rng(0)
    K, M = 8, 4
    samples, _ = toy(rng, 20_000, K, M)
    corrected, naive, within = rvar_ceiling.between_action_variance(samples)
    se = corrected.std() / np.sqrt(len(corrected))
    assert abs(corrected.mean() - BETWEEN) < 4 * se
    assert abs(within.mean() - NOISE_STD**2) < 0.05
    assert naive.mean() - BETWEEN == pytest.approx(NOISE_STD**2 / M, abs=4 * se)  # the bias the correction removes
    assert abs(naive.mean() - BETWEEN) > 20 * se  # so a check at this tolerance catches an estimator without it


def test_ceiling_matches_the_closed_form_and_fails_without_the_correction():
    rng = np.random.default_rng(1)
    samples, truth = toy(rng, 4000, 8, 4)
    corrected, naive, _ = rvar_ceiling.between_action_variance(samples)
    clusters = np.arange(len(samples))
    result = rvar_ceiling.bootstrap_ceiling(summary(samples, corrected), clusters, rng, 500)
    assert abs(result["value"] - truth) < 4 * result["se"]
    assert result["ci95"][0] < truth < result["ci95"][1]
    assert 0.001 < result["se"] < 0.01
    uncorrected = rvar_ceiling.ceiling(**summary(samples, naive))
    assert abs(uncorrected - truth) > 10 * result["se"]  # 1 - (B + sigma^2 / M) / Var(A): 0.71 where the truth is 0.85
    # and where the action changes nothing, no Q can help: the ceiling is 1
    noise_only = rng.normal(0.0, MU_STD, size=(4000, 1, 1)) + NOISE_STD * rng.normal(size=samples.shape)
    between = rvar_ceiling.between_action_variance(noise_only)[0]
    null = rvar_ceiling.bootstrap_ceiling(summary(noise_only, between), clusters, rng, 500)
    assert abs(null["value"] - 1.0) < 4 * null["se"]


def test_bootstrap_error_matches_the_spread_over_repetitions():
    rng = np.random.default_rng(2)
    values, errors = [], []
    for _ in range(30):
        samples, _ = toy(rng, 300, 8, 4)
        corrected = rvar_ceiling.between_action_variance(samples)[0]
        result = rvar_ceiling.bootstrap_ceiling(summary(samples, corrected), np.arange(300), rng, 300)
        values.append(result["value"])
        errors.append(result["se"])
    assert np.std(values, ddof=1) == pytest.approx(np.mean(errors), rel=0.35)


def test_summarize_joint_own_and_dead_agents():
    """Two agents: agent 0's A responds to its action (the toy's c), agent 1's A to nothing; agent 1 is dead in half
    the states, where its samples are garbage that must not count."""
    rng = np.random.default_rng(3)
    S, K, M = 3000, 8, 4
    a0, _ = toy(rng, S, K, M)
    a1 = rng.normal(0.0, MU_STD, size=(S, 1, 1)) + NOISE_STD * rng.normal(size=(S, K, M))
    alive = np.ones((S, 2))
    alive[::2, 1] = 0.0
    a1[::2] = 1e6  # a dead agent's entries
    a_joint = np.stack([a0, a1], axis=1)  # [S, N, K, M]
    result = rvar_ceiling.summarize(a_joint, a_joint.copy(), alive, np.arange(S), rng, 300)
    var_a = MU_STD**2 + NOISE_STD**2 + BETWEEN * 2 / 3  # pooled: 2/3 of the alive entries are agent 0's
    assert result["var_A"] == pytest.approx(var_a, rel=0.03)
    joint = result["joint"]
    assert abs(joint["value"] - (1 - (2 / 3) * BETWEEN / var_a)) < 4 * joint["se"]
    own_0 = result["per_agent"][0]["own"]
    assert abs(own_0["value"] - (1 - BETWEEN / (MU_STD**2 + NOISE_STD**2 + BETWEEN))) < 4 * own_0["se"]
    own_1 = result["per_agent"][1]["own"]
    assert abs(own_1["value"] - 1.0) < 4 * own_1["se"]


def test_mpe_continuation_of_a_cloned_state_is_the_episodes_gae():
    """A policy that always pushes right (logit +50) makes everything deterministic: every copy of a visited state,
    continued to the episode's end, must give the GAE that the script's `gae` computes on the uninterrupted episode,
    which needs the env state, both GRU states and the value normalisation carried over correctly."""
    import maipg_mpe

    torch.manual_seed(0)
    saved_args = {"task": "spread", "num_agents": 3}
    setting = rvar_ceiling.MpeSetting(maipg_mpe, saved_args)
    N, H = 3, 16
    actor = maipg_mpe.Actor(setting.obs_dim + N, setting.n_actions, H, True)
    critic = maipg_mpe.Critic(setting.critic_dim, H, True)
    with torch.no_grad():
        actor.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))
    value_norm = maipg_mpe.ValueNorm()
    value_norm.update(torch.tensor([-20.0, -5.0]))  # not the identity, so that denormalisation matters
    S = 25
    states = rvar_ceiling.collect(setting, actor, critic, H, S, 0, 25, seed=7)
    # the reference: the same episodes (same seeds, deterministic policy), uninterrupted, through the script's gae
    envs = setting.make(S, 7)
    o = setting.reset(envs)
    h_a, h_c, ones = torch.zeros(S, N, H), torch.zeros(S, N, H), torch.ones(1, S, N)
    rewards, values = [], []
    with torch.no_grad():
        for _ in range(25):
            logits, h_a = actor(maipg_mpe.actor_input(o["obs"])[None], h_a, ones, o["avail"][None])
            value, h_c = critic(setting.critic_input(o)[None], h_c, ones)
            values.append(value_norm.denormalize(value[0]))
            o, reward, _ = setting.step(envs, logits[0].argmax(-1))
            rewards.append(reward.float())
    masks = torch.ones(26, S)
    masks[25] = 0.0
    reference = maipg_mpe.gae(torch.stack(rewards), torch.stack([*values, torch.zeros(S, N)]), masks, 0.99, 0.95)
    which = np.repeat(np.arange(S), 2)
    first = torch.full((2 * S, N), -1, dtype=torch.long)
    advantages, steps = rvar_ceiling.continuation_advantages(
        setting, actor, critic, value_norm, states, which, first, 0.99, 0.95, seed=8
    )
    assert steps == 25  # the state at episode time 0 runs the whole episode
    expected = reference[states["t"], states["e"]]  # [S, N]
    torch.testing.assert_close(advantages[0::2], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(advantages[1::2], expected, rtol=1e-4, atol=1e-4)
    # and it can fail: the same continuation from zeroed GRU states gives other advantages
    zeroed = {**states, "h_actor": torch.zeros_like(states["h_actor"]), "h_critic": torch.zeros_like(states["h_critic"])}
    other, _ = rvar_ceiling.continuation_advantages(setting, actor, critic, value_norm, zeroed, which, first, 0.99, 0.95, 8)
    assert (other[0::2] - expected)[states["t"] > 0].abs().max() > 1e-2
