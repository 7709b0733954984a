"""Code-shape rules for the project's packages, read from the source with ``ast`` (nothing is imported).

* No module imports another module's private name (``from x import _name``, relative or absolute): a name
  shared between modules is public, under a name that says so.  Dunder names (``__version__``) are allowed.
* No function or method is longer than :data:`MAX_CODE_LINES` code lines: the lines of its body, docstring
  excluded, that hold code (blank lines and comment-only lines do not count; nested functions count toward
  the function that holds them, and are checked on their own too).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alum_pretrain", "data_prep", "launch")
MAX_CODE_LINES = 100


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: from X import _name`` for every private name ``path`` imports from another module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{path.relative_to(root)}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for a in node.names if _is_private(a.name)]


def code_lines(source: str) -> set[int]:
    """Line numbers that hold code: covered by a token other than a comment or a line break, and not blank."""
    lines = source.splitlines()
    out: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            out.update(n for n in range(tok.start[0], tok.end[0] + 1) if lines[n - 1].strip())
    return out


def function_lengths(path: Path) -> dict[str, int]:
    """``{qualified name: code lines of its body, docstring excluded}`` for every function in ``path``."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    code = code_lines(source)
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body
                if ast.get_docstring(child, clean=False) is not None:
                    body = body[1:]
                start = body[0].lineno if body else child.end_lineno + 1
                out[prefix + child.name] = sum(1 for n in range(start, child.end_lineno + 1) if n in code)
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_the_counters_see_what_they_should(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('from .a import _x, __version__, y\nfrom b import _z as w\n\n'
                   'class C:\n    def f(self):\n        """Doc.\n\n        More.\n        """\n'
                   '        # a comment\n\n        a = 1  # trailing comment\n'
                   '        s = """two\n\nlines"""\n\n        def g():\n            return a\n        return g\n',
                   encoding="utf-8")
    assert private_imports(src, tmp_path) == ["m.py:1: from .a import _x", "m.py:2: from b import _z"]
    # a = 1, s = """two, lines""", def g, return a, return g  (blank line inside the string not counted)
    assert function_lengths(src) == {"C.f": 6, "C.f.g": 1}


def test_no_private_names_imported_across_modules():
    found = [line for path in _sources() for line in private_imports(path)]
    assert not found, "private names imported from another module (make them public):\n" + "\n".join(found)


def test_no_function_longer_than_the_limit():
    long = [f"{path.relative_to(ROOT)}: {name} has {n} code lines"
            for path in _sources() for name, n in function_lengths(path).items() if n > MAX_CODE_LINES]
    assert not long, f"functions over {MAX_CODE_LINES} code lines:\n" + "\n".join(long)
