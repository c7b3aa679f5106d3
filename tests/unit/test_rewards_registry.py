"""Registry of reward callables, the config, and batched evaluation of named rewards."""

import textwrap

import pytest
import torch

from moe_rl.config.loader import load_config
from moe_rl.rewards import BUILTIN, RewardConfig, RewardEvaluator, RewardInput, RewardSpec, resolve_reward
from moe_rl.rewards.countdown import countdown_reward
from moe_rl.rewards.evaluator import RewardError


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        import asyncio
        def length_penalty(sample, *, per_char=0.01):
            return -per_char * len(sample.response)
        class Scorer:
            @staticmethod
            def exact(sample):
                return float(sample.response.strip() == str(sample.label))
        async def async_exact(sample):
            await asyncio.sleep(0)
            return float(sample.response.strip() == str(sample.label))
        def broken(sample):
            raise RuntimeError("boom")
        def nan(sample):
            return float("nan")
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    resolve_reward.cache_clear()
    yield "my_rewards_mod"
    resolve_reward.cache_clear()


def test_builtins_resolve():
    assert resolve_reward("countdown") is countdown_reward
    for name in BUILTIN:
        assert callable(resolve_reward(name))


def test_module_function(user_module):
    fn = resolve_reward(f"{user_module}:length_penalty")
    assert fn(RewardInput(response="abcd"), per_char=0.5) == -2.0
    assert resolve_reward(f"{user_module}:Scorer.exact")(RewardInput(response=" 7", label=7)) == 1.0


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("my_rewards_mod:missing", "has no attribute 'missing'"),
    ("my_rewards_mod:NOT_CALLABLE", "is a int, not a callable"),
    ("mathh", "neither a built-in"),
    (":f", "empty module"),
])
def test_bad_paths(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


def test_config_errors_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="executor='gpu'"):
        RewardConfig(executor="gpu")
    with pytest.raises(ValueError, match="repeated: a"):
        RewardConfig(rewards=[RewardSpec(name="a"), RewardSpec(name="a", fn="format")])
    y = tmp_path / "r.yaml"
    y.write_text("rewards:\n  - {name: acc, fn: math, weight: 1.0}\n  - {name: fmt, fn: format, weight: 0.5,"
                 " kwargs: {require_boxed: true}}\nnum_workers: 2\n")
    cfg = load_config(RewardConfig, y, ["sandbox.cpu_time_s=2"])
    assert [r.name for r in cfg.rewards] == ["acc", "fmt"]
    assert cfg.rewards[1].kwargs == {"require_boxed": True}
    assert cfg.weights == {"acc": 1.0, "fmt": 0.5} and cfg.sandbox.cpu_time_s == 2


def _samples():
    return [
        RewardInput(response=r"<think>2+2</think> \boxed{4}", label="4"),
        RewardInput(response=r"\boxed{5}", label="4"),
        RewardInput(response=r"<think>x</think> \boxed{\frac{2}{4}}", label="0.5"),
    ]


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_multi_reward_batch(executor, user_module):
    cfg = RewardConfig(rewards=[RewardSpec(name="acc", fn="math"),
                                RewardSpec(name="fmt", fn="format", weight=0.5),
                                RewardSpec(name="len", fn=f"{user_module}:length_penalty", weight=2.0,
                                           kwargs={"per_char": 0.001})],
                       executor=executor, num_workers=3, progress=False)
    samples = _samples()
    with RewardEvaluator(cfg) as ev:
        batch = ev.evaluate(samples)
    acc, fmt = [1.0, 0.0, 1.0], [1.0, 0.0, 1.0]
    length = [-0.001 * len(s.response) for s in samples]
    assert [v["acc"] for v in batch.values] == acc
    assert [v["fmt"] for v in batch.values] == fmt
    assert [v["len"] for v in batch.values] == pytest.approx(length)
    t = batch.by_name()
    assert set(t) == {"acc", "fmt", "len"} and t["acc"].dtype == torch.float32
    expected = torch.tensor([a + 0.5 * f + 2.0 * n for a, f, n in zip(acc, fmt, length)])
    torch.testing.assert_close(batch.total(), expected)


def test_process_executor_and_async(user_module, monkeypatch):
    # Process workers import the user module by name, so it must be on their path too.
    monkeypatch.setenv("PYTHONPATH", str(__import__("sys").path[0]))
    cfg = RewardConfig(rewards=[RewardSpec(name="acc", fn="math"),
                                RewardSpec(name="exact", fn=f"{user_module}:async_exact")],
                       executor="process", num_workers=1, progress=False)
    samples = _samples()[:2] + [RewardInput(response="4", label="4")]
    with RewardEvaluator(cfg) as ev:
        batch = ev.evaluate(samples)
    assert [v["acc"] for v in batch.values] == [1.0, 0.0, 1.0]
    assert [v["exact"] for v in batch.values] == [0.0, 0.0, 1.0]


def test_errors_raise_or_score_zero(user_module):
    specs = [RewardSpec(name="b", fn=f"{user_module}:broken"), RewardSpec(name="n", fn=f"{user_module}:nan")]
    with pytest.raises(RewardError, match="reward 'b' .* failed on sample 0: RuntimeError: boom"):
        RewardEvaluator(RewardConfig(rewards=specs, progress=False)).evaluate([RewardInput(response="x")])
    ev = RewardEvaluator(RewardConfig(rewards=specs, on_error="zero", progress=False, executor="serial"))
    batch = ev.evaluate([RewardInput(response="x")] * 2)
    assert batch.values == [{"b": 0.0, "n": 0.0}] * 2
    assert "boom" in batch.errors[1]["b"] and "nan" in batch.errors[0]["n"]
    assert [sorted(e) for e in batch.errors] == [["b", "n"], ["b", "n"]]
    with pytest.raises(ValueError, match="cannot import"):
        RewardEvaluator(RewardConfig(rewards=[RewardSpec(name="x", fn="nope_mod:f")]))


def test_raise_names_the_first_failing_sample_whatever_finishes_first(user_module, tmp_path):
    """Process workers finish in any order; on_error=raise still names the first failure in
    input order (sample 0's slow error, not sample 1's fast one)."""
    (tmp_path / "slow_fail_mod.py").write_text(textwrap.dedent("""
        import time
        def fail(sample):
            if sample.response == "slow":
                time.sleep(1.0)
            raise RuntimeError(f"failed on {sample.response}")
    """))
    cfg = RewardConfig(rewards=[RewardSpec(name="f", fn="slow_fail_mod:fail")], progress=False, num_workers=2)
    with RewardEvaluator(cfg) as ev, pytest.raises(RewardError, match="failed on sample 0: .*failed on slow"):
        ev.evaluate([RewardInput(response="slow"), RewardInput(response="fast")])
