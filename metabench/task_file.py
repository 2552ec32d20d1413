"""Your own data set as a task, with no code: a TOML task file naming a folder.

``metabench run --learner protonet --task flowers.toml`` (any command's ``--task`` takes a path
ending in ``.toml``)::

    [task]
    dataset = "flowers"       # default: the file's name without .toml; the task is flowers-5w1s
    folder = "flowers"        # relative to the task file, or absolute
    layout = "splits"         # "splits": folder/{train,val,test}/<class>/<images>
                              # "classes": folder/<class>/<images>, classes split by split_file
    split_file = "split.json" # layout "classes": {"train": [...], "val": [...], "test": [...]}
    channels = 3              # 1 (grey) or 3 (RGB)
    image_size = 84           # images are resized to image_size x image_size
    ways = 5
    shots = 1
    queries = 15
    episodes = 600            # fixed test episodes
    groups = "groups.json"    # optional: {"<class>": "<group>", ...}; every episode's classes then
                              # come from one group (fine-grained episodes, metabench.grouped)

Images are .jpg, .jpeg or .png files; hidden files are ignored. The task is named
``<dataset>-<ways>w<shots>s``. The class names and the file names of every split are hashed
(SHA-256) into the task (``Protocol.data_sha256``), which every result records as
``task.data_sha256``: a folder whose classes or files change is another data set. Episodes
are drawn from their own seeds as for any task, so they are fixed for a given folder. With a
``groups`` file (JSON or TOML: class folder name -> group name), each episode draws its classes
from one group with at least ``ways`` classes (:mod:`metabench.grouped`); classes the file does
not name are in no group and never drawn; the mapping is hashed into ``data_sha256`` too. A bad layout
(no split folder, an empty class, a class with fewer than shots + queries images, too few classes
for the ways, an unreadable image) is refused with one line naming the path and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .data import FolderImageSource, ImageList
from .errors import MetabenchError
from .folders import image_files
from .grouped import GroupedEpisodes
from .task import Protocol

KEYS = {"dataset", "folder", "layout", "split_file", "channels", "image_size", "ways", "shots", "queries",
        "episodes", "groups"}
LAYOUTS = {"splits": "folder/{train,val,test}/<class>/<images>",
           "classes": "folder/<class>/<images> with a split_file naming each split's classes"}
SPLITS = ("train", "val", "test")


def is_task_file(name: str) -> bool:
    return name.endswith(".toml")


@dataclass(frozen=True)
class TaskSpec:
    path: Path
    name: str
    folder: Path
    layout: str
    split_file: Path | None
    channels: int
    image_size: int
    ways: int
    shots: int
    queries: int
    episodes: int
    groups_file: Path | None = None


def _positive(table: dict, key: str, where: str, default=None, minimum: int = 1) -> int:
    value = table.get(key, default)
    if value is None:
        raise MetabenchError(f"{where}: [task] needs {key} = <integer>")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MetabenchError(f"{where}: [task] {key} must be an integer >= {minimum}, got {value!r}")
    return value


def read_task_file(path: str | Path) -> TaskSpec:
    """The task file's settings, checked; MetabenchError (one line naming the file) otherwise."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetabenchError(f"{where}: no such task file") from None
    except IsADirectoryError:
        raise MetabenchError(f"{where}: is a folder; expected a task file (.toml)") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the path
        raise MetabenchError(f"{where}: cannot read: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, a number of over 4300 digits, nested too deeply
        raise MetabenchError(f"{where}: invalid TOML: {exc}") from None
    if set(doc) != {"task"} or not isinstance(doc["task"], dict):
        raise MetabenchError(f"{where}: a task file holds one [task] table; found "
                             f"{', '.join(map(repr, doc)) or 'nothing'}")
    table = doc["task"]
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise MetabenchError(f"{where}: unknown [task] key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(KEYS))}")
    name = table.get("dataset", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
        raise MetabenchError(f"{where}: [task] dataset must be a plain lowercase name (letters, digits, _), "
                             f"got {name!r}" + ("" if "dataset" in table else " (from the file name: set dataset)"))
    if not isinstance(table.get("folder"), str) or not table["folder"]:
        raise MetabenchError(f"{where}: [task] needs folder = \"<path to the images>\"")
    layout = table.get("layout", "splits")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise MetabenchError(f"{where}: [task] layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    split_file = table.get("split_file")
    if layout == "classes" and not isinstance(split_file, str):
        raise MetabenchError(f"{where}: layout \"classes\" needs split_file = \"<file naming each split's classes>\"")
    if layout == "splits" and split_file is not None:
        raise MetabenchError(f"{where}: split_file is for layout \"classes\"; layout \"splits\" takes the splits "
                             "from the folders train/, val/, test/")
    groups_file = table.get("groups")
    if groups_file is not None and (not isinstance(groups_file, str) or not groups_file):
        raise MetabenchError(f"{where}: [task] groups must be the path of a JSON or TOML file mapping class "
                             f"folder names to group names, got {groups_file!r}")
    channels = _positive(table, "channels", where, 3)
    if channels not in (1, 3):
        raise MetabenchError(f"{where}: [task] channels must be 1 or 3, got {channels}")
    base = path.parent
    try:
        folder = Path(table["folder"]).expanduser()
    except RuntimeError:  # ~name of no such user
        raise MetabenchError(f"{where}: [task] folder {table['folder']!r}: no home folder for "
                             f"{table['folder'].split('/')[0]!r}; give an existing folder") from None
    return TaskSpec(path, name, folder if folder.is_absolute() else base / folder, layout,
                    (base / split_file) if isinstance(split_file, str) else None, channels,
                    _positive(table, "image_size", where, 84, minimum=8), _positive(table, "ways", where),
                    _positive(table, "shots", where), _positive(table, "queries", where),
                    _positive(table, "episodes", where, 600),
                    (base / groups_file) if groups_file is not None else None)


class TaskFileSource(FolderImageSource):
    """The images of a task file's folder (cached like any folder data set)."""

    def __init__(self, spec: TaskSpec):
        super().__init__()
        self.spec = spec
        self.dataset = spec.name
        self.layout = LAYOUTS[spec.layout]
        self.image_size, self.channels = spec.image_size, spec.channels
        self._split_doc: dict | None = None

    @property
    def root(self) -> Path:
        if not self.spec.folder.is_dir():
            missing = "is not a folder" if self.spec.folder.exists() else "does not exist"
            raise self.error(f"data folder {self.spec.folder} {missing}")
        return self.spec.folder

    def set_roots(self, roots) -> None:
        """A task file names its own folder: --data-root does not move it."""

    def error(self, message: str) -> MetabenchError:
        return MetabenchError(f"task file {self.spec.path}: {message} (expected {self.layout})")

    def _read_mapping_file(self, path: Path, what: str) -> object:
        """The JSON (``.json``) or else TOML document of ``path``: the split file or the groups file
        (``what`` names which in the one-line error)."""
        try:
            text = path.read_text(encoding="utf-8")
            return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise self.error(f"{what} {path} does not exist") from None
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: TOMLDecodeError and JSONDecodeError too
            raise self.error(f"{what} {path} is not valid JSON/TOML: {str(exc)[:120]}") from None

    def split_classes(self, split: str) -> list[str]:
        if self._split_doc is None:
            path = self.spec.split_file
            doc = self._read_mapping_file(path, "split file")
            for s in SPLITS:
                names = doc.get(s) if isinstance(doc, dict) else None
                if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                    raise self.error(f"split file {path}: {s!r} must list class folder names")
            seen = [n for s in SPLITS for n in doc[s]]
            if len(set(seen)) != len(seen):
                raise self.error(f"split file {path}: a class is listed twice")
            self._split_doc = doc
        return list(self._split_doc[split])

    def list_split(self, root: Path, split: str) -> ImageList:
        spec = self.spec
        if spec.layout == "splits":
            split_dir = root / split
            if not split_dir.is_dir():
                raise self.error(f"no split folder {split_dir}")
            names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not names:
                raise self.error(f"{split_dir} holds no class folders")
            folders = [split_dir / n for n in names]
        else:
            names = self.split_classes(split)
            folders = [root / n for n in names]
            missing = [f for f in folders if not f.is_dir()]
            if missing:
                raise self.error(f"class folder {missing[0]} of split {split!r} does not exist")
        files = [image_files(f) for f in folders]
        need = spec.shots + spec.queries
        for folder, found in zip(folders, files):
            if not found:
                raise self.error(f"class folder {folder} holds no images (.jpg, .jpeg, .png)")
            if split != "train" and len(found) < need:
                raise self.error(f"class folder {folder} has {len(found)} images; {spec.shots} shots + "
                                 f"{spec.queries} queries need {need}")
        if split != "train" and len(names) < spec.ways:
            raise self.error(f"split {split!r} has {len(names)} classes; {spec.ways}-way episodes need {spec.ways}")
        return ImageList(tuple(names), tuple(tuple(f) for f in files))

    def listing_sha256(self) -> str:
        """SHA-256 over every split's class names and file names: the identity of the folder."""
        digest = hashlib.sha256(self.spec.layout.encode())
        for split in SPLITS:
            digest.update(split.encode() + b"\0" + self.listing(split).fingerprint().encode())
        return digest.hexdigest()


class GroupedTaskFileSource(GroupedEpisodes, TaskFileSource):
    """A task file's folder with a ``groups`` file: every episode within one group of classes."""

    def groups(self) -> dict[str, str]:
        """The checked class -> group mapping (every key a class of some split, every value a name)."""
        if "_group_of" not in self.__dict__:
            path = self.spec.groups_file
            doc = self._read_mapping_file(path, "groups file")
            if not isinstance(doc, dict) or not doc or not all(
                    isinstance(k, str) and isinstance(v, str) and v for k, v in doc.items()):
                raise self.error(f"groups file {path} must map class folder names to group names "
                                 '({"<class>": "<group>", ...})')
            classes = {name for split in SPLITS for name in self.listing(split).classes}
            unknown = sorted(set(doc) - classes)
            if unknown:
                raise self.error(f"groups file {path} names {len(unknown)} class(es) that no split has, "
                                 f"e.g. {unknown[0]!r}")
            self._group_of = doc
        return self._group_of

    def class_groups(self, split: str) -> list[str | None]:
        self.check_split(split)
        groups = self.groups()
        return [groups.get(name) for name in self.listing(split).classes]

    def check_groups(self, ways: int, shots: int, queries: int) -> None:
        """Refuse (one line) a split whose groups cannot give one episode: training needs ``ways``
        classes in one group, validation and test ``ways`` classes of ``shots + queries`` images."""
        for split in SPLITS:
            need = 1 if split == "train" else shots + queries
            if not self.eligible_groups(split, ways, need):
                raise self.error(f"groups file {self.spec.groups_file}: no group of split {split!r} has {ways} "
                                 f"classes" + ("" if split == "train" else f" of at least {need} images")
                                 + f" for {ways}-way fine-grained episodes")

    def listing_sha256(self) -> str:
        """The folder's identity with the group of every class."""
        canonical = json.dumps(self.groups(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256((super().listing_sha256() + "\0groups\0" + canonical).encode("utf-8")).hexdigest()


def load_task_file(path: str | Path) -> tuple[Protocol, TaskFileSource]:
    """The protocol and data source of a task file (the folder is listed and checked now)."""
    spec = read_task_file(path)
    if spec.groups_file is None:
        source = TaskFileSource(spec)
    else:
        source = GroupedTaskFileSource(spec)
        source.check_groups(spec.ways, spec.shots, spec.queries)
    identity = source.listing_sha256()
    protocol = Protocol(name=f"{spec.name}-{spec.ways}w{spec.shots}s", version=1, dataset=spec.name, ways=spec.ways,
                        shots=spec.shots, queries=spec.queries, episodes=spec.episodes, image_size=spec.image_size,
                        channels=spec.channels, data_sha256=identity, task_file=str(spec.path),
                        description=f"task file {spec.path}: {spec.folder}")
    return protocol, source
