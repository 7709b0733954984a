"""The project's own modules import each other without cycles (module-level and function-level imports).

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
``import b`` / ``from b import x`` / ``from . import b`` in ``a`` that names a module of the project, wherever
the statement stands (a function-level import is still a dependency, only a deferred one).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alum_pretrain", "data_prep", "launch")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports (a ``from X import y`` names ``X.y`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif target in modules:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        path.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "alum_pretrain.data.databin" in graph["alum_pretrain.data.loader"]  # from .databin import DataBin
    assert "alum_pretrain.fairseq_ext.export_hf" in graph["alum_pretrain.export"]  # inside main()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_corpus_preparation_does_not_load_torch():
    """``data_prep`` and the modules its worker processes import read and write corpora with numpy only."""
    import subprocess
    import sys

    code = ("import sys, data_prep, data_prep.work, data_prep.cli, alum_pretrain.data, alum_pretrain.integrity; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_data_package_still_offers_its_tensor_names():
    import alum_pretrain.data as data
    from alum_pretrain.data.loader import PretrainLoader

    assert data.PretrainLoader is PretrainLoader
    assert all(getattr(data, name) is not None for name in data.__all__)
