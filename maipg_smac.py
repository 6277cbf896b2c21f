"""MAIPG on the StarCraft Multi-Agent Challenge: real StarCraft II (SMAC) where it is installed, JaxMARL's SMAX elsewhere.

Multi-Agent Interpolated Policy Gradients (eq. (10), Algorithm 1) is MAPPO plus one deterministic, low-variance term: the
actor minimises (1 - nu) * L_clip + nu * L_dpg - c_ent * H, L_dpg = -Q_tot(s, mu(o)) / N_alive, where L_clip is MAPPO's
clipped surrogate on GAE advantages (a mean over the alive agents, hence 1 / N_alive), Q_tot a factorized Q-function
(per-agent Q_i mixed by QMIX or VDN) learned with TD(lambda), and mu the reparameterised deterministic policy (a
straight-through Gumbel-Softmax sample over the available actions). nu = 0 is exactly MAPPO.

    python maipg_smac.py --map 2s3z --nu 0.3            # the paper's SMAC settings (App. D, Table 3), nu overridden
    python maipg_smac.py --map 3m --env-backend smax     # SMAX: SMAC re-implemented in JAX, no game needed

Backends: `sc2` is SMAC (`pip install git+https://github.com/oxwhirl/smac.git`, StarCraft II 4.10 in $SC2PATH, the maps
in $SC2PATH/Maps/SMAC_Maps); `smax` is `pip install jaxmarl==0.2.0` (win rates not comparable to SMAC's). Flags left
unset take the map's preset (Table 3 by difficulty, MAPPO's per-map scripts where the paper is silent).
"""

import atexit
import contextlib
import copy
import functools
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tyro.conf import DisallowNone


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random and the envs)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=False`"""
    cuda: bool = False
    """if toggled, the networks run on the GPU when one is available (the envs always run on the CPU)"""
    torch_threads: int = 1
    """CPU threads torch may use (MAPPO's n_training_threads): 1 suits small networks and several runs per machine"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "maipg"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    save_model: bool = False
    """if toggled, the trained model is saved to runs/{run_name}/{exp_name}.pt"""
    eval_only: str | None = None
    """path of a model saved with --save-model: evaluate it (--eval-episodes greedy episodes) instead of training"""
    checkpoint_interval: int = 200
    """save runs/{run_name}/checkpoint.pt every this many updates (0: never) and on SIGTERM/SIGINT"""
    resume: str | None = None
    """a checkpoint.pt or its run folder: continue that run there (bit for bit on SMAX) with its own flags; only
    --total-timesteps, --eval-interval, --checkpoint-interval, --track, --cuda, --torch-threads, --save-model may change"""

    # Environment
    map: str = "2s3z"
    """the SMAC map (SMAX has 3m, 8m, 25m, 5m_vs_6m, 10m_vs_11m, 27m_vs_30m, 2s3z, 3s5z, 3s5z_vs_3s6z, 3s_vs_5z, 6h_vs_8z)"""
    env_backend: str = "auto"
    """sc2: SMAC on StarCraft II; smax: JaxMARL's SMAX; auto: sc2 when the game and the map are found, else smax"""
    total_timesteps: int = 10_000_000
    """total env steps of training (one step of one env counts once, whatever the number of agents)"""
    num_envs: int = 8
    """the number of parallel envs ("rollout threads"; with sc2, one game process each, and as many for evaluation)"""
    num_steps: int = 400
    """the rollout length per env between two updates (not the episode length, which the map sets: 60 to 400 steps)"""
    eval_interval: int = 25
    """evaluate every this many updates (0: never)"""
    eval_episodes: int = 32
    """the number of greedy evaluation episodes (eval/win_rate), shared among --num-envs separate eval envs"""

    # Algorithm (MAPPO's values and the paper's App. D). None: the map's preset (apply_presets)
    nu: DisallowNone[float | None] = None
    """the interpolation weight of eq. (10) in [0, 1]: 0 is MAPPO (preset: 0.4 on easy maps, 0.3 on hard and super hard)"""
    mixer: str = "qmix"
    """how Q_tot is factorized: qmix (monotonic hypernetwork mixer) or vdn (sum of the Q_i)"""
    dpg_scale: str = "raw"
    """raw: L_dpg in reward units (App. D; a small nu compensates); advantage: L_dpg / the raw advantages' std (eq. (10))"""
    nu_warmup: DisallowNone[int | None] = None
    """env steps over which nu rises from 0 to --nu, so that Q_hat fits first; unset: --total-timesteps / 5; 0: none"""
    learning_rate: float = 5e-4
    """the learning rate of the actor, V and Q+mixer Adam optimisers"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of GAE (advantages for L_clip)"""
    td_lambda: float = 0.8
    """the lambda of the TD(lambda) targets of Q_tot"""
    clip_coef: DisallowNone[float | None] = None
    """the PPO clip of the ratio, also used to clip the value updates (preset: 0.2; 0.05 on 5m_vs_6m, 8m_vs_9m, 3s_vs_5z)"""
    update_epochs: DisallowNone[int | None] = None
    """the number of PPO epochs per update (preset: 5 on easy maps, 10 on hard, 15 on super hard)"""
    num_minibatches: DisallowNone[int | None] = None
    """the number of minibatches per epoch (preset: 1; 2 on MMM2)"""
    chunk_len: int = 10
    """the length (steps) of the recurrent training chunks, which start from the hidden states stored in the rollout"""
    target_tau: float = 0.01
    """the soft-update rate of the target Q-networks and mixer, applied after every Q optimiser step"""
    ent_coef: float = 0.01
    """the coefficient of the entropy bonus"""
    max_grad_norm: float = 10.0
    """the maximum gradient norm of each of the three optimisers"""
    huber_delta: float = 10.0
    """the delta of the Huber value loss (on normalised values)"""
    hidden_dim: int = 64
    """the width of every trunk (actor, V, Q)"""
    recurrent: DisallowNone[bool | None] = None
    """--no-recurrent: the trunks have no GRU, MAPPO's MLP variant (preset: off on corridor, 6h_vs_8z, 3s_vs_4z, 3s_vs_5z)"""
    log_grad_var: bool = False
    """if toggled, log diagnostics/grad_var: the spread of the actor gradient over 8 sub-batches (about +10% update time)"""

    # to be filled in runtime
    batch_size: int = 0
    """env steps per update (num_envs * num_steps)"""
    num_updates: int = 0
    """the number of updates (total_timesteps // batch_size)"""


# ---------------------------------------------------------------------------------------------------------------------
# Networks (MAPPO's; App. D)
# ---------------------------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Trunk(nn.Module):
    """LayerNorm(input) -> [Linear -> ReLU -> LayerNorm] x 2 -> GRU -> LayerNorm, shared design of actor, V and Q_i."""

    def __init__(self, input_dim, hidden_dim, recurrent):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(input_dim),
            layer_init(nn.Linear(input_dim, hidden_dim)),
            nn.ReLU(),
            nn.LayerNorm(hidden_dim),
            layer_init(nn.Linear(hidden_dim, hidden_dim)),
            nn.ReLU(),
            nn.LayerNorm(hidden_dim),
        )
        self.gru = nn.GRU(hidden_dim, hidden_dim) if recurrent else None
        if recurrent:
            for name, param in self.gru.named_parameters():
                nn.init.orthogonal_(param) if "weight" in name else nn.init.zeros_(param)
            self.gru_norm = nn.LayerNorm(hidden_dim)

    def forward(self, x, hidden, masks):
        """x [L, *batch, in], hidden [*batch, H] entering step 0, masks [L, *batch] (0: an episode starts at this step)
        -> features [L, *batch, H], hidden after step L-1 [*batch, H]."""
        x = self.mlp(x)
        if self.gru is None:
            return x, hidden
        seq_len, batch, hidden_dim = x.shape[0], x.shape[1:-1], x.shape[-1]
        x, hidden, masks = (
            x.reshape(seq_len, -1, hidden_dim),
            hidden.reshape(1, -1, hidden_dim),
            masks.reshape(seq_len, 1, -1, 1),
        )
        if bool((masks[1:] == 1).all()):  # no episode restarts inside the window: one fused GRU call
            x, hidden = self.gru(x, hidden * masks[0])
        else:  # step by step, forgetting the memory where an episode restarts
            outputs = []
            for t in range(seq_len):
                out, hidden = self.gru(x[t : t + 1], hidden * masks[t])
                outputs.append(out)
            x = torch.cat(outputs)
        return self.gru_norm(x).reshape(seq_len, *batch, hidden_dim), hidden.reshape(*batch, hidden_dim)


class Actor(nn.Module):
    """pi_theta(a_i | o_i, i), shared by all agents -> logits [L, *batch, n_actions] (unavailable at -1e10), hidden"""

    def __init__(self, input_dim, n_actions, hidden_dim, recurrent):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = layer_init(nn.Linear(hidden_dim, n_actions), std=0.01)

    def forward(self, x, hidden, masks, avail_actions):
        features, hidden = self.trunk(x, hidden, masks)
        return self.head(features).masked_fill(avail_actions == 0, -1e10), hidden


class Critic(nn.Module):
    """V_phi on the agent-specific critic input, in ValueNorm's normalised units -> values [L, *batch], hidden [*batch, H];
    with n_actions, one output per action: q_values [L, *batch, n_actions] (AgentQ)."""

    def __init__(self, input_dim, hidden_dim, recurrent, n_actions=None):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = layer_init(nn.Linear(hidden_dim, n_actions or 1), std=1.0)
        self.squeeze = n_actions is None

    def forward(self, x, hidden, masks):
        features, hidden = self.trunk(x, hidden, masks)
        out = self.head(features)
        return (out.squeeze(-1) if self.squeeze else out), hidden


class AgentQ(Critic):
    """Q_psi_i(s, .): the critic's architecture with one output per action (App. D); Q_i(s, a_i) = <onehot(a_i), Q_i(s, .)>."""

    def __init__(self, input_dim, n_actions, hidden_dim, recurrent):
        super().__init__(input_dim, hidden_dim, recurrent, n_actions)


class QMixer(nn.Module):
    """QMIX: Q_tot = ELU(q |W1(s)| + b1(s)) |W2(s)| + V(s); the absolute weights make dQ_tot/dQ_i >= 0.
    PyTorch's default initialisation, as pymarl's mixer."""

    def __init__(self, num_agents, state_dim, embed_dim=32, hypernet_dim=64):
        super().__init__()
        self.num_agents, self.embed_dim = num_agents, embed_dim
        self.hyper_w1 = nn.Sequential(
            nn.Linear(state_dim, hypernet_dim), nn.ReLU(), nn.Linear(hypernet_dim, num_agents * embed_dim)
        )
        self.hyper_b1 = nn.Linear(state_dim, embed_dim)
        self.hyper_w2 = nn.Sequential(nn.Linear(state_dim, hypernet_dim), nn.ReLU(), nn.Linear(hypernet_dim, embed_dim))
        self.state_value = nn.Sequential(nn.Linear(state_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def forward(self, agent_qs, state):
        """agent_qs [*batch, n_agents], state [*batch, state_dim] -> q_tot [*batch]"""
        w1 = self.hyper_w1(state).abs().view(*state.shape[:-1], self.num_agents, self.embed_dim)
        hidden = F.elu((agent_qs.unsqueeze(-2) @ w1).squeeze(-2) + self.hyper_b1(state))
        w2 = self.hyper_w2(state).abs()
        return (hidden * w2).sum(-1) + self.state_value(state).squeeze(-1)


class VDNMixer(nn.Module):
    """VDN: Q_tot = sum_i Q_i (the state is ignored)."""

    def forward(self, agent_qs, state):
        return agent_qs.sum(-1)


class ValueNorm(nn.Module):
    """MAPPO's ValueNorm: debiased running mean and mean-of-squares of the value targets (beta = 0.99999)."""

    def __init__(self, beta=0.99999, epsilon=1e-5):
        super().__init__()
        self.beta, self.epsilon = beta, epsilon
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_mean_sq", torch.zeros(()))
        self.register_buffer("debiasing_term", torch.zeros(()))

    @torch.no_grad()
    def update(self, x):
        self.running_mean.mul_(self.beta).add_((1 - self.beta) * x.mean())
        self.running_mean_sq.mul_(self.beta).add_((1 - self.beta) * (x**2).mean())
        self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def mean_var(self):
        mean = self.running_mean / self.debiasing_term.clamp(min=self.epsilon)
        mean_sq = self.running_mean_sq / self.debiasing_term.clamp(min=self.epsilon)
        return mean, (mean_sq - mean**2).clamp(min=1e-2)

    def normalize(self, x):
        mean, var = self.mean_var()
        return (x - mean) / var.sqrt()

    def denormalize(self, x):
        mean, var = self.mean_var()
        return x * var.sqrt() + mean


# ---------------------------------------------------------------------------------------------------------------------
# The algorithm's pure functions (Algorithm 1; the actor loss of eq. (10) and the Q loss)
# ---------------------------------------------------------------------------------------------------------------------
def weighted_mean(x, weights):
    """Mean of x over the entries where weights (0/1) is 1; 0 if there are none."""
    return (x * weights).sum() / weights.sum().clamp(min=1.0)


def weighted_var(x, weights):
    """Variance of x over the entries where weights (0/1) is 1."""
    return weighted_mean((x - weighted_mean(x, weights)) ** 2, weights)


def gae(rewards, values, masks, gamma, gae_lambda):
    """GAE in raw reward units. rewards [T, E] (team), values [T+1, E, N] (denormalised), masks [T+1, E]
    (masks[t+1] = 0: the episode ended at step t) -> advantages [T, E, N]."""
    advantages = torch.zeros_like(values[:-1])
    last_advantage = torch.zeros_like(values[0])
    for t in reversed(range(rewards.shape[0])):
        next_mask = masks[t + 1].unsqueeze(-1)
        delta = rewards[t].unsqueeze(-1) + gamma * values[t + 1] * next_mask - values[t]
        last_advantage = delta + gamma * gae_lambda * next_mask * last_advantage
        advantages[t] = last_advantage
    return advantages


def td_lambda_targets(rewards, q_tot_target, masks, gamma, td_lambda):
    """Gated TD(lambda) targets of Q_tot (Algorithm 1, line 11) on a rollout segment in which episodes may restart:
        G_t = r_t + gamma * m_{t+1} * [lambda * G_{t+1} + (1 - lambda) * Qhat'_{t+1}],   G_T = Qhat'_T.
    rewards [T, E], q_tot_target [T+1, E] (target Q_tot; slot T at mu(o_T)), masks [T+1, E] -> targets [T, E]."""
    targets = torch.zeros_like(rewards)
    next_return = q_tot_target[-1]
    for t in reversed(range(rewards.shape[0])):
        next_return = rewards[t] + gamma * masks[t + 1] * (td_lambda * next_return + (1 - td_lambda) * q_tot_target[t + 1])
        targets[t] = next_return
    return targets


def normalize_advantages(raw_advantages, weights):
    """MAPPO's once-per-rollout normalisation over the active entries. -> (advantages, std), std being the raw
    advantages' std (+ 1e-5), which --dpg-scale advantage divides L_dpg by so that both terms of eq. (10) share units."""
    std = weighted_var(raw_advantages, weights).sqrt() + 1e-5
    return (raw_advantages - weighted_mean(raw_advantages, weights)) / std, std


def gumbel_straight_through(logits, tau=1.0):
    """mu_i for discrete actions: a Gumbel-Softmax sample, one-hot in the forward pass, the softmax's gradient in the
    backward pass. Masked logits (-1e10) keep probability 0, so an unavailable action is never picked."""
    gumbels = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1) noise
    soft = F.softmax((logits + gumbels) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def ppo_loss(logprobs, old_logprobs, advantages, weights, clip_coef):
    """MAPPO's clipped surrogate L_clip (eq. (10), first term), an active-masked mean. -> (loss, approx_kl, clipfrac)"""
    logratio = logprobs - old_logprobs
    ratio = logratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    with torch.no_grad():  # http://joschu.net/blog/kl-approx.html
        approx_kl = weighted_mean((ratio - 1) - logratio, weights)
        clipfrac = weighted_mean(((ratio - 1.0).abs() > clip_coef).float(), weights)
    return -weighted_mean(surrogate, weights), approx_kl, clipfrac


def value_loss(values, old_values, targets, weights, clip_coef, huber_delta):
    """MAPPO's value loss in normalised units: Huber, with the update clipped around the rollout's values, max of both."""
    values_clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
    loss = torch.max(
        F.huber_loss(values, targets, reduction="none", delta=huber_delta),
        F.huber_loss(values_clipped, targets, reduction="none", delta=huber_delta),
    )
    return weighted_mean(loss, weights)


def dpg_loss(mu, q_values, state, mixer, weights, active_masks, value_norm):
    """L_dpg = -Q_tot(s, mu(o)) / N_alive in reward units (eq. (10), second term). L_clip is a mean over alive
    agent-steps, so Q_tot is divided at each step by the number of agents alive there: per alive agent the two terms
    weigh (1 - nu) : nu as in eq. (10) (where every agent lives the factor is exactly 1 and the divisor is N).
    mu [*batch, N, A] (one-hot), q_values [*batch, N, A], state [*batch, S], weights [*batch], active_masks [*batch, N].
    Q-values and mixer weights enter as constants, so the gradient reaches only the actor, via mu."""
    agent_qs = (mu * q_values.detach()).sum(-1)
    frozen_mixer = {name: param.detach() for name, param in mixer.named_parameters()}
    q_tot = value_norm.denormalize(torch.func.functional_call(mixer, frozen_mixer, (agent_qs, state)))
    n_agents = mu.shape[-2]
    return -weighted_mean(q_tot * (n_agents / active_masks.sum(-1).clamp(min=1)), weights) / n_agents


def actor_loss(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, args):
    """The interpolated actor loss of eq. (10) on a minibatch of chunks: (1 - nu) * L_clip + nu * L_dpg - c_ent * H,
    L_dpg divided by dpg_scale (1, or the advantages' std). logits and q_values [L, B, N, A]; mb holds the chunked
    rollout tensors. -> (loss, dict of its parts)"""
    dist = Categorical(logits=logits, validate_args=False)  # NaN logits reach the loss check, which names the loss
    weights = mb["valid"].unsqueeze(-1) * mb["active_masks"]  # [L, B, N]
    logprobs = dist.log_prob(mb["actions"])
    pg_loss, approx_kl, clipfrac = ppo_loss(logprobs, mb["logprobs"], mb["advantages"], weights, args.clip_coef)
    entropy = weighted_mean(dist.entropy(), weights)
    dpg = torch.zeros(())
    if nu > 0:  # nu = 0 skips mu entirely (no Gumbel draw), so the run is MAPPO's, random number for random number
        mu = gumbel_straight_through(logits)  # [L, B, N, A], section 3.2's reparameterised mu
        dpg = dpg_loss(mu, q_values, mb["state"], mixer, mb["valid"], mb["active_masks"], value_norm) / dpg_scale
    loss = (1 - nu) * pg_loss + nu * dpg - args.ent_coef * entropy
    return loss, {"policy_loss": pg_loss, "dpg_loss": dpg, "entropy": entropy, "approx_kl": approx_kl, "clipfrac": clipfrac}


def q_loss(q_tot, q_returns, weights, value_norm):
    """The Q half of Algorithm 1 (line 23): Q_tot(s, a) [*batch] regresses on its TD(lambda) targets q_returns [*batch]
    (reward units), an MSE over the weighted entries. Q_tot learns the targets in ValueNorm's units, V's statistics: V's
    returns have Q_tot's scale, so the QMIX mixer works at unit scale and cannot saturate. (Statistics of Q_tot's own
    targets would not do: those bootstrap on the denormalised Q_tot', so a wide Q_tot' widens its own scale.)"""
    return weighted_mean((q_tot - value_norm.normalize(q_returns)) ** 2, weights)


def nu_at(global_step, nu, warmup_steps):
    """--nu-warmup: nu rises linearly from 0 (at step 0) to nu (at warmup_steps), so Q_hat fits before it steers."""
    return nu * min(1.0, global_step / warmup_steps) if warmup_steps > 0 else nu


def soft_update(target, source, tau):
    """psi' <- tau * psi + (1 - tau) * psi' (Algorithm 1, line 25)."""
    with torch.no_grad():
        for target_param, param in zip(target.parameters(), source.parameters(), strict=True):
            target_param.lerp_(param, tau)


def to_chunks(x, chunk_len, pad_value=0.0):
    """Algorithm 1, line 12: a rollout tensor [T, E, ...] -> training chunks [chunk_len, W * E, ...], W = ceil(T /
    chunk_len) windows per env (chunk w * E + e: window w of env e), each holding all agents of its env, as Q_tot needs
    every agent's mu at the same t. The last window is padded with pad_value."""
    n_windows = -(-x.shape[0] // chunk_len)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, n_windows * chunk_len - x.shape[0]), value=pad_value)
    return padded.reshape(n_windows, chunk_len, *x.shape[1:]).transpose(0, 1).flatten(1, 2)


def actor_input(obs):
    """obs [*batch, N, D] -> the agent's observation ++ its one-hot id [*batch, N, D + N]"""
    num_agents = obs.shape[-2]
    return torch.cat([obs, torch.eye(num_agents, device=obs.device).expand(*obs.shape[:-1], num_agents)], -1)


def critic_input(obs, state, alive):
    """MAPPO's agent-specific critic input ("AS"): global state ++ own observation ++ id, and for a dead agent zeros ++
    its id (MAPPO's death masking). obs [*batch, N, D], state [*batch, S], alive [*batch, N] -> [*batch, N, S + D + N]"""
    features = torch.cat([state.unsqueeze(-2).expand(*state.shape[:-1], obs.shape[-2], -1), obs], -1) * alive.unsqueeze(-1)
    return actor_input(features)


# ---------------------------------------------------------------------------------------------------------------------
# Environment: SMAC on StarCraft II (`sc2`) or SMAX (`smax`) behind one batched interface of EnvSteps. `step` resets a
# finished env after reading its last step: its reward, done and win come with the first obs of its next episode.
# ---------------------------------------------------------------------------------------------------------------------
SMAC_EPISODE_LIMITS = {  # smac/env/starcraft2/maps/smac_maps.py
    "3m": 60, "8m": 120, "25m": 150, "5m_vs_6m": 70, "8m_vs_9m": 120, "10m_vs_11m": 150, "27m_vs_30m": 180, "MMM": 150,
    "MMM2": 180, "2s3z": 120, "3s5z": 150, "3s5z_vs_3s6z": 170, "3s_vs_3z": 150, "3s_vs_4z": 200, "3s_vs_5z": 250,
    "1c3s5z": 180, "2m_vs_1z": 150, "corridor": 400, "6h_vs_8z": 150, "2s_vs_1sc": 300, "so_many_baneling": 100,
    "bane_vs_bane": 200, "2c_vs_64zg": 400,
}  # fmt: skip
SMAC_INSTALL = "pip install git+https://github.com/oxwhirl/smac.git"
SMAC_MAPS_URL = "https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip"
SC2_PATHS = {"linux": "~/StarCraftII", "darwin": "/Applications/StarCraft II", "win32": "C:/Program Files (x86)/StarCraft II"}
# SMAC scales each battle's return to at most 20 (reward_scale_rate); SMAX's is at most 2 (1 for destroying all enemy
# health + a won_battle_bonus of 1). Multiplying SMAX rewards by 10 puts Q_tot on the scale nu was tuned for (Table 3).
SMAX_REWARD_SCALE = 10.0


class EnvStep(NamedTuple):
    obs: np.ndarray  # [E, N, obs_dim] float32, zeros for dead agents
    state: np.ndarray  # [E, state_dim] float32, the global state (mixer input)
    avail_actions: np.ndarray  # [E, N, n_actions] float32, 1 = available
    alive: np.ndarray  # [E, N] bool
    rewards: np.ndarray  # [E] float32, one team reward per env step
    dones: np.ndarray  # [E] bool, the episode ended with this step (win, loss or the map's episode limit)
    won: np.ndarray  # [E] bool, the episode ended with this step in a won battle


@functools.cache
def compile_smax(map_name: str, num_envs: int, compile_cache_dir: str):
    """SMAX's batched reset and step, compiled ahead of time once per process and size (train and eval envs share them)
    on the CPU: at a few envs one fused XLA call beats a GPU launch, and JAX would otherwise reserve the GPU memory torch
    needs. The episode limit is the SMAC map's (SMAX's is 100 everywhere). -> (env, reset, step)"""
    import jax
    import jax.numpy as jnp
    from jaxmarl.environments.smax import HeuristicEnemySMAX, map_name_to_scenario

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_compilation_cache_dir", compile_cache_dir)  # a second run reuses the compiled step
    env = HeuristicEnemySMAX(scenario=map_name_to_scenario(map_name), max_steps=SMAC_EPISODE_LIMITS[map_name])
    agents = env.agents
    strong_types = lambda tree: jax.tree.map(lambda x: x.astype(x.dtype), tree)  # no weak types: one compiled step

    def observe(states):
        """[E]-batched env states -> obs [E, N, obs_dim], state [E, state_dim], avail [E, N, A], alive [E, N]. The state
        is SMAX's world state [E, units * F + 2 * units] (per unit: health, x, y, cooldown, type one-hot; then every unit's
        team and type index) on SMAC's scale, positions / map size and type indices / the largest, in [0, 1]: raw, the
        positions (0 to 32) would dominate the mixer's hypernetworks, which see the state unnormalised."""
        obs, avail = jax.vmap(env.get_obs)(states), jax.vmap(env.get_avail_actions)(states)
        obs, avail = jnp.stack([obs[a] for a in agents], axis=1), jnp.stack([avail[a] for a in agents], axis=1)
        n_units, n_features = env.num_allies + env.num_enemies, len(env.own_features)
        raw = jax.vmap(env.get_world_state)(states)
        units = raw[:, : n_units * n_features].reshape(-1, n_units, n_features)
        units = units.at[:, :, 1:3].divide(jnp.array([env.map_width, env.map_height]))
        types = raw[:, -n_units:] / (env.unit_type_bits - 1)
        state = jnp.concatenate([units.reshape(-1, n_units * n_features), raw[:, -2 * n_units : -n_units], types], axis=1)
        return obs, state, avail.astype(jnp.float32), states.state.unit_alive[:, : env.num_allies]

    def reset(key):
        key, reset_key = jax.random.split(key)
        _, states = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs))
        no_reward = jnp.zeros(num_envs)  # and no episode ended: done and won are False
        return key, strong_types(states), observe(states) + (no_reward, no_reward != 0, no_reward != 0)

    def step(key, states, actions):
        key, step_key, reset_key = jax.random.split(key, 3)
        # step_env: the step without JaxMARL's auto-reset, so the terminal step's reward and win are seen
        _, states, rewards, dones, _ = jax.vmap(env.step_env)(
            jax.random.split(step_key, num_envs), states, {a: actions[:, i] for i, a in enumerate(agents)}
        )
        done, team_reward = dones["__all__"], rewards[agents[0]]  # [E]; every ally gets the same team reward
        won = done & (team_reward >= env.won_battle_bonus)  # as SMAXLogWrapper counts a won battle
        _, fresh = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs))  # then reset the finished envs ourselves
        states = jax.tree.map(lambda f, s: jnp.where(done.reshape((-1,) + (1,) * (s.ndim - 1)), f, s), fresh, states)
        return key, strong_types(states), observe(states) + (team_reward * SMAX_REWARD_SCALE, done, won)

    # compiled here, ahead of time, so that the run's env-stepping time is stepping only
    key = jax.random.PRNGKey(0)
    lowered_reset = jax.jit(reset).lower(key)
    actions = jax.ShapeDtypeStruct((num_envs, env.num_allies), jnp.int32)  # out_info[1]: the batched states' shapes
    return env, lowered_reset.compile(), jax.jit(step).lower(key, lowered_reset.out_info[1], actions).compile()


class SmaxEnvs:
    """JaxMARL's SMAX (a JAX re-implementation of SMAC, against SMAC's scripted enemy): all envs in one jitted step."""

    def __init__(self, map_name: str, num_envs: int, seed: int, compile_cache_dir: str):
        import jax

        env, self._reset, self._step = compile_smax(map_name, num_envs, compile_cache_dir)
        self.num_envs, self.num_agents = num_envs, env.num_allies
        self.obs_dim, self.state_dim = env.observation_space(env.agents[0]).shape[0], env.state_size
        self.n_actions, self.episode_limit = env.action_space(env.agents[0]).n, env.max_steps
        self.jax, self.key, self.states = jax, jax.random.PRNGKey(seed), None  # jax: an optional package, imported here

    def reset(self) -> EnvStep:
        self.key, self.states, out = self._reset(self.key)
        return EnvStep(*map(np.array, out))  # copies: torch wants writable arrays

    def step(self, actions: np.ndarray) -> EnvStep:
        self.key, self.states, out = self._step(self.key, self.states, np.asarray(actions, dtype=np.int32))
        return EnvStep(*map(np.array, out))

    def state_dict(self) -> dict:
        """Everything the next steps depend on (for --resume): the JAX key and the env states, as NumPy arrays."""
        return {"key": self.jax.device_get(self.key), "states": self.jax.device_get(self.states)}

    def load_state_dict(self, state: dict) -> None:
        jnp = self.jax.numpy
        self.key, self.states = jnp.asarray(state["key"]), self.jax.tree.map(jnp.asarray, state["states"])

    def close(self):
        pass


def make_starcraft2_env(map_name: str, seed: int):
    """SMAC's StarCraft2Env with its default settings, built inside a worker process."""
    from absl import flags
    from smac.env import StarCraft2Env

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])  # pysc2 reads absl flags: parse them once, before the first reset
    return StarCraft2Env(map_name=map_name, seed=seed)


def sc2_worker(remote, parent_remote, env_factory):
    """One StarCraft2Env (one game process) per worker process. It answers get_env_info with SMAC's dict, and reset and
    step (the env's actions) with the fields of an EnvStep, resetting a finished episode after its last step is read."""
    # Ctrl-C's SIGINT and Slurm's SIGTERM may reach the whole process group: the main process checkpoints, then closes
    # the workers. Ignored here, they stay ignored in the game this worker starts (across exec, unless it handles them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent_remote.close()
    env = env_factory()
    try:
        while (request := remote.recv())[0] != "close":
            command, actions = request
            if command == "get_env_info":
                remote.send(env.get_env_info())
                continue
            reward, terminated, info = env.step(actions) if command == "step" else (0.0, False, {})
            if command == "reset" or terminated:
                env.reset()
            obs, state = np.array(env.get_obs(), dtype=np.float32), np.array(env.get_state(), dtype=np.float32)
            avail = np.array(env.get_avail_actions(), dtype=np.float32)
            alive = avail[:, 0] == 0  # a dead agent can only no-op (action 0), a live one never can
            won = bool(info.get("battle_won", False))  # a failed game step returns an empty info
            remote.send((obs, state, avail, alive, np.float32(reward), terminated, won))
    finally:
        env.close()
        remote.close()


class Sc2Envs:
    """SMAC on StarCraft II: one worker process per env (each runs its own game), stepped together over pipes."""

    def __init__(self, map_name: str, seeds: list[int], env_factory=make_starcraft2_env):
        ctx = mp.get_context()  # the platform's default (fork on Linux, as MAPPO's workers); spawn works as well
        self.remotes, work_remotes = zip(*[ctx.Pipe() for _ in seeds], strict=True)
        self.processes = []
        for seed, remote, work_remote in zip(seeds, self.remotes, work_remotes, strict=True):
            factory = functools.partial(env_factory, map_name=map_name, seed=seed)
            self.processes.append(ctx.Process(target=sc2_worker, args=(work_remote, remote, factory), daemon=True))
            self.processes[-1].start()
            work_remote.close()
        atexit.register(self.kill)  # runs before multiprocessing's own exit handler, whose terminate() they ignore
        self.remotes[0].send(("get_env_info", None))
        info = self.remotes[0].recv()
        self.num_envs, self.num_agents = len(seeds), info["n_agents"]
        self.obs_dim, self.state_dim = info["obs_shape"], info["state_shape"]
        self.n_actions, self.episode_limit = info["n_actions"], info["episode_limit"]

    def reset(self) -> EnvStep:
        return self.step(None)

    def step(self, actions: np.ndarray | None) -> EnvStep:
        """actions [E, N], or None: reset every env."""
        for i, remote in enumerate(self.remotes):
            remote.send(("reset", None) if actions is None else ("step", actions[i].tolist()))
        return EnvStep(*map(np.stack, zip(*[remote.recv() for remote in self.remotes], strict=True)))

    def close(self):
        """Each worker closes its game; one that has died is skipped, one that hangs is killed after 30 s."""
        for remote in self.remotes:
            with contextlib.suppress(OSError):  # a broken pipe: that worker has ended
                remote.send(("close", None))
        for process in self.processes:
            process.join(timeout=30)
        self.kill()

    def kill(self):
        """SIGKILL to the workers still alive: they ignore SIGTERM, so terminate() would not end them."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()


def sc2_problem(map_name: str) -> str | None:
    """Why the sc2 backend cannot run this map here (one line), or None when it can."""
    try:
        from smac.env import StarCraft2Env  # noqa: F401
    except ImportError:
        # PyPI's `smac` is SMAC3, an unrelated optimiser that also installs a top-level `smac` module
        return f"SMAC is not installed: {SMAC_INSTALL}; PyPI's `smac` is SMAC3, another package"
    sc2_path = Path(os.environ.get("SC2PATH", SC2_PATHS.get(sys.platform, "~/StarCraftII"))).expanduser()
    if not (sc2_path / "Versions").is_dir():
        return f"StarCraft II not found: {sc2_path / 'Versions'} does not exist (install StarCraft II 4.10 and set SC2PATH)"
    map_file = sc2_path / "Maps" / "SMAC_Maps" / f"{map_name}.SC2Map"
    if not map_file.is_file():
        return f"SMAC map not found: {map_file} (unzip SMAC_Maps.zip from {SMAC_MAPS_URL} into {map_file.parent.parent})"
    return None


def resolve_backend(args: Args) -> str:
    """auto -> sc2 when SMAC, the game and the map are all found, else smax, saying which and why."""
    if args.env_backend in ("auto", "sc2"):
        problem = sc2_problem(args.map)
        if problem is None:
            print(f"--env-backend {args.env_backend}: SMAC on StarCraft II, map {args.map}")
            return "sc2"
        if args.env_backend == "sc2":
            fail(f"--env-backend sc2: {problem}")
        print(f"--env-backend auto: using smax, as {problem}. SMAX win rates are not comparable to StarCraft II's.")
    require("jaxmarl", "pip install jaxmarl==0.2.0", "--env-backend smax")
    from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

    smax_maps = [name for name in MAP_NAME_TO_SCENARIO if name in SMAC_EPISODE_LIMITS]
    if args.map not in smax_maps:
        fail(f"--map {args.map} is not in SMAX, whose SMAC maps are {', '.join(smax_maps)} (the sc2 backend has all)")
    return "smax"


def make_envs(args: Args, backend: str, seeds: list[int]):
    """One env per seed (see env_seeds). SMAX's envs share one JAX key, drawn from the first seed; JAX's compilation
    cache sits beside the runs, so that the next run skips compiling the SMAX step."""
    if backend == "sc2":
        return Sc2Envs(args.map, seeds)
    return SmaxEnvs(args.map, len(seeds), seeds[0], os.path.abspath(os.path.join("runs", "jax_cache")))


@torch.no_grad()
def evaluate(actor, envs, num_episodes, hidden_dim, device):
    """Greedy episodes (argmax of the masked logits, fresh hidden states), each run to its own end; env i plays its
    share of num_episodes one after the other. -> (episodic team returns, won flags), num_episodes of each"""
    E, N = envs.num_envs, envs.num_agents
    episodes_left = num_episodes // E + (np.arange(E) < num_episodes % E)  # [E]
    env_step = envs.reset()
    hidden, masks = torch.zeros(E, N, hidden_dim, device=device), torch.ones(1, E, N, device=device)
    running_returns, returns, wins = np.zeros(E), [], []
    while episodes_left.any():
        obs, avail_actions = (torch.as_tensor(x, device=device)[None] for x in (env_step.obs, env_step.avail_actions))
        logits, hidden = actor(actor_input(obs), hidden, masks, avail_actions)
        env_step = envs.step(logits[0].argmax(-1).cpu().numpy())
        running_returns += env_step.rewards
        finished = np.flatnonzero(env_step.dones & (episodes_left > 0))
        returns, wins = returns + running_returns[finished].tolist(), wins + env_step.won[finished].tolist()
        episodes_left[finished] -= 1
        running_returns[env_step.dones] = 0.0
        masks = torch.as_tensor(1.0 - env_step.dones, dtype=torch.float32, device=device).expand(N, E).T[None]
    return np.array(returns), np.array(wins)


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (not needed to train)
# ---------------------------------------------------------------------------------------------------------------------
def rvar(advantages, control_variate, weights):
    """Var(A - C) / Var(A) over the weighted entries (section 4.1, Figure 1): below 1, C reduces the variance."""
    return weighted_var(advantages - control_variate, weights) / weighted_var(advantages, weights).clamp(min=1e-8)


def correlation(x, y, weights):
    """The weighted Pearson correlation of x and y: 1 - corr(A, C)^2 is the lowest RVar any rescaling eta * C reaches."""
    covariance = weighted_mean((x - weighted_mean(x, weights)) * (y - weighted_mean(y, weights)), weights)
    return covariance / (weighted_var(x, weights) * weighted_var(y, weights)).sqrt().clamp(min=1e-8)


def explained_variance(predictions, targets, weights):
    """1 - Var(targets - predictions) / Var(targets) over the weighted entries: 1 predicts them exactly, 0 no better
    than their mean."""
    return 1 - weighted_var(targets - predictions, weights) / weighted_var(targets, weights).clamp(min=1e-8)


def grad_variance(grads):
    """grads [K, P]: K gradients of one loss on disjoint sub-batches -> mean_k ||g_k - mean(g)||^2 (Figure 4a)."""
    return ((grads - grads.mean(0)) ** 2).sum(-1).mean()


def grad_norm_ratio(numerator, denominator, params):
    """||d numerator / d params|| / ||d denominator / d params|| (diagnostics/dpg_grad_ratio)."""
    norms = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)]).norm()
        for loss in (numerator, denominator)
    ]
    return norms[0] / norms[1].clamp(min=1e-12)


def rollout_diagnostics(
    raw_advantages, weights, q_values, actions, probs, avail_actions, state, mixer, value_norm, rng, joint_q, q_targets, k=8
):
    """The per-update diagnostics of the rollout, before the update trains on it ([T, E, N] weights; q_values, pi's
    probs, avail_actions [T, E, N, A]; q_targets: Q_tot's TD(lambda) and Monte Carlo targets, each [T, E]):
    rvar: Var(A - C) / Var(A) with C(s, a) = Q_tot(s, a) - mean_k Q_tot(s, a^k), a^k ~ pi (section 4.1, Figure 1);
    cv_corr: corr(A, C), so 1 - cv_corr^2 is the lowest RVar any rescaling of C reaches; rvar_own: the RVar of agent i's
    part C_i = Q_tot(s, a) - E_{a_i' ~ pi_i} Q_tot(s, a_i', a_-i), the expectation exact over its actions (what agent
    i's likelihood-ratio term can use, eq. (12)); q_explained_variance(_mc): Q_tot(s, a)'s explained variance of its
    TD(lambda) (Monte Carlo) targets; rvar_joint: rvar's C from the unfactorized joint Q; mixer_slope: median
    dQ_tot/dQ_i at the taken actions (near 0 the mixer is saturated and L_dpg does nothing); q_gap: median over agents
    of Q_tot's action gap in reward units, slope * (max_a Q_i - min_a Q_i) over available actions (first order: exact
    for VDN); q_tot_mean: mean raw Q_tot(s, a) of the rollout's real steps (no padding)."""
    T, E, N, A = q_values.shape
    q_taken = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1).requires_grad_()  # [T, E, N]
    with torch.enable_grad():
        q_tot_taken = mixer(q_taken, state)  # [T, E]
        (slope,) = torch.autograd.grad(q_tot_taken.sum(), q_taken)  # [T, E, N]
    q_tot_taken = value_norm.denormalize(q_tot_taken.detach())
    sampled = torch.multinomial(probs.reshape(-1, A), k, replacement=True, generator=rng).T.reshape(k, T, E, N)
    q_sampled = q_values.expand(k, T, E, N, A).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    control_variate = q_tot_taken - value_norm.denormalize(mixer(q_sampled, state.expand(k, *state.shape))).mean(0)
    # agent i's action replaced by each of its actions a_i', the others' kept: [T, E, N (agent i), A (a_i'), N]
    own = torch.eye(N, dtype=torch.bool, device=q_values.device)[:, None, :]
    q_swapped = torch.where(own, q_values.unsqueeze(-1), q_taken.detach()[:, :, None, None, :])
    q_tot_swapped = mixer(q_swapped, state[:, :, None, None, :])  # [T, E, N, A]; the mixer broadcasts the state
    own_control = q_tot_taken.unsqueeze(-1) - value_norm.denormalize((probs * q_tot_swapped).sum(-1))  # [T, E, N]
    unavailable = avail_actions == 0
    q_range = q_values.masked_fill(unavailable, -torch.inf).amax(-1) - q_values.masked_fill(unavailable, torch.inf).amin(-1)
    q_scale = value_norm.mean_var()[1].sqrt()  # d raw Q_tot / d normalised Q_tot
    active, steps = weights.bool(), weights.amax(-1)  # steps: those with an agent alive
    stats = {
        "rvar": rvar(raw_advantages, control_variate.unsqueeze(-1), weights),
        "cv_corr": correlation(raw_advantages, control_variate.unsqueeze(-1).expand_as(raw_advantages), weights),
        "rvar_own": rvar(raw_advantages, own_control, weights),
        "q_explained_variance": explained_variance(q_tot_taken, q_targets[0], steps),
        "q_explained_variance_mc": explained_variance(q_tot_taken, q_targets[1], steps),
        "mixer_slope": slope[active].median(),
        "q_gap": (q_scale * slope * q_range)[active].median(),
        "q_tot_mean": q_tot_taken.mean(),
    }
    if joint_q is not None:  # Figure 1's comparison: the same control variate from an unfactorized Q
        joint_control = joint_q(state, actions) - joint_q(state.expand(k, *state.shape), sampled).mean(0)
        stats["rvar_joint"] = rvar(raw_advantages, joint_control.unsqueeze(-1), weights)
    return stats


def actor_grad_variance(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, actor, args, k=8):
    """diagnostics/grad_var: the actor gradient of eq. (10) on k disjoint sub-batches of the minibatch's chunks. Its
    Gumbel draws come from a forked generator, so logging it leaves training's random numbers as they were."""
    n_chunks = mb["valid"].shape[1]
    group = torch.arange(n_chunks, device=logits.device) % min(k, n_chunks)  # chunk -> sub-batch
    grads = []
    with torch.random.fork_rng(devices=[logits.device] if logits.is_cuda else []):
        for g in range(min(k, n_chunks)):
            sub_batch = {**mb, "valid": mb["valid"] * (group == g)}
            loss, _ = actor_loss(logits, sub_batch, q_values, mixer, value_norm, nu, dpg_scale, args)
            grads.append(
                torch.cat([x.flatten() for x in torch.autograd.grad(loss, list(actor.parameters()), retain_graph=True)])
            )
    return grad_variance(torch.stack(grads))


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: argument checks, per-map presets, seeds, checkpoints, --resume, preemption (Slurm's SIGTERM, Ctrl-C's SIGINT)
# ---------------------------------------------------------------------------------------------------------------------
def fail(message: str) -> None:
    """Bad input gets one line naming the flag and what it accepts, and exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def require(module: str, install: str, flag: str):
    """Imports an optional package, or stops with one line saying which flag needs it and how to install it."""
    try:
        return __import__(module)
    except ImportError:
        fail(f"{flag} needs {module}: {install}")


def check_args(args: Args) -> None:
    """Bad input stops the run before anything is written, with one line naming the flag (fail)."""
    rollout, n_chunks = args.num_envs * args.num_steps, args.num_envs * -(-args.num_steps // max(args.chunk_len, 1))
    at_least_1 = ("num_envs", "num_steps", "chunk_len", "torch_threads", "eval_episodes")
    short = f"--total-timesteps ({args.total_timesteps}) is smaller than one rollout (--num-envs x --num-steps = {rollout})"
    minibatches = f"--num-minibatches must be in [1, {n_chunks}] (the number of training chunks), got {args.num_minibatches}"
    checks = [  # (the flags are valid, what they accept); the first that fails stops the run
        (args.map in SMAC_EPISODE_LIMITS, f"--map must be a SMAC map ({', '.join(SMAC_EPISODE_LIMITS)}), got {args.map!r}"),
        (args.env_backend in ("auto", "sc2", "smax"), f"--env-backend must be auto, sc2 or smax, got {args.env_backend!r}"),
        (args.mixer in ("qmix", "vdn"), f"--mixer must be qmix or vdn, got {args.mixer!r}"),
        (args.dpg_scale in ("raw", "advantage"), f"--dpg-scale must be raw or advantage, got {args.dpg_scale!r}"),
        (args.nu_warmup is None or args.nu_warmup >= 0, f"--nu-warmup must be >= 0 env steps (0: none), got {args.nu_warmup}"),
        (args.nu is None or 0.0 <= args.nu <= 1.0, f"--nu must be in [0, 1], got {args.nu}"),
        *[(getattr(args, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}") for n in at_least_1],
        (args.update_epochs is None or args.update_epochs >= 1, f"--update-epochs must be >= 1, got {args.update_epochs}"),
        (args.eval_only is not None or args.total_timesteps >= rollout, short),
        (args.num_minibatches is None or 1 <= args.num_minibatches <= n_chunks, minibatches),
        (args.checkpoint_interval >= 0, f"--checkpoint-interval must be >= 0 (0: never), got {args.checkpoint_interval}"),
        (args.eval_only is None or os.path.isfile(args.eval_only), f"--eval-only: no such file {args.eval_only!r}"),
    ]
    for valid, message in checks:
        if not valid:
            fail(message)


# Per-map presets: the paper's Table 3 by difficulty; MAPPO's per-map scripts where the paper is silent.
# Map difficulty as in MAPPO's SMAC table (Yu et al., 2022), the code base and settings MAIPG builds on.
SMAC_DIFFICULTY = {
    "easy": ["2m_vs_1z", "3m", "2s_vs_1sc", "2s3z", "3s_vs_3z", "3s_vs_4z", "so_many_baneling", "8m", "MMM", "1c3s5z",
             "bane_vs_bane"],
    "hard": ["3s_vs_5z", "2c_vs_64zg", "8m_vs_9m", "25m", "5m_vs_6m", "3s5z", "10m_vs_11m"],
    "super hard": ["MMM2", "3s5z_vs_3s6z", "27m_vs_30m", "6h_vs_8z", "corridor"],
}  # fmt: skip
TABLE3 = {
    "easy": {"update_epochs": 5, "nu": 0.4}, "hard": {"update_epochs": 10, "nu": 0.3},
    "super hard": {"update_epochs": 15, "nu": 0.3},
}  # fmt: skip
MAPPO_MAP_SCRIPTS = {  # onpolicy/scripts/train_smac_scripts/train_smac_{map}.sh
    "5m_vs_6m": {"clip_coef": 0.05}, "8m_vs_9m": {"clip_coef": 0.05}, "3s_vs_5z": {"clip_coef": 0.05, "recurrent": False},
    "3s_vs_4z": {"recurrent": False}, "corridor": {"recurrent": False}, "6h_vs_8z": {"recurrent": False},
    "MMM2": {"num_minibatches": 2},
}  # fmt: skip
PRESET_DEFAULTS = {"clip_coef": 0.2, "num_minibatches": 1, "recurrent": True}  # MAPPO's on every other map


def apply_presets(args: Args) -> dict:
    """Fills every preset-able flag left unset (None) from the map's preset. -> {flag: (value, where it came from)}"""
    difficulty = next(level for level, maps in SMAC_DIFFICULTY.items() if args.map in maps)
    presets = {name: (value, "MAPPO default") for name, value in PRESET_DEFAULTS.items()}
    presets |= {name: (value, f"Table 3, {difficulty} map") for name, value in TABLE3[difficulty].items()}
    presets |= {name: (value, f"MAPPO's {args.map} script") for name, value in MAPPO_MAP_SCRIPTS.get(args.map, {}).items()}
    given = {name for name in presets if getattr(args, name) is not None}
    for name in presets.keys() - given:
        setattr(args, name, presets[name][0])
    return {name: (getattr(args, name), "command line" if name in given else source) for name, (_, source) in presets.items()}


def env_seeds(seed: int, stream: str, num_envs: int) -> list[int]:
    """One independent seed per env: env i of a stream (train, eval or video) gets child i of that stream's child of
    np.random.SeedSequence(seed), so runs of different --seed, and the train and eval envs of one run, share no env
    stream (with seed + i, --seed 1 and --seed 2 would share all envs but one)."""
    stream_sequence = np.random.SeedSequence(seed).spawn(3)[("train", "eval", "video").index(stream)]
    return [int(child.generate_state(1)[0]) for child in stream_sequence.spawn(num_envs)]


def resumed_seeds(seeds: list[int], update: int | None) -> list[int]:
    """The env seeds of a run resumed after `update` (None: not resumed, the seeds as they are). Where an env's state
    cannot be saved (mpe2, StarCraft II, gfootball, MuJoCo), a resumed run starts new episodes: child `update` of each
    env's seed gives them a stream of their own, where the same seeds would replay the run's first episodes (the NumPy
    port and SMAX restore their generators from the checkpoint, whatever the seeds)."""
    if update is None:
        return seeds
    return [int(np.random.SeedSequence(seed, spawn_key=(update,)).generate_state(1)[0]) for seed in seeds]


MODEL_PARTS = ("actor", "critic", "agent_q", "mixer", "value_norm")  # what --save-model writes, with the args
RESUME_FLAGS = ("total_timesteps", "eval_interval", "checkpoint_interval", "track", "cuda", "torch_threads", "save_model")


def load_checkpoint(path: str, script: str) -> tuple[str, dict]:
    """--resume PATH (a checkpoint.pt or its run folder) -> (its path, its contents); one line and exit 2 if it is
    missing, unreadable (truncated) or not this script's."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        fail(f"--resume: no such checkpoint {path!r}")
    try:  # it holds generator states, which are Python objects: resume only checkpoints you wrote
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        fail(f"--resume: {path!r} is not a readable checkpoint, perhaps truncated ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        fail(f"--resume: {path!r} is not a checkpoint of {script}")
    stale = sorted(set(checkpoint.get("args", {})) ^ {field.name for field in fields(Args)})
    if stale:  # a checkpoint of an older or newer version of this script: its flags, and so its state, differ
        fail(f"--resume: {path!r} was written by another version of {script} (flags that differ: {', '.join(stale)})")
    return os.path.abspath(path), checkpoint  # absolute: its folder is the run's, wherever the checkpoint lies


def resume_args(args: Args, checkpoint: dict) -> Args:
    """The resumed run's Args: its own, but for the RESUME_FLAGS given on the command line; a flag given now that would
    change the run is refused."""
    saved = checkpoint["args"]
    given = {token[2:].split("=")[0].replace("-", "_") for token in sys.argv[1:] if token.startswith("--")}
    given |= {name[3:] for name in given if name.startswith("no_")}  # --no-recurrent sets recurrent
    for name in sorted(given & saved.keys() - {*RESUME_FLAGS, "resume"}):
        if getattr(args, name) != saved[name]:
            allowed = ", ".join(f"--{flag.replace('_', '-')}" for flag in RESUME_FLAGS)
            fail(f"--{name.replace('_', '-')} cannot change on --resume (the run has {saved[name]!r}); only {allowed} can")
    keep = given & set(RESUME_FLAGS)  # a flag not given keeps the run's value
    return Args(**{**saved, **{name: getattr(args, name) for name in sorted(keep)}, "resume": args.resume})


def rng_states(generators: dict) -> dict:
    """Every random generator in use: Python's, NumPy's, torch's (CPU and CUDA) and the named torch.Generators."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}
    return {**states, **{name: generator.get_state() for name, generator in generators.items()}}


def set_rng_states(states: dict, generators: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, generator in generators.items():  # one whose device changed (--cuda) keeps its fresh seed
        if states[name].numel() == generator.get_state().numel():
            generator.set_state(states[name])


def save_atomically(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


class Preemption:
    """SIGTERM (Slurm's preemption) or SIGINT (Ctrl-C): the first makes the loop checkpoint at the end of the current
    update and stop. A second SIGINT stops at once; a second SIGTERM does not, as Slurm may send it to the script both
    directly and through the batch shell."""

    def __init__(self):
        self.signal_name = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise SystemExit("second SIGINT: stopping now, without a checkpoint")
        self.signal_name = self.signal_name or signal.Signals(signum).name


def evaluate_saved_model(args: Args, device: torch.device) -> None:
    """--eval-only: --eval-episodes greedy episodes of a model saved by --save-model, on the backend it was trained on
    unless --env-backend names one (observation sizes differ between backends); prints the result and exits."""
    try:  # a checkpoint.pt holds generator states, which weights_only refuses: it is for --resume
        model = torch.load(args.eval_only, map_location=device, weights_only=True)
    except Exception as error:
        fail(f"--eval-only: {args.eval_only!r} is not a model saved by --save-model ({type(error).__name__})")
    backend = model["args"]["env_backend"] if args.env_backend == "auto" else args.env_backend
    known = {field.name for field in fields(Args)}  # a model saved by an older version may hold flags since removed
    saved = Args(**{**{name: value for name, value in model["args"].items() if name in known}, "env_backend": backend})
    envs = make_envs(saved, resolve_backend(saved), env_seeds(args.seed, "eval", min(saved.num_envs, args.eval_episodes)))
    actor = Actor(envs.obs_dim + envs.num_agents, envs.n_actions, saved.hidden_dim, saved.recurrent).to(device)
    actor.load_state_dict(model["actor"])
    returns, wins = evaluate(actor, envs, args.eval_episodes, saved.hidden_dim, device)
    envs.close()
    mean_std = f"{returns.mean():.2f} +- {returns.std():.2f}"
    print(f"{args.eval_only}: {saved.map}, {len(returns)} greedy episodes, win rate {wins.mean():.3f}, return {mean_std}")
    sys.exit(0)


def make_writer(args, run_name: str, run_dir: str, checkpoint: dict | None) -> SummaryWriter:
    """The run's TensorBoard writer (synced to Weights and Biases with --track). A resumed run drops what the killed
    process logged after its checkpoint (purge_step), then logs on."""
    if args.track:
        wandb = require("wandb", "pip install wandb", "--track")
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    if not checkpoint:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()]),
        )
    return writer


def restore_checkpoint(checkpoint: dict, stateful: dict, generators: dict, envs, eval_envs, carried: dict, episodes):
    """--resume: networks, optimisers, generators and (SMAX) envs, carried rollout slot and running episodes as at the
    end of the checkpoint's update. episodes: (returns, lengths) -> (the progress line's values, episodes)"""
    for name, module in stateful.items():
        module.load_state_dict(checkpoint[name])
    set_rng_states(checkpoint["rng"], generators)
    if checkpoint["envs"] is None:
        print("--resume: StarCraft II cannot be saved, so its episodes start afresh (SMAX's continue)")
        return checkpoint["progress"], episodes
    envs.load_state_dict(checkpoint["envs"])
    if eval_envs is not None and checkpoint["eval_envs"] is not None:  # --eval-interval may have turned them on
        eval_envs.load_state_dict(checkpoint["eval_envs"])
    for name, buffer in carried.items():
        buffer[0] = checkpoint["carried"][name]
    return checkpoint["progress"], (checkpoint["episode_returns"], checkpoint["episode_lengths"])


def save_checkpoint(path: str, args: Args, run: dict, stateful: dict, generators: dict, envs, eval_envs, carried: dict):
    """The whole training state, written atomically, for restore_checkpoint; run: the loop's counters and episodes."""
    state = {"script": os.path.basename(__file__), "args": asdict(args), **run, "rng": rng_states(generators)}
    state |= {name: module.state_dict() for name, module in stateful.items()}
    # StarCraft II cannot be saved: None, and a resumed run starts its episodes afresh
    state["envs"] = envs.state_dict() if isinstance(envs, SmaxEnvs) else None
    state["eval_envs"] = eval_envs.state_dict() if isinstance(eval_envs, SmaxEnvs) else None
    state["carried"] = {name: buffer[0].clone().cpu() for name, buffer in carried.items()}  # a view would save it all
    save_atomically(state, path)


def stop_if_not_finite(losses: dict, update: int) -> None:
    """A loss that is NaN or infinite stops the run, naming the update and the loss."""
    if not torch.isfinite(torch.stack(list(losses.values()))).all():
        bad = next(name for name, value in losses.items() if not torch.isfinite(value))
        sys.exit(f"update {update}: losses/{bad} is {losses[bad].item()}; stopping (try a smaller --learning-rate)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume is not None:
        args.resume, checkpoint = load_checkpoint(args.resume, os.path.basename(__file__))
        args = resume_args(args, checkpoint)
    check_args(args)
    presets = checkpoint["presets"] if checkpoint else apply_presets(args)  # a resumed run's args hold them resolved
    args.batch_size = args.num_envs * args.num_steps
    args.num_updates = args.total_timesteps // args.batch_size
    if args.nu_warmup is None:  # resolved once: a resumed run keeps it whatever its --total-timesteps
        args.nu_warmup = args.total_timesteps // 5

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_only is not None:
        evaluate_saved_model(args, device)  # and exit

    # a resumed run keeps its backend (which auto might not pick again), its name and its folder
    backend = resolve_backend(replace(args, env_backend=checkpoint["backend"]) if checkpoint else args)
    run_name = checkpoint["run_name"] if checkpoint else f"{args.map}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if checkpoint else f"runs/{run_name}"
    writer = make_writer(args, run_name, run_dir, checkpoint)
    if not checkpoint:
        table = "\n".join(f"|{name}|{value}|{source}|" for name, (value, source) in presets.items())
        writer.add_text("presets", "|flag|value|from|\n|-|-|-|\n" + table)
    print(f"{args.map} ({backend}): " + ", ".join(f"{name} {value} ({source})" for name, (value, source) in presets.items()))

    # env setup: sizes come from the env (SMAC and SMAX observe differently); StarCraft II starts afresh on --resume
    resumed_after = checkpoint["update"] if checkpoint else None
    envs = make_envs(args, backend, resumed_seeds(env_seeds(args.seed, "train", args.num_envs), resumed_after))
    eval_seeds = resumed_seeds(env_seeds(args.seed, "eval", args.num_envs), resumed_after)
    eval_envs = make_envs(args, backend, eval_seeds) if args.eval_interval > 0 else None
    E, N, A, H, T = args.num_envs, envs.num_agents, envs.n_actions, args.hidden_dim, args.num_steps
    obs_dim, state_dim = envs.obs_dim, envs.state_dim

    # networks and their three optimisers (App. D)
    actor = Actor(obs_dim + N, A, H, args.recurrent).to(device)
    critic = Critic(state_dim + obs_dim + N, H, args.recurrent).to(device)
    # The Q branch draws its initial weights from its own random stream, so that everything else (actor, V, rollouts)
    # sees the random numbers MAPPO would see: with nu = 0 a run is MAPPO's run, seed for seed, whatever the mixer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        agent_q = AgentQ(state_dim + obs_dim + N, A, H, args.recurrent).to(device)
        mixer = (QMixer(N, state_dim) if args.mixer == "qmix" else VDNMixer()).to(device)
    target_agent_q, target_mixer = copy.deepcopy(agent_q), copy.deepcopy(mixer)  # psi' = psi, omega' = omega
    value_norm = ValueNorm().to(device)  # of V's targets; Q_tot learns in its units too (q_loss)
    q_params = list(agent_q.parameters()) + list(mixer.parameters())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=1e-5)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, eps=1e-5)
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, eps=1e-5)
    generators = {"diagnostics": torch.Generator(device=device).manual_seed(args.seed + 2)}  # keeps MAPPO's stream as is
    # what a checkpoint saves and --resume restores, besides generators, envs and the carried-over rollout slot
    stateful = {"actor": actor, "critic": critic, "agent_q": agent_q, "mixer": mixer, "target_agent_q": target_agent_q}
    stateful |= {"target_mixer": target_mixer, "value_norm": value_norm, "actor_optimizer": actor_optimizer}
    stateful |= {"critic_optimizer": critic_optimizer, "q_optimizer": q_optimizer}

    # ALGO Logic: storage setup. Time-major; slot t+1 holds what follows step t, slot T carries over to the next rollout.
    obs = torch.zeros(T + 1, E, N, obs_dim, device=device)
    state = torch.zeros(T + 1, E, state_dim, device=device)
    avail_actions = torch.ones(T + 1, E, N, A, device=device)
    masks = torch.ones(T + 1, E, device=device)  # 0 where obs[t] starts a new episode
    active_masks = torch.ones(T + 1, E, N, device=device)  # 0 for agents dead at obs[t] (all alive at an episode start)
    actor_hidden, critic_hidden, q_hidden = (torch.zeros(T + 1, E, N, H, device=device) for _ in range(3))  # entering t
    actions = torch.zeros(T, E, N, dtype=torch.long, device=device)
    logprobs, rollout_logits = torch.zeros(T, E, N, device=device), torch.zeros(T, E, N, A, device=device)
    rewards, values = torch.zeros(T, E, device=device), torch.zeros(T + 1, E, N, device=device)  # team rewards, V normalised
    carried = {"obs": obs, "state": state, "avail_actions": avail_actions, "masks": masks, "active_masks": active_masks}
    carried |= {"actor_hidden": actor_hidden, "critic_hidden": critic_hidden, "q_hidden": q_hidden}

    def store(t, env_step):
        """Writes what the envs returned (obs, state, avail_actions, alive) into slot t of the buffers."""
        for buffer, x in zip((obs, state, avail_actions, active_masks), env_step[:4], strict=True):
            buffer[t] = torch.as_tensor(x, dtype=torch.float32, device=device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_update, env_time, start_time, last_print = 0, 1, 0.0, time.time(), 0.0
    store(0, envs.reset())
    masks[0] = 0.0
    episode_returns, episode_lengths = np.zeros(E), np.zeros(E, dtype=int)
    finished_returns, finished_lengths, finished_wins = [], [], []  # emptied when logged, at the end of every update
    last_return, last_win_rate, eval_win_rate = float("nan"), float("nan"), float("nan")
    if checkpoint:  # --resume: everything as it was at the end of the checkpoint's update
        global_step, start_update = checkpoint["global_step"], checkpoint["update"] + 1
        (last_return, last_win_rate, eval_win_rate), (episode_returns, episode_lengths) = restore_checkpoint(
            checkpoint, stateful, generators, envs, eval_envs, carried, (episode_returns, episode_lengths)
        )
    start_step, preemption, checkpoint_path = global_step, Preemption(), os.path.join(run_dir, "checkpoint.pt")

    for update in range(start_update, args.num_updates + 1):
        nu = nu_at(global_step, args.nu, args.nu_warmup)  # the nu in force for this update
        # ROLLOUT: num_steps steps of all envs with the stochastic policy pi (the behaviour policy)
        for step in range(T):
            global_step += E
            agent_masks = masks[step : step + 1].unsqueeze(-1).expand(1, E, N)  # [1, E, N]
            with torch.no_grad():
                # ALGO LOGIC: action logic. Unavailable actions have logit -1e10: a dead agent can only no-op.
                logits, actor_hidden[step + 1] = actor(
                    actor_input(obs[step : step + 1]), actor_hidden[step], agent_masks, avail_actions[step : step + 1]
                )
                if not torch.isfinite(logits).all():  # the last minibatch of the previous update diverged
                    sys.exit(f"update {update}: the actor's logits are not finite; stopping (try a smaller --learning-rate)")
                dist = Categorical(logits=logits[0])
                actions[step] = dist.sample()
                logprobs[step], rollout_logits[step] = dist.log_prob(actions[step]), logits[0]
                critic_in = critic_input(obs[step : step + 1], state[step : step + 1], active_masks[step : step + 1])
                values[step : step + 1], critic_hidden[step + 1] = critic(critic_in, critic_hidden[step], agent_masks)
                _, q_hidden[step + 1] = agent_q(critic_in, q_hidden[step], agent_masks)

            # TRY NOT TO MODIFY: execute the game and log data.
            env_start = time.time()
            env_step = envs.step(actions[step].cpu().numpy())
            env_time += time.time() - env_start
            store(step + 1, env_step)
            rewards[step] = torch.as_tensor(env_step.rewards, device=device)
            # the map's episode limit is treated as termination, as MAPPO does: masks cut the bootstrap there
            dones = env_step.dones
            masks[step + 1] = torch.as_tensor(1.0 - dones, device=device)
            episode_returns += env_step.rewards
            episode_lengths += 1
            if dones.any():
                finished_returns += episode_returns[dones].tolist()
                finished_lengths += episode_lengths[dones].tolist()
                finished_wins += env_step.won[dones].tolist()
                episode_returns[dones], episode_lengths[dones] = 0.0, 0

        # TARGETS: GAE for the actor and V (MAPPO), gated TD(lambda) for Q_tot (Algorithm 1, lines 9-11)
        agent_masks = masks.unsqueeze(-1).expand(T + 1, E, N)  # [T+1, E, N]
        with torch.no_grad():
            critic_in = critic_input(obs, state, active_masks)  # [T+1, E, N, S + D + N]
            values[T] = critic(critic_in[T:], critic_hidden[T], agent_masks[T:])[0][0]
            values_raw = value_norm.denormalize(values)
            raw_advantages = gae(rewards, values_raw, masks, args.gamma, args.gae_lambda)  # [T, E, N]
            returns = raw_advantages + values_raw[:T]
            active = active_masks[:T]
            advantages, adv_std = normalize_advantages(raw_advantages, active)
            dpg_scale = adv_std if args.dpg_scale == "advantage" else 1.0  # L_dpg's divisor (--dpg-scale)

            # Qhat'_t at the actions taken, and at the greedy mu(o_T) for the bootstrap at the segment end. The target
            # network starts from the online Q's stored hidden state (stale, as MAPPO's chunk starts are).
            target_q_values = target_agent_q(critic_in, q_hidden[0], agent_masks)[0]  # [T+1, E, N, A]
            greedy_last = actor(actor_input(obs[T:]), actor_hidden[T], agent_masks[T:], avail_actions[T:])[0][0].argmax(-1)
            target_actions = torch.cat([actions, greedy_last[None]])  # [T+1, E, N]
            target_agent_qs = target_q_values.gather(-1, target_actions.unsqueeze(-1)).squeeze(-1)
            q_tot_target = value_norm.denormalize(target_mixer(target_agent_qs, state))  # [T+1, E], reward units
            q_returns = td_lambda_targets(rewards, q_tot_target, masks, args.gamma, args.td_lambda)

            # DIAGNOSTICS of the rollout: RVar (Figure 1) and how much of it any Q could remove, Q's fit, the mixer
            q_values_online = agent_q(critic_in[:T], q_hidden[0], agent_masks[:T])[0]  # [T, E, N, A]
            probs = rollout_logits.softmax(-1)
            mc_returns = td_lambda_targets(rewards, q_tot_target, masks, args.gamma, 1.0)  # lambda = 1: Monte Carlo
            diagnostics = rollout_diagnostics(
                raw_advantages, active, q_values_online, actions, probs, avail_actions[:T], state[:T], mixer, value_norm,
                generators["diagnostics"], None, (q_returns, mc_returns)
            )  # fmt: skip

        # CHUNKS (Algorithm 1, line 12): --chunk-len steps of all agents of one env, from the hidden states stored in the
        # rollout (line 20). Padding has valid = 0; masks are padded with 1 so that the GRU stays fused.
        rollout = {"obs": obs[:T], "state": state[:T], "avail_actions": avail_actions[:T], "masks": masks[:T]}
        rollout |= {"active_masks": active, "actions": actions, "logprobs": logprobs, "advantages": advantages}
        rollout |= {"returns": returns, "values": values[:T], "q_returns": q_returns, "valid": torch.ones(T, E, device=device)}
        pad_values = {"masks": 1.0, "avail_actions": 1.0}
        batch = {name: to_chunks(x, args.chunk_len, pad_values.get(name, 0.0)) for name, x in rollout.items()}
        hidden = {"actor": actor_hidden, "critic": critic_hidden, "q": q_hidden}
        start_hidden = {name: h[0 : T : args.chunk_len].flatten(0, 1) for name, h in hidden.items()}  # entering each chunk

        # OPTIMIZE (line 23): actor (eq. (10)), V (MAPPO) and Q + mixer (TD(lambda)), each with its own Adam, per minibatch
        n_chunks = -(-T // args.chunk_len) * E
        stats, grad_var, dpg_grad_ratio = {}, None, torch.zeros(())
        for _epoch in range(args.update_epochs):
            for mb_chunks in torch.randperm(n_chunks, device=device).tensor_split(args.num_minibatches):
                mb = {name: x[:, mb_chunks] for name, x in batch.items()}
                mb_masks = mb["masks"].unsqueeze(-1).expand(-1, -1, N)  # [L, B, N]
                mb_critic_in = critic_input(mb["obs"], mb["state"], mb["active_masks"])
                logits = actor(actor_input(mb["obs"]), start_hidden["actor"][mb_chunks], mb_masks, mb["avail_actions"])[0]
                q_values = agent_q(mb_critic_in, start_hidden["q"][mb_chunks], mb_masks)[0]  # [L, B, N, A]
                new_values = critic(mb_critic_in, start_hidden["critic"][mb_chunks], mb_masks)[0]  # [L, B, N]

                loss, parts = actor_loss(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, args)
                first_minibatch = not stats
                if first_minibatch and nu > 0:
                    actor_params = list(actor.parameters())
                    dpg_grad_ratio = grad_norm_ratio(nu * parts["dpg_loss"], (1 - nu) * parts["policy_loss"], actor_params)
                if first_minibatch and args.log_grad_var:
                    grad_var = actor_grad_variance(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, actor, args)
                value_norm.update(mb["returns"][mb["valid"].bool()])  # MAPPO updates the statistics on every minibatch
                # MAPPO's SMAC scripts pass --use_value_active_masks, which turns value active masking OFF: dead
                # agents' values are still regressed (onto the team's returns). Kept here; the policy loss is masked.
                weights = mb["valid"].unsqueeze(-1).expand(-1, -1, N)
                normalized_returns = value_norm.normalize(mb["returns"])
                v_loss = value_loss(new_values, mb["values"], normalized_returns, weights, args.clip_coef, args.huber_delta)
                q_tot = mixer(q_values.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1), mb["state"])  # [L, B]
                q_tot_loss = q_loss(q_tot, mb["q_returns"], mb["valid"], value_norm)
                losses = {"policy_loss": parts["policy_loss"], "dpg_loss": parts["dpg_loss"]}
                stop_if_not_finite({**losses, "value_loss": v_loss, "q_loss": q_tot_loss}, update)

                for optimizer, module_loss, params in [
                    (actor_optimizer, loss, actor.parameters()),
                    (critic_optimizer, v_loss, critic.parameters()),
                    (q_optimizer, q_tot_loss, q_params),
                ]:
                    optimizer.zero_grad()
                    module_loss.backward()
                    nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                soft_update(target_agent_q, agent_q, args.target_tau)  # after every Q step (Algorithm 1, line 25)
                soft_update(target_mixer, mixer, args.target_tau)

                for name, value in {**parts, "value_loss": v_loss, "q_loss": q_tot_loss}.items():
                    stats[name] = stats.get(name, 0.0) + value.detach() / (args.update_epochs * args.num_minibatches)

        # carry the last slot over: episodes continue across updates
        for buffer in carried.values():
            buffer[0] = buffer[T]

        # LOGGING. TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        explained_var = 1 - weighted_var(returns - values_raw[:T], active) / weighted_var(returns, active)
        scalars = {"charts/SPS": sps, "charts/learning_rate": actor_optimizer.param_groups[0]["lr"], "charts/nu": nu}
        scalars |= {f"losses/{name}": value for name, value in {**stats, "explained_variance": explained_var}.items()}
        scalars["charts/q_tot_mean"] = diagnostics.pop("q_tot_mean")
        diagnostics |= {"dpg_grad_ratio": dpg_grad_ratio} | ({} if grad_var is None else {"grad_var": grad_var})
        scalars |= {f"diagnostics/{name}": value for name, value in diagnostics.items()}
        if finished_returns:
            last_return, last_win_rate = np.mean(finished_returns), np.mean(finished_wins)  # training episodes finished
            scalars |= {"charts/episodic_return": last_return, "charts/episodic_length": np.mean(finished_lengths)}
            scalars["charts/win_rate"] = last_win_rate
            finished_returns, finished_lengths, finished_wins = [], [], []
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), global_step)

        # EVALUATE: greedy episodes with fresh hidden states on separate envs
        if args.eval_interval > 0 and (update % args.eval_interval == 0 or update == args.num_updates):
            eval_returns, eval_wins = evaluate(actor, eval_envs, args.eval_episodes, H, device)
            eval_win_rate = eval_wins.mean()
            writer.add_scalar("eval/win_rate", eval_win_rate, global_step)
            writer.add_scalar("eval/episodic_return", eval_returns.mean(), global_step)

        if time.time() - last_print > 10 or update == args.num_updates:
            last_print = time.time()
            progress = f"update {update}/{args.num_updates} | step {global_step} | SPS {sps} | return {last_return:.2f}"
            rates = f"win rate {last_win_rate:.2f} | eval win rate {eval_win_rate:.2f}"
            print(f"{progress} | {rates} | rvar {diagnostics['rvar'].item():.3f}", flush=True)

        # CHECKPOINT: the whole training state, every --checkpoint-interval updates and when a signal asks to stop
        if preemption.signal_name or (args.checkpoint_interval > 0 and update % args.checkpoint_interval == 0):
            run = {"backend": backend, "presets": presets, "run_name": run_name, "update": update, "global_step": global_step}
            run |= {"progress": (last_return, last_win_rate, eval_win_rate)}
            run |= {"episode_returns": episode_returns, "episode_lengths": episode_lengths}
            save_checkpoint(checkpoint_path, args, run, stateful, generators, envs, eval_envs, carried)
            if preemption.signal_name:
                print(f"{preemption.signal_name}: stopped after update {update}; continue with --resume {checkpoint_path}")
                break

    if preemption.signal_name is None:  # a preempted run is not complete: no summary, no model
        wall = time.time() - start_time
        sps = int((global_step - start_step) / wall)
        print(f"done: {global_step} env steps in {wall:.0f} s, {sps} SPS; env stepping took {env_time / wall:.0%} of the time")
        if args.save_model:  # the backend it ran on, for --eval-only
            model_path = os.path.join(run_dir, f"{args.exp_name}.pt")
            model = {name: stateful[name].state_dict() for name in MODEL_PARTS}
            save_atomically({"args": {**asdict(args), "env_backend": backend}, **model}, model_path)
            print(f"model saved to {model_path}")
    for closing in (envs, eval_envs, writer):
        if closing is not None:
            closing.close()
