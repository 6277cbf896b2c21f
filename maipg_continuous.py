"""MAIPG with Gaussian policies on Multi-Agent MuJoCo (HalfCheetah, Ant, Walker2d, Hopper, Humanoid, ...).

Multi-Agent Interpolated Policy Gradients ("MAIPG", see the paper's eq. (10) and Algorithm 1) is MAPPO plus one
deterministic, low-variance term: the actor minimises

    (1 - nu) * L_clip  +  nu * L_dpg  -  c_ent * H,      L_dpg = -Q_tot(s, mu(o)) / N,

where L_clip is MAPPO's clipped surrogate on GAE advantages (a mean over the N agents, hence L_dpg's 1 / N: eq. (10)
weighs the two terms (1 - nu) : nu per agent), Q_tot is a factorized Q-function (per-agent Q_i mixed by QMIX or VDN)
learned with TD(lambda), and mu is the deterministic policy: for continuous actions the mean of the Gaussian pi_i
(section 3.2), so L_dpg's gradient flows through the mean as in DDPG. nu trades bias for variance: nu = 0 is exactly
MAPPO, larger nu leans on the learned Q_tot. The paper reports no continuous-control setting: every hyper-parameter
below that differs from MAPPO's defaults is our choice.

    python maipg_continuous.py --env HalfCheetah --agent-conf 2x3              # our default setting, nu = 0.01
    python maipg_continuous.py --env Humanoid --agent-conf "9|8" --nu 0         # MAPPO on the same code
    python maipg_continuous.py --help                                           # every flag, with its meaning

Multi-Agent MuJoCo comes from `pip install gymnasium-robotics==1.4.2 mujoco==4.0.0` (pin mujoco: some robots'
trajectories differ between mujoco 3.x and 4.x). It writes MUJOCO_LOG.TXT into the working directory.
"""

import copy
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal
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
    capture_video: bool = False
    """if toggled, one evaluation episode with mu is rendered to a GIF under videos/ (MUJOCO_GL=egl by default, or osmesa)"""
    save_model: bool = False
    """if toggled, the trained model is saved to runs/{run_name}/{exp_name}.pt"""
    eval_only: str | None = None
    """path of a model saved with --save-model: evaluate it (--eval-episodes episodes) instead of training"""
    checkpoint_interval: int = 200
    """save runs/{run_name}/checkpoint.pt every this many updates (200: ~11 min; 0: never) and on SIGTERM or SIGINT"""
    resume: str | None = None
    """a checkpoint.pt or its run folder: continue that run there with its own flags (the envs' episodes start afresh);
    only --total-timesteps, --eval-interval, --checkpoint-interval, --track, --cuda, --torch-threads, --save-model can"""

    # Environment
    env: str = "HalfCheetah"
    """the Multi-Agent MuJoCo robot: HalfCheetah, Ant, Walker2d, Hopper or Humanoid"""
    agent_conf: str = "2x3"
    """the joints' split among agents: HalfCheetah 2x3 or 6x1, Ant 2x4, 2x4d or 4x2, Walker2d 2x3, Hopper 3x1, Humanoid 9|8"""
    max_episode_steps: int = 1000
    """the episode's time limit in env steps (the benchmark's: 1000; all but HalfCheetah also end when they fall)"""
    total_timesteps: int = 10_000_000
    """total env steps of training (one step of one env counts once, whatever the number of agents)"""
    num_envs: int = 8
    """the number of parallel envs ("rollout threads")"""
    num_steps: int = 1000
    """the rollout length per env between two updates (not the episode length; episodes continue across updates)"""
    eval_interval: int = 25
    """evaluate every this many updates (0: never)"""
    eval_episodes: int = 10
    """the number of evaluation episodes, run with mu (the Gaussian mean)"""

    # Algorithm. MAPPO's values; the paper gives none for continuous actions, so the learning rate, the rollout size
    # (8 x 1000), the epochs (5), the minibatches (1) and nu are our choice.
    nu: float = 0.01
    """the interpolation weight of eq. (10) in [0, 1]: 0 is MAPPO, 1 is the factorized deterministic gradient only"""
    mixer: str = "qmix"
    """how Q_tot is factorized: qmix (monotonic hypernetwork mixer) or vdn (sum of the Q_i)"""
    dpg_scale: str = "raw"
    """raw: L_dpg in reward units; advantage: L_dpg / the raw advantages' std (what normalises A), eq. (10)'s ratio"""
    nu_warmup: DisallowNone[int | None] = None
    """env steps over which nu rises from 0 to --nu, so Q_hat fits first (unset: --total-timesteps / 5, fixed; 0: none)"""
    learning_rate: float = 5e-4
    """the learning rate of the actor, V and Q+mixer Adam optimisers"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of GAE (advantages for L_clip)"""
    td_lambda: float = 0.8
    """the lambda of the TD(lambda) targets of Q_tot"""
    clip_coef: float = 0.2
    """the PPO clip of the ratio, also used to clip the value updates"""
    update_epochs: int = 15
    """the number of PPO epochs per update (15, as HARL's tuned MAPPO; at 5, PPO's clip was almost never reached)"""
    num_minibatches: int = 4
    """the number of minibatches per epoch (4: 60 optimiser steps per 8,000 env steps)"""
    chunk_len: int = 10
    """the length (steps) of the recurrent training chunks, which start from the hidden states stored in the rollout"""
    target_tau: float = 0.01
    """the soft-update rate of the target Q-networks and mixer, applied after every Q optimiser step"""
    log_std_init: float = -1.0
    """the Gaussian policy's initial log-std (-1: std 0.37; MAPPO's 0, std 1, starts near-random on actions in [-1, 1])"""
    ent_coef: float = 0.01
    """the coefficient of the entropy bonus"""
    max_grad_norm: float = 10.0
    """the maximum gradient norm of each of the three optimisers"""
    huber_delta: float = 10.0
    """the delta of the Huber value loss (on normalised values)"""
    hidden_dim: int = 64
    """the width of every trunk (actor, V, Q)"""
    recurrent: bool = True
    """if toggled off (--no-recurrent), the trunks have no GRU (MAPPO's MLP variant)"""
    log_grad_var: bool = False
    """if toggled, log diagnostics/grad_var: the actor gradient's spread over 8 sub-batches (about +10% update time)"""

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
    """pi_theta(a_i | o_i, i), shared by all agents: a Gaussian with a state-dependent mean and a state-independent
    log-std (MAPPO's DiagGaussian), no tanh. Padded action dimensions have mean 0 and are masked everywhere else."""

    def __init__(self, input_dim, act_dim, hidden_dim, recurrent, log_std_init=0.0):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = layer_init(nn.Linear(hidden_dim, act_dim), std=0.01)
        self.log_std = nn.Parameter(torch.full((act_dim,), log_std_init))

    def forward(self, x, hidden, masks, act_mask):  # -> mean [L, *batch, act_dim] (0 where padded; mu_i, section 3.2), hidden
        features, hidden = self.trunk(x, hidden, masks)
        return self.head(features) * act_mask, hidden


class Critic(nn.Module):
    """V_phi on the agent-specific critic input, in ValueNorm's normalised units."""

    def __init__(self, input_dim, hidden_dim, recurrent):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = layer_init(nn.Linear(hidden_dim, 1), std=1.0)

    def forward(self, x, hidden, masks):  # -> values [L, *batch], hidden [*batch, H]
        features, hidden = self.trunk(x, hidden, masks)
        return self.head(features).squeeze(-1), hidden


class AgentQ(nn.Module):
    """Q_psi_i(s, a_i): the critic's trunk (App. D), the action joining after the GRU: one trunk pass serves Q_i at the
    actions taken, at mu(o) and at sampled ones. Q_i sees the action the env executes, clipped to act_low, act_high
    (0 where padded): the Gaussian is unbounded, and Q_i of an unclipped action would value a move the env never makes."""

    def __init__(self, input_dim, act_dim, hidden_dim, recurrent, act_low, act_high):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = nn.Sequential(
            layer_init(nn.Linear(hidden_dim + act_dim, hidden_dim)), nn.ReLU(), layer_init(nn.Linear(hidden_dim, 1), std=1.0)
        )
        self.register_buffer("act_low", torch.as_tensor(act_low), persistent=False)  # from the env, not learned or saved
        self.register_buffer("act_high", torch.as_tensor(act_high), persistent=False)

    def forward(self, x, hidden, masks):  # -> features [L, *batch, H] (the trunk's part of Q_i), hidden [*batch, H]
        return self.trunk(x, hidden, masks)

    def executed(self, actions):  # -> what the env executes: clip(a), whose gradient is 0 outside the bounds
        return torch.clamp(actions, self.act_low, self.act_high)

    def q(self, features, actions):  # [*batch, N, H], [*batch, N, act_dim] (unclipped) -> Q_i(s, clip(a_i)) [*batch, N]
        return self.head(torch.cat([features, self.executed(actions)], -1)).squeeze(-1)


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
# The algorithm: eq. (10) and Algorithm 1
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


def time_limit_rewards(rewards, final_values, time_limits, gamma):
    """The rewards of GAE and TD(lambda): r_t + gamma * final_t where the episode hit the time limit at step t (not death:
    HARL bootstraps it on MuJoCo; masks[t+1] = 0 ends the recursion), r_t elsewhere. final_t: V(o_final) or Qhat'_tot."""
    extra_dims = (1,) * (final_values.dim() - rewards.dim())
    rewards, time_limits = rewards.view(*rewards.shape, *extra_dims), time_limits.view(*time_limits.shape, *extra_dims)
    return torch.where(time_limits.bool(), rewards + gamma * final_values, rewards)


def time_limit_gae(rewards, values, masks, final_values, time_limits, gamma, gae_lambda):
    """The shared gae on time_limit_rewards, one call per agent as each agent's V(o_final) differs. -> [T, E, N]"""
    bootstrapped = time_limit_rewards(rewards, final_values, time_limits, gamma)  # [T, E, N]
    per_agent = [gae(bootstrapped[..., i], values[..., i : i + 1], masks, gamma, gae_lambda) for i in range(values.shape[-1])]
    return torch.cat(per_agent, -1)


def normalize_advantages(raw_advantages, weights):
    """MAPPO's once-per-rollout normalisation over the active entries. -> (advantages, std), std being the raw
    advantages' std (+ 1e-5), which --dpg-scale advantage divides L_dpg by so that both terms of eq. (10) share units."""
    std = weighted_var(raw_advantages, weights).sqrt() + 1e-5
    return (raw_advantages - weighted_mean(raw_advantages, weights)) / std, std


def gaussian_log_prob_entropy(mean, log_std, actions, act_mask):
    """log pi(a | o) and the entropy of the diagonal Gaussian, summed over the real (unpadded) action dimensions."""
    dist = Normal(mean, log_std.exp().expand_as(mean), validate_args=False)  # NaNs reach the loss check
    return (dist.log_prob(actions) * act_mask).sum(-1), (dist.entropy() * act_mask).sum(-1)


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


def gaussian_dpg_loss(mu, q_features, state, agent_q, mixer, weights, value_norm):
    """L_dpg = -Q_tot(s, clip(mu(o))) / N in reward units (eq. (10); / N as L_clip is a mean over agents, so that per agent
    the terms weigh (1 - nu) : nu), mu the Gaussian mean. Q and the mixer are constants: the gradient reaches mu only."""
    frozen_head = {name: param.detach() for name, param in agent_q.head.named_parameters()}
    head_input = torch.cat([q_features.detach(), agent_q.executed(mu)], -1)
    agent_qs = torch.func.functional_call(agent_q.head, frozen_head, (head_input,))
    frozen_mixer = {name: param.detach() for name, param in mixer.named_parameters()}
    q_tot = value_norm.denormalize(torch.func.functional_call(mixer, frozen_mixer, (agent_qs.squeeze(-1), state)))
    return -weighted_mean(q_tot, weights) / mu.shape[-2]


def gaussian_actor_loss(mean, log_std, mb, q_features, agent_q, mixer, act_mask, value_norm, nu, dpg_scale, args):
    """Eq. (10) on a minibatch of chunks mb: (1 - nu) * L_clip + nu * L_dpg / dpg_scale - c_ent * H -> (loss, parts)"""
    weights = mb["valid"].unsqueeze(-1) * mb["active_masks"]  # [L, B, N]
    logprobs, entropy = gaussian_log_prob_entropy(mean, log_std, mb["actions"], act_mask)  # [L, B, N], per agent
    pg_loss, approx_kl, clipfrac = ppo_loss(logprobs, mb["logprobs"], mb["advantages"], weights, args.clip_coef)
    entropy = weighted_mean(entropy, weights)
    dpg = torch.zeros(())
    if nu > 0:  # nu = 0 skips the Q branch entirely, so the run is MAPPO's. mu: the Gaussian mean (section 3.2)
        dpg = gaussian_dpg_loss(mean, q_features, mb["state"], agent_q, mixer, mb["valid"], value_norm) / dpg_scale
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


def actor_input(obs):
    """obs [*batch, N, D] -> the agent's observation ++ its one-hot id [*batch, N, D + N]"""
    num_agents = obs.shape[-2]
    return torch.cat([obs, torch.eye(num_agents, device=obs.device).expand(*obs.shape[:-2], num_agents, num_agents)], -1)


def critic_input(obs, state):
    """MAPPO's agent-specific critic input: global state ++ own observation ++ id -> [*batch, N, S + D + N]"""
    return torch.cat([state.unsqueeze(-2).expand(*state.shape[:-1], obs.shape[-2], -1), actor_input(obs)], -1)


# ---------------------------------------------------------------------------------------------------------------------
# Environment: Multi-Agent MuJoCo as arrays [envs, agents, ...]
# ---------------------------------------------------------------------------------------------------------------------
# The robots and agent partitions this script was run on (gymnasium-robotics 1.4.2 knows a few more).
MAMUJOCO_TASKS = dict(
    HalfCheetah=("2x3", "6x1"), Ant=("2x4", "2x4d", "4x2"), Walker2d=("2x3",), Hopper=("3x1",), Humanoid=("9|8",)
)


class MaMuJoCoEnvs:
    """One Multi-Agent MuJoCo env per seed (mamujoco_v1, agent_obsk=1), stepped in a loop: gymnasium's SyncVectorEnv
    measured 1.5x slower (MuJoCo steps take ~0.1 ms), AsyncVectorEnv slower still on 2 cores. Observations and actions
    are zero-padded to the largest agent's, so one actor serves all agents (`act_mask`: 1 on the real action dimensions).
    An ended episode is reset in the same step, what it ended in returned as final_obs, final_state; one team reward."""

    def __init__(self, scenario, agent_conf, seeds, max_episode_steps, render_mode=None):
        install = "pip install gymnasium-robotics==1.4.2 mujoco==4.0.0"
        mamujoco_v1 = require("gymnasium_robotics", install, "Multi-Agent MuJoCo").mamujoco_v1
        options = {"max_episode_steps": max_episode_steps, "render_mode": render_mode, "width": 240, "height": 240}
        self.envs = [mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=1, **options) for _ in seeds]
        env = self.envs[0]
        self.agents = env.possible_agents
        self.num_envs, self.num_agents, self.reset_seeds = len(seeds), len(self.agents), list(seeds)
        self.obs_dims = [env.observation_space(agent).shape[0] for agent in self.agents]
        self.act_dims = [env.action_space(agent).shape[0] for agent in self.agents]
        self.obs_dim, self.act_dim, self.state_dim = max(self.obs_dims), max(self.act_dims), env.state().shape[0]
        self.dt = env.single_agent_env.unwrapped.dt  # simulated seconds per env step
        self.act_mask = np.zeros((self.num_agents, self.act_dim), dtype=np.float32)
        self.act_low, self.act_high = np.zeros_like(self.act_mask), np.zeros_like(self.act_mask)
        for i, agent in enumerate(self.agents):
            self.act_mask[i, : self.act_dims[i]] = 1.0
            self.act_low[i, : self.act_dims[i]] = env.action_space(agent).low
            self.act_high[i, : self.act_dims[i]] = env.action_space(agent).high

    def _pad(self, obs):  # {agent: obs} -> [agents, obs_dim], zero-padded
        padded = np.zeros((self.num_agents, self.obs_dim), dtype=np.float32)
        for i, agent in enumerate(self.agents):
            padded[i, : self.obs_dims[i]] = obs[agent]
        return padded

    def reset(self):
        """-> obs [envs, agents, obs_dim], state [envs, state_dim]. Env e is seeded with seeds[e] once, then continues."""
        seeds, self.reset_seeds = self.reset_seeds, [None] * self.num_envs
        obs = np.stack([self._pad(env.reset(seed=seed)[0]) for env, seed in zip(self.envs, seeds, strict=True)])
        return obs, np.stack([env.state() for env in self.envs]).astype(np.float32)

    def step(self, actions):
        """actions [envs, agents, act_dim] (unclipped) -> obs, state, rewards, terminated, truncated, final_obs, final_state"""
        actions = np.clip(actions, self.act_low, self.act_high)  # on the way to the env; Q_i clips alike (AgentQ)
        obs = np.zeros((self.num_envs, self.num_agents, self.obs_dim), dtype=np.float32)
        state = np.zeros((self.num_envs, self.state_dim), dtype=np.float32)
        final_obs, final_state, rewards = np.zeros_like(obs), np.zeros_like(state), np.zeros(self.num_envs, dtype=np.float32)
        terminated, truncated = np.zeros(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool)
        first = self.agents[0]  # the team reward, termination and truncation are the same for every agent
        for e, env in enumerate(self.envs):  # each agent gets its own action dimensions: the padded ones never reach the env
            obs_e, rewards_e, terminated_e, truncated_e, _ = env.step(
                {agent: actions[e, i, : self.act_dims[i]] for i, agent in enumerate(self.agents)}
            )
            rewards[e], terminated[e], truncated[e] = rewards_e[first], terminated_e[first], truncated_e[first]
            obs[e], state[e] = self._pad(obs_e), env.state()
            if terminated[e] or truncated[e]:
                final_obs[e], final_state[e] = obs[e], state[e]
                obs[e], state[e] = self._pad(env.reset()[0]), env.state()
        return obs, state, rewards, terminated, truncated, final_obs, final_state

    def render(self):
        return self.envs[0].render()

    def close(self):
        for env in self.envs:
            env.close()


def make_envs(args, seeds, render_mode=None):
    """One env per seed (see env_seeds)."""
    return MaMuJoCoEnvs(args.env, args.agent_conf, seeds, args.max_episode_steps, render_mode)


@torch.no_grad()
def evaluate(actor, envs, hidden_dim, device, frames=None, frame_every=1):
    """One episode with mu (fresh hidden states) per env -> team returns [num_envs]; renders to frames every frame_every."""
    obs = torch.as_tensor(envs.reset()[0], device=device)
    act_mask = torch.as_tensor(envs.act_mask, device=device)
    hidden = torch.zeros(envs.num_envs, envs.num_agents, hidden_dim, device=device)
    masks = torch.ones(1, envs.num_envs, envs.num_agents, device=device)
    returns, running, step = np.zeros(envs.num_envs), np.ones(envs.num_envs, dtype=bool), 0
    if frames is not None:
        frames.append(envs.render())
    while running.any():
        mean, hidden = actor(actor_input(obs)[None], hidden, masks, act_mask)
        next_obs, _, rewards, terminated, truncated, _, _ = envs.step(mean[0].cpu().numpy())
        returns += running * rewards
        running &= ~(terminated | truncated)
        obs = torch.as_tensor(next_obs, device=device)
        step += 1
        if frames is not None and running.any() and step % frame_every == 0:
            frames.append(envs.render())
    return returns


def capture_video(actor, args, seed, hidden_dim, device, path):
    """One episode with mu to a GIF at path, the same (seed's video stream) at every evaluation -> path, or None."""
    imageio = require("imageio", "pip install imageio", "--capture-video")
    envs = make_envs(args, env_seeds(seed, "video", 1), render_mode="rgb_array")
    frame_every = max(1, round(0.1 / envs.dt))  # 10 frames per simulated second: a software-rendered frame takes ~60 ms
    try:
        envs.reset()
        envs.render()  # a first frame tells whether an OpenGL backend works here
    except Exception as error:  # each backend fails its own way (mujoco.FatalError, AttributeError, ImportError)
        backend = f"MUJOCO_GL={os.environ['MUJOCO_GL']} here ({type(error).__name__})"
        install = "install libegl1 (egl) or libosmesa6 (MUJOCO_GL=osmesa)"
        print(f"--capture-video: MuJoCo cannot render with {backend}; {install}; no video", file=sys.stderr)
        envs.close()
        return None
    frames = []
    evaluate(actor, envs, hidden_dim, device, frames, frame_every)
    envs.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, duration=1000 * frame_every * envs.dt, loop=0)  # played in real time
    return path


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


def gaussian_rollout_diagnostics(
    raw_advantages, weights, q_features, actions, means, log_std, act_mask, state, agent_q, mixer, value_norm, rng, q_targets
):
    """Before the update trains on the rollout (q_targets: Q_tot's TD(lambda) and Monte Carlo targets, each [T, E]):
    rvar: Var(A - C) / Var(A), C(s, a) = Q_tot(s, a) - mean_k Q_tot(s, a^k), a^k ~ pi (section 4.1, Figure 1);
    cv_corr: corr(A, C) (1 - cv_corr^2: the lowest RVar any rescaling of C reaches); rvar_own: the RVar of agent i's part
    C_i = Q_tot(s, a) - mean_k Q_tot(s, a_i^k, a_-i) (what its likelihood-ratio term can use, eq. (12));
    q_explained_variance(_mc): Q_tot(s, a)'s explained variance of its TD(lambda) (Monte Carlo) targets;
    mixer_slope: median dQ_tot/dQ_i at the taken (clipped) actions (near 0 the mixer saturates and L_dpg does nothing);
    q_gap: median slope * (max_k Q_i(a^k) - min_k Q_i(a^k)), Q_tot's action gap in reward units (exact for VDN); q_tot_mean."""
    (T, E, N, H), k = q_features.shape, 8  # k: the actions drawn from pi per agent-step
    q_taken = agent_q.q(q_features, actions).requires_grad_()  # [T, E, N]
    with torch.enable_grad():
        q_tot_taken = mixer(q_taken, state)  # [T, E]
        (slope,) = torch.autograd.grad(q_tot_taken.sum(), q_taken)  # [T, E, N]
    q_tot_taken = value_norm.denormalize(q_tot_taken.detach())
    noise = torch.randn(k, *actions.shape, generator=rng, device=actions.device)
    sampled = (means + log_std.exp() * noise) * act_mask  # [k, T, E, N, act_dim]
    q_sampled = agent_q.q(q_features.expand(k, T, E, N, H), sampled)  # [k, T, E, N]
    control_variate = q_tot_taken - value_norm.denormalize(mixer(q_sampled, state.expand(k, *state.shape))).mean(0)
    # agent i's action replaced by its k samples, the others' kept: [k, T, E, N (agent i), N]
    own = torch.eye(N, dtype=torch.bool, device=q_taken.device)
    q_swapped = torch.where(own, q_sampled.unsqueeze(-1), q_taken.detach()[None, :, :, None, :])
    own_control = q_tot_taken.unsqueeze(-1) - value_norm.denormalize(mixer(q_swapped, state[None, :, :, None, :])).mean(0)
    q_scale = value_norm.mean_var()[1].sqrt()  # d raw Q_tot / d normalised Q_tot
    active, steps = weights.bool(), weights.amax(-1)
    return {
        "rvar": rvar(raw_advantages, control_variate.unsqueeze(-1), weights),
        "cv_corr": correlation(raw_advantages, control_variate.unsqueeze(-1).expand_as(raw_advantages), weights),
        "rvar_own": rvar(raw_advantages, own_control, weights),
        "q_explained_variance": explained_variance(q_tot_taken, q_targets[0], steps),
        "q_explained_variance_mc": explained_variance(q_tot_taken, q_targets[1], steps),
        "mixer_slope": slope[active].median(),
        "q_gap": (q_scale * slope * (q_sampled.amax(0) - q_sampled.amin(0)))[active].median(),
        "q_tot_mean": q_tot_taken.mean(),
    }


def actor_grad_variance(mean, log_std, mb, *loss_inputs, actor, args, k=8):
    """diagnostics/grad_var: the actor gradient of eq. (10) (gaussian_actor_loss's inputs) on k disjoint sub-batches of
    chunks. mu is the Gaussian mean, so its passes draw no random number: training's random numbers stay as they were."""
    n_chunks = mb["valid"].shape[1]
    group = torch.arange(n_chunks, device=mean.device) % min(k, n_chunks)  # chunk -> sub-batch
    grads = []
    for g in range(min(k, n_chunks)):
        sub_batch = {**mb, "valid": mb["valid"] * (group == g)}
        loss, _ = gaussian_actor_loss(mean, log_std, sub_batch, *loss_inputs, args)
        grads.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, list(actor.parameters()), retain_graph=True)]))
    return grad_variance(torch.stack(grads))


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: argument checks, seeds, checkpoints, --resume and preemption (SIGTERM from Slurm, SIGINT from Ctrl-C)
# ---------------------------------------------------------------------------------------------------------------------
def fail(message: str) -> None:
    """Bad input gets one line naming the flag and what it accepts, and exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args) -> None:
    confs, rollout = MAMUJOCO_TASKS.get(args.env, ()), args.num_envs * args.num_steps
    n_chunks = args.num_envs * -(-args.num_steps // max(args.chunk_len, 1))  # a --chunk-len < 1 fails first
    at_least_1 = ("max_episode_steps", "num_envs", "num_steps", "update_epochs", "chunk_len", "torch_threads")
    short = f"--total-timesteps ({args.total_timesteps}) is smaller than one rollout (--num-envs x --num-steps = {rollout})"
    minibatches = f"--num-minibatches must be in [1, {n_chunks}] (the number of training chunks), got {args.num_minibatches}"
    checks = [  # (the flags are valid, what they accept); the first that fails stops the run
        (args.env in MAMUJOCO_TASKS, f"--env must be one of {', '.join(MAMUJOCO_TASKS)}, got {args.env!r}"),
        (args.agent_conf in confs, f"--agent-conf of {args.env} must be one of {', '.join(confs)}, got {args.agent_conf!r}"),
        (args.mixer in ("qmix", "vdn"), f"--mixer must be qmix or vdn, got {args.mixer!r}"),
        (args.dpg_scale in ("raw", "advantage"), f"--dpg-scale must be raw or advantage, got {args.dpg_scale!r}"),
        (args.nu_warmup is None or args.nu_warmup >= 0, f"--nu-warmup must be >= 0 env steps (0: none), got {args.nu_warmup}"),
        (0.0 <= args.nu <= 1.0, f"--nu must be in [0, 1], got {args.nu}"),
        (-5.0 <= args.log_std_init <= 2.0, f"--log-std-init must be in [-5, 2] (std 0.007 to 7.4), got {args.log_std_init}"),
        *[(getattr(args, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}") for n in at_least_1],
        (args.eval_only is not None or args.total_timesteps >= rollout, short),
        (1 <= args.num_minibatches <= n_chunks, minibatches),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {args.eval_episodes}"),
        (args.checkpoint_interval >= 0, f"--checkpoint-interval must be >= 0 (0: never), got {args.checkpoint_interval}"),
        (args.eval_only is None or os.path.isfile(args.eval_only), f"--eval-only: no such file {args.eval_only!r}"),
    ]
    for valid, message in checks:
        if not valid:
            fail(message)


def require(module: str, install: str, flag: str):
    """Imports an optional package, or stops with one line saying which flag needs it and how to install it."""
    try:
        return __import__(module)
    except ImportError:
        fail(f"{flag} needs {module}: {install}")


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


def stop_if_not_finite(losses: dict, update: int) -> None:
    """A loss that is NaN or infinite stops the run, naming the update and the loss."""
    if not torch.isfinite(torch.stack(list(losses.values()))).all():
        bad = next(name for name, value in losses.items() if not torch.isfinite(value))
        sys.exit(f"update {update}: losses/{bad} is {losses[bad].item()}; stopping (try a smaller --learning-rate)")


def evaluate_saved_model(args: Args, device: torch.device) -> None:
    """--eval-only: a --save-model model plays --eval-episodes episodes with mu (and one to a GIF with --capture-video)."""
    try:  # a checkpoint.pt holds generator states, which weights_only refuses: it is for --resume
        model = torch.load(args.eval_only, map_location=device, weights_only=True)
    except Exception as error:
        fail(f"--eval-only: {args.eval_only!r} is not a model saved by --save-model ({type(error).__name__})")
    saved = Args(**{**model["args"], "eval_episodes": args.eval_episodes})
    envs = make_envs(saved, env_seeds(args.seed, "eval", args.eval_episodes))
    actor = Actor(envs.obs_dim + envs.num_agents, envs.act_dim, saved.hidden_dim, saved.recurrent).to(device)
    actor.load_state_dict(model["actor"])
    returns = evaluate(actor, envs, saved.hidden_dim, device)
    envs.close()
    episodes = f"{saved.env} {saved.agent_conf}, {len(returns)} episodes with mu"
    print(f"{args.eval_only}: {episodes}, return {returns.mean():.2f} +- {returns.std():.2f}")
    if args.capture_video:
        path = f"videos/{os.path.basename(args.eval_only)}.gif"
        if capture_video(actor, saved, args.seed, saved.hidden_dim, device, path) is not None:
            print("video:", path)
    sys.exit(0)


def restore_checkpoint(checkpoint: dict, stateful: dict, diagnostics_rng: torch.Generator) -> tuple[int, int, float, float]:
    """--resume: networks, optimisers, normaliser, generators -> (global_step, next update, last_return, eval_return)"""
    for name, module in stateful.items():
        module.load_state_dict(checkpoint[name])
    set_rng_states(checkpoint["rng"], {"diagnostics": diagnostics_rng})
    print("--resume: Multi-Agent MuJoCo's envs cannot be saved, so their episodes start afresh (new seeds, fresh memory)")
    return checkpoint["global_step"], checkpoint["update"] + 1, checkpoint["last_return"], checkpoint["eval_return"]


def save_checkpoint(path, args, run_name, update, global_step, stateful, diagnostics_rng, last_return, eval_return):
    """The training state (not the envs': a resumed run cannot continue the running episodes), written atomically."""
    checkpoint = {"script": os.path.basename(__file__), "args": asdict(args), "run_name": run_name, "update": update}
    checkpoint |= {"global_step": global_step, **{name: module.state_dict() for name, module in stateful.items()}}
    checkpoint |= {"rng": rng_states({"diagnostics": diagnostics_rng}), "last_return": last_return, "eval_return": eval_return}
    save_atomically(checkpoint, path)


def save_final_model(args: Args, run_dir: str, stateful: dict) -> None:
    """--save-model: the args and MODEL_PARTS, for --eval-only."""
    model_path = os.path.join(run_dir, f"{args.exp_name}.pt")
    save_atomically({"args": asdict(args), **{name: stateful[name].state_dict() for name in MODEL_PARTS}}, model_path)
    print(f"model saved to {model_path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume is not None:
        args.resume, checkpoint = load_checkpoint(args.resume, os.path.basename(__file__))
        args = resume_args(args, checkpoint)
    check_args(args)
    args.batch_size = args.num_envs * args.num_steps
    args.num_updates = args.total_timesteps // args.batch_size
    if args.nu_warmup is None:  # resolved once: a resumed run keeps it whatever its --total-timesteps
        args.nu_warmup = args.total_timesteps // 5
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; mujoco reads it once, when first imported

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_only is not None:
        evaluate_saved_model(args, device)

    run_name = f"{args.env}-{args.agent_conf.replace('|', '+')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = checkpoint["run_name"] if checkpoint else run_name
    run_dir = os.path.dirname(args.resume) if checkpoint else f"runs/{run_name}"
    writer = make_writer(args, run_name, run_dir, checkpoint)

    # env setup: the mixer's state s is MaMuJoCo's global state(); a resumed run's envs start afresh (resumed_seeds)
    resumed_after = checkpoint["update"] if checkpoint else None
    envs = make_envs(args, resumed_seeds(env_seeds(args.seed, "train", args.num_envs), resumed_after))
    eval_envs = make_envs(args, resumed_seeds(env_seeds(args.seed, "eval", args.eval_episodes), resumed_after))
    E, N, A, H, T = args.num_envs, envs.num_agents, envs.act_dim, args.hidden_dim, args.num_steps
    obs_dim, state_dim = envs.obs_dim, envs.state_dim
    act_mask = torch.as_tensor(envs.act_mask, device=device)  # [N, A]: 1 on each agent's real action dimensions

    # networks and their three optimisers (App. D)
    actor = Actor(obs_dim + N, A, H, args.recurrent, args.log_std_init).to(device)
    critic = Critic(state_dim + obs_dim + N, H, args.recurrent).to(device)
    # The Q branch draws its initial weights from its own random stream, so that everything else (actor, V, rollouts)
    # sees the random numbers MAPPO would see: with nu = 0 a run is MAPPO's run, seed for seed, whatever the mixer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        agent_q = AgentQ(state_dim + obs_dim + N, A, H, args.recurrent, envs.act_low, envs.act_high).to(device)
        mixer = (QMixer(N, state_dim) if args.mixer == "qmix" else VDNMixer()).to(device)
    target_agent_q, target_mixer = copy.deepcopy(agent_q), copy.deepcopy(mixer)  # psi' = psi, omega' = omega
    value_norm = ValueNorm().to(device)  # V's returns, and Q_tot's targets in V's units (q_loss)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=1e-5)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, eps=1e-5)
    q_params = list(agent_q.parameters()) + list(mixer.parameters())
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, eps=1e-5)
    diagnostics_rng = torch.Generator(device=device).manual_seed(args.seed + 2)  # keeps MAPPO's stream untouched
    stateful = {  # what a checkpoint saves and --resume restores, besides the generators
        **{"actor": actor, "critic": critic, "agent_q": agent_q, "mixer": mixer},
        **{"target_agent_q": target_agent_q, "target_mixer": target_mixer, "value_norm": value_norm},
        **{"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer, "q_optimizer": q_optimizer},
    }

    # ALGO Logic: storage setup. Time-major; slot t+1 holds what follows step t, slot T carries over to the next rollout.
    obs = torch.zeros(T + 1, E, N, obs_dim, device=device)
    state = torch.zeros(T + 1, E, state_dim, device=device)
    masks = torch.ones(T + 1, E, device=device)  # 0 where obs[t] starts a new episode
    active_masks = torch.ones(T + 1, E, N, device=device)  # 0 for dead agents (none in MaMuJoCo)
    actor_hidden, critic_hidden, q_hidden = torch.zeros(3, T + 1, E, N, H, device=device)  # hidden states entering step t
    actions, rollout_means = torch.zeros(2, T, E, N, A, device=device)  # pi's samples (unclipped; 0 when padded), means
    logprobs, values = torch.zeros(T, E, N, device=device), torch.zeros(T + 1, E, N, device=device)  # V normalised
    # team rewards; 1 where the episode hit the time limit at step t (not terminated); V(o_final) (normalised) and
    # Qhat'(s_final, mu(o_final)) (reward units), filled for all envs, kept by time_limit_rewards where time_limits is 1
    rewards, time_limits, final_q_tot = torch.zeros(3, T, E, device=device)
    final_values = torch.zeros(T, E, N, device=device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_update, env_time, start_time, last_print = 0, 1, 0.0, time.time(), 0.0
    next_obs, next_state = envs.reset()
    obs[0], state[0], masks[0] = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_state, device=device), 0.0
    episode_returns, episode_lengths = np.zeros(E), np.zeros(E, dtype=int)
    finished_returns, finished_lengths, last_return, eval_return = [], [], float("nan"), float("nan")
    n_windows = -(-T // args.chunk_len)  # training chunks per env: ceil(T / chunk_len)
    if checkpoint:
        global_step, start_update, last_return, eval_return = restore_checkpoint(checkpoint, stateful, diagnostics_rng)
    start_step, preemption, checkpoint_path = global_step, Preemption(), os.path.join(run_dir, "checkpoint.pt")

    for update in range(start_update, args.num_updates + 1):
        nu = nu_at(global_step, args.nu, args.nu_warmup)  # the nu in force for this update
        # ROLLOUT: num_steps steps of all envs with the stochastic policy pi (the behaviour policy)
        for buffer in (time_limits, final_values, final_q_tot):
            buffer.zero_()
        for step in range(T):
            global_step += E
            agent_masks = masks[step : step + 1].unsqueeze(-1).expand(1, E, N)  # [1, E, N]
            with torch.no_grad():
                # ALGO LOGIC: action logic
                mean, actor_hidden[step + 1] = actor(actor_input(obs[step][None]), actor_hidden[step], agent_masks, act_mask)
                rollout_means[step] = mean[0]
                actions[step] = (mean[0] + actor.log_std.exp() * torch.randn_like(mean[0])) * act_mask
                if not torch.isfinite(actions[step]).all():  # the last minibatch of the previous update diverged
                    sys.exit(f"update {update}: the actor's actions are not finite; stopping (try a smaller --learning-rate)")
                logprobs[step] = gaussian_log_prob_entropy(mean[0], actor.log_std, actions[step], act_mask)[0]
                critic_in = critic_input(obs[step : step + 1], state[step : step + 1])
                values_step, critic_hidden[step + 1] = critic(critic_in, critic_hidden[step], agent_masks)
                values[step] = values_step[0]
                _, q_hidden[step + 1] = agent_q(critic_in, q_hidden[step], agent_masks)

            # TRY NOT TO MODIFY: execute the game and log data.
            env_start = time.time()
            next_obs, next_state, team_rewards, terminated, truncated, final_obs, final_state = envs.step(
                actions[step].cpu().numpy()
            )
            env_time += time.time() - env_start
            dones = terminated | truncated
            rewards[step] = torch.as_tensor(team_rewards, device=device)
            obs[step + 1] = torch.as_tensor(next_obs, device=device)
            state[step + 1] = torch.as_tensor(next_state, device=device)
            masks[step + 1] = torch.as_tensor(1.0 - dones, device=device)  # the next obs starts a new episode
            if (truncated & ~terminated).any():
                # A time-limit end is not death: bootstrap from V and Qhat' of the final observation (HARL does so on
                # MuJoCo), evaluated with the hidden states that continue the episode. Termination does not bootstrap.
                time_limits[step] = torch.as_tensor(truncated & ~terminated, device=device)
                with torch.no_grad():
                    last_obs = torch.as_tensor(final_obs, device=device)[None]  # [1, E, N, D]
                    last_state = torch.as_tensor(final_state, device=device)[None]  # [1, E, S]
                    last_critic_in = critic_input(last_obs, last_state)
                    no_reset = torch.ones(1, E, N, device=device)
                    final_values[step] = critic(last_critic_in, critic_hidden[step + 1], no_reset)[0][0]
                    last_mu = actor(actor_input(last_obs), actor_hidden[step + 1], no_reset, act_mask)[0][0]
                    last_features = target_agent_q(last_critic_in, q_hidden[step + 1], no_reset)[0][0]
                    last_q_tot = target_mixer(target_agent_q.q(last_features, last_mu), last_state[0])
                    final_q_tot[step] = value_norm.denormalize(last_q_tot)
            episode_returns += team_rewards
            episode_lengths += 1
            if dones.any():
                finished_returns += episode_returns[dones].tolist()
                finished_lengths += episode_lengths[dones].tolist()
                episode_returns[dones], episode_lengths[dones] = 0.0, 0

        # TARGETS: GAE for the actor and V (Algorithm 1, lines 9-10, MAPPO), gated TD(lambda) for Q_tot (line 11)
        agent_masks = masks.unsqueeze(-1).expand(T + 1, E, N)  # [T+1, E, N]
        with torch.no_grad():
            critic_in = critic_input(obs, state)  # [T+1, E, N, S + D + N]
            values[T] = critic(critic_in[T:], critic_hidden[T], agent_masks[T:])[0][0]
            values_raw = value_norm.denormalize(values)
            final_values_raw = value_norm.denormalize(final_values)
            raw_advantages = time_limit_gae(
                rewards, values_raw, masks, final_values_raw, time_limits, args.gamma, args.gae_lambda
            )
            returns = raw_advantages + values_raw[:T]
            active = active_masks[:T]
            advantages, adv_std = normalize_advantages(raw_advantages, active)
            dpg_scale = adv_std if args.dpg_scale == "advantage" else 1.0  # L_dpg's divisor (--dpg-scale)

            # Qhat'_t at the actions taken, and at mu(o_T) for the bootstrap at the segment end. The target network
            # starts from the online Q's stored hidden state (stale, as MAPPO's chunk starts are).
            target_features = target_agent_q(critic_in, q_hidden[0], agent_masks)[0]  # [T+1, E, N, H]
            mu_last = actor(actor_input(obs[T:]), actor_hidden[T], agent_masks[T:], act_mask)[0][0]  # [E, N, A]
            target_agent_qs = target_agent_q.q(target_features, torch.cat([actions, mu_last[None]]))  # [T+1, E, N]
            q_tot_target = value_norm.denormalize(target_mixer(target_agent_qs, state))  # [T+1, E], reward units
            q_rewards = time_limit_rewards(rewards, final_q_tot, time_limits, args.gamma)  # [T, E]
            q_returns = td_lambda_targets(q_rewards, q_tot_target, masks, args.gamma, args.td_lambda)

            # DIAGNOSTICS of the rollout: RVar (Figure 1) and how much of it any Q could remove, Q's fit, the mixer
            q_features = agent_q(critic_in[:T], q_hidden[0], agent_masks[:T])[0]  # [T, E, N, H]
            mc_returns = td_lambda_targets(q_rewards, q_tot_target, masks, args.gamma, 1.0)  # lambda = 1: Monte Carlo
            diagnostics = gaussian_rollout_diagnostics(
                raw_advantages, active, q_features, actions, rollout_means, actor.log_std, act_mask, state[:T], agent_q,
                mixer, value_norm, diagnostics_rng, (q_returns, mc_returns)
            )  # fmt: skip

        # CHUNKS (Algorithm 1, line 12): [T, E, ...] -> [chunk_len, W * E, ...] windows of all agents of one env (Q_tot
        # needs every agent's mu at the same t). The last window is padded with valid = 0; masks are padded with 1 so
        # that the GRU stays fused.
        def to_chunks(x, pad_value=0.0):
            padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, n_windows * args.chunk_len - T), value=pad_value)
            return padded.reshape(n_windows, args.chunk_len, *x.shape[1:]).transpose(0, 1).flatten(1, 2)

        rollout = {"obs": obs[:T], "state": state[:T], "masks": masks[:T], "active_masks": active, "actions": actions}
        rollout |= {"logprobs": logprobs, "advantages": advantages, "returns": returns, "values": values[:T]}
        rollout |= {"q_returns": q_returns, "valid": torch.ones(T, E, device=device)}
        batch = {name: to_chunks(x, pad_value=1.0 if name == "masks" else 0.0) for name, x in rollout.items()}
        chunk_starts = slice(0, T, args.chunk_len)  # hidden states entering each chunk, from the rollout (line 20)
        hidden = {"actor": actor_hidden, "critic": critic_hidden, "q": q_hidden}
        start_hidden = {name: h[chunk_starts].flatten(0, 1) for name, h in hidden.items()}

        # OPTIMIZE (line 23): actor (eq. (10)), V (MAPPO) and Q + mixer (TD(lambda)), each with its own Adam, per minibatch
        stats, grad_var, dpg_grad_ratio = {}, None, torch.zeros(())
        for _epoch in range(args.update_epochs):
            for mb_chunks in torch.randperm(n_windows * E, device=device).tensor_split(args.num_minibatches):
                mb = {name: x[:, mb_chunks] for name, x in batch.items()}
                mb_masks = mb["masks"].unsqueeze(-1).expand(-1, -1, N)  # [L, B, N]
                mb_critic_in = critic_input(mb["obs"], mb["state"])
                mean = actor(actor_input(mb["obs"]), start_hidden["actor"][mb_chunks], mb_masks, act_mask)[0]
                q_features = agent_q(mb_critic_in, start_hidden["q"][mb_chunks], mb_masks)[0]  # [L, B, N, H]
                new_values = critic(mb_critic_in, start_hidden["critic"][mb_chunks], mb_masks)[0]  # [L, B, N]

                loss_inputs = (mean, actor.log_std, mb, q_features, agent_q, mixer, act_mask, value_norm, nu, dpg_scale)
                loss, parts = gaussian_actor_loss(*loss_inputs, args)
                first_minibatch = not stats
                if first_minibatch and nu > 0:
                    actor_params = list(actor.parameters())
                    dpg_grad_ratio = grad_norm_ratio(nu * parts["dpg_loss"], (1 - nu) * parts["policy_loss"], actor_params)
                if first_minibatch and args.log_grad_var:
                    grad_var = actor_grad_variance(*loss_inputs, actor=actor, args=args)
                value_norm.update(mb["returns"][mb["valid"].bool()])  # MAPPO updates the statistics on every minibatch
                weights = mb["valid"].unsqueeze(-1) * mb["active_masks"]
                v_loss = value_loss(
                    new_values, mb["values"], value_norm.normalize(mb["returns"]), weights, args.clip_coef, args.huber_delta
                )
                q_tot = mixer(agent_q.q(q_features, mb["actions"]), mb["state"])  # [L, B]
                q_tot_loss = q_loss(q_tot, mb["q_returns"], mb["valid"], value_norm)
                losses = {**parts, "value_loss": v_loss, "q_loss": q_tot_loss}
                stop_if_not_finite(losses, update)

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

                for name, value in losses.items():
                    stats[name] = stats.get(name, 0.0) + value.detach() / (args.update_epochs * args.num_minibatches)

        # carry the last slot over: episodes continue across updates
        for buffer in (obs, state, masks, active_masks, actor_hidden, critic_hidden, q_hidden):
            buffer[0] = buffer[T]

        # LOGGING. TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        explained_var = 1 - weighted_var(returns - values_raw[:T], active) / weighted_var(returns, active)
        logged = {"charts/SPS": sps, "charts/learning_rate": actor_optimizer.param_groups[0]["lr"], "charts/nu": nu}
        logged |= {f"losses/{name}": value for name, value in {**stats, "explained_variance": explained_var}.items()}
        logged |= {"charts/q_tot_mean": diagnostics.pop("q_tot_mean")}
        logged |= {f"diagnostics/{name}": value for name, value in {**diagnostics, "dpg_grad_ratio": dpg_grad_ratio}.items()}
        if grad_var is not None:
            logged["diagnostics/grad_var"] = grad_var
        if finished_returns:
            last_return = np.mean(finished_returns)
            logged |= {"charts/episodic_return": last_return, "charts/episodic_length": np.mean(finished_lengths)}
            finished_returns, finished_lengths = [], []
        for tag, value in logged.items():
            writer.add_scalar(tag, float(value), global_step)

        # EVALUATE: episodes with mu (the Gaussian mean) and fresh hidden states on separate envs
        if args.eval_interval > 0 and (update % args.eval_interval == 0 or update == args.num_updates):
            eval_return = evaluate(actor, eval_envs, H, device).mean()
            writer.add_scalar("eval/episodic_return", eval_return, global_step)
            if args.capture_video:
                video = capture_video(actor, args, args.seed, H, device, f"videos/{run_name}/update_{update}.gif")
                args.capture_video = video is not None  # without OpenGL, say so once, not at every evaluation

        if time.time() - last_print > 10 or update == args.num_updates:
            last_print = time.time()
            progress = f"update {update}/{args.num_updates} | step {global_step} | SPS {sps} | return {last_return:.2f}"
            print(f"{progress} | eval {eval_return:.2f} | rvar {diagnostics['rvar'].item():.3f}", flush=True)

        # CHECKPOINT: every --checkpoint-interval updates, and when a signal asks to stop
        if preemption.signal_name or (args.checkpoint_interval > 0 and update % args.checkpoint_interval == 0):
            save_checkpoint(
                checkpoint_path, args, run_name, update, global_step, stateful, diagnostics_rng, last_return, eval_return
            )
            if preemption.signal_name:
                print(f"{preemption.signal_name}: stopped after update {update}; continue with --resume {checkpoint_path}")
                break

    if preemption.signal_name is None:  # a preempted run is not complete: no summary, no model
        wall = time.time() - start_time
        done = f"done: {global_step} env steps in {wall:.0f} s, {int((global_step - start_step) / wall)} SPS"
        print(f"{done}; env stepping took {env_time / wall:.0%} of the time")
        if args.save_model:
            save_final_model(args, run_dir, stateful)
    for closing in (envs, eval_envs, writer):
        closing.close()
