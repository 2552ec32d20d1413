"""GPU path: MAML steps, memory, evaluation and whole runs on one CUDA device.

One script, sized to finish within a few minutes on one GPU (``--deadline-s``: sections that would
start after it are skipped and say so). Every section's figures are written to ``--json`` as soon
as the section ends, so a run cut short still leaves what it measured.

1. ceilings:  float32 matmul FLOP/s (TF32 off and on), bf16 matmul FLOP/s, device-to-device copy
              bandwidth (bytes read + written).
2. maml:      second-order MAML meta-training tasks/s (conv4, 5w1s15q, 1 and 5 inner steps, 28 px /
              64 filters and 84 px / 32 filters, meta-batch 4 and 32): metabench's per-task loop,
              ``task_batching=vmap``, per-task backward, checkpointed inner loop, the functional and
              grouped-convolution attempts, learn2learn and higher where importable. Float64
              meta-gradients are checked against the loop first (1e-5 relative), on the GPU.
3. memory:    peak CUDA memory (``torch.cuda.max_memory_allocated`` above what was allocated
              before the step) of one second-order step, 84 px, 5 and 10 inner steps.
4. eval:      ProtoNet (kanji-5w5s) and MAML (kanji-5w1s) test episodes/s: eager one episode per
              forward, channels_last, several episodes per forward, ``torch.compile`` (cold compile
              counted over the protocol's 600 episodes); share of identical predictions.
5. targets:   the issue's time targets: the MAML learner itself (``task_batching`` as ``auto``
              resolves it on the device) at its paper configuration (plugins/learners/maml.toml) of
              Omniglot 5-way 1-shot (28 px, conv4-64, meta-batch 32, 1 inner step) and mini-ImageNet
              5-way 1-shot (84 px, conv4-32, meta-batch 4, 5 inner steps), second order: meta-steps
              (meta_backward + Adam step) on tasks of the protocol's shapes already on the GPU, up to
              1,000 steps or the section's time, projected to the paper's 60,000 steps and set
              against 30 and 60 minutes; learn2learn's MAML on the same model and tasks where it is
              importable. Episode loading is not in the step (metabench's episodes come from a uint8
              array in memory; the quick runs of section 6 time it whole).
6. runs:      ``metabench run --device cuda`` of every registered learner on kanji-5w1s at budget
              ``smoke`` (each in its own process), ProtoNet twice (are GPU results repeatable?),
              then ``quick`` for the learners time allows.

Timing: every repetition ends with ``torch.cuda.synchronize()``; variants are interleaved as in
the CPU benchmarks (benchmarks/common.py). cuDNN's TF32 convolutions are PyTorch's default
(``torch.backends.cudnn.allow_tf32``) and stay on for the float32 figures, as in ``metabench run``'s
training (its evaluation turns TF32 off: metabench/numerics.py).

    python benchmarks/bench_gpu.py --json gpu.json             # on a CUDA machine
    python benchmarks/bench_gpu.py --device cpu --quick        # dry run of every section on CPU
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

STARTED = time.perf_counter()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synced(fn, device):
    def run():
        fn()
        sync(device)
    return run


def left(args) -> float:
    return args.deadline_s - (time.perf_counter() - STARTED)


#: each section's share of the deadline (renormalised over the sections asked for); a section
#: starts no new measurement once the shares of it and the sections before it are spent
SECTION_SHARE = {"ceilings": 0.03, "maml": 0.34, "memory": 0.08, "eval": 0.15, "targets": 0.15, "runs": 0.25}
SECTIONS = tuple(SECTION_SHARE)


def until(args, section: str) -> float:
    """Seconds left before ``section``'s share of the deadline ends."""
    chosen = [s for s in SECTIONS if s in args.sections]
    total = sum(SECTION_SHARE[s] for s in chosen)
    end = sum(SECTION_SHARE[s] for s in chosen[:chosen.index(section) + 1]) / total
    return end * args.deadline_s - (time.perf_counter() - STARTED)


def to_device(tasks, device):
    return [type(t)(t.support_x.to(device), t.support_y.to(device), t.query_x.to(device), t.query_y.to(device))
            for t in tasks]


# ----------------------------------------------------------------------------- 1. ceilings
def ceilings(args) -> dict:
    dev = args.device
    n = 256 if args.quick else 8192
    out = {}

    def mm_rate(dtype, tf32):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            for _ in range(3):
                a @ b
            sync(dev)
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                a @ b
                sync(dev)
                times.append(time.perf_counter() - t0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return 2 * n ** 3 / statistics.median(times)

    out["matmul_fp32_flops"] = mm_rate(torch.float32, False)
    out["matmul_tf32_flops"] = mm_rate(torch.float32, True)
    out["matmul_bf16_flops"] = mm_rate(torch.bfloat16, False)
    x = torch.randn((1 << 18) if args.quick else (1 << 30), device=dev)  # 4 GiB on the GPU
    y = torch.empty_like(x)
    y.copy_(x)
    sync(dev)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        sync(dev)
        times.append(time.perf_counter() - t0)
    out["copy_bytes_per_s"] = 2 * x.numel() * 4 / statistics.median(times)
    del x, y
    return out


# ----------------------------------------------------------------------------- 2. maml steps
def maml_classes():
    from benchmarks import maml_variants as mv

    classes = [(c, {}) for c in (mv.MetabenchLoop, mv.MetabenchVmap, mv.MetabenchGrouped, mv.MetabenchPerTask,
                                 mv.MetabenchCheckpointed,
                                 mv.MetabenchChannelsLast, mv.FunctionalFused, mv.GroupedTasks)]
    notes = []
    for module, cls in (("learn2learn", mv.Learn2Learn), ("higher", mv.Higher)):
        mod = common.peer(module)
        if mod is None:
            notes.append(common.skipped(module))
        else:
            classes.append((cls, {module if module != "learn2learn" else "l2l": mod}))
    return classes, notes


def maml_steps(args, peak_fp32: float, peak_tf32: float) -> dict:
    """Each variant's step is timed once first (a failure is noted, not fatal); a repetition is as
    many steps as take about 0.25 s for the loop. Meta-batch 32 runs only the batching variants."""
    from benchmarks import bench_maml as bm
    from benchmarks import maml_variants as mv

    dev = args.device
    classes, notes = maml_classes()
    batching = {mv.MetabenchLoop, mv.MetabenchVmap, mv.MetabenchGrouped, mv.MetabenchPerTask, mv.GroupedTasks,
                mv.Learn2Learn}
    if args.quick:
        configs = [(16, 4, 1, 1, 2)]
    else:
        configs = [(s, w, c, k, mb) for mb in (4, 32) for (s, w, c) in ((28, 64, 1), (84, 32, 3)) for k in (1, 5)]
    if args.maml_meta_batches:
        configs = [c for c in configs if c[4] in args.maml_meta_batches]
    if args.maml_sizes:
        configs = [c for c in configs if c[0] in args.maml_sizes]
    data, rows = {"configs": {}, "notes": notes}, []
    for size, width, channels, steps, meta_batch in configs:
        key = f"{size}px conv4-{width} {steps} step{'s' if steps > 1 else ''} meta-batch {meta_batch}"
        if until(args, "maml") < 15:
            notes.append(f"{key}: skipped (this section's time was up)")
            continue
        template, tasks = bm.make_setup(size, width, channels, classes=100, meta_batch=meta_batch)
        template, tasks = template.to(dev), to_device(tasks, dev)
        chosen = [(c, e) for c, e in classes if meta_batch <= 4 or c in batching]
        try:
            agreement = bm.check_agreement(template, tasks, steps, chosen) if meta_batch <= 4 else {}
        except Exception as exc:  # a variant disagreeing is a finding, not a crash
            agreement = {"error": f"{type(exc).__name__}: {exc}"}
            notes.append(f"{key}: agreement check failed: {agreement['error']}")
        flops = bm.count_flops(template, tasks, steps)
        built, first = {}, {}
        for cls, extra in chosen:
            try:
                v = cls(template, tasks, bm.INNER_LR, steps, **extra)
                v.step()  # warm-up: cuDNN algorithm choice, Adam state, vmap tracing
                sync(dev)
                t0 = time.perf_counter()
                v.step()
                sync(dev)
                first[cls.name] = time.perf_counter() - t0
                built[cls.name] = v
            except Exception as exc:
                notes.append(f"{key}: {cls.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        base = mv.MetabenchLoop.name
        steps_per_rep = 1 if args.quick else max(1, min(20, round(0.25 / first.get(base, 0.25))))
        variants = {}
        for name, v in built.items():
            def rep(v=v):
                for _ in range(steps_per_rep):
                    v.step()
            variants[name] = (synced(rep, dev), steps_per_rep * meta_batch)
        result = common.interleaved(variants, reps=args.reps, warmup=0)
        l2l = mv.Learn2Learn.name if mv.Learn2Learn.name in variants else None
        step_s = meta_batch / result.rate(base)
        data["configs"][key] = {
            "tasks_per_s": {n: result.rate(n) for n in variants},
            "spread": {n: result.spread(n) for n in variants},
            "ratios_vs_loop": {n: result.ratio(n, base) for n in variants},
            "ratios_vs_learn2learn": {n: result.ratio(n, l2l) for n in variants} if l2l else {},
            "meta_gradient_relative_difference": agreement, "steps_per_rep": steps_per_rep,
            "flops_per_step": flops, "achieved_flops": flops / step_s,
            "fraction_of_fp32_matmul": flops / step_s / peak_fp32,
            "fraction_of_tf32_matmul": flops / step_s / peak_tf32,
        }
        for n in variants:
            rows.append([key, n, common.fmt(result.rate(n)), f"{result.spread(n):.0%}",
                         common.fmt(result.ratio(n, base)), common.fmt(result.ratio(n, l2l)) if l2l else "n/a",
                         f"{agreement[n]:.1e}" if isinstance(agreement.get(n), float) else "-"])
        del built, variants
        data["rows"] = rows
        write_partial(args, "maml", data)
    data["rows"] = rows
    return data


# ----------------------------------------------------------------------------- 3. memory
def maml_memory(args) -> dict:
    from benchmarks import bench_maml as bm

    dev = args.device
    if not dev.startswith("cuda"):
        return {"note": "peak CUDA memory needs a CUDA device"}
    classes, notes = maml_classes()
    data, rows = {"notes": notes, "peaks_mib": {}, "step_s": {}}, []
    for steps in ((1,) if args.quick else (5, 10)):
        template, tasks = bm.make_setup(16 if args.quick else 84, 4 if args.quick else 32, 3, classes=100)
        template, tasks = template.to(dev), to_device(tasks, dev)
        for cls, extra in classes:
            if until(args, "memory") < 5:
                notes.append(f"{steps} steps {cls.name}: skipped (this section's time was up)")
                continue
            try:
                v = cls(template, tasks, bm.INNER_LR, steps, **extra)
                v.step()  # warm-up: cuDNN algorithm choice, Adam state
                sync(dev)
                times = []
                peak = 0.0
                for _ in range(3):
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    v.step()
                    sync(dev)
                    times.append(time.perf_counter() - t0)
                    peak = max(peak, (torch.cuda.max_memory_allocated() - before) / 2 ** 20)
                del v
            except Exception as exc:
                notes.append(f"{steps} steps {cls.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            k = f"{steps} steps / {cls.name}"
            data["peaks_mib"][k] = peak
            data["step_s"][k] = statistics.median(times)
        loop = f"{steps} steps / metabench loop"
        for cls, _ in classes:
            k = f"{steps} steps / {cls.name}"
            if k in data["peaks_mib"] and loop in data["peaks_mib"]:
                rows.append([str(steps), cls.name, f"{data['peaks_mib'][k]:,.0f}",
                             common.fmt(data["peaks_mib"][loop] / data["peaks_mib"][k]),
                             common.fmt(data["step_s"][k] / data["step_s"][loop])])
        write_partial(args, "memory", data)
    data["rows"] = rows
    return data


# ----------------------------------------------------------------------------- 4. evaluation
def evaluation(args) -> dict:
    from benchmarks import bench_eval as be

    dev = args.device
    n = 4 if args.quick else 100
    width = 4 if args.quick else 64
    data, rows = {}, []
    protocol, episodes = be.episodes_of("kanji-5w5s", n)
    episodes = to_device(episodes, dev)
    learner = be.protonet_learner(protocol, width, dev)
    batches = (2,) if args.quick else (10, 50)
    r, d = be.measure("ProtoNet 5w5s", be.protonet_variants(learner, protocol), episodes, protocol.episodes,
                      args.reps, not args.quick and until(args, "eval") > 60, batches=batches, sync=lambda: sync(dev))
    rows += r
    data["protonet"] = d
    write_partial(args, "eval", data)
    protocol, episodes = be.episodes_of("kanji-5w1s", n)
    episodes = to_device(episodes, dev)
    learner = be.maml_learner(protocol, width, dev)
    r, d = be.measure("MAML 5w1s", be.maml_variants(learner, protocol), episodes, protocol.episodes, args.reps,
                      False, batches=batches, sync=lambda: sync(dev))
    rows += r
    data["maml"] = d
    data["rows"] = rows
    return data


# ----------------------------------------------------------------------------- 5. whole runs
def whole_runs(args) -> dict:
    """Smoke runs of every learner at once (one process each, one CPU thread each; the GPU is
    shared, so their times are not each learner's alone), ProtoNet twice among them; then quick
    runs one at a time, as many as the deadline allows."""
    import hashlib

    from metabench.plugins import get_host

    learners = sorted(get_host().learners.names()) if not args.quick else ["protonet"]
    data, rows = {"smoke": {}, "quick": {}, "notes": []}, []
    out_dir = Path(tempfile.mkdtemp(prefix="mb-gpu-runs-"))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def command(learner, budget, folder, episodes):
        cmd = [sys.executable, "-c", "import sys; from metabench.cli import main; sys.exit(main())", "run",
               "--learner", learner, "--task", "kanji-5w1s", "--budget", budget, "--device", args.device,
               "--out", str(folder)]
        return cmd + (["--episodes", str(episodes)] if episodes else [])

    def collect(label, proc, folder, wall):
        files = sorted(folder.glob("*.json"))
        if proc.returncode != 0 or not files:
            tail = (proc.stderr.read() if proc.stderr else "").strip().splitlines()[-12:]
            data["notes"].append(f"{label}: exit {proc.returncode}: " + " | ".join(tail))
            return None
        doc = json.loads(files[0].read_text())
        return {"wall_s": wall, "mean": doc["summary"]["mean"], "ci95": doc["summary"]["ci95"],
                "timing": doc["timing"], "device_name": doc["environment"]["device_name"],
                "torch": doc["environment"]["torch"],
                "per_episode_sha256": hashlib.sha256(json.dumps(doc["per_episode"], sort_keys=True).encode())
                .hexdigest()[:16]}

    def row(label, budget, r):
        rows.append([label, budget, f"{r['wall_s']:.1f}", f"{r['timing']['meta_train_s']:.1f}",
                     f"{r['timing']['eval_s']:.1f}", f"{r['mean']:.2%} ± {r['ci95']:.2%}", r["per_episode_sha256"]])

    smoke_episodes = 20 if args.quick else 100
    jobs = [(learner, "a") for learner in learners] + [("protonet", "b")] if args.smoke else []
    procs = {}
    t0 = time.perf_counter()
    for learner, tag in jobs:
        folder = out_dir / f"{learner}-smoke-{tag}"
        procs[(learner, tag)] = (subprocess.Popen(command(learner, "smoke", folder, smoke_episodes), env=env,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                                 folder)
    walls = {}
    while any(p.poll() is None for p, _ in procs.values()):
        if left(args) < 20:
            for (learner, tag), (p, _) in procs.items():
                if p.poll() is None:
                    p.kill()
                    data["notes"].append(f"{learner} smoke {tag}: killed at the deadline")
            break
        time.sleep(0.2)
        for k, (p, _) in procs.items():
            if p.poll() is not None and k not in walls:
                walls[k] = time.perf_counter() - t0
    for (learner, tag), (p, folder) in procs.items():
        p.wait()
        r = collect(f"{learner} smoke {tag}", p, folder, walls.get((learner, tag), float("nan")))
        if r and tag == "a":
            data["smoke"][learner] = r
            row(learner, "smoke", r)
        elif r:
            data["smoke_again"] = r
            row(f"{learner} (again)", "smoke", r)
    data["smoke_all_wall_s"] = time.perf_counter() - t0
    if "smoke_again" in data and "protonet" in data["smoke"]:
        data["protonet_repeat_identical"] = (data["smoke_again"]["per_episode_sha256"]
                                             == data["smoke"]["protonet"]["per_episode_sha256"])
    write_partial(args, "runs", data)
    for spec in ([] if args.quick else args.quick_runs):
        learner, *settings = spec.split(":")
        if left(args) < 60:
            data["notes"].append(f"{spec} quick: skipped (deadline)")
            continue
        folder = out_dir / f"{spec.replace(':', '-').replace('=', '-')}-quick"
        t1 = time.perf_counter()
        cmd = command(learner, "quick", folder, None) + [a for kv in settings for a in ("--set", kv)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=max(10, left(args) - 10))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            data["notes"].append(f"{spec} quick: killed at the deadline")
            continue
        r = collect(f"{spec} quick", p, folder, time.perf_counter() - t1)
        if r:
            doc = json.loads(sorted(folder.glob("*.json"))[0].read_text())
            r["task_batching"] = doc["learner"]["config"].get("task_batching")
            data["quick"][spec] = r
            label = spec + (f" (task_batching {r['task_batching']})" if r["task_batching"] else "")
            row(label, "quick", r)
        write_partial(args, "runs", data)
    data["rows"] = rows
    return data


# ----------------------------------------------------------------------------- 5. time targets
#: (paper-config table of plugins/learners/maml.toml, channels, image size, minutes allowed for its meta_steps)
TARGETS = (("omniglot-5w1s", 1, 28, 30.0), ("miniimagenet-5w1s", 3, 84, 60.0))


def paper_maml(task: str, channels: int, size: int, device: str):
    """The MAML learner with budget paper's settings and ``task``'s table of maml.toml, its backbone
    built with the table's options, on ``device``; and the table."""
    from metabench.runner import paper_settings
    from metabench.task import Protocol
    from metabench_plugins.backbones.conv4 import conv4
    from metabench_plugins.learners.maml import MAML

    table = paper_settings(MAML, task, "maml")  # maml.toml's table, as `--budget paper` reads it
    options = table.pop("backbone", {})
    table.pop("validation", None)
    values = {**MAML.budgets["paper"], **table}
    protocol = Protocol(name=task, version=1, dataset=task.split("-")[0], ways=5, shots=1, queries=15, episodes=600,
                        image_size=size, channels=channels)
    torch.manual_seed(0)
    learner = MAML(MAML.Config(**values), conv4(channels, size, **options), protocol, torch.device(device))
    return learner, values


def peer_step_seconds(model, tasks, config, device: str, budget: float, limit: int) -> float | None:
    """Seconds per meta-step of learn2learn's MAML (benchmarks/maml_variants.Learn2Learn: clone,
    adapt, per-task backward) on the same model copy and tasks; None where it is not installed."""
    from benchmarks import maml_variants as mv

    l2l = common.peer("learn2learn")
    if l2l is None:
        return None
    variant = mv.Learn2Learn(model, tasks, config.inner_lr, config.inner_steps, l2l=l2l)
    for _ in range(2):
        variant.step()
    sync(device)
    done, started = 0, time.perf_counter()
    while done < limit and (done < 5 or time.perf_counter() - started < budget):
        variant.step()
        done += 1
    sync(device)
    return (time.perf_counter() - started) / done


def time_targets(args) -> dict:
    from metabench.task import Episode

    dev, rows, out = args.device, [], {}
    budget = max(5.0, until(args, "targets") / len(TARGETS))
    for task, channels, size, minutes in TARGETS:
        learner, values = paper_maml(task, channels, size, dev)
        c = learner.config
        if args.quick:
            c.meta_batch, size_note = 2, " (dry run: meta-batch 2)"
        else:
            size_note = ""
        g = torch.Generator().manual_seed(1)
        labels = torch.arange(5)
        tasks = [Episode(torch.rand(5, channels, size, size, generator=g), labels,
                         torch.rand(5 * c.train_queries, channels, size, size, generator=g),
                         labels.repeat_interleave(c.train_queries)) for _ in range(c.meta_batch)]
        tasks = to_device(tasks, dev)
        opt = torch.optim.Adam(learner.optimized_tensors(), lr=c.meta_lr)

        def step():
            opt.zero_grad(set_to_none=True)
            learner.meta_backward(tasks)
            opt.step()

        for _ in range(1 if args.quick else 3):  # warm-up: cuDNN algorithm choice, allocator
            step()
        sync(dev)
        limit, done, started = (1 if args.quick else 1000), 0, time.perf_counter()
        while done < limit and (done < 20 or time.perf_counter() - started < budget):
            step()
            done += 1
        sync(dev)
        per_step = (time.perf_counter() - started) / done
        projected_min = per_step * values["meta_steps"] / 60
        peer = peer_step_seconds(learner.model, tasks, c, dev, budget / 3, 1 if args.quick else 200)
        key = f"{task}{size_note}"
        out[key] = {"steps_timed": done, "seconds_per_step": per_step, "meta_steps": values["meta_steps"],
                    "projected_minutes": projected_min, "target_minutes": minutes, "meta_batch": c.meta_batch,
                    "inner_steps": c.inner_steps, "task_batching": c.task_batching, "first_order": c.first_order,
                    "learn2learn_seconds_per_step": peer}
        rows.append([key, f"{size} px, meta-batch {c.meta_batch}, {c.inner_steps} inner step(s), "
                          f"task_batching {c.task_batching}", str(done), f"{per_step * 1e3:.1f}",
                     f"{projected_min:.1f}", f"{minutes:.0f}", "yes" if projected_min <= minutes else "NO",
                     "-" if peer is None else f"{peer * 1e3:.1f}", "-" if peer is None else f"{peer / per_step:.2f}"])
        del learner, opt, tasks
    return {"rows": rows, "configs": out}


# ----------------------------------------------------------------------------- output
PARTIAL: dict = {}


def write_partial(args, name, data) -> None:
    PARTIAL[name] = data
    if args.json:
        args.json.write_text(json.dumps({"machine": gpu_machine(args.device), "sections": PARTIAL},
                                        indent=1, default=str))


def gpu_machine(device: str) -> dict:
    m = common.machine()
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        m.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1),
                  "multiprocessors": p.multi_processor_count, "cuda_runtime": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    return m


def markdown(sections: dict, machine: dict) -> str:
    md = [f"GPU: {machine.get('gpu', 'none')} ({machine.get('gpu_memory_gib', '?')} GiB, "
          f"{machine.get('multiprocessors', '?')} SMs), torch {machine['torch']}, CUDA {machine.get('cuda_runtime')}, "
          f"cuDNN {machine.get('cudnn')}; host {machine['cpu']}, {machine['cores']} cores.", ""]
    c = sections.get("ceilings")
    if c:
        md += [f"Measured ceilings: float32 matmul {c['matmul_fp32_flops'] / 1e12:.1f} TFLOP/s (TF32 off), "
               f"{c['matmul_tf32_flops'] / 1e12:.1f} TFLOP/s (TF32), bf16 {c['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s; "
               f"copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write).", ""]
    m = sections.get("maml")
    if m and m.get("rows"):
        md += ["**MAML meta-training step** (second order, 5w1s15q; tasks/s; float64 meta-gradient difference "
               "from the loop, checked at meta-batch 4):", "",
               common.table(["setup", "variant", "tasks/s", "spread", "vs loop", "vs learn2learn", "meta-grad diff"],
                            m["rows"]), ""]
        for key, d in m["configs"].items():
            md.append(f"- {key}: loop {d['achieved_flops'] / 1e9:.0f} GFLOP/s = {d['fraction_of_fp32_matmul']:.1%} "
                      f"of the float32 matmul ceiling ({d['fraction_of_tf32_matmul']:.1%} of TF32).")
        md += [f"- {n}" for n in m.get("notes", [])] + [""]
    mem = sections.get("memory")
    if mem and mem.get("rows"):
        md += ["**Memory** (84 px, conv4-32, meta-batch 4; peak CUDA memory of one step above what was allocated "
               "before it):", "",
               common.table(["inner steps", "variant", "peak MiB", "loop / this", "time vs loop"], mem["rows"]), ""]
        md += [f"- {n}" for n in mem.get("notes", [])] + [""]
    e = sections.get("eval")
    if e and e.get("rows"):
        md += ["**Evaluation** (conv4-64, test episodes/s):", "",
               common.table(["learner", "variant", "episodes/s", "spread", "vs eager", "same argmax", "max |dlogit|"],
                            e["rows"]), ""]
    t = sections.get("targets")
    if t and t.get("rows"):
        md += ["**Time targets**: MAML's paper configuration, second order, meta-steps timed on the GPU and "
               "projected to the paper's 60,000 (episode loading not included):", "",
               common.table(["protocol", "setup", "steps timed", "ms/step", "projected min", "target min",
                             "within", "learn2learn ms/step", "x learn2learn"], t["rows"]), ""]
    r = sections.get("runs")
    if r and r.get("rows"):
        md += ["**`metabench run --device cuda`** on kanji-5w1s (smoke: 100 test episodes, all learners at once, "
               f"{r.get('smoke_all_wall_s', float('nan')):.0f} s for all; quick: the protocol's 600, one at a time):",
               "", common.table(["learner", "budget", "wall s", "meta-train s", "eval s", "accuracy",
                                 "per-episode sha256[:16]"], r["rows"]), ""]
        if "protonet_repeat_identical" in r:
            md.append(f"- ProtoNet smoke run twice on the GPU: per-episode results "
                      f"{'identical' if r['protonet_repeat_identical'] else 'NOT identical'}.")
        md += [f"- {n}" for n in r.get("notes", [])]
    for name, err in sections.get("errors", {}).items():
        md.append(f"- section {name} failed: {err}")
    return "\n".join(md)


def main(argv=None) -> int:
    p = common.arg_parser(__doc__.splitlines()[0], reps=5)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    p.add_argument("--deadline-s", type=float, default=420.0,
                   help="skip sections and runs that would start after this many seconds (default 420)")
    p.add_argument("--only", nargs="+", choices=SECTIONS)
    p.add_argument("--maml-sizes", nargs="+", type=int, choices=(28, 84), help="maml: only these image sizes")
    p.add_argument("--maml-meta-batches", nargs="+", type=int, choices=(4, 32), help="maml: only these meta-batches")
    p.add_argument("--no-smoke", dest="smoke", action="store_false",
                   help="runs: skip the smoke runs of every learner")
    p.add_argument("--quick-runs", nargs="*", default=["protonet", "maml", "mtl"], metavar="LEARNER[:KEY=VALUE]",
                   help="runs: quick-budget runs, one at a time (default: protonet maml mtl)")
    args = common.parse(p, argv)
    args.sections = tuple(args.only or SECTIONS)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    if args.quick:
        args.reps = min(args.reps, 2)
    want = set(args.sections)
    errors = {}
    c = {}
    if "ceilings" in want:
        c = ceilings(args)
        write_partial(args, "ceilings", c)
    peak32 = c.get("matmul_fp32_flops", float("nan"))
    peak_tf32 = c.get("matmul_tf32_flops", float("nan"))
    for name, fn in (("maml", lambda: maml_steps(args, peak32, peak_tf32)), ("memory", lambda: maml_memory(args)),
                     ("eval", lambda: evaluation(args)), ("targets", lambda: time_targets(args)),
                     ("runs", lambda: whole_runs(args))):
        if name not in want:
            continue
        t0 = time.perf_counter()
        print(f"== {name} (at {t0 - STARTED:.0f} s)", flush=True)
        try:
            write_partial(args, name, fn())
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"   {name} took {time.perf_counter() - t0:.0f} s", flush=True)
        PARTIAL["errors"] = errors
    md = markdown(PARTIAL, gpu_machine(args.device))
    print(md)
    if args.json:  # the format of benchmarks/common.emit, so run_all.py can keep it as a section
        doc = {"title": "6. GPU path", "markdown": f"## 6. GPU path\n\n{md.strip()}\n", "data": PARTIAL,
               "machine": gpu_machine(args.device), "sections": PARTIAL,
               "run": {"command": "bash benchmarks/gpu_run.sh " + " ".join(sys.argv[1:]),
                       "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() - (time.perf_counter() - STARTED))),
                       "seconds": round(time.perf_counter() - STARTED),
                       "load_before": [float("nan")] * 3, "load_after": list(common.load_average())}}
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
