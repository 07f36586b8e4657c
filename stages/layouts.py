"""How a dataset's raw files map to labels, source splits and groups: a registry of layouts.

A layout looks at every file under `data/raw/<dataset>/` and returns one `Candidate` per file.
A file the layout cannot place (a README, a split list, a file outside any class folder) is still
returned, with the reason it is set aside, so that the manifest accounts for every file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from stages.errors import UserError
from stages.registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Candidate:
    path: str  # POSIX path relative to the raw dataset folder
    label: str | None = None
    source_split: str | None = None
    group: str | None = None
    reason: str = ""  # non-empty: set aside by the layout, with this reason
    # For images stored as pixel values inside another file (FER-2013's CSV), the decoded uint8
    # array (H, W) or (H, W, C); `path` then names the member, as `<file>::<row>`.
    pixels: Any = None


@dataclass(frozen=True)
class LayoutKind:
    name: str
    options: type
    candidates: Callable[[Any, Path], list[Candidate]]
    # True when candidates carry pixels rather than naming image files.
    in_memory: bool = False


REGISTRY: Registry[LayoutKind] = Registry("layout kind")


def register_layout(name: str, options: type, in_memory: bool = False) -> Callable:
    def decorate(fn: Callable[[Any, Path], list[Candidate]]) -> Callable:
        REGISTRY[name] = LayoutKind(name, options, fn, in_memory)
        return fn

    return decorate


def get_layout(name: str) -> LayoutKind:
    return REGISTRY.lookup(name)


def all_files(raw: Path) -> list[str]:
    """Every regular file under `raw`, as sorted POSIX relative paths."""
    return sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# folders: class = folder name, optionally under split folders (most Kaggle datasets).


@dataclass(frozen=True)
class FoldersOptions:
    # Folder inside the raw folder where the class (or split) folders start, e.g.
    # "Garbage classification/Garbage classification".
    root: str = ""
    # Split folder name -> our split name (train, val, test). Empty: no split folders.
    splits: dict[str, str] = field(default_factory=dict)


@register_layout("folders", FoldersOptions)
def folders(options: FoldersOptions, raw: Path) -> list[Candidate]:
    for folder, split in options.splits.items():
        if split not in ("train", "val", "test"):
            raise UserError(f"layout.splits.{folder}: {split!r} is not a split; valid: train, val, test")
    root = PurePosixPath(options.root) if options.root else PurePosixPath()
    if options.root and not (raw / options.root).is_dir():
        raise UserError(f"{raw / options.root}: the layout root does not exist; check layout.root in params.yaml")
    result = []
    for path in all_files(raw):
        result.append(_place(PurePosixPath(path), root, options.splits))
    return result


def _place(path: PurePosixPath, root: PurePosixPath, splits: dict[str, str]) -> Candidate:
    text = path.as_posix()
    try:
        parts = path.relative_to(root).parts if root.parts else path.parts
    except ValueError:
        return Candidate(text, reason=f"outside the layout root '{root}'")
    source_split = None
    if splits:
        if len(parts) < 2 or parts[0] not in splits:
            where = f"folder '{parts[0]}'" if len(parts) > 1 else "the layout root"
            return Candidate(text, reason=f"stray file: in {where}, not in a split folder ({', '.join(splits)})")
        source_split = splits[parts[0]]
        parts = parts[1:]
    if len(parts) < 2:
        return Candidate(text, source_split=source_split, reason="stray file: not inside a class folder")
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
        return Candidate(
            text, label=parts[0], source_split=source_split, reason=f"not an image file ('{path.suffix or path.name}')"
        )
    return Candidate(text, label=parts[0], source_split=source_split)
