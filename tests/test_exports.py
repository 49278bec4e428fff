"""Every module declares ``__all__``, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import imrelay

MODULES = sorted(info.name for info in pkgutil.walk_packages(imrelay.__path__, prefix="imrelay."))


def test_exports_modules_found() -> None:
    """The walk finds the package's modules (so the checks below are not vacuous)."""
    assert "imrelay.app" in MODULES
    assert "imrelay.platforms.dingtalk.protocol" in MODULES
    assert len(MODULES) > 30


@pytest.mark.parametrize("name", MODULES)
def test_exports_all_declared_and_resolvable(name: str) -> None:
    """A module has ``__all__`` and each listed name is an attribute of it."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list | tuple), f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ lists missing names {missing}"


def test_exports_version_matches_package_metadata() -> None:
    """``imrelay.__version__`` is the installed distribution's version."""
    from importlib.metadata import version

    assert imrelay.__version__ == version("imrelay")
