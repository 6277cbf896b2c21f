"""maipg_mpe.NumpyMPE (the batched NumPy port) against maipg_mpe.MPE2Envs (the real mpe2 package).

Exact seed match, no copying of states: env i of both is seeded with seeds[i] (mpe2: `reset(seed=seeds[i])`, then
plain resets; the port: np.random.default_rng(seeds[i]), the generator mpe2 builds, drawn from in mpe2's order).
Both are then driven with the same random actions for more than 3 episodes, across the same-step auto-resets, and
must agree on every observation, reward and done to 1e-6.
"""

import numpy as np
import pytest

import maipg_mpe

NUM_ENVS, NUM_STEPS = 4, 3 * maipg_mpe.MPE_MAX_CYCLES + 5


@pytest.mark.parametrize(
    "task, num_agents",
    # 5 agents as in the paper; line with 3 agents; formation with 6 agents takes scipy's per-env matching
    [("spread", 5), ("line", 5), ("formation", 5), ("line", 3), ("formation", 6)],
)
def test_port_matches_mpe2(task, num_agents):
    port = maipg_mpe.NumpyMPE(task, num_agents, maipg_mpe.env_seeds(11, "train", NUM_ENVS))
    real = maipg_mpe.MPE2Envs(task, num_agents, maipg_mpe.env_seeds(11, "train", NUM_ENVS))
    port_obs, real_obs = port.reset(), real.reset()
    assert port_obs.shape == (NUM_ENVS, num_agents, port.obs_dim) and port_obs.dtype == np.float32
    np.testing.assert_allclose(port_obs, real_obs, rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    all_rewards, num_dones = [], 0
    for step in range(NUM_STEPS):
        actions = rng.integers(0, 5, (NUM_ENVS, num_agents))
        port_obs, port_rewards, port_dones = port.step(actions)
        real_obs, real_rewards, real_dones = real.step(actions)
        assert port_rewards.shape == (NUM_ENVS, num_agents) and port_rewards.dtype == np.float32
        assert port_dones.shape == (NUM_ENVS,) and port_dones.dtype == bool
        np.testing.assert_array_equal(port_dones, real_dones, err_msg=f"dones, step {step}")
        np.testing.assert_allclose(port_rewards, real_rewards, rtol=0, atol=1e-6, err_msg=f"rewards, step {step}")
        np.testing.assert_allclose(port_obs, real_obs, rtol=0, atol=1e-6, err_msg=f"obs, step {step}")
        all_rewards.append(port_rewards)
        num_dones += port_dones.sum()
    port.close()
    real.close()
    assert num_dones == 3 * NUM_ENVS  # three episodes ended in every env (time limit 25) and were auto-reset
    if task == "spread":  # agents collided: the contact physics and the collision penalty were exercised
        assert np.ptp(np.stack(all_rewards), axis=2).max() >= 0.5


@pytest.mark.parametrize("task", ["spread", "line", "formation"])
def test_seed_sets_initial_state(task):
    first = maipg_mpe.NumpyMPE(task, 5, [0, 1]).reset()
    assert np.array_equal(first, maipg_mpe.NumpyMPE(task, 5, [0, 1]).reset())
    assert not np.allclose(first[0], first[1])  # env i is seeded with seeds[i]


@pytest.mark.parametrize("task", ["spread", "line", "formation"])
def test_runs_of_different_seeds_and_streams_share_no_initial_state(task):
    """With seed + i per env, --seed 1 and --seed 2 would share 127 of 128 envs; env_seeds shares none."""

    def initial_states(seed, stream):
        obs = maipg_mpe.NumpyMPE(task, 5, maipg_mpe.env_seeds(seed, stream, 128)).reset()  # [128, 5, obs_dim]
        return {row.tobytes() for row in obs}

    train_1, train_2, eval_1 = initial_states(1, "train"), initial_states(2, "train"), initial_states(1, "eval")
    assert len(train_1) == 128 and not train_1 & train_2 and not train_1 & eval_1


@pytest.mark.parametrize("task", ["spread", "line", "formation"])
def test_spaces_match_mpe2(task):
    port, real = maipg_mpe.NumpyMPE(task, 5, [0]), maipg_mpe.MPE2Envs(task, 5, [0])
    assert real.agents == [f"agent_{i}" for i in range(5)]
    for agent in real.agents:
        assert real.envs[0].observation_space(agent).shape == (port.obs_dim,)
        assert real.envs[0].action_space(agent).n == port.n_actions
    assert (port.obs_dim, port.n_actions) == (real.obs_dim, real.n_actions)
    real.close()


def test_mpe2_render_returns_a_frame():
    env = maipg_mpe.MPE2Envs("spread", 5, [0], render_mode="rgb_array")
    env.reset()
    frame = env.render()
    env.close()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8 and frame.min() < frame.max()
