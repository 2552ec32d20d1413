"""Shared test helpers: a tiny synthetic task, a toy learner, and hosts built from given plugins."""
from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a busy 2-core machine that slowed small-op tests up to 50x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metabench import ClassImageSource, Learner, Protocol, hookimpl
from metabench.plugins import PluginHost, PluginSource, discover

ROOT = Path(__file__).resolve().parents[1]


class TinySource(ClassImageSource):
    """12 classes x 10 images of 16x16 px per split; class c's images are noise around level c."""

    def class_sizes(self, split):
        self.check_split(split)
        return [10] * 12

    def load_split(self, split, progress=None):
        g = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split])
        levels = torch.arange(12).repeat_interleave(10).view(-1, 1, 1, 1) * 20
        noise = torch.randint(0, 20, (120, 1, 16, 16), generator=g)
        return (levels + noise).to(torch.uint8)


TINY = Protocol(name="tiny-3w2s", version=1, dataset="tiny", ways=3, shots=2, queries=3, episodes=25, image_size=16)


class ToyLearner(Learner):
    """Nearest centroid on pixels; draws training episodes and burns random numbers while 'training'."""

    reference = "test double"

    @dataclass
    class Config:
        steps: int = 3
        scale: float = 1.0

    budgets = {"smoke": {"steps": 2}, "quick": {"steps": 3}, "paper": {"steps": 4}}

    def meta_train(self, ctx):
        for step in range(1, self.config.steps + 1):
            ctx.sampler.sample()
            torch.rand(7)  # randomness a learner might use must not move evaluation episodes
            ctx.progress(step, self.config.steps, loss=1.0 / step)

    def predict(self, support_x, support_y, query_x):
        ways = int(support_y.max()) + 1
        s, q = support_x.flatten(1), query_x.flatten(1)
        centroids = torch.stack([s[support_y == c].mean(0) for c in range(ways)])
        return -self.config.scale * torch.cdist(q, centroids)


def tiny_plugin():
    """A plugin object registering the tiny task and the toy learner."""
    source = TinySource()

    class Plugin:
        @hookimpl
        def metabench_register_tasks(self, register):
            register(TINY, source)

        @hookimpl
        def metabench_register_learners(self, register):
            register("toy", ToyLearner)

    return Plugin()


def host_with(*extra: tuple[str, object], builtins: bool = True, allow=None) -> PluginHost:
    """A host loading the installed plugins (optionally) plus ``extra`` (name, plugin object) pairs."""
    sources = discover() if builtins else []
    sources += [PluginSource.from_object(name, obj, "tests", "0") for name, obj in extra]
    return PluginHost(sources, allow=allow)


@pytest.fixture
def tiny_host():
    return host_with(("tiny", tiny_plugin()))


def write_distribution(root: Path, dist: str, version: str, module: str, source: str, entry_points: dict[str, str]):
    """Write an installed-looking distribution (module + .dist-info with entry points) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[metabench]\n{lines}\n")
    return root


# ----------------------------------------------------------------------------- command-line helpers

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``metabench ARGV`` in this process: (exit status, stdout, stderr)."""
    from metabench.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one ``metabench: error:`` line of ``err`` (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("metabench: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def flat_tensors(state, prefix: str = "") -> dict:
    """A nested state dict as {"a.b.c": tensor}."""
    if not isinstance(state, dict):
        return {prefix: state}
    flat = {}
    for key, value in state.items():
        flat.update(flat_tensors(value, f"{prefix}.{key}"))
    return flat
