"""Benchmark 7: MAML's paper run on sine regression: meta-steps per second, loop vs. stacked vs. learn2learn.

The paper configuration of ``maml`` on ``sinusoid-5s`` (plugins/learners/maml.toml: 2 x 40 ReLU MLP,
meta-batch 25 tasks of 10 support + 10 query points, one second-order inner step of 0.01, Adam
1e-3, 70,000 meta-steps). One repetition is ``steps`` whole meta-steps as ``metabench run`` does
them: sample the meta-batch from the task's training stream, meta-gradient, Adam step. Variants:

- metabench ``task_batching = "loop"`` (the default before the stacked path: one task after another);
- metabench ``"stacked"`` (the default now for fully connected models, metabench/stacked_tasks.py);
- metabench ``"vmap"`` (``torch.func.vmap`` over the tasks);
- learn2learn 0.2.0's ``MAML`` wrapper (``clone`` / ``adapt`` per task, the loss summed over
  the meta-batch and divided by its size), on the same tasks from the same sampler.

Every variant starts from the same weights and samples the same tasks. Reported: meta-steps/s,
the projected time of 70,000 meta-steps, and the ratios. ``--from-results DIR`` also tabulates
the measured meta-training time of stored ``--budget paper`` sinusoid results.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PAPER_STEPS = 70000


def build(task_batching: str):
    """A MAML learner with the paper config of sinusoid-5s, and the run's training sampler."""
    from metabench.episodes import TrainSampler
    from metabench.plugins import get_host
    from metabench.runner import RunRequest, prepare

    host = get_host()
    request = RunRequest(learner="maml", task="sinusoid-5s", budget="paper",
                         learner_layers=[("benchmark", {"task_batching": task_batching})])
    plan = prepare(request, host)
    torch.manual_seed(0)
    backbone = host.build_backbone(plan.backbone, plan.protocol.channels, plan.protocol.image_size,
                                   **plan.backbone_options)
    learner = plan.learner.obj(plan.config, backbone, plan.protocol, plan.device)
    return learner, TrainSampler(plan.protocol, plan.source, 0, "train", plan.device)


def metabench_variant(task_batching: str, steps: int):
    learner, sampler = build(task_batching)
    c = learner.config
    opt = torch.optim.Adam(learner.optimized_tensors(), lr=c.meta_lr)

    def run():
        for _ in range(steps):
            tasks = sampler.sample_many(c.meta_batch, ways=1, shots=c.train_shots, queries=c.train_queries)
            opt.zero_grad(set_to_none=True)
            learner.meta_backward(tasks)
            opt.step()
    return run, learner


def learn2learn_variant(l2l, steps: int):
    learner, sampler = build("loop")
    c = learner.config
    model = copy.deepcopy(learner.model)
    maml = l2l.algorithms.MAML(model, lr=c.inner_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=c.meta_lr)

    def run():
        for _ in range(steps):
            tasks = sampler.sample_many(c.meta_batch, ways=1, shots=c.train_shots, queries=c.train_queries)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for t in tasks:
                clone = maml.clone()
                clone.adapt(F.mse_loss(clone(t.support_x), t.support_y))
                total = total + F.mse_loss(clone(t.query_x), t.query_y)
            (total / len(tasks)).backward()
            opt.step()
    return run


def stored_runs(folders: list[str]) -> tuple[list[list[str]], list[dict]]:
    rows, data = [], []
    for folder in folders:
        for path in sorted(Path(folder).glob("**/*.json")):
            try:
                doc = json.loads(path.read_text())
                if doc["budget"] != "paper" or not doc["task"]["name"].startswith("sinusoid"):
                    continue
            except (KeyError, TypeError, ValueError):
                continue
            cfg = doc["learner"]["config"]
            rows.append([doc["learner"]["name"], doc["task"]["name"], str(cfg.get("meta_steps")),
                         str(cfg.get("task_batching", "-")), f"{doc['timing']['meta_train_s'] / 60:.1f}",
                         f"{doc['timing']['eval_s']:.1f}", str(doc["environment"]["threads"]),
                         (doc["environment"].get("git_commit") or "?")[:7]])
            data.append({"file": path.name, **doc["timing"], "threads": doc["environment"]["threads"]})
    return rows, data


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--steps", type=int, default=200, help="meta-steps per repetition (default 200)")
    parser.add_argument("--from-results", nargs="+", metavar="DIR", default=[],
                        help="also tabulate stored --budget paper sinusoid results under these folders")
    args = common.parse(parser, argv)
    steps = 3 if args.quick else args.steps
    variants, notes = {}, []
    for name, batching in (("metabench loop", "loop"), ("metabench stacked (default)", "stacked"),
                           ("metabench vmap", "vmap")):
        run, _ = metabench_variant(batching, steps)
        variants[name] = (run, steps)
    l2l = common.peer("learn2learn")
    if l2l is not None:
        variants["learn2learn MAML"] = (learn2learn_variant(l2l, steps), steps)
    else:
        notes.append(common.skipped("learn2learn"))
    result = common.interleaved(variants, args.reps)
    base = "metabench loop"
    rows = []
    for name in variants:
        rate = result.rate(name)
        vs_l2l = common.fmt(result.ratio(name, "learn2learn MAML")) if l2l is not None else "n/a"
        rows.append([name, common.fmt(rate), f"{common.fmt(result.spread(name) * 100, 2)}%",
                     f"{PAPER_STEPS / rate / 60:.1f}", common.fmt(result.ratio(name, base)), vs_l2l])
    md = [f"`maml` paper configuration on sinusoid-5s (meta-batch 25, 10 + 10 points, one second-order "
          f"inner step, Adam): meta-steps/s over {steps} whole meta-steps (sampling included) per repetition, "
          f"median of {args.reps} interleaved repetitions, {torch.get_num_threads()} thread(s); "
          f"'70k steps' projects the paper's 70,000 meta-steps.", "",
          common.table(["variant", "meta-steps/s", "spread", "70k steps, min", "vs loop", "vs learn2learn"], rows)]
    stored, stored_data = stored_runs(args.from_results)
    if stored:
        md += ["", f"Measured paper runs (`metabench run --learner L --task T --budget paper`; stored results under "
               f"{', '.join(f'`{f}`' for f in args.from_results)}):", "",
               common.table(["learner", "task", "meta-steps", "task_batching", "meta-train min", "evaluate s",
                             "threads", "commit"], stored)]
    md += [""] + notes
    common.emit(args, "7. Sine regression: MAML's paper run", "\n".join(md),
                {"rates": {n: result.rate(n) for n in variants}, "times": result.times, "stored": stored_data})


if __name__ == "__main__":
    main()
