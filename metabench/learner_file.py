"""Saved learner files: a meta-trained learner, kept to be evaluated again, on any task it can take.

``<result stem>.learner.pt`` beside the result (``metabench run`` writes it unless ``--no-save``) is
one ``torch.save`` dict of plain types, read with ``torch.load(weights_only=True)``::

    format          "metabench-learner"
    format_version  1 (see READABLE)
    metabench_version, created_utc
    learner         {"name", "plugin", "version", "config": {...}}
    backbone        {"name", "options": {...}}         the options it was built with
    task            {"name", "version", "dataset", "problem", "ways", "shots", "queries",
                     "channels", "image_size"}         the task it was trained on
    seed, budget
    validation      the validation record of the run (or None)
    precision       what it was trained in (``--precision``: fp32 or bf16; absent in files written
                    before runs had one: fp32)
    state           Learner.state_dict(): the trained state predict needs

A file of a format this metabench cannot read, or whose learner plugin is not installed, is
refused with one line. Every format listed in :data:`READABLE` keeps loading in later versions
(``tests/fixtures/`` keeps a file of each).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from . import __version__
from .checkpoint import load_file
from .errors import MetabenchError
from .files import write_atomic
from .settings import PRECISIONS

FORMAT = "metabench-learner"
FORMAT_VERSION = 1
#: the formats this metabench reads
READABLE = (1,)
SUFFIX = ".learner.pt"


def learner_document(*, learner: dict, backbone: dict, task: dict, seed: int, budget: str, state: dict,
                     validation: dict | None, precision: str = "fp32") -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "metabench_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "learner": learner, "backbone": backbone, "task": task, "seed": seed, "budget": budget,
            "validation": validation, "precision": precision, "state": state}


def write_learner_file(doc: dict, out_dir: Path, stem: str) -> Path:
    """Write ``<out_dir>/<stem>.learner.pt`` atomically; a taken name gets a numeric suffix, claimed
    atomically (never overwrites, also when two runs write the same name at once)."""
    import torch

    return write_atomic(Path(out_dir) / f"{stem}{SUFFIX}", lambda fh: torch.save(doc, fh), exclusive=True,
                        suffix=SUFFIX)


_REQUIRED = {"learner": ("name", "plugin", "config"), "backbone": ("name", "options"),
             "task": ("name", "version", "problem", "ways", "channels", "image_size"), "seed": (), "budget": (),
             "state": ()}


def read_learner_file(path: str | Path) -> dict:
    """A learner file's contents, checked; MetabenchError (one line naming the file) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise MetabenchError(f"{path}: is a folder; expected a saved learner file (*{SUFFIX})")
    doc = load_file(path, "saved learner file")
    if doc.get("format") != FORMAT:
        raise MetabenchError(f"{path}: not a saved metabench learner (no format {FORMAT!r})")
    version = doc.get("format_version")
    if version not in READABLE:
        raise MetabenchError(f"{path}: learner file format {version!r} (written by metabench "
                             f"{doc.get('metabench_version', '?')}) is not one this metabench {__version__} reads "
                             f"({', '.join(map(str, READABLE))})")
    if doc.get("precision", "fp32") not in PRECISIONS:
        raise MetabenchError(f"{path}: damaged learner file (precision {doc.get('precision')!r}; accepted: "
                             f"{', '.join(PRECISIONS)})")
    for key, fields in _REQUIRED.items():
        value = doc.get(key)
        if value is None or (fields and not (isinstance(value, dict) and all(f in value for f in fields))):
            raise MetabenchError(f"{path}: damaged learner file (missing {key}"
                                 f"{'.' + '/'.join(fields) if fields else ''})")
    return doc


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

