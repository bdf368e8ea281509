"""The shape of the code, checked from its syntax tree: no function in the seven packages is over 100 lines
(entry points read load config → build → train → save; docs/architecture.md), and one distributed strategy
serves every trainer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "pretrain", "annotation", "rewards", "align", "ui", "recipes")
MAX_LINES = 100


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines, from its ``def``
    line to its last line (decorators not counted; a nested function counts inside its parent too)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append((node.name, lines))
    return out


def test_the_line_count_sees_a_long_function_and_not_a_short_one() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(100))  # a def line and 100 more: 101 lines
    method = body.replace("    ", "        ")
    source = f"def long():\n{body}\n\ndef short():\n    return 1\n\nclass C:\n    def method(self):\n{method}"
    assert long_functions(source) == [("long", 101), ("method", 101)]
    assert long_functions(source, limit=101) == []


def test_no_function_in_the_packages_is_over_100_lines() -> None:
    offenders = []
    for package in PACKAGES:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            for name, lines in long_functions(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(ROOT)}: {name} ({lines} lines)")
    assert not offenders, "functions over 100 lines; split them into named steps:\n" + "\n".join(offenders)


def test_one_distributed_strategy_and_only_it_imports_deepspeed() -> None:
    """``pretrain/strategy.py`` is the one place a trainer meets DeepSpeed: no other file of the packages
    imports it."""
    importers = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert sorted(set(importers)) == ["pretrain/strategy.py"]
