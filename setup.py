"""Shim for tools that still call setup.py (``python setup.py --version``): all metadata is in pyproject.toml."""

from setuptools import setup

setup()
