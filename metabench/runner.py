"""One run: build the learner, meta-train it, evaluate it on the fixed episodes, make the result."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import platform
import re
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
from .evaluation import Scores, evaluate, metric_after_steps, score  # noqa: F401  (both were defined here before)
from .evaluation import predicts_batches
from .learner import Learner, TrainContext, TrainingDiverged
from .learner_file import learner_document, write_learner_file
from .lifecycle import RunInfo
from .numerics import check_precision, eval_precision, resolve_eval_batch, training_precision
from .plugins import PluginHost
from .results import SCHEMA_VERSION
from .checkpoint import set_rng_state
from .distributed import SINGLE, World, average_gradients, broadcast_state
from .resume import CheckpointInterval, EvaluationProgress, RunFolder, RunInterrupted, TrainingState, run_folder_name
from .settings import BUDGETS, DEFAULT_TASK, check_settings
from .stats import summarize
from .task import Protocol
from .validation import ValidationSettings, Validator

SMOKE_EPISODES = 20
#: the largest seed a run accepts (torch seeds its generators with 64-bit integers); seeds are >= 0
MAX_SEED = 2**63 - 1


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
    task: str = DEFAULT_TASK
    backbone: str | None = None
    seed: int = 0
    budget: str = "quick"
    episodes: int | None = None
    device: str = "cpu"
    learner_layers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    data_roots: DataRoots | None = None
    #: validation during training: a ``[validation]`` table ({"every": N, "episodes": M}; every 0:
    #: off), over the learner's paper config's at budget paper; None: the paper config's (else off)
    validation: dict[str, Any] | None = None
    #: test episodes per ``predict_batch`` call (``--eval-batch``); None: the device's default
    #: (metabench.numerics.DEFAULT_EVAL_BATCH)
    eval_batch: int | None = None
    #: training precision (``--precision``): one of metabench.settings.PRECISIONS
    precision: str = "fp32"


@dataclass
class RunControl:
    """How a run is kept (not what it computes).

    out_dir:          where checkpoints (``<out>/checkpoints/<run>/``) and the learner file go;
                      None: nothing is written (a library call)
    resume:           continue from the run's last checkpoint in ``out_dir``
    checkpoint_every: :class:`metabench.resume.CheckpointInterval`
    save_learner:     keep the trained learner as ``<run>.learner.pt`` in ``out_dir``
    """

    out_dir: Path | None = None
    resume: bool = False
    checkpoint_every: CheckpointInterval = field(default_factory=lambda: CheckpointInterval.parse("5m"))
    save_learner: bool = True
    #: this process's place in a torchrun run (metabench.distributed.World); one process by default
    world: World = field(default_factory=lambda: SINGLE)
    # filled by open(): the run's folder and what a resume continues from
    folder: RunFolder | None = field(default=None, init=False)
    resume_doc: dict = field(default_factory=dict, init=False)
    eval_doc: dict | None = field(default=None, init=False)
    run_id: str | None = field(default=None, init=False)
    opened: bool = field(default=False, init=False)
    # the folders of out_dir (it and its parents) that did not exist when it opened, deepest first
    created: list[Path] = field(default_factory=list, init=False)

    def open(self, plan: "RunPlan") -> None:
        """Find the run's checkpoint folder and lock it (a second process running the same run into
        the same ``out_dir`` is refused at once); on resume load what it continues from (refusing
        another run's checkpoint or a damaged one), else refuse to overwrite an unfinished run's.
        The lock is held until :meth:`close` (:func:`finish`, or a failed :func:`execute`)."""
        if self.opened:
            return
        self.opened = True
        if self.out_dir is None:
            return
        r = plan.request
        identity = run_identity(plan)
        self.created = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        self.folder = RunFolder(self.out_dir, run_folder_name(plan.protocol.name, r.learner, plan.backbone,
                                                              r.budget, r.seed))
        try:
            if self.world.is_main:  # rank 0 alone writes the folder; it holds the lock for all ranks
                self.folder.lock()
            if self.resume:
                self.resume_doc = self.folder.load_latest(identity)
                self.eval_doc = EvaluationProgress(self.folder, identity, self.checkpoint_every).load()
                self.run_id = self.folder.started_as
            else:
                self.folder.check_fresh()
        except BaseException:
            self.close()  # refused: nothing of this process is left (another's lock and files untouched)
            self.remove_created()
            raise

    def close(self) -> None:
        """Release the run folder's lock (removing the folder where it is left empty); idempotent."""
        if self.folder is not None:
            self.folder.unlock()

    def remove_created(self) -> None:
        """Remove the folders of ``out_dir`` this run created, where they are empty (a run that failed
        before it wrote anything leaves nothing behind)."""
        for path in self.created:
            try:
                path.rmdir()
            except OSError:
                return

    @property
    def elapsed(self) -> float:
        """Seconds the run had trained (and evaluated) before this process continued it."""
        doc = self.eval_doc or self.resume_doc
        return float(doc.get("seconds", 0.0)) + float((self.eval_doc or {}).get("eval_s", 0.0)) if doc else 0.0


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; MetabenchError for another name, or CUDA where
    there is none (or no device N)."""
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name) if isinstance(name, str) else None
    if match:
        if not torch.cuda.is_available():
            raise MetabenchError(f"--device {name}: no CUDA device is available here; use --device cpu")
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise MetabenchError(f"--device {name}: this machine has {count} CUDA device(s): "
                                 f"cuda:0 to cuda:{count - 1}")
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
    """The learner's published hyper-parameters for ``task`` from its ``paper_config`` TOML ({} if none).

    A ``validation`` table (top level, for every protocol, or inside the protocol's table) says
    how the paper picked its trained state on validation episodes; it is returned under "validation"."""
    if cls.paper_config is None:
        return {}
    try:
        doc = tomllib.loads(Path(str(cls.paper_config)).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PluginError(f"learner {learner!r}: cannot read its paper config {cls.paper_config}: {exc}") from None
    section = doc.get(task, {})
    section = dict(section) if isinstance(section, dict) else {}
    if task in doc and isinstance(doc.get("validation"), dict) and "validation" not in section:
        section["validation"] = doc["validation"]
    return section


@dataclass(frozen=True)
class RunPlan:
    """A validated run: everything :func:`execute` needs, resolved once from a :class:`RunRequest`.

    learner:   the registry entry of the learner (``.obj`` its class, ``.plugin`` its plugin)
    protocol, source, task_plugin: the task, its data source and the plugin that registered it
    backbone:  the backbone's registered name; backbone_options: the options passed to its factory;
               recorded_options: those plus the factory's defaults (what the result records)
    config:    the learner's Config instance (budget, paper config, --config and --set applied)
    device:    where to compute; episodes: how many fixed test episodes to score
    validation: validation during training (:class:`~metabench.validation.ValidationSettings`) or None
    eval_batch: test episodes per ``predict_batch`` call (resolved: ``request.eval_batch`` or the
               device's default)
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
    validation: ValidationSettings | None = None
    eval_batch: int = 1

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
    if protocol.episode_sampler != "fixed" and not cls.variable_episodes:
        takers = ", ".join(e.name for e in host.learners if e.obj.variable_episodes) or "none installed"
        raise MetabenchError(f"learner {request.learner!r} needs episodes of a fixed way count with balanced shots; "
                             f"task {protocol.name!r} draws {protocol.episode_sampler} episodes (variable ways and "
                             f"shots); learners that take them: {takers}")
    if request.budget not in BUDGETS:
        raise MetabenchError(f"--budget {request.budget!r}: accepted: {', '.join(BUDGETS)}")
    if request.episodes is not None and request.episodes < 1:
        raise MetabenchError(f"--episodes {request.episodes}: must be a positive integer")
    check_seed(request.seed)
    backbone_name = request.backbone or protocol.default_backbone or cls.default_backbone
    backbone_entry = host.backbones.get(backbone_name)
    defaults = {k: p.default for k, p in inspect.signature(backbone_entry.obj).parameters.items()
                if p.default is not inspect.Parameter.empty}
    paper = paper_settings(cls, protocol.name, request.learner) if request.budget == "paper" else {}
    paper_backbone = paper.pop("backbone", {}) if not request.backbone else {}
    paper_validation = paper.pop("validation", None)
    table = {**(paper_validation if isinstance(paper_validation, dict) else {}), **(request.validation or {})}
    validation = ValidationSettings.from_table(table, "validation") if table else None
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
    check_precision(request.precision, cls, config, f"learner {entry.name!r} (plugin {entry.plugin!r})", device)
    eval_batch = resolve_eval_batch(request.eval_batch, device)
    n_eval = request.episodes or (min(SMOKE_EPISODES, protocol.episodes) if request.budget == "smoke" else protocol.episodes)
    return RunPlan(request, entry, protocol, source, task_plugin, backbone_name, backbone_options, recorded_options,
                   config, device, n_eval, validation, eval_batch)


def check_seed(seed) -> None:
    """MetabenchError unless ``seed`` is an integer from 0 to :data:`MAX_SEED`."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise MetabenchError(f"--seed {seed!r}: accepted: an integer from 0 to {MAX_SEED}")


def run_identity(plan: RunPlan) -> dict:
    """What defines a run, for refusing to resume another run's checkpoint."""
    r = plan.request
    return {"learner": plan.learner.name, "task": f"{plan.protocol.name} (version {plan.protocol.version})",
            "seed": r.seed, "backbone": plan.backbone, "backbone_options": plan.recorded_options, "budget": r.budget,
            "episodes": plan.episodes, "metabench_version": __version__, "precision": r.precision,
            "validation": plan.validation.as_dict() if plan.validation else None,
            "config": dataclasses.asdict(plan.config) if dataclasses.is_dataclass(plan.config) else dict(vars(plan.config))}


def task_record(protocol: Protocol) -> dict:
    """What a learner file keeps of the task it was trained on."""
    return {"name": protocol.name, "version": protocol.version, "dataset": protocol.dataset,
            "problem": protocol.problem, "ways": protocol.ways, "shots": protocol.shots, "queries": protocol.queries,
            "channels": protocol.channels, "image_size": protocol.image_size}


def build_learner(plan: RunPlan, host: PluginHost, image_size=None, protocol: Protocol | None = None) -> Learner:
    """A fresh learner of the plan, its backbone built for ``image_size`` (default the protocol's)."""
    protocol = protocol or plan.protocol
    backbone = host.build_backbone(plan.backbone, protocol.channels, image_size or protocol.image_size,
                                   **plan.backbone_options)
    backbone.module.to(plan.device)
    try:
        return plan.learner.obj(plan.config, backbone, protocol, plan.device)
    except ValueError as exc:  # the learners' convention for a setting it does not accept: bad input
        raise MetabenchError(f"{plan.who} refused its settings: {exc}") from None
    except Exception as exc:
        raise PluginFailed(f"{plan.who} failed to start: {type(exc).__name__}: {exc}") from exc


def execute(plan: RunPlan | RunRequest, host: PluginHost, progress: Progress | None = None,
            run: RunInfo | None = None, control: RunControl | None = None) -> dict:
    """Carry out a run (a plan from :func:`prepare`, or a request to prepare first) and return the
    result document (not yet written).

    ``run``: what lifecycle hooks are told about this run; by default one with no output folder.
    ``control``: checkpoints, resume and the saved learner file (:class:`RunControl`); by default
    nothing is written. Once the caller has written the result, it calls :func:`finish` to remove
    the run's checkpoints and release its folder's lock (a failed run releases it here)."""
    if isinstance(plan, RunRequest):
        plan = prepare(plan, host)
    progress = progress or NoProgress()
    control = control or RunControl()
    request, entry, protocol, who = plan.request, plan.learner, plan.protocol, plan.who
    run = run or RunInfo.start(request.learner, protocol.name, plan.backbone, request.seed, request.budget)
    commit = git_commit()  # the code that runs, read before the working tree can change under a long run

    identity = run_identity(plan)
    world = control.world
    if world.active and not entry.obj.splits_meta_batch:
        raise MetabenchError(f"{who} cannot split its training steps across processes (it does not declare "
                             f"splits_meta_batch); run it without torchrun")
    control.open(plan)
    try:
        return _execute_opened(plan, host, progress, run, control, identity, commit)
    except BaseException:
        control.close()  # the run ends here: release its lock (what it saved is kept for --resume)
        control.remove_created()
        raise


def _execute_opened(plan: RunPlan, host: PluginHost, progress, run: RunInfo, control: RunControl, identity: dict,
                    commit: str | None) -> dict:
    """:func:`execute` once ``control`` holds the run's folder."""
    request, protocol, source = plan.request, plan.protocol, plan.source
    device, who, world = plan.device, plan.who, control.world
    resume_doc = control.resume_doc
    folder = control.folder if world.is_main else None  # rank 0 alone writes
    eval_progress = EvaluationProgress(folder if not world.active else None, identity, control.checkpoint_every)

    source.set_roots(request.data_roots or DataRoots.from_settings())
    splits = ("train", protocol.eval_split) + (("val",) if plan.validation else ())
    for split in dict.fromkeys(splits):
        prepare_split(source, split, plan.task_plugin, progress)
    draws = eval_draws(protocol, source, protocol.eval_split, plan.episodes)

    torch.manual_seed(request.seed)
    generator = torch.Generator().manual_seed(request.seed)
    learner = build_learner(plan, host)
    broadcast_state(learner.state_dict(), world)
    started_phases: set[str] = set()

    def report(phase: str, step: int, total: int, metrics: dict) -> None:
        if phase not in started_phases:
            started_phases.add(phase)
            progress.start(phase, total)
        progress.update(phase, step, **metrics)
        host.on_progress(run, phase, step, total, dict(metrics))

    validator = Validator(plan.validation, learner, protocol, source, device, who, score, report,
                          eval_precision(plan.learner.obj, request.precision)) if plan.validation else None

    ctx = TrainContext(protocol, TrainSampler(protocol, source, request.seed, "train", device), source, device,
                       generator, report, world=world)
    if world.active:
        ctx.gradient_hook = average_gradients(world)
    state = TrainingState(folder, identity, control.checkpoint_every, resume_doc, validator)
    state.attach(ctx)
    if folder is not None and not control.resume:
        folder.start(identity, run.run_id)  # bad input is refused before: it leaves nothing behind
    try:
        meta_train_s, eval_s, scores, learner_file, resumed = train_and_evaluate(
            plan, host, control, learner, ctx, state, validator, eval_progress, draws, progress, identity)
    except BaseException:
        if folder is not None and not folder.has_progress():
            folder.remove()  # nothing to resume from: leave nothing behind
            control.remove_created()
        raise

    return result_document(
        plan, host, learner, draws, scores, commit=commit,
        # whether the harness owned the training steps (ctx.steps / ctx.step), so that a run can be
        # checkpointed and resumed; false for a learner that keeps its own loop
        learner_extra={"resumable": ctx.harness_steps},
        trained_on={"task": protocol.name, "version": protocol.version, "image_size": protocol.image_size},
        precision=request.precision,
        extra={**({"validation": validator.record()} if validator is not None else {}),
               **({"learner_file": learner_file} if learner_file else {}),
               **({"resumed": resumed} if resumed else {}),
               **({"distributed": world.record()} if world.active else {})},
        timing={"meta_train_s": round(meta_train_s, 3), "eval_s": round(eval_s, 3),
                # in this process: checkpoints (training) and evaluation-progress files written
                "checkpoints": state.writes, "checkpoint_s": round(state.write_seconds, 4),
                "progress_files": eval_progress.writes, "progress_s": round(eval_progress.write_seconds, 4)})


def result_document(plan: RunPlan, host: PluginHost, learner: Learner, draws, scores: Scores, *, commit: str | None,
                    trained_on: dict, timing: dict, learner_extra: dict | None = None,
                    extra: dict | None = None, precision: str | None = None) -> dict:
    """The result file's document (schema: metabench/results.py) of a learner scored on ``draws``:
    what ``metabench run`` and ``metabench eval`` write. ``precision``: what it was trained in (None:
    not known, a learner file from before they said)."""
    entry, protocol = plan.learner, plan.protocol
    per_step = scores.record()["per_step"]
    return {
        "schema_version": SCHEMA_VERSION,
        "metabench_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "task": task_section(protocol, draws),
        "learner": {"name": entry.name, "plugin": entry.plugin, "version": learner_version(entry, host),
                    "config": dataclasses.asdict(plan.config), "transductive": bool(entry.obj.transductive),
                    **(learner_extra or {})},
        "backbone": {"name": plan.backbone, "options": plan.recorded_options,
                     "out_features": learner.backbone.out_features,
                     "parameters": sum(p.numel() for p in learner.backbone.module.parameters())},
        "seed": plan.request.seed,
        "budget": plan.request.budget,
        "trained_on": trained_on,
        "per_episode": scores.per_episode,
        "summary": summarize(scores.per_episode).to_dict(),
        **({"per_step": per_step} if per_step is not None else {}),
        **({"precision": precision} if precision is not None else {}),
        "evaluation": evaluation_record(plan, learner),
        **(extra or {}),
        "timing": timing,
        "environment": environment(plan.device, commit),
    }


def evaluation_record(plan: RunPlan, learner: Learner) -> dict:
    """The result's ``evaluation``: test episodes per predict call (``--eval-batch`` where the learner
    implements ``predict_batch``, else 1) and the precision the predictions ran in."""
    return {"batch": plan.eval_batch if predicts_batches(learner) else 1,
            "precision": eval_precision(plan.learner.obj, plan.request.precision)}


def train_and_evaluate(plan, host, control, learner, ctx, state, validator, eval_progress, draws, progress,
                       identity):
    """Meta-train (or take the state back from a checkpoint), keep the learner file, evaluate (or
    continue an interrupted evaluation). Returns (meta_train_s, eval_s, scores, learner_file, resumed)."""
    entry, protocol, request, who, device = plan.learner, plan.protocol, plan.request, plan.who, plan.device
    folder, eval_doc, world = control.folder, control.eval_doc, control.world
    try:
        with training_precision(request.precision, device):  # fp32: nothing; bf16: autocast
            learner.meta_train(ctx)
    except (MetabenchError, KeyboardInterrupt):
        raise
    except TrainingDiverged as exc:
        kept = f"the last good checkpoint is {state.last_path or folder.checkpoints.latest()}" \
            if folder is not None and (state.last_path or folder.checkpoints.latest()) else "no checkpoint was written"
        raise PluginError(f"{who} diverged: {exc}; no score is written; {kept}") from None
    except Exception as exc:
        raise PluginFailed(f"{who} failed in meta_train: {type(exc).__name__}: {exc}") from exc
    finally:
        state.release_interrupts()
    state.finish_resume(who)
    meta_train_s = state.training_seconds()
    if validator is not None:
        validator.restore_best()

    learner_file = None if eval_doc is None else eval_doc.get("learner_file")
    if eval_doc is None and control.save_learner and control.out_dir is not None and world.is_main:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        doc = learner_document(
            learner={"name": entry.name, "plugin": entry.plugin, "version": learner_version(entry, host),
                     "config": identity["config"]},
            backbone={"name": plan.backbone, "options": plan.recorded_options}, task=task_record(protocol),
            seed=request.seed, budget=request.budget, state=learner.state_dict(),
            validation=validator.record() if validator is not None else None, precision=request.precision)
        learner_file = write_learner_file(doc, control.out_dir, f"{folder.path.name}__{stamp}").name

    scores = Scores(protocol.problem, *(
        (eval_doc["per_episode"], eval_doc["per_step"], True) if eval_doc is not None else ()))
    resumed = list(state.resumed)
    if eval_doc is not None:
        set_rng_state(eval_doc["rng"])
        resumed = list(eval_doc.get("resumed", [])) + [f"evaluation after {len(scores.per_episode)} episodes"]
    eval_record = {"learner_file": learner_file, "seconds": meta_train_s, "resumed": resumed,
                   "eval_s": float(eval_doc["eval_s"]) if eval_doc is not None else 0.0}
    if eval_doc is None:
        eval_progress.save({**eval_record, **scores.record()})  # training is complete: evaluation starts from here
    started = time.perf_counter()
    prior_eval_s = eval_record["eval_s"]

    def after_episode(i: int, scores: Scores) -> None:
        stop = state.stop_requested
        if stop or eval_progress.due():
            eval_progress.save({**eval_record, "eval_s": prior_eval_s + time.perf_counter() - started,
                                **scores.record()})
        if stop:
            raise RunInterrupted(state.interrupt_message(f"evaluation episode {i + 1} of {len(draws)}",
                                                         eval_progress.path))

    state.catch_interrupts()
    try:
        evaluate(learner, protocol, plan.source, protocol.eval_split, draws, who, progress, device, scores,
                 after_episode=after_episode, world=world, batch=plan.eval_batch,
                 precision=eval_precision(entry.obj, request.precision))
    finally:
        state.release_interrupts()
    eval_s = prior_eval_s + time.perf_counter() - started

    return meta_train_s, eval_s, scores, learner_file, resumed


def task_section(protocol: Protocol, draws) -> dict:
    """The result's ``task``: the protocol and the SHA-256 of the episodes scored."""
    return {"name": protocol.name, "version": protocol.version, "dataset": protocol.dataset,
            "split": protocol.eval_split, "ways": protocol.ways, "shots": protocol.shots,
            "queries": protocol.queries, "episodes": len(draws), "episodes_sha256": episodes_sha256(draws),
            "metric": protocol.metric, "higher_is_better": protocol.higher_is_better,
            "problem": protocol.problem, "image_size": protocol.image_size,
            **({"data_sha256": protocol.data_sha256} if protocol.data_sha256 else {}),
            **({"task_file": protocol.task_file} if protocol.task_file else {}),
            **({"episode_sampler": protocol.episode_sampler} if protocol.episode_sampler != "fixed" else {})}


def learner_version(entry, host: PluginHost) -> str:
    return str(getattr(entry.obj, "version", None) or host.plugins[entry.plugin].version)


def environment(device: torch.device, commit: str | None) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "git_commit": commit}


def finish(plan: RunPlan, control: RunControl) -> None:
    """After the result is written: the run is complete, its checkpoints are no longer needed."""
    control.open(plan)
    if control.folder is not None:
        control.folder.remove()
    control.close()
