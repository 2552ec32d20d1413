"""One run: build the learner, meta-train it, evaluate it on the fixed episodes, make the result."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import math
import platform
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol as _Interface

import torch

from . import __version__
from .config import build_config, coerce_backbone_options
from .data import DataRoots
from .episodes import TrainSampler, episodes_sha256, eval_draws
from .errors import MetabenchError, PluginError
from .learner import BUDGETS, Learner, TrainContext
from .lifecycle import RunInfo
from .plugins import PluginHost
from .results import PER_STEP_COUNTS, SCHEMA_VERSION
from .settings import check_settings
from .stats import summarize
from .task import Protocol

SMOKE_EPISODES = 20


class Progress(_Interface):
    """Where a run reports progress (the CLI draws rich bars; tests pass :class:`NoProgress`)."""

    def start(self, phase: str, total: int) -> None: ...
    def update(self, phase: str, completed: int, **metrics: float) -> None: ...


class NoProgress:
    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, phase: str, completed: int, **metrics: float) -> None:
        pass


#: The name runs used for a plugin whose code raised; it is :class:`~metabench.errors.PluginError`.
PluginFailed = PluginError


@dataclass
class RunRequest:
    """Everything that defines a run. ``learner_layers``: (source, overrides) applied in order."""

    learner: str
    task: str = "kanji-5w1s"
    backbone: str | None = None
    seed: int = 0
    budget: str = "quick"
    episodes: int | None = None
    device: str = "cpu"
    learner_layers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    data_roots: DataRoots | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MetabenchError(f"--device {name}: no CUDA device is available here; use --device cpu")
        return torch.device(name)
    raise MetabenchError(f"--device {name!r}: accepted: cpu, cuda, cuda:N")


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the metabench source tree, with '-dirty' if it has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def score(protocol: Protocol, output: torch.Tensor, query_y: torch.Tensor, who: str) -> float:
    """Accuracy (classification) or mean squared error (regression) of one episode's predictions."""
    q = query_y.shape[0]
    if protocol.problem == "classification":
        expected = (q, protocol.ways)
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise PluginError(f"{who}: predict returned {got}; expected logits of shape {expected}")
        return (output.argmax(dim=1) == query_y).float().mean().item()
    if not isinstance(output, torch.Tensor) or output.shape != query_y.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise PluginError(f"{who}: predict returned {got}; expected predictions of shape {tuple(query_y.shape)}")
    return torch.mean((output.double() - query_y.double()) ** 2).item()


def metric_after_steps(learner: Learner, protocol: Protocol, episode, who: str, index: int) -> dict | None:
    """The metric of one episode after each of :data:`~metabench.results.PER_STEP_COUNTS` test-time
    steps (``{k: value}``, a non-finite value as None), for a learner that adapts by steps; None
    when the learner has no step count to vary."""
    try:
        with torch.no_grad():
            outputs = learner.predict_after_steps(episode.support_x, episode.support_y, episode.query_x,
                                                  PER_STEP_COUNTS)
    except Exception as exc:
        raise PluginFailed(f"{who} failed in predict_after_steps (episode {index}): {type(exc).__name__}: {exc}") from exc
    if outputs is None:
        return None
    if not isinstance(outputs, dict) or set(outputs) != set(PER_STEP_COUNTS):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise PluginError(f"{who}: predict_after_steps returned {got}; expected a dict with keys "
                          f"{list(PER_STEP_COUNTS)}")
    values = {k: score(protocol, outputs[k], episode.query_y, who) for k in PER_STEP_COUNTS}
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


def prepare_split(source, split: str, plugin: str, progress: Progress) -> None:
    """Load (or build and cache) a split, with a progress bar while a plugin reports progress."""
    phase = f"data {split}"

    def report(done: int, total: int) -> None:
        if phase not in started:
            progress.start(phase, total)
            started.add(phase)
        progress.update(phase, done)

    started: set[str] = set()
    try:
        source.prepare(split, progress=report)
    except (MetabenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise PluginFailed(f"task plugin {plugin!r} could not load split {split!r}: {type(exc).__name__}: {exc}") from exc


def paper_settings(cls: type[Learner], task: str, learner: str) -> dict[str, Any]:
    """The learner's published hyper-parameters for ``task`` from its ``paper_config`` TOML ({} if none)."""
    if cls.paper_config is None:
        return {}
    try:
        doc = tomllib.loads(Path(str(cls.paper_config)).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PluginError(f"learner {learner!r}: cannot read its paper config {cls.paper_config}: {exc}") from None
    section = doc.get(task, {})
    return dict(section) if isinstance(section, dict) else {}


@dataclass(frozen=True)
class RunPlan:
    """A validated run: everything :func:`execute` needs, resolved once from a :class:`RunRequest`.

    learner:   the registry entry of the learner (``.obj`` its class, ``.plugin`` its plugin)
    protocol, source, task_plugin: the task, its data source and the plugin that registered it
    backbone:  the backbone's registered name; backbone_options: the options passed to its factory;
               recorded_options: those plus the factory's defaults (what the result records)
    config:    the learner's Config instance (budget, paper config, --config and --set applied)
    device:    where to compute; episodes: how many fixed test episodes to score
    """

    request: RunRequest
    learner: Any
    protocol: Protocol
    source: Any
    task_plugin: str
    backbone: str
    backbone_options: dict[str, Any]
    recorded_options: dict[str, Any]
    config: Any
    device: torch.device
    episodes: int

    @property
    def who(self) -> str:
        """How error messages name the learner: ``learner 'maml' (plugin 'maml')``."""
        return f"learner {self.learner.name!r} (plugin {self.learner.plugin!r})"


def prepare(request: RunRequest, host: PluginHost) -> RunPlan:
    """Validate the request against the registries; return the plan :func:`execute` carries out."""
    entry = host.learners.get(request.learner)
    cls: type[Learner] = entry.obj
    protocol, source, task_plugin = host.task(request.task)
    if protocol.problem not in cls.problem_types:
        raise MetabenchError(f"learner {request.learner!r} cannot run {protocol.problem} task {protocol.name!r} "
                             f"(it supports: {', '.join(sorted(cls.problem_types))})")
    if request.budget not in BUDGETS:
        raise MetabenchError(f"--budget {request.budget!r}: accepted: {', '.join(BUDGETS)}")
    if request.episodes is not None and request.episodes < 1:
        raise MetabenchError(f"--episodes {request.episodes}: must be a positive integer")
    backbone_name = request.backbone or protocol.default_backbone or cls.default_backbone
    backbone_entry = host.backbones.get(backbone_name)
    defaults = {k: p.default for k, p in inspect.signature(backbone_entry.obj).parameters.items()
                if p.default is not inspect.Parameter.empty}
    paper = paper_settings(cls, protocol.name, request.learner) if request.budget == "paper" else {}
    paper_backbone = paper.pop("backbone", {}) if not request.backbone else {}
    backbone_options = coerce_backbone_options({**paper_backbone, **request.backbone_options}, defaults)
    recorded_options = {k: v for k, v in defaults.items() if k != "variant"} | backbone_options
    layers = [(f"budget {request.budget!r}", cls.budgets[request.budget])]
    if paper:
        layers.append((f"paper config of {request.learner!r} for {protocol.name}", paper))
    layers += list(request.learner_layers)
    config = build_config(cls.Config, layers, request.learner)
    if dataclasses.is_dataclass(config):  # the declared bounds, before any data is loaded (Learner.__init__ repeats it)
        try:
            check_settings(request.learner, config)
        except ValueError as exc:
            raise MetabenchError(f"learner {entry.name!r} (plugin {entry.plugin!r}) refused its settings: {exc}") from None
    device = resolve_device(request.device)
    n_eval = request.episodes or (min(SMOKE_EPISODES, protocol.episodes) if request.budget == "smoke" else protocol.episodes)
    return RunPlan(request, entry, protocol, source, task_plugin, backbone_name, backbone_options, recorded_options,
                   config, device, n_eval)


def execute(plan: RunPlan | RunRequest, host: PluginHost, progress: Progress | None = None,
            run: RunInfo | None = None) -> dict:
    """Carry out a run (a plan from :func:`prepare`, or a request to prepare first) and return the
    result document (not yet written).

    ``run``: what lifecycle hooks are told about this run; by default one with no output folder."""
    if isinstance(plan, RunRequest):
        plan = prepare(plan, host)
    progress = progress or NoProgress()
    request, entry, protocol, source = plan.request, plan.learner, plan.protocol, plan.source
    task_plugin, backbone_name, backbone_options = plan.task_plugin, plan.backbone, plan.backbone_options
    recorded_options, config, device, n_eval, who = (plan.recorded_options, plan.config, plan.device, plan.episodes,
                                                     plan.who)
    run = run or RunInfo.start(request.learner, protocol.name, backbone_name, request.seed, request.budget)
    commit = git_commit()  # the code that runs, read before the working tree can change under a long run

    source.set_roots(request.data_roots or DataRoots.from_settings())
    for split in dict.fromkeys(("train", protocol.eval_split)):
        prepare_split(source, split, task_plugin, progress)
    draws = eval_draws(protocol, source, protocol.eval_split, n_eval)

    torch.manual_seed(request.seed)
    generator = torch.Generator().manual_seed(request.seed)
    backbone = host.build_backbone(backbone_name, protocol.channels, protocol.image_size, **backbone_options)
    backbone.module.to(device)
    try:
        learner = entry.obj(config, backbone, protocol, device)
    except ValueError as exc:  # the learners' convention for a setting it does not accept: bad input
        raise MetabenchError(f"{who} refused its settings: {exc}") from None
    except Exception as exc:
        raise PluginFailed(f"{who} failed to start: {type(exc).__name__}: {exc}") from exc

    started_phases: set[str] = set()

    def report(phase: str, step: int, total: int, metrics: dict) -> None:
        if phase not in started_phases:
            started_phases.add(phase)
            progress.start(phase, total)
        progress.update(phase, step, **metrics)
        host.on_progress(run, phase, step, total, dict(metrics))

    ctx = TrainContext(protocol, TrainSampler(protocol, source, request.seed, "train", device), source, device,
                       generator, report)
    started = time.perf_counter()
    try:
        learner.meta_train(ctx)
    except (MetabenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise PluginFailed(f"{who} failed in meta_train: {type(exc).__name__}: {exc}") from exc
    meta_train_s = time.perf_counter() - started

    per_episode: list[float] = []
    # regression: the metric after each of PER_STEP_COUNTS steps too, until the learner says it has none
    curves: dict[int, list] | None = {k: [] for k in PER_STEP_COUNTS} if protocol.problem == "regression" else None
    progress.start("evaluate", len(draws))
    started = time.perf_counter()
    for i, draw in enumerate(draws):
        episode = source.materialize(draw, protocol.eval_split).to(device)
        try:
            with torch.no_grad():
                output = learner.predict(episode.support_x, episode.support_y, episode.query_x)
        except Exception as exc:
            raise PluginFailed(f"{who} failed in predict (episode {i}): {type(exc).__name__}: {exc}") from exc
        value = score(protocol, output, episode.query_y, who)
        per_episode.append(value)
        if curves is not None:
            after = metric_after_steps(learner, protocol, episode, who, i)
            if after is None:
                curves = None
            else:
                for k, v in after.items():
                    curves[k].append(v)
        progress.update("evaluate", i + 1, mean=sum(per_episode) / len(per_episode))
    per_step = {str(k): values for k, values in curves.items()} if curves is not None else None
    eval_s = time.perf_counter() - started

    cls = entry.obj
    return {
        "schema_version": SCHEMA_VERSION,
        "metabench_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "task": {
            "name": protocol.name, "version": protocol.version, "dataset": protocol.dataset,
            "split": protocol.eval_split, "ways": protocol.ways, "shots": protocol.shots,
            "queries": protocol.queries, "episodes": len(draws), "episodes_sha256": episodes_sha256(draws),
            "metric": protocol.metric, "higher_is_better": protocol.higher_is_better,
            "problem": protocol.problem, "image_size": protocol.image_size,
        },
        "learner": {
            "name": entry.name, "plugin": entry.plugin,
            "version": str(getattr(cls, "version", None) or host.plugins[entry.plugin].version),
            "config": dataclasses.asdict(config), "transductive": bool(cls.transductive),
            # whether the harness owned the training steps (ctx.steps / ctx.step), so that a run
            # can be checkpointed and resumed; false for a learner that keeps its own loop
            "resumable": ctx.harness_steps,
        },
        "backbone": {"name": backbone_name, "options": recorded_options, "out_features": backbone.out_features,
                     "parameters": sum(p.numel() for p in backbone.module.parameters())},
        "seed": request.seed,
        "budget": request.budget,
        "per_episode": per_episode,
        "summary": summarize(per_episode).to_dict(),
        **({"per_step": per_step} if per_step is not None else {}),
        "timing": {"meta_train_s": round(meta_train_s, 3), "eval_s": round(eval_s, 3)},
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "git_commit": commit,
        },
    }
