"""What README.md and docs/*.md name exists under those names: the tests and files given as
evidence, the options of each command line, the make targets and the params keys."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import re
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def defined_names(test_file: Path) -> set[str]:
    """The functions and classes a test file defines, at any depth."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_test_the_docs_name_exists():
    """`tests/test_x.py::test_y` (or `test_x.py::test_y`, or `::test_y` after one of those on the
    same line, or a `test_data_parallel_*` pattern) names a test that file defines."""
    dangling = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            current = None
            for match in re.finditer(r"((?:tests/)?test_\w+\.py)?::(test_[\w*]+)", line):
                if match.group(1):
                    current = ROOT / "tests" / Path(match.group(1)).name
                if current is None:
                    continue
                if not current.exists() or not fnmatch.filter(defined_names(current), match.group(2)):
                    dangling.append(f"{doc.relative_to(ROOT)}:{number}: {current.name}::{match.group(2)}")
    assert dangling == []


def test_every_stages_tests_and_benchmarks_path_the_docs_name_exists():
    """A path under stages/, tests/ or benchmarks/ in the docs is a file or folder of the repository."""
    dangling = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"(?<![\w/.])((?:stages|tests|benchmarks)/[\w./-]*\w)", line):
                if not (ROOT / match.group(1)).exists():
                    dangling.append(f"{doc.relative_to(ROOT)}:{number}: {match.group(1)}")
    assert dangling == []


def argparse_flags(module: Path) -> dict[str | None, set[str]]:
    """The options a module's argparse parsers take, read from its source without importing it:
    None -> the main parser's, and each subcommand (`add_parser("plan")`) -> its own."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    owner: dict[str, str | None] = {}  # variable -> the subcommand whose parser (or group) it holds
    flags: dict[str | None, set[str]] = {None: set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
            call, name = node.value, node.targets[0]
            if not isinstance(name, ast.Name):
                continue
            if call.func.attr == "add_parser" and isinstance(call.args[0], ast.Constant):
                owner[name.id] = call.args[0].value
                flags[call.args[0].value] = set()
            elif call.func.attr in ("add_argument_group", "add_mutually_exclusive_group"):
                if isinstance(call.func.value, ast.Name):
                    owner[name.id] = owner.get(call.func.value.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            where = owner.get(node.func.value.id) if isinstance(node.func.value, ast.Name) else None
            flags.setdefault(where, set()).update(
                arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"))
    return flags


# `python -m stages.x ...` or `python benchmarks/x.py ...`, up to the end of its code span, a
# shell comment, a pipe or `&&`, or the closing parenthesis of the prose around it.
COMMAND = re.compile(r"python -m stages\.(\w+)|python (benchmarks/\w+\.py)")
COMMAND_END = re.compile(r"`|\s#|\||&&|;|\)")


def test_every_option_the_docs_give_a_command_is_one_it_takes():
    """`python -m stages.matrix plan --per-job 2` in a doc: stages/matrix.py has a subcommand
    `plan` taking `--per-job` (lines continued with a backslash are read as one). stages.plots
    passes its arguments through to `dvc plots`, so only its subcommand is checked."""
    wrong = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").replace("\\\n", " ").splitlines(), 1):
            for match in COMMAND.finditer(line):
                module = ROOT / (match.group(2) or f"stages/{match.group(1)}.py")
                rest = COMMAND_END.split(line[match.end():])[0].split()
                if module.name == "plots.py":
                    if rest and rest[0] not in ("show", "diff"):
                        wrong.append(f"{doc.relative_to(ROOT)}:{number}: stages.plots has no subcommand {rest[0]!r}")
                    continue
                flags = argparse_flags(module)
                subcommand = None
                if len(flags) > 1 and rest and not rest[0].startswith("-"):
                    subcommand = rest[0]
                    if subcommand not in flags and "/" not in subcommand:  # `plan/run/gather` names several
                        wrong.append(f"{doc.relative_to(ROOT)}:{number}: {module.name} has no subcommand {subcommand!r}")
                        continue
                known = flags[None] | flags.get(subcommand, set()) | {"-h", "--help"}
                for word in rest:
                    flag = word.split("=")[0]
                    if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in known:
                        wrong.append(f"{doc.relative_to(ROOT)}:{number}: {module.name} {subcommand or ''} takes no {flag}")
    assert wrong == []


# `dvc [global options] command ...`, also as `.venv/bin/dvc`, up to where COMMAND_END says.
DVC_COMMAND = re.compile(r"(?<![\w.-])dvc((?: --?[\w-]+)*) ([a-z][\w-]*)")


def test_every_option_the_docs_give_dvc_is_one_it_takes():
    """`dvc --wait-for-lock repro --single-item train@a`, `dvc exp run --queue -S ...` in a doc: the
    installed DVC's own parser takes each option, spelt out (not an abbreviation argparse would
    accept), as a global one or its (sub)command's. A command DVC does not have is prose (`dvc` is
    not found), not checked."""
    from dvc.cli.parser import get_main_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next((action.choices for action in parser._actions
                     if isinstance(action, argparse._SubParsersAction)), {})

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings}

    main = get_main_parser()
    wrong = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").replace("\\\n", " ").splitlines(), 1):
            for match in DVC_COMMAND.finditer(line):
                parser = commands(main).get(match.group(2))
                if parser is None:
                    continue
                rest = COMMAND_END.split(line[match.end():])[0].split()
                if rest and rest[0] in commands(parser):
                    parser, rest = commands(parser)[rest[0]], rest[1:]
                given = [(main, word) for word in match.group(1).split()] + [(parser, word) for word in rest]
                for owner, word in given:
                    flag = word.split("=")[0]
                    if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in options(owner):
                        wrong.append(f"{doc.relative_to(ROOT)}:{number}: {match.group(0)} ... takes no {flag}")
    assert wrong == []


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE))
    wrong = [f"{doc.relative_to(ROOT)}:{number}: make {target}"
             for doc in DOCS
             for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
             for target in re.findall(r"`(?:[A-Z_]+=\S+ )*make ([\w-]+)", line) if target not in targets]
    assert wrong == []


def schema_has(tp: object, keys: list[str]) -> bool:
    """Whether `a.b.c` is a key path of params.yaml's schema below type `tp` (a dataclass of
    stages/config.py; a dict's keys are names, so any key goes there)."""
    from stages import config, layouts, sources

    if not keys:
        return True
    if tp is config.ComponentConfig:  # a source or layout: `kind` and the options of some kind of it
        kinds = [*sources.REGISTRY.values(), *layouts.REGISTRY.values()]
        return keys[0] == "kind" or any(schema_has(kind.options, keys) for kind in kinds)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {field.name for field in dataclasses.fields(tp) if not field.metadata.get("internal")}
        if keys[0] not in names:
            return False
        # An experiment's `train:` and `backbone_overrides:` are dicts that the parser reads as
        # the training defaults and the backbone entry they override.
        below = {(config.ExperimentConfig, "train"): config.TrainingConfig,
                 (config.ExperimentConfig, "backbone_overrides"): config.BackboneConfig}
        return schema_has(below.get((tp, keys[0]), hints[keys[0]]), keys[1:])
    if typing.get_origin(tp) is dict:
        return schema_has(typing.get_args(tp)[1], keys[1:])
    return tp is typing.Any  # a backbone's `options:`: its family says which (docs/extending.md)


def test_every_params_key_the_docs_quote_exists():
    """`training.fine_tune.unfreeze`, `datasets.<name>.source.sha256`,
    `experiments.digits-small_cnn.train.epochs`, ... quoted in a doc are keys of params.yaml's
    schema (stages/config.py, and the source and layout kinds' options)."""
    from stages import config

    hints = typing.get_type_hints(config.Params)
    roots = {field.name: hints[field.name] for field in dataclasses.fields(config.Params)
             if not field.metadata.get("internal")}
    wrong = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"`((\w+)(?:\.(?:<[^>`]+>|[\w-]+))+)", line):
                key, root = match.group(1), match.group(2)
                if root not in roots or re.search(r"\.(json|csv|py|yaml|md|png|npz|parquet|keras)$", key):
                    continue
                if not schema_has(roots[root], key.split(".")[1:]):
                    wrong.append(f"{doc.relative_to(ROOT)}:{number}: {key}")
    assert wrong == []


def test_no_doc_runs_stages_through_the_venvs_dvc_without_its_path():
    """`.venv/bin/dvc repro` (or `exp run`, `queue start`) runs each stage's `python -m stages.x`
    through the shell's PATH, where `python` is the system's, which lacks the packages, or none:
    a doc puts `.venv/bin` on the PATH first, as make does, and then calls plain `dvc`."""
    wrong = [f"{doc.relative_to(ROOT)}:{number}: {match.group(0)}"
             for doc in DOCS
             for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
             for match in re.finditer(r"\.venv/bin/dvc(?: -[\w-]+)* (?:repro|exp run|queue start)\b", line)]
    assert wrong == []
