"""Held-out evaluation: its metrics against their formulas, its prompts (held out from training,
a file's first rows, errors that name eval.path), its config checks, the eval.jsonl records
with resume truncation and tensorboard scalars, and its requests' sampling. The loop runs it in
tests/distributed/test_loop_layouts.py, against HF transformers' greedy generation."""

from __future__ import annotations

import json

import pytest
import torch

from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.data.tokenizer import build_tokenizer
from moe_rl.evaluation import Evaluation, eval_metrics, load_eval_prompts
from moe_rl.observability import MetricsConfig, MetricWriter
from moe_rl.observability.writer import read_metrics
from moe_rl.rollout.requests import eval_requests, make_requests
from moe_rl.rollout.types import FinishReason, Sample


def _cfg(*overrides):
    return load_config(RunConfig, None, ["data.toy_task=max_digit", *overrides])


def _sample(g, j, n_tokens, reason):
    return Sample(group_id=g, sample_index=j, prompt_ids=[1, 2], response_ids=list(range(n_tokens)),
                  rollout_logprobs_T=torch.zeros(n_tokens), routed_experts_NLK=None, finish_reason=reason,
                  weight_version="0")


def test_metrics_are_the_formulas():
    r = [[1.0, 0.0, 0.5], [0.0, 0.0, 0.25]]  # 2 prompts x 3 responses
    fmt = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    lens = [[3, 1, 4], [2, 2, 5]]
    groups = [{"samples": [_sample(p, j, lens[p][j], FinishReason.LENGTH if lens[p][j] == 5 else FinishReason.STOP)
                           for j in range(3)],
               "rewards": torch.tensor(r[p]), "named": {"acc": torch.tensor(r[p]), "fmt": torch.tensor(fmt[p])},
               "errors": [{}, {}, {}]} for p in range(2)]
    m = eval_metrics(groups, {"rollout/reward_error_frac/acc": 0.0, "rollout/reward_error_frac/fmt": 1 / 6})
    assert m["eval/reward_mean"] == pytest.approx((1.0 + 0.5 + 0.25) / 6)
    assert m["eval/reward_best_mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["eval/reward_mean/fmt"] == pytest.approx(4 / 6)
    assert m["eval/response_len_mean"] == pytest.approx(17 / 6) and m["eval/truncated_frac"] == pytest.approx(1 / 6)
    assert m["eval/num_prompts"] == 2 and m["eval/reward_error_frac/fmt"] == pytest.approx(1 / 6)
    by = eval_metrics(groups, {}, ["gsm8k", "math"])
    assert by["eval/by_source/gsm8k/reward_mean"] == pytest.approx(1.5 / 3)
    assert by["eval/by_source/math/reward_best_mean"] == pytest.approx(0.25)
    assert by["eval/by_source/math/num_prompts"] == 1
    assert not any(k.startswith("eval/by_source/") for k in eval_metrics(groups, {}, [None, None]))
    one = eval_metrics([{**g, "samples": g["samples"][:1], "rewards": g["rewards"][:1],
                         "named": {k: v[:1] for k, v in g["named"].items()}} for g in groups], {})
    assert "eval/reward_best_mean" not in one  # best@1 is mean@1


def test_toy_prompts_are_held_out_and_a_file_gives_its_first_rows(tmp_path):
    tok = build_tokenizer(vocab_size=400)
    # four digits have 10,000 prompts: 4096 training draws cover a third of them, so another seed alone
    # would repeat about a third of the training prompts
    cfg = _cfg("eval.interval=5", "eval.num_prompts=256", "data.toy_num_prompts=4096")
    held = load_eval_prompts(cfg, tok)
    from moe_rl.data.prompts import PromptStream

    train = {p.text for p in PromptStream(cfg.data, tok).prompts}
    assert len(held) == len({p.text for p in held}) == 256 and not train & {p.text for p in held}
    with pytest.raises(ValueError, match=r"eval.num_prompts \(9000\): data.toy_task='max_digit' has only \d+ distinct"):
        load_eval_prompts(_cfg("eval.interval=5", "eval.num_prompts=9000", "data.toy_num_prompts=4096"), tok)
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(7)))
    first = load_eval_prompts(_cfg(f"eval.path={path}", "eval.num_prompts=3", "eval.interval=1"), tok)
    assert [p.record.label for p in first] == ["0", "1", "2"]
    assert len(load_eval_prompts(_cfg(f"eval.path={path}", "eval.num_prompts=0", "eval.interval=1"), tok)) == 7
    import pyarrow as pa
    import pyarrow.parquet as pq

    verl_style = tmp_path / "held.parquet"  # the training data keep their own keys (toy tasks here)
    pq.write_table(pa.Table.from_pylist([{"data_source": "s", "prompt": [{"role": "user", "content": f"Q{i}"}],
                                          "reward_model": {"ground_truth": str(9 - i)}} for i in range(4)]), verl_style)
    nested = load_eval_prompts(_cfg(f"eval.path={verl_style}", "eval.answer_key=reward_model.ground_truth",
                                    "eval.num_prompts=0", "eval.interval=1"), tok)
    assert [p.record.label for p in nested] == ["9", "8", "7", "6"] and nested[0].record.metadata["data_source"] == "s"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"eval\.path.*bad\.jsonl"):
        load_eval_prompts(_cfg(f"eval.path={bad}", "eval.interval=1"), tok)


@pytest.mark.parametrize("override, message", [
    ("eval.interval=-1", r"eval.interval \(-1\) must be >= 0"),
    ("eval.n_samples=0", r"eval.n_samples \(0\) must be >= 1"),
    ("eval.n_samples=4", r"eval.n_samples \(4\) > 1 with eval.temperature 0"),
    ("eval.temperature=-1", r"eval.temperature \(-1.0\) must be a finite number >= 0"),
    ("eval.top_p=0", r"eval.top_p \(0.0\) must be in \(0, 1\]"),
    ("eval.top_k=0", r"eval.top_k \(0\) must be >= 1, or -1"),
    ("eval.num_prompts=0", r"eval.num_prompts must be >= 1 for generated toy tasks"),
])
def test_config_checks_name_the_field(override, message):
    with pytest.raises(Exception, match=message):
        _cfg(override)


def test_schedule_and_requests():
    cfg = _cfg("eval.interval=3", "train.steps=7", "eval.n_samples=4", "eval.temperature=0.7", "eval.top_k=5",
               "rollout.max_new_tokens=9", "rollout.stop=[END]")
    ev = Evaluation(cfg, [])
    assert [v for v in range(9) if ev.due(v)] == [0, 3, 6] and ev.due(7, final=True)  # 7: the final policy
    assert not Evaluation(_cfg(), []).due(0) and not Evaluation(_cfg(), []).due(7, final=True)  # interval 0: off
    with pytest.raises(Exception, match=r"train.steps=0 trains nothing; with eval.interval > 0 it evaluates"):
        _cfg("train.steps=0")
    with pytest.raises(Exception, match=r"train.steps must be >= 0, got -1"):
        _cfg("train.steps=-1", "eval.interval=1")
    assert _cfg("train.steps=0", "eval.interval=1").train.steps == 0

    class P:
        input_ids = [5, 6, 7]

    reqs = eval_requests(cfg, 3, [P(), P()])
    s = reqs[1].sampling
    assert (s.n, s.temperature, s.top_k, s.max_new_tokens, s.stop) == (4, 0.7, 5, 9, ["END"])
    assert reqs[0].sampling.sampling_seed != reqs[1].sampling.sampling_seed
    assert reqs[0].sampling.sampling_seed == eval_requests(cfg, 3, [P()])[0].sampling.sampling_seed  # resumable
    assert reqs[0].sampling.sampling_seed != eval_requests(cfg, 4, [P()])[0].sampling.sampling_seed
    train_seeds = {r.sampling.sampling_seed for r in make_requests(cfg, 3, 0, [P(), P()])}
    assert not train_seeds & {r.sampling.sampling_seed for r in reqs}  # not the rollout's seeds


def test_eval_records_truncate_on_resume_and_reach_tensorboard(tmp_path):
    from test_observability import _tb_scalars

    cfg = MetricsConfig(progress=False)
    with MetricWriter(str(tmp_path), cfg) as w:
        for s in range(4):
            if s % 2 == 0:
                w.write_eval({"step": s, "policy_version": s // 2, "eval/reward_mean": 0.1 * s})
            w.write({"step": s, "x": float(s)})
    with MetricWriter(str(tmp_path), cfg, start_step=2) as w:  # resumed at optimizer step 2
        w.write_eval({"step": 2, "policy_version": 1, "eval/reward_mean": 0.9})
        w.write({"step": 2, "x": 2.0})
    recs = read_metrics(str(tmp_path / "eval.jsonl"))
    assert [(r["step"], r["policy_version"], r["eval/reward_mean"]) for r in recs] == [(0, 0, 0.0), (2, 1, 0.9)]
    sc = _tb_scalars(tmp_path / "tb")
    assert sc["eval/reward_mean"] == [(0, 0.0), (2, pytest.approx(0.9))]
    assert "policy_version" not in sc  # kept in eval.jsonl, not mixed into the training curves
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]
