"""Routing drift and expert-load metrics: pure tensor math, built for exact reductions.

Legend: T tokens, L MoE layers (the ones this caller holds), K experts per token (top-k),
E experts.

Definitions (for MoE layer l and token t; E_a(t), E_b(t) the top-k expert *sets* chosen by two
passes a and b, p_a, p_b their router distributions over the E experts):

- ``flip_frac``            fraction of tokens with E_a(t) != E_b(t) (order inside the top-k
                           does not count: a set change is a flip)
- ``topk_overlap``         mean over tokens of |E_a(t) ∩ E_b(t)| / K
- ``router_kl``            mean over tokens of KL(p_a || p_b) = sum_e p_a log(p_a / p_b), in nats
- ``any_layer_flip_frac``  fraction of tokens whose set differs in at least one of the L layers
- ``load_max_over_mean``   max_e n_e / mean_e n_e, with n_e the tokens routed to expert e (a token
                           counts once for each of its K experts)
- ``load_cv``              std_e n_e / mean_e n_e (population std over the E experts)
- ``dead_experts``         number of experts with n_e = 0

Pair a -> b is ``rollout_old`` (rollout engine -> old policy: training/inference drift) or
``old_new`` (old policy -> policy after the update, same batch: update-induced drift).

Metric names: ``routing/<metric>/<pair>`` is the mean over layers of the per-layer values
``routing/<metric>/<pair>/layer_<l>`` (l the *global* layer index of the model, not the position
among MoE layers or on this pipeline stage); ``any_layer_flip_frac`` has no per-layer value.
Load: ``routing/<metric>`` (mean over layers) and ``routing/<metric>/layer_<l>``.

How to reduce exactly. Counting and finalizing are separate:

1. per micro-batch, :func:`drift_counts` / :func:`load_counts` return *sums and counts*
   (int64, or float64 for the KL sum), never ratios;
2. the caller adds them over micro-batches (:func:`sum_counts`) and all-reduces every tensor
   with SUM over ranks whose counted tokens are disjoint and together make up the batch (the
   data-parallel ranks, expert-parallel ranks included, since each routes its own tokens).
   Ranks holding copies of the same tokens (tensor-parallel peers without sequence parallelism)
   must contribute once: count on one of them, or leave them out of the reduction. The keys
   depend only on the arguments given, so every rank can iterate ``sorted(counts)`` in the same
   order;
3. :func:`finalize_drift` / :func:`finalize_load` turn the summed counts into named floats.

The result equals what one process would compute on the whole batch. Under pipeline
parallelism each stage holds its own layers: per-layer counts are exact per stage (finalize each
stage's layers, or concatenate along L in global-layer order), but ``any_layer_flips`` needs all
L layers of a token at once, so the caller gathers ``flip_T`` (see ``return_flips``) across
stages and counts the OR itself, or passes every layer's routes to one call.

Top-k rows must hold K distinct experts on every counted token (they do, coming from a top-k);
a duplicate is a ValueError, since it would make the set arithmetic wrong. Masked-out tokens
(``mask_T`` False: padding, or the last token that has no route) are not looked at, so any
placeholder value is allowed there.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

DRIFT_METRICS: tuple[str, ...] = ("flip_frac", "topk_overlap", "router_kl", "any_layer_flip_frac")
LAYER_DRIFT_METRICS: tuple[str, ...] = ("flip_frac", "topk_overlap", "router_kl")
PAIRS: tuple[str, ...] = ("rollout_old", "old_new")
LOAD_METRICS: tuple[str, ...] = ("load_max_over_mean", "load_cv", "dead_experts")
PREFIX = "routing/"


def drift_name(metric: str, pair: str, layer: Optional[int] = None) -> str:
    """``routing/<metric>/<pair>`` or, with ``layer``, ``routing/<metric>/<pair>/layer_<layer>``."""
    if metric not in DRIFT_METRICS:
        raise ValueError(f"drift metric {metric!r} is not one of {DRIFT_METRICS}")
    if pair not in PAIRS:
        raise ValueError(f"pair {pair!r} is not one of {PAIRS}")
    if layer is not None and metric not in LAYER_DRIFT_METRICS:
        raise ValueError(f"{metric} has no per-layer value")
    name = f"{PREFIX}{metric}/{pair}"
    return name if layer is None else f"{name}/layer_{int(layer)}"


def load_name(metric: str, layer: Optional[int] = None) -> str:
    """``routing/<metric>`` or, with ``layer``, ``routing/<metric>/layer_<layer>``."""
    if metric not in LOAD_METRICS:
        raise ValueError(f"load metric {metric!r} is not one of {LOAD_METRICS}")
    name = f"{PREFIX}{metric}"
    return name if layer is None else f"{name}/layer_{int(layer)}"


def _check_indices(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must hold integer expert indices, got dtype {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be [tokens, layers, top_k] (3 dims), got shape {tuple(t.shape)}")
    if t.shape[2] == 0:
        raise ValueError(f"{name} has top_k = 0 (shape {tuple(t.shape)})")


def _check_mask(mask_T: Optional[Tensor], num_tokens: int) -> Optional[Tensor]:
    if mask_T is None:
        return None
    if not isinstance(mask_T, Tensor):
        raise ValueError(f"mask_T must be a torch.Tensor, got {type(mask_T).__name__}")
    if mask_T.dim() != 1 or mask_T.shape[0] != num_tokens:
        raise ValueError(f"mask_T must have shape [{num_tokens}] (one entry per token), got {tuple(mask_T.shape)}")
    if mask_T.dtype != torch.bool:
        bad = (mask_T != 0) & (mask_T != 1)
        if bool(bad.any()):
            raise ValueError(f"mask_T must be boolean or 0/1, found {int(bad.sum())} other values")
        mask_T = mask_T != 0
    return mask_T


def _sorted_distinct(name: str, idx_NLK: Tensor) -> Tensor:
    """Indices as int64, sorted along K; a repeated expert in a row is a ValueError."""
    s = idx_NLK.to(torch.int64).sort(dim=-1).values
    dup = s[..., 1:] == s[..., :-1]
    if bool(dup.any()):
        n, l = dup.any(-1).nonzero()[0].tolist()
        raise ValueError(f"{name} repeats an expert within one top-k row (counted token {n}, layer position {l}: "
                         f"{idx_NLK[n, l].tolist()}); top-k rows must hold distinct experts")
    return s


def _check_probs(name: str, p: Tensor, num_tokens: int, num_layers: int) -> None:
    if not isinstance(p, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if not p.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point router probabilities, got dtype {p.dtype}")
    if p.dim() != 3 or p.shape[0] != num_tokens or p.shape[1] != num_layers:
        raise ValueError(f"{name} must be [tokens={num_tokens}, layers={num_layers}, experts], "
                         f"got shape {tuple(p.shape)}")


def drift_counts(a_TLK: Tensor, b_TLK: Tensor, mask_T: Optional[Tensor] = None, *,
                 probs_a_TLE: Optional[Tensor] = None, probs_b_TLE: Optional[Tensor] = None,
                 return_flips: bool = False) -> dict[str, Tensor]:
    """Summable drift counts between pass a and pass b on the same tokens.

    ``a_TLK``, ``b_TLK``: expert indices (any integer dtype), layer j of both is the same MoE
    layer. ``mask_T``: which tokens count (bool or 0/1; default all). ``probs_*_TLE``: router
    probabilities (each row a distribution over the E experts); ``router_kl`` is counted only
    when both are given, as KL(p_a || p_b).

    Returns (on the indices' device; add with :func:`sum_counts`, all-reduce with SUM):

    - ``tokens_L``  int64 [L]  counted tokens per layer
    - ``flips_L``   int64 [L]  tokens whose top-k set differs
    - ``overlap_L`` int64 [L]  sum over tokens of |E_a ∩ E_b|
    - ``slots_L``   int64 [L]  sum over tokens of K (the overlap's denominator)
    - ``tokens``    int64 []   counted tokens
    - ``any_layer_flips`` int64 []  tokens with a flip in at least one of the L layers
    - ``kl_L``      float64 [L]  sum over tokens of KL(p_a || p_b) (only with both probs)

    With ``return_flips=True`` also ``flip_T`` (bool [T], False on masked tokens): not summable,
    for callers that OR flips across pipeline stages.
    """
    _check_indices("a_TLK", a_TLK)
    _check_indices("b_TLK", b_TLK)
    if a_TLK.shape != b_TLK.shape:
        raise ValueError(f"a_TLK and b_TLK must have the same [tokens, layers, top_k] shape, "
                         f"got {tuple(a_TLK.shape)} and {tuple(b_TLK.shape)}")
    T, L, K = a_TLK.shape
    mask_T = _check_mask(mask_T, T)
    if (probs_a_TLE is None) != (probs_b_TLE is None):
        raise ValueError("router_kl needs both probs_a_TLE and probs_b_TLE (got only one)")
    with_kl = probs_a_TLE is not None
    if with_kl:
        _check_probs("probs_a_TLE", probs_a_TLE, T, L)
        _check_probs("probs_b_TLE", probs_b_TLE, T, L)
        if probs_a_TLE.shape != probs_b_TLE.shape:
            raise ValueError(f"probs_a_TLE and probs_b_TLE must have the same shape, "
                             f"got {tuple(probs_a_TLE.shape)} and {tuple(probs_b_TLE.shape)}")

    a_NLK, b_NLK = (a_TLK, b_TLK) if mask_T is None else (a_TLK[mask_T], b_TLK[mask_T])
    N = a_NLK.shape[0]
    sa_NLK = _sorted_distinct("a_TLK", a_NLK)
    sb_NLK = _sorted_distinct("b_TLK", b_NLK)
    # |A ∩ B| for distinct rows: look each element of A up in sorted B (O(K log K) per row,
    # no [N, L, K, K] comparison tensor).
    pos_NLK = torch.searchsorted(sb_NLK, sa_NLK).clamp_(max=K - 1)
    hit_NLK = sb_NLK.gather(-1, pos_NLK) == sa_NLK
    inter_NL = hit_NLK.sum(-1)
    flip_NL = inter_NL != K  # distinct rows of equal size: equal sets <=> full intersection

    dev = a_TLK.device
    out = {
        "tokens_L": torch.full((L,), N, dtype=torch.int64, device=dev),
        "flips_L": flip_NL.sum(0).to(torch.int64),
        "overlap_L": inter_NL.sum(0).to(torch.int64),
        "slots_L": torch.full((L,), N * K, dtype=torch.int64, device=dev),
        "tokens": torch.tensor(N, dtype=torch.int64, device=dev),
        "any_layer_flips": flip_NL.any(-1).sum().to(torch.int64),
    }
    if with_kl:
        pa_NLE = probs_a_TLE if mask_T is None else probs_a_TLE[mask_T]
        pb_NLE = probs_b_TLE if mask_T is None else probs_b_TLE[mask_T]
        # Per token in the probabilities' own precision (at least fp32: 4x cheaper than fp64 on
        # [T, L, E] and within 1e-7 relative of it on the sums), summed over tokens in fp64.
        dt = torch.promote_types(torch.promote_types(pa_NLE.dtype, pb_NLE.dtype), torch.float32)
        pa_NLE, pb_NLE = pa_NLE.to(dt), pb_NLE.to(dt)
        # xlogy: 0 * log 0 = 0, so experts pass a never picks add nothing.
        kl_NL = (torch.xlogy(pa_NLE, pa_NLE) - torch.xlogy(pa_NLE, pb_NLE)).sum(-1)
        out["kl_L"] = kl_NL.to(torch.float64).sum(0).to(dev)
    if return_flips:
        any_N = flip_NL.any(-1)
        if mask_T is None:
            out["flip_T"] = any_N
        else:
            out["flip_T"] = torch.zeros(T, dtype=torch.bool, device=dev)
            out["flip_T"][mask_T] = any_N
    return out


def load_counts(topk_TLK: Tensor, num_experts: int, mask_T: Optional[Tensor] = None) -> Tensor:
    """Tokens routed to each expert, per layer: int64 [L, E]; a token counts once for each of its
    K experts. Summable over micro-batches and (SUM) over ranks holding different tokens."""
    _check_indices("topk_TLK", topk_TLK)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    T, L, K = topk_TLK.shape
    mask_T = _check_mask(mask_T, T)
    idx_NLK = (topk_TLK if mask_T is None else topk_TLK[mask_T]).to(torch.int64)
    if idx_NLK.numel():
        lo, hi = int(idx_NLK.min()), int(idx_NLK.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert indices must lie in [0, {num_experts}) for num_experts={num_experts}, "
                             f"found min {lo} and max {hi}")
    layer_off_L = torch.arange(L, device=idx_NLK.device, dtype=torch.int64) * num_experts
    flat = (idx_NLK + layer_off_L[None, :, None]).reshape(-1)
    return torch.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def sum_counts(parts: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Add count dicts from several micro-batches (same keys and shapes required)."""
    total: Optional[dict[str, Tensor]] = None
    for i, part in enumerate(parts):
        part = {k: v for k, v in part.items() if k != "flip_T"}
        if total is None:
            total = {k: v.clone() for k, v in part.items()}
            continue
        if set(part) != set(total):
            raise ValueError(f"count dict {i} has keys {sorted(part)}, the first has {sorted(total)} "
                             "(router_kl needs probabilities in every micro-batch or in none)")
        for k, v in part.items():
            if v.shape != total[k].shape:
                raise ValueError(f"count {k!r} of dict {i} has shape {tuple(v.shape)}, "
                                 f"the first has {tuple(total[k].shape)}")
            total[k] += v
    if total is None:
        raise ValueError("sum_counts needs at least one count dict")
    return total


def _check_layer_ids(layer_ids: Sequence[int], num_layers: int, what: str) -> list[int]:
    ids = [int(x) for x in layer_ids]
    if len(ids) != num_layers:
        raise ValueError(f"layer_ids has {len(ids)} entries but {what} has {num_layers} layers")
    if len(set(ids)) != len(ids):
        raise ValueError(f"layer_ids repeats a layer: {ids}")
    return ids


def finalize_drift(counts: Mapping[str, Tensor], pair: str, layer_ids: Sequence[int]) -> dict[str, float]:
    """Named drift metrics from (summed, all-reduced) :func:`drift_counts`.

    ``layer_ids[j]`` is the global layer index of position j along L. Per-layer values, their
    unweighted mean over layers, and ``any_layer_flip_frac``; ``router_kl`` only when the counts
    hold ``kl_L``. A layer (or the batch) with no counted token is a ValueError.
    """
    if pair not in PAIRS:
        raise ValueError(f"pair {pair!r} is not one of {PAIRS}")
    need = ("tokens_L", "flips_L", "overlap_L", "slots_L", "tokens", "any_layer_flips")
    missing = [k for k in need if k not in counts]
    if missing:
        raise ValueError(f"drift counts lack {missing}; build them with drift_counts")
    tokens_L = counts["tokens_L"].to(torch.float64).cpu()
    L = tokens_L.shape[0]
    ids = _check_layer_ids(layer_ids, L, "the counts")
    if L == 0:
        raise ValueError("drift counts hold no layer")
    empty = [ids[j] for j in range(L) if tokens_L[j] == 0]
    if empty:
        raise ValueError(f"no counted token for layer(s) {empty}: nothing to measure")
    per = {
        "flip_frac": counts["flips_L"].to(torch.float64).cpu() / tokens_L,
        "topk_overlap": counts["overlap_L"].to(torch.float64).cpu() / counts["slots_L"].to(torch.float64).cpu(),
    }
    if "kl_L" in counts:
        per["router_kl"] = counts["kl_L"].to(torch.float64).cpu() / tokens_L
    out: dict[str, float] = {}
    for metric, v_L in per.items():
        out[drift_name(metric, pair)] = float(v_L.mean())
        for j, layer in enumerate(ids):
            out[drift_name(metric, pair, layer)] = float(v_L[j])
    out[drift_name("any_layer_flip_frac", pair)] = float(counts["any_layer_flips"]) / float(counts["tokens"])
    return out


def finalize_load(load_LE: Tensor, layer_ids: Sequence[int]) -> dict[str, float]:
    """Named load metrics from (summed, all-reduced) :func:`load_counts`: per layer and the
    unweighted mean over layers. A layer that received no token at all is a ValueError."""
    if not isinstance(load_LE, Tensor) or load_LE.dim() != 2:
        raise ValueError(f"load_LE must be a [layers, experts] tensor, got "
                         f"{tuple(load_LE.shape) if isinstance(load_LE, Tensor) else type(load_LE).__name__}")
    L, E = load_LE.shape
    ids = _check_layer_ids(layer_ids, L, "load_LE")
    if L == 0 or E == 0:
        raise ValueError(f"load_LE must have at least one layer and one expert, got shape {(L, E)}")
    n_LE = load_LE.to(torch.float64).cpu()
    if bool((n_LE < 0).any()):
        raise ValueError("load_LE holds negative token counts")
    mean_L = n_LE.mean(-1)
    empty = [ids[j] for j in range(L) if mean_L[j] == 0]
    if empty:
        raise ValueError(f"no token routed in layer(s) {empty}: load is undefined")
    per = {
        "load_max_over_mean": n_LE.max(-1).values / mean_L,
        "load_cv": n_LE.std(-1, correction=0) / mean_L,
        "dead_experts": (n_LE == 0).sum(-1).to(torch.float64),
    }
    out: dict[str, float] = {}
    for metric, v_L in per.items():
        out[load_name(metric)] = float(v_L.mean())
        for j, layer in enumerate(ids):
            out[load_name(metric, layer)] = float(v_L[j])
    return out
