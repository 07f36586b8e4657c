"""fetch@<dataset>: obtain a dataset exactly as its source gives it, plus a provenance record.

    python -m stages.fetch --dataset digits --out data/raw/digits --provenance data/raw/digits.provenance.json

DVC reruns fetch@ when a source's params change, not when a `local` folder or archive changes in
place, nor when Kaggle has a new version of an unpinned dataset, or new or re-uploaded files for a
competition (which has no versions); `python -m stages.fetch --check [--dataset NAME]` says which
have, and what to run. With `--pin` it also writes each new Kaggle dataset version into params.yaml
(`datasets.<name>.source.version: N`, the rest of the file as it was): for an unpinned dataset, a
newer one than fetch@ took; for a pinned one, a newer one than its pin. DVC and CI's `plan
--changed` then see a params change: what the weekly retrain runs, to propose it as a pull request.
A competition has nothing to pin: its change is for a person to fetch.

--check's exit status: 0 nothing new (or nothing to tell it by: a competition fetched before its
file list was recorded); 1 a change that is not in params.yaml (to act on by hand, or to pin); 2
Kaggle could not be asked (and no such change seen); 3 with --pin, new versions pinned and nothing
else seen (so a script can tell "pinned" from "nothing new" from "could not ask").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import yaml

from stages import archives, kaggle_api
from stages.config import load_params
from stages.errors import UserError, run_stage
from stages.files import atomic_path, write_json_atomic
from stages.layouts import all_files
from stages.sources import KaggleOptions, changed_since_fetch, fetched_with, get_source, local_sha256, suite_repro


def fetch(dataset: str, params_path: str, out: Path, provenance: Path) -> dict:
    """Fill `out` from the dataset's source, write the provenance record and return it; print a
    summary line, with how this run got the data (downloaded or from a cache), which the record
    leaves out.

    The record holds what was obtained and nothing about when or how: fetching the same data
    again writes the same bytes, so DVC sees an unchanged dependency and validate does not rerun
    (after a change to a fetch module, say), and two machines write the same dvc.lock."""
    config = load_params(params_path).dataset(dataset)
    source = get_source(config.source.kind)
    # Work in a sibling folder and rename at the end, so a killed fetch never looks complete.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        details = source.fetch(config.source.options, partial, dataset)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    files = all_files(out)
    this_run = details.pop("this_run", {})
    record = {
        "dataset": dataset,
        "source": {"kind": config.source.kind, **dataclasses.asdict(config.source.options)},
        "files": len(files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "archives": [],
        "refused": [],
        **details,
    }
    write_json_atomic(provenance, record)
    refused = f", {len(record['refused'])} entries refused (see {provenance})" if record["refused"] else ""
    how = "".join(f"; {key.replace('_', ' ')}: {value}" for key, value in this_run.items())
    print(f"fetch@{dataset}: {record['files']} files, {record['bytes']:,} bytes in {out}{refused}{how}")
    return record


# --check's line for what it could not check; with no change seen, the exit status is then 2.
UNCHECKED = "fetch: cannot ask Kaggle"
# --check --pin's line for a version it wrote into params.yaml; with nothing else seen, exit status 3.
PINNED = "fetch: pinned"


def check(params_path: str, datasets: list[str], pin: bool = False) -> list[str]:
    """A line for each of `datasets` (default: every one with a `local` or `kaggle` source), saying
    whether its folder or archive is still what fetch@ copied, its Kaggle dataset's version still
    Kaggle's current one, or its Kaggle competition's files still those Kaggle lists (by the
    provenance record where dvc.yaml puts it), and what to run if not; changed ones first, then
    one line for the Kaggle sources Kaggle could not be asked about.
    With `pin`, a newer Kaggle version than an unpinned dataset was fetched at, or than a pinned
    one's pin, is written into params.yaml, and its line says so."""
    params = load_params(params_path)
    changed, others, pins = [], [], {}
    versions, unasked, why = kaggle_api.VersionLookup(), [], ""
    for name in datasets or [n for n, d in params.datasets.items() if d.source.kind in ("local", "kaggle")]:
        source = params.dataset(name).source
        path = Path(f"data/raw/{name}.provenance.json")
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if source.kind == "kaggle":
            try:
                line, newer = _kaggle_check(name, source.options, record, path, versions)
            except kaggle_api.Unreachable as error:  # the lookup asks no more after the first
                unasked.append((name, bool(source.options.competition)))
                why = why or str(error).removeprefix(f"datasets.{name}.source: ")
                continue
            if pin and newer is not None:
                pins[name] = newer
                was = (f"it was pinned to version {source.options.version}" if source.options.version is not None
                       else f"fetch@{name} took version {record['version']}")
                line = (f"{PINNED} {name}: datasets.{name}.source.version: {newer} written into {Path(params_path).name} "
                        f"(Kaggle dataset {source.options.dataset}'s new version; {was})")
            (changed if line.startswith(("fetch@", PINNED)) else others).append(line)
        elif source.kind != "local":
            others.append(f"fetch: {name}'s source is {source.kind}, not local or kaggle; nothing to check")
        elif record is None:
            # Nothing to compare with, but the checksum to pin is the source's as it is now.
            here = Path(source.options.path).expanduser()
            now = local_sha256(here) if here.is_dir() or archives.is_archive(here) else None
            pinned = source.options.sha256.strip().lower()
            advice = ("" if now is None else "; its local source is the pinned version" if now == pinned
                      else f"; its local source is not the pinned version, which fetch refuses: if it is the version "
                           f"to use, set datasets.{name}.source.sha256: {now}" if pinned
                      else f"; to pin its local source: datasets.{name}.source.sha256: {now}")
            others.append(f"fetch: {name} has not been fetched here ({path} is missing){advice}")
        elif not fetched_with(source.options, record):
            others.append(f"fetch: datasets.{name}.source has changed since the fetch; {suite_repro(name)} fetches it again")
        elif not Path(source.options.path).expanduser().exists():
            others.append(f"fetch: {source.options.path} is not here; the copy fetch@{name} made is all there is")
        elif line := changed_since_fetch(name, source.options, record):
            changed.append(f"fetch@{name}: {line}")
        elif source.options.sha256:
            others.append(f"fetch: the local source of {name} is as fetched, and pinned")
        else:
            checksum = record.get("folder_sha256") or (record.get("archives") or [{}])[0].get("sha256")
            others.append(f"fetch: the local source of {name} is as fetched; pin it (datasets.{name}.source.sha256: "
                          f"{checksum}) so that DVC and CI see a new version")
    if pins:
        pin_versions(Path(params_path), pins)
    if unasked:
        datasets, contests = ([n for n, competition in unasked if competition == kind] for kind in (False, True))
        what = ([f"whether {', '.join(datasets)} {'has' if len(datasets) == 1 else 'have'} a newer version"] if datasets
                else []) + ([f"whether the files of {', '.join(contests)} changed"] if contests else [])
        others.append(f"{UNCHECKED} {' or '.join(what)}: {why}")
    return changed + others


def _kaggle_check(name: str, options: KaggleOptions, record: dict | None, path: Path,
                  versions: kaggle_api.VersionLookup) -> tuple[str, int | None]:
    """--check's line for a kaggle source: a `fetch@` one when Kaggle has a newer version than the
    one an unpinned source was fetched at, or other files for a competition (DVC sees params, and
    the params did not change); and the version --pin writes into params.yaml (else None): that
    one, or for a pinned source, a newer version than its pin."""
    if record is not None and record.get("source") != {"kind": "kaggle", **dataclasses.asdict(options)}:
        return f"fetch: datasets.{name}.source has changed since the fetch; {suite_repro(name)} fetches it again", None
    if options.competition:
        return _competition_check(name, options, record, path, versions), None
    try:
        now = versions(options, name)
    except kaggle_api.Unreachable:
        raise
    except UserError as error:
        return f"{UNCHECKED} for {name}'s current version: {error}", None
    what = f"Kaggle dataset {options.dataset}"
    if now is None:
        return f"fetch: Kaggle does not say which version of {what} is current; nothing to compare {name} with", None
    if options.version is not None:
        newer = (", the latest" if now == options.version
                 else f"; Kaggle has a newer one, version {now}: to use it, set datasets.{name}.source.version: {now}"
                 if now > options.version else
                 f", which Kaggle does not have (its current version is {now}), so fetch fails; set "
                 f"datasets.{name}.source.version: {now} or lower")
        return f"fetch: {name} is pinned to version {options.version} of {what}{newer}", (
            now if now > options.version else None)
    if record is None:
        return (f"fetch: {name} has not been fetched here ({path} is missing); Kaggle's current version of "
                f"{options.dataset}, which fetch takes, is {now}: to pin it, datasets.{name}.source.version: {now}"), None
    then = record.get("version")
    if then == now:
        return (f"fetch: {name} is version {now} of {what}, the latest; pin it (datasets.{name}.source.version: "
                f"{now}) so that DVC and CI see a new version"), None
    took = f"version {then}" if then is not None else "a version Kaggle did not name"
    if isinstance(then, int) and now < then:  # the version fetched was deleted on Kaggle: a person decides
        return (f"fetch@{name}: {what}'s current version is {now}, older than the {took} fetch@{name} took (Kaggle "
                f"no longer has it as current); a new fetch would take {now}: to use it, pin it, "
                f"datasets.{name}.source.version: {now}, a params change that `dvc repro` and CI's `plan --changed` see"), None
    return (f"fetch@{name}: {what} has a new version, {now} (fetch@{name} took {took}); DVC cannot see it: to use it, "
            f"pin it, datasets.{name}.source.version: {now}, a params change that `dvc repro` and CI's "
            "`plan --changed` see"), (now if isinstance(then, int) else None)


def _competition_check(name: str, options: KaggleOptions, record: dict | None, path: Path,
                       lookup: kaggle_api.VersionLookup) -> str:
    """--check's line for a Kaggle competition, which has no versions but can change (its hosts
    re-upload or add files): a `fetch@` one when Kaggle's list of its files (name, size, creation
    date) differs from the one fetch recorded. There is no version to pin, so --pin leaves it."""
    what = f"Kaggle competition {options.competition}"
    if record is None:
        return (f"fetch: {name} has not been fetched here ({path} is missing); its source is the {what}, which has no "
                f"versions: once fetched, --check compares Kaggle's list of its files with the one fetch@{name} recorded")
    then = record.get("competition_files")
    if not (isinstance(then, list) and all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in then)):
        return (f"fetch: {path} holds no list of {what}'s files (fetch@{name} ran before fetch recorded one), so --check "
                f"cannot tell whether they changed; `dvc repro -f -s fetch@{name}` records it")
    try:
        now = lookup.competition_files(options, name)
    except kaggle_api.Unreachable:
        raise
    except UserError as error:
        return f"{UNCHECKED} for the files of {name}: {error}"
    was, now_by = {f["name"]: f for f in then}, {f["name"]: f for f in now}
    changes = {"added": now_by.keys() - was.keys(), "removed": was.keys() - now_by.keys(),
               "changed in size or date": {n for n in now_by.keys() & was.keys() if now_by[n] != was[n]}}
    said = "; ".join(f"{change}: {', '.join(sorted(names)[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
                     for change, names in changes.items() if names)
    if not said:
        return f"fetch: {name}'s source is the {what}, whose {len(now)} files Kaggle lists as fetch@{name} took them"
    return (f"fetch@{name}: {what}'s files have changed since fetch@{name} took them ({said}); run `dvc repro -f -s "
            f"fetch@{name}` (DVC watches the source's params, not Kaggle), then {suite_repro(name).removesuffix(',')}")


def pin_versions(path: Path, pins: dict[str, int]) -> None:
    """Write `version: N` into each named dataset's source in the params file, as text inserted
    after its `dataset:` value, or in place of the value of the `version:` it has (found by
    PyYAML's node positions), so that the rest of the file
    stays byte for byte: a YAML round trip rewraps long flow mappings, and DVC's dump unquotes
    "off", which PyYAML then reads as false. Checked by reading the result back."""
    # newline="": a file saved with CRLF keeps them, and the version line gets them too (read as
    # universal newlines and written back, every line of it would change).
    with path.open(encoding="utf-8", newline="") as handle:
        text = handle.read()
    newline = "\r\n" if "\r\n" in text else "\n"
    if not text.endswith("\n"):
        text += newline
    expected, document, edits = yaml.safe_load(text), yaml.compose(text), []
    for name, version in pins.items():
        source = _mapping_node(document, "datasets", name, "source")
        keys = {key.value: (key, value) for key, value in source.value} if source is not None else {}
        if "dataset" not in keys:  # reached through a merge key, say
            raise UserError(f"{path}: cannot write datasets.{name}.source.version into it; set it to {version} by hand")
        key, value = keys["dataset"]
        if "version" in keys:  # a pin to move on (or `version: null`): its value replaced, as written
            old = keys["version"][1]
            start, end = old.start_mark.index, old.end_mark.index
            edits.append((start, end, f"{'' if start < end else ' '}{version}"))
        elif source.flow_style:
            edits.append((value.end_mark.index, value.end_mark.index, f", version: {version}"))
        else:  # a line of its own after the `dataset:` one (and its comment), indented as it is
            at = text.index("\n", value.end_mark.index) + 1
            edits.append((at, at, f"{' ' * key.start_mark.column}version: {version}{newline}"))
        # A new mapping, not the one read: a source another dataset shares (an anchor) must not change.
        expected["datasets"][name]["source"] = {**expected["datasets"][name]["source"], "version": version}
    for start, end, insert in sorted(edits, reverse=True):
        text = text[:start] + insert + text[end:]
    try:
        written = yaml.safe_load(text)
    except yaml.YAMLError:  # a shape the line cannot go into (an explicit `? dataset` key, say)
        written = None
    if written != expected:
        raise UserError(f"{path}: cannot write the new versions into it ({', '.join(f'datasets.{n}.source.version: {v}' for n, v in pins.items())}); "
                        "set them by hand")
    with atomic_path(path) as temporary:  # as bytes: no newline translation on the way out either
        temporary.write_bytes(text.encode("utf-8"))


def _mapping_node(node: yaml.Node, *keys: str) -> yaml.MappingNode | None:
    """The mapping at `keys` in a composed YAML document, if each key is written there as such."""
    for wanted in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((value for key, value in node.value if key.value == wanted), None)
    return node if isinstance(node, yaml.MappingNode) else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", default=[], help="with --check, may be repeated")
    parser.add_argument("--out", type=Path, help="raw dataset folder to fill")
    parser.add_argument("--provenance", type=Path, help="provenance JSON to write")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--check", action="store_true",
                        help="say which fetched `local` sources changed since, which unpinned Kaggle datasets "
                             "have a newer version, and which Kaggle competitions' files changed (exit status 1 if any; "
                             "2 if none, but Kaggle could not be asked); fetch nothing")
    parser.add_argument("--pin", action="store_true",
                        help="with --check, write each newer Kaggle version into params.yaml (an unpinned dataset's "
                             "pin, a pinned one's new pin: datasets.<name>.source.version: N; nothing else changes); "
                             "exit status 3 if it pinned "
                             "some and saw nothing else (1 or 2 as above otherwise)")
    args = parser.parse_args(argv)
    if args.check:
        # Paths in params (data/raw/, a relative source path) are from the repository root, the
        # params file's folder, where DVC runs fetch@: so too from a sub-folder, given --params.
        params = Path(args.params).resolve()
        if params.is_file():  # else load_params says it is not found
            os.chdir(params.parent)
        lines = check(str(params), args.dataset, pin=args.pin)
        print("\n".join(lines or [f"fetch: no dataset in {args.params} has a local or kaggle source"]))
        if any(line.startswith("fetch@") for line in lines):
            raise SystemExit(1)
        if any(line.startswith(UNCHECKED) for line in lines):  # nothing changed as far as it could see
            raise SystemExit(2)
        if any(line.startswith(PINNED) for line in lines):
            raise SystemExit(3)
        return
    if args.pin:
        parser.error("--pin goes with --check")
    if len(args.dataset) != 1 or not args.out or not args.provenance:
        parser.error("give one --dataset, --out and --provenance (or --check)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a keras.datasets source imports TensorFlow
    fetch(args.dataset[0], args.params, args.out, args.provenance)


if __name__ == "__main__":
    run_stage(main)
