"""MAIPG on Google Research Football academy scenarios (the real gfootball engine).

Multi-Agent Interpolated Policy Gradients (MAIPG, the paper's eq. (10) and Algorithm 1) is MAPPO plus one
deterministic, low-variance term: the actor minimises

    (1 - nu) * L_clip  +  nu * L_dpg  -  c_ent * H,      L_dpg = -Q_tot(s, mu(o)) / N,

where L_clip is MAPPO's clipped surrogate on GAE advantages (a mean over the N agents, hence L_dpg's 1 / N), Q_tot a
factorized Q-function (per-agent Q_i mixed by QMIX or VDN) learned with TD(lambda), and mu the reparameterised
deterministic policy (a straight-through Gumbel-Softmax sample). nu = 0 is exactly MAPPO; larger nu leans on Q_tot.
The agents control the left team's players and share one dense reward (scoring + checkpoints, App. D); success: the
left team scored. gfootball is compiled from source: `bash scripts/install_grf.sh`.

    python maipg_grf.py --scenario academy_3_vs_1_with_keeper           # the paper's GRF setting (App. D)
    python maipg_grf.py --scenario academy_corner --nu 0 --seed 2       # MAPPO on the same code
    python maipg_grf.py --help                                          # every flag, with its meaning
"""

import atexit
import contextlib
import copy
import multiprocessing
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
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tyro.conf import DisallowNone


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random, and the envs through env_seeds)"""
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
    """if toggled, one greedy episode per evaluation is rendered to a GIF under videos/ (needs OpenGL)"""
    save_model: bool = False
    """if toggled, the trained model is saved to runs/{run_name}/{exp_name}.pt"""
    eval_only: str | None = None
    """path of a model saved with --save-model: evaluate it (--eval-episodes episodes) instead of training"""
    checkpoint_interval: int = 15
    """save runs/{run_name}/checkpoint.pt every this many updates (~10 min; 0: never) and on SIGTERM or SIGINT"""
    resume: str | None = None
    """a checkpoint.pt or its run folder: continue that run there with its own flags (the episodes start afresh: the
    engines cannot be saved); only --total-timesteps, --eval-interval, --checkpoint-interval, --track, --cuda,
    --torch-threads, --num-workers, --env-timeout and --save-model (an output) may be given, to change them"""

    # Environment
    scenario: str = "academy_3_vs_1_with_keeper"
    """the GRF academy scenario (the paper's five: academy_3_vs_1_with_keeper, academy_counterattack_easy,
    academy_counterattack_hard, academy_corner, academy_run_pass_and_shoot_with_keeper)"""
    total_timesteps: int = 25_000_000
    """total env steps of training (one step of one env counts once); MAPPO trains 25M on 3-vs-1, 50M on the hard ones"""
    num_envs: int = 50
    """the number of parallel envs ("rollout threads", App. D: 50)"""
    num_steps: int = 200
    """the rollout length per env (MAPPO's); App. D's 400 is the episode limit, and episodes continue across rollouts"""
    num_workers: int = len(os.sched_getaffinity(0))
    """the number of env processes, each stepping num_envs / num_workers envs on one core; defaults to the cores here"""
    eval_interval: int = 40
    """evaluate every this many updates (0: never); 40 x 50 x 200 = MAPPO's 400k env steps"""
    eval_episodes: int = 100
    """the number of greedy evaluation episodes (success rate over 100 episodes, as in the paper)"""
    env_timeout: float = 300.0
    """seconds to wait for an env process's answer (the first starts its engines); then the run stops, naming it"""

    # Algorithm (MAPPO's values and the paper's App. D)
    nu: float = 0.5
    """the interpolation weight of eq. (10) in [0, 1]: 0 is MAPPO, 1 is the factorized deterministic gradient only"""
    mixer: str = "qmix"
    """how Q_tot is factorized: qmix (monotonic hypernetwork mixer) or vdn (sum of the Q_i)"""
    dpg_scale: str = "raw"
    """raw: L_dpg in reward units (App. D, small nu); advantage: divided by the raw advantages' std (eq. (10)'s ratio)"""
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
    clip_coef: float = 0.2
    """the PPO clip of the ratio, also used to clip the value updates"""
    update_epochs: int = 15
    """the number of PPO epochs per update"""
    num_minibatches: int = 2
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
    log_grad_var: bool = False
    """if toggled, log diagnostics/grad_var: the spread of the actor gradient over 8 sub-batches (+10% update time)"""

    # to be filled in runtime
    batch_size: int = 0
    """env steps per update (num_envs * num_steps)"""
    num_updates: int = 0
    """the number of updates (total_timesteps // batch_size)"""


# ---------------------------------------------------------------------------------------------------------------------
# Networks (MAPPO's: actor pi_theta, critic V_phi, agent Q-networks Q_psi_i, the mixer, ValueNorm)
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
    """pi_theta(a_i | o_i, i), shared by all agents."""

    def __init__(self, input_dim, n_actions, hidden_dim, recurrent):
        super().__init__()
        self.trunk = Trunk(input_dim, hidden_dim, recurrent)
        self.head = layer_init(nn.Linear(hidden_dim, n_actions), std=0.01)

    def forward(self, x, hidden, masks, avail_actions):  # -> logits [L, *batch, A] (-1e10 where unavailable), hidden
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


def to_chunks(x, chunk_len, pad_value=0.0):
    """Algorithm 1, line 12: [T, E, ...] -> [chunk_len, W * E, ...] windows of all agents of one env (Q_tot needs every
    agent's mu at the same t), W = ceil(T / chunk_len); the last window is padded with pad_value."""
    T, n_windows = x.shape[0], -(-x.shape[0] // chunk_len)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, n_windows * chunk_len - T), value=pad_value)
    return padded.reshape(n_windows, chunk_len, *x.shape[1:]).transpose(0, 1).flatten(1, 2)


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


def actor_input(obs):
    """obs [*batch, N, D] -> the agent's observation ++ its one-hot id [*batch, N, D + N]"""
    num_agents = obs.shape[-2]
    return torch.cat([obs, torch.eye(num_agents, device=obs.device).expand(*obs.shape[:-2], num_agents, num_agents)], -1)


def critic_input(obs, state):
    """MAPPO's agent-specific critic input: state [*batch, S] ++ own observation ++ id -> [*batch, N, S + D + N]"""
    return actor_input(torch.cat([state.unsqueeze(-2).expand(*state.shape[:-1], obs.shape[-2], -1), obs], -1))


# ---------------------------------------------------------------------------------------------------------------------
# Environment: gfootball academy scenarios, stepped in worker processes (the engine is single-threaded C++)
# ---------------------------------------------------------------------------------------------------------------------
# scenario (gfootball/scenarios/academy_*.py) -> the number of left-team players the agents control: MAPPO's counts for
# the paper's five (the counterattacks field 10 outfield players, of which the agents steer 4: the engine hands its
# controllers to players as the play moves), every outfield player for the others. The goalkeeper is the built-in AI's.
ACADEMY_SCENARIOS = {
    "academy_3_vs_1_with_keeper": 3, "academy_counterattack_easy": 4, "academy_counterattack_hard": 4, "academy_corner": 10,
    "academy_run_pass_and_shoot_with_keeper": 2, "academy_pass_and_shoot_with_keeper": 2, "academy_empty_goal_close": 1,
    "academy_empty_goal": 1, "academy_run_to_score": 1, "academy_run_to_score_with_keeper": 1,
    "academy_single_goal_versus_lazy": 10,
}  # fmt: skip
GRF_OBS_DIM, GRF_N_ACTIONS = 115, 19  # simple115v2 features; gfootball's default action set
INSTALL_GRF = "run `bash scripts/install_grf.sh` (it compiles gfootball 2.10.2 and its engine, about 5 minutes)"
RENDER_RESOLUTION = {"render_resolution_x": 480, "render_resolution_y": 270}  # not 1280 x 720: < 2 frames/s without a GPU


def make_football_env(scenario: str, seed: int):
    """One gfootball env as the paper uses it: simple115v2 observations, dense rewards (scoring + checkpoints)."""
    import gfootball.env as football_env

    config = {"game_engine_random_seed": seed, **RENDER_RESOLUTION}
    return football_env.create_environment(
        env_name=scenario, representation="simple115v2", rewards="scoring,checkpoints",
        number_of_left_players_agent_controls=ACADEMY_SCENARIOS[scenario], other_config_options=config,
    )  # fmt: skip


def reset_football_env(env, rng: np.random.Generator, num_agents: int) -> np.ndarray:
    """A new episode with an engine seed drawn from rng -> obs [N, 115]. gfootball re-seeds its engine at every reset:
    one fixed seed would replay the same episode for the same actions (a greedy evaluation would see one, 100 times)."""
    env.unwrapped._config["game_engine_random_seed"] = int(rng.integers(2**31))
    return np.reshape(env.reset(), (num_agents, GRF_OBS_DIM))


def football_worker(pipe, main_pipe, scenario: str, seeds: list[int]):
    """The body of one env process: holds one env per seed and answers FootballEnvs' commands over pipe until "close"."""
    main_pipe.close()  # the main process's end (copied by fork): once that process is gone, pipe.recv() raises EOFError
    # Ctrl-C, and a SIGTERM to the process group (Slurm), are for the main process: it checkpoints, then closes this one
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    n, num_agents = len(seeds), ACADEMY_SCENARIOS[scenario]
    envs = [make_football_env(scenario, seed) for seed in seeds]
    rngs = [np.random.default_rng(seed) for seed in seeds]  # per-episode engine seeds, independent of --num-workers
    scores = np.zeros(n, dtype=np.float32)  # the running episode's sum of score_reward (+1 goal, -1 conceded)
    try:
        for command, data in iter(pipe.recv, ("close", None)):
            if command == "reset":  # data: None, or new seeds for the envs' streams of engine seeds
                rngs = rngs if data is None else [np.random.default_rng(seed) for seed in data]
                scores[:] = 0.0
                pipe.send(np.stack([reset_football_env(env, rng, num_agents) for env, rng in zip(envs, rngs, strict=True)]))
            elif command == "step":  # data: actions [n, N], and stepping [n], the envs that step (the others return zeros)
                actions, stepping = data
                obs, rewards = np.zeros((n, num_agents, GRF_OBS_DIM), np.float32), np.zeros((n, num_agents), np.float32)
                dones, ended_scores = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.float32)
                for i in np.flatnonzero(stepping):
                    env_obs, rewards[i], dones[i], info = envs[i].step(actions[i])
                    scores[i] += info["score_reward"]
                    if dones[i]:  # the scenario ended it: report its score and start the next episode at once
                        ended_scores[i], scores[i] = scores[i], 0.0
                        env_obs = reset_football_env(envs[i], rngs[i], num_agents)
                    obs[i] = np.reshape(env_obs, (num_agents, GRF_OBS_DIM))
                pipe.send((obs, rewards, dones, ended_scores))
            elif command == "render":
                try:
                    pipe.send(envs[0].render(mode="rgb_array"))
                except Exception as error:  # no OpenGL here: say so instead of dying
                    pipe.send(RuntimeError(f"gfootball could not render: {error!r}"))
    except EOFError:  # the main process ended without closing the envs
        pass
    finally:
        for env in envs:
            env.close()  # otherwise gfootball prints an AttributeError from __del__ at exit
        pipe.close()


class EnvProcessError(SystemExit):
    """An env process died or stopped answering: as a SystemExit, the run ends with one line and no traceback."""


class FootballEnvs:
    """One gfootball env per seed, split over num_workers processes; env i draws its episodes' engine seeds from
    default_rng(seeds[i]), whatever --num-workers is. An env whose episode ends (a goal, the ball out of play or lost, or
    400 steps) is reset inside `step`. A worker that dies, or does not answer in timeout s, raises EnvProcessError."""

    obs_dim, n_actions = GRF_OBS_DIM, GRF_N_ACTIONS

    def __init__(self, scenario: str, seeds: list[int], num_workers: int, timeout: float):
        self.scenario, self.timeout = scenario, timeout
        self.num_envs, self.num_agents = len(seeds), ACADEMY_SCENARIOS[scenario]
        # fork: the workers inherit the imported engine (started before any torch work, so no thread pool is copied)
        context = multiprocessing.get_context("fork")
        self.env_ids = np.array_split(np.arange(self.num_envs), min(num_workers, self.num_envs))
        self.pipes, self.processes = [], []
        for ids in self.env_ids:
            pipe, worker_pipe = context.Pipe()
            worker_args = (worker_pipe, pipe, scenario, [seeds[i] for i in ids])
            # daemon: multiprocessing terminates the workers when the main process exits, however it exits
            self.processes.append(context.Process(target=football_worker, args=worker_args, daemon=True))
            self.processes[-1].start()
            worker_pipe.close()
            self.pipes.append(pipe)
        # the workers ignore SIGTERM, so multiprocessing's own clean-up at exit (terminate(), then join()) would wait on
        # them forever: a run that stops early (a dead env process, a non-finite loss) closes them first
        atexit.register(self.close)

    def ask(self, command: str, data: list) -> list:
        """(command, data[w]) to worker w, for the first len(data) workers -> their answers, each awaited at most timeout s."""
        for worker, worker_data in enumerate(data):
            try:
                self.pipes[worker].send((command, worker_data))
            except OSError:  # BrokenPipeError, ConnectionResetError: the process has ended
                self.fail(worker, "died")
        answers = []
        for worker in range(len(data)):
            try:
                if not self.pipes[worker].poll(self.timeout):
                    self.fail(worker, f"has not answered in {self.timeout:g} s (a hung engine?)")
                answers.append(self.pipes[worker].recv())
            except (EOFError, OSError):  # the process has ended
                self.fail(worker, "died")
        return answers

    def fail(self, worker: int, problem: str):  # kills every worker (the envs are out of step now)
        for process in self.processes:
            process.kill()  # SIGKILL: the workers ignore SIGTERM; nothing for a process that has ended
            process.join(timeout=10)
        if problem == "died":
            code = self.processes[worker].exitcode  # -n: killed by signal n (SIGSEGV: the engine crashed)
            problem += f" ({signal.Signals(-code).name})" if code is not None and code < 0 else f" (exit code {code})"
        ids = self.env_ids[worker]
        raise EnvProcessError(f"{self.scenario}: env process {worker} (envs {ids[0]}-{ids[-1]}) {problem}")

    def reset(self, seeds: list[int] | None = None) -> np.ndarray:  # -> obs [E, N, 115]; seeds: env i's stream anew
        return np.concatenate(self.ask("reset", [None if seeds is None else [seeds[i] for i in ids] for ids in self.env_ids]))

    def step(self, actions: np.ndarray, stepping: np.ndarray | None = None) -> tuple:
        """actions [E, N] -> obs [E, N, 115], rewards [E, N], dones [E], scores [E] (an ended episode's goal difference: +1
        the left team scored, -1 it conceded; 0 where none ended). stepping [E] (bool): only those envs step (others: 0s)."""
        stepping = np.ones(self.num_envs, dtype=bool) if stepping is None else stepping
        answers = self.ask("step", [(actions[ids], stepping[ids]) for ids in self.env_ids])
        return tuple(np.concatenate(parts) for parts in zip(*answers, strict=True))

    def render(self) -> np.ndarray:  # -> env 0's current frame [270, 480, 3] uint8
        if isinstance(frame := self.ask("render", [None])[0], Exception):
            raise frame
        return frame

    def close(self):  # each worker closes its engines; one that has died is skipped, one that hangs killed after 10 s
        atexit.unregister(self.close)
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a broken pipe: that worker has ended
                pipe.send(("close", None))
        for process in self.processes:
            process.join(timeout=10)
            process.kill()  # one that hangs; nothing for one that has ended
            process.join()


def make_envs(args, resumed_after: int | None):
    """The train, eval (60 MB per engine: only with evaluations) and video (--capture-video) envs, each stream with seeds
    of its own (a resumed run's start afresh)."""
    seeds = lambda stream, n: resumed_seeds(env_seeds(args.seed, stream, n), resumed_after)
    make = lambda stream, n, num_workers: FootballEnvs(args.scenario, seeds(stream, n), num_workers, args.env_timeout)
    envs = make("train", args.num_envs, args.num_workers)
    eval_envs = make("eval", min(args.eval_episodes, args.num_envs), args.num_workers) if args.eval_interval > 0 else None
    video_envs = make("video", 1, 1) if args.capture_video and eval_envs is not None else None
    return envs, eval_envs, video_envs


@torch.no_grad()
def evaluate(actor, envs, num_episodes, hidden_dim, device, frames=None, seeds=None):
    """num_episodes greedy episodes (argmax, fresh hidden states), each env its share, to their end -> team returns,
    scores [num_episodes] (+1: the left team scored); an env whose share is done waits. seeds: the envs' streams of
    engine seeds start anew from them. frames (a list): gets env 0's frames until its share ends."""
    E, N = envs.num_envs, envs.num_agents
    # a fixed share per env, not the first episodes to finish: those would over-count the short ones
    left = np.array([len(share) for share in np.array_split(np.arange(num_episodes), E)])
    obs, hidden = torch.as_tensor(envs.reset(seeds), device=device), torch.zeros(E, N, hidden_dim, device=device)
    masks, avail_actions = torch.ones(1, E, N, device=device), torch.ones(1, E, N, envs.n_actions, device=device)
    running_returns, returns, scores = np.zeros(E), [], []
    while left.any():
        if frames is not None and left[0] > 0:  # the first frame, then one per step of env 0's share
            frames.append(envs.render())
        logits, hidden = actor(actor_input(obs)[None], hidden, masks, avail_actions)
        next_obs, rewards, dones, ended_scores = envs.step(logits[0].argmax(-1).cpu().numpy(), stepping=left > 0)
        running_returns += rewards.sum(-1)
        counted = dones & (left > 0)
        returns += running_returns[counted].tolist()
        scores += ended_scores[counted].tolist()
        left -= counted
        running_returns[dones] = 0.0
        masks = torch.as_tensor(1.0 - dones, dtype=torch.float32, device=device).view(1, E, 1).expand(1, E, N)
        obs = torch.as_tensor(next_obs, device=device)
    return np.array(returns), np.array(scores)


def record_video(actor, video_envs, hidden_dim, device, path):
    """One greedy episode to a GIF at path (10 frames/s, as gfootball's videos) -> path; None, with one line, where the
    engine cannot render (no OpenGL)."""
    frames = []
    try:
        evaluate(actor, video_envs, 1, hidden_dim, device, frames)
    except (RuntimeError, EnvProcessError) as error:  # a render error, or the engine died in its process
        print(f"--capture-video: no video, gfootball could not render on this machine (it needs OpenGL): {error}")
        return None
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
    """1 - Var(targets - predictions) / Var(targets) over the weighted entries (1: exact, 0: no better than their mean)."""
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
# Plumbing: argument checks, seeds, checkpoints, --resume and preemption (SIGTERM from Slurm, SIGINT from Ctrl-C)
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
    """The first bad flag stops the run with one line naming it and what it accepts (fail)."""
    rollout, n_chunks = args.num_envs * args.num_steps, args.num_envs * -(-args.num_steps // max(args.chunk_len, 1))
    at_least_1 = ("num_envs", "num_steps", "num_workers", "update_epochs", "chunk_len", "torch_threads", "eval_episodes")
    scenarios = f"one of {', '.join(ACADEMY_SCENARIOS)}"
    short = f"--total-timesteps ({args.total_timesteps}) is smaller than one rollout (--num-envs x --num-steps = {rollout})"
    minibatches = f"--num-minibatches must be in [1, {n_chunks}] (the number of training chunks), got {args.num_minibatches}"
    checks = [  # (the flags are valid, what they accept)
        (args.scenario in ACADEMY_SCENARIOS, f"--scenario must be {scenarios}, got {args.scenario!r}"),
        (args.mixer in ("qmix", "vdn"), f"--mixer must be qmix or vdn, got {args.mixer!r}"),
        (args.dpg_scale in ("raw", "advantage"), f"--dpg-scale must be raw or advantage, got {args.dpg_scale!r}"),
        (args.nu_warmup is None or args.nu_warmup >= 0, f"--nu-warmup must be >= 0 env steps (0: none), got {args.nu_warmup}"),
        (0.0 <= args.nu <= 1.0, f"--nu must be in [0, 1], got {args.nu}"),
        *[(getattr(args, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}") for n in at_least_1],
        (args.eval_only is not None or args.total_timesteps >= rollout, short),
        (1 <= args.num_minibatches <= n_chunks, minibatches),
        (args.env_timeout > 0, f"--env-timeout must be > 0 seconds, got {args.env_timeout}"),
        (args.checkpoint_interval >= 0, f"--checkpoint-interval must be >= 0 (0: never), got {args.checkpoint_interval}"),
        (args.eval_only is None or os.path.isfile(args.eval_only), f"--eval-only: no such file {args.eval_only!r}"),
    ]
    for valid, message in checks:
        if not valid:
            fail(message)


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
# save_model is an output, not a setting of the run; num_workers and env_timeout do not change any env's engine seeds
RESUME_FLAGS = ("total_timesteps", "eval_interval", "checkpoint_interval", "track", "cuda", "torch_threads", "save_model")
RESUME_FLAGS += ("num_workers", "env_timeout")


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


def evaluate_saved_model(args: Args, device) -> None:
    """--eval-only: --eval-episodes greedy episodes of a --save-model model (one to video with --capture-video)."""
    try:  # a checkpoint.pt holds generator states, which weights_only refuses: it is for --resume
        model = torch.load(args.eval_only, map_location=device, weights_only=True)
    except Exception as error:
        fail(f"--eval-only: {args.eval_only!r} is not a model saved by --save-model ({type(error).__name__})")
    saved = Args(**model["args"])  # the trained model's flags; the evaluation's own (seed, envs) are args'
    make = lambda seeds, num_workers: FootballEnvs(saved.scenario, seeds, num_workers, args.env_timeout)
    envs = make(env_seeds(args.seed, "eval", min(args.eval_episodes, saved.num_envs)), args.num_workers)
    video_envs = make(env_seeds(args.seed, "video", 1), 1) if args.capture_video else None
    actor = Actor(envs.obs_dim + envs.num_agents, envs.n_actions, saved.hidden_dim, saved.recurrent).to(device)
    actor.load_state_dict(model["actor"])
    returns, scores = evaluate(actor, envs, args.eval_episodes, saved.hidden_dim, device)
    summary = f"success rate {np.mean(scores > 0):.2f}, return {returns.mean():.2f} +- {returns.std():.2f}"
    print(f"{args.eval_only}: {saved.scenario}, {len(returns)} greedy episodes, {summary}")
    envs.close()  # before the video: 60 MB per engine
    video_path = f"videos/{os.path.basename(args.eval_only)}.gif"
    if video_envs is not None and record_video(actor, video_envs, saved.hidden_dim, device, video_path):
        print("video:", video_path)
    sys.exit(0)  # which closes video_envs (atexit)


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


def restore_checkpoint(checkpoint: dict | None, stateful: dict, diagnostics_rng) -> tuple:
    """--resume: the training state at the end of the checkpoint's update -> (global_step, the first update to run,
    last_return, last_success, eval_success); without a checkpoint, those of a new run."""
    if checkpoint is None:
        return 0, 1, float("nan"), float("nan"), float("nan")
    for name, module in stateful.items():
        module.load_state_dict(checkpoint[name])
    set_rng_states(checkpoint["rng"], {"diagnostics": diagnostics_rng})
    print("--resume: gfootball's engines cannot be saved, so the episodes start afresh (with engine seeds of their own)")
    progress = (checkpoint[key] for key in ("last_return", "last_success", "eval_success"))
    return checkpoint["global_step"], checkpoint["update"] + 1, *progress


def save_checkpoint(path: str, args: Args, run_name: str, update: int, global_step: int, stateful: dict, rngs: dict, **logs):
    """The whole training state after `update`; logs: last_return, last_success, eval_success and, for the record, the
    running episodes' sums (a resumed run starts its episodes afresh, uncounted)."""
    run = {"script": os.path.basename(__file__), "args": asdict(args), "run_name": run_name, "update": update}
    states = {name: module.state_dict() for name, module in stateful.items()}
    save_atomically({**run, "global_step": global_step, **states, "rng": rng_states(rngs), **logs}, path)


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
    require("gfootball.env", INSTALL_GRF, "--scenario")  # imported once here: the env processes inherit it
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
        evaluate_saved_model(args, device)  # it exits

    run_name = checkpoint["run_name"] if checkpoint else f"{args.scenario}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if checkpoint else f"runs/{run_name}"
    writer = make_writer(args, run_name, run_dir, checkpoint)
    atexit.register(writer.close)  # a run stopped early (a dead env process, a non-finite loss) keeps what it logged

    # env setup, before any torch work (the env processes are forked); the mixer's state is all agents' observations
    envs, eval_envs, video_envs = make_envs(args, checkpoint["update"] if checkpoint else None)
    E, N, A, H, T = args.num_envs, envs.num_agents, envs.n_actions, args.hidden_dim, args.num_steps
    obs_dim, state_dim = envs.obs_dim, N * envs.obs_dim

    # networks and their three optimisers
    actor = Actor(obs_dim + N, A, H, args.recurrent).to(device)
    critic = Critic(state_dim + obs_dim + N, H, args.recurrent).to(device)
    # The Q branch draws its initial weights from its own random stream, so that everything else (actor, V, rollouts)
    # sees the random numbers MAPPO would see: with nu = 0 a run is MAPPO's run, seed for seed, whatever the mixer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        agent_q = AgentQ(state_dim + obs_dim + N, A, H, args.recurrent).to(device)
        mixer = (QMixer(N, state_dim) if args.mixer == "qmix" else VDNMixer()).to(device)
    target_agent_q, target_mixer = copy.deepcopy(agent_q), copy.deepcopy(mixer)  # psi' = psi, omega' = omega
    value_norm = ValueNorm().to(device)  # V's statistics, which Q_tot's targets are normalised by too (q_loss)
    adam = lambda params: torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    q_params = list(agent_q.parameters()) + list(mixer.parameters())
    actor_optimizer, critic_optimizer, q_optimizer = adam(actor.parameters()), adam(critic.parameters()), adam(q_params)
    diagnostics_rng = torch.Generator(device=device).manual_seed(args.seed + 2)  # keeps MAPPO's stream untouched
    # what a checkpoint saves and --resume restores, besides the generators
    stateful = {"actor": actor, "critic": critic, "agent_q": agent_q, "mixer": mixer, "value_norm": value_norm}
    stateful |= {"target_agent_q": target_agent_q, "target_mixer": target_mixer, "actor_optimizer": actor_optimizer}
    stateful |= {"critic_optimizer": critic_optimizer, "q_optimizer": q_optimizer}

    # ALGO Logic: storage setup. Time-major; slot t+1 holds what follows step t, slot T carries over to the next rollout.
    obs, state = torch.zeros(T + 1, E, N, obs_dim, device=device), torch.zeros(T + 1, E, state_dim, device=device)
    avail_actions = torch.ones(T + 1, E, N, A, device=device)  # GRF: every action is always available
    masks = torch.ones(T + 1, E, device=device)  # 0 where obs[t] starts a new episode
    active_masks = torch.ones(T + 1, E, N, device=device)  # 0 for dead agents (none in GRF)
    actor_hidden, critic_hidden, q_hidden = (torch.zeros(T + 1, E, N, H, device=device) for _ in range(3))  # entering t
    actions, logprobs = torch.zeros(T, E, N, dtype=torch.long, device=device), torch.zeros(T, E, N, device=device)
    rollout_logits = torch.zeros(T, E, N, A, device=device)
    rewards = torch.zeros(T, E, device=device)  # team reward: the sum of the agents' rewards
    values = torch.zeros(T + 1, E, N, device=device)  # V in normalised units

    # TRY NOT TO MODIFY: start the game
    next_obs = torch.as_tensor(envs.reset(), device=device)
    obs[0], state[0], masks[0] = next_obs, next_obs.reshape(E, state_dim), 0.0
    episode_returns, episode_lengths = np.zeros(E), np.zeros(E, dtype=int)
    finished_returns, finished_lengths, finished_scores = [], [], []
    global_step, start_update, last_return, last_success, eval_success = restore_checkpoint(
        checkpoint, stateful, diagnostics_rng
    )
    # the env processes ignore SIGTERM and SIGINT: the main process checkpoints, then closes them
    start_step, preemption, checkpoint_path = global_step, Preemption(), os.path.join(run_dir, "checkpoint.pt")
    env_time, start_time, last_print = 0.0, time.time(), 0.0

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
            next_obs_np, agent_rewards, dones, scores = envs.step(actions[step].cpu().numpy())
            env_time += time.time() - env_start
            team_rewards = agent_rewards.sum(-1)
            rewards[step] = torch.as_tensor(team_rewards, device=device)
            next_obs = torch.as_tensor(next_obs_np, device=device)
            obs[step + 1], state[step + 1] = next_obs, next_obs.reshape(E, state_dim)
            # the scenario's 400-step limit is treated as termination, as MAPPO does: masks cut the bootstrap there
            masks[step + 1] = torch.as_tensor(1.0 - dones, device=device)
            episode_returns += team_rewards
            episode_lengths += 1
            finished_returns += episode_returns[dones].tolist()
            finished_lengths += episode_lengths[dones].tolist()
            finished_scores += scores[dones].tolist()
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
                mixer, value_norm, diagnostics_rng, None, (q_returns, mc_returns)
            )  # fmt: skip

        # CHUNKS (Algorithm 1, line 12): masks and avail_actions are padded with 1, so that the GRU stays fused
        rollout = {"obs": obs[:T], "state": state[:T], "avail_actions": avail_actions[:T], "masks": masks[:T]}
        rollout |= {"active_masks": active, "actions": actions, "logprobs": logprobs, "advantages": advantages}
        rollout |= {"returns": returns, "values": values[:T], "q_returns": q_returns, "valid": torch.ones(T, E, device=device)}
        pad = {"masks": 1.0, "avail_actions": 1.0}
        batch = {name: to_chunks(x, args.chunk_len, pad.get(name, 0.0)) for name, x in rollout.items()}
        hidden = {"actor": actor_hidden, "critic": critic_hidden, "q": q_hidden}
        starts = {name: h[0 : T : args.chunk_len].flatten(0, 1) for name, h in hidden.items()}  # entering each chunk (line 20)

        # OPTIMIZE: actor (eq. (10)), V (MAPPO) and Q + mixer (TD(lambda)), each with its own Adam (Algorithm 1, line 23)
        stats, grad_var, dpg_grad_ratio = {}, None, torch.zeros(())
        for _epoch in range(args.update_epochs):
            for mb_chunks in torch.randperm(batch["valid"].shape[1], device=device).tensor_split(args.num_minibatches):
                mb = {name: x[:, mb_chunks] for name, x in batch.items()}
                mb_masks = mb["masks"].unsqueeze(-1).expand(-1, -1, N)  # [L, B, N]
                mb_critic_in = critic_input(mb["obs"], mb["state"])
                logits = actor(actor_input(mb["obs"]), starts["actor"][mb_chunks], mb_masks, mb["avail_actions"])[0]
                q_values = agent_q(mb_critic_in, starts["q"][mb_chunks], mb_masks)[0]  # [L, B, N, A]
                new_values = critic(mb_critic_in, starts["critic"][mb_chunks], mb_masks)[0]  # [L, B, N]

                loss, parts = actor_loss(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, args)
                if not stats and nu > 0:  # the first minibatch
                    actor_params = list(actor.parameters())
                    dpg_grad_ratio = grad_norm_ratio(nu * parts["dpg_loss"], (1 - nu) * parts["policy_loss"], actor_params)
                if not stats and args.log_grad_var:
                    grad_var = actor_grad_variance(logits, mb, q_values, mixer, value_norm, nu, dpg_scale, actor, args)
                value_norm.update(mb["returns"][mb["valid"].bool()])  # MAPPO updates the statistics on every minibatch
                weights, v_targets = mb["valid"].unsqueeze(-1) * mb["active_masks"], value_norm.normalize(mb["returns"])
                v_loss = value_loss(new_values, mb["values"], v_targets, weights, args.clip_coef, args.huber_delta)
                q_tot = mixer(q_values.gather(-1, mb["actions"].unsqueeze(-1)).squeeze(-1), mb["state"])  # [L, B]
                q_tot_loss = q_loss(q_tot, mb["q_returns"], mb["valid"], value_norm)
                losses = {"policy_loss": parts["policy_loss"], "dpg_loss": parts["dpg_loss"], "value_loss": v_loss}
                stop_if_not_finite({**losses, "q_loss": q_tot_loss}, update)

                for optimizer, module_loss in [(actor_optimizer, loss), (critic_optimizer, v_loss), (q_optimizer, q_tot_loss)]:
                    optimizer.zero_grad()
                    module_loss.backward()
                    nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.max_grad_norm)
                    optimizer.step()
                soft_update(target_agent_q, agent_q, args.target_tau)  # after every Q step (Algorithm 1, line 25)
                soft_update(target_mixer, mixer, args.target_tau)

                for name, value in {**parts, "value_loss": v_loss, "q_loss": q_tot_loss}.items():
                    stats[name] = stats.get(name, 0.0) + value.detach() / (args.update_epochs * args.num_minibatches)

        # carry the last slot over: episodes continue across updates
        for buffer in (obs, state, avail_actions, masks, active_masks, actor_hidden, critic_hidden, q_hidden):
            buffer[0] = buffer[T]

        # LOGGING. TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        explained_var = 1 - weighted_var(returns - values_raw[:T], active) / weighted_var(returns, active)
        logs = {"charts/SPS": sps, "charts/learning_rate": actor_optimizer.param_groups[0]["lr"], "charts/nu": nu}
        logs |= {f"losses/{name}": value.item() for name, value in stats.items()}
        logs |= {"losses/explained_variance": explained_var.item(), "charts/q_tot_mean": diagnostics.pop("q_tot_mean").item()}
        diagnostics |= {"dpg_grad_ratio": dpg_grad_ratio, **({"grad_var": grad_var} if grad_var is not None else {})}
        logs |= {f"diagnostics/{name}": value.item() for name, value in diagnostics.items()}
        if finished_returns:  # success: the left team scored; goals: the goal difference per episode
            last_return, last_success = np.mean(finished_returns), np.mean(np.array(finished_scores) > 0)
            logs |= {"charts/episodic_return": last_return, "charts/episodic_length": np.mean(finished_lengths)}
            logs |= {"charts/success_rate": last_success, "charts/goals": np.mean(finished_scores)}
            finished_returns, finished_lengths, finished_scores = [], [], []
        for tag, value in logs.items():
            writer.add_scalar(tag, value, global_step)

        # EVALUATE: greedy episodes with fresh hidden states on separate envs
        if args.eval_interval > 0 and (update % args.eval_interval == 0 or update == args.num_updates):
            # child `update` of each eval env's seed: an evaluation's episodes depend on the run's seed and the update only,
            # not on the evaluations before it, nor on a resume
            eval_seeds = resumed_seeds(env_seeds(args.seed, "eval", eval_envs.num_envs), update)
            eval_returns, eval_scores = evaluate(actor, eval_envs, args.eval_episodes, H, device, seeds=eval_seeds)
            eval_success = np.mean(eval_scores > 0)
            writer.add_scalar("eval/episodic_return", eval_returns.mean(), global_step)
            writer.add_scalar("eval/success_rate", eval_success, global_step)
            video_path = f"videos/{run_name}/update_{update}.gif"
            if video_envs is not None and record_video(actor, video_envs, H, device, video_path) is None:
                video_envs.close()  # it cannot render here: no more attempts
                video_envs = None

        if time.time() - last_print > 10 or update == args.num_updates:
            last_print = time.time()
            progress = f"update {update}/{args.num_updates} | step {global_step} | SPS {sps} | return {last_return:.2f}"
            rates = f"success {last_success:.2f} | eval success {eval_success:.2f} | rvar {diagnostics['rvar'].item():.3f}"
            print(f"{progress} | {rates}", flush=True)

        # CHECKPOINT: the whole training state, every --checkpoint-interval updates and when a signal asks to stop
        if preemption.signal_name or (args.checkpoint_interval > 0 and update % args.checkpoint_interval == 0):
            save_checkpoint(
                checkpoint_path, args, run_name, update, global_step, stateful, {"diagnostics": diagnostics_rng},
                last_return=last_return, last_success=last_success, eval_success=eval_success,
                episode_returns=episode_returns, episode_lengths=episode_lengths,
            )  # fmt: skip
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
    for env_group in filter(None, (envs, eval_envs, video_envs)):
        env_group.close()
    writer.close()
