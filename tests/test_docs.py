"""The tests and files README.md and docs/*.md name as evidence exist under those names."""

from __future__ import annotations

import ast
import fnmatch
import re
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
