"""Checkpoint files: a tiny checkpoint appears under its name complete or not at all, a
leftover partial directory is rebuilt rather than trusted, and ``HFCheckpoint`` releases its
files (their memory maps) when closed."""

import json
import os

import pytest
import torch

from moe_rl.models import FAMILIES
from moe_rl.models.hf_checkpoint import HFCheckpoint
from moe_rl.models.tiny import TINY_FAMILIES, ensure_tiny_hf, is_complete_hf_dir, save_tiny_hf



def _mapped(path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(path) in line]


def test_tiny_families_are_the_supported_families():
    assert TINY_FAMILIES == tuple(FAMILIES)


def test_partial_directory_is_rebuilt_not_trusted(tmp_path):
    out = tmp_path / "hf_tiny_qwen3"
    # what an interrupted save_pretrained leaves: config.json first, no weights yet
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert not is_complete_hf_dir(out)
    assert ensure_tiny_hf("qwen3", out) == str(out)
    assert is_complete_hf_dir(out)
    with HFCheckpoint(out) as ck:
        assert "model.embed_tokens.weight" in ck.keys()
        assert ck.config().model_type == "qwen3"
    before = os.stat(out / "model.safetensors").st_mtime_ns
    ensure_tiny_hf("qwen3", out)  # complete now: kept as it is
    assert os.stat(out / "model.safetensors").st_mtime_ns == before


def test_truncated_weights_are_not_complete(tmp_path):
    out = save_tiny_hf("qwen3", tmp_path / "t")
    w = os.path.join(out, "model.safetensors")
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) // 2)
    assert not is_complete_hf_dir(out)


def test_interrupted_write_leaves_nothing_under_the_name(tmp_path, monkeypatch):
    import transformers

    def crash_after_config(self, save_directory, **kw):
        self.config.save_pretrained(save_directory)
        raise KeyboardInterrupt  # killed between config.json and the weights

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash_after_config)
    with pytest.raises(KeyboardInterrupt):
        save_tiny_hf("qwen3", tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []  # neither the name nor a temporary sibling


def test_rewrite_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "ckpt"
    save_tiny_hf("qwen3", out, seed=0)
    (out / "stale.txt").write_text("from the old directory")
    save_tiny_hf("qwen3", out, seed=1)
    assert not (out / "stale.txt").exists() and is_complete_hf_dir(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_hf_checkpoint_releases_its_files(tmp_path):
    out = save_tiny_hf("qwen3", tmp_path / "ck")
    ck = HFCheckpoint(out)
    # (tensors read are copied out at once: a tensor safetensors returns may map the file too)
    norm = ck.get("model.norm.weight").clone()
    assert ck.get_chunk("lm_head.weight", 0, 1, 2).clone().shape[0] == 256
    assert _mapped(out)  # open between reads: each rank reads many tensors of one file
    ck.close()
    assert _mapped(out) == []
    # reading after close reopens, and the context manager closes again
    with ck:
        assert torch.equal(ck.get("model.norm.weight").clone(), norm)
    assert _mapped(out) == []
