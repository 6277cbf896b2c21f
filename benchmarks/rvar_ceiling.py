"""The RVar ceiling: the lowest RVar that ANY Q(s, a) could give as a control variate of the
advantage, for a checkpoint's policy, on MPE (maipg_mpe.py's NumPy port) or SMAX (maipg_smac.py's SMAX backend).

    ceiling = 1 - E_{s,i}[ Var_{a ~ pi(.|s)} E[A_i | s, a] ] / Var(A)

A_i is the raw GAE(lambda) advantage of agent i that `diagnostics/rvar` uses (the script's `gae` on the critic's
V(s, o_i), its gamma and gae_lambda, team reward), Var(A) its variance over agent-steps (rvar's denominator; SMAX: the
agents alive at s only). The best control variate of the form C = Q(s, a) - E_{a'~pi} Q(s, a') (zero mean under pi, so
that the gradient stays unbiased) is C_i = E[A_i | s, a] - E[A_i | s], and Var(A - C) / Var(A) is then the ceiling.

Procedure: from the checkpoint, the stochastic policy plays --collect-envs envs; --num-states visited states are kept
(env state cloned, with the actor's and critic's GRU states entering that step), spread over episode times. In each:
- joint: K joint actions a^k ~ pi; after each, M continuations under pi (fresh env randomness and action sampling) run
  to the episode's end (MPE: 25 steps; SMAX 3m: at most 60, so no truncation and no bootstrap is needed), giving
  A_i(s, a^k) samples through the script's own `gae` on the continuation's rewards and values;
- own (agent i's likelihood-ratio term): for each agent i, K own actions a_i^k ~ pi_i, and M continuations each in
  which the other agents' first actions are drawn afresh from pi: samples of E[A_i | s, a_i].
The between-action variance of the K means is corrected for the finite M: Var_k(mean_m) - mean_k(Var_m) / M, unbiased
for Var_{a~pi} E[A | s, a]. Errors: a bootstrap over the collection envs (clusters of states).

    python benchmarks/rvar_ceiling.py --checkpoint runs/X/checkpoint.pt --out results.json [--events runs/X]

The checkpoint is a checkpoint.pt or a --save-model file of maipg_mpe.py or maipg_smac.py (SMAX backend).
"""

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    checkpoint: str
    """a checkpoint.pt or a --save-model .pt of maipg_mpe.py or maipg_smac.py"""
    out: str = "rvar_ceiling.json"
    """where the numbers go (JSON)"""
    events: str | None = None
    """the run's TensorBoard folder: the logged diagnostics/rvar and rvar_own near the checkpoint go into the JSON"""
    label: str = ""
    """a name for this measurement, kept in the JSON"""
    num_states: int = 256
    """visited states (S)"""
    num_actions: int = 8
    """joint (own) actions drawn from pi per state (K)"""
    num_continuations: int = 16
    """continuations per action (M)"""
    collect_envs: int = 0
    """envs the policy plays to visit states (0: MPE one per state, each kept at one episode time; SMAX 64)"""
    collect_steps: int = 200
    """SMAX: steps each collection env plays; the states are drawn uniformly from all the visited steps"""
    chunk_copies: int = 8192
    """env copies stepped together (memory and speed)"""
    bootstrap: int = 2000
    """bootstrap resamples (over the collection envs) for the sampling errors"""
    seed: int = 0
    """seed of the collection and continuations (torch, NumPy, JAX)"""
    torch_threads: int = 1
    """CPU threads torch may use"""
    own: bool = True
    """if toggled off (--no-own), only the joint-action ceiling"""


# ---------------------------------------------------------------------------------------------------------------------
# The estimator (pure NumPy; tests/test_rvar_ceiling.py checks it on a toy with a closed-form answer)
# ---------------------------------------------------------------------------------------------------------------------
def between_action_variance(samples):
    """samples [..., K, M]: M continuation samples after each of K actions drawn from pi -> (corrected, naive, within),
    each [...]: naive = Var_k(mean_m) (ddof 1), unbiased for Var_a g(a) + E_a sigma^2(a) / M; within = mean_k Var_m
    (ddof 1), unbiased for E_a sigma^2(a); corrected = naive - within / M, unbiased for Var_{a~pi} E[A | s, a]."""
    M = samples.shape[-1]
    naive = samples.mean(-1).var(-1, ddof=1)
    within = samples.var(-1, ddof=1).mean(-1)
    return naive - within / M, naive, within


def state_summaries(samples, weights, between):
    """Per-state sums from which a ceiling is a ratio (so that a bootstrap can resample states): samples [S, n, K, M]
    of A (n agents), weights [S, n] (1: the agent counts at s; SMAX: alive), between [S, n] -> dict of [S] arrays."""
    w = np.broadcast_to(weights[:, :, None, None], samples.shape)
    return {
        "between": (between * weights).sum(1),
        "weight": weights.sum(1),
        "a_sum": (samples * w).sum((1, 2, 3)),
        "a_sq": (samples**2 * w).sum((1, 2, 3)),
        "a_count": w.sum((1, 2, 3)),
    }


def ceiling(between, weight, a_sum, a_sq, a_count):
    """1 - (sum w * between / sum w) / Var(A), Var(A) the pooled variance of the weighted A samples; sums over states."""
    mean = a_sum.sum() / a_count.sum()
    var_a = a_sq.sum() / a_count.sum() - mean**2
    return 1.0 - (between.sum() / weight.sum()) / var_a


def bootstrap_ceiling(summary, clusters, rng, n):
    """summary: dict of [S] arrays (state_summaries); clusters [S] ints (states sharing an env) -> (estimate, standard
    error, 2.5% and 97.5% quantiles) from n resamples of the clusters with replacement."""
    estimate = float(ceiling(**summary))
    ids, inverse = np.unique(clusters, return_inverse=True)
    per_cluster = {name: np.bincount(inverse, weights=x, minlength=len(ids)) for name, x in summary.items()}
    picks = rng.integers(0, len(ids), size=(n, len(ids)))
    counts = np.stack([np.bincount(p, minlength=len(ids)) for p in picks])  # [n, clusters]
    sums = {name: counts @ x for name, x in per_cluster.items()}
    mean = sums["a_sum"] / sums["a_count"]
    var_a = sums["a_sq"] / sums["a_count"] - mean**2
    draws = 1.0 - (sums["between"] / sums["weight"]) / var_a
    low, high = np.quantile(draws, [0.025, 0.975])
    return {"value": estimate, "se": float(draws.std(ddof=1)), "ci95": [float(low), float(high)]}


# ---------------------------------------------------------------------------------------------------------------------
# The envs: a batch of copies of visited states, stepped by the scripts' own env code
# ---------------------------------------------------------------------------------------------------------------------
class MpeSetting:
    """maipg_mpe.py's NumPy port: a state is the arrays of NumpyMPE.WORLD (the generators only matter at a reset, which
    comes after the episode's end, where the continuations stop; the port's dynamics are deterministic)."""

    def __init__(self, module, saved_args):
        self.m, self.task, self.num_agents = module, saved_args["task"], saved_args["num_agents"]
        probe = module.NumpyMPE(self.task, self.num_agents, [0])
        self.obs_dim, self.n_actions = probe.obs_dim, probe.n_actions
        self.critic_dim = (self.num_agents + 1) * probe.obs_dim + self.num_agents

    def make(self, num_envs, seed):
        seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(num_envs)]
        return self.m.NumpyMPE(self.task, self.num_agents, seeds)

    def reset(self, envs):
        return self.observation(envs.reset())

    def observation(self, obs):
        E, N = obs.shape[:2]
        obs = torch.as_tensor(obs)
        return {"obs": obs, "state": obs.reshape(E, -1), "avail": torch.ones(E, N, self.n_actions), "alive": torch.ones(E, N)}

    def step(self, envs, actions):
        obs, rewards, dones = envs.step(actions.numpy())
        return self.observation(obs), torch.as_tensor(rewards.sum(-1)), torch.as_tensor(dones)  # the team reward

    def snapshot(self, envs):
        return {name: getattr(envs, name).copy() for name in envs.WORLD}

    def stack(self, snapshots):
        return {name: np.stack([snap[name] for snap in snapshots]) for name in snapshots[0]}  # [T, E, ...]

    def load(self, envs, stacked, t, e):
        for name, x in stacked.items():
            setattr(envs, name, x[t, e].copy())

    def critic_input(self, o):
        return self.m.critic_input(o["obs"], o["state"])


class SmaxSetting:
    """maipg_smac.py's SMAX backend: a state is SMAX's functional JAX state (a pytree with the env axis first). The
    batched step splits its key per copy, so the continuations have independent env randomness."""

    def __init__(self, module, saved_args):
        self.m, self.map = module, saved_args["map"]
        self.cache = os.path.abspath(os.path.join("runs", "jax_cache"))
        probe = self.make(1, 0)
        self.num_agents, self.obs_dim, self.n_actions = probe.num_agents, probe.obs_dim, probe.n_actions
        self.critic_dim = probe.state_dim + self.obs_dim + self.num_agents

    def make(self, num_envs, seed):
        return self.m.SmaxEnvs(self.map, num_envs, seed, self.cache)

    def reset(self, envs):
        return self.observation(envs.reset())

    def observation(self, env_step):
        names = ("obs", "state", "avail", "alive")
        return {name: torch.as_tensor(np.asarray(x), dtype=torch.float32) for name, x in zip(names, env_step[:4], strict=True)}

    def step(self, envs, actions):
        env_step = envs.step(actions.numpy())
        return self.observation(env_step), torch.as_tensor(env_step.rewards), torch.as_tensor(env_step.dones)

    def snapshot(self, envs):
        import jax

        return jax.device_get(envs.states)

    def stack(self, snapshots):
        import jax

        return jax.tree.map(lambda *xs: np.stack(xs), *snapshots)  # [T, E, ...]

    def load(self, envs, stacked, t, e):
        import jax

        envs.states = jax.tree.map(lambda x: jax.numpy.asarray(x[t, e]), stacked)

    def critic_input(self, o):
        return self.m.critic_input(o["obs"], o["state"], o["alive"])


# ---------------------------------------------------------------------------------------------------------------------
# Collection and continuations
# ---------------------------------------------------------------------------------------------------------------------
def build_networks(module, setting, saved):
    """The checkpoint's actor, critic (V) and ValueNorm, in eval mode."""
    args, N = saved["args"], setting.num_agents
    actor = module.Actor(setting.obs_dim + N, setting.n_actions, args["hidden_dim"], args["recurrent"])
    critic = module.Critic(setting.critic_dim, args["hidden_dim"], args["recurrent"])
    value_norm = module.ValueNorm()
    for net, name in ((actor, "actor"), (critic, "critic"), (value_norm, "value_norm")):
        net.load_state_dict(saved[name])
        net.eval()
    return actor, critic, value_norm


@torch.no_grad()
def collect(setting, actor, critic, hidden_dim, num_states, collect_envs, collect_steps, seed):
    """Plays the stochastic policy from fresh episodes and keeps num_states visited states. MPE (collect_envs 0): one
    env per state for one episode, env e kept at episode time e % 25 (stratified over times, one state per episode);
    otherwise collect_envs envs x collect_steps steps, the states drawn uniformly without replacement from all visited
    steps (the rollouts' distribution). -> the states' inputs, GRU states entering the step (as the rollout stores
    them, zeroed at an episode's start), env snapshots [T, E, ...] with the states' (t, e), episode times, clusters."""
    one_per_episode = isinstance(setting, MpeSetting) and collect_envs == 0
    E = num_states if one_per_episode else (collect_envs or 64)
    T = 25 if isinstance(setting, MpeSetting) else collect_steps
    envs = setting.make(E, seed)
    o = setting.reset(envs)
    N = setting.num_agents
    h_actor, h_critic = torch.zeros(E, N, hidden_dim), torch.zeros(E, N, hidden_dim)
    masks, times = torch.zeros(E), np.zeros(E, dtype=int)
    snapshots, record = [], []
    ones = torch.ones(1, E, N)
    for _ in range(T):
        h_actor, h_critic = h_actor * masks[:, None, None], h_critic * masks[:, None, None]  # forget at episode starts
        snapshots.append(setting.snapshot(envs))
        record.append({**o, "h_actor": h_actor, "h_critic": h_critic, "time": torch.as_tensor(times)})
        logits, h_actor = actor(setting.m.actor_input(o["obs"])[None], h_actor, ones, o["avail"][None])
        _, h_critic = critic(setting.critic_input(o)[None], h_critic, ones)
        o, _, dones = setting.step(envs, torch.distributions.Categorical(logits=logits[0]).sample())
        masks = 1.0 - dones.float()
        times = np.where(dones.numpy(), 0, times + 1)
    if one_per_episode:
        t, e = np.arange(E) % T, np.arange(E)
    else:
        flat = np.sort(np.random.default_rng(seed).choice(T * E, size=num_states, replace=False))
        t, e = flat // E, flat % E
    states = {k: torch.stack([record[ti][k][ei] for ti, ei in zip(t, e, strict=True)]) for k in record[0]}
    states["time"] = states["time"].numpy()
    return {**states, "snapshots": setting.stack(snapshots), "t": t, "e": e, "clusters": e}


@torch.no_grad()
def continuation_advantages(setting, actor, critic, value_norm, states, which, first_actions, gamma, gae_lambda, seed):
    """Runs copies of states[which] ([B], one copy each) under pi until every copy's episode has ended, the first
    step's actions fixed where first_actions [B, N] >= 0 (else drawn from pi). -> (A [B, N], steps): the raw GAE(lambda)
    advantage of every agent at the copied state (the script's `gae` on the continuation, which the episode's end
    cuts: what follows a copy's end, its env's next episode, does not enter A at step 0)."""
    B, N = len(which), setting.num_agents
    envs = setting.make(B, seed)
    setting.load(envs, states["snapshots"], states["t"][which], states["e"][which])
    o = {k: states[k][which] for k in ("obs", "state", "avail", "alive")}
    h_actor, h_critic = states["h_actor"][which], states["h_critic"][which]
    ones = torch.ones(1, B, N)
    rewards, values, masks = [], [], [torch.ones(B)]
    running = torch.ones(B, dtype=torch.bool)
    while running.any():
        logits, h_actor = actor(setting.m.actor_input(o["obs"])[None], h_actor, ones, o["avail"][None])
        value, h_critic = critic(setting.critic_input(o)[None], h_critic, ones)
        values.append(value_norm.denormalize(value[0]))
        actions = torch.distributions.Categorical(logits=logits[0]).sample()
        if len(rewards) == 0:
            actions = torch.where(first_actions >= 0, first_actions, actions)
        o, reward, dones = setting.step(envs, actions)
        rewards.append(reward.float())
        masks.append(1.0 - dones.float())
        running &= ~dones
    values.append(torch.zeros(B, N))  # every copy has ended: the last mask cuts this bootstrap, as at a rollout's end
    advantages = setting.m.gae(torch.stack(rewards), torch.stack(values), torch.stack(masks), gamma, gae_lambda)
    return advantages[0], len(rewards)


def copies_plan(states, actor, setting, K, M, own, generator):
    """Every copy's state and first actions: joint [S, K, M] (the M copies after a^k share it), then own [S, N (agent
    i), K, M] (agent i's a_i^k shared, the others' first actions drawn afresh: -1). -> which [C], first [C, N], pi's
    probabilities at the states [S, N, A]."""
    S, N = len(states["time"]), setting.num_agents
    with torch.no_grad():
        logits, _ = actor(
            setting.m.actor_input(states["obs"])[None], states["h_actor"], torch.ones(1, S, N), states["avail"][None]
        )
    probs = logits[0].softmax(-1)  # [S, N, A]
    draw = lambda: torch.multinomial(probs.reshape(S * N, -1), K, replacement=True, generator=generator).reshape(S, N, K)
    joint = draw().permute(0, 2, 1)  # [S, K, N]: the agents' draws together make a^k ~ pi
    which, firsts = [np.repeat(np.arange(S), K * M)], [joint[:, :, None, :].expand(S, K, M, N).reshape(-1, N)]
    if own:
        own_actions = draw()  # [S, N, K]
        first = torch.full((S, N, K, M, N), -1, dtype=torch.long)
        for i in range(N):
            first[:, i, :, :, i] = own_actions[:, i, :, None]
        which.append(np.repeat(np.arange(S), N * K * M))
        firsts.append(first.reshape(-1, N))
    return np.concatenate(which), torch.cat(firsts), probs


def run_continuations(setting, actor, critic, value_norm, states, which, firsts, chunk, gamma, gae_lambda, seed):
    """All copies, `chunk` at a time (SMAX compiles its step per batch size, so its last chunk is padded) -> (A [C, N],
    env steps). MPE: the copies that end together run together (sorted by episode time)."""
    C = len(which)
    out, env_steps = torch.zeros(C, firsts.shape[1]), 0
    order = np.argsort(-states["time"][which], kind="stable")
    for start in range(0, C, chunk):
        began, idx = time.time(), order[start : start + chunk]
        if isinstance(setting, SmaxSetting):
            idx_run = np.concatenate([idx, np.repeat(idx[:1], chunk - len(idx))])
        else:
            idx_run = idx
        adv, steps = continuation_advantages(
            setting, actor, critic, value_norm, states, which[idx_run], firsts[idx_run], gamma, gae_lambda, seed + start
        )
        out[idx] = adv[: len(idx)]
        env_steps += steps * len(idx_run)
        print(f"  copies {start + len(idx)}/{C}: {steps} steps, {time.time() - began:.0f} s", flush=True)
    return out, env_steps


def summarize(a_joint, a_own, alive, clusters, rng, n_boot):
    """a_joint [S, N, K, M] (agent i's A_i after joint action a^k), a_own [S, N, K, M] (agent i's A_i after its own
    a_i^k) or None, alive [S, N] -> the ceilings with bootstrap errors and the variances behind them."""
    M = a_joint.shape[-1]
    boot = lambda summary: bootstrap_ceiling(summary, clusters, rng, n_boot)
    mean_over_alive = lambda x: float((x * alive).sum() / alive.sum())
    corrected, naive, within = between_action_variance(a_joint)  # [S, N]
    joint = state_summaries(a_joint, alive, corrected)
    pooled = joint["a_sum"].sum() / joint["a_count"].sum()
    result = {
        "joint": boot(joint),
        "joint_uncorrected": float(ceiling(**{**joint, "between": (naive * alive).sum(1)})),
        "var_A": float(joint["a_sq"].sum() / joint["a_count"].sum() - pooled**2),
        "between_var_joint": mean_over_alive(corrected),
        "within_var_joint": mean_over_alive(within),
        "finite_M_correction_joint": mean_over_alive(within / M),
    }
    # Var(A) = E Var(A | s, a) + E Var_a E[A | s, a] + Var_s E[A | s]: the last part is V's error (no Q removes it)
    result["state_level_fraction"] = 1.0 - (result["between_var_joint"] + result["within_var_joint"]) / result["var_A"]
    # one control variate shared by the agents (a single Q_tot(s, a), as the scripts use): the best is the mean of
    # the agents' C_i, and it removes n_alive * Var_a(mean_i E[A_i | s, a]) of the sum of their variances
    shared = (a_joint * alive[:, :, None, None]).sum(1) / alive.sum(1)[:, None, None]  # [S, K, M]
    result["joint_shared_cv"] = boot({**joint, "between": between_action_variance(shared)[0] * alive.sum(1)})
    if a_own is not None:
        own_corrected, own_naive, own_within = between_action_variance(a_own)
        own = {**joint, "between": (own_corrected * alive).sum(1)}  # the joint design's Var(A), rvar's denominator
        result |= {
            "own_mean": boot(own),
            "own_uncorrected": float(ceiling(**{**joint, "between": (own_naive * alive).sum(1)})),
            "between_var_own": mean_over_alive(own_corrected),
            "within_var_own": mean_over_alive(own_within),
        }
        own_design = state_summaries(a_own, alive, np.zeros_like(alive))
        own_pooled = own_design["a_sum"].sum() / own_design["a_count"].sum()
        result["var_A_own_design"] = float(own_design["a_sq"].sum() / own_design["a_count"].sum() - own_pooled**2)
        result["per_agent"] = []
        for i in range(a_joint.shape[1]):  # agent i's ceilings over its own Var(A_i)
            agent = state_summaries(a_joint[:, i : i + 1], alive[:, i : i + 1], corrected[:, i : i + 1])
            own_between = own_corrected[:, i] * alive[:, i]
            result["per_agent"].append({"joint": boot(agent), "own": boot({**agent, "between": own_between})})
    return result


def logged_diagnostics(events, global_step, batch_size, window=5):
    """diagnostics/rvar, rvar_own and cv_corr as the run logged them for the checkpoint's policy: on the rollout right
    after the checkpoint (rvar is computed before the update trains on it), and the median over +- window updates."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(events, size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in ("diagnostics/rvar", "diagnostics/rvar_own", "diagnostics/cv_corr"):
        if tag not in accumulator.Tags()["scalars"]:
            continue
        scalars = {e.step: e.value for e in accumulator.Scalars(tag)}
        steps = np.array(sorted(scalars))
        after = steps[steps > global_step]
        near = steps[np.abs(steps - (global_step + batch_size)) <= window * batch_size]
        out[tag] = {
            "next_rollout": {"step": int(after[0]), "value": scalars[after[0]]} if len(after) else None,
            "median_near": float(np.median([scalars[s] for s in near])),
            "near_steps": [int(near.min()), int(near.max())],
        }
    return out


def main(args: Args):
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False)  # only checkpoints you wrote
    saved_args = saved["args"]
    is_smax = "map" in saved_args
    if is_smax:
        import maipg_smac as module

        setting = SmaxSetting(module, saved_args)
    else:
        import maipg_mpe as module

        setting = MpeSetting(module, saved_args)
    actor, critic, value_norm = build_networks(module, setting, saved)
    batch_size = saved_args["num_envs"] * saved_args["num_steps"]
    update = saved.get("update", saved_args["num_updates"])  # a --save-model file is the run's end
    global_step = saved.get("global_step", update * batch_size)
    gamma, gae_lambda = saved_args["gamma"], saved_args["gae_lambda"]
    S, N, K, M = args.num_states, setting.num_agents, args.num_actions, args.num_continuations
    start = time.time()
    print(f"{args.checkpoint}: update {update}, step {global_step}; collecting {S} states", flush=True)
    states = collect(setting, actor, critic, saved_args["hidden_dim"], S, args.collect_envs, args.collect_steps, args.seed)
    which, firsts, probs = copies_plan(states, actor, setting, K, M, args.own, torch.Generator().manual_seed(args.seed))
    print(f"{len(which)} copies: joint {S}x{K}x{M}" + (f", own {S}x{N}x{K}x{M}" if args.own else ""), flush=True)
    adv, env_steps = run_continuations(
        setting, actor, critic, value_norm, states, which, firsts, args.chunk_copies, gamma, gae_lambda, args.seed + 1
    )
    adv = adv.numpy().astype(np.float64)
    a_joint = adv[: S * K * M].reshape(S, K, M, N).transpose(0, 3, 1, 2)  # [S, N, K, M]
    a_own = None
    if args.own:
        a_own_all = adv[S * K * M :].reshape(S, N, K, M, N)  # [S, i, K, M, agent]
        a_own = np.stack([a_own_all[:, i, :, :, i] for i in range(N)], axis=1)  # agent i's A_i after its own a_i^k
    alive = states["alive"].numpy().astype(np.float64)
    result = summarize(a_joint, a_own, alive, states["clusters"], np.random.default_rng(args.seed), args.bootstrap)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # [S, N]
    wall = time.time() - start
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
    out = {
        "label": args.label,
        "setting": f"SMAX {saved_args['map']}" if is_smax else f"MPE {saved_args['task']} (NumPy port)",
        "checkpoint": {"path": args.checkpoint, "update": int(update), "global_step": int(global_step)},
        "advantage": "per-agent raw GAE A_i (the script's gae on V(s, o_i) and the team reward), as diagnostics/rvar; "
        "Var(A) pooled over (alive) agent-steps, rvar's denominator",
        "gamma": gamma,
        "gae_lambda": gae_lambda,
        "states": S,
        "actions_K": K,
        "continuations_M": M,
        "horizon": "each continuation runs to its episode's end (no truncation, no bootstrap)",
        "continuation_steps": {"total_env_steps": int(env_steps)},
        "episode_time_of_states": {"min": int(states["time"].min()), "max": int(states["time"].max())},
        "policy_entropy_mean": float((entropy * states["alive"]).sum() / states["alive"].sum()),
        "alive_fraction": float(alive.mean()),
        "ceiling": result,
        "wall_s": round(wall, 1),
        "machine": cpu.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "args": asdict(args),
    }
    if args.events:
        out["logged"] = logged_diagnostics(args.events, global_step, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    own = f", own {result['own_mean']['value']:.3f} +- {result['own_mean']['se']:.3f}" if args.own else ""
    print(f"ceiling: joint {result['joint']['value']:.3f} +- {result['joint']['se']:.3f}{own}; {wall:.0f} s -> {args.out}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
