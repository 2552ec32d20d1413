"""Benchmark 1: episodes per second, 5-way 5-shot 15-query, at 28 px and 84 px.

Variants, all drawing from the same images (kanji's training split; at 84 px its first classes
upscaled to 3 x 84 x 84, miniImageNet's shape):

* metabench:        ``TrainSampler.sample``, one episode per call, as the episodic training loop
                    takes them. It reads ahead: the next episodes of the same shape are drawn in
                    one pass (``ClassImageSource.draw_many``: SplitMix64 outputs of all of them
                    mixed at once in NumPy, the Fisher-Yates swaps in Python) and built with one
                    gather and one scaling (``materialize_many``: index_select on the uint8 split
                    tensor, / 255 to float32), up to 4 MiB of float32 images (13 episodes at
                    28 px; one at 84 px, where it is the no-read-ahead path). The benchmark
                    also sweeps that bound at 28 px (``read_ahead_sweep``).
* no read-ahead:    the same with ``read_ahead = False``: ``draw`` + ``materialize`` per call.
* metabench x32:    ``TrainSampler.sample_many(32)`` (one ``draw_many`` pass, then one gather and
                    one scaling per block of at most 8 MiB of float32 images), how MAML, ANIL and
                    Meta-SGD take a meta-batch.
* per-image:        the same draws, then a list of PIL images, torchvision ``ToTensor`` per image,
                    ``torch.stack`` (the common Dataset + DataLoader style, without workers).
* learn2learn:      ``TaskDataset`` over a ``MetaDataset`` of the same PIL images with
                    ``FusedNWaysKShots`` + ``LoadData`` + ``RemapLabels`` + ``ConsecutiveLabels``
                    (learn2learn's own benchmark recipe), then the support/query split.

Every variant runs under metabench's glibc malloc setting, as in ``metabench run``
(metabench/malloc.py). Also measured: draw alone (one per call and ``draw_many``) and materialize
alone (where metabench's time goes); an attempt that keeps a float32 copy of the split and only
gathers (no uint8 -> float32 scaling, 4x the memory); and the memory floor: copying one episode's
float32 images (``torch.Tensor.copy_`` of a same-sized block that stays in the caches), the least
any loader must do to hand over float32 images. Per size, ``episode_time_budget`` times the pieces
of one episode alone (draw, the uint8 gather, conversion and / 255 passes of ``materialize``, a
float32 write) next to a Conv4 forward + backward on the same images.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from metabench.rng import SplitMix64  # noqa: E402
from metabench.episodes import TrainSampler  # noqa: E402
from metabench.task import ClassImageSource, Episode, Protocol  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 15
BATCH = 32  # episodes per materialize_many call in the batched variant


class ArraySource(ClassImageSource):
    """A ClassImageSource over an in-memory uint8 tensor with ``per_class`` images per class."""

    splits = ("train",)

    def __init__(self, images: torch.Tensor, per_class: int):
        super().__init__()
        self._images, self._sizes = images, [per_class] * (images.shape[0] // per_class)

    def class_sizes(self, split):
        return self._sizes

    def load_split(self, split, progress=None):
        return self._images


def kanji_images(size: int, classes: int | None) -> torch.Tensor:
    """Kanji training images: 28 px as cached (1 channel); other sizes upscaled to 3 channels."""
    from metabench_plugins.datasets import kanji_data

    images = kanji_data.load_split("train")
    if classes is not None:
        images = images[: classes * kanji_data.INSTANCES_PER_CLASS]
    if size == kanji_data.IMAGE_SIZE:
        return images.contiguous()
    out = []
    for chunk in images.split(2000):
        up = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False)
        out.append(up.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1))
    return torch.cat(out).contiguous()


def bench_protocol(source: ClassImageSource) -> Protocol:
    """The WAYS-way SHOTS-shot QUERIES-query protocol TrainSampler needs over ``source``'s images."""
    return Protocol(name=f"bench-{WAYS}w{SHOTS}s", version=1, dataset="bench", ways=WAYS, shots=SHOTS,
                    queries=QUERIES, episodes=1, image_size=source.images("train").shape[-1])


# ----------------------------------------------------------------------------- variants
def make_variants(source: ClassImageSource, n_fast: int, n_slow: int, l2l) -> tuple[dict, list[str]]:
    from PIL import Image
    from torchvision import transforms

    images = source.images("train")
    notes = []
    rng_c, rng_d = SplitMix64(3), SplitMix64(4)
    draws_for_materialize = [source.draw(SplitMix64(99 + i), "train", WAYS, SHOTS, QUERIES) for i in range(n_fast)]
    protocol = bench_protocol(source)
    reading_ahead, one_per_call, batched = (TrainSampler(protocol, source, seed=s) for s in (1, 2, 3))
    one_per_call.read_ahead = False
    reading_ahead.sample()  # its first call learns the episode's size; later ones read ahead

    def metabench():
        for _ in range(n_fast):
            reading_ahead.sample()

    def metabench_no_read_ahead():
        for _ in range(n_fast):
            one_per_call.sample()

    def metabench_batched():
        for _ in range(n_fast // BATCH):
            batched.sample_many(BATCH)

    shape = (WAYS * (SHOTS + QUERIES), *images.shape[1:])
    block, target = torch.rand(shape), torch.empty(shape)

    def copy_floor():
        for _ in range(n_fast):
            target.copy_(block)

    def draw_only():
        for _ in range(n_fast):
            source.draw(rng_c, "train", WAYS, SHOTS, QUERIES)

    rng_e = SplitMix64(5)

    def draw_many_only():
        for _ in range(n_fast // BATCH):
            source.draw_many(rng_e, "train", BATCH, WAYS, SHOTS, QUERIES)

    resident = images.float().div_(255.0)  # a float32 copy of the split (4x the memory)
    index_rows = [torch.tensor(d.support + d.query) for d in draws_for_materialize]

    def float32_gather():
        for rows in index_rows:
            resident.index_select(0, rows)

    def materialize_only():
        for d in draws_for_materialize:
            source.materialize(d, "train")

    array = images.numpy()
    if array.shape[1] == 1:
        pils = [Image.fromarray(array[i, 0]) for i in range(array.shape[0])]
    else:
        pils = [Image.fromarray(array[i].transpose(1, 2, 0)) for i in range(array.shape[0])]
    to_tensor = transforms.ToTensor()

    def per_image():
        for _ in range(n_slow):
            d = source.draw(rng_d, "train", WAYS, SHOTS, QUERIES)
            sx = torch.stack([to_tensor(pils[i]) for i in d.support])
            qx = torch.stack([to_tensor(pils[i]) for i in d.query])
            labels = torch.arange(WAYS)
            Episode(sx, labels.repeat_interleave(SHOTS), qx, labels.repeat_interleave(QUERIES))

    variants = {
        "metabench": (metabench, n_fast),
        "metabench, no read-ahead": (metabench_no_read_ahead, n_fast),
        f"metabench x{BATCH} (sample_many)": (metabench_batched, n_fast // BATCH * BATCH),
        "draw only": (draw_only, n_fast),
        f"draw only, x{BATCH} per pass (draw_many)": (draw_many_only, n_fast // BATCH * BATCH),
        "materialize only": (materialize_only, n_fast),
        "attempt: gather from a float32 copy of the split": (float32_gather, n_fast),
        "floor: float32 copy of an episode": (copy_floor, n_fast),
        "per-image (PIL + ToTensor)": (per_image, n_slow),
    }
    if l2l is not None:
        labels = torch.repeat_interleave(torch.arange(len(source.class_sizes("train"))),
                                         torch.tensor(source.class_sizes("train"))).tolist()

        class PILDataset(torch.utils.data.Dataset):
            def __len__(self):
                return len(pils)

            def __getitem__(self, i):
                return to_tensor(pils[i]), labels[i]

        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(y, []).append(i)
        meta = l2l.data.MetaDataset(PILDataset(), labels_to_indices=by_label)
        taskset = l2l.data.TaskDataset(meta, task_transforms=[
            l2l.data.transforms.FusedNWaysKShots(meta, n=WAYS, k=SHOTS + QUERIES),
            l2l.data.transforms.LoadData(meta),
            l2l.data.transforms.RemapLabels(meta),
            l2l.data.transforms.ConsecutiveLabels(meta),
        ], num_tasks=-1)
        per = SHOTS + QUERIES
        support_mask = (torch.arange(WAYS * per) % per) < SHOTS

        def learn2learn():
            for _ in range(n_slow):
                x, y = taskset.sample()
                Episode(x[support_mask], y[support_mask], x[~support_mask], y[~support_mask])

        variants["learn2learn TaskDataset"] = (learn2learn, n_slow)
    else:
        notes.append(common.skipped("learn2learn"))
    return variants, notes


def read_ahead_sweep(source: ClassImageSource, n: int, reps: int) -> tuple[str, dict]:
    """``TrainSampler.sample`` rate for several ``READ_AHEAD_BYTES`` (interleaved repetitions)."""
    protocol = bench_protocol(source)
    variants = {}
    for mib in (0.5, 1, 2, 4, 8):
        sampler = TrainSampler(protocol, source, seed=11)
        sampler.READ_AHEAD_BYTES = int(mib * 2**20)
        sampler.sample()

        def take(s=sampler):  # keeps no episode alive, as a training loop does not
            for _ in range(n):
                s.sample()

        variants[f"{mib:g} MiB"] = (take, n)
    result = common.interleaved(variants, reps=reps)
    episode = source.materialize(source.draw(SplitMix64(0), "train", WAYS, SHOTS, QUERIES), "train")
    per_episode = episode.support_x.nbytes + episode.query_x.nbytes
    rows = [[name, str(max(1, min(TrainSampler.READ_AHEAD_MAX, int(float(name.split()[0]) * 2**20) // per_episode))),
             common.fmt(result.rate(name)), f"{result.spread(name):.0%}"] for name in variants]
    text = common.table(["READ_AHEAD_BYTES", "episodes per read", "episodes/s", "spread"], rows)
    return text, {name: {"episodes_per_s": result.rate(name), "times_s": result.times[name]} for name in variants}


def episode_time_budget(source: ClassImageSource, n: int, steps: int, reps: int) -> tuple[str, dict]:
    """Where one episode's time goes at this size, each piece alone (interleaved repetitions, µs
    per episode): the draw (``draw_many`` of BATCH episodes, as the read-ahead draws), the three
    passes of ``materialize`` (uint8 gather of the rows, uint8 -> float32 conversion, in-place
    / 255; each into a buffer reused across calls, so no allocation is counted), materialize
    itself, writing a float32 episode and nothing else (``fill_``), and ``steps`` forward +
    backward passes of Conv4 (32 and 64 filters) on the episode's 100 images, next to which a
    training loop spends a loader's time."""
    from metabench_plugins.backbones.conv4 import conv4

    draws = source.draw_many(SplitMix64(5), "train", n, WAYS, SHOTS, QUERIES)
    rows = [torch.tensor(d.support + d.query) for d in draws]
    images = source.images("train")
    gathered = torch.empty((len(rows[0]), *images.shape[1:]), dtype=torch.uint8)
    scaled = torch.empty(gathered.shape)

    def draw_in_batches():  # as the read-ahead and sample_many draw: BATCH episodes per pass
        rng = SplitMix64(9)
        for _ in range(n // BATCH):
            source.draw_many(rng, "train", BATCH, WAYS, SHOTS, QUERIES)

    def passes(fn):
        def run():
            for r in rows:
                fn(r)
        return run, n

    def gather(r):
        torch.index_select(images, 0, r, out=gathered)

    def convert(_):
        scaled.copy_(gathered)

    def divide(_):
        scaled.div_(255.0)

    def write(_):
        scaled.fill_(0.5)

    def step(width: int):
        net = conv4(images.shape[1], images.shape[-1], width=width).module
        episode = source.materialize(draws[0], "train")
        x = torch.cat([episode.support_x, episode.query_x])  # [100, C, H, W]

        def run():
            for _ in range(steps):
                net.zero_grad(set_to_none=True)
                net(x).sum().backward()
        return run, steps

    variants = {
        f"draw (draw_many x{BATCH}, per episode)": (draw_in_batches, n - n % BATCH),
        "uint8 gather of the episode's rows": passes(gather),
        "uint8 -> float32 conversion": passes(convert),
        "/ 255 in place": passes(divide),
        "materialize (the three passes, fresh output)": passes(lambda r: images.index_select(0, r).float().div_(255.0)),
        "write a float32 episode only (fill_)": passes(write),
        "Conv4-32 forward + backward on the episode": step(32),
        "Conv4-64 forward + backward on the episode": step(64),
    }
    result = common.interleaved(variants, reps=reps)
    us = {name: 1e6 / result.rate(name) for name in variants}
    table_rows = [[name, f"{us[name]:,.1f}", f"{result.spread(name):.0%}"] for name in variants]
    return common.table(["piece", "µs per episode", "spread"], table_rows), us


def profile_draw(source: ClassImageSource, n: int) -> str:
    """cProfile of ``TrainSampler.sample`` (reading ahead): the top entries by own time."""
    import cProfile
    import io
    import pstats

    protocol = bench_protocol(source)
    sampler = TrainSampler(protocol, source, seed=7)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        sampler.sample()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:start + 9])


def main(argv=None) -> None:
    args = common.parse(common.arg_parser(__doc__.splitlines()[0], reps=7), argv)
    from metabench.malloc import tune_glibc_malloc

    tune_glibc_malloc()  # as `metabench run` does (metabench/malloc.py), for every variant alike
    l2l = common.peer("learn2learn")
    n_fast, n_slow = (50, 5) if args.quick else (2000, 40)
    sizes = [(28, 60), (84, 60)] if args.quick else [(28, None), (84, 600)]
    rows, data, notes, profiles, budgets = [], {}, [], {}, {}
    for size, classes in sizes:
        source = ArraySource(kanji_images(size, classes), per_class=20)
        source.prepare("train")
        variants, v_notes = make_variants(source, n_fast, n_slow, l2l)
        notes += v_notes
        result = common.interleaved(variants, reps=args.reps)
        base = "metabench"
        for name in variants:
            part = name.startswith(("draw only", "materialize only", "floor", "attempt"))  # not rivals
            batched = f"metabench x{BATCH} (sample_many)"
            rows.append([f"{size} px", name, common.fmt(result.rate(name)), f"{result.spread(name):.0%}",
                         "-" if part else common.fmt(result.ratio(base, name)),
                         "-" if part else common.fmt(result.ratio(batched, name))])
        data[f"{size}px"] = {n: {"episodes_per_s": result.rate(n), "times_s": result.times[n],
                                 "episodes_per_rep": result.work[n]} for n in variants}
        data[f"{size}px"]["ratios"] = {f"metabench/{n}": result.ratio(base, n) for n in variants if n != base}
        data[f"{size}px"]["ratios_batched"] = {f"metabench x{BATCH}/{n}": result.ratio(f"metabench x{BATCH} (sample_many)", n)
                                               for n in variants}
        data[f"{size}px"]["images"] = list(source.images("train").shape)
        profiles[size] = profile_draw(source, 200 if args.quick else 2000)
        budgets[size], data[f"{size}px"]["time_budget_us"] = episode_time_budget(source, n_fast, 1 if args.quick else 2, args.reps)
        if size == 28:
            sweep_text, data["read_ahead_sweep_28px"] = read_ahead_sweep(source, n_fast, args.reps)
    md = [f"5-way {SHOTS}-shot {QUERIES}-query episodes per second (median of {args.reps} interleaved "
          "repetitions; spread = (max - min) / median of the repetitions' rates; last column: metabench's "
          f"rate over the variant's, and the same for metabench's batched path (x{BATCH} episodes per call), from the "
          "same repetitions).", "",
          common.table(["size", "variant", "episodes/s", "spread", "metabench / variant",
                        f"metabench x{BATCH} / variant"], rows), "",
          "Variants: `metabench` is `TrainSampler.sample`, one episode per call as the episodic training loop "
          "takes them; it reads ahead (the next episodes of the same shape drawn in one pass and built in one "
          "gather and scaling, up to 4 MiB of float32 images: 13 episodes at 28 px, one at 84 px). "
          "`no read-ahead` is one `draw` + `materialize` per call. "
          f"`metabench x{BATCH}` is `TrainSampler.sample_many` ({BATCH} draws in one pass, then one gather and one "
          "scaling per block of at most 8 MiB), how MAML, ANIL and Meta-SGD take a meta-batch; "
          "`draw only` / `materialize only` are the two halves of the no-read-ahead path (and `draw_many` the "
          "read-ahead's draw); the attempt gathers episodes from a float32 copy of the split (no scaling, 4x the "
          "memory), which reads its episodes from main memory as any loader must; the floor copies one episode's float32 "
          "images from a block that stays in the caches "
          "(`Tensor.copy_`), the least any loader handing over float32 images must do.", ""]
    for size in sizes:
        d = data[f"{size[0]}px"]
        if "learn2learn TaskDataset" in d:
            floor = d["floor: float32 copy of an episode"]["episodes_per_s"]
            draw = max(d["draw only"]["episodes_per_s"], d[f"draw only, x{BATCH} per pass (draw_many)"]["episodes_per_s"])
            bound = 1 / (1 / floor + 1 / draw)
            md.append(f"- {size[0]} px: a loader that drew as metabench does (its faster draw) and then only copied "
                      "float32 images at the cache-resident floor's speed "
                      f"would reach 1 / (1/floor + 1/draw) = {bound:,.0f} episodes/s = "
                      f"{bound / d['learn2learn TaskDataset']['episodes_per_s']:.1f}x learn2learn's pipeline. An optimistic "
                      "bound: a real episode's images are random rows of the split, read from main memory "
                      "(`benchmarks/experiment_fused_gather.py` measures a gather that only converts them).")
    for size, text in budgets.items():
        d = data[f"{size}px"]
        us = d["time_budget_us"]
        loader_us = 1e6 / d["metabench"]["episodes_per_s"]
        md += ["", f"Where one {size} px episode's time goes, each piece measured alone ({args.reps} interleaved "
               "repetitions; the three passes of `materialize` each into a buffer reused across calls):", "", text, ""]
        md.append(f"- The loader's time per episode ({loader_us:,.1f} µs at the `metabench` rate above) is "
                  f"{loader_us / us['Conv4-32 forward + backward on the episode']:.2%} of one Conv4-32 and "
                  f"{loader_us / us['Conv4-64 forward + backward on the episode']:.2%} of one Conv4-64 forward + "
                  "backward on the same images.")
        if "learn2learn TaskDataset" in d:
            target_us = 1e6 / (40 * d["learn2learn TaskDataset"]["episodes_per_s"])
            draw, gather = us[f"draw (draw_many x{BATCH}, per episode)"], us["uint8 gather of the episode's rows"]
            convert, divide = us["uint8 -> float32 conversion"], us["/ 255 in place"]
            serial = draw + gather + convert
            if serial + divide <= target_us:
                verdict = "within it"
            elif serial <= target_us:
                verdict = "so a one-pass gather + scaling could come under it"
            else:
                verdict = ("so only a kernel that overlaps reading the rows from main memory with writing float32 "
                           "could come under it (`benchmarks/experiment_fused_gather.py` measures one)")
            md.append(f"- 40x learn2learn's rate leaves {target_us:,.1f} µs per episode. Draw + gather + conversion "
                      f"take {serial:,.1f} µs one after another, and the / 255 pass {divide:,.1f} µs more: {verdict}.")
    md += ["", f"`TrainSampler.sample` at 28 px by its read-ahead bound (`READ_AHEAD_BYTES`; the default is "
           f"{TrainSampler.READ_AHEAD_BYTES // 2**20} MiB), {args.reps} interleaved repetitions:", "", sweep_text, ""]
    for size, text in profiles.items():
        md += [f"cProfile of `TrainSampler.sample` at {size} px (own time, top entries):", "",
               "```", text, "```", ""]
    md += [f"- {n}" for n in notes]
    common.emit(args, "1. Episode sampling", "\n".join(md), data)


if __name__ == "__main__":
    main()
