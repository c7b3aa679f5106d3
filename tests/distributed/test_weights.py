"""Weights on a live sharded model (gloo, CPU): the export stream at TP2, PP2, EP2, TP2xEP2
and PP2xEP2 gives every HF tensor exactly once, bitwise equal to the checkpoint it was loaded
from. One torchrun launch per world size runs every family and layout."""

from __future__ import annotations

import json

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed

LAYOUTS = {
    2: [{"tp": 2}, {"pp": 2}, {"ep": 2}],
    4: [{"tp": 2, "ep": 2}, {"pp": 2, "ep": 2}],
}
MOE = {"qwen3_moe", "mixtral", "deepseek_v3"}
BUCKET = 48 << 10
# variants the plain tiny checkpoints do not cover: a vocabulary TP2 must pad, tied embeddings at PP2
VARIANTS = {"qwen3_vocab511": ("qwen3", {"vocab_size": 511}), "qwen3_tied": ("qwen3", {"tie_word_embeddings": True})}


class _Launches:
    def __init__(self, dirs, tmp):
        self.dirs, self.tmp = dirs, tmp
        self.results: dict = {}
        self.failed: dict[int, str] = {}

    def world(self, nproc: int) -> dict:
        if nproc not in self.results and nproc not in self.failed:
            spec = self.tmp / f"spec{nproc}.json"
            out = self.tmp / f"out{nproc}.json"
            families = dict(self.dirs) if nproc == 2 else {f: d for f, d in self.dirs.items() if f in MOE}
            spec.write_text(json.dumps({"families": {k: str(v) for k, v in families.items()},
                                        "layouts": LAYOUTS[nproc], "checks": ["export"], "bucket_bytes": BUCKET}))
            try:
                torchrun(ROOT / "tests/distributed/weights_worker.py", nproc, str(out), str(spec))
                self.results[nproc] = {(r["family"], _name(r["layout"])): r for r in json.loads(out.read_text())}
            except AssertionError as e:
                self.failed[nproc] = str(e)
        if nproc in self.failed:
            pytest.fail(f"the {nproc}-rank launch failed:\n{self.failed[nproc]}", pytrace=False)
        return self.results[nproc]


def _name(lay: dict) -> str:
    return "x".join(f"{k.upper()}{v}" for k, v in sorted(lay.items())) or "single"


@pytest.fixture(scope="module")
def launches(tiny_hf_dirs, tmp_path_factory):
    from moe_rl.models.tiny import save_tiny_hf

    tmp = tmp_path_factory.mktemp("weights")
    dirs = dict(tiny_hf_dirs)
    for name, (fam, over) in VARIANTS.items():
        dirs[name] = save_tiny_hf(fam, tmp / name, **over)
    return _Launches(dirs, tmp)


CASES = [(n, f, _name(lay)) for n, lays in LAYOUTS.items() for lay in lays
         for f in (["qwen3_moe", "mixtral", "deepseek_v3", "qwen3", "llama", *VARIANTS] if n == 2 else sorted(MOE))
         if f in MOE or "EP" not in _name(lay)]


@pytest.mark.parametrize("nproc,family,layout", CASES, ids=[f"{f}-{l}" for _, f, l in CASES])
def test_export_is_the_checkpoint_bitwise(launches, nproc, family, layout):
    rec = launches.world(nproc)[(family, layout)]
    assert "invalid" not in rec, rec["invalid"]
    assert "export_error" not in rec, rec["export_error"]
    ex = rec["export"]
    assert ex["missing"] == [] and ex["mismatched"] == [], ex
    assert ex["exported"] == ex["distinct"] == ex["expected"], ex
    assert ex["most_alive"] <= 2, ex
    assert ex["buckets"] > 1, ex
    # every pipeline stage and every EP rank sends its own part
    assert ex["senders"] == (2 if layout in ("PP2", "EP2") else 4 if layout == "EP2xPP2" else
                             2 if layout == "EP2xTP2" else 1), ex
