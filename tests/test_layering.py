"""The package's layers import only what CONTRIBUTING.md ("Layers") allows them to.

Read from the source with ast, function-level imports included, so a lazy import cannot slip
past; one check also imports the math to see that Ray stays out of the process.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "amfs_dist"

# layer (a folder of amfs_dist) -> module prefixes none of its files may import
FORBIDDEN = {
    "algorithms": ("ray", "amfs_dist.distributed", "amfs_dist.backend", "amfs_dist.train",
                   "amfs_dist.evaluate", "amfs_dist.tune", "amfs_dist.experiment",
                   "amfs_dist.commands", "amfs_dist.benchmarks", "amfs_dist.storage"),
    "models": ("ray", "amfs_dist.algorithms", "amfs_dist.data", "amfs_dist.distributed",
               "amfs_dist.train"),
    "data": ("ray", "amfs_dist.algorithms", "amfs_dist.distributed", "amfs_dist.backend",
             "amfs_dist.train"),
}
# the distributed code weighs and moves gradients; a head's math stays out of it
DISTRIBUTED_MAY_USE_FROM_ALGORITHMS = ("amfs_dist.algorithms.outer",
                                       "amfs_dist.algorithms.learner")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file; `from a import b` gives a.b too,
    since b may be a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_files(layer: str) -> list[Path]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no layer {layer}"
    return files


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
           for path in layer_files(layer) for line, module in imports(path)
           if any(within(module, prefix) for prefix in FORBIDDEN[layer])]
    assert bad == []


def test_distributed_code_uses_only_the_weighting_and_gradient_types_of_algorithms():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
           for path in layer_files("distributed") for line, module in imports(path)
           if within(module, "amfs_dist.algorithms") and module != "amfs_dist.algorithms"
           and not any(within(module, allowed) for allowed in DISTRIBUTED_MAY_USE_FROM_ALGORITHMS)]
    assert bad == []


def test_imports_are_read_from_function_bodies_too(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    import ray\n    from amfs_dist.algorithms import kernel\n")
    assert imports(source) == [(2, "ray"), (3, "amfs_dist.algorithms"),
                               (3, "amfs_dist.algorithms.kernel")]


def test_the_math_runs_without_ray_in_the_process():
    modules = sorted(f"amfs_dist.algorithms.{p.stem}" for p in layer_files("algorithms")
                     if p.stem != "__init__" and p.parent == PACKAGE / "algorithms")
    code = "; ".join([f"import {m}" for m in modules] +
                     ["import sys", "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
