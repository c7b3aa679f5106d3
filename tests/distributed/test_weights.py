"""Weights on a live sharded model (gloo, CPU), one torchrun launch per world size:

* the export stream at TP2, PP2, EP2, TP2xEP2 and PP2xEP2 gives every HF tensor exactly once,
  bitwise equal to the checkpoint it was loaded from (every family);
* a sync into a running embedded server over each transport (tensor at EP2, distributed at
  PP2, disk at TP2): the server then answers with the greedy tokens and log-probs of
  ``transformers`` loading the trainer's exported weights, the log-prob probe agrees, and the
  probe catches two experts swapped inside the server;
* conversion: HF -> mcore -> HF is bitwise for every family, bad inputs are refused naming the
  tensor, an interrupted conversion leaves nothing; the mcore checkpoint loaded at another
  layout gives ``transformers``' logits (a map wrong the same way in both directions would
  pass the round trip, not this); a run checkpoint the RL loop saved at PP2xEP2 (model and
  distributed optimizer) converts to HF bitwise.
"""

from __future__ import annotations

import importlib.util
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
SYNC_CASES = [{"layout": {"ep": 2}, "transport": "tensor"},
              {"layout": {"pp": 2}, "transport": "distributed"},
              {"layout": {"tp": 2}, "transport": "disk", "swap_experts": True}]


def _embedded_servers():
    spec = importlib.util.spec_from_file_location("embedded_servers", ROOT / "tests/http/embedded_servers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MCORE_LOGITS = {2: [["qwen3_moe", {"tp": 2}], ["deepseek_v3", {"ep": 2}], ["qwen3", {"pp": 2}],
                    ["qwen3_vocab511", {"tp": 2}], ["qwen3_tied", {"pp": 2}]],
                4: [["deepseek_v3", {"tp": 2, "ep": 2}]]}
RL_CHECKPOINT = {"family": "qwen3_moe", "layout": {"pp": 2, "ep": 2}}


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
            body = {"families": {k: str(v) for k, v in families.items()}, "layouts": LAYOUTS[nproc],
                    "checks": ["export"], "bucket_bytes": BUCKET}
            # conversions: every family round trip in the 2-rank launch; what the 4-rank one loads
            conv = self.tmp / f"convert{nproc}"
            names = list(families) if nproc == 2 else sorted({f for f, _ in MCORE_LOGITS[4]})
            body["convert"] = {"cases": [{"name": f, "hf": str(families[f]), "mcore": str(conv / "mcore" / f),
                                          "back": str(conv / "back" / f)} for f in names]}
            body["mcore_dirs"] = {f: str(conv / "mcore" / f) for f in names}
            body["mcore_logits"] = MCORE_LOGITS[nproc]
            if nproc == 2:
                (conv / "errors").mkdir(parents=True)
                body["convert"].update(errors_dir=str(conv / "errors"), errors_source=str(families["qwen3"]))
            else:
                body["rl_checkpoint"] = {**RL_CHECKPOINT, "dir": str(self.tmp / "run" / "checkpoints"),
                                         "back": str(self.tmp / "rl_hf")}
            server = None
            try:
                if nproc == 2:  # the engine starts on other weights (seed 1) than the trainer's
                    from moe_rl.models.tiny import save_tiny_hf

                    engine_dir = save_tiny_hf("qwen3_moe", self.tmp / "engine" / "seed1", seed=1)
                    server = _embedded_servers().start_embedded(engine_dir, self.tmp)  # the worker waits for it
                    body["sync"] = {"url": server.url, "disk_dir": str(self.tmp / "engine" / "sync"),
                                    "family": "qwen3_moe", "cases": SYNC_CASES}
                spec.write_text(json.dumps(body))
                torchrun(ROOT / "tests/distributed/weights_worker.py", nproc, str(out), str(spec))
                recs = json.loads(out.read_text())
                self.results[nproc] = {(r["family"], _name(r["layout"])): r for r in recs if "family" in r}
                self.results[nproc].update({(k, None): r for r in recs for k in ("convert", "rl_convert")
                                            if k in r or f"{k}_error" in r})
                self.results[nproc].update({("sync", r["transport"]): r for r in recs if "sync_case" in r})
            except (AssertionError, RuntimeError) as e:
                self.failed[nproc] = str(e) + (f"\nserver log:\n{server.log()}" if server else "")
            finally:
                if server is not None:
                    server.kill()
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


@pytest.mark.parametrize("transport", ["tensor", "distributed", "disk"])
def test_sync_into_a_running_server_equals_transformers_on_the_exported_weights(launches, transport):
    rec = launches.world(2)[("sync", transport)]
    assert "sync_error" not in rec, rec["sync_error"]
    got = rec["sync"]
    assert got["staging"] and got["verify"], got
    m = got["metrics"]
    assert m["weights/tensors"] == 135 and m["weights/buckets"] > 1, m
    # the probe: the server's log-probs are the trainer's (fp32 on both sides: ~1e-6)
    assert m["weights/probe_logprob_max_diff"] < 1e-4, m
    ev = got["engine_vs_transformers"]
    assert ev["greedy_equal"] and ev["logprob_max_diff"] < 1e-4 and ev["version"] == str(rec["sync_case"] + 1), ev
    if transport == "disk":  # two experts swapped inside the server: the probe sees it at once
        assert got["swapped_probe"]["weights/probe_logprob_diff"] > 0.1, got["swapped_probe"]


def _convert(launches, nproc):
    rec = launches.world(nproc)[("convert", None)]
    assert "convert_error" not in rec, rec["convert_error"]
    return rec["convert"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen3", "llama", *VARIANTS])
def test_hf_to_mcore_to_hf_is_bitwise(launches, family):
    case = _convert(launches, 2)["cases"][family]
    assert case["bad"] == [] and case["extra"] == [], case
    assert "config.json" in case["side_files"] and "model.safetensors.index.json" in case["side_files"], case


def test_bad_checkpoints_are_refused_naming_the_tensor(launches):
    errors = _convert(launches, 2)["errors"]
    victim = "model.layers.1.self_attn.k_proj.weight"
    assert f"1 tensors of the model are missing, e.g. {victim}" in errors["missing"], errors
    assert "not part of the model, e.g. model.layers.9.bogus.weight" in errors["extra"], errors
    assert f"{victim} has shape [16, 64], the config implies [32, 64]" in errors["shape"], errors
    assert "simulated crash" in errors["crashed"], errors
    assert errors["crashed_left"] == [], errors  # interrupted: nothing under the name, no temporary


MCORE_CASES = [(n, f, _name(lay)) for n, pairs in MCORE_LOGITS.items() for f, lay in pairs]


@pytest.mark.parametrize("nproc,family,layout", MCORE_CASES, ids=[f"{f}-{l}" for _, f, l in MCORE_CASES])
def test_mcore_checkpoint_at_another_layout_gives_transformers_logits(launches, nproc, family, layout):
    from moe_rl.train.parity import LOGIT_TOLERANCE

    rec = launches.world(nproc)[(family, layout)]
    assert "mcore_logits_error" not in rec, rec["mcore_logits_error"]
    assert rec["mcore_logits"]["max_abs_diff"] < LOGIT_TOLERANCE, rec["mcore_logits"]


def test_a_run_checkpoint_saved_at_pp2_ep2_converts_to_hf_bitwise(launches):
    rec = launches.world(4)[("rl_convert", None)]
    assert "rl_convert_error" not in rec, rec["rl_convert_error"]
    got = rec["rl_convert"]
    assert got["bad"] == [] and got["tensors"] == got["expected"], got
