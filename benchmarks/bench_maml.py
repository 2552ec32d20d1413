"""Benchmark 2: second-order MAML meta-training steps, tasks per second.

Conv4 + linear head, 5-way 1-shot 15-query, meta-batch 4, 1 and 5 inner steps; 28 px with 64
filters (1 channel, kanji) and 84 px with 32 filters (3 channels, kanji upscaled). One step =
meta-gradient + Adam update. Before timing, every variant's float64 meta-gradient on identical
weights and tasks must agree with metabench's loop to 1e-5 (relative to the largest entry).

Achieved FLOP/s: the FLOPs of one metabench step counted by ``torch.utils.flop_counter``
(convolutions and matmuls of the forward, backward and double-backward passes) divided by the
step's median time, as a fraction of this machine's measured float32 matmul FLOP/s.

Every variant runs under metabench's malloc setting, as in ``metabench run`` (metabench/malloc.py);
benchmark 3 measures what that setting changes, against glibc's defaults.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import maml_variants as mv  # noqa: E402
from metabench.rng import SplitMix64  # noqa: E402
from metabench_plugins.backbones.conv4 import conv4  # noqa: E402
from metabench_plugins.learners.maml import batch_statistics_only  # noqa: E402

WAYS, SHOTS, QUERIES, META_BATCH, INNER_LR = 5, 1, 15, 4, 0.1
TOLERANCE = 1e-5


def make_setup(size: int, width: int, channels: int, classes: int, seed: int = 0, meta_batch: int = META_BATCH):
    """A template model and ``meta_batch`` tasks from kanji images (upscaled beyond 28 px)."""
    from benchmarks.bench_episodes import ArraySource, kanji_images

    images = kanji_images(size, classes)
    if images.shape[1] != channels:
        images = images[:, :1].expand(-1, channels, -1, -1).contiguous()
    source = ArraySource(images, per_class=20)
    rng = SplitMix64(seed)
    tasks = [source.materialize(source.draw(rng, "train", WAYS, SHOTS, QUERIES), "train") for _ in range(meta_batch)]
    torch.manual_seed(seed)
    backbone = conv4(channels, size, width=width)
    template = batch_statistics_only(nn.Sequential(backbone.module, nn.Linear(backbone.out_features, WAYS)))
    template.train()
    return template, tasks


def variant_classes(l2l, higher, torchopt=None):
    classes = [(cls, {}) for cls in mv.OURS + mv.ATTEMPTS]
    if l2l is not None:
        classes.append((mv.Learn2Learn, {"l2l": l2l}))
    if higher is not None:
        classes.append((mv.Higher, {"higher": higher}))
    if torchopt is not None:
        classes.append((mv.TorchOpt, {"torchopt": torchopt}))
    return classes


def check_agreement(template, tasks, steps, classes) -> dict[str, float]:
    """Relative max difference of each variant's float64 meta-gradient from metabench's loop."""
    t64 = copy.deepcopy(template).double()
    tasks64 = [type(t)(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y) for t in tasks]
    names = [n for n, _ in t64.named_parameters()]
    ref = mv.MetabenchLoop(t64, tasks64, INNER_LR, steps).meta_grads()
    scale = max(g.abs().max().item() for g in ref)
    out = {}
    for cls, extra in classes:
        v = cls(t64, tasks64, INNER_LR, steps, **extra)
        grads = v.meta_grads()
        err = max((g - r).abs().max().item() for n, g, r in zip(names, grads, ref) if n not in v.skipped_params)
        skipped_ref = max((r.abs().max().item() for n, r in zip(names, ref) if n in v.skipped_params), default=0.0)
        out[cls.name] = max(err, skipped_ref) / scale  # a skipped parameter's true meta-gradient must be ~0
        if out[cls.name] > TOLERANCE:
            raise AssertionError(f"{cls.name}: meta-gradient differs from metabench's loop by {out[cls.name]:.3g} "
                                 f"(relative), more than {TOLERANCE}")
    return out


def count_flops(template, tasks, steps) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    v = mv.MetabenchLoop(template, tasks, INNER_LR, steps)
    with FlopCounterMode(display=False) as counter:
        v.step()
    return float(counter.get_total_flops())


def main(argv=None) -> None:
    args = common.parse(common.arg_parser(__doc__.splitlines()[0], reps=5), argv)
    from metabench.malloc import tune_glibc_malloc

    tuned = tune_glibc_malloc()  # as `metabench run` does (metabench/malloc.py), for every variant alike
    l2l, higher, torchopt = common.peer("learn2learn"), common.peer("higher"), common.peer("torchopt")
    classes = variant_classes(l2l, higher, torchopt)
    notes = [common.skipped(n) for n, m in (("learn2learn", l2l), ("higher", higher), ("torchopt", torchopt))
             if m is None]
    if args.quick:
        configs = [(16, 4, 1, 1)]
        steps_per_rep = 1
    else:
        configs = [(28, 64, 1, 1), (28, 64, 1, 5), (84, 32, 3, 1), (84, 32, 3, 5)]
        steps_per_rep = 2
    peak = common.matmul_flops(256 if args.quick else 1024, 0.2 if args.quick else 2.0)
    rows, data = [], {"matmul_flops": peak, "configs": {}}
    for size, width, channels, steps in configs:
        template, tasks = make_setup(size, width, channels, classes=100)
        agreement = check_agreement(template, tasks, steps, classes)
        flops = count_flops(template, tasks, steps)
        variants = {}
        for cls, extra in classes:
            v = cls(template, tasks, INNER_LR, steps, **extra)

            def rep(v=v):
                for _ in range(steps_per_rep):
                    v.step()
            variants[cls.name] = (rep, steps_per_rep * META_BATCH)
        result = common.interleaved(variants, reps=args.reps)
        key = f"{size}px conv4-{width} {steps} step{'s' if steps > 1 else ''}"
        base = mv.MetabenchLoop.name
        step_s = META_BATCH / result.rate(base)
        data["configs"][key] = {
            "tasks_per_s": {n: result.rate(n) for n in variants},
            "times_s": result.times,
            "ratios_vs_loop": {n: result.ratio(n, base) for n in variants},
            "ratios_vs_learn2learn": ({n: result.ratio(n, mv.Learn2Learn.name) for n in variants}
                                      if l2l is not None else {}),
            "meta_gradient_relative_difference": agreement,
            "flops_per_step": flops, "achieved_flops": flops / step_s, "fraction_of_matmul": flops / step_s / peak,
        }
        for name in variants:
            vs_l2l = common.fmt(result.ratio(name, mv.Learn2Learn.name)) if l2l is not None else "n/a"
            rows.append([key, name, common.fmt(result.rate(name)), f"{result.spread(name):.0%}",
                         common.fmt(result.ratio(name, base)), vs_l2l, f"{agreement[name]:.1e}"])
    md = [f"Second-order MAML, {WAYS}-way {SHOTS}-shot {QUERIES}-query, meta-batch {META_BATCH}, Adam step "
          f"included; tasks/s = median of {args.reps} interleaved repetitions of {steps_per_rep} steps; ratios "
          "are per repetition (same run), then the median. Last column: float64 meta-gradient difference from "
          f"metabench's loop, relative to its largest entry (must be below {TOLERANCE}). glibc malloc: "
          + ("metabench's setting for every variant, as `metabench run` has it (metabench/malloc.py; section 3 "
             "compares it with glibc's defaults)." if tuned else "glibc's defaults."), "",
          common.table(["setup", "variant", "tasks/s", "spread", "vs metabench loop", "vs learn2learn",
                        "meta-grad diff"], rows), "",
          f"Measured float32 matmul peak of this machine: {peak / 1e9:.1f} GFLOP/s.", ""]
    for key, d in data["configs"].items():
        md.append(f"- {key}: one step = {d['flops_per_step'] / 1e9:.2f} GFLOP (counted); metabench loop achieves "
                  f"{d['achieved_flops'] / 1e9:.2f} GFLOP/s = {d['fraction_of_matmul']:.0%} of the matmul peak.")
    md += [f"- {n}" for n in notes]
    common.emit(args, "2. MAML meta-training step", "\n".join(md), data)


if __name__ == "__main__":
    main()
