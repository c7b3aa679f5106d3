"""Run checkpoint layout without a process group: what counts as complete, what is partial,
and the model identity check a resume makes before any work."""

from __future__ import annotations

import json

import pytest

from moe_rl.checkpoint import run_state as rs


def _ckpt(root, step, *, marker=True, state_step=None):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / rs.RUN_STATE).write_text(json.dumps({"step": step if state_step is None else state_step,
                                              "model": {"model_type": "qwen3_moe", "hidden_size": 64}}))
    if marker:
        (d / rs.MARKER).write_text("ok\n")
    return d


def test_newest_complete_wins_and_partials_are_reported(tmp_path):
    _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 6, marker=False)  # killed between the rename and the marker
    (tmp_path / ".tmp-step_00000008").mkdir()  # killed before the rename
    _ckpt(tmp_path, 10, state_step=9)  # a run state that disagrees with its name
    (tmp_path / "step_00000012").mkdir()  # nothing in it
    (tmp_path / "notes.txt").write_text("x")
    found = rs.scan(str(tmp_path))
    assert found.complete == [(2, str(tmp_path / "step_00000002")), (4, str(tmp_path / "step_00000004"))]
    assert found.newest[0] == 4
    assert sorted(p.rsplit("/", 1)[1] for p in found.partial) == [
        ".tmp-step_00000008", "step_00000006", "step_00000010", "step_00000012"]


def test_garbled_run_state_is_partial(tmp_path):
    d = _ckpt(tmp_path, 3)
    (d / rs.RUN_STATE).write_text('{"step": 3, "mod')
    found = rs.scan(str(tmp_path))
    assert not found.complete and found.partial == [str(d)]


def test_missing_root_is_empty(tmp_path):
    assert rs.scan(str(tmp_path / "nope")).newest is None


def test_another_model_is_refused_with_the_fields(tmp_path):
    d = _ckpt(tmp_path, 2)
    rs.check_identity(str(d), {"model_type": "qwen3_moe", "hidden_size": 64})
    with pytest.raises(ValueError, match=r"hidden_size: checkpoint 64, config 128"):
        rs.check_identity(str(d), {"model_type": "qwen3_moe", "hidden_size": 128})


def test_model_identity_reads_the_hf_config():
    from moe_rl.models.tiny import tiny_hf_config

    ident = rs.model_identity(tiny_hf_config("qwen3_moe"))
    assert ident["model_type"] == "qwen3_moe" and ident["num_experts"] == 8 and ident["vocab_size"] == 512


def test_remove_drops_the_marker_first(tmp_path, monkeypatch):
    d = _ckpt(tmp_path, 2)
    calls = []
    monkeypatch.setattr(rs.shutil, "rmtree", lambda p: calls.append(((d / rs.MARKER).exists(), p)))
    rs._remove(str(d))
    assert calls == [(False, str(d))]
