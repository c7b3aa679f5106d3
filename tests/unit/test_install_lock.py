"""The install is reproducible: every dependency is pinned in launch/requirements.lock, the
pins satisfy pyproject's ranges, and the environment under test is exactly the lock."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "launch/requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"lock line {line!r} is not an exact pin"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _declared() -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + list(meta["optional-dependencies"]["dev"])
    for line in (ROOT / "tests/requirements-test.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            reqs.append(line)
    return [Requirement(r) for r in reqs]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not pinned in launch/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"launch/requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}")


@pytest.mark.skipif(os.environ.get("MOE_RL_LOCK") == "0", reason="installed without the lock on purpose")
def test_environment_is_exactly_the_lock():
    pins = _lock()
    wrong = []
    for name, want in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment does not install
        if have.split("+")[0] != want:
            wrong.append(f"{name} {have} != {want}")
    assert not wrong, "installed versions differ from launch/requirements.lock: " + ", ".join(wrong)
    import transformers

    assert transformers.__version__ == pins["transformers"]
