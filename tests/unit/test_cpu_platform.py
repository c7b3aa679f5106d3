"""The CPU substitutions still apply to the pinned Megatron-Core: each anchor (the CUDA
assumption it replaces) is still in the source. A Megatron upgrade that moves one fails here."""

import importlib.metadata

from moe_rl.parallel import cpu_platform


def test_pinned_megatron_version():
    assert importlib.metadata.version("megatron-core") == "0.16.1"


def test_every_substitution_anchor_is_present():
    assert cpu_platform.check_anchors() == []


def test_every_substitution_is_documented_and_named_once():
    names = [s.name for s in cpu_platform.SUBSTITUTIONS]
    assert len(names) == len(set(names))
    for s in cpu_platform.SUBSTITUTIONS:
        assert s.covers and s.anchors, s.name
        assert ".py:" in s.covers, s.name  # names the Megatron file:line it covers


def test_anchor_check_detects_a_missing_anchor(monkeypatch):
    fake = cpu_platform.Substitution("fake", "x.py:1", (("megatron.core.utils", "no such text 123"),), lambda: None)
    monkeypatch.setattr(cpu_platform, "SUBSTITUTIONS", cpu_platform.SUBSTITUTIONS + (fake,))
    missing = cpu_platform.check_anchors()
    assert len(missing) == 1 and "fake" in missing[0]
