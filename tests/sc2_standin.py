"""A stand-in for SMAC's StarCraft2Env (smac.env.StarCraft2Env) with its exact API and none of the game.

Same constructor keywords (map_name, seed, ...), methods and return types as oxwhirl/smac's starcraft2.py: reset() ->
(obs list, state), step(actions) -> (reward, terminated, info with info["battle_won"]), get_obs, get_state,
get_avail_actions, get_env_info, get_stats, close, and the episode_limit / battles_won attributes. Sizes are the real
SMAC defaults of each map. The battle is random: agents die (then get zero observations and can only no-op, action 0),
enemies die, and the episode ends in a win, a loss or at the episode limit. Like the real env it refuses an
unavailable action and a step before the first reset.
"""

import numpy as np

# map -> (n_agents, n_enemies, episode limit, obs size, state size), StarCraft2Env's defaults
STANDIN_MAPS = {"3m": (3, 3, 60, 30, 48), "2s3z": (5, 5, 120, 80, 120)}
N_ACTIONS_NO_ATTACK = 6  # no-op, stop, north, south, east, west


class StarCraft2Env:
    def __init__(self, map_name="8m", seed=None, death_probability=0.08, kill_probability=0.08, **kwargs):
        self.map_name = map_name
        self.n_agents, self.n_enemies, self.episode_limit, self.obs_size, self.state_size = STANDIN_MAPS[map_name]
        self.n_actions = N_ACTIONS_NO_ATTACK + self.n_enemies
        self.death_probability, self.kill_probability = death_probability, kill_probability
        self._seed = seed
        self.rng = np.random.default_rng(seed)
        self.battles_won = self.battles_game = self.timeouts = 0
        self._episode_steps = None  # None until the first reset, like the real env's missing game controller

    def reset(self):
        self._episode_steps = 0
        self.agent_alive = np.ones(self.n_agents, dtype=bool)
        self.enemy_alive = np.ones(self.n_enemies, dtype=bool)
        self._draw_observations()
        return self.get_obs(), self.get_state()

    def _draw_observations(self):
        self._obs = self.rng.uniform(-1, 1, (self.n_agents, self.obs_size)).astype(np.float32)
        self._state = self.rng.uniform(-1, 1, self.state_size).astype(np.float32)
        self._can_move = self.rng.random((self.n_agents, 4)) < 0.8  # pathing: north, south, east, west

    def step(self, actions):
        if self._episode_steps is None:
            raise RuntimeError("step() before reset(): StarCraft II is not running")
        actions_int = [int(a) for a in actions]
        for a_id, action in enumerate(actions_int):
            avail_actions = self.get_avail_agent_actions(a_id)
            assert avail_actions[action] == 1, f"Agent {a_id} cannot perform action {action}"
        self._episode_steps += 1
        attacks = [a - N_ACTIONS_NO_ATTACK for a in actions_int if a >= N_ACTIONS_NO_ATTACK]
        enemies_before = self.enemy_alive.sum()
        for target in attacks:
            if self.rng.random() < self.kill_probability * 3:
                self.enemy_alive[target] = False
        self.agent_alive &= self.rng.random(self.n_agents) >= self.death_probability
        self._draw_observations()
        reward = float(enemies_before - self.enemy_alive.sum()) * 10 / (self.n_enemies * 10 + 200) * 20
        info = {"battle_won": False}
        terminated = False
        if not self.enemy_alive.any() and self.agent_alive.any():
            terminated, info["battle_won"] = True, True
            self.battles_won += 1
            reward += 200 / (self.n_enemies * 10 + 200) * 20
        elif not self.agent_alive.any() or not self.enemy_alive.any():
            terminated = True
        elif self._episode_steps >= self.episode_limit:
            terminated = True
            self.timeouts += 1
        info["dead_allies"] = int((~self.agent_alive).sum())
        info["dead_enemies"] = int((~self.enemy_alive).sum())
        if terminated:
            self.battles_game += 1
        return reward, terminated, info

    def get_obs(self):
        return [self._obs[i] * self.agent_alive[i] for i in range(self.n_agents)]  # dead agents see zeros

    def get_state(self):
        return self._state

    def get_avail_agent_actions(self, agent_id):
        if not self.agent_alive[agent_id]:
            return [1] + [0] * (self.n_actions - 1)  # only no-op allowed
        # alive: never no-op, always stop, moves by pathing, attacks on the enemies alive
        return [0, 1] + self._can_move[agent_id].astype(int).tolist() + self.enemy_alive.astype(int).tolist()

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(agent_id) for agent_id in range(self.n_agents)]

    def get_obs_size(self):
        return self.obs_size

    def get_state_size(self):
        return self.state_size

    def get_total_actions(self):
        return self.n_actions

    def get_env_info(self):
        return {
            "state_shape": self.get_state_size(),
            "obs_shape": self.get_obs_size(),
            "n_actions": self.get_total_actions(),
            "n_agents": self.n_agents,
            "episode_limit": self.episode_limit,
            "agent_features": ["health", "energy/cooldown", "rel_x", "rel_y"],
            "enemy_features": ["health", "rel_x", "rel_y"],
        }

    def get_stats(self):
        return {
            "battles_won": self.battles_won,
            "battles_game": self.battles_game,
            "battles_draw": self.timeouts,
            "win_rate": self.battles_won / max(self.battles_game, 1),
            "timeouts": self.timeouts,
            "restarts": 0,
        }

    def seed(self):
        return self._seed

    def close(self):
        self._episode_steps = None
