"""``metabench eval``: a saved learner evaluated on any task whose input it can take.

Chen et al. 2019 ("A Closer Look at Few-shot Classification", section 4.4) test learners
meta-trained on mini-ImageNet on CUB: a change of domain. Here any saved learner file can be
scored on the fixed episodes of any registered task that fits it:

- the same kind of problem (classification / regression) and the same number of image channels;
- any shot and query count; another way count only where the learner says it can
  (``Learner.any_ways``: metric learners, fine-tuned heads);
- another image size: each episode's images are resized to the size the learner was trained on
  (bilinear, antialiased; the result says so under ``resized``).

The result is an ordinary result file of the test task, with ``trained_on`` naming the training
task, so the leaderboard puts it in a section of its own.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DataRoots
from .episodes import eval_draws
from .errors import MetabenchError
from .evaluation import Scores, evaluate
from .learner_file import read_learner_file, sha256_of
from .plugins import PluginHost
from .learner import Learner
from .numerics import eval_precision, resolve_eval_batch
from .runner import (NoProgress, Progress, RunPlan, RunRequest, build_learner, git_commit, prepare_split,
                     resolve_device, result_document)
from .task import Episode, Protocol

RESIZE_MODE = "bilinear"


def saved_config(cls, saved: dict, path: Path, name: str):
    """The learner's Config from a file's settings; a setting this learner version lacks is refused."""
    if not dataclasses.is_dataclass(cls.Config):
        return cls.Config(**saved)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise MetabenchError(f"{path}: saved setting(s) {', '.join(unknown)} are unknown to the installed learner "
                             f"{name!r}; it may be another version of the plugin")
    return cls.Config(**saved)


def check_fits(doc: dict, cls, protocol: Protocol, path: Path) -> None:
    """Refuse a task the saved learner cannot take, in one line naming why."""
    trained = doc["task"]
    name = doc["learner"]["name"]
    if protocol.problem != trained["problem"] or protocol.problem not in cls.problem_types:
        raise MetabenchError(f"{path}: {name} was trained on {trained['problem']} task {trained['name']!r}; "
                             f"task {protocol.name!r} is {protocol.problem}")
    if protocol.channels != trained["channels"]:
        raise MetabenchError(f"{path}: {name} was trained on {trained['channels']}-channel inputs; task "
                             f"{protocol.name!r} has {protocol.channels}")
    if protocol.ways != trained["ways"] and not cls.any_ways:
        raise MetabenchError(f"{path}: {name} was trained on {trained['ways']}-way episodes and cannot change its "
                             f"way count; task {protocol.name!r} is {protocol.ways}-way (any shot count works)")
    if protocol.problem != "classification" and protocol.image_size != trained["image_size"]:
        raise MetabenchError(f"{path}: {name} was trained on inputs of size {trained['image_size']}; task "
                             f"{protocol.name!r} has {protocol.image_size}")


def resizer(size: int):
    """Episode -> the episode with its images resized to ``size`` x ``size``."""
    def resize(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=(size, size), mode=RESIZE_MODE, antialias=True, align_corners=False)

    def transform(episode: Episode) -> Episode:
        return dataclasses.replace(episode, support_x=resize(episode.support_x), query_x=resize(episode.query_x))

    return transform


@dataclass
class SavedLearner:
    """A learner file loaded into a learner built for a task: ``doc`` (the file's contents), the
    ``plan`` it runs under (the task's protocol and data source) and the ``learner``, its state
    loaded. ``trained_size``: the image size it was trained on (and built for)."""

    path: Path
    doc: dict
    plan: RunPlan
    learner: Learner
    trained_size: int


def load_saved_learner(path: str | Path, host: PluginHost, task: str | None = None, episodes: int | None = None,
                       device: str = "cpu", eval_batch: int | None = None) -> SavedLearner:
    """Read a learner file and build its learner for ``task`` (default: the one it was trained on),
    refusing in one line a file or task it cannot take. ``eval_batch``: ``--eval-batch`` (None: the
    device's default)."""
    path = Path(path)
    doc = read_learner_file(path)
    name, plugin = doc["learner"]["name"], doc["learner"]["plugin"]
    if name not in host.learners:
        raise MetabenchError(f"{path}: learner {name!r} (plugin {plugin!r}) is not installed here "
                             "(see `metabench plugins`)")
    entry = host.learners.get(name)
    protocol, source, task_plugin = host.task(task or doc["task"]["name"])
    check_fits(doc, entry.obj, protocol, path)
    if episodes is not None and episodes < 1:
        raise MetabenchError(f"--episodes {episodes}: must be a positive integer")
    trained_size = int(doc["task"]["image_size"])
    config = saved_config(entry.obj, doc["learner"]["config"], path, name)
    options = dict(doc["backbone"]["options"])
    request = RunRequest(learner=name, task=protocol.name, backbone=doc["backbone"]["name"], seed=int(doc["seed"]),
                         budget=str(doc["budget"]), episodes=episodes, device=device, eval_batch=eval_batch,
                         precision=doc.get("precision") or "fp32")  # what it was trained in
    where = resolve_device(device)
    plan = RunPlan(request, entry, protocol, source, task_plugin, doc["backbone"]["name"], options, options, config,
                   where, episodes or protocol.episodes, eval_batch=resolve_eval_batch(eval_batch, where))
    learner_protocol = dataclasses.replace(protocol, image_size=trained_size) \
        if protocol.image_size != trained_size else protocol
    torch.manual_seed(request.seed)
    learner = build_learner(plan, host, image_size=trained_size, protocol=learner_protocol)
    try:
        learner.load_state_dict(doc["state"])
    except (ValueError, RuntimeError, KeyError) as exc:
        raise MetabenchError(f"{path}: the saved state does not fit learner {name!r} as installed: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    return SavedLearner(path, doc, plan, learner, trained_size)


def evaluate_saved(path: str | Path, host: PluginHost, task: str | None = None, episodes: int | None = None,
                   device: str = "cpu", roots: DataRoots | None = None, progress: Progress | None = None,
                   eval_batch: int | None = None) -> dict:
    """Score the saved learner ``path`` on ``task`` (default: the one it was trained on); returns
    the result document (not yet written). ``eval_batch``: ``--eval-batch`` (None: the device's default)."""
    saved = load_saved_learner(path, host, task, episodes, device, eval_batch)
    doc, plan, learner, trained_size = saved.doc, saved.plan, saved.learner, saved.trained_size
    protocol, source = plan.protocol, plan.source
    progress = progress or NoProgress()
    commit = git_commit()
    source.set_roots(roots or DataRoots.from_settings())
    prepare_split(source, protocol.eval_split, plan.task_plugin, progress)
    draws = eval_draws(protocol, source, protocol.eval_split, plan.episodes)
    resized = protocol.problem == "classification" and protocol.image_size != trained_size
    scores = Scores(protocol.problem)
    started = time.perf_counter()
    evaluate(learner, protocol, source, protocol.eval_split, draws, plan.who, progress, plan.device, scores,
             transform=resizer(trained_size) if resized else None, batch=plan.eval_batch,
             precision=eval_precision(plan.learner.obj, plan.request.precision))
    eval_s = time.perf_counter() - started
    trained = doc["task"]
    return result_document(
        plan, host, learner, draws, scores, commit=commit, precision=doc.get("precision"),
        learner_extra={"saved_with": {"plugin_version": doc["learner"].get("version"),
                                      "metabench_version": doc.get("metabench_version")}},
        trained_on={"task": trained["name"], "version": trained["version"], "image_size": trained_size,
                    "learner_file": saved.path.name, "learner_file_sha256": sha256_of(saved.path)},
        extra={**({"resized": {"from": protocol.image_size, "to": trained_size, "mode": f"{RESIZE_MODE}, antialiased"}}
                  if resized else {}),
               **({"validation": doc["validation"]} if doc.get("validation") else {})},
        timing={"meta_train_s": 0.0, "eval_s": round(eval_s, 3)})
