"""How a dataset's raw files map to labels, source splits and groups: a registry of layouts.

A layout looks at every file under `data/raw/<dataset>/` and returns one `Candidate` per file.
A file the layout cannot place (a README, a split list, a file outside any class folder) is still
returned, with the reason it is set aside, so that the manifest accounts for every file.

Layouts:
- `folders`: class = folder name, optionally under split folders (most Kaggle datasets).
- `filename_pattern`: class read from the file name by a regular expression (Food-11's EPFL
  original, `training/<classid>_<n>.jpg`).
- `csv`: class (and optionally split and group) read from one or more CSV files that name the
  image files (GTSRB, HAM10000, covid-chest-xray, AICUP mango).
- `pixels_csv`: images stored as pixel values in a CSV (FER-2013's `fer2013.csv`, the
  `label,pixel1..pixelN` form of sign-language MNIST and HAM10000's `hmnist_*.csv`).

Every layout takes `class_map` (raw label -> declared class name), applied by `map_label`.

Accounting. Over the real files under raw, files in = accepted + set aside: each file is one
candidate. The table layouts add candidates that name no file: a CSV row whose image does not
exist ("missing: ..."), the extra rows when a CSV names one file several times ("duplicate row:
..."), and pixel rows that cannot be decoded. Those are named `<csv file>::<row>` (the row as a
spreadsheet numbers it, and as every message names it: the header is row 1, a blank line is a
row, a quoted cell holding a line break stays one row), so the manifest has one row per real
file plus these extra rows, and every path in it is unique.
"""

from __future__ import annotations

import csv as csvmodule
import math
import posixpath
import re
import string
import unicodedata
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np

from stages.errors import UserError
from stages.registry import Registry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")


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

    def __post_init__(self) -> None:
        # A folder named "é" may be spelt with a combining accent (NFD, as macOS and some zips
        # write names); the declared classes are compared in NFC.
        if isinstance(self.label, str):
            object.__setattr__(self, "label", unicodedata.normalize("NFC", self.label))


@dataclass(frozen=True)
class LayoutKind:
    name: str
    options: type
    candidates: Callable[[Any, Path], list[Candidate]]
    # True when candidates carry pixels rather than naming image files.
    in_memory: bool = False
    # The checks that need no data (regular expressions, split names, keys that exclude each
    # other), given the options and the params key to name (`datasets.<name>.layout`). params.yaml
    # runs them as it is read, so `python -m stages.config` finds these mistakes before any fetch;
    # `candidates` runs them too, naming the key `layout`.
    check: Callable[[Any, str], Any] = lambda options, key: None


REGISTRY: Registry[LayoutKind] = Registry("layout kind")


def register_layout(
    name: str, options: type, in_memory: bool = False, check: Callable[[Any, str], Any] | None = None
) -> Callable:
    def decorate(fn: Callable[[Any, Path], list[Candidate]]) -> Callable:
        kind = LayoutKind(name, options, fn, in_memory)
        REGISTRY[name] = replace(kind, check=check) if check else kind
        return fn

    return decorate


def get_layout(name: str) -> LayoutKind:
    return REGISTRY.lookup(name)


def all_files(raw: Path) -> list[str]:
    """Every regular file under `raw`, as sorted POSIX relative paths."""
    return sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Pieces every layout shares.


def map_label(raw_label: str | None, class_map: Mapping[str, str]) -> str | None:
    """The class name for a raw label: its `class_map` entry, else the raw label unchanged (a raw
    label the map does not name is then set aside by validate as not a declared class)."""
    if raw_label is None:
        return None
    name = _named(raw_label, class_map)
    return raw_label if name is None else name


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _named(name: str, mapping: Mapping[str, str]) -> str | None:
    """`mapping`'s value for a folder or label `name`, or None. A folder `Pâtes` spelt decomposed
    (NFD, as macOS zips write names) is the `Pâtes` params.yaml writes composed."""
    if name in mapping:
        return mapping[name]
    return next((value for key, value in mapping.items() if _nfc(key) == _nfc(name)), None)


def not_an_image(path: str) -> str:
    """The reason a file is not an image by its name, or "" when it may be one. Hidden files and
    folders are a system's or a tool's, not data: macOS's `.DS_Store` and `._x.jpg` (its
    metadata beside x.jpg), a notebook's `.ipynb_checkpoints/` copies."""
    posix = PurePosixPath(path)
    if posix.name.startswith("."):
        return f"hidden file ('{posix.name}')"
    if hidden := next((part for part in posix.parts[:-1] if part.startswith(".")), None):
        return f"in a hidden folder ('{hidden}')"
    if posix.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ('{posix.suffix or posix.name}')"
    return ""


def row_only(path: str, reason: str, label: str | None = None, split: str | None = None,
             group: str | None = None) -> Candidate:
    """A set-aside candidate for a table row that names no file under raw (a CSV row whose image
    is missing, a duplicate row): validate records it with 0 bytes and no checksum."""
    return Candidate(path, label=label, source_split=split, group=group, reason=reason)


def _check_splits(splits: Mapping[str, str], key: str) -> None:
    for name, split in splits.items():
        if split not in SPLITS:
            raise UserError(f"{key}.{name}: {split!r} is not a split; valid: {', '.join(SPLITS)}")


def _inside_raw(path: str) -> bool:
    """Whether `path` names something inside the raw folder: relative, and never `..`. (A colon
    is fine here: a local folder may hold `Photos: 2019/`, which no archive entry may.)"""
    posix = PurePosixPath(path.replace("\\", "/"))
    return bool(path.strip()) and not posix.is_absolute() and ".." not in posix.parts


def _check_root(root: str, key: str) -> None:
    if root and not _inside_raw(root):
        raise UserError(f"{key}.root: {root!r} is not a folder inside the raw folder; give a relative path such as "
                        "'Garbage classification', or '' for the raw folder itself")


def _root(raw: Path, root: str) -> PurePosixPath:
    """The root as spelt on disk (a folder `Données` may be spelt decomposed there, see `_named`)."""
    folder = raw
    for part in PurePosixPath(root).parts if root else ():
        if not (folder / part).is_dir() and folder.is_dir():
            part = next((child.name for child in folder.iterdir() if child.is_dir() and _nfc(child.name) == _nfc(part)),
                        part)
        folder = folder / part
    if root and not folder.is_dir():
        # Say what is there: a `local` folder source is copied without its own name, so a root
        # copied from an archive's example (the README's `flowers`) names a folder that is not.
        here = folder.parent
        while here != raw and not here.is_dir():
            here = here.parent
        names = sorted(child.name for child in (here.iterdir() if here.is_dir() else ())
                       if child.is_dir() and not child.name.startswith("."))
        held = (f"the folders {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
                if names else "no folders")
        raise UserError(f"{raw / root}: the layout root does not exist; {here} holds {held}: set layout.root in "
                        "params.yaml to the folder the class (or split) folders sit in, or remove it if they are "
                        "these (a local folder source is copied without its own name)")
    return PurePosixPath(folder.relative_to(raw).as_posix()) if root else PurePosixPath()


def _under_root(
    path: PurePosixPath, root: PurePosixPath, splits: dict[str, str]
) -> tuple[tuple[str, ...], str | None] | Candidate:
    """The parts of `path` below the root and its split folder, and the split; or, for a file
    outside them, the set-aside candidate that says so."""
    text = path.as_posix()
    try:
        parts = path.relative_to(root).parts if root.parts else path.parts
    except ValueError:
        return Candidate(text, reason=f"outside the layout root '{root}'")
    if not splits:
        return parts, None
    split = _named(parts[0], splits) if len(parts) > 1 else None
    if split is None:
        where = f"folder '{parts[0]}'" if len(parts) > 1 else "the layout root"
        # Facemask's Train/ under `splits: {train: ...}`: names are compared as written.
        near = next((name for name in splits if len(parts) > 1 and name.casefold() == parts[0].casefold()), None)
        hint = f"; layout.splits names '{near}', which differs in case only: write '{parts[0]}'" if near else ""
        return Candidate(text, reason=f"stray file: in {where}, not in a split folder ({', '.join(splits)}){hint}")
    return parts[1:], split


# --------------------------------------------------------------------------------------------
# folders: class = folder name, optionally under split folders (most Kaggle datasets).


@dataclass(frozen=True)
class FoldersOptions:
    # Folder inside the raw folder where the class (or split) folders start, e.g.
    # "Garbage classification/Garbage classification".
    root: str = ""
    # Split folder name -> our split name (train, val, test). Empty: no split folders.
    splits: dict[str, str] = field(default_factory=dict)
    # Class folder name -> class name. A folder the map does not name keeps its own name.
    class_map: dict[str, str] = field(default_factory=dict)


def check_folders(options: FoldersOptions, key: str) -> None:
    _check_root(options.root, key)
    _check_splits(options.splits, f"{key}.splits")


@register_layout("folders", FoldersOptions, check=check_folders)
def folders(options: FoldersOptions, raw: Path) -> list[Candidate]:
    check_folders(options, "layout")
    root = _root(raw, options.root)
    return [_place(PurePosixPath(path), root, options.splits, options.class_map) for path in all_files(raw)]


def _place(path: PurePosixPath, root: PurePosixPath, splits: dict[str, str], class_map: Mapping[str, str]) -> Candidate:
    text = path.as_posix()
    # A hidden file is a system's (.DS_Store), not a misplaced image, wherever it lies.
    hidden = reason if (reason := not_an_image(text)).startswith(("hidden file", "in a hidden folder")) else ""
    placed = _under_root(path, root, splits)
    if isinstance(placed, Candidate):
        return Candidate(text, reason=hidden) if hidden else placed
    parts, source_split = placed
    if len(parts) < 2:
        return Candidate(text, source_split=source_split, reason=hidden or "stray file: not inside a class folder")
    label = map_label(parts[0], class_map)
    return Candidate(text, label=label, source_split=source_split, reason=not_an_image(text))


# --------------------------------------------------------------------------------------------
# filename_pattern: class read from the file name (Food-11's EPFL original: training/3_125.jpg).


@dataclass(frozen=True)
class FilenamePatternOptions:
    # A regular expression matched against the whole file name (not the folders), with a named
    # group `label` (the raw label) and optionally one named `group` (files sharing it are split
    # together). Food-11: '(?P<label>\d+)_\d+\.jpg'.
    pattern: str
    # Folder inside the raw folder where the split folders (or the files) start.
    root: str = ""
    # Split folder name -> our split name, as for `folders`. Files may sit at any depth below it.
    splits: dict[str, str] = field(default_factory=dict)
    # Raw label -> class name (Food-11: "0" -> bread, ...).
    class_map: dict[str, str] = field(default_factory=dict)


def _label_regex(options: FilenamePatternOptions, key: str) -> re.Pattern:
    try:
        pattern = re.compile(options.pattern)
    except re.error as error:
        raise UserError(f"{key}.pattern: {options.pattern!r} is not a regular expression ({error})") from None
    if "label" not in pattern.groupindex:
        raise UserError(f"{key}.pattern: {options.pattern!r} has no named group for the label; write (?P<label>...)")
    return pattern


def check_filename_pattern(options: FilenamePatternOptions, key: str) -> re.Pattern:
    _check_root(options.root, key)
    _check_splits(options.splits, f"{key}.splits")
    return _label_regex(options, key)


@register_layout("filename_pattern", FilenamePatternOptions, check=check_filename_pattern)
def filename_pattern(options: FilenamePatternOptions, raw: Path) -> list[Candidate]:
    pattern = check_filename_pattern(options, "layout")
    root = _root(raw, options.root)
    result = []
    for text in all_files(raw):
        placed = _under_root(PurePosixPath(text), root, options.splits)
        if isinstance(placed, Candidate):
            result.append(placed)
            continue
        _, source_split = placed
        if reason := not_an_image(text):
            result.append(Candidate(text, source_split=source_split, reason=reason))
            continue
        match = pattern.fullmatch(PurePosixPath(text).name)
        if match is None:
            result.append(Candidate(text, source_split=source_split, reason=f"name does not match {options.pattern}"))
            continue
        group = match.group("group") if "group" in pattern.groupindex else None
        label = map_label(match.group("label"), options.class_map)
        result.append(Candidate(text, label=label, source_split=source_split, group=group))
    return result


# --------------------------------------------------------------------------------------------
# Reading CSV files.


def _csv_path(raw: Path, relpath: str) -> Path:
    path = raw / relpath
    if not path.is_file():
        raise UserError(
            f"{path}: the layout's CSV file does not exist; check layout.file / layout.files in params.yaml"
        )
    return path


def _unreadable(path: Path, error: BaseException, limit: int = 200) -> UserError:
    """The one-line error for a CSV file that cannot be parsed (the parser's message, shortened:
    Arrow's quotes the offending row, which can be 10 KB of pixel values)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return UserError(f"{path}: cannot be read as a CSV file ({text}); check layout.file in params.yaml")


def _not_utf8(path: Path) -> UserError | None:
    """The one-line error for a CSV file that is not UTF-8 text (Excel on Windows saves "CSV" in
    Windows-1252), naming the line of its first such byte; None when the file is UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        # A line ends in CRLF, LF or a bare CR (an old Mac's), as in a text editor and the readers.
        before = data[: error.start]
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        return UserError(
            f"{path}: not UTF-8 text (line {line} holds the byte 0x{data[error.start]:02x}, as a file saved in "
            "Windows-1252 or Latin-1 does); save it as UTF-8 (iconv -f cp1252 -t utf-8), then fetch again"
        )
    return None


def _wrong_fields(path: Path, arrow: bool = False) -> UserError | None:
    """The one-line error naming the first row with more fields than the CSV's header, or, for
    Arrow (which refuses any other number, where pandas fills a short row), fewer; None if none
    has. The row is named as in every other message, as a spreadsheet numbers it, and where a
    quoted line break above makes that differ, so is the line where it starts in a text editor."""
    limit = csvmodule.field_size_limit(1 << 30)  # a pixel cell may exceed the 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            records = csvmodule.reader(handle)
            header, line = 0, 1
            for row, record in enumerate(records, 1):
                # pandas reads empty extra fields (`a.png,dog,` under `file,label`); Arrow does not.
                long = len(record) > header and (arrow or any(cell.strip() for cell in record[header:]))
                if _blank(record):
                    pass
                elif not header:
                    header = len(record)
                elif long or arrow and len(record) < header:
                    where = f"row {row}" + (f" (line {line})" if line != row else "")
                    hint = " (a comma inside an unquoted field?); quote that field or fix the line" if long else (
                        "; fix the line")
                    return UserError(f"{path}: {where} has {len(record)} fields, the header {header}{hint}, "
                                     "then fetch again")
                line = records.line_num + 1
    finally:
        csvmodule.field_size_limit(limit)
    return None


def _blank(record: list[str]) -> bool:
    """Whether a record is a blank line (empty, or spaces only), which pandas and Arrow skip."""
    return len(record) <= 1 and not "".join(record).strip()


def spreadsheet_rows(path: Path, records: int) -> range | list[int]:
    """The row of each of the `records` data records read from a CSV, as a spreadsheet numbers
    it: the header is row 1, and a blank line, which the readers skip, is a row too (a quoted
    cell holding a line break stays one row). Without blank lines, data record i is row i + 2."""
    with open(path, "rb") as handle:
        breaks, bare, last = 0, 0, b""
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            # A carriage return before no line feed ends a line of its own (an old Mac's) or sits in
            # a quoted cell: the line feeds do not tell which, so the file is parsed.
            split = last.endswith(b"\r") and chunk.startswith(b"\n")  # a CRLF across two chunks
            bare += chunk.count(b"\r") - chunk.count(b"\r\n") - split
            breaks, last = breaks + chunk.count(b"\n"), chunk
    if not bare and breaks + (not last.endswith(b"\n")) == records + 1:
        # One line a record, none blank: counted, not parsed again (FER-2013's 300 MB).
        return range(2, records + 2)
    limit = csvmodule.field_size_limit(1 << 30)  # a pixel cell may exceed the 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = [number for number, record in enumerate(csvmodule.reader(handle), 1) if not _blank(record)][1:]
    finally:
        csvmodule.field_size_limit(limit)
    # Should this reader ever tell the records apart otherwise than pandas or Arrow did, a row
    # number off is better than one naming another record's neighbour at random: count them.
    return rows if len(rows) == records else range(2, records + 2)


def read_table(raw: Path, relpath: str) -> Any:
    """A CSV under raw as a pandas DataFrame, every cell as text ("" for an empty cell), column
    names stripped."""
    import pandas as pd  # here, not at the top: every stage imports this module to parse params

    path = _csv_path(raw, relpath)
    try:
        with warnings.catch_warnings():
            # index_col=False: a delimiter ending every line (`a.png,dog,`) is no extra column, not
            # the row's index shifting every column by one. A row with more fields than the header
            # would have its extra ones dropped with only a warning: that is an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
    except pd.errors.ParserWarning as warning:  # the first data line is the long one
        raise (_wrong_fields(path) or _unreadable(path, warning)) from None
    except pd.errors.ParserError as error:  # a later line is
        raise ("fields in line" in str(error) and _wrong_fields(path) or _unreadable(path, error)) from None
    except UnicodeDecodeError as error:
        raise (_not_utf8(path) or _unreadable(path, error)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as error:
        raise _unreadable(path, error) from None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame


def require_columns(path: Path, columns: list[str], wanted: list[tuple[str, str]]) -> None:
    """Raise one line naming the file, the missing column and the option that names it; `wanted`
    holds (option, column) pairs, an empty column meaning the option is not set."""
    for key, column in wanted:
        if column and column not in columns:
            shown = ", ".join(columns[:15]) + (f", ... ({len(columns)} in all)" if len(columns) > 15 else "")
            raise UserError(
                f"{path}: no column {column!r} (named by layout.{key}); its columns are: {shown}; "
                f"fix layout.{key} in params.yaml"
            )


def _split_of(value: str, column: str, split_map: Mapping[str, str]) -> tuple[str | None, str]:
    """The split a split column's cell names, or the reason it names none."""
    split = split_map.get(value, value) if split_map else value
    if split in SPLITS:
        return split, ""
    where = "split_map" if split_map else f"the splits ({', '.join(SPLITS)}); set layout.split_map"
    return None, f"unknown split: {column} {value!r} is not in {where}"


# --------------------------------------------------------------------------------------------
# csv: CSV files name the images and give their labels (GTSRB, HAM10000, covid19, mango).


@dataclass(frozen=True)
class CsvFile:
    # The CSV, relative to the raw folder.
    file: str
    # The source split of every row of this file (GTSRB: Train.csv -> train, Test.csv -> test).
    split: str | None = None
    # Folders where this file's images are looked for, overriding layout.search (mango:
    # train.csv -> [C1-P1_Train], dev.csv -> [C1-P1_Dev]).
    search: list[str] | None = None


@dataclass(frozen=True)
class CsvOptions:
    # The column holding the raw label (GTSRB ClassId, HAM10000 dx, covid19 finding, mango label).
    label_column: str
    # One CSV (file), or several, each with its own fixed split and search folders (files).
    file: str = ""
    files: list[CsvFile] = field(default_factory=list)
    # The image file each row names: a column holding its path (GTSRB Path, covid19 filename), or
    # a template of {column} placeholders, filled with the row's cells as written (HAM10000:
    # "{image_id}.jpg"). Exactly one of the two.
    path_column: str = ""
    path_template: str = ""
    # Folders, relative to the CSV's own folder, where a named file is looked for, in order; the
    # first that holds it wins. The default [""] is the CSV's folder itself (GTSRB's Path
    # "Train/20/00020_00000_00000.png" is relative to it). HAM10000: its two image part folders.
    search: list[str] = field(default_factory=lambda: [""])
    # A column holding each row's source split, mapped through split_map (raw value -> train,
    # val or test); without a map its values must be train, val or test already.
    split_column: str = ""
    split_map: dict[str, str] = field(default_factory=dict)
    # Images of one group stay in one split: a column holding the group (HAM10000 lesion_id), or
    # a regular expression with a named group `group`, searched in the image's path (GTSRB
    # tracks: 'Train/(?P<group>\d+/\d+_\d+)_').
    group_column: str = ""
    group_pattern: str = ""
    # Raw label -> class name (HAM10000: nv -> melanocytic_nevus).
    class_map: dict[str, str] = field(default_factory=dict)
    # Column -> accepted values: rows with any other value are left out, and a file only such
    # rows name is set aside as filtered out (covid19: {modality: [X-ray]}).
    filter: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    """A CSV row that names an existing file."""

    csv: str
    row: int
    label: str | None
    split: str | None
    group: str | None
    reason: str


def _csv_files(options: CsvOptions | PixelsCsvOptions, key: str) -> list[Any]:
    """The CSV files the options name, each with its fixed split; checked without reading them."""
    if bool(options.file) == bool(options.files):
        raise UserError(f"{key}: set exactly one of {key}.file (one CSV) and {key}.files (a list of CSVs)")
    specs = options.files or [CsvFile(options.file) if isinstance(options, CsvOptions) else PixelsFile(options.file)]
    for i, spec in enumerate(specs):
        where = f"{key}.files[{i}]" if options.files else key
        if not _inside_raw(spec.file) or PurePosixPath(spec.file) == PurePosixPath("."):
            raise UserError(f"{where}.file: {spec.file!r} is not a file inside the raw folder; give its path "
                            "relative to the raw folder")
        if spec.split is not None and spec.split not in SPLITS:
            raise UserError(f"{where}.split: {spec.split!r} is not a split; valid: {', '.join(SPLITS)}")
        if spec.split is not None and options.split_column:
            raise UserError(f"{where}.split: give a file a fixed split or {key}.split_column, not both")
    _check_splits(options.split_map, f"{key}.split_map")
    for column, accepted in getattr(options, "filter", {}).items():
        if not accepted:
            raise UserError(f"{key}.filter.{column}: an empty list keeps no row; list the values to keep, "
                            "or remove the column from filter")
    if options.split_map and not options.split_column:
        # Never read without the column: the source's splits would be ignored, its test rows drawn into train.
        raise UserError(f"{key}.split_map: given without {key}.split_column; name the column holding each row's "
                        "split, or remove split_map")
    return specs


def _template(template: str, key: str) -> list[tuple[str, str | None]]:
    """A path template as (literal text, column or None) pieces."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as error:
        raise UserError(
            f"{key}.path_template: {template!r} is not a template ({error}); write e.g. '{{image_id}}.jpg'"
        ) from None
    result = []
    for literal, name, spec, conversion in pieces:
        if name is not None and (not name or spec or conversion):
            raise UserError(f"{key}.path_template: {template!r}: write plain {{column}} placeholders, without formats")
        result.append((literal, name))
    return result


def _group_regex(pattern: str, key: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise UserError(f"{key}.group_pattern: {pattern!r} is not a regular expression ({error})") from None
    if "group" not in regex.groupindex:
        raise UserError(f"{key}.group_pattern: {pattern!r} has no named group; write (?P<group>...)")
    return regex


def _resolve(name: str, base: str, search: list[str], files: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The raw-relative path of the file a row names, looked for in each search folder in turn.
    `files` maps each file's path, and its NFC form, to the path: a zip made on macOS holds
    `café.png` decomposed (NFD), while a CSV names it composed."""
    name = name.replace("\\", "/")
    tried = []
    for folder in search:
        path = posixpath.normpath(posixpath.join(base, folder, name))
        found = files.get(path) or files.get(unicodedata.normalize("NFC", path))
        if found:
            return found, tried
        tried.append(path)
    return None, tried


def check_csv(options: CsvOptions, key: str) -> tuple[list[CsvFile], list[tuple[str, str | None]], re.Pattern | None]:
    """The checks that need no data; returns the CSV files, the path template's pieces and the
    group regex, for `csv_layout`."""
    specs = _csv_files(options, key)
    if bool(options.path_column) == bool(options.path_template):
        raise UserError(
            f"{key}: set exactly one of {key}.path_column and {key}.path_template (where each row's image is)"
        )
    template = _template(options.path_template, key) if options.path_template else []
    group_regex = _group_regex(options.group_pattern, key)
    if group_regex and options.group_column:
        raise UserError(f"{key}: take the group from {key}.group_column or {key}.group_pattern, not both")
    for i, spec in enumerate(specs):
        if not (spec.search if spec.search is not None else options.search):
            where = f"{key}.files[{i}].search" if spec.search is not None else f"{key}.search"
            raise UserError(f"{where}: list at least one folder where {spec.file}'s images are (\"\" is the CSV's folder)")
        base = posixpath.dirname(posixpath.normpath(spec.file))
        for j, folder in enumerate(spec.search if spec.search is not None else options.search):
            # Relative to the CSV's folder, `..` included (meta/labels.csv beside images/), but never out of raw.
            if folder and not _inside_raw(posixpath.normpath(posixpath.join(base, folder.replace("\\", "/")))):
                where = f"{key}.files[{i}].search" if spec.search is not None else f"{key}.search"
                raise UserError(f"{where}[{j}]: {folder!r} is not a folder inside the raw folder; give it relative to "
                                f"the folder of {spec.file}")
    return specs, template, group_regex


@register_layout("csv", CsvOptions, check=check_csv)
def csv_layout(options: CsvOptions, raw: Path) -> list[Candidate]:
    specs, template, group_regex = check_csv(options, "layout")
    files = all_files(raw)
    # Each file by its path, and by its NFC form where that differs (the path itself wins a clash).
    file_index = {unicodedata.normalize("NFC", f): f for f in files} | {f: f for f in files}
    read = []  # the CSV files this layout reads, as raw-relative paths
    claims: dict[str, list[_Row]] = {}  # existing file -> the rows that name it, in order
    filtered: dict[str, str] = {}  # existing file named only by filtered-out rows -> why
    extra: list[Candidate] = []  # rows that are not files: missing images, bad rows

    for spec in specs:
        frame = read_table(raw, spec.file)
        csv_name = posixpath.normpath(spec.file)
        read.append(csv_name)
        path = raw / spec.file
        columns = list(frame.columns)
        wanted = [("label_column", options.label_column), ("path_column", options.path_column),
                  ("split_column", options.split_column), ("group_column", options.group_column)]
        wanted += [("path_template", name) for _, name in template if name]
        wanted += [(f"filter.{name}", name) for name in options.filter]
        require_columns(path, columns, wanted)
        base = posixpath.dirname(csv_name)
        search = spec.search if spec.search is not None else options.search
        if options.path_column:
            names = frame[options.path_column].tolist()
            what = f"column {options.path_column!r}"
        else:
            cells = {name: frame[name].tolist() for _, name in template if name}
            names = [
                "".join(literal + (cells[name][i] if name else "") for literal, name in template)
                for i in range(len(frame))
            ]
            what = f"path_template {options.path_template!r}"
        labels = frame[options.label_column].tolist()
        splits = frame[options.split_column].tolist() if options.split_column else None
        groups = frame[options.group_column].tolist() if options.group_column else None
        filters = {name: (frame[name].tolist(), set(values)) for name, values in options.filter.items()}

        rows = spreadsheet_rows(path, len(frame))
        for i, name in enumerate(names):
            row = rows[i]
            member = f"{csv_name}::{row}"
            name = name.strip()
            if not name:
                extra.append(row_only(member, f"no file: {csv_name} row {row} has an empty {what}"))
                continue
            found, tried = _resolve(name, base, search, file_index)
            refused = next(
                (
                    f"filtered out: {csv_name} row {row} has {column} {column_cells[i].strip()!r}, "
                    f"not one of layout.filter.{column}"
                    for column, (column_cells, accepted) in filters.items()
                    if column_cells[i].strip() not in accepted
                ),
                "",
            )
            if refused:
                # A filtered-out row is not part of the dataset; only a file it names is recorded.
                if found is not None:
                    filtered.setdefault(found, refused)
                continue
            raw_label = labels[i].strip()
            label = map_label(raw_label or None, options.class_map)
            reason = "" if raw_label else f"no label: {csv_name} row {row} has an empty {options.label_column!r}"
            split = spec.split
            if splits is not None:
                split, split_reason = _split_of(splits[i].strip(), options.split_column, options.split_map)
                reason = reason or split_reason
            group = None
            if groups is not None:
                group = groups[i].strip() or None
            elif group_regex is not None:
                match = group_regex.search(found or tried[0])
                group = match.group("group") if match else None
            if found is None:
                extra.append(row_only(
                    member, f"missing: listed in {csv_name} row {row} but not found (looked for {', '.join(tried)})",
                    label, split, group,
                ))
                continue
            claims.setdefault(found, []).append(_Row(csv_name, row, label, split, group, reason))

    listed_in = " or ".join(read)
    result = []
    for path in files:
        if path in read:
            result.append(Candidate(path, reason="label file (read by the layout)"))
        elif path in claims:
            rows = claims[path]
            first = rows[0]
            labels_seen = list(dict.fromkeys(r.label for r in rows))
            if len(labels_seen) > 1:
                where = ", ".join(f"{r.csv} row {r.row}" for r in rows)
                shown = ", ".join("(none)" if label is None else label for label in labels_seen)
                reason = f"ambiguous: {path} is listed under labels {shown} ({where})"
                result.append(Candidate(path, first.label, first.split, first.group, reason))
                extra.extend(row_only(f"{r.csv}::{r.row}", reason, r.label, r.split, r.group) for r in rows[1:])
                continue
            result.append(Candidate(path, first.label, first.split, first.group, first.reason or not_an_image(path)))
            extra.extend(
                row_only(f"{r.csv}::{r.row}", f"duplicate row: {path} is already listed in {first.csv} row {first.row}",
                         r.label, r.split, r.group)
                for r in rows[1:]
            )
        elif path in filtered:
            result.append(Candidate(path, reason=filtered[path]))
        elif reason := not_an_image(path):
            result.append(Candidate(path, reason=reason))
        else:
            result.append(Candidate(path, reason=f"not listed in {listed_in}"))
    return result + extra


# --------------------------------------------------------------------------------------------
# pixels_csv: images stored as pixel values in a CSV (FER-2013, sign-language MNIST).


@dataclass(frozen=True)
class PixelsFile:
    # The CSV, relative to the raw folder.
    file: str
    # The source split of every row of this file (sign_mnist_train.csv -> train).
    split: str | None = None


@dataclass(frozen=True)
class PixelsCsvOptions:
    # The column holding the raw label (FER-2013: emotion; sign-language MNIST: label).
    label_column: str
    # One CSV (file), or several, each with its own fixed split (files).
    file: str = ""
    files: list[PixelsFile] = field(default_factory=list)
    # Where the pixels are: one column of space-separated values (FER-2013: pixels), or one
    # column per value named <prefix><number>, ordered by the number (pixel1..pixel784).
    # Exactly one of the two. Values are row-major, channels interleaved (H, W, C).
    pixels_column: str = ""
    pixel_columns_prefix: str = ""
    # Image size; 0 infers it: both 0 -> a square from the number of values per row (the most
    # common number, for space-separated values), one 0 -> from the other.
    width: int = 0
    height: int = 0
    channels: Literal[1, 3, 4] = 1
    # A column holding each row's source split, mapped through split_map (FER-2013: Usage,
    # {Training: train, PublicTest: val, PrivateTest: test}).
    split_column: str = ""
    split_map: dict[str, str] = field(default_factory=dict)
    # Raw label -> class name (FER-2013: "0" -> angry, ...).
    class_map: dict[str, str] = field(default_factory=dict)


def _read_header(path: Path) -> tuple[list[str], int]:
    """The column names of a CSV file, stripped, and the row they are on: its first row that is
    not a blank line, as pandas takes it for a label CSV."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for row, record in enumerate(csvmodule.reader(handle), 1):
                if not _blank(record):
                    return [name.strip() for name in record], row
            return [], 1
    except UnicodeDecodeError as error:
        raise (_not_utf8(path) or _unreadable(path, error)) from None
    except (OSError, csvmodule.Error) as error:
        raise _unreadable(path, error) from None


def _read_arrow(path: Path, header: list[str], header_row: int, columns: list[str]) -> Any:
    """The chosen columns of a CSV as a pyarrow Table of strings ("" for an empty cell), from the
    row below the header's. Arrow's C++ parser reads FER-2013's 300 MB in about half a second,
    where pandas takes four."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=header_row, block_size=1 << 24),
            # A line of spaces is a blank line, skipped as an empty one is (and as pandas skips
            # both for a label CSV), not a row of one field that stops the parser.
            parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "error" if row.text.strip() else "skip"),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={name: pa.string() for name in columns},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, OSError) as error:
        # Arrow's message names no row for either, and quotes a row of pixel values.
        named = _not_utf8(path) if "invalid UTF8" in str(error) else None
        named = named or (_wrong_fields(path, arrow=True) if "columns, got" in str(error) else None)
        raise (named or _unreadable(path, error)) from None


def _decode_values(tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    """int16 values of pyarrow string tokens, and a mask of the tokens that are not integers in
    0..255 (their value is then 0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        values = pc.cast(tokens, pa.int16()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, OverflowError):
        # Some token is not a small integer: mark the bad ones, decode the rest.
        good = pc.and_(pc.ascii_is_decimal(tokens), pc.less_equal(pc.binary_length(tokens), 3))
        values = pc.cast(pc.if_else(good, tokens, "0"), pa.int16()).to_numpy(zero_copy_only=False)
        bad = ~good.to_numpy(zero_copy_only=False)
    else:
        bad = np.zeros(len(values), dtype=bool)
    # One pass for both ends: a negative int16 read as uint16 is above 255 too.
    bad |= values.view(np.uint16) > 255
    return values, bad


ROWS_AT_ONCE = 4096
"""Rows of space-separated values split at once: bounds the memory of the string tokens."""


def _split_cells(column: Any) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Cells of space-separated values, a chunk of rows at a time: the int16 values, each row's
    run `offsets[i]:offsets[i + 1]` of them, each row's number of values, and whether a row holds
    a value that is not an integer in 0..255."""
    import pyarrow.compute as pc

    for start in range(0, len(column), ROWS_AT_ONCE):
        cells = column.slice(start, ROWS_AT_ONCE)
        parts = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(cells))
        offsets = parts.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        offsets -= offsets[0]
        values, bad = _decode_values(parts.flatten())
        # Every row splits into at least one token, so each reduceat segment is that row's own.
        has_bad = np.logical_or.reduceat(bad, offsets[:-1]) if bad.any() else np.zeros(len(cells), dtype=bool)
        counts = np.diff(offsets)
        # An empty cell splits into one empty token: it holds no values.
        counts[pc.binary_length(cells).to_numpy(zero_copy_only=False) == 0] = 0
        yield values, offsets, counts, has_bad


def _pixel_shape(options: PixelsCsvOptions, count: int, path: Path) -> tuple[int, ...]:
    """(H, W) or (H, W, C) for rows of `count` values."""
    channels, width, height = options.channels, options.width, options.height
    if not width and not height:
        side = math.isqrt(count // channels) if count > 0 else 0
        if side == 0 or side * side * channels != count:
            raise UserError(
                f"{path}: {count} pixel values a row is not a square image of {channels} channel(s); "
                "set layout.width and layout.height"
            )
        width = height = side
    elif not width or not height:
        known = width or height
        other, rest = divmod(count, known * channels)
        if rest or other == 0:
            raise UserError(
                f"{path}: {count} pixel values a row do not fit a side of {known} with {channels} channel(s); "
                "set layout.width and layout.height"
            )
        width, height = width or other, height or other
    return (height, width) if channels == 1 else (height, width, channels)


def check_pixels_csv(options: PixelsCsvOptions, key: str) -> list[PixelsFile]:
    """The checks that need no data; returns the CSV files, for `pixels_csv`."""
    specs = _csv_files(options, key)
    if bool(options.pixels_column) == bool(options.pixel_columns_prefix):
        raise UserError(
            f"{key}: set exactly one of {key}.pixels_column and {key}.pixel_columns_prefix (where the pixels are)"
        )
    if options.width < 0 or options.height < 0:
        raise UserError(f"{key}.width and {key}.height: give a positive size, or 0 to infer it")
    return specs


@register_layout("pixels_csv", PixelsCsvOptions, in_memory=True, check=check_pixels_csv)
def pixels_csv(options: PixelsCsvOptions, raw: Path) -> list[Candidate]:
    specs = check_pixels_csv(options, "layout")
    result: list[Candidate] = []
    read = []
    for spec in specs:
        csv_name = posixpath.normpath(spec.file)
        read.append(csv_name)
        result.extend(_pixel_rows(options, raw, spec, csv_name))
    for path in all_files(raw):
        if path in read:
            result.append(Candidate(path, reason="label file (read by the layout)"))
        else:
            stray = f"stray file: the images come from {' and '.join(read)}"
            result.append(Candidate(path, reason=not_an_image(path) or stray))
    return result


def _pixel_rows(options: PixelsCsvOptions, raw: Path, spec: PixelsFile, csv_name: str) -> list[Candidate]:
    path = _csv_path(raw, spec.file)
    header, header_row = _read_header(path)
    wanted = [("label_column", options.label_column), ("pixels_column", options.pixels_column),
              ("split_column", options.split_column)]
    require_columns(path, header, wanted)
    if options.pixel_columns_prefix:
        numbered = re.compile(re.escape(options.pixel_columns_prefix) + r"(\d+)")
        pixel_columns = sorted(
            (name for name in header if numbered.fullmatch(name)), key=lambda name: int(numbered.fullmatch(name)[1])
        )
        if not pixel_columns:
            raise UserError(
                f"{path}: no columns named {options.pixel_columns_prefix}<number> (layout.pixel_columns_prefix); "
                f"its columns start: {', '.join(header[:8])}; fix layout.pixel_columns_prefix in params.yaml"
            )
    else:
        pixel_columns = [options.pixels_column]
    columns = list(dict.fromkeys(c for c in (*(c for _, c in wanted), *pixel_columns) if c))
    table = _read_arrow(path, header, header_row, columns)
    count = table.num_rows
    if not count:
        return []
    if options.pixels_column:
        chunks = list(_split_cells(table.column(options.pixels_column).combine_chunks()))
    else:
        # One value a cell: a run of len(pixel_columns) tokens a row.
        decoded = [_decode_values(table.column(name).combine_chunks()) for name in pixel_columns]
        values = np.stack([v for v, _ in decoded], axis=1).reshape(-1)
        bad = np.stack([b for _, b in decoded], axis=1).reshape(count, -1).any(axis=1)
        chunks = [(values, np.arange(count + 1) * len(pixel_columns), np.full(count, len(pixel_columns)), bad)]
    lengths = np.concatenate([c[2] for c in chunks])
    bad_value = np.concatenate([c[3] for c in chunks])
    # The shape is inferred from the most common number of values a row.
    shape = _pixel_shape(options, int(np.bincount(lengths).argmax()), path)
    expected = math.prod(shape)
    right_count = lengths == expected
    block = np.zeros((count, expected), dtype=np.uint8)
    first = 0
    for values, offsets, counts, _ in chunks:
        rows = len(counts)
        if (counts == expected).all():
            block[first: first + rows] = values.reshape(rows, expected)
        else:
            for i in np.flatnonzero(counts == expected):
                block[first + i] = values[offsets[i]: offsets[i + 1]]
        first += rows
    block = block.reshape((count, *shape))

    labels = table.column(options.label_column).to_pylist()
    splits = table.column(options.split_column).to_pylist() if options.split_column else None
    size = "x".join(str(n) for n in (shape[1], shape[0], *shape[2:]))
    rows = spreadsheet_rows(path, count)
    result = []
    for i in range(count):
        member = f"{csv_name}::{rows[i]}"
        raw_label = labels[i].strip()
        label = map_label(raw_label or None, options.class_map)
        split, reason = spec.split, ""
        if splits is not None:
            split, reason = _split_of(splits[i].strip(), options.split_column, options.split_map)
        if not right_count[i]:
            reason = f"undecodable: {lengths[i]} pixel values, expected {expected} ({size})"
            result.append(row_only(member, reason, label, split))
        elif bad_value[i]:
            result.append(row_only(member, "undecodable: pixel values that are not integers in 0..255", label, split))
        else:
            reason = reason or ("" if raw_label else f"no label: an empty {options.label_column!r}")
            result.append(Candidate(member, label=label, source_split=split, reason=reason, pixels=block[i]))
    return result
