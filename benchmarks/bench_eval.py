"""Benchmark 4: evaluation, test episodes per second for ProtoNet and MAML.

The harness evaluates one episode at a time: ``learner.predict(support_x, support_y, query_x)``
under ``torch.no_grad()``. Variants (episodes materialised beforehand; only prediction is timed):

ProtoNet (conv4-64, kanji-5w5s: 25 support + 75 query images per episode, eval-mode BatchNorm)
* eager:            one episode per forward, network and images contiguous (the harness
                    before channels_last)
* ProtoNet.predict: the harness today (metabench/inference.py): BatchNorm folded into the
                    convolutions, channels_last, frozen TorchScript graph; its setup (fold, trace,
                    freeze, check on the first episode) is timed on a fresh copy and counted over
                    the protocol's 600 episodes in a row of its own
* torch.compile:    ``torch.compile(net)``; its figure counts the compile: ``episodes`` episodes
                    (the protocol's 600) / (cold compile time + their time); steady state also shown
* batched xB:       B episodes' images in one forward, prototypes per episode

MAML (conv4-64, kanji-5w1s, 3 first-order inner steps per test episode, batch-statistics BatchNorm)
* eager:            ``MAML.predict``
* channels_last
* torch.compile:    the functional forward (``functional_call``) compiled; adaptation differentiates
                    through it (AOTAutograd); compile time counted as above
* batched xB:       B episodes adapted at once with ``torch.func.vmap`` (per-episode statistics)

Reported per variant: the fraction of queries whose prediction (argmax) equals eager's, and the
largest logit difference. In float64 every variant's logits equal eager's to ~1e-13 (checked by
hand); in float32 MAML's 3 inner steps at inner_lr 0.4 amplify rounding differences (an untrained
network), so a few near-tie predictions can flip.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from benchmarks import common  # noqa: E402

BATCH = 10  # episodes per forward in the batched variants (2 with --quick)


def episodes_of(protocol_name: str, n: int):
    from metabench.episodes import eval_draws
    from metabench_plugins.datasets.kanji import KanjiSource, protocols

    protocol = next(p for p in protocols() if p.name == protocol_name)
    source = KanjiSource()
    source.prepare(protocol.eval_split)
    draws = eval_draws(protocol, source, protocol.eval_split, n)
    return protocol, [source.materialize(d, protocol.eval_split) for d in draws]


def protonet_learner(protocol, width: int, device: str = "cpu"):
    from metabench_plugins.backbones.conv4 import conv4
    from metabench_plugins.learners.protonet import ProtoNet, ProtoNetConfig

    torch.manual_seed(0)
    backbone = conv4(1, protocol.image_size, width=width)
    backbone.module.to(device)
    learner = ProtoNet(ProtoNetConfig(), backbone, protocol, torch.device(device))
    # Non-trivial running statistics, as after training (eval mode uses them).
    learner.net.train()
    with torch.no_grad():
        for _ in range(3):
            learner.net(torch.rand(64, 1, protocol.image_size, protocol.image_size, device=device))
    return learner


def maml_learner(protocol, width: int, device: str = "cpu"):
    from metabench_plugins.backbones.conv4 import conv4
    from metabench_plugins.learners.maml import MAML, MAMLConfig

    torch.manual_seed(0)
    backbone = conv4(1, protocol.image_size, width=width)
    backbone.module.to(device)
    return MAML(MAMLConfig(), backbone, protocol, torch.device(device))


def run_predict(predict, episodes):
    with torch.no_grad():
        return [predict(e.support_x, e.support_y, e.query_x) for e in episodes]


def run_batched(predict_many, episodes, batch):
    out = []
    with torch.no_grad():
        for i in range(0, len(episodes), batch):
            out += predict_many(episodes[i:i + batch])
    return out


# ----------------------------------------------------------------------------- ProtoNet
def protonet_variants(learner, protocol):
    from metabench_plugins.learners.protonet import prototype_logits

    ways = protocol.ways
    # ProtoNet.predict runs in channels_last (it converts learner.net on first use): the eager
    # baseline is a contiguous copy taken before, one episode per forward as the harness did.
    net = __import__("copy").deepcopy(learner.net).eval()

    def eager(sx, sy, qx):
        with torch.no_grad():
            emb = net(torch.cat([sx, qx]))
        return prototype_logits(emb[:sx.shape[0]], sy, emb[sx.shape[0]:], ways)

    def batched(eps):
        x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])
        emb = net(x).split([e.support_x.shape[0] + e.query_x.shape[0] for e in eps])
        return [prototype_logits(m[:e.support_x.shape[0]], e.support_y, m[e.support_x.shape[0]:], ways)
                for m, e in zip(emb, eps)]

    def make_compiled():
        compiled = torch.compile(net)

        def predict(sx, sy, qx):
            emb = compiled(torch.cat([sx, qx]))
            return prototype_logits(emb[:sx.shape[0]], sy, emb[sx.shape[0]:], ways)
        return predict

    return {"eager": eager, PREDICT: learner.predict}, batched, make_compiled


PREDICT = "ProtoNet.predict (folded, frozen)"


def protonet_setup_s(learner, episode) -> float:
    """Seconds ``ProtoNet.predict`` spends building its test-time network: the first call on a
    fresh ``InferenceNet`` minus a later call."""
    from metabench.inference import InferenceNet

    learner._inference = InferenceNet(learner.net)
    args = (episode.support_x, episode.support_y, episode.query_x)
    start = time.perf_counter()
    learner.predict(*args)
    first = time.perf_counter() - start
    start = time.perf_counter()
    learner.predict(*args)
    return max(0.0, first - (time.perf_counter() - start))


# ----------------------------------------------------------------------------- MAML
def maml_variants(learner, protocol):
    import copy

    from metabench_plugins.learners.maml import adapt
    from metabench_plugins.learners.maml_vmap import with_basic_batchnorm

    c = learner.config
    model = learner.model
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def channels_last(sx, sy, qx):
        sx = sx.contiguous(memory_format=torch.channels_last)
        qx = qx.contiguous(memory_format=torch.channels_last)
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True) for n, p in cl_model.named_parameters()}
            adapted = adapt(cl_model, params, sx, sy, c.inner_lr, c.eval_inner_steps, first_order=True)
        return functional_call(cl_model, {n: t.detach() for n, t in adapted.items()}, (qx,))

    fmodel = with_basic_batchnorm(model)
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def episode_logits(p, sx, sy, qx):
        def support_loss(q):
            return F.cross_entropy(functional_call(fmodel, q, (sx,)), sy)
        for _ in range(c.eval_inner_steps):
            g = grad(support_loss)(p)
            p = {n: p[n] - c.inner_lr * g[n] for n in p}
        return functional_call(fmodel, p, (qx,))

    batched_fn = vmap(episode_logits, in_dims=(None, 0, 0, 0))

    def batched(eps):
        logits = batched_fn(theta, torch.stack([e.support_x for e in eps]), torch.stack([e.support_y for e in eps]),
                            torch.stack([e.query_x for e in eps]))
        return list(logits.unbind(0))

    def make_compiled():
        fwd = torch.compile(lambda params, x: functional_call(model, params, (x,)))

        def predict(sx, sy, qx):
            with torch.enable_grad():
                params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
                for _ in range(c.eval_inner_steps):
                    loss = F.cross_entropy(fwd(params, sx), sy)
                    grads = torch.autograd.grad(loss, list(params.values()))
                    params = {n: (p - c.inner_lr * g).detach().requires_grad_(True)
                              for (n, p), g in zip(params.items(), grads)}
            return fwd({n: p.detach() for n, p in params.items()}, qx)
        return predict

    return {"eager": learner.predict, "channels_last": channels_last}, batched, make_compiled


# ----------------------------------------------------------------------------- measuring
def agreement(reference, got) -> tuple[float, float]:
    """(fraction of queries whose argmax equals eager's, largest logit difference)."""
    same = torch.cat([a.argmax(1) == b.argmax(1) for a, b in zip(reference, got)]).double().mean().item()
    diff = max((a - b).abs().max().item() for a, b in zip(reference, got))
    return same, diff


def measure(name, learner_variants, episodes, n_total, reps, compile_too, batches=(BATCH,), setup_s=None,
            sync=None):
    """Every variant interleaved, with its agreement with eager.

    batches: episodes per forward of the batched variants; setup_s: {variant: one-time seconds} to
    count over ``n_total`` episodes in an extra row; sync: called at the end of every timed call
    (``torch.cuda.synchronize`` on a GPU).
    """
    per_episode, batched, make_compiled = learner_variants

    def per_call(f):
        out = run_predict(f, episodes)
        if sync is not None:
            sync()
        return out

    def many(b):
        out = run_batched(batched, episodes, b)
        if sync is not None:
            sync()
        return out

    variants = {k: (lambda f=f: per_call(f), len(episodes)) for k, f in per_episode.items()}
    for b in batches:
        variants[f"batched x{b}"] = (lambda b=b: many(b), len(episodes))
    reference = per_call(per_episode["eager"])
    checks = {k: agreement(reference, per_call(f)) for k, f in per_episode.items() if k != "eager"}
    for b in batches:
        checks[f"batched x{b}"] = agreement(reference, many(b))
    compile_s = None
    if compile_too:
        import torch._dynamo
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        with inductor_config.patch(force_disable_caches=True):  # a cold compile, as on a fresh machine
            compiled = make_compiled()
            start = time.perf_counter()
            with torch.no_grad():
                compiled(episodes[0].support_x, episodes[0].support_y, episodes[0].query_x)
            if sync is not None:
                sync()
            compile_s = time.perf_counter() - start
        variants["torch.compile (steady)"] = (lambda: per_call(compiled), len(episodes))
        checks["torch.compile (steady)"] = agreement(reference, per_call(compiled))
    result = common.interleaved(variants, reps=reps)
    rows, data = [], {"compile_s": compile_s, "checks": checks, "rates": {}, "ratios_vs_eager": {}}
    for k in variants:
        same, diff = checks.get(k, (1.0, 0.0))
        rows.append([name, k, common.fmt(result.rate(k)), f"{result.spread(k):.0%}",
                     common.fmt(result.ratio(k, "eager")), f"{same:.2%}", f"{diff:.1e}"])
        data["rates"][k] = result.rate(k)
        data["ratios_vs_eager"][k] = result.ratio(k, "eager")
    for k, secs in (setup_s or {}).items():
        total = n_total / (secs + n_total / result.rate(k))
        same, diff = checks.get(k, (1.0, 0.0))
        rows.append([name, f"{k} incl. {secs:.2f} s setup, {n_total} episodes", common.fmt(total), "",
                     common.fmt(total / result.rate("eager")), f"{same:.2%}", f"{diff:.1e}"])
        data["rates"][f"{k} incl. setup"] = total
        data.setdefault("setup_s", {})[k] = secs
    if compile_s is not None:
        steady = result.rate("torch.compile (steady)")
        total = n_total / (compile_s + n_total / steady)
        ratio = total / result.rate("eager")
        rows.append([name, f"torch.compile incl. {compile_s:.1f} s cold compile, {n_total} episodes",
                     common.fmt(total), "", common.fmt(ratio),
                     f"{checks['torch.compile (steady)'][0]:.2%}", f"{checks['torch.compile (steady)'][1]:.1e}"])
        data["rates"]["torch.compile incl. compile"] = total
        data["compile_incl_ratio"] = ratio
    for k, (same, _) in checks.items():
        if same < 1.0:
            data.setdefault("mismatches", []).append(k)
    return rows, data


def main(argv=None) -> None:
    parser = common.arg_parser(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes ~20 s per model)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc at its defaults (metabench run tunes it: metabench/malloc.py)")
    args = common.parse(parser, argv)
    from metabench.malloc import tune_glibc_malloc

    tuned = False if args.default_malloc else tune_glibc_malloc()
    n = 4 if args.quick else 50
    width = 4 if args.quick else 64
    compile_too = not args.no_compile and not args.quick
    rows, data = [], {}
    protocol, episodes = episodes_of("kanji-5w5s", n)
    learner = protonet_learner(protocol, width)
    setup = {PREDICT: protonet_setup_s(learner, episodes[0])}
    r, d = measure("ProtoNet 5w5s", protonet_variants(learner, protocol), episodes, protocol.episodes,
                   args.reps, compile_too, batches=(2 if args.quick else BATCH,), setup_s=setup)
    rows += r
    data["protonet"] = d
    protocol, episodes = episodes_of("kanji-5w1s", n)
    learner = maml_learner(protocol, width)
    r, d = measure("MAML 5w1s", maml_variants(learner, protocol), episodes, protocol.episodes, args.reps, compile_too,
                   batches=(2 if args.quick else BATCH,))
    rows += r
    data["maml"] = d
    md = [f"Test episodes per second, conv4-{width}, {n} episodes per repetition, median of {args.reps} "
          "interleaved repetitions; 'vs eager' per repetition then median; 'same argmax': share of queries predicted "
          "as by eager; 'max |dlogit|': largest logit difference from eager. glibc malloc: "
          + ("metabench's setting for every variant, as `metabench run` has it (metabench/malloc.py)." if tuned else
             "left at glibc's defaults."), "",
          common.table(["learner", "variant", "episodes/s", "spread", "vs eager", "same argmax", "max |dlogit|"], rows)]
    if not compile_too:
        md += ["", "- torch.compile skipped (--quick or --no-compile)."]
    common.emit(args, "4. Evaluation", "\n".join(md), data)


if __name__ == "__main__":
    main()
