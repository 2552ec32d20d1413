"""Task plugin ``omniglot``: Omniglot at 28 px with rotation classes, read from the user's folder.

Lake et al.'s release (``images_background/`` and ``images_evaluation/``, each
``<alphabet>/characterNN/*.png`` at 105 px, 20 drawers per character), or the same two folders inside
torchvision's ``omniglot-py/``. Characters are split 1,100 / 100 / 423 (test = Vinyals et al.'s
test characters; see ``splits/omniglot.json`` and ``splits/README.md``). As in Vinyals et al. and
MAML, each character gives four classes, rotated by 0, 90, 180 and 270 degrees: class ``4 c + r``
is character ``c`` rotated by ``r`` quarter turns (counter-clockwise, ``torch.rot90``).

The cache holds only the unrotated images, resized to 28 x 28, as Omniglot stores them (black
ink on white). On loading they are inverted, so ink is bright on dark as in the ``kanji`` set, and
rotations are applied when an episode is materialized. Episode draws index the (virtual) split of
all rotation classes, character-major: the rows of class ``4 c + r`` follow those of ``4 c + r - 1``.

``omniglot_alphabet-{5,20}w{1,5}s`` are the fine-grained variant (:mod:`metabench.grouped`), Lake et
al.'s harder within-alphabet protocol with Vinyals' rotation classes: every episode, in training and
test, draws its classes from one alphabet *at one rotation* (group ``<alphabet>@<degrees>``, e.g.
``Kannada@90``; an alphabet gives four groups). A rotated character stays a class of its own, as in
Vinyals et al.; a rotated alphabet is then a group of its own, for two reasons: at 0 degrees the
episodes are exactly Lake et al.'s within-alphabet episodes (which have no rotations), and mixing
orientations in one episode would let a learner tell classes apart by orientation alone and put a
character with its own rotations into one episode (near-duplicate classes for the characters a
half or quarter turn leaves almost unchanged) instead of characters that look alike. The group
of a character is the alphabet folder in its committed name (``<alphabet>/characterNN``), so the
groups are part of ``splits/omniglot.json`` and checked by its SHA-256 with the classes. Every test
alphabet but Gurmukhi (whose 4 test characters give no 5-way episode) has at least 23 characters,
so the 20-way protocols draw from 12 test alphabets x 4 rotations; training episodes of 20 ways
leave out the 5 training alphabets of fewer than 20 characters (Armenian's 4, Blackfoot, Ojibwe,
Inuktitut, Tagalog). The fine-grained tasks share the plain tasks' image cache.
"""
from __future__ import annotations

from pathlib import Path

import torch

from metabench import Episode, EpisodeDraw, hookimpl
from metabench.data import ImageList
from metabench.grouped import GroupedEpisodes

from metabench.folders import SplitFolderSource, image_files, make_protocols

from . import SPLITS_DIR

ROTATIONS = 4
FOLDERS = ("images_background", "images_evaluation")
SETTINGS = ((5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5))
#: version of the within-alphabet protocols (bump when their groups or the grouped draw change)
ALPHABET_VERSION = 1


def protocols():
    return make_protocols("omniglot", SETTINGS, 28, 1,
                          "the 423 Vinyals test characters of Omniglot x 4 rotations (28 px)")


def alphabet_protocols():
    return make_protocols("omniglot_alphabet", SETTINGS, 28, 1,
                          "the Vinyals test characters of Omniglot x 4 rotations, every episode within one "
                          "alphabet at one rotation (fine-grained, 28 px)", version=ALPHABET_VERSION)


class OmniglotSource(SplitFolderSource):
    """Omniglot characters x 4 rotations; each split one uint8 cache [n_characters * 20, 1, 28, 28]."""

    dataset = "omniglot"
    folder_names = ("omniglot", "omniglot-py", "Omniglot")
    layout = ("images_background/ and images_evaluation/ with <alphabet>/characterNN/*.png "
              "(Lake et al.), or both inside omniglot-py/ (torchvision)")
    image_size = 28
    channels = 1
    split_file = SPLITS_DIR / "omniglot.json"
    split_sha256 = "0dbf93073cbd3b3bd1f0d659fde053deca46cf3f6c2816e9414e656cd92c2e32"
    min_images = max(s + q for _, s, q in SETTINGS)

    def __init__(self, splits=None) -> None:
        super().__init__(splits)
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --------------------------------------------------------------------- listing (characters)
    def base_folder(self, root: Path) -> Path:
        """The folder holding images_background/ and images_evaluation/ (``root`` or root/omniglot-py)."""
        for base in (root, root / "omniglot-py"):
            if all((base / name).is_dir() for name in FOLDERS):
                return base
        raise self.error(f"{root} holds neither images_background/ + images_evaluation/ nor omniglot-py/ with both")

    def list_split(self, root: Path, split: str) -> ImageList:
        base = self.base_folder(root)
        characters = self.split_classes(split)
        doc = self.split_doc()
        homes = {alphabet: folder for folder in FOLDERS for alphabet in doc[folder]}
        folders = []
        for name in characters:
            alphabet, _, character = name.partition("/")
            folder = base / homes.get(alphabet, FOLDERS[0]) / alphabet / character
            if not folder.is_dir():
                raise self.error(f"character {name} of split {split!r} is missing: no folder {folder}")
            folders.append(folder)
        return self.finish(split, characters, [image_files(f) for f in folders], folders)

    # --------------------------------------------------------------------- rotation classes
    def class_sizes(self, split: str) -> list[int]:
        return [n for n in self.listing(split).sizes() for _ in range(ROTATIONS)]

    def prepare(self, split: str, progress=None) -> None:
        if split in self._loaded:
            return
        self.check_split(split)
        raw = self.load_split(split, progress=progress)
        sizes = self.listing(split).sizes()
        if raw.dtype != torch.uint8 or tuple(raw.shape[1:]) != (1, 28, 28) or raw.shape[0] != sum(sizes):
            raise RuntimeError(f"omniglot cache of split {split!r} is {raw.dtype} {tuple(raw.shape)}; "
                               f"expected uint8 [{sum(sizes)}, 1, 28, 28]")
        self._loaded[split] = 255 - raw  # white ink on black; 28 px x 20 per character: a few MB
        # virtual row -> (row of the unrotated image, quarter turns), in class_sizes order
        base_rows, turns, start = [], [], 0
        for n in sizes:
            for r in range(ROTATIONS):
                base_rows.append(torch.arange(start, start + n))
                turns.append(torch.full((n,), r, dtype=torch.int64))
            start += n
        self._rows[split] = (torch.cat(base_rows), torch.cat(turns))

    def rotated(self, split: str, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [len(rows), 1, 28, 28]: the images at virtual ``rows`` of the split, rotated."""
        self.prepare(split)
        base_rows, turns = self._rows[split]
        out = self._loaded[split].index_select(0, base_rows[rows])
        r = turns[rows]
        for k in range(1, ROTATIONS):
            pick = (r == k).nonzero().flatten()
            if len(pick):
                out[pick] = torch.rot90(out[pick], k, dims=(2, 3))
        return out

    def materialize(self, draw: EpisodeDraw, split: str) -> Episode:
        ways = len(draw.classes)
        shots, queries = len(draw.support) // ways, len(draw.query) // ways
        support_x = self.rotated(split, torch.tensor(draw.support)).float().div_(255.0)
        query_x = self.rotated(split, torch.tensor(draw.query)).float().div_(255.0)
        labels = torch.arange(ways)
        return Episode(support_x, labels.repeat_interleave(shots), query_x, labels.repeat_interleave(queries))

    def pooled(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All rotation classes of a split: (uint8 [4 N, 1, 28, 28], int64 class labels)."""
        sizes = torch.tensor(self.class_sizes(split))
        return self.rotated(split, torch.arange(int(sizes.sum()))), torch.repeat_interleave(torch.arange(len(sizes)), sizes)

    def info(self) -> dict:
        out = super().info()
        for row in out.values():  # the cache counts characters; a class is a character x rotation
            row["classes"] *= ROTATIONS
            row["images"] *= ROTATIONS
        return out


class OmniglotAlphabetSource(GroupedEpisodes, OmniglotSource):
    """Omniglot's rotation classes, each episode's drawn from one alphabet at one rotation.

    Its data set name, folder and cache are the plain source's (``dataset = "omniglot"``)."""

    def class_groups(self, split: str) -> list[str]:
        """``<alphabet>@<degrees>`` of class ``4 c + r``: the alphabet of character ``c``'s committed
        name ``<alphabet>/characterNN``, rotated by ``90 r`` degrees."""
        return [f"{name.partition('/')[0]}@{90 * r}" for name in self.split_classes(split) for r in range(ROTATIONS)]


@hookimpl
def metabench_register_tasks(register):
    source = OmniglotSource()  # shared by the four protocols, so a split is decoded and loaded once
    for protocol in protocols():
        register(protocol, source)
    grouped = OmniglotAlphabetSource()  # the within-alphabet protocols: same folder and image cache
    for protocol in alphabet_protocols():
        register(protocol, grouped)
