"""MAIPG on the Multi-agent Particle Environment (spread, line, formation).

Multi-Agent Interpolated Policy Gradients ("MAIPG", see the paper's eq. (10) and Algorithm 1) is MAPPO plus one
deterministic, low-variance term: the actor minimises

    (1 - nu) * L_clip  +  nu * L_dpg  -  c_ent * H,      L_dpg = -Q_tot(s, mu(o)) / N,

where L_clip is MAPPO's clipped surrogate on GAE advantages (a mean over the N agents, hence L_dpg's 1 / N: eq. (10)
weighs the two terms (1 - nu) : nu per agent), Q_tot is a factorized Q-function (per-agent Q_i mixed by QMIX or VDN)
learned with TD(lambda), and mu is the reparameterised deterministic policy (a straight-through Gumbel-Softmax
sample). nu trades bias for variance: nu = 0 is exactly MAPPO, larger nu leans on the learned Q_tot.

    python maipg_mpe.py --task spread --nu 0.05          # the paper's MPE setting (App. D)
    python maipg_mpe.py --task line --nu 0 --seed 2      # MAPPO on the same code
    python maipg_mpe.py --help                           # every flag, with its meaning
"""

import copy
import importlib
import itertools
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
from scipy.optimize import linear_sum_assignment
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
    capture_video: bool = False
    """if toggled, greedy evaluation episodes are rendered (with the mpe2 package) to GIFs under videos/"""
    save_model: bool = False
    """if toggled, the trained model is saved to runs/{run_name}/{exp_name}.pt"""
    eval_only: str | None = None
    """path of a model saved with --save-model: evaluate it (--eval-episodes episodes) instead of training"""
    checkpoint_interval: int = 150
    """save runs/{run_name}/checkpoint.pt every this many updates (~10 min on one thread; 0: never) and on SIGTERM/SIGINT"""
    resume: str | None = None
    """a checkpoint.pt or its run folder: continue that run there (bit for bit on the NumPy port) with its own flags; only
    --total-timesteps, --eval-interval, --checkpoint-interval, --track, --cuda, --torch-threads, --save-model may change"""

    # Environment
    task: str = "spread"
    """the MPE task: spread, line or formation"""
    num_agents: int = 5
    """the number of agents (and of landmarks in spread)"""
    env_backend: str = "numpy"
    """numpy: the batched port inside this script (same env, all envs stepped as arrays); mpe2: the mpe2 package"""
    total_timesteps: int = 10_000_000
    """total env steps of training (one step of one env counts once, whatever the number of agents)"""
    num_envs: int = 128
    """the number of parallel envs ("rollout threads")"""
    num_steps: int = 25
    """the rollout length per env between two updates (not the episode length, which MPE fixes at 25)"""
    eval_interval: int = 25
    """evaluate every this many updates (0: never)"""
    eval_episodes: int = 10
    """the number of greedy evaluation episodes"""

    # Algorithm (MAPPO's values and the paper's App. D)
    nu: float = 0.05
    """the interpolation weight of eq. (10) in [0, 1]: 0 is MAPPO, 1 is the factorized deterministic gradient only"""
    mixer: str = "qmix"
    """how Q_tot is factorized: qmix (monotonic hypernetwork mixer) or vdn (sum of the Q_i)"""
    dpg_scale: str = "advantage"
    """advantage: L_dpg divided by the raw advantages' std (eq. (10)'s ratio); raw: L_dpg in reward units (App. D)"""
    nu_warmup: DisallowNone[int | None] = None
    """env steps over which nu rises from 0 to --nu, so that Q_hat fits first; unset: --total-timesteps / 5; 0: none"""
    learning_rate: float = 7e-4
    """the learning rate of the actor, V and Q+mixer Adam optimisers"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of GAE (advantages for L_clip)"""
    td_lambda: float = 0.8
    """the lambda of the TD(lambda) targets of Q_tot"""
    clip_coef: float = 0.2
    """the PPO clip of the ratio, also used to clip the value updates"""
    update_epochs: int = 10
    """the number of PPO epochs per update"""
    num_minibatches: int = 1
    """the number of minibatches per epoch"""
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
    recurrent: bool = True
    """if toggled off (--no-recurrent), the trunks have no GRU (MAPPO's MLP variant)"""
    joint_q_diagnostic: bool = False
    """if toggled, also train an unfactorized Q(s, a_1..a_n) (the policy never sees it): diagnostics/rvar_joint, Figure 1"""
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


def critic_input(obs, state):
    """MAPPO's agent-specific critic input, state ++ observation ++ id: obs [*batch, N, D], state [*batch, S] -> [.., S+D+N]"""
    num_agents = obs.shape[-2]
    return torch.cat([state.unsqueeze(-2).expand(*state.shape[:-1], num_agents, -1), actor_input(obs)], -1)


# ---------------------------------------------------------------------------------------------------------------------
# Environment: MPE spread / line / formation. `NumpyMPE`, a batched NumPy port of exactly these three mpe2 tasks, matches
# mpe2 step for step from the same seed (tests/test_mpe_port.py); `MPE2Envs` runs the mpe2 package itself.
# ---------------------------------------------------------------------------------------------------------------------
# task -> (mpe2 module, agent radius, local_ratio), the constants mpe2's raw_env / Scenario.make_world set
MPE_TASKS = {
    "spread": ("simple_spread_v3", 0.15, 0.5),
    "line": ("simple_line_v1", 0.03, 0.0),
    "formation": ("simple_formation_v1", 0.05, 0.0),
}
MPE_MAX_CYCLES = 25  # episode length (time limit; these tasks have no success termination)
MPE_DT, MPE_DAMPING, MPE_SENSITIVITY = 0.1, 0.25, 5.0  # core.World.dt / .damping, SimpleEnv._set_action's sensitivity
MPE_CONTACT_FORCE, MPE_CONTACT_MARGIN = 1e2, 1e-3  # core.World.contact_force / .contact_margin
LINE_TOTAL_SEP, FORMATION_RADIUS = 1.25, 0.5  # simple_line's distance between its landmarks, simple_formation's circle
# discrete action -> direction of the push (SimpleEnv._set_action): no-op, left, right, down, up
MPE_ACTION_DIRECTIONS = np.array([[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])


def xy_norm(v: np.ndarray) -> np.ndarray:
    """Euclidean length over the last axis (x, y), computed as mpe2's np.sqrt(np.sum(np.square(v)))."""
    return np.sqrt(np.square(v[..., 0]) + np.square(v[..., 1]))


def optimal_matching_distances(dists: np.ndarray, perms: np.ndarray | None) -> np.ndarray:
    """Agent-to-target distances of the cheapest one-to-one matching, as mpe2's linear_sum_assignment gives them: dists
    [E, N agents, N targets] -> [E, N] (agent k's distance to its target). With `perms` (all N! matchings, [P, N]) all are
    scored at once, batched over envs (scipy's optimum, faster for N <= 5); otherwise scipy solves each env in turn."""
    if perms is None:
        return np.stack([d[linear_sum_assignment(d)] for d in dists])
    matched = dists[:, np.arange(dists.shape[1])[:, None], perms.T]  # [E, N, P]: agent k's distance under matching p
    best = matched.sum(axis=1).argmin(axis=1)  # [E]
    return matched[np.arange(len(dists)), :, best]


class NumpyMPE:
    """All envs of one MPE task stepped together as arrays. Env i draws its initial states from its own generator,
    np.random.default_rng(seeds[i]), in mpe2's order, as mpe2's `env.reset(seed=seeds[i])` does: both give the same
    episodes. An env whose episode ends (after 25 steps) is reset in `step`, which returns its next episode's first obs."""

    WORLD = ("pos", "vel", "landmarks", "targets", "steps")  # the arrays that, with the generators, make the state

    def __init__(self, task: str, num_agents: int, seeds: list[int]):
        E, N = len(seeds), num_agents
        self.task, self.num_envs, self.num_agents = task, E, N
        _, self.agent_size, self.local_ratio = MPE_TASKS[task]
        self.n_actions = 5  # Discrete(5): no-op, left, right, down, up
        self.num_landmarks = {"spread": N, "line": 2, "formation": 1}[task]
        # obs = [own vel, own pos, landmark positions, (spread:) other agents' positions and their (silent, zero) comms]
        self.obs_dim = 4 + 2 * self.num_landmarks + (4 * (N - 1) if task == "spread" else 0)
        self.rngs = [np.random.default_rng(seed) for seed in seeds]
        self.others = np.array([[j for j in range(N) if j != i] for i in range(N)])  # [N, N-1]: the agents other than i
        # line / formation: all N! matchings, scored at once where that beats scipy's per-env loop (N <= 5)
        self.perms = np.array(list(itertools.permutations(range(N)))) if N <= 5 else None
        # the world: agents' positions and velocities, the points agents are matched to (line: evenly spaced between its
        # landmarks, set at reset; formation: a circle), landmarks, and each env's step in its episode
        self.pos, self.vel, self.targets = np.zeros((E, N, 2)), np.zeros((E, N, 2)), np.zeros((E, N, 2))
        self.landmarks, self.steps = np.zeros((E, self.num_landmarks, 2)), np.zeros(E, dtype=np.int64)

    def _reset_envs(self, env_ids: np.ndarray):
        """Scenario.reset_world for the envs in env_ids: agents and landmarks placed uniformly at random, at rest."""
        n, N = len(env_ids), self.num_agents
        # each env draws all its uniforms from its own generator, in reset_world's order; uniform(lo, hi) = lo + (hi-lo) * U
        num_draws = 2 * N + {"spread": 2 * N, "line": 3, "formation": 2}[self.task]
        draws = np.stack([self.rngs[i].random(num_draws) for i in env_ids])  # [n, num_draws]
        self.pos[env_ids] = (-1.0 + 2.0 * draws[:, : 2 * N]).reshape(n, N, 2)
        self.vel[env_ids], self.steps[env_ids] = 0.0, 0
        rest = draws[:, 2 * N :]
        if self.task == "spread":
            self.landmarks[env_ids] = (-1.0 + 2.0 * rest).reshape(n, N, 2)
        elif self.task == "formation":
            self.landmarks[env_ids, 0] = -0.5 + 1.0 * rest
        else:  # line: landmark 0 near the centre, landmark 1 at LINE_TOTAL_SEP in a random direction inside [-1, 1]^2
            start, theta = -0.25 + 0.5 * rest[:, :2], 0.0 + 2 * np.pi * rest[:, 2]  # [n, 2], [n]
            while True:  # rotate by 5 degrees until inside, as reset_world does (vectorised over envs)
                direction = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [n, 2]
                end = start + LINE_TOTAL_SEP * direction
                outside = ~((np.abs(end[:, 0]) < 1.0) & (np.abs(end[:, 1]) < 1.0))
                if not outside.any():
                    break
                theta[outside] += np.radians(5)
            self.landmarks[env_ids] = np.stack([start, end], axis=1)
            spacing = LINE_TOTAL_SEP / (N - 1) if N > 1 else 0.0
            self.targets[env_ids] = start[:, None] + (np.arange(N) * spacing)[None, :, None] * direction[:, None]

    def _observe(self) -> np.ndarray:
        """Scenario.observation for every agent of every env: [E, N, obs_dim] float32."""
        E, N = self.num_envs, self.num_agents
        parts = [self.vel, self.pos, (self.landmarks[:, None] - self.pos[:, :, None]).reshape(E, N, -1)]
        if self.task == "spread":  # others[:, i, k] = pos_others[i, k] - pos_i, then the zero comms
            others = self.pos[:, self.others] - self.pos[:, :, None]  # [E, N, N-1, 2]
            parts += [others.reshape(E, N, -1), np.zeros((E, N, 2 * (N - 1)))]
        return np.concatenate(parts, axis=2).astype(np.float32)

    def _rewards(self) -> np.ndarray:
        """SimpleEnv._execute_world_step's rewards: global * (1 - local_ratio) + own * local_ratio, [E, N]."""
        own_reward = np.zeros((self.num_envs, self.num_agents))  # line / formation: Scenario.reward is 0
        if self.task == "spread":  # global: minus the sum over landmarks of the closest agent's distance
            global_reward = -xy_norm(self.pos[:, :, None] - self.landmarks[:, None]).min(axis=1).sum(axis=1)  # [E]
            # own: -1 per other agent overlapping this one (Scenario.is_collision)
            dist = xy_norm(self.pos[:, :, None] - self.pos[:, None])  # [E, N, N]
            own_reward = -1.0 * ((dist < 2 * self.agent_size) & ~np.eye(self.num_agents, dtype=bool)).sum(axis=2)
        else:
            if self.task == "formation":  # targets: a circle around the landmark, anchored at the smallest agent angle
                rel = self.pos - self.landmarks  # [E, N, 2]
                angle = np.arctan2(rel[..., 1], rel[..., 0])
                angle = np.where(angle < 0, angle + 2 * np.pi, angle)  # _find_angle: in [0, 2 pi)
                target_angle = angle.min(axis=1)[:, None] + np.arange(self.num_agents) * (2 * np.pi / self.num_agents)
                circle = FORMATION_RADIUS * np.stack([np.cos(target_angle), np.sin(target_angle)], axis=2)  # [E, N, 2]
                self.targets = self.landmarks + circle
            # global: minus the mean distance (clipped to [0, 2]) of agents to their matched targets (_compute_line/formation)
            matched = optimal_matching_distances(xy_norm(self.pos[:, :, None] - self.targets[:, None]), self.perms)
            global_reward = -np.mean(np.clip(matched, 0, 2), axis=1)
        return global_reward[:, None] * (1 - self.local_ratio) + own_reward * self.local_ratio

    def reset(self) -> np.ndarray:
        self._reset_envs(np.arange(self.num_envs))
        return self._observe()

    def state_dict(self) -> dict:
        """Everything the next steps depend on (for --resume): the worlds and each env's generator."""
        worlds = {name: getattr(self, name).copy() for name in self.WORLD}
        return {"rngs": [rng.bit_generator.state for rng in self.rngs], **worlds}

    def load_state_dict(self, state: dict) -> None:
        for rng, rng_state in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        for name in self.WORLD:
            setattr(self, name, state[name].copy())

    def step(self, actions) -> tuple:
        push = MPE_ACTION_DIRECTIONS[actions]  # SimpleEnv._set_action: the agents' pushes [E, N, 2]
        # World.apply_environment_force: soft contact force between each pair of agents, contact[:, i, j] acts on i
        delta = self.pos[:, :, None] - self.pos[:, None]  # [E, N, N, 2]
        dist = xy_norm(delta)  # [E, N, N]
        dist[:, np.arange(self.num_agents), np.arange(self.num_agents)] = np.inf  # no force of an agent on itself
        penetration = np.logaddexp(0, -(dist - 2 * self.agent_size) / MPE_CONTACT_MARGIN) * MPE_CONTACT_MARGIN
        contact = MPE_CONTACT_FORCE * delta / dist[..., None] * penetration[..., None]  # [E, N, N, 2]
        # summed in mpe2's order: the push first, then the other agents in index order
        force = np.concatenate([push[:, :, None] * MPE_SENSITIVITY, contact], axis=2).sum(axis=2)  # [E, N, 2]
        # World.integrate_state (mass 1, no max speed): position moves with the old velocity
        self.pos = self.pos + self.vel * MPE_DT
        self.vel = self.vel * (1 - MPE_DAMPING) + force * MPE_DT
        rewards = self._rewards().astype(np.float32)
        # time limit: finished envs start their next episode now (same-step auto-reset)
        self.steps += 1
        dones = self.steps >= MPE_MAX_CYCLES
        if dones.any():
            self._reset_envs(np.flatnonzero(dones))
        return self._observe(), rewards, dones

    def close(self):  # nothing to release
        pass


class MPE2Envs:
    """The real mpe2 package: one mpe2 parallel_env per env, stepped in a Python loop; same API as NumpyMPE."""

    def __init__(self, task, num_agents, seeds, render_mode=None):
        module = importlib.import_module(f"mpe2.{MPE_TASKS[task][0]}")
        kwargs = {"local_ratio": MPE_TASKS[task][2]} if task == "spread" else {}  # line / formation fix theirs to 0
        kwargs |= {"N": num_agents, "max_cycles": MPE_MAX_CYCLES}
        self.envs = [module.parallel_env(render_mode=render_mode, **kwargs) for _ in seeds]
        self.agents, self.seeds, self.seeded = self.envs[0].possible_agents, seeds, False
        self.num_envs, self.num_agents = len(seeds), num_agents
        self.obs_dim = self.envs[0].observation_space(self.agents[0]).shape[0]
        self.n_actions = self.envs[0].action_space(self.agents[0]).n

    def _stack(self, obs: dict) -> np.ndarray:
        return np.stack([obs[agent] for agent in self.agents])  # [N, obs_dim]

    def reset(self) -> np.ndarray:
        # env i is seeded with seeds[i] on the first reset only; later resets continue its generator
        seeds = [None] * self.num_envs if self.seeded else self.seeds
        self.seeded = True
        return np.stack([self._stack(env.reset(seed=seed)[0]) for env, seed in zip(self.envs, seeds, strict=True)])

    def step(self, actions) -> tuple:
        actions = np.asarray(actions, dtype=np.int64)
        obs = np.zeros((self.num_envs, self.num_agents, self.obs_dim), dtype=np.float32)
        rewards, dones = np.zeros((self.num_envs, self.num_agents), dtype=np.float32), np.zeros(self.num_envs, dtype=bool)
        for i, env in enumerate(self.envs):
            act = actions[i].tolist()  # N Python ints
            env_obs, env_rewards, terminations, truncations, _ = env.step(dict(zip(self.agents, act, strict=True)))
            rewards[i] = [env_rewards[agent] for agent in self.agents]
            dones[i] = all(terminations.values()) or all(truncations.values())
            obs[i] = self._stack(env.reset()[0] if dones[i] else env_obs)
        return obs, rewards, dones

    def render(self) -> np.ndarray:
        return self.envs[0].render()

    def close(self):
        for env in self.envs:
            env.close()


def make_envs(args, seeds, render_mode=None):
    """One env per seed (see env_seeds): the NumPy port, or mpe2 when asked for or rendering."""
    if args.env_backend == "mpe2" or render_mode is not None:
        require("mpe2", "pip install mpe2==1.1.1", "--env-backend mpe2" if render_mode is None else "--capture-video")
        return MPE2Envs(args.task, args.num_agents, seeds, render_mode=render_mode)
    return NumpyMPE(args.task, args.num_agents, seeds)


@torch.no_grad()
def evaluate(actor, envs, hidden_dim, device, frames=None):
    """One greedy episode (fresh hidden states) in each env of envs -> team returns [num_envs]; frames: gets the renders."""
    E, N = envs.num_envs, envs.num_agents
    obs, hidden = torch.as_tensor(envs.reset(), device=device), torch.zeros(E, N, hidden_dim, device=device)
    masks, avail_actions = torch.ones(1, E, N, device=device), torch.ones(1, E, N, envs.n_actions, device=device)
    returns, running = np.zeros(E), np.ones(E, dtype=bool)
    while running.any():
        if frames is not None:  # the first frame, then one per step of the episode
            frames.append(envs.render())
        logits, hidden = actor(actor_input(obs)[None], hidden, masks, avail_actions)
        next_obs, rewards, dones = envs.step(logits[0].argmax(-1).cpu().numpy())
        returns += running * rewards.sum(-1)
        running &= ~dones
        obs = torch.as_tensor(next_obs, device=device)
    return returns


def save_video(actor, args, seed, device, path):
    """--capture-video: one greedy episode of an env seeded by env_seeds(seed, "video", 1), rendered by mpe2 to a GIF."""
    frames = []
    evaluate(actor, make_envs(args, env_seeds(seed, "video", 1), "rgb_array"), args.hidden_dim, device, frames)
    imageio = require("imageio", "pip install imageio", "--capture-video")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, duration=100, loop=0)
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


class JointQ(nn.Module):
    """--joint-q-diagnostic: an unfactorized Q(s, a_1..a_n), an MLP on the state and every agent's one-hot action."""

    def __init__(self, state_dim, num_agents, n_actions, hidden_dim):
        super().__init__()
        self.n_actions = n_actions
        self.net = nn.Sequential(
            layer_init(nn.Linear(state_dim + num_agents * n_actions, hidden_dim)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden_dim, hidden_dim)),
            nn.ReLU(),
            layer_init(nn.Linear(hidden_dim, 1), std=1.0),
        )

    def forward(self, state, actions):  # state [*batch, S], actions [*batch, N] -> Q(s, a) [*batch]
        joint_action = F.one_hot(actions, self.n_actions).flatten(-2).to(state.dtype)
        return self.net(torch.cat([state, joint_action], -1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing: argument checks, seeds, checkpoints, --resume, preemption (SIGTERM from Slurm, SIGINT from Ctrl-C), and the
# blocks of __main__ that are not the algorithm
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
    choices = {"task": MPE_TASKS, "env_backend": ("numpy", "mpe2"), "mixer": ("qmix", "vdn")}
    choices["dpg_scale"] = ("raw", "advantage")
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            one_of = "one of " + ", ".join(allowed) if len(allowed) > 2 else " or ".join(allowed)
            fail(f"--{name.replace('_', '-')} must be {one_of}, got {getattr(args, name)!r}")
    if args.nu_warmup is not None and args.nu_warmup < 0:
        fail(f"--nu-warmup must be >= 0 env steps (0: none), got {args.nu_warmup}")
    if not 0.0 <= args.nu <= 1.0:
        fail(f"--nu must be in [0, 1], got {args.nu}")
    for name in ("num_agents", "num_envs", "num_steps", "update_epochs", "chunk_len", "torch_threads", "eval_episodes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_only is None and args.total_timesteps < args.num_envs * args.num_steps:
        rollout = f"(--num-envs x --num-steps = {args.num_envs * args.num_steps})"
        fail(f"--total-timesteps ({args.total_timesteps}) is smaller than one rollout {rollout}")
    n_chunks = args.num_envs * -(-args.num_steps // args.chunk_len)
    if not 1 <= args.num_minibatches <= n_chunks:
        fail(f"--num-minibatches must be in [1, {n_chunks}] (the number of training chunks), got {args.num_minibatches}")
    if args.checkpoint_interval < 0:
        fail(f"--checkpoint-interval must be >= 0 (0: never), got {args.checkpoint_interval}")
    if args.eval_only is not None and not os.path.isfile(args.eval_only):
        fail(f"--eval-only: no such file {args.eval_only!r}")


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
# the flags a resumed run may change: where and how often it reports and saves, how long it runs, where it computes
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
    """--eval-only: evaluates a model saved with --save-model greedily (and renders it with --capture-video), then exits."""
    try:  # a checkpoint.pt holds generator states, which weights_only refuses: it is for --resume
        model = torch.load(args.eval_only, map_location=device, weights_only=True)
    except Exception as error:
        fail(f"--eval-only: {args.eval_only!r} is not a model saved by --save-model ({type(error).__name__})")
    saved = Args(**{**model["args"], "eval_episodes": args.eval_episodes, "env_backend": args.env_backend})
    envs = make_envs(saved, env_seeds(args.seed, "eval", args.eval_episodes))
    actor = Actor(envs.obs_dim + saved.num_agents, envs.n_actions, saved.hidden_dim, saved.recurrent).to(device)
    actor.load_state_dict(model["actor"])
    returns = evaluate(actor, envs, saved.hidden_dim, device)
    mean_std = f"{returns.mean():.2f} +- {returns.std():.2f}"
    print(f"{args.eval_only}: {saved.task}, {len(returns)} greedy episodes, return {mean_std}")
    if args.capture_video:
        print("video:", save_video(actor, saved, args.seed, device, f"videos/{os.path.basename(args.eval_only)}.gif"))
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


def restore_checkpoint(checkpoint: dict | None, stateful: dict, generators: dict, envs, eval_envs, carried: dict) -> tuple:
    """The loop's start -> (global_step, first update, last_return, eval_return, running episodes' returns, lengths): a
    new run's, or on --resume the end of the checkpoint's update, with its networks, optimisers, generators and (NumPy
    port) envs and carried rollout slot restored."""
    episodes = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=int)
    if checkpoint is None:
        return 0, 1, float("nan"), float("nan"), *episodes
    for name, module in stateful.items():
        module.load_state_dict(checkpoint[name])
    set_rng_states(checkpoint["rng"], generators)
    progress = checkpoint["global_step"], checkpoint["update"] + 1, checkpoint["last_return"], checkpoint["eval_return"]
    if checkpoint["envs"] is None:
        print("--resume: mpe2's envs cannot be saved, so their episodes start afresh (the NumPy port's continue)")
        return *progress, *episodes
    envs.load_state_dict(checkpoint["envs"])
    eval_envs.load_state_dict(checkpoint["eval_envs"])
    for name, buffer in carried.items():
        buffer[0] = checkpoint["carried"][name]
    return *progress, checkpoint["episode_returns"], checkpoint["episode_lengths"]


def save_checkpoint(path: str, args: Args, run: dict, stateful: dict, generators: dict, envs, eval_envs, carried: dict):
    """The whole training state, written atomically, for restore_checkpoint; run: the loop's counters and episodes."""
    state = {"script": os.path.basename(__file__), "args": asdict(args), **run, "rng": rng_states(generators)}
    state |= {name: module.state_dict() for name, module in stateful.items()}
    # mpe2's envs cannot be saved: None, and a resumed run starts their episodes afresh
    state["envs"] = envs.state_dict() if isinstance(envs, NumpyMPE) else None
    state["eval_envs"] = eval_envs.state_dict() if isinstance(eval_envs, NumpyMPE) else None
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
        evaluate_saved_model(args, device)  # exits

    run_name = checkpoint["run_name"] if checkpoint else f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if checkpoint else f"runs/{run_name}"
    writer = make_writer(args, run_name, run_dir, checkpoint)

    # env setup: the mixer state of MPE is the concatenation of all agents' observations (App. D)
    resumed_after = checkpoint["update"] if checkpoint else None  # mpe2's envs start afresh on --resume (resumed_seeds)
    envs = make_envs(args, resumed_seeds(env_seeds(args.seed, "train", args.num_envs), resumed_after))
    eval_envs = make_envs(args, resumed_seeds(env_seeds(args.seed, "eval", args.eval_episodes), resumed_after))
    E, N, A, H, T = args.num_envs, args.num_agents, envs.n_actions, args.hidden_dim, args.num_steps
    obs_dim, state_dim = envs.obs_dim, N * envs.obs_dim

    # networks and their three optimisers (App. D)
    actor = Actor(obs_dim + N, A, H, args.recurrent).to(device)
    critic = Critic(state_dim + obs_dim + N, H, args.recurrent).to(device)
    # The Q branch draws its initial weights from its own random stream, so that everything else (actor, V, rollouts)
    # sees the random numbers MAPPO would see: with nu = 0 a run is MAPPO's run, seed for seed, whatever the mixer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        agent_q = AgentQ(state_dim + obs_dim + N, A, H, args.recurrent).to(device)
        mixer = (QMixer(N, state_dim) if args.mixer == "qmix" else VDNMixer()).to(device)
        joint_q = JointQ(state_dim, N, A, H).to(device) if args.joint_q_diagnostic else None
    target_agent_q, target_mixer = copy.deepcopy(agent_q), copy.deepcopy(mixer)  # psi' = psi, omega' = omega
    value_norm = ValueNorm().to(device)  # of V's targets; Q_tot learns in its units too (q_loss)
    adam = lambda params: torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    q_params = list(agent_q.parameters()) + list(mixer.parameters())
    actor_optimizer, critic_optimizer, q_optimizer = adam(actor.parameters()), adam(critic.parameters()), adam(q_params)
    generators = {"diagnostics": torch.Generator(device=device).manual_seed(args.seed + 2)}  # keeps MAPPO's stream as is
    # what a checkpoint saves and --resume restores, besides generators, envs and the carried-over rollout slot
    stateful = {"actor": actor, "critic": critic, "agent_q": agent_q, "mixer": mixer, "target_agent_q": target_agent_q}
    stateful |= {"target_mixer": target_mixer, "value_norm": value_norm, "actor_optimizer": actor_optimizer}
    stateful |= {"critic_optimizer": critic_optimizer, "q_optimizer": q_optimizer}
    if joint_q is not None:
        joint_q_optimizer = adam(joint_q.parameters())
        stateful |= {"joint_q": joint_q, "joint_q_optimizer": joint_q_optimizer}

    # ALGO Logic: storage setup. Time-major; slot t+1 holds what follows step t, slot T carries over to the next rollout.
    obs, state = torch.zeros(T + 1, E, N, obs_dim, device=device), torch.zeros(T + 1, E, state_dim, device=device)
    avail_actions = torch.ones(T + 1, E, N, A, device=device)  # MPE: every action is always available
    masks = torch.ones(T + 1, E, device=device)  # 0 where obs[t] starts a new episode
    active_masks = torch.ones(T + 1, E, N, device=device)  # 0 for dead agents (none in MPE)
    actor_hidden, critic_hidden, q_hidden = torch.zeros(3, T + 1, E, N, H, device=device)  # hidden states entering step t
    actions, logprobs = torch.zeros(T, E, N, dtype=torch.long, device=device), torch.zeros(T, E, N, device=device)
    rollout_logits = torch.zeros(T, E, N, A, device=device)  # pi's logits, for the diagnostics
    rewards = torch.zeros(T, E, device=device)  # team reward: the sum of the agents' rewards
    values = torch.zeros(T + 1, E, N, device=device)  # V in normalised units
    # slot T of these becomes slot 0 of the next rollout: episodes continue across updates
    carried = {"obs": obs, "state": state, "avail_actions": avail_actions, "masks": masks, "active_masks": active_masks}
    carried |= {"actor_hidden": actor_hidden, "critic_hidden": critic_hidden, "q_hidden": q_hidden}

    # TRY NOT TO MODIFY: start the game
    next_obs = torch.as_tensor(envs.reset(), device=device)
    obs[0], state[0], masks[0] = next_obs, next_obs.reshape(E, state_dim), 0.0
    # a new run's start, or on --resume everything as it was at the end of the checkpoint's update
    global_step, start_update, last_return, eval_return, episode_returns, episode_lengths = restore_checkpoint(
        checkpoint, stateful, generators, envs, eval_envs, carried
    )
    finished_returns, finished_lengths, env_time, start_time, last_print = [], [], 0.0, time.time(), 0.0
    start_step, preemption, checkpoint_path = global_step, Preemption(), os.path.join(run_dir, "checkpoint.pt")

    for update in range(start_update, args.num_updates + 1):
        nu = nu_at(global_step, args.nu, args.nu_warmup)  # the nu in force for this update
        # ROLLOUT: num_steps steps of all envs with the stochastic policy pi (the behaviour policy)
        for step in range(T):
            global_step += E
            agent_masks = masks[step : step + 1].unsqueeze(-1).expand(1, E, N)  # [1, E, N]
            with torch.no_grad():
                # ALGO LOGIC: action logic
                logits, actor_hidden[step + 1] = actor(
                    actor_input(obs[step : step + 1]), actor_hidden[step], agent_masks, avail_actions[step : step + 1]
                )
                if not torch.isfinite(logits).all():  # the last minibatch of the previous update diverged
                    sys.exit(f"update {update}: the actor's logits are not finite; stopping (try a smaller --learning-rate)")
                dist = Categorical(logits=logits[0])
                actions[step] = dist.sample()
                logprobs[step], rollout_logits[step] = dist.log_prob(actions[step]), logits[0]
                critic_in = critic_input(obs[step : step + 1], state[step : step + 1])
                values[step : step + 1], critic_hidden[step + 1] = critic(critic_in, critic_hidden[step], agent_masks)
                _, q_hidden[step + 1] = agent_q(critic_in, q_hidden[step], agent_masks)

            # TRY NOT TO MODIFY: execute the game and log data.
            env_start = time.time()
            next_obs_np, agent_rewards, dones = envs.step(actions[step].cpu().numpy())
            env_time += time.time() - env_start
            team_rewards = agent_rewards.sum(-1)
            rewards[step] = torch.as_tensor(team_rewards, device=device)
            next_obs = torch.as_tensor(next_obs_np, device=device)
            obs[step + 1], state[step + 1] = next_obs, next_obs.reshape(E, state_dim)
            # the 25-step time limit is treated as termination, as MAPPO does: masks cut the bootstrap there
            masks[step + 1] = torch.as_tensor(1.0 - dones, device=device)
            episode_returns += team_rewards
            episode_lengths += 1
            finished_returns += episode_returns[dones].tolist()
            finished_lengths += episode_lengths[dones].tolist()
            episode_returns[dones], episode_lengths[dones] = 0.0, 0

        # TARGETS: GAE for the actor and V (MAPPO), gated TD(lambda) for Q_tot (Algorithm 1, lines 9-11)
        agent_masks = masks.unsqueeze(-1).expand(T + 1, E, N)  # [T+1, E, N]
        with torch.no_grad():
            critic_in = critic_input(obs, state)  # [T+1, E, N, S + D + N]
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
            mc_returns = td_lambda_targets(rewards, q_tot_target, masks, args.gamma, 1.0)  # lambda = 1: Monte Carlo
            diagnostics = rollout_diagnostics(
                raw_advantages, active, q_values_online, actions, rollout_logits.softmax(-1), avail_actions[:T], state[:T],
                mixer, value_norm, generators["diagnostics"], joint_q, (q_returns, mc_returns)
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
        stats, grad_var, dpg_grad_ratio = {}, None, torch.zeros(())
        for _epoch in range(args.update_epochs):
            for mb_chunks in torch.randperm(batch["valid"].shape[1], device=device).tensor_split(args.num_minibatches):
                mb = {name: x[:, mb_chunks] for name, x in batch.items()}
                mb_masks = mb["masks"].unsqueeze(-1).expand(-1, -1, N)  # [L, B, N]
                mb_critic_in = critic_input(mb["obs"], mb["state"])
                logits = actor(actor_input(mb["obs"]), start_hidden["actor"][mb_chunks], mb_masks, mb["avail_actions"])[0]
                q_values = agent_q(mb_critic_in, start_hidden["q"][mb_chunks], mb_masks)[0]  # [L, B, N, A]
                new_values = critic(mb_critic_in, start_hidden["critic"][mb_chunks], mb_masks)[0]  # [L, B, N]

                loss, parts = actor_loss(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, args)
                if not stats and nu > 0:  # the first minibatch
                    actor_params = list(actor.parameters())
                    dpg_grad_ratio = grad_norm_ratio(nu * parts["dpg_loss"], (1 - nu) * parts["policy_loss"], actor_params)
                if not stats and args.log_grad_var:
                    grad_var = actor_grad_variance(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, actor, args)
                value_norm.update(mb["returns"][mb["valid"].bool()])  # MAPPO updates the statistics on every minibatch
                weights = mb["valid"].unsqueeze(-1) * mb["active_masks"]
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
                if joint_q is not None:  # Figure 1's unfactorized Q, on the same targets; the policy never sees it
                    joint_q_loss = weighted_mean((joint_q(mb["state"], mb["actions"]) - mb["q_returns"]) ** 2, mb["valid"])
                    joint_q_optimizer.zero_grad()
                    joint_q_loss.backward()
                    joint_q_optimizer.step()

                for name, value in {**parts, "value_loss": v_loss, "q_loss": q_tot_loss}.items():
                    stats[name] = stats.get(name, 0.0) + value.detach() / (args.update_epochs * args.num_minibatches)

        # carry the last slot over: episodes continue across updates
        for buffer in carried.values():
            buffer[0] = buffer[T]

        # LOGGING. TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        explained_var = 1 - weighted_var(returns - values_raw[:T], active) / weighted_var(returns, active)
        scalars = {"charts/SPS": sps, "charts/learning_rate": actor_optimizer.param_groups[0]["lr"], "charts/nu": nu}
        scalars |= {f"losses/{name}": value.item() for name, value in stats.items()}
        scalars["losses/explained_variance"] = explained_var.item()
        scalars["charts/q_tot_mean"] = diagnostics.pop("q_tot_mean").item()
        diagnostics |= {"dpg_grad_ratio": dpg_grad_ratio} | ({"grad_var": grad_var} if grad_var is not None else {})
        scalars |= {f"diagnostics/{name}": value.item() for name, value in diagnostics.items()}
        if joint_q is not None:
            scalars["losses/joint_q_loss"] = joint_q_loss.item()
        if finished_returns:
            last_return = np.mean(finished_returns)
            scalars |= {"charts/episodic_return": last_return, "charts/episodic_length": np.mean(finished_lengths)}
            finished_returns, finished_lengths = [], []
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step)

        # EVALUATE: greedy episodes with fresh hidden states on separate envs
        if args.eval_interval > 0 and (update % args.eval_interval == 0 or update == args.num_updates):
            eval_return = evaluate(actor, eval_envs, H, device).mean()
            writer.add_scalar("eval/episodic_return", eval_return, global_step)
            if args.capture_video:
                save_video(actor, args, args.seed, device, f"videos/{run_name}/update_{update}.gif")

        if time.time() - last_print > 10 or update == args.num_updates:
            last_print = time.time()
            progress = f"update {update}/{args.num_updates} | step {global_step} | SPS {sps} | return {last_return:.2f}"
            print(f"{progress} | eval {eval_return:.2f} | rvar {diagnostics['rvar'].item():.3f}", flush=True)

        # CHECKPOINT: the whole training state, every --checkpoint-interval updates and when a signal asks to stop
        if preemption.signal_name or (args.checkpoint_interval > 0 and update % args.checkpoint_interval == 0):
            run = {"run_name": run_name, "update": update, "global_step": global_step, "last_return": last_return}
            run |= {"eval_return": eval_return, "episode_returns": episode_returns, "episode_lengths": episode_lengths}
            save_checkpoint(checkpoint_path, args, run, stateful, generators, envs, eval_envs, carried)
            if preemption.signal_name:
                print(f"{preemption.signal_name}: stopped after update {update}; continue with --resume {checkpoint_path}")
                break

    if preemption.signal_name is None:  # a preempted run is not complete: no summary, no model
        wall = time.time() - start_time
        sps = int((global_step - start_step) / wall)
        print(f"done: {global_step} env steps in {wall:.0f} s, {sps} SPS; env stepping took {env_time / wall:.0%} of the time")
        if args.save_model:
            model_path = os.path.join(run_dir, f"{args.exp_name}.pt")
            save_atomically({"args": asdict(args), **{name: stateful[name].state_dict() for name in MODEL_PARTS}}, model_path)
            print(f"model saved to {model_path}")
    for closing in (envs, eval_envs, writer):
        closing.close()
