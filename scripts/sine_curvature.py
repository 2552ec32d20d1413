"""Why 10 test steps of 0.01 diverge on some sine episodes after MAML's paper-length meta-training.

    python scripts/sine_curvature.py [WEIGHTS.json]   # default: tests/fixtures/maml_sinusoid_paper_weights.json

Loads MAML weights (a ``state`` of the mlp backbone + linear head), and for each of the 600 fixed
test episodes of sinusoid-5s computes (1) the MSE on the queries after 0 to 10 test-time steps
of size ``inner_lr`` = 0.01 on the 5 support points, exactly as ``MAML.predict_after_steps``
does, and (2) the largest eigenvalue of the Hessian of the support loss at the meta-learned
weights (power iteration on Hessian-vector products). Gradient descent with step a on a
quadratic is stable only where every curvature is below 2 / a = 200; the printout groups the
episodes by that threshold and lists the episodes whose error after 10 steps is worst.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "tests" / "fixtures" / "maml_sinusoid_paper_weights.json"
INNER_LR = 0.01


def top_curvature(model, params: dict, x: torch.Tensor, y: torch.Tensor, seed: int, iters: int = 40) -> float:
    """Largest eigenvalue of the Hessian of ``mse(model(x), y)`` at ``params`` (power iteration)."""
    loss = F.mse_loss(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=g) for t in grads]
    value = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, list(params.values()), v, retain_graph=True)
        value = sum((a * b).sum() for a, b in zip(hv, v)).item()
        v = [t.detach() for t in hv]
    return value


def main(argv: list[str]) -> None:
    from metabench.episodes import eval_draws
    from metabench.plugins import get_host
    from metabench_plugins.learners.maml import MAML

    torch.set_num_threads(1)
    weights = Path(argv[0]) if argv else DEFAULT
    saved = json.loads(weights.read_text())
    host = get_host()
    protocol, source, _ = host.task("sinusoid-5s")
    learner = MAML(MAML.Config(inner_lr=INNER_LR), host.build_backbone("mlp", 1, 1), protocol, torch.device("cpu"))
    learner.model.load_state_dict({k: torch.tensor(v) for k, v in saved["state"].items()})
    steps = list(range(11))
    errors, curvature = [], []
    for i, draw in enumerate(eval_draws(protocol, source, "test", protocol.episodes)):
        e = source.materialize(draw, "test")
        with torch.no_grad():
            curve = learner.predict_after_steps(e.support_x, e.support_y, e.query_x, steps)
        errors.append([torch.mean((curve[k].double() - e.query_y.double()) ** 2).item() for k in steps])
        params = {n: p.detach().requires_grad_(True) for n, p in learner.model.named_parameters()}
        curvature.append(top_curvature(learner.model, params, e.support_x, e.support_y, seed=i))
    err = torch.nan_to_num(torch.tensor(errors), nan=float("inf"))  # [600, 11]
    lam = torch.tensor(curvature)
    print(f"weights: {weights}")
    print(f"mean MSE after 0 / 1 / 5 / 10 steps: " + " / ".join(f"{err[:, k].mean():.4f}" for k in (0, 1, 5, 10)))
    print(f"largest support-loss curvature: median {lam.median():.1f}, max {lam.max():.1f}; "
          f"episodes above 2 / {INNER_LR} = {2 / INNER_LR:.0f}: {(lam > 2 / INNER_LR).sum().item()} of {len(lam)}")
    for label, m in (("above", lam > 2 / INNER_LR), ("below", lam <= 2 / INNER_LR)):
        worse = ((err[:, 10] > err[:, 1]) & m).sum().item()
        print(f"  curvature {label} 200: {m.sum().item()} episodes; mean MSE after 1 step {err[m, 1].mean():.3f}, "
              f"after 10 {err[m, 10].mean():.3f}, worst after 10 {err[m, 10].max():.2f}; 10 steps worse than 1: {worse}")
    print("worst episodes after 10 steps (MSE after 0..10 steps):")
    for i in torch.argsort(err[:, 10], descending=True)[:5].tolist():
        amplitude, phase, *xs = eval_draws(protocol, source, "test", i + 1)[i].extra
        print(f"  episode {i}: curvature {lam[i]:.0f}, A = {amplitude:.2f}, support x = "
              f"{[round(x, 2) for x in xs[:protocol.shots]]}, MSE " + " ".join(f"{v:.2f}" for v in err[i].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
