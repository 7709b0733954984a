"""setup.py is a shim over pyproject.toml: `python setup.py --version` prints the package's version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import alum_pretrain

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_version_comes_from_pyproject():
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == alum_pretrain.__version__
