"""Contracts between rollout and the rest of the loop: what goes in, what comes out.

Legend: P prompt tokens, T response tokens, N = P + T - 1 routed positions, L MoE layers,
K experts per token (top-k).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import torch

# SGLang's "all tokens" sentinel for top_k (api_types.py default).
TOP_K_ALL = 1 << 30
# SGLang's sampling_seed range, [-2**63, 2**63) (sampling_params.py verify). torch's
# Generator.manual_seed takes a negative seed as seed mod 2**64, so distinct seeds stay distinct.
SEED_MIN, SEED_LIMIT = -(1 << 63), 1 << 63
# The largest finite float32: a logit bias beyond it is inf in the engine's fp32 logits.
FP32_MAX = torch.finfo(torch.float32).max


MAX_STOP_COUNT = 32  # stop strings one request may carry (SGLang's sampling_params.py MAX_STOP_COUNT)


def check_stop_strings(stop: Any, field: str) -> None:
    """The one rule for a list of stop strings, wherever it comes from (the run config, an HTTP
    request, ``SamplingParams``): at most :data:`MAX_STOP_COUNT` strings, none empty (every
    text contains the empty string: each response would end after one token). ValueError
    naming ``field`` and the value otherwise."""
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"{field} ({stop!r:.200}) must be a list of strings")
    if len(stop) > MAX_STOP_COUNT:
        raise ValueError(f"{field} has {len(stop)} strings; SGLang takes at most {MAX_STOP_COUNT} stop strings")
    for i, s in enumerate(stop):
        if s == "":
            raise ValueError(f"{field}[{i}] is the empty string, which every text contains (each response "
                             "would end after one token); remove it")


class FinishReason(str, enum.Enum):
    """Why a sample stopped; values are SGLang's ``finish_reason.type`` strings."""

    STOP = "stop"  # a stop token / EOS was sampled, or a stop string completed (its tokens are in the response)
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # aborted (pause, abort_request, shutdown): the client retries it


_MASK64 = (1 << 64) - 1
_UNSET: Any = object()


def per_sample_seed(seed: int, index: int) -> int:
    """The RNG seed of sample ``index`` of a request seeded with ``seed``: ``seed`` itself for
    sample 0 (so ``n = 1`` is unchanged), a SplitMix64 mix of ``(seed, index)`` otherwise, so
    the ``n`` samples of a seeded group are distinct draws. ``seed`` may be negative (SGLang's
    range); torch's ``manual_seed`` takes it modulo 2**64."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def check_penalties(frequency_penalty: Any, presence_penalty: Any, repetition_penalty: Any, min_new_tokens: Any,
                    max_new_tokens: Any) -> None:
    """SGLang's range checks of the penalties (``sampling_params.py`` ``verify``), with its
    messages, which print each value as given (``3`` stays ``3``): frequency and presence
    penalties in [-2, 2], repetition penalty in (0, 2], ``0 <= min_new_tokens <=
    max_new_tokens`` (``max_new_tokens`` None: no upper bound). ValueError otherwise."""
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.")
    if not -2.0 <= presence_penalty <= 2.0:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
    if not 0.0 < repetition_penalty <= 2.0:
        raise ValueError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition_penalty}.")
    if not 0 <= min_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}.")
    if max_new_tokens is not None and max_new_tokens >= 0 and not min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({max_new_tokens})], got {min_new_tokens}.")


def logit_bias_range_error(key: Any, vocab_size: int) -> str:
    """SGLang's message for a ``logit_bias`` key outside ``[0, vocab_size)`` (``verify``)."""
    return f"logit_bias must has keys in [0, {vocab_size - 1}], got {key}."


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling knobs; the subset of SGLang's ``sampling_params`` RL needs."""

    max_new_tokens: int = 128  # response budget in tokens
    temperature: float = 1.0  # below 1e-6 (SGLang's epsilon) = greedy; log-probs then use temperature 1
    top_p: float = 1.0  # nucleus mass kept (1 = off)
    top_k: int = TOP_K_ALL  # keep the k most likely tokens (TOP_K_ALL = off)
    min_p: float = 0.0  # drop tokens below min_p * max prob (0 = off)
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings (their tokens stay in the output)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # extra stop tokens
    ignore_eos: bool = False  # stop at no token: neither EOS nor stop_token_ids (SGLang)
    n: int = 1  # samples per prompt (a group)
    sampling_seed: int | None = None  # per-request RNG seed (None = engine RNG)
    # SGLang's penalizers and logit bias (``moe_rl.rollout.embedded.penalties``); the defaults
    # are off, and a request with all of them off pays nothing for them
    frequency_penalty: float = 0.0  # minus penalty x (times the token is in the output so far)
    presence_penalty: float = 0.0  # minus penalty once a token is in the output
    repetition_penalty: float = 1.0  # output tokens' logits: / penalty if > 0, x penalty if < 0
    min_new_tokens: int = 0  # stop tokens (EOS, stop_token_ids) cannot be drawn before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (last, before temperature)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} ({getattr(self, name)}) must be a finite number")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0")
        if self.sampling_seed is not None and not SEED_MIN <= self.sampling_seed < SEED_LIMIT:
            raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {self.sampling_seed}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k ({self.top_k}) must be >= 1 (or -1 for all)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p ({self.min_p}) must be in [0, 1]")
        if self.n < 1:
            raise ValueError(f"n ({self.n}) must be >= 1")
        check_stop_strings(self.stop, "stop")
        for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} ({getattr(self, name)}) must be a finite number")
        check_penalties(self.frequency_penalty, self.presence_penalty, self.repetition_penalty, self.min_new_tokens,
                        self.max_new_tokens)
        if self.logit_bias is not None:
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                    raise ValueError(f"logit_bias key {k!r} must be a token id (an integer >= 0)")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or abs(v) > FP32_MAX or not math.isfinite(v):
                    raise ValueError(f"logit_bias[{k}] ({v!r}) must be a finite number within float32's range "
                                     f"(|bias| <= {FP32_MAX:.7g})")
            self.logit_bias = dict(self.logit_bias) or None  # {} is SGLang's "no bias"
        if self.top_k == -1 or self.top_k > TOP_K_ALL:  # more than any vocabulary: keep all
            self.top_k = TOP_K_ALL

    def to_sglang(self) -> dict[str, Any]:
        """The ``sampling_params`` dict SGLang's schema accepts (only non-default keys)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }
        if self.min_p:
            out["min_p"] = self.min_p
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.n != 1:
            out["n"] = self.n
        if self.sampling_seed is not None:
            out["sampling_seed"] = self.sampling_seed
        for name, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0),
                              ("min_new_tokens", 0)):
            if getattr(self, name) != neutral:
                out[name] = getattr(self, name)
        if self.logit_bias:
            out["logit_bias"] = {str(k): float(v) for k, v in self.logit_bias.items()}  # SGLang's keys are strings
        return out

    @property
    def shapes_logits(self) -> bool:
        """Whether a penalty or a logit bias is on (the engine then processes this row's logits)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.min_new_tokens > 0 or self.logit_bias)


@dataclasses.dataclass
class RolloutRequest:
    """One prompt to sample ``sampling.n`` responses for (one GRPO group)."""

    prompt_ids: list[int]  # [P] token ids, P >= 1
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    group_id: int = 0  # caller's id of this prompt; copied into every Sample

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError(f"prompt_ids of group {self.group_id} is empty")


@dataclasses.dataclass
class Sample:
    """One sampled response, everything the trainer needs from the rollout.

    ``routed_experts_NLK[n]`` are the experts each MoE layer chose for sequence position ``n``
    (the forward that read token ``n``), for every position but the last (which no forward
    read): rows ``0..P-2`` are the prompt's, row ``P-1+t`` produced response token ``t``. That is
    SGLang's ``routed_experts`` with ``routed_experts_start_len = 0`` and exactly the trainer's
    positions (``moe_rl.data.train_batch``: position n scores token n+1), so routing replay (R3)
    can reuse the prompt's routes too.
    """

    group_id: int  # RolloutRequest.group_id
    sample_index: int  # 0..n-1 within the group
    prompt_ids: list[int]  # [P]
    response_ids: list[int]  # [T], with STOP: through the stop token or the token that completed the stop string
    rollout_logprobs_T: torch.Tensor  # [T] fp32, log_softmax(logits / temperature) at the token
    routed_experts_NLK: torch.Tensor | None  # [P + T - 1, L, K] int32 expert ids, or None if not captured
    finish_reason: FinishReason
    weight_version: str  # engine's weight version when the sample finished
    # Transitional: the former response-only field's name, accepted only as None (drop the
    # routes), until every caller says routed_experts_NLK.
    routed_experts_TLK: dataclasses.InitVar[Any] = _UNSET

    def __post_init__(self, routed_experts_TLK: Any = _UNSET) -> None:
        if routed_experts_TLK is not _UNSET:
            if routed_experts_TLK is not None:
                raise TypeError("Sample.routed_experts_TLK is now routed_experts_NLK ([prompt + response - 1, "
                                "L, K]); only routed_experts_TLK=None (drop the routes) is still accepted")
            self.routed_experts_NLK = None
        T = len(self.response_ids)
        assert self.rollout_logprobs_T.shape == (T,), (self.rollout_logprobs_T.shape, T)
        if self.routed_experts_NLK is not None:
            N = len(self.prompt_ids) + T - 1
            assert self.routed_experts_NLK.dim() == 3 and self.routed_experts_NLK.shape[0] == N, (
                self.routed_experts_NLK.shape, N)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)
