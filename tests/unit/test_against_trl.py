"""moe_rl.algorithms against TRL's GRPOTrainer / RLOOTrainer, by running TRL's own code.

TRL's source is read as text from the installed wheel (trl==1.16.0, installed with --no-deps:
`import trl` would need dependencies this project does not install). The functions and methods
used are cut out with `ast` (decorators included), and the blocks inside the long
`_generate_and_score_completions` between exact verbatim lines; they are exec'd against a fake
`self` (one process, no model: `_get_per_token_logps_and_entropies` returns our tensors). Nothing of
TRL is transcribed by hand, so a change in TRL's math shows up here.

Compared (float64 unless noted, deterministic data from seeded torch.Generators):
- advantages: GRPO `scale_rewards` group / batch / none against `grpo` (std_scope group / batch) and
  `dr_grpo`; RLOOTrainer with and without `normalize_advantages` against `rloo` (`rloo_normalize`);
  GRPO `multi_objective_aggregation="normalize_then_sum"` against `gdpo`;
- `GRPOTrainer._compute_loss`, value and gradient, for every `loss_type` of 1.16.0 (grpo, bnpo,
  dr_grpo, dapo, luspo, cispo, sapo, vespo), with `importance_sampling_level="sequence"` (GSPO,
  GSPO-token, LUSPO), the two-sided clip `delta`, the k3 KL in the loss and its bias correction,
  gradient accumulation over two micro-batches, and a float32 spot check;
- the vLLM importance-sampling correction: the four modes' ratios (with `clip_min`) against the
  `mismatch` weights, and the losses they enter;
- clip metrics (`clip_ratio/*`, `entropy`, `kl`, `cispo_clip_ratio`); VESPO's `get_gamma_weights`.
- DeepSeek-V3.2's off-policy sequence mask (`off_policy_mask_threshold`, `get_off_policy_mask`) against
  `off_policy_mask`, with the KL in the loss.
- the static entropy bonus (`entropy_coef`) against `entropy_coeff` under token-mean (dapo, bnpo), and
  `top_entropy_quantile` (`get_high_entropy_mask` in `_compute_loss`, with and without the bonus) against
  ours on one micro-batch, where TRL's current-policy entropies are our old-policy ones.
Not compared: `RLOOTrainer._compute_loss` (a PPO clip of the product of the token ratios, an
objective no project surrogate implements).

Known differences (the seven the cross-check script flagged, and those docs/algorithms.md states). None
is skipped: each is avoided by inputs under which both must agree, or asserted as the relation it implies.
1. `std_eps` is 1e-6 here, TRL adds 1e-4 (docs, axis 1): every advantage comparison passes 1e-4.
2. A group whose rewards all equal gets exactly 0 here (docs, axis 1); TRL's float32 group mean can round,
   and the rounding is divided by 1e-4: asserted exactly 0 here, and TRL within that noise bound.
3. GDPO's final whitening is `rsqrt(var + 1e-8)` here, `/ (std + 1e-4)` in TRL (docs, axis 1): asserted
   proportional, with a factor just above 1.
4. `dual_clip_c` is TRL's two-sided `delta` only for delta >= 1 + epsilon_high: compared there (boundary
   included); below it, asserted equal on the tokens whose ratio is <= delta and different on some other.
5. k3 is capped at 10 here (docs, axis 5): compared with every k3 below 4.4; with k3 = 16 on one response,
   its tokens get TRL's gradient without the KL, every other token TRL's with it.
6. Log-ratios are clamped to +-20 here (docs, notation): compared well inside; with one token at 25, our
   loss is TRL's with that token at 20, and that token alone has zero gradient here.
7. TRL's `vllm_importance_sampling_clip_min` with a truncate mode is our `tis_floor` (default 0, none):
   compared with clip_min unset and with it set to `tis_floor`.
8. TRL's bnpo divides by the micro-batch's own tokens and the accumulation steps, ours by the step's tokens:
   equal for micro-batches with equal token counts; otherwise ours reproduces TRL with num_global_tokens =
   local tokens * accumulation steps, and differs from it with the step's count.
9. TRL's `cispo_clip_ratio` counts the upper bound where A > 0 only, ours any A (docs, metrics): equal with
   every A > 0, TRL's smaller with mixed signs.
10. Metric aggregation: GSPO's TRL `clip_ratio/region_mean` is per sequence, compared with
   `actor/seq_clipfrac`; TRL's `kl` is a token mean, compared with `actor/kl_loss` under token-mean.
TRL's own precision, not differences: `torch.where` with Python scalars makes its SAPO temperatures and VESPO's
lambda floor float32 (1.05 and 1e-4 rounded), its `nanstd` multiplies by a float32 Bessel factor
count / (count - 1), and its sequence-level clip metrics are float32; the tests use float32-rounded values on
our side, sizes whose factor float32 holds exactly, or the tolerance that rounding explains. At delta =
1 + epsilon_high TRL's `clip_ratio/high_mean` reads 0 (it is counted on the delta-capped ratio), so the
metrics are compared only for delta above that.
"""

from __future__ import annotations

import ast
import collections
import functools
import importlib.metadata
import importlib.util
import math
import pathlib
import textwrap
import types
from typing import NamedTuple

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.advantages import gdpo_advantages, outcome_advantages
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.mismatch import mismatch_weights
from moe_rl.algorithms.policy_loss import vespo_is_log_weight, vespo_weights

TRL_VERSION = "1.16.0"
_PIP = f".venv/bin/python -m pip install --no-deps trl=={TRL_VERSION}"
# find_spec on a top-level name locates the package without importing it
_SPEC = importlib.util.find_spec("trl")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip(f"TRL's source is not installed; install it with: {_PIP}", allow_module_level=True)
TRL_TRAINER_DIR = pathlib.Path(list(_SPEC.submodule_search_locations)[0]) / "trainer"

D = torch.float64
TRL_STD_EPS = 1e-4  # TRL's hard-coded `std + 1e-4`
L_MAX = 8  # TRL max_completion_length / our max_response_len (longer than any response here)
TOL = 1e-14  # float64 comparisons of O(1) values: the measured differences are 0 or a few ulps (<= 4.5e-16)
SEEDS = (0, 1)


# ----------------------------------------------------------------------------- TRL's code, cut out of the wheel
def _cut_defs(src: str, names, cls: str | None = None) -> dict:
    """Source of the named module-level functions (or methods of `cls`), decorators included."""
    tree = ast.parse(src)
    body = tree.body if cls is None else next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    lines = src.splitlines()
    out = {}
    for n in body:
        if isinstance(n, ast.FunctionDef) and n.name in names:
            first = min([d.lineno for d in n.decorator_list] + [n.lineno])
            out[n.name] = textwrap.dedent("\n".join(lines[first - 1:n.end_lineno]))
    assert set(out) == set(names), f"not in TRL {TRL_VERSION}: {set(names) - set(out)}"
    return out


def _cut_block(src: str, first: str, last: str, *, include_last: bool = True, name: str = "block"):
    """Compiled verbatim lines from the one line equal to `first` (stripped) to the next equal to `last`."""
    lines = src.splitlines()
    starts = [k for k, line in enumerate(lines) if line.strip() == first]
    assert len(starts) == 1, f"TRL {TRL_VERSION}: {len(starts)} lines are {first!r}"
    i = starts[0]
    j = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == last)
    code = textwrap.dedent("\n".join(lines[i:j + 1 if include_last else j]))
    return compile(code, f"<trl {name}>", "exec")


@functools.lru_cache(maxsize=None)
def trl():
    """TRL's functions and blocks, built once."""
    text = {f: (TRL_TRAINER_DIR / f"{f}.py").read_text() for f in ("utils", "grpo_trainer", "rloo_trainer")}
    ns = {"torch": torch, "math": math}
    for name, code in _cut_defs(text["utils"], ["nanstd", "nanmin", "nanmax"]).items():
        exec(compile(code, f"<trl utils.{name}>", "exec"), ns)
    for name, code in _cut_defs(text["grpo_trainer"], ["_compute_loss", "get_gamma_weights", "get_off_policy_mask",
                                                         "get_high_entropy_mask"],
                                "GRPOTrainer").items():
        exec(compile(code, f"<trl GRPOTrainer.{name}>", "exec"), ns)
    grpo, rloo = text["grpo_trainer"], text["rloo_trainer"]
    return types.SimpleNamespace(
        ns=ns,
        advantages=_cut_block(grpo, "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
                              "advantages = torch.nan_to_num(advantages, nan=0.0)", name="GRPO advantages"),
        is_ratio=_cut_block(grpo, "mask = completion_mask if tool_mask is None else completion_mask * tool_mask",
                            "# Compute the per-token log probabilities for the reference model",
                            include_last=False, name="GRPO vLLM IS ratio"),
        rloo_advantages=_cut_block(rloo, "grouped_rewards = rewards.view(-1, num_generations)",
                                   "advantages = torch.nan_to_num(advantages, nan=0.0)", name="RLOO advantages"),
    )


class _OneProcess:
    """accelerate's Accelerator on one process: collectives are the identity."""
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _fake_trainer(**kw):
    """A GRPOTrainer `self` with TRL's defaults; keywords that are GRPOConfig fields read via `self.args` go there."""
    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                                 vespo_k_neg=3.0, vespo_lambda_neg=2.0, steps_per_generation=1)
    for k in [k for k in kw if hasattr(args, k)]:
        setattr(args, k, kw.pop(k))
    s = types.SimpleNamespace(
        args=args, accelerator=_OneProcess(), model=types.SimpleNamespace(training=True),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=0.0, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, entropy_coef=0.0, use_adaptive_entropy=False,
        _last_world_entropy=float("inf"), _entropy_window_stats=None, aux_loss_enabled=False, max_completion_length=None,
        get_gamma_weights=trl().ns["get_gamma_weights"], get_off_policy_mask=trl().ns["get_off_policy_mask"],
    )
    s.get_high_entropy_mask = types.MethodType(trl().ns["get_high_entropy_mask"], s)
    for k, v in kw.items():
        assert hasattr(s, k), f"not a GRPOTrainer attribute used here: {k}"
        setattr(s, k, v)
    return s


def trl_loss(logp, old, adv_B, mask, *, ref=None, is_ratio=None, entropies=None, num_items=None, sampling=None,
             **kw):
    """TRL's GRPOTrainer._compute_loss: (loss, gradient wrt logp, last value of each metric)."""
    lp = logp.detach().clone().requires_grad_(True)
    s = _fake_trainer(**kw)
    ent = torch.zeros_like(lp) if entropies is None else entropies
    s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.to(lp.dtype),
              "advantages": adv_B, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None else num_items)}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    loss = trl().ns["_compute_loss"](s, None, inputs)
    (g,) = torch.autograd.grad(loss, lp)
    return float(loss.detach()), g, {k: v[-1] for k, v in s._metrics["train"].items()}


def ours_loss(cfg, logp, old, adv_B, mask, *, n_tok=None, n_seq=None, ref=None, rollout=None, entropies=None):
    """moe_rl's actor_loss: (loss, gradient wrt logp, metrics); denominators default to this batch's."""
    lp = logp.detach().clone().requires_grad_(True)
    loss, met = actor_loss(cfg, lp, old, adv_B, mask.bool(),
                           num_global_tokens=float(mask.sum()) if n_tok is None else n_tok,
                           num_global_seqs=float(mask.shape[0]) if n_seq is None else n_seq,
                           ref_logp_BT=ref, rollout_logp_BT=rollout, entropy_BT=entropies)
    (g,) = torch.autograd.grad(loss, lp)
    return float(loss.detach()), g, met.compute()


def trl_is_ratio(old, sampling, mask, mode, clip_max, clip_min=None):
    """TRL's vLLM importance-sampling ratio: [B, T] for token modes, [B, 1] for sequence modes."""
    s = types.SimpleNamespace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                              vllm_importance_sampling_clip_min=clip_min)
    loc = {"self": s, "torch": torch, "math": math, "old_per_token_logps": old,
           "sampling_per_token_logps": sampling, "completion_mask": mask.to(old.dtype), "tool_mask": None}
    exec(trl().is_ratio, loc)
    return loc["vllm_importance_sampling_ratio"]


def trl_advantages(rewards_per_func, num_generations, scale_rewards="group", aggregation="sum_then_normalize"):
    """TRL's GRPO advantages [B] from rewards [B, K] (K reward functions, weights 1)."""
    K = rewards_per_func.shape[1]
    s = types.SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                              reward_weights=torch.ones(K), reward_funcs=[None] * K)
    loc = {"self": s, "torch": torch, "nanstd": trl().ns["nanstd"], "rewards_per_func": rewards_per_func,
           "device": "cpu", "num_generations": num_generations}
    exec(trl().advantages, loc)
    return loc["advantages"]


def trl_rloo_advantages(rewards_B, num_generations, normalize):
    s = types.SimpleNamespace(normalize_advantages=normalize)
    loc = {"self": s, "torch": torch, "nanstd": trl().ns["nanstd"], "rewards": rewards_B.clone(),
           "num_generations": num_generations}
    exec(trl().rloo_advantages, loc)
    return loc["advantages"]


def maxdiff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=D) - torch.as_tensor(b, dtype=D)).abs().max())


# ----------------------------------------------------------------------------- data
G = 4  # responses per prompt
# ties, and group 2 (rows 8..11) all equal; float32 as TRL's rewards_per_func
FIXED_REWARDS = [1, 0, 0, 1, 0.5, 0.5, 1, 0, 0.3, 0.3, 0.3, 0.3]


def make_data(seed=0, dtype=D, B=12, T=6, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[3], lens[5], lens[10] = T, 1, 0  # a full, a one-token and an empty response
    mask = torch.arange(T)[None] < lens[:, None]
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2.0 - 0.05
    logp = old + torch.randn(B, T, generator=g, dtype=dtype) * spread
    ref = old + torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    rollout = old + torch.randn(B, T, generator=g, dtype=dtype) * 0.4
    ent = torch.rand(B, T, generator=g, dtype=dtype)
    logp = torch.where(mask, logp, torch.full_like(logp, -3.0))  # finite garbage on padding: masking must hold
    # Inside the documented bounds, where no clamp of ours may act: |log-ratio| << 20, and
    # |logp - ref| < 2, so k3 = e^-x + x - 1 <= e^2 - 3 < 4.4, far below its cap 10.
    assert (logp - old)[mask].abs().max() < 5 and (old - rollout)[mask].abs().max() < 5
    assert (logp - ref)[mask].abs().max() < 2
    rewards = torch.tensor(FIXED_REWARDS, dtype=torch.float32)
    adv = trl_advantages(rewards.to(dtype)[:, None], G)  # per response, as TRL's trainer feeds its loss
    return types.SimpleNamespace(mask=mask, old=old, logp=logp, ref=ref, rollout=rollout, ent=ent, adv=adv,
                                 B=B, T=T)


def _random_rewards(seed, n):
    """Rewards in {0, 0.5, 1}: ties, possibly flat groups, and sums that float32 holds exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n,), generator=g).float() / 2


# TRL's nanstd applies Bessel's factor as count / (count - 1) of integer tensors: a float32 division, so in float64
# TRL's std carries a float32-rounded factor (relative error ~3e-8) unless the factor is exact in float32, as for
# groups of 5 (5/4) in a batch of 65 (65/64). The float64 comparisons use those sizes, the float32 ones TRL's usual.
ADV_CASES = [  # (id, rewards float32, group size, dtype, tolerance)
    ("fixed-G4-fp32", torch.tensor(FIXED_REWARDS, dtype=torch.float32), 4, torch.float32, 1e-6),
    ("random-G4-fp32", _random_rewards(7, 16), 4, torch.float32, 1e-6),
    ("random-G5-fp32", _random_rewards(11, 65), 5, torch.float32, 1e-6),
    ("random-G5-fp64", _random_rewards(11, 65), 5, D, TOL),
    ("random2-G5-fp64", _random_rewards(12, 65), 5, D, TOL),
]


def test_trl_version_is_the_one_compared():
    # The expectations below were measured against this release; bump it only after re-running them.
    assert importlib.metadata.version("trl") == TRL_VERSION


# ----------------------------------------------------------------------------- advantages
def _ones_mask(n):
    return torch.ones(n, 1, dtype=torch.bool)


@pytest.mark.parametrize("rid,rewards,g,dtype,tol", ADV_CASES, ids=[c[0] for c in ADV_CASES])
@pytest.mark.parametrize("scale_rewards,estimator,std_scope", [
    ("group", "grpo", "group"), ("batch", "grpo", "batch"), ("none", "dr_grpo", "group")])
def test_grpo_advantages(scale_rewards, estimator, std_scope, rid, rewards, g, dtype, tol):
    r = rewards.to(dtype)
    got = trl_advantages(r[:, None], g, scale_rewards)
    # documented difference 1: pass TRL's eps
    ours = outcome_advantages(estimator, r, torch.arange(len(r)) // g, _ones_mask(len(r)), std_eps=TRL_STD_EPS,
                              std_scope=std_scope)[0][:, 0]
    assert got.abs().max() > 0.1  # the rewards carry signal
    assert maxdiff(got, ours) <= tol


@pytest.mark.parametrize("rid,rewards,g,dtype,tol", ADV_CASES, ids=[c[0] for c in ADV_CASES])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages(normalize, rid, rewards, g, dtype, tol):
    r = rewards.to(dtype)
    got = trl_rloo_advantages(r, g, normalize)
    ours = outcome_advantages("rloo", r, torch.arange(len(r)) // g, _ones_mask(len(r)), rloo_normalize=normalize,
                              std_eps=TRL_STD_EPS)[0][:, 0]
    assert got.abs().max() > 0.1
    assert maxdiff(got, ours) <= tol


def test_flat_group_is_exactly_zero_trl_within_rounding():
    # Documented difference 2: six rewards 0.3 in float32; TRL's group mean rounds, and that rounding
    # is divided by (0 + 1e-4). Ours is exactly 0 there; elsewhere the two agree.
    r = torch.tensor([1, 0, 0.5, 1, 0, 0] + [0.3] * 6, dtype=torch.float32)
    gid = torch.arange(12) // 6
    got = trl_advantages(r[:, None], 6)
    ours = outcome_advantages("grpo", r, gid, _ones_mask(12), std_eps=TRL_STD_EPS)[0][:, 0]
    assert torch.equal(ours[6:], torch.zeros(6))
    # a few float32 ulps of the rewards' size, amplified by 1 / 1e-4
    noise_bound = 4 * torch.finfo(torch.float32).eps * float(r.abs().max()) / TRL_STD_EPS
    assert got[6:].abs().max() <= noise_bound
    assert maxdiff(got[:6], ours[:6]) <= 1e-6


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_gdpo_advantages_proportional_to_trl(seed):
    # Documented difference 3: the same per-reward normalization (std_eps=1e-4) and weighted sum, whitened with
    # rsqrt(var + 1e-8) here, divided by (std + 1e-4) in TRL: ours = c * TRL with one c, and
    # c = (std + 1e-4) / sqrt(std^2 + 1e-8) lies in (1, 1 + 1e-4 / std).
    # groups of 5 in a batch of 65: TRL's float32 Bessel factors are exact (see ADV_CASES)
    rk = torch.stack([_random_rewards(seed, 65), _random_rewards(seed + 100, 65)], dim=1).to(D)
    got = trl_advantages(rk, 5, aggregation="normalize_then_sum")
    ours = gdpo_advantages({"a": rk[:, 0], "b": rk[:, 1]}, {"a": 1.0, "b": 1.0}, torch.arange(65) // 5,
                           _ones_mask(65), std_eps=TRL_STD_EPS)[0][:, 0]
    assert got.abs().max() > 0.5
    c = float((ours * got).sum() / (got * got).sum())
    assert maxdiff(ours, c * got) <= TOL
    # c - 1 ~ 1e-4 / std, and the summed normalized rewards have a std of order 1
    assert 1 < c < 1 + 1e-3


# ----------------------------------------------------------------------------- losses and gradients
class Case(NamedTuple):
    trl: dict  # GRPOTrainer attributes / GRPOConfig fields
    cfg: dict  # AlgorithmConfig fields
    ref: bool = False  # KL in the loss: pass reference log-probs
    tol: float = TOL
    metrics: tuple = ()  # (TRL metric, ours, tolerance)


CLIP_METRICS = (("clip_ratio/low_mean", "actor/clipfrac_low", TOL),
                ("clip_ratio/high_mean", "actor/clipfrac_high", TOL),
                ("clip_ratio/region_mean", "actor/clipfrac", TOL), ("entropy", "actor/entropy", TOL))
# At sequence level TRL averages a float32 per-sequence flag over a float32 count: k/B rounded to float32 (< 3e-8)
SEQ_CLIP_METRICS = (("clip_ratio/region_mean", "actor/seq_clipfrac", 1e-7), ("entropy", "actor/entropy", TOL))
# TRL builds SAPO's temperatures with torch.where(cond, 1.0, 1.05): a float32 tensor, so its 1.05 is float32(1.05)
F32_1_05 = float(torch.tensor(1.05, dtype=torch.float32))

LOSS_CASES = {
    "grpo": Case(dict(loss_type="grpo"), dict(preset="grpo", kl_beta=0.0), metrics=CLIP_METRICS),
    "bnpo": Case(dict(loss_type="bnpo"), dict(preset="grpo", kl_beta=0.0, loss_agg="token-mean"),
                 metrics=CLIP_METRICS),
    "dr_grpo": Case(dict(loss_type="dr_grpo", max_completion_length=L_MAX),
                    dict(preset="dr_grpo", max_response_len=L_MAX), metrics=CLIP_METRICS),
    "dapo": Case(dict(loss_type="dapo", epsilon_high=0.28), dict(preset="dapo"), metrics=CLIP_METRICS),
    "grpo-clip-higher": Case(dict(loss_type="grpo", epsilon_low=0.1, epsilon_high=0.28),
                             dict(preset="grpo", kl_beta=0.0, clip_low=0.1, clip_high=0.28), metrics=CLIP_METRICS),
    # documented difference 4: delta >= 1 + epsilon_high, the boundary included. No metrics at the boundary: TRL
    # counts the high clip on the delta-capped ratio, which then never exceeds 1 + epsilon_high (it reads 0).
    "dapo-delta=1+eps_high": Case(dict(loss_type="dapo", epsilon_high=0.28, delta=1 + 0.28),
                                  dict(preset="dapo", dual_clip_c=1 + 0.28)),
    "dapo-delta=1.5": Case(dict(loss_type="dapo", delta=1.5), dict(preset="dapo", clip_high=0.2, dual_clip_c=1.5),
                           metrics=CLIP_METRICS),
    "dapo-delta=3": Case(dict(loss_type="dapo", epsilon_high=0.28, delta=3.0), dict(preset="dapo", dual_clip_c=3.0),
                         metrics=CLIP_METRICS),
    "grpo-k3": Case(dict(loss_type="grpo", beta=0.04), dict(preset="grpo"), ref=True),
    # token-mean on both sides, so TRL's token-mean `kl` metric is our actor/kl_loss
    "dapo-k3": Case(dict(loss_type="dapo", epsilon_high=0.28, beta=0.04), dict(preset="dapo", kl_beta=0.04),
                    ref=True, metrics=(("kl", "actor/kl_loss", TOL),)),
    "grpo-k3-bias-corrected": Case(dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
                                   dict(preset="grpo", kl_ratio_weighted=True), ref=True),
    # TRL's cispo epsilon_high is an absolute cap on the weight: ours clip_high = epsilon_high - 1
    "cispo-1.28": Case(dict(loss_type="cispo", epsilon_high=1.28), dict(preset="cispo", clip_high=0.28)),
    "cispo-5": Case(dict(loss_type="cispo", epsilon_high=5.0), dict(preset="cispo", clip_high=4.0)),
    "sapo-f32-tau": Case(dict(loss_type="sapo"), dict(preset="sapo", sapo_tau_neg=F32_1_05)),
    # our float64 1.05 against TRL's float32(1.05): |delta tau| / tau ~ 5e-8 bounds the loss difference (2e-8)
    "sapo-default": Case(dict(loss_type="sapo"), dict(preset="sapo"), tol=1e-7),
    "sapo-0.5/2": Case(dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
                       dict(preset="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0)),
    "vespo": Case(dict(loss_type="vespo"),
                  dict(preset="grpo", kl_beta=0.0, policy_loss="vespo", loss_agg="token-mean")),
    "vespo-k/lambda": Case(dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=0.5,
                                vespo_lambda_neg=4.0),
                           dict(preset="grpo", kl_beta=0.0, policy_loss="vespo", loss_agg="token-mean",
                                vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=0.5, vespo_lambda_neg=4.0)),
    "gspo-0.2": Case(dict(loss_type="grpo", importance_sampling_level="sequence"),
                     dict(preset="gspo", clip_low=0.2, clip_high=0.2), metrics=SEQ_CLIP_METRICS),
    "gspo": Case(dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
                 dict(preset="gspo"), metrics=SEQ_CLIP_METRICS),
    # with a per-response advantage, GSPO-token's value and gradient are GSPO's
    "gspo_token": Case(dict(loss_type="grpo", importance_sampling_level="sequence"),
                       dict(preset="gspo_token", clip_low=0.2, clip_high=0.2)),
    # LUSPO (new in the wheel): GSPO's sequence loss scaled by the length, mean over responses
    "luspo": Case(dict(loss_type="luspo", importance_sampling_level="sequence"),
                  dict(preset="gspo", clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-sum"),
                  metrics=SEQ_CLIP_METRICS),
    "luspo-token-level": Case(dict(loss_type="luspo"), dict(preset="grpo", kl_beta=0.0, loss_agg="seq-mean-token-sum"),
                              metrics=CLIP_METRICS),
}


def _run_both(case: Case, d):
    kw = dict(entropies=d.ent, ref=d.ref if case.ref else None)
    lt, gt, mt = trl_loss(d.logp, d.old, d.adv, d.mask, **kw, **case.trl)
    lo, go, mo = ours_loss(AlgorithmConfig(**case.cfg), d.logp, d.old, d.adv, d.mask, **kw)
    return (lt, gt, mt), (lo, go, mo)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_loss_value_and_gradient(name, seed):
    case = LOSS_CASES[name]
    (lt, gt, _), (lo, go, _) = _run_both(case, make_data(seed))
    assert gt.abs().max() > 1e-3  # a gradient to compare
    assert abs(lt - lo) <= case.tol, (lt, lo)
    assert maxdiff(gt, go) <= case.tol


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", [n for n, c in LOSS_CASES.items() if c.metrics])
def test_metrics(name, seed):
    case = LOSS_CASES[name]
    (_, _, mt), (_, _, mo) = _run_both(case, make_data(seed))
    for trl_name, our_name, tol in case.metrics:
        assert abs(mt[trl_name] - mo[our_name]) <= tol, (trl_name, mt[trl_name], our_name, mo.get(our_name))
    if case.metrics in (CLIP_METRICS, SEQ_CLIP_METRICS):
        assert mt["clip_ratio/region_mean"] > 0  # the data clips, so the counts are exercised
    if "clip_ratio/low_mean" in mt and case.metrics == CLIP_METRICS:
        assert mt["clip_ratio/low_mean"] > 0 and mt["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_dual_clip_binds_in_the_delta_cases(seed):
    # the delta comparisons above are only meaningful if the cap acts on some token
    d = make_data(seed)
    _, _, mo = ours_loss(AlgorithmConfig(**LOSS_CASES["dapo-delta=1+eps_high"].cfg), d.logp, d.old, d.adv, d.mask)
    assert mo["actor/dualclip_frac"] > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_delta_below_one_plus_eps_high(seed):
    # Documented difference 4: TRL's delta caps the ratio on both signs of A, our dual clip caps -A*rho where A < 0.
    # With delta < 1 + eps_high they differ on tokens with delta < rho <= 1 + eps_high, and agree (dapo's
    # token-mean loss separates per token) wherever rho <= delta.
    d = make_data(seed, spread=0.5)
    delta, eps_high = 1.1, 0.5
    _, gt, _ = trl_loss(d.logp, d.old, d.adv, d.mask, loss_type="dapo", epsilon_high=eps_high, delta=delta)
    _, go, _ = ours_loss(AlgorithmConfig(preset="dapo", clip_high=eps_high, dual_clip_c=delta),
                         d.logp, d.old, d.adv, d.mask)
    rho = torch.exp(d.logp - d.old)
    below = d.mask & (rho <= delta)
    between = d.mask & (rho > delta) & (rho <= 1 + eps_high) & (d.adv[:, None] != 0)
    assert between.any()
    assert maxdiff(gt[below], go[below]) <= TOL
    assert (gt[between] - go[between]).abs().max() > 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_cap(seed):
    # Documented difference 5: k3 = e^-x + x - 1 is capped at 10 here. With x = logp - ref = -3 on response 0
    # (k3 = e^3 - 4 = 16.1), the cap binds on its tokens: they get the policy gradient alone (TRL's with
    # beta = 0), every other token TRL's gradient with the KL (dapo's token-mean loss separates per token), and
    # the loss is TRL's less beta * (k3 - 10) for each of those tokens, over the token count.
    d = make_data(seed)
    beta = 0.04
    ref_far = d.ref.clone()
    ref_far[0] = d.logp[0] + 3.0
    m0 = d.mask[0]
    assert m0.any()
    kw = dict(loss_type="dapo", epsilon_high=0.28)
    lt, gt, _ = trl_loss(d.logp, d.old, d.adv, d.mask, beta=beta, ref=ref_far, **kw)
    _, gt_no_kl, _ = trl_loss(d.logp, d.old, d.adv, d.mask, **kw)
    # TRL's `kl` metric on response 0 alone: the mean of its tokens' k3
    _, _, row0 = trl_loss(d.logp[:1], d.old[:1], d.adv[:1], d.mask[:1], beta=beta, ref=ref_far[:1], **kw)
    lo, go, _ = ours_loss(AlgorithmConfig(preset="dapo", kl_beta=beta), d.logp, d.old, d.adv, d.mask, ref=ref_far)
    assert maxdiff(gt[1:], go[1:]) <= TOL
    assert maxdiff(gt_no_kl[0, m0], go[0, m0]) <= TOL
    assert (gt[0, m0] - go[0, m0]).abs().min() > 1e-6  # TRL's KL gradient does act there
    assert row0["kl"] > 10
    assert abs((lt - lo) - beta * float(m0.sum()) * (row0["kl"] - 10) / float(d.mask.sum())) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_log_ratio_clamp(seed):
    # Documented difference 6: every log-ratio is clamped to +-20. A token at 25 with A < 0 (the unclipped branch
    # -A*rho): our value is TRL's with that token at exactly 20, and it alone loses its gradient.
    d = make_data(seed)
    i = int(((d.adv < 0) & d.mask[:, 0]).nonzero()[0, 0])
    wild, at_bound = d.logp.clone(), d.logp.clone()
    wild[i, 0] = d.old[i, 0] + 25.0
    at_bound[i, 0] = d.old[i, 0] + 20.0
    kw = dict(loss_type="dapo", epsilon_high=0.28)
    lt_wild, gt_wild, _ = trl_loss(wild, d.old, d.adv, d.mask, **kw)
    lt_bound, _, _ = trl_loss(at_bound, d.old, d.adv, d.mask, **kw)
    lo, go, _ = ours_loss(AlgorithmConfig(preset="dapo"), wild, d.old, d.adv, d.mask)
    assert lo == pytest.approx(lt_bound, rel=TOL)
    assert lt_wild > 100 * lo  # TRL's exp(25)
    others = d.mask.clone()
    others[i, 0] = False
    assert maxdiff(gt_wild[others], go[others]) <= TOL
    assert go[i, 0] == 0 and gt_wild[i, 0] != 0


# ----------------------------------------------------------------------------- gradient accumulation
HALVES = (slice(0, 6), slice(6, 12))
GA_CASES = {
    "grpo": (dict(loss_type="grpo"), dict(preset="grpo", kl_beta=0.0)),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=L_MAX), dict(preset="dr_grpo", max_response_len=L_MAX)),
    # TRL's num_items_in_batch counts the generation batch, which spans steps_per_generation micro-batches
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28, steps_per_generation=2), dict(preset="dapo")),
    "bnpo": (dict(loss_type="bnpo"), dict(preset="grpo", kl_beta=0.0, loss_agg="token-mean")),
}


def _accumulate(d, mask, trl_kw, cfg, our_n_tok):
    """Two micro-batches summed, TRL (accumulation steps 2) and ours: (TRL loss, ours, TRL grad, our grad)."""
    tot_t = tot_o = 0.0
    g_t, g_o = torch.zeros_like(d.logp), torch.zeros_like(d.logp)
    for h in HALVES:
        lt, g_t[h], _ = trl_loss(d.logp[h], d.old[h], d.adv[h], mask[h], num_items=float(mask.sum()),
                                 current_gradient_accumulation_steps=2, **trl_kw)
        lo, g_o[h], _ = ours_loss(AlgorithmConfig(**cfg), d.logp[h], d.old[h], d.adv[h], mask[h],
                                  n_tok=our_n_tok(h), n_seq=float(d.B))
        tot_t, tot_o = tot_t + lt, tot_o + lo
    return tot_t, tot_o, g_t, g_o


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(GA_CASES))
def test_gradient_accumulation(name, seed):
    d = make_data(seed)
    mask = d.mask.clone()
    if name == "bnpo":
        # documented difference 8, avoided: equal token counts per micro-batch make TRL's local means the global one
        mask[6:] = mask[:6]
        assert mask[6:].sum() == mask[:6].sum()
    trl_kw, cfg = GA_CASES[name]
    tot_t, tot_o, g_t, g_o = _accumulate(d, mask, trl_kw, cfg, lambda h: float(mask.sum()))
    lt_one, _, _ = trl_loss(d.logp, d.old, d.adv, mask, **{k: v for k, v in trl_kw.items()
                                                            if k != "steps_per_generation"})
    assert abs(tot_t - lt_one) <= TOL  # TRL itself: two micro-batches give the one-batch loss
    assert abs(tot_t - tot_o) <= TOL
    assert maxdiff(g_t, g_o) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_bnpo_local_token_mean(seed):
    # Documented difference 8, asserted: with unequal micro-batches TRL's bnpo is not the step's token mean;
    # ours gives TRL's with num_global_tokens = the micro-batch's tokens * accumulation steps.
    d = make_data(seed)
    assert d.mask[HALVES[0]].sum() != d.mask[HALVES[1]].sum()
    trl_kw, cfg = GA_CASES["bnpo"]
    tot_t, tot_o, g_t, g_o = _accumulate(d, d.mask, trl_kw, cfg, lambda h: float(d.mask[h].sum()) * 2)
    assert abs(tot_t - tot_o) <= TOL
    assert maxdiff(g_t, g_o) <= TOL
    step_token_mean, _, _ = ours_loss(AlgorithmConfig(**cfg), d.logp, d.old, d.adv, d.mask)
    assert abs(tot_t - step_token_mean) > 1e-6


@pytest.mark.parametrize("name", ["dapo", "grpo"])
def test_float32(name):
    # TRL trains in float32 by default: the same loss and gradient to float32 rounding
    d = make_data(seed=1, dtype=torch.float32)
    trl_kw, cfg = {"dapo": (dict(loss_type="dapo", epsilon_high=0.28), dict(preset="dapo")),
                   "grpo": (dict(loss_type="grpo"), dict(preset="grpo", kl_beta=0.0))}[name]
    lt, gt, _ = trl_loss(d.logp, d.old, d.adv, d.mask, **trl_kw)
    lo, go, _ = ours_loss(AlgorithmConfig(**cfg), d.logp, d.old, d.adv, d.mask)
    assert abs(lt - lo) <= 1e-6
    assert maxdiff(gt, go) <= 1e-6


# ----------------------------------------------------------------------------- importance-sampling correction
IS_CAP = 1.3
IS_MODES = {  # TRL vllm_importance_sampling_mode -> our mismatch config, clip_max = IS_CAP
    "token_truncate": dict(mismatch="tis", tis_cap=IS_CAP),
    "token_mask": dict(mismatch="icepop", icepop_low=0.0, icepop_high=IS_CAP),
    "sequence_truncate": dict(mismatch="seq-tis", tis_cap=IS_CAP),
    "sequence_mask": dict(mismatch="seq-icepop", icepop_low=0.0, icepop_high=IS_CAP),
}


def _our_weights(d, kw):
    return mismatch_weights(d.old, d.rollout, d.mask, kw["mismatch"],
                            **{k: v for k, v in kw.items() if k != "mismatch"})[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", list(IS_MODES))
def test_is_ratio(mode, seed):
    d = make_data(seed)
    isr = trl_is_ratio(d.old, d.rollout, d.mask, mode, IS_CAP).expand(d.B, d.T)
    w = _our_weights(d, IS_MODES[mode])
    assert maxdiff(isr[d.mask], w[d.mask]) <= TOL
    # the cap or the band acts on some valid token
    acted = (isr == IS_CAP) if mode.endswith("truncate") else (isr == 0)
    assert (acted & d.mask).any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode,loss", [(m, l) for m in IS_MODES for l in ("dapo", "grpo")]
                         + [("token_truncate", "vespo"), ("token_mask", "vespo")])
def test_is_corrected_loss(mode, loss, seed):
    d = make_data(seed)
    isr = trl_is_ratio(d.old, d.rollout, d.mask, mode, IS_CAP)
    trl_kw = {"dapo": dict(loss_type="dapo", epsilon_high=0.28), "grpo": dict(loss_type="grpo"),
              "vespo": dict(loss_type="vespo")}[loss]
    cfg = {"dapo": dict(preset="dapo"), "grpo": dict(preset="grpo", kl_beta=0.0),
           "vespo": dict(preset="grpo", kl_beta=0.0, policy_loss="vespo", loss_agg="token-mean")}[loss]
    lt, gt, _ = trl_loss(d.logp, d.old, d.adv, d.mask, is_ratio=isr, use_vllm=True,
                         vllm_importance_sampling_correction=True, **trl_kw)
    lo, go, _ = ours_loss(AlgorithmConfig(**cfg, **IS_MODES[mode]), d.logp, d.old, d.adv, d.mask, rollout=d.rollout)
    assert abs(lt - lo) <= TOL
    assert maxdiff(gt, go) <= TOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode,ours", [("token_mask", "icepop"), ("sequence_mask", "seq-icepop")])
def test_is_mask_clip_min(mode, ours, seed):
    # TRL's clip_min with a mask mode is the lower end of our band
    d = make_data(seed)
    isr = trl_is_ratio(d.old, d.rollout, d.mask, mode, 2.0, 0.7).expand(d.B, d.T)
    w = _our_weights(d, dict(mismatch=ours, icepop_low=0.7, icepop_high=2.0))
    assert maxdiff(isr[d.mask], w[d.mask]) <= TOL
    assert ((isr == 0) & d.mask).any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode,ours", [("token_truncate", "tis"), ("sequence_truncate", "seq-tis")])
def test_is_truncate_clip_min(mode, ours, seed):
    # TRL's clip_min on the truncate modes is our tis_floor
    d = make_data(seed)
    isr = trl_is_ratio(d.old, d.rollout, d.mask, mode, 2.0, 0.8).expand(d.B, d.T)
    assert ((_our_weights(d, dict(mismatch=ours, tis_cap=2.0)) < 0.8) & d.mask).any()  # the floor acts
    w = _our_weights(d, dict(mismatch=ours, tis_cap=2.0, tis_floor=0.8))
    assert maxdiff(isr[d.mask], w[d.mask]) <= TOL


# ----------------------------------------------------------------------------- metrics with a documented relation
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eps_high", [1.28, 1.1])
def test_cispo_clip_ratio(eps_high, seed):
    # Documented difference 9: TRL counts rho > eps_high where A > 0, ours any A (our lower bound is 0 here)
    d = make_data(seed, spread=0.5)
    cfg = AlgorithmConfig(preset="cispo", clip_high=eps_high - 1)
    for adv, relation in ((d.adv.abs() + 0.1, "equal"), (d.adv, "at most")):
        _, _, mt = trl_loss(d.logp, d.old, adv, d.mask, loss_type="cispo", epsilon_high=eps_high)
        _, _, mo = ours_loss(cfg, d.logp, d.old, adv, d.mask)
        assert mo["actor/clipfrac_high"] > 0
        if relation == "equal":
            assert abs(mt["cispo_clip_ratio"] - mo["actor/clipfrac_high"]) <= TOL
        else:
            assert mt["cispo_clip_ratio"] < mo["actor/clipfrac_high"]


# ----------------------------------------------------------------------------- VESPO's phi
VESPO_PARAMS = [
    (dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0), TOL),
    # lambda_pos = 0 is floored at 1e-4, which TRL's float32 tensor holds as 1e-4 - 2.5e-12: phi then differs by
    # phi * |1 - w| * 2.5e-12, measured 5.4e-11 on these ratios
    (dict(k_pos=1.0, lambda_pos=0.0, k_neg=0.5, lambda_neg=5.0), 1e-10),
]


@pytest.mark.parametrize("is_mode", [None, "token_truncate", "token_mask"])
@pytest.mark.parametrize("params,tol", VESPO_PARAMS, ids=["default", "lambda-floor"])
def test_vespo_phi(params, tol, is_mode):
    d = make_data(0)
    g = torch.Generator().manual_seed(3)
    lr = torch.randn(d.B, d.T, generator=g, dtype=D) * 0.6
    lr[0, :] = 30.0  # beyond the per-token clamp and, summed, beyond the sequence clamp
    lr[1, :] = -30.0
    lr = torch.where(d.mask, lr, torch.full_like(lr, 7.0))  # garbage on padding
    adv = torch.randn(d.B, generator=g, dtype=D)
    adv[2] = 0.0  # A = 0 takes the A >= 0 branch
    isr = None if is_mode is None else trl_is_ratio(d.old, d.rollout, d.mask, is_mode, IS_CAP)
    got = trl().ns["get_gamma_weights"](adv[:, None], lr, d.mask.to(D), isr, **params)[:, 0]
    log_is = None
    if is_mode is not None:
        log_is = vespo_is_log_weight(_our_weights(d, IS_MODES[is_mode]), d.mask, per_sequence=False)
    ours = vespo_weights(lr, adv, d.mask, **params, log_is_B=log_is)
    assert got.max() > 0.1 and (got < 1e-6).any()  # both ends of phi are exercised
    assert maxdiff(got, ours) <= tol


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("delta", [0.02, 0.15])
def test_off_policy_sequence_mask(delta, seed):
    """TRL's OPSM (keep a response when A >= 0 or mean(sampling_logp - logp) <= delta) on the
    surrogate, the k3 KL added after it, against ``off_policy_mask``."""
    d = make_data(seed)
    # the sampler further from the current policy response by response: mean KLs spread over the deltas
    sampling = d.rollout + torch.linspace(0.0, 0.6, d.B, dtype=d.rollout.dtype)[:, None]
    kw = dict(entropies=d.ent, ref=d.ref)
    lt, gt, _ = trl_loss(d.logp, d.old, d.adv, d.mask, sampling=sampling, off_policy_mask_threshold=delta,
                         beta=0.04, **kw)
    lo, go, mo = ours_loss(AlgorithmConfig(preset="grpo", kl_beta=0.04, off_policy_mask=delta), d.logp, d.old, d.adv,
                           d.mask, rollout=sampling, **kw)
    lu, _, _ = ours_loss(AlgorithmConfig(preset="grpo", kl_beta=0.04), d.logp, d.old, d.adv, d.mask, **kw)
    assert abs(lt - lo) <= 1e-14 and maxdiff(gt, go) <= 1e-14
    # the mask acts on this data (some responses dropped), and not on all negative-advantage ones
    n_neg = int(((d.adv.flatten() < 0) & d.mask.any(-1)).sum())
    dropped = round(mo["mismatch/opsm_masked_frac"] * d.B)
    assert lo != lu and 0 < dropped < n_neg, (dropped, n_neg)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type,cfg", [("dapo", dict(preset="dapo")),
                                           ("bnpo", dict(preset="grpo", kl_beta=0.0, loss_agg="token-mean"))])
def test_entropy_bonus(loss_type, cfg, seed):
    """TRL's static entropy bonus (`entropy_coef`, loss -= coef * token mean of H) against `entropy_coeff`
    under token-mean, where TRL's token mean and our aggregation are the same; value and the gradients
    wrt the log-probs and the entropies. (TRL's bonus is a token mean whatever the loss type; ours is
    aggregated like the policy loss, as verl's: the two differ under the sequence-mean modes.)"""
    d = make_data(seed)
    coef = 0.05
    kw = dict(entropy_coef=coef, _entropy_bonus_enabled=True)
    if loss_type == "dapo":
        kw["epsilon_high"] = 0.28
    lp = d.logp.detach().clone().requires_grad_(True)
    ent_t = d.ent.detach().clone().requires_grad_(True)
    s = _fake_trainer(loss_type=loss_type, **kw)
    s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent_t, None)
    B, T_ = d.mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T_, dtype=torch.long), "completion_mask": d.mask.to(D),
              "advantages": d.adv, "old_per_token_logps": d.old, "num_items_in_batch": torch.tensor(float(d.mask.sum()))}
    theirs = trl().ns["_compute_loss"](s, None, inputs)
    ent_o = d.ent.detach().clone().requires_grad_(True)
    lo = d.logp.detach().clone().requires_grad_(True)
    ours, _ = actor_loss(AlgorithmConfig(**cfg, entropy_coeff=coef), lo, d.old, d.adv, d.mask.bool(),
                         num_global_tokens=float(d.mask.sum()), num_global_seqs=float(B), entropy_BT=ent_o)
    assert abs(float(theirs) - float(ours)) <= TOL
    gt = torch.autograd.grad(theirs, (lp, ent_t))
    go = torch.autograd.grad(ours, (lo, ent_o))
    assert gt[1].abs().max() > 1e-3  # the bonus has a gradient to compare
    assert maxdiff(gt[0], go[0]) <= TOL and maxdiff(gt[1], go[1]) <= TOL
    assert s._metrics["train"]["entropy_coef"][-1] == coef



def _trl_loss_with_entropies(loss_type, d, ent, **kw):
    """TRL's _compute_loss with `ent` as the entropies (a leaf): (loss, grad wrt logp, grad wrt ent, trainer)."""
    lp = d.logp.detach().clone().requires_grad_(True)
    ent_t = ent.detach().clone().requires_grad_(True)
    s = _fake_trainer(loss_type=loss_type, **kw)
    s._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent_t, None)
    B, T_ = d.mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T_, dtype=torch.long), "completion_mask": d.mask.to(D),
              "advantages": d.adv, "old_per_token_logps": d.old, "ref_per_token_logps": d.ref,
              "num_items_in_batch": torch.tensor(float(d.mask.sum()))}
    loss = trl().ns["_compute_loss"](s, None, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent_t), allow_unused=True)
    return float(loss), g_lp, g_ent, s


def _ours_with_entropies(cfg, d, ent, keep):
    lo = d.logp.detach().clone().requires_grad_(True)
    ent_o = ent.detach().clone().requires_grad_(True)
    loss, met = actor_loss(cfg, lo, d.old, d.adv, d.mask.bool(), num_global_tokens=float(d.mask.sum()),
                           num_global_seqs=float(d.mask.shape[0]), ref_logp_BT=d.ref, entropy_BT=ent_o,
                           entropy_keep_BT=keep)
    g_lp, g_ent = torch.autograd.grad(loss, (lo, ent_o), allow_unused=True)
    return float(loss), g_lp, g_ent, met.compute()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("q", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("loss_type,cfg", [("grpo", dict(preset="grpo", kl_beta=0.04)),
                                           ("dapo", dict(preset="dapo", kl_beta=0.04))])
def test_top_entropy_quantile(loss_type, cfg, q, seed):
    """TRL's high-entropy mask (the 1 - q quantile of the valid tokens' entropies, torch.quantile) in its
    loss, the KL on every token, against top_entropy_quantile with the mask from entropy_select; the
    entropies are float32 values, as TRL casts them before its quantile. Then the entropy bonus on the
    kept tokens: TRL divides it by the kept tokens, ours by the step's tokens (every mask here leaves
    the denominators alone): asserted as that relation, and equal at q = 1 under token-mean."""
    from moe_rl.algorithms.entropy_select import entropy_threshold, high_entropy_mask

    d = make_data(seed)
    ent = d.ent.float().double()
    m = d.mask.bool()
    keep = high_entropy_mask(ent, m, entropy_threshold(ent[m], q))
    kw = dict(top_entropy_quantile=q, beta=0.04, **(dict(epsilon_high=0.28) if loss_type == "dapo" else {}))
    lt, gt, _, s = _trl_loss_with_entropies(loss_type, d, ent, **kw)
    assert torch.equal(keep, s.get_high_entropy_mask(ent, d.mask, 1 - q))
    lo, go, _, met = _ours_with_entropies(AlgorithmConfig(**cfg, top_entropy_quantile=q), d, ent, keep)
    assert abs(lt - lo) <= TOL and maxdiff(gt, go) <= TOL
    if q == 1.0:
        assert "actor/entropy_kept_frac" not in met and keep.sum() == m.sum()
    else:
        assert met["actor/entropy_kept_frac"] == pytest.approx(float(keep.sum()) / float(m.sum()), abs=1e-15)
        assert 0 < met["actor/entropy_kept_frac"] < 1
    if loss_type != "dapo":
        return
    coef = 0.05
    lt_b, gt_b, gte_b, _ = _trl_loss_with_entropies(loss_type, d, ent, entropy_coef=coef, _entropy_bonus_enabled=True,
                                                    **kw)
    lo_b, go_b, goe_b, met_b = _ours_with_entropies(
        AlgorithmConfig(**cfg, top_entropy_quantile=q, entropy_coeff=coef), d, ent, keep)
    n_kept, n_tok = float(keep.sum()), float(m.sum())
    assert abs((lt_b - lt) * n_kept - (lo_b - lo) * n_tok) <= 1e-13
    assert maxdiff(gte_b * n_kept, goe_b * n_tok) <= 1e-13 and gte_b.abs().max() > 1e-3
    assert maxdiff(gt_b, go_b) <= TOL  # the bonus does not touch the log-prob gradient
    assert met_b["actor/entropy_loss"] == pytest.approx(float((ent * keep).sum()) / n_tok, rel=1e-14)
