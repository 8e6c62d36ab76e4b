"""The demo's corpus: the installed Python standard library's source files, as bytes.

Every Python installation carries it, so the demo needs no download. The file
list is the sorted relative paths of ``*.py`` under ``sysconfig``'s stdlib
folder, without third-party packages and test suites (Linux distributions ship
those separately, so leaving them out keeps the corpus the same across
installs of one Python version). A file goes to validation when the SHA-256 of
its relative path falls in the first tenth, a split that never changes.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
VALIDATION_PERCENT = 10
FILE_SEPARATOR = b"\n\n"


@dataclass
class Corpus:
    root: Path
    train: torch.Tensor  # uint8 bytes of the training files, concatenated
    validation: torch.Tensor
    train_files: int
    validation_files: int

    def describe(self) -> dict:
        return {
            "root": str(self.root),
            "train_files": self.train_files,
            "validation_files": self.validation_files,
            "train_bytes": self.train.numel(),
            "validation_bytes": self.validation.numel(),
        }


def stdlib_sources(root: Path) -> list[str]:
    """Sorted relative paths (posix) of the standard library's Python files."""
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS.isdisjoint(relative.parts) and path.is_file():
            paths.append(relative.as_posix())
    return sorted(paths)


def is_validation(relative_path: str) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


def load_corpus(root: Path | None = None) -> Corpus:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for relative in stdlib_sources(root):
        parts[is_validation(relative)].append((root / relative).read_bytes())
    if not parts[False] or not parts[True]:
        raise RuntimeError(
            f"found too few Python files under {root} to build the demo corpus "
            f"({len(parts[False])} train, {len(parts[True])} validation)."
        )

    def as_tensor(files: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(FILE_SEPARATOR.join(files)), dtype=torch.uint8)

    return Corpus(
        root=root,
        train=as_tensor(parts[False]),
        validation=as_tensor(parts[True]),
        train_files=len(parts[False]),
        validation_files=len(parts[True]),
    )


def random_windows(
    data: torch.Tensor, count: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive bytes at random offsets, as int64."""
    starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
    offsets = torch.arange(length)
    return data[starts[:, None] + offsets].long()
