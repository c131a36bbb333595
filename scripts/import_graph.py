"""Print the import graph between sfpc's packages, and the lines of code of each.

    .venv/bin/python scripts/import_graph.py            # the layers' edges and sizes
    .venv/bin/python scripts/import_graph.py --modules  # one line per module-to-module import

It reads the same graph import-linter checks (grimp, static: imports inside functions count too),
so what it prints is what `make lint` holds to the contracts in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import grimp

PACKAGES = ("sfpc.cli", "sfpc.training", "sfpc.model", "sfpc.server", "sfpc.clients",
            "sfpc.inference", "sfpc.io", "sfpc.errors")


def package_of(module: str) -> str:
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return module  # sfpc itself


def lines_of(graph: grimp.ImportGraph, package: str) -> int:
    import importlib.util

    total = 0
    for module in graph.find_descendants(package) | {package} if "." in package else ():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            total += sum(1 for _ in Path(spec.origin).open(encoding="utf-8"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", action="store_true", help="module-level edges instead")
    args = parser.parse_args(argv)
    graph = grimp.build_graph("sfpc")
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if args.modules:
                print(f"{importer} -> {imported}")
                continue
            a, b = package_of(importer), package_of(imported)
            if a != b and b in PACKAGES and a in PACKAGES:
                edges[(a, b)] += 1
    if args.modules:
        return 0
    print(f"{'package':<16} {'lines':>6}  imports (number of module-level imports)")
    for package in PACKAGES:
        out = sorted((b, n) for (a, b), n in edges.items() if a == package)
        targets = ", ".join(f"{b.removeprefix('sfpc.')} ({n})" for b, n in out) or "-"
        print(f"{package.removeprefix('sfpc.'):<16} {lines_of(graph, package):>6}  {targets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
