"""The greedy (argmax) and the sampled policy of a maipg_grf.py checkpoint, side by side: success rate, mean episode
length, the policy's mean entropy and how often each of the 19 actions is taken. A greedy success far below the
sampled one says the policy is still near uniform, not that the evaluation is wrong.

    python benchmarks/grf_greedy_vs_sampled.py runs/<run>/checkpoint.pt --episodes 40
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import maipg_grf  # noqa: E402


@torch.no_grad()
def play(actor, envs, num_episodes, hidden_dim, greedy, seeds):
    """num_episodes episodes, a fixed share per env as in maipg_grf.evaluate -> (scores, lengths, entropy, action counts)"""
    E, N, A = envs.num_envs, envs.num_agents, envs.n_actions
    left = np.array([len(share) for share in np.array_split(np.arange(num_episodes), E)])
    obs, hidden = torch.as_tensor(envs.reset(seeds)), torch.zeros(E, N, hidden_dim)
    masks, avail_actions = torch.ones(1, E, N), torch.ones(1, E, N, A)
    scores, lengths, entropies, counts, steps = [], [], [], np.zeros(A), np.zeros(E)
    while left.any():
        logits, hidden = actor(maipg_grf.actor_input(obs)[None], hidden, masks, avail_actions)
        dist = torch.distributions.Categorical(logits=logits[0])
        actions = logits[0].argmax(-1) if greedy else dist.sample()
        entropies.append(dist.entropy()[left > 0].mean().item())
        counts += np.bincount(actions[left > 0].flatten().numpy(), minlength=A)
        next_obs, _, dones, ended_scores = envs.step(actions.numpy(), stepping=left > 0)
        steps += 1
        counted = dones & (left > 0)
        scores += ended_scores[counted].tolist()
        lengths += steps[counted].tolist()
        left -= counted
        steps[dones] = 0
        masks = torch.as_tensor(1.0 - dones, dtype=torch.float32).view(1, E, 1).expand(1, E, N)
        obs = torch.as_tensor(next_obs)
    return np.array(scores), np.array(lengths), np.mean(entropies), counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--num-envs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000)
    options = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(options.seed)
    checkpoint = torch.load(options.checkpoint, map_location="cpu", weights_only=False)
    args = checkpoint["args"]
    seeds = list(range(options.seed, options.seed + options.num_envs))
    envs = maipg_grf.FootballEnvs(args["scenario"], seeds, 1, args["env_timeout"])
    actor = maipg_grf.Actor(envs.obs_dim + envs.num_agents, envs.n_actions, args["hidden_dim"], args["recurrent"])
    actor.load_state_dict(checkpoint["actor"])
    print(f"{options.checkpoint}: update {checkpoint['update']}, {args['scenario']}, {options.episodes} episodes each")
    for greedy in (True, False):
        scores, lengths, entropy, counts = play(actor, envs, options.episodes, args["hidden_dim"], greedy, seeds)
        name = "greedy " if greedy else "sampled"
        print(f"{name}: success {np.mean(scores > 0):.2f}, mean length {lengths.mean():.1f}, entropy {entropy:.2f}")
        print(f"         action frequencies {np.round(counts / counts.sum(), 3).tolist()}")
    envs.close()


if __name__ == "__main__":
    main()
