"""moe_rl.algorithms against verl 0.9.1's own functions, run on the same float64 tensors.

verl cannot be imported without its dependencies (ray, omegaconf, transformers, ...), so the
functions are taken out of the installed wheel's source by name (``ast.get_source_segment``,
which leaves the registry decorators behind) and run as written in a namespace holding torch,
numpy and stand-ins for verl's config objects (``AlgoConfig``, ``ActorConfig``: dicts with
attribute access) and for its metric helpers (``compute_is_metrics``, ``compute_rs_metrics``).
Sources: ``verl/trainer/ppo/core_algos.py``, ``verl/utils/torch_functional.py`` (the masked
reductions), ``verl/trainer/ppo/rollout_corr_helper.py``.

Compared (values, and gradients wrt logp wherever there is one), in float64 with rtol = atol =
1e-9: what is left is verl's ``/(n + 1e-8)`` in its masked means (rtol 2e-8 under
seq-mean-token-mean, where n is one response's length); every measured gap is under 2/3 of its
tolerance, and a relative 1e-8 perturbation of ours fails the comparisons it touches:
- advantages: grpo, dr_grpo, rloo, reinforce_pp (gamma 1 and 0.9, also with an interior mask
  hole), reinforce_pp_baseline, opo, gpg, pass_at_k, each (reinforce_pp_baseline: see below) also
  with the KL in the reward (verl ``compute_rewards``); ``compute_advantages``; gdpo (one reward,
  named rewards);
- surrogates and their clip metrics: ppo with dual clip under every aggregation, gspo and
  gspo_token (two aggregations), gmpo, cispo (open and closed lower bound), sapo, pg (verl gpg);
- aggregation: every mode with global batch info on one rank and on 2 dp ranks x 2 micro-batches,
  and verl's fallback without global info;
- KL estimators k1/k2/k3/abs under each of verl's names, and their straight-through "+" forms;
  the KL-in-reward penalty;
- mismatch correction: tis, seq-tis, icepop, seq-icepop, seq-mis against verl's rollout IS
  weights and rejection masks;
- ``actor_loss`` under whole configs against verl's composition (policy loss with the rollout IS
  weights, plus kl_loss_coef x agg_loss(kl_penalty), as ``verl/workers/utils/losses.py``
  ``ppo_loss`` composes them; that function itself needs TensorDict plumbing and is not run).

Documented differences (docs/algorithms.md) and how each is handled, none skipped:
- a group of one: grpo and rloo give 0, verl r_i / (1 + 1e-6) and r_i: asserted row by row;
  opo, gpg, reinforce_pp_baseline agree with verl there and are compared.
- a group whose rewards all equal: ours exactly 0, verl the rounding of its mean over std_eps:
  compared exactly on a group whose mean is exact (dyadic rewards), and on 0.1 x 3 ours is
  asserted 0 and verl bounded by that rounding.
- gmpo clip metrics: verl counts every token outside the band by A's sign, ours only those whose
  clipped value was taken; asserted verl = ours + the out-of-band tokens on the other side.
- gmpo's loss: verl takes torch.mean over responses whatever the mode: compared with
  seq-mean-token-mean and N_seq = B (the empty response adds 0 to both). sapo: verl forces
  seq-mean-token-mean, so only that mode is compared.
- icepop band: verl's rollout_rs "token_k1" "a_b" bands pi_rollout / pi_old = 1/w, i.e. our
  [1/b, 1/a]: asserted for several bands, "0.5_5.0" (our [0.2, 2], not [0.5, 5]) among them;
  verl 0.9.1's rollout_is "lo_hi" (IcePop on w itself) is compared with the same band directly.
  seq-mis likewise against seq_mean_k1 with the inverted band.
- verl's agg_loss without global info counts only non-empty responses in N_seq, ours every
  response: asserted verl x N_nonempty = ours x N_seq, and equality on a batch without an empty one.
- reinforce_pp_baseline with the KL in the reward: ours is OpenRLHF's (the penalty summed from t
  on, A varies along the response), verl subtracts each response's summed penalty from r_i before
  the group mean: asserted verl(r, penalty) = ours(r_i - sum_t penalty, no penalty), and that verl
  is constant along each response while ours is not.
- gdpo's final whitening: verl weighs tokens, ours responses: compared on one-token responses,
  where both weightings coincide. verl's named-reward path casts rewards to float32, so that one
  comparison is held to float32 tolerances.
- opo on a group whose responses are all empty: verl divides 0 by 0 (NaN on those rows), ours
  gives 0: the other rows are compared, and both behaviours asserted.
- pass_at_k on a group of one: verl raises ValueError, ours gives 0: both asserted.

Where verl 0.9.1 differs from the January-2026 verl main these comparisons were first run
against, and from what docs/algorithms.md says of verl:
- seq-mean-token-sum-norm: the docs say verl's value is N_seq x ours (verl then divided by the
  length only); 0.9.1 divides by global_batch_size as well, so the two are now equal and that is
  what is asserted.
- reinforce_pp with an interior mask hole: the docs say verl restarts the return at every masked
  position; 0.9.1 carries it through unchanged, as ours does, so the hole is now compared exactly.
- the "+" KL names raised NotImplementedError and were emulated; 0.9.1 computes them, so verl's
  own kl_penalty is called. GSPO now honours loss_agg_mode, so two modes are compared. verl now
  has gdpo and agg_loss "token-sum", both compared.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import math
import os
import types
from collections import defaultdict
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.advantages import compute_advantages, gdpo_advantages, outcome_advantages
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.kl import kl_estimate, reward_penalty
from moe_rl.algorithms.mismatch import mismatch_weights
from moe_rl.algorithms.policy_loss import policy_loss

VERL_VERSION = "0.9.1"
PIP = f"pip install --no-deps verl=={VERL_VERSION}"

SPEC = importlib.util.find_spec("verl")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip(f"verl wheel not installed ({PIP})", allow_module_level=True)
if importlib.metadata.version("verl") != VERL_VERSION:
    # the asserted relations are those of this release (several changed between releases)
    pytest.skip(f"compared against verl {VERL_VERSION}, found {importlib.metadata.version('verl')} ({PIP})",
                allow_module_level=True)
VERL_DIR = list(SPEC.submodule_search_locations)[0]
CORE_ALGOS = os.path.join(VERL_DIR, "trainer", "ppo", "core_algos.py")
TORCH_FUNCTIONAL = os.path.join(VERL_DIR, "utils", "torch_functional.py")
ROLLOUT_CORR = os.path.join(VERL_DIR, "trainer", "ppo", "rollout_corr_helper.py")

D = torch.float64
# verl's masked means divide by n + 1e-8: measured gaps stay below 7e-10; anything real is far larger
TOL = dict(rtol=1e-9, atol=1e-9)
# seq-mean-token-mean: verl divides each response by (len + 1e-8), a relative 1e-8 on a one-token response
TOL_SEQ = dict(rtol=2e-8, atol=1e-9)
# float32 computations: verl's gdpo named-reward path (np.float32 rewards, float32 group statistics)
TOL_F32 = dict(rtol=1e-6, atol=1e-6)


def tol_for(agg):
    return TOL_SEQ if agg == "seq-mean-token-mean" else TOL


def close(ours, theirs, tol=TOL, msg=""):
    torch.testing.assert_close(torch.as_tensor(ours, dtype=D), torch.as_tensor(theirs, dtype=D), **tol,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


# ---------------------------------------------------------------------------------------------
# verl's own code, taken out of the wheel


class _AttrDict(dict):
    """verl's functions read their config with .attr and .get."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


class AlgoConfig(_AttrDict):
    """verl.trainer.config.AlgoConfig stand-in."""


class ActorConfig(_AttrDict):
    """verl.workers.config.ActorConfig stand-in; not an AlgoConfig, as verl's policy losses assert."""


def _definitions(path: str, names: set[str]) -> list[str]:
    """Source of the top-level functions/classes/assignments ``names`` of ``path``, in file order.

    ``get_source_segment`` of a def starts at ``def``: the registry decorators (register_adv_est,
    register_policy_loss) stay behind, which is all they would do here."""
    text = open(path).read()
    found: dict[str, str] = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if name in names:
            found[name] = ast.get_source_segment(text, node)
    missing = names - found.keys()
    assert not missing, f"verl {VERL_VERSION} {path} no longer defines {sorted(missing)}"
    return list(found.values())


CORE_FNS = {
    "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage", "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage", "compute_grpo_passk_outcome_advantage", "compute_gdpo_outcome_advantage",
    "compute_rewards", "agg_loss", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
    "compute_policy_loss_sapo", "compute_policy_loss_gpg", "compute_policy_loss_geo_mean",
    "compute_policy_loss_cispo", "kl_penalty", "kl_penalty_forward", "AdaptiveKLController",
}
ROLLOUT_FNS = {
    "SAFETY_BOUND", "SUPPORTED_ROLLOUT_RS_OPTIONS", "TOKEN_LEVEL_ROLLOUT_RS_OPTIONS", "_parse_rollout_is_threshold",
    "_parse_rollout_rs_thresholds", "compute_rollout_rejection_mask", "compute_rollout_correction_weights",
}


@pytest.fixture(scope="module")
def verl():
    """verl's functions by name, exec'd once from the wheel's source."""
    verl_F = types.ModuleType("verl_F")
    verl_F.__dict__.update(torch=torch)
    for seg in _definitions(TORCH_FUNCTIONAL, {"masked_sum", "masked_mean", "masked_var", "masked_whiten"}):
        exec(seg, verl_F.__dict__)
    ns: dict[str, Any] = dict(
        torch=torch, np=np, math=math, verl_F=verl_F, defaultdict=defaultdict, Optional=Optional, Any=Any,
        Callable=Callable, AlgoConfig=AlgoConfig, ActorConfig=ActorConfig, DictConfig=dict,
    )
    for seg in _definitions(CORE_ALGOS, CORE_FNS):
        exec(seg, ns)
    for seg in _definitions(ROLLOUT_CORR, ROLLOUT_FNS):
        exec(seg, ns)
    # metric helpers only: the weights and masks do not depend on them
    ns["compute_is_metrics"] = lambda **kw: {}
    ns["compute_rs_metrics"] = lambda **kw: {}
    return types.SimpleNamespace(**{k: v for k, v in ns.items() if k in CORE_FNS | ROLLOUT_FNS})


@pytest.fixture(autouse=True)
def float64_default():
    """verl makes some constants in the default dtype (gpg's alpha = bsz / count, a lone response's
    mean 0 and std 1 via torch.tensor(1.0)): float32 there would round them and hide the comparison
    behind 1e-7 noise, so both sides run with float64 as the default here."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(prev)


# ---------------------------------------------------------------------------------------------
# data: one fixed batch with ragged, interleaved groups, an empty response and reward ties

B, T = 12, 6
LENS = [6, 3, 1, 5, 6, 2, 4, 0, 6, 6, 3, 5]  # row 7 is empty
GROUP_IDS = [0, 0, 1, 0, 1, 1, 2, 1, 2, 2, 1, 2]  # sizes 3, 5, 4
# group 0 binary with a top tie; group 1 a tie below a distinct top; group 2 all distinct
REWARDS = [1.0, 0.0, 0.7, 1.0, 0.7, 0.2, 0.3, 0.0, 0.9, 0.1, 0.9, 0.5]
N_TOK, N_SEQ = float(sum(LENS)), float(B)
GBI = dict(dp_size=1, batch_num_tokens=N_TOK, global_batch_size=N_SEQ, loss_scale_factor=None)


def token_level(r: torch.Tensor, lens: torch.Tensor, T_: int) -> torch.Tensor:
    """verl's reward manager puts the score at valid_len - 1 (an empty response: index -1, the last)."""
    tl = torch.zeros(r.numel(), T_, dtype=r.dtype)
    last = torch.where(lens > 0, lens - 1, torch.full_like(lens, T_ - 1))
    tl[torch.arange(r.numel()), last] = r
    return tl


@pytest.fixture
def bt():
    g = torch.Generator().manual_seed(20260)
    lens = torch.tensor(LENS)
    mask = torch.arange(T)[None] < lens[:, None]
    x = types.SimpleNamespace(lens=lens, mask=mask, maskf=mask.to(D), gids=torch.tensor(GROUP_IDS),
                              idx=np.array(GROUP_IDS), r=torch.tensor(REWARDS, dtype=D))
    base = torch.randn(B, T, generator=g, dtype=D) * 0.3 - 1.0
    x.old = base + torch.randn(B, T, generator=g, dtype=D) * 0.25
    x.old[2, 0] = base[2, 0] + 3.0  # ratio e^-3: below every band
    x.old[3, 1] = base[3, 1] - 2.0  # ratio e^2: above every band
    x.old[1, 1] = base[1, 1] - 1.5  # ratio e^1.5 > 3 where A < 0: the dual clip binds
    x.logp = base.clone().requires_grad_(True)
    x.ref = base + torch.randn(B, T, generator=g, dtype=D) * 0.7
    x.ref[0, 0] = base[0, 0] + 25.0  # x = -25: k3's +-20 clamp and its value clamp at 10 both bind
    x.ref[0, 1] = base[0, 1] + 4.0  # x = -4: only the value clamp binds (e^4 - 5 > 10)
    x.ref[0, 2] = base[0, 2] - 25.0  # x = +25: the +-20 clamp and the value clamp
    x.roll = x.old + torch.randn(B, T, generator=g, dtype=D) * 0.4
    x.roll[1, 0] = x.old[1, 0] - 1.2  # w = e^1.2: inside [0.5, 5], outside [0.2, 2]
    x.roll[4, 0] = x.old[4, 0] + 1.0  # w = e^-1: below 0.5
    x.roll[5, 1] = x.old[5, 1] - 1.8  # w = e^1.8: above 5
    x.log_ratio = x.old - x.roll  # verl's log(pi_old / pi_rollout) = log w
    x.tl = token_level(x.r, lens, T)
    x.pen = reward_penalty(x.old, x.ref, mask, beta=0.05)
    x.adv, _ = outcome_advantages("grpo", x.r, x.gids, mask)
    return x


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


# ---------------------------------------------------------------------------------------------
# advantages

ADV_CASES = {
    "grpo": ("grpo", {}, "compute_grpo_outcome_advantage", dict(norm_adv_by_std_in_grpo=True)),
    "dr_grpo": ("dr_grpo", {}, "compute_grpo_outcome_advantage", dict(norm_adv_by_std_in_grpo=False)),
    "rloo": ("rloo", {}, "compute_rloo_outcome_advantage", {}),
    "reinforce_pp": ("reinforce_pp", dict(gamma=1.0), "compute_reinforce_plus_plus_outcome_advantage",
                     dict(config=AlgoConfig(gamma=1.0))),
    "reinforce_pp_g0.9": ("reinforce_pp", dict(gamma=0.9), "compute_reinforce_plus_plus_outcome_advantage",
                          dict(config=AlgoConfig(gamma=0.9))),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", {}, "compute_reinforce_plus_plus_baseline_outcome_advantage",
                              dict(config=AlgoConfig())),
    "opo": ("opo", {}, "compute_opo_outcome_advantage", {}),
    "gpg": ("gpg", {}, "compute_gpg_outcome_advantage", {}),
    "pass_at_k": ("pass_at_k", {}, "compute_grpo_passk_outcome_advantage",
                  dict(config=AlgoConfig(norm_adv_by_std_in_grpo=True))),
}
# the index is passed to every estimator but REINFORCE++ (which takes none)
NO_INDEX = {"compute_reinforce_plus_plus_outcome_advantage"}


def _verl_adv(verl, fn, tl, maskf, idx, kw):
    extra = {} if fn in NO_INDEX else dict(index=idx)
    adv, _ = getattr(verl, fn)(token_level_rewards=tl.clone(), response_mask=maskf, **extra, **kw)
    return adv


@pytest.mark.parametrize("case,kl_in_reward", [
    (case, kl) for case in ADV_CASES for kl in (False, True)
    # with the KL in the reward reinforce_pp_baseline differs as documented: test_reinforce_pp_baseline_kl_in_reward
    if not (kl and case == "reinforce_pp_baseline")
])
def test_outcome_advantages(verl, bt, case, kl_in_reward):
    est, ours_kw, fn, verl_kw = ADV_CASES[case]
    pen = bt.pen if kl_in_reward else None
    # verl: per-token score - beta * (old - ref), on valid tokens
    tl = verl.compute_rewards(bt.tl, bt.old, bt.ref, 0.05) * bt.maskf if kl_in_reward else bt.tl
    ours, _ = outcome_advantages(est, bt.r, bt.gids, bt.mask, token_penalty_BT=pen, **ours_kw)
    theirs = _verl_adv(verl, fn, tl, bt.maskf, bt.idx, verl_kw)
    assert ours.abs().max() > 0.1  # a comparison of zeros would prove nothing
    close(ours, theirs)


def test_reinforce_pp_interior_mask_hole(verl, bt):
    """docs/algorithms.md says verl restarts the return at a masked position; 0.9.1 carries it over
    the hole unchanged (for multi-turn observation spans), as ours does: equal now."""
    mask = bt.mask.clone()
    mask[0, 2] = mask[9, 1] = False
    ours, _ = outcome_advantages("reinforce_pp", bt.r, bt.gids, mask, gamma=0.9)
    theirs = _verl_adv(verl, "compute_reinforce_plus_plus_outcome_advantage", bt.tl, mask.to(D), bt.idx,
                       dict(config=AlgoConfig(gamma=0.9)))
    close(ours, theirs)


def test_reinforce_pp_baseline_kl_in_reward(verl, bt):
    """Documented difference: verl subtracts each response's summed penalty from r_i before the
    group mean, ours (OpenRLHF) subtracts the group mean of the outcome rewards, then the penalty
    summed from t on. So verl with the penalty = ours on the rewards r_i - P_i without one."""
    tl = verl.compute_rewards(bt.tl, bt.old, bt.ref, 0.05) * bt.maskf
    theirs = _verl_adv(verl, "compute_reinforce_plus_plus_baseline_outcome_advantage", tl, bt.maskf, bt.idx,
                       dict(config=AlgoConfig()))
    ours_shifted, _ = outcome_advantages("reinforce_pp_baseline", bt.r - bt.pen.sum(-1), bt.gids, bt.mask)
    close(ours_shifted, theirs)
    ours, _ = outcome_advantages("reinforce_pp_baseline", bt.r, bt.gids, bt.mask, token_penalty_BT=bt.pen)
    row = bt.lens == T  # full-length responses: the penalty varies along them

    def spread(a):  # per response: max - min over its tokens
        return (a.masked_fill(~bt.mask, -1e9).amax(-1) + a.masked_fill(~bt.mask, 1e9).amin(-1).neg())[row]

    assert (spread(theirs) < 1e-12).all()
    assert (spread(ours) > 1e-4).all()


def test_compute_advantages_dispatch(verl, bt):
    ours, _ = compute_advantages(AlgorithmConfig(preset="grpo"), bt.r, bt.gids, bt.mask)
    close(ours, _verl_adv(verl, "compute_grpo_outcome_advantage", bt.tl, bt.maskf, bt.idx, {}))


@pytest.mark.parametrize("est,fn", [
    ("grpo", "compute_grpo_outcome_advantage"), ("rloo", "compute_rloo_outcome_advantage"),
    ("opo", "compute_opo_outcome_advantage"), ("gpg", "compute_gpg_outcome_advantage"),
    ("reinforce_pp_baseline", "compute_reinforce_plus_plus_baseline_outcome_advantage"),
])
def test_group_of_one(verl, est, fn):
    """Documented difference for grpo and rloo (ours 0, verl r/(1 + 1e-6) and r); the others keep
    baseline 0 for a lone response, as verl."""
    gids = torch.tensor([0, 0, 1, 0, 2, 2])  # group 1 is a single response
    r = torch.tensor([0.3, 0.8, 0.6, 0.1, 0.2, 0.9], dtype=D)
    mask = torch.ones(6, 3, dtype=torch.bool)
    ours, _ = outcome_advantages(est, r, gids, mask)
    theirs = _verl_adv(verl, fn, token_level(r, torch.full((6,), 3), 3), mask.to(D), gids.numpy(),
                       dict(config=AlgoConfig()))
    lone = gids == 1
    if est in ("grpo", "rloo"):
        close(ours[~lone], theirs[~lone])
        assert (ours[lone] == 0).all()
        close(theirs[lone], r[lone, None].expand(-1, 3) / (1 + 1e-6 if est == "grpo" else 1.0))
    else:
        close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_reward_group(verl, dtype):
    """Documented difference: ours gives an all-equal group exactly 0; verl gives the rounding of
    its group mean divided by std_eps. Where the mean is exact (dyadic rewards) they agree exactly."""
    gids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.4, 0.375, 0.375, 0.375, 0.375], dtype=dtype)
    mask = torch.ones(10, 2, dtype=torch.bool)
    ours, _ = outcome_advantages("grpo", r, gids, mask)
    theirs = _verl_adv(verl, "compute_grpo_outcome_advantage", token_level(r, torch.full((10,), 2), 2),
                       mask.to(dtype), gids.numpy(), {})
    tol = TOL if dtype == D else TOL_F32
    close(ours[3:], theirs[3:], tol)
    assert (theirs[6:] == 0).all() and (ours[:3] == 0).all() and (ours[6:] == 0).all()
    # 0.1 x 3: verl's mean is off by at most a few ulps of 0.1, then divided by std_eps = 1e-6
    eps = torch.finfo(dtype).eps
    assert theirs[:3].abs().max() <= 4 * eps * 0.1 / 1e-6


def test_opo_all_empty_group(verl):
    """verl's OPO baseline of a group whose responses are all empty is 0/0 (NaN on those rows);
    ours is 0. The other group is compared."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    gids = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    ours, _ = outcome_advantages("opo", r, gids, mask)
    theirs = _verl_adv(verl, "compute_opo_outcome_advantage", token_level(r, mask.sum(-1), 3), mask.to(D),
                       gids.numpy(), {})
    close(ours[:2], theirs[:2])
    assert (ours[2:] == 0).all() and torch.isnan(theirs[2:]).all()


def test_pass_at_k_group_of_one(verl):
    """verl refuses a group of one for pass@k; ours gives it 0."""
    with pytest.raises(ValueError, match="at least 2"):
        verl.compute_grpo_passk_outcome_advantage(token_level_rewards=torch.ones(1, 2, dtype=D),
                                                  response_mask=torch.ones(1, 2, dtype=D), index=np.array([0]),
                                                  config=AlgoConfig(norm_adv_by_std_in_grpo=True))
    ours, _ = outcome_advantages("pass_at_k", torch.ones(1, dtype=D), torch.zeros(1, dtype=torch.long),
                                 torch.ones(1, 2, dtype=torch.bool))
    assert (ours == 0).all()


def _gdpo_batch(seed):
    g = torch.Generator().manual_seed(seed)
    gids = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 1, 3, 3, 0, 2, 3, 1, 2])  # sizes 4, 5, 4, 3
    # one token per response: verl's token-weighted whitening and ours per response coincide
    return gids, torch.ones(gids.numel(), 1, dtype=torch.bool), g


def test_gdpo_one_reward(verl):
    gids, mask, g = _gdpo_batch(1)
    r = torch.rand(gids.numel(), generator=g, dtype=D)
    ours, _ = gdpo_advantages({"r": r}, {"r": 1.0}, gids, mask)
    theirs, _ = verl.compute_gdpo_outcome_advantage(token_level_rewards=r[:, None].clone(), response_mask=mask.to(D),
                                                    index=gids.numpy())
    close(ours, theirs)


def test_gdpo_named_rewards(verl):
    """verl's per-reward path (non_tensor_batch + gdpo_reward_keys/weights) runs in float32:
    dyadic rewards and weights keep the inputs exact, the statistics carry float32 rounding."""
    gids, mask, g = _gdpo_batch(2)
    n = gids.numel()
    # dyadic values: exact in float32, and an all-equal group has an exact mean (0 on both sides)
    acc = torch.randint(0, 2, (n,), generator=g).to(D)
    fmt = torch.randint(0, 5, (n,), generator=g).to(D) / 4
    P = 3
    ours, _ = gdpo_advantages({"acc": acc, "fmt": fmt}, {"acc": 1.0, "fmt": 0.5}, gids, mask)
    theirs, _ = verl.compute_gdpo_outcome_advantage(
        token_level_rewards=(acc + fmt)[:, None].clone(), response_mask=mask.to(D), index=gids.numpy(),
        config=AlgoConfig(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5]),
        non_tensor_batch={"acc": acc.numpy(), "fmt": fmt.numpy()},
        batch={"prompts": torch.zeros(n, P), "attention_mask": torch.ones(n, P + 1, dtype=torch.long)},
    )
    close(ours, theirs, TOL_F32)
    # the named path really weighed the rewards: the plain sum gives something else
    plain, _ = gdpo_advantages({"s": acc + fmt}, {"s": 1.0}, gids, mask)
    assert (plain - ours).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# surrogates and their clip metrics


def actor_cfg(**kw):
    base = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                global_batch_info=dict(GBI), tau_pos=1.0, tau_neg=1.05)
    return ActorConfig(base, **kw)


CL = dict(clip_low=0.2, clip_high=0.28)
GSPO_CL = dict(clip_low=3e-4, clip_high=4e-4)
# id: (ours surrogate, its kwargs, verl fn, verl config overrides, aggregation, {our metric: verl metric})
LOSS_CASES = {
    **{f"ppo_dual3-{agg}": ("ppo", dict(CL, dual_clip_c=3.0), "compute_policy_loss_vanilla", {}, agg,
                            {"clipfrac": "pg_clipfrac", "dualclip_frac": "pg_clipfrac_lower"})
       for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")},
    **{f"{kind}-{agg}": (kind, GSPO_CL, "compute_policy_loss_gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
                         agg, {"clipfrac": "pg_clipfrac"})
       for kind in ("gspo", "gspo_token") for agg in ("seq-mean-token-mean", "token-mean")},
    # verl's geo_mean ignores the mode (torch.mean over responses) = seq-mean-token-mean with N_seq = B
    "gmpo": ("gmpo", dict(clip_low=0.4, clip_high=0.4), "compute_policy_loss_geo_mean",
             dict(clip_ratio_low=0.4, clip_ratio_high=0.4), "seq-mean-token-mean", {}),
    "cispo": ("cispo", dict(clip_low=1.0, clip_high=0.28), "compute_policy_loss_cispo",
              dict(clip_ratio_low=1.0, clip_ratio_high=0.28), "token-mean", {"clipfrac": "pg_clipfrac"}),
    "cispo_low0.2": ("cispo", CL, "compute_policy_loss_cispo", {}, "token-mean", {"clipfrac": "pg_clipfrac"}),
    # verl's sapo forces seq-mean-token-mean
    "sapo": ("sapo", dict(CL, sapo_tau_pos=1.0, sapo_tau_neg=1.05), "compute_policy_loss_sapo", {},
             "seq-mean-token-mean", {"clipfrac": "pg_clipfrac"}),
    "pg-vs-gpg": ("pg", CL, "compute_policy_loss_gpg", {}, "token-mean", {}),
}


def ours_metrics(out, mask):
    n = mask.sum().to(D)
    return {
        "clipfrac": ((out.clip_low_BT | out.clip_high_BT) & mask).sum() / n,
        "clipfrac_low": (out.clip_low_BT & mask).sum() / n,
        "clipfrac_high": (out.clip_high_BT & mask).sum() / n,
        "dualclip_frac": (out.dualclip_BT & mask).sum() / n,
    }


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_policy_loss(verl, bt, case):
    kind, ours_kw, fn, verl_kw, agg, metric_map = LOSS_CASES[case]
    out = policy_loss(kind, bt.logp, bt.old, bt.adv, bt.mask, **ours_kw)
    ours = aggregate(out.loss_BT, bt.mask, agg, num_global_tokens=N_TOK, num_global_seqs=N_SEQ, max_response_len=T)
    theirs, vm = getattr(verl, fn)(old_log_prob=bt.old, log_prob=bt.logp, advantages=bt.adv, response_mask=bt.maskf,
                                   loss_agg_mode=agg, config=actor_cfg(**verl_kw))
    close(ours, theirs, tol_for(agg))
    close(grad(ours, bt.logp), grad(theirs, bt.logp), tol_for(agg))
    om = ours_metrics(out, bt.mask)
    for ours_name, verl_name in metric_map.items():
        close(om[ours_name], vm[f"actor/{verl_name}"], msg=f"{ours_name} vs verl {verl_name}")
    if kind not in ("sapo", "pg"):
        assert om["clipfrac"] > 0  # the data reaches the clip
    if kind == "ppo":
        assert om["dualclip_frac"] > 0


def test_gmpo_clip_metrics(verl, bt):
    """Documented difference: verl's GMPO counts every out-of-band token by A's sign, ours only
    those whose clipped value was taken (above the band for A > 0, below it for A < 0)."""
    lo = hi = 0.4
    out = policy_loss("gmpo", bt.logp, bt.old, bt.adv, bt.mask, clip_low=lo, clip_high=hi)
    _, vm = verl.compute_policy_loss_geo_mean(old_log_prob=bt.old, log_prob=bt.logp, advantages=bt.adv,
                                              response_mask=bt.maskf,
                                              config=actor_cfg(clip_ratio_low=lo, clip_ratio_high=hi))
    om = ours_metrics(out, bt.mask)
    d = (bt.logp - bt.old).detach()
    n = bt.mask.sum().to(D)
    below = ((d < -lo) & (bt.adv > 0) & bt.mask).sum() / n  # out of band on the side not taken for A > 0
    above = ((d > hi) & (bt.adv < 0) & bt.mask).sum() / n
    assert below > 0 and above > 0
    close(vm["actor/pg_clipfrac"], om["clipfrac_high"] + below)
    close(vm["actor/pg_clipfrac_lower"], om["clipfrac_low"] + above)


# ---------------------------------------------------------------------------------------------
# aggregation

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")


def _ours_agg(L, mask, mode, n_seq=N_SEQ):
    return aggregate(L, mask, mode, num_global_tokens=N_TOK, num_global_seqs=n_seq, max_response_len=T)


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_global(verl, bt, mode):
    """One rank with verl's global batch info; then 2 dp ranks x 2 micro-batches: ours sums the
    shares, verl scales each rank's loss by dp_size and the gradient reduction averages ranks.
    seq-mean-token-sum-norm: equal in 0.9.1 (docs/algorithms.md's N_seq factor was older verl's)."""
    L = torch.randn(B, T, generator=torch.Generator().manual_seed(7), dtype=D)
    close(_ours_agg(L, bt.mask, mode), verl.agg_loss(L, bt.maskf, mode, **GBI), tol_for(mode))
    parts = [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    ours = sum(_ours_agg(L[p], bt.mask[p], mode) for p in parts)
    per_rank = [sum(verl.agg_loss(L[p], bt.maskf[p], mode, dp_size=2, batch_num_tokens=N_TOK,
                                  global_batch_size=N_SEQ) for p in ps) for ps in (parts[:2], parts[2:])]
    close(ours, sum(per_rank) / 2, tol_for(mode))


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_without_global_info(verl, bt, mode):
    """verl's fallback counts the micro-batch's non-empty responses as N_seq, ours every response
    (docs/algorithms.md, axis 4): verl x N_nonempty = ours x N_seq; equal without an empty one."""
    L = torch.randn(B, T, generator=torch.Generator().manual_seed(8), dtype=D)
    ours, theirs = _ours_agg(L, bt.mask, mode), verl.agg_loss(L, bt.maskf, mode)
    if mode.startswith("seq-mean"):
        n_nonempty = float((bt.lens > 0).sum())
        assert n_nonempty < N_SEQ
        close(theirs * n_nonempty, ours * N_SEQ, tol_for(mode))
    else:
        close(ours, theirs)
    keep = bt.lens > 0
    ours_kept = _ours_agg(L[keep], bt.mask[keep], mode, n_seq=float(keep.sum()))
    close(ours_kept, verl.agg_loss(L[keep], bt.maskf[keep], mode), tol_for(mode))


# ---------------------------------------------------------------------------------------------
# KL


@pytest.mark.parametrize("straight_through", [False, True], ids=["plain", "straight_through"])
@pytest.mark.parametrize("ours_name,verl_name", [
    ("k1", "k1"), ("k1", "kl"), ("k2", "k2"), ("k2", "mse"), ("k3", "k3"), ("k3", "low_var_kl"), ("abs", "abs"),
])
def test_kl_estimator(verl, bt, ours_name, verl_name, straight_through):
    ours = kl_estimate(bt.logp, bt.ref, ours_name, straight_through=straight_through) * bt.maskf
    theirs = verl.kl_penalty(bt.logp, bt.ref, verl_name + ("+" if straight_through else "")) * bt.maskf
    close(ours, theirs)
    close(grad(ours.sum(), bt.logp), grad(theirs.sum(), bt.logp))


def test_kl_in_reward_penalty(verl, bt):
    theirs = verl.compute_rewards(torch.zeros(B, T, dtype=D), bt.old, bt.ref, 0.05) * bt.maskf
    close(-bt.pen, theirs)


# ---------------------------------------------------------------------------------------------
# rollout (training-inference mismatch) correction


def _is(verl, bt, level, threshold):
    return verl.compute_rollout_correction_weights(bt.log_ratio, bt.maskf, rollout_is=level,
                                                   rollout_is_threshold=threshold)[0]


def _rs(verl, bt, option, spec):
    return verl.compute_rollout_rejection_mask(bt.log_ratio, bt.maskf, rollout_rs=option, rollout_rs_threshold=spec)[0]


@pytest.mark.parametrize("mode,kw,level,threshold", [
    ("tis", dict(tis_cap=2.0), "token", 2.0),
    ("seq-tis", dict(tis_cap=2.0), "sequence", 2.0),
    ("icepop", dict(icepop_low=0.5, icepop_high=5.0), "token", "0.5_5.0"),
    ("seq-icepop", dict(icepop_low=0.5, icepop_high=5.0), "sequence", "0.5_5.0"),
    ("seq-icepop", dict(icepop_low=0.05, icepop_high=2.0), "sequence", "0.05_2.0"),
])
def test_mismatch_vs_rollout_is(verl, bt, mode, kw, level, threshold):
    ours, _ = mismatch_weights(bt.old, bt.roll, bt.mask, mode, **kw)
    theirs = _is(verl, bt, level, threshold)
    close(ours, theirs)
    if "icepop" in mode:  # the band both keeps and drops something
        assert (ours[bt.mask] == 0).any() and (ours[bt.mask] > 0).any()


@pytest.mark.parametrize("a,b", [(0.5, 5.0), (0.2, 2.0), (0.8, 1.25)])
def test_icepop_band_vs_token_k1(verl, bt, a, b):
    """Documented: verl's rollout_rs token_k1 "a_b" bands -log w, i.e. ours [1/b, 1/a]."""
    keep = _rs(verl, bt, "token_k1", f"{a}_{b}")
    ours, _ = mismatch_weights(bt.old, bt.roll, bt.mask, "icepop", icepop_low=1 / b, icepop_high=1 / a)
    close((ours > 0).to(D), keep)
    assert (keep[bt.mask] == 0).any() and (keep[bt.mask] == 1).any()
    # with IS: IS(token, 1/a) * RS(token_k1, "a_b") = icepop [1/b, 1/a]
    close(ours, _is(verl, bt, "token", 1 / a) * keep)


@pytest.mark.parametrize("lo,hi", [(0.5, 2.0), (0.8, 2.0), (0.9, 1.05)])
def test_seq_mis_vs_seq_mean_k1(verl, bt, lo, hi):
    """seq_mean_k1 "a_b" bands -mean log w, so ours [lo, hi] is verl's "1/hi_1/lo"."""
    ours, _ = mismatch_weights(bt.old, bt.roll, bt.mask, "seq-mis", seq_mis_low=lo, seq_mis_high=hi)
    keep = _rs(verl, bt, "seq_mean_k1", f"{1 / hi}_{1 / lo}")
    close(ours, keep)
    assert (keep[bt.mask] == 0).any() and (keep[bt.mask] == 1).any()


def test_seq_icepop_vs_is_times_seq_sum_k1(verl, bt):
    """seq-icepop [0.5, 5] = IS(sequence, 5) * RS(seq_sum_k1, "0.2_2.0") (the inverted band)."""
    ours, _ = mismatch_weights(bt.old, bt.roll, bt.mask, "seq-icepop", icepop_low=0.5, icepop_high=5.0)
    close(ours, _is(verl, bt, "sequence", 5.0) * _rs(verl, bt, "seq_sum_k1", "0.2_2.0"))


# ---------------------------------------------------------------------------------------------
# the whole actor loss

# id: (our config, verl policy loss, verl config overrides, aggregation, verl IS (level, threshold), verl KL name, coef)
ACTOR_CASES = {
    "grpo+dual3": (dict(preset="grpo", dual_clip_c=3.0), "compute_policy_loss_vanilla", dict(clip_ratio_high=0.2),
                   "seq-mean-token-mean", None, "low_var_kl", 0.04),
    "grpo+k3_straight_through": (dict(preset="grpo", dual_clip_c=3.0, kl_straight_through=True),
                                 "compute_policy_loss_vanilla", dict(clip_ratio_high=0.2), "seq-mean-token-mean", None,
                                 "k3+", 0.04),
    "grpo+k2+tis": (dict(preset="grpo", dual_clip_c=3.0, kl_estimator="k2", mismatch="tis"),
                    "compute_policy_loss_vanilla", dict(clip_ratio_high=0.2), "seq-mean-token-mean", ("token", 2.0),
                    "mse", 0.04),
    "dr_grpo": (dict(preset="dr_grpo", max_response_len=T, dual_clip_c=3.0), "compute_policy_loss_vanilla",
                dict(clip_ratio_high=0.2), "seq-mean-token-sum-norm", None, None, 0.0),
    "dapo+tis": (dict(preset="dapo", dual_clip_c=3.0, mismatch="tis"), "compute_policy_loss_vanilla", {}, "token-mean",
                 ("token", 2.0), None, 0.0),
    "gspo+seq-tis": (dict(preset="gspo", mismatch="seq-tis"), "compute_policy_loss_gspo",
                     dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4), "seq-mean-token-mean", ("sequence", 2.0), None,
                     0.0),
    "gspo_token+seq-icepop": (dict(preset="gspo_token", mismatch="seq-icepop", icepop_low=0.05, icepop_high=2.0),
                              "compute_policy_loss_gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
                              "seq-mean-token-mean", ("sequence", "0.05_2.0"), None, 0.0),
    "cispo+icepop": (dict(preset="cispo", mismatch="icepop"), "compute_policy_loss_cispo",
                     dict(clip_ratio_low=1.0, clip_ratio_high=0.28), "token-mean", ("token", "0.5_5.0"), None, 0.0),
    "gmpo+icepop": (dict(preset="gmpo", mismatch="icepop"), "compute_policy_loss_geo_mean",
                    dict(clip_ratio_low=0.4, clip_ratio_high=0.4), "seq-mean-token-mean", ("token", "0.5_5.0"), None,
                    0.0),
    "sapo": (dict(preset="sapo"), "compute_policy_loss_sapo", {}, "seq-mean-token-mean", None, None, 0.0),
    "gpg": (dict(preset="gpg"), "compute_policy_loss_gpg", {}, "token-mean", None, None, 0.0),
}


@pytest.mark.parametrize("case", list(ACTOR_CASES))
def test_actor_loss(verl, bt, case):
    ours_cfg, fn, verl_kw, agg, is_spec, kl_name, coef = ACTOR_CASES[case]
    cfg = AlgorithmConfig(**ours_cfg)
    assert cfg.loss_agg == agg and (cfg.kl_beta if cfg.kl_placement == "loss" else 0.0) == coef
    ours, _ = actor_loss(cfg, bt.logp, bt.old, bt.adv, bt.mask, num_global_tokens=N_TOK, num_global_seqs=N_SEQ,
                         ref_logp_BT=bt.ref, rollout_logp_BT=bt.roll if cfg.mismatch != "none" else None)
    is_w = _is(verl, bt, *is_spec) if is_spec else None
    theirs, _ = getattr(verl, fn)(old_log_prob=bt.old, log_prob=bt.logp, advantages=bt.adv, response_mask=bt.maskf,
                                  loss_agg_mode=agg, config=actor_cfg(**verl_kw), rollout_is_weights=is_w)
    if kl_name:
        theirs = theirs + coef * verl.agg_loss(verl.kl_penalty(bt.logp, bt.ref, kl_name), bt.maskf, agg, **GBI)
    close(ours, theirs, tol_for(agg))
    close(grad(ours, bt.logp), grad(theirs, bt.logp), tol_for(agg))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_actor_loss_with_entropy_bonus(verl, bt, agg):
    """entropy_coeff as verl's ppo_loss (verl/workers/utils/losses.py) composes it: pg_loss -
    entropy_coeff * agg_loss(entropy, global batch info) + kl_loss_coef * agg_loss(kl); the entropy
    carries its gradient (a leaf here), and actor/entropy_loss is verl's metric of that name."""
    coeff = 0.03
    cfg = AlgorithmConfig(preset="grpo", dual_clip_c=3.0, loss_agg=agg, max_response_len=T, entropy_coeff=coeff)
    g = torch.Generator().manual_seed(7)
    ent = (torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_(True)
    ours, met = actor_loss(cfg, bt.logp, bt.old, bt.adv, bt.mask, num_global_tokens=N_TOK, num_global_seqs=N_SEQ,
                           ref_logp_BT=bt.ref, entropy_BT=ent)
    pg, _ = verl.compute_policy_loss_vanilla(old_log_prob=bt.old, log_prob=bt.logp, advantages=bt.adv,
                                             response_mask=bt.maskf, loss_agg_mode=agg,
                                             config=actor_cfg(clip_ratio_high=0.2, loss_agg_mode=agg),
                                             rollout_is_weights=None)
    entropy_loss = verl.agg_loss(ent, bt.maskf, agg, **GBI)
    theirs = pg - coeff * entropy_loss + 0.04 * verl.agg_loss(verl.kl_penalty(bt.logp, bt.ref, "low_var_kl"),
                                                            bt.maskf, agg, **GBI)
    close(ours, theirs, tol_for(agg))
    close(grad(ours, bt.logp), grad(theirs, bt.logp), tol_for(agg))
    close(grad(ours, ent), grad(theirs, ent), tol_for(agg))
    assert grad(theirs, ent).abs().max() > 1e-4
    close(met.compute()["actor/entropy_loss"], entropy_loss.detach(), tol_for(agg))



def test_adaptive_kl_controller(verl, bt):
    """The adaptive KL-in-reward beta against verl's AdaptiveKLController over a run of batches whose KL
    goes below, near and far above the target (both clip sides and the linear part), and the batch
    KL it reads as verl's apply_kl_penalty measures it (masked mean per response, then the mean)."""
    from moe_rl.algorithms.kl import adaptive_kl_coef, sequence_mean_kl

    theirs = verl.AdaptiveKLController(init_kl_coef=0.05, target_kl=0.01, horizon=1000)
    ours = 0.05
    for current, n in ((0.0, 64), (0.002, 64), (0.0095, 128), (0.011, 256), (0.5, 64), (0.02, 1000)):
        theirs.update(current_kl=current, n_steps=n)
        ours = adaptive_kl_coef(ours, current, target=0.01, n_responses=n, horizon=1000)
        assert ours == pytest.approx(theirs.value, rel=1e-15)
    kld = verl.kl_penalty(bt.old, bt.ref, "kl") * bt.maskf
    verl_F = verl.compute_rewards.__globals__["verl_F"]
    per_B = verl_F.masked_mean(kld, mask=bt.maskf, axis=-1)
    # verl's masked mean divides by (n + 1e-8): each response's mean is off by at most 1e-8 of itself
    close(sequence_mean_kl(kld, bt.mask), float(per_B.mean()), dict(rtol=0, atol=1e-8 * float(per_B.abs().max())))
