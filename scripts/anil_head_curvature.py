"""Why a saved ANIL learner's test-time adaptation diverges on some sine episodes.

ANIL fine-tunes only its linear head on the body's support features Phi [N, 40]: the loss
mean((Phi w + b - y)^2) is quadratic in (w, b) with Hessian H = (2/N) [Phi 1]^T [Phi 1]. Gradient
descent with step size lr contracts along every direction only while lr * lambda_max(H) < 2, so an
episode whose lambda_max exceeds 2 / lr (200 at ANIL's 0.01) is pushed further from the optimum
with every step; one step can still help there (the first step's error is what meta-training
optimised), which is why the 1-step error is fine and 10 steps blow up.

    python scripts/anil_head_curvature.py RUN.learner.pt [RESULT.json]

prints, over the task's test episodes, how many have lambda_max > 2 / lr, and for the worst
episodes of RESULT.json (its per_step: MSE after 1, 5 and 10 steps) their lambda_max.
"""
from __future__ import annotations

import json
import sys

import torch

from metabench.cross_task import load_saved_learner
from metabench.episodes import eval_draws
from metabench.plugins import get_host


def main(argv: list[str]) -> int:
    saved = load_saved_learner(argv[0], get_host())
    learner, protocol, source = saved.learner, saved.plan.protocol, saved.plan.source
    config = learner.config
    limit = 2.0 / config.inner_lr
    draws = eval_draws(protocol, source, protocol.eval_split, protocol.episodes)
    top = []
    with torch.no_grad():
        for draw in draws:
            episode = source.materialize(draw, protocol.eval_split)
            phi = learner.body(episode.support_x)  # [N, 40]
            design = torch.cat([phi, torch.ones(len(phi), 1)], dim=1).double()
            hessian = 2.0 / len(phi) * design.T @ design
            top.append(torch.linalg.eigvalsh(hessian)[-1].item())
    steep = sum(v > limit for v in top)
    print(f"{protocol.name}: lambda_max of the head's Hessian > 2 / inner_lr = {limit:g} on {steep} of "
          f"{len(top)} test episodes (median {sorted(top)[len(top) // 2]:.1f}, max {max(top):.1f})")
    if len(argv) > 1:
        result = json.loads(open(argv[1]).read())
        after = result["per_step"]
        worst = sorted(range(len(top)), key=lambda i: -(after["10"][i] or float("inf")))[:5]
        for i in worst:
            print(f"episode {i}: MSE after 1 / 5 / 10 steps {after['1'][i]:.3g} / {after['5'][i]:.3g} / "
                  f"{after['10'][i]:.4g}; lambda_max {top[i]:.1f}")
        calm = [i for i in range(len(top)) if top[i] <= limit]
        grew = [i for i in range(len(top)) if after["10"][i] is not None and after["10"][i] > after["1"][i]]
        print(f"episodes whose MSE after 10 steps is above that after 1: {len(grew)}; of them with lambda_max "
              f"<= {limit:g}: {len(set(grew) & set(calm))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
