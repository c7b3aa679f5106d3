"""SGLang 0.5.23's ``/generate`` request and response shapes, for the embedded engine.

Parsing follows SGLang's two gates: ``sampling_params`` keys outside SGLang's schema are
rejected (``{"error": "unknown field ..."}``, HTTP 400, as ``api_contract.py`` does);
unknown top-level keys are ignored. On top, the embedded engine rejects (400) the SGLang
features it does not implement when they are given non-default values, instead of silently
ignoring them (grammar, penalties, stop strings without a tokenizer, prompt log-probs...).
Batch and ``n``: the response is a list ordered prompt-major (item ``i*n + j`` is sample
``j`` of prompt ``i``); a single prompt with ``n == 1`` gets a single object.

Values are checked at the door, so one request's numbers can never fail inside the engine
(where they would take every other request in flight down with them): booleans must be
JSON booleans (as in SGLang's schema: ``"false"`` is not false), numbers finite and in
range, and a request asks at most ``max_samples`` samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_rl.rollout.types import TOP_K_ALL, SamplingParams

# SGLang api_types.py SamplingParams fields (the "unknown keys rejected" gate).
SGLANG_SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
)
# Keys the embedded engine accepts only at their neutral value.
_NEUTRAL = {
    "stop_regex": (None, [], ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "min_new_tokens": (None, 0), "json_schema": (None,),
    "regex": (None,), "ebnf": (None,), "structural_tag": (None,), "logit_bias": (None, {}),
    "custom_params": (None, {}), "beam_width": (None, 0, 1), "watermark": (None, False), "choice": (None,),
}
# Accepted and irrelevant without detokenisation on the engine side.
_IGNORED = ("skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval")


class ContractError(ValueError):
    """Body violates SGLang's schema: reply 400 ``{"error": "<text>"}``."""


class RequestError(ValueError):
    """Body is well-formed but unusable: reply 400 ``{"error": {"message": ...}}``."""


@dataclasses.dataclass
class ParsedGenerate:
    prompts: list[list[int]]  # [B] prompts
    params: list[SamplingParams]  # [B], each with the shared n
    rids: list[str | None]  # [B]
    return_logprob: list[bool]  # [B]
    return_routed_experts: bool
    routed_experts_start_len: int
    single: bool  # reply with one object instead of a list


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def flag(body: dict, key: str, default: bool = False, *, where: str = "") -> bool:
    """``body[key]`` as a JSON boolean (absent/null: ``default``); anything else is a 400."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ContractError(f"invalid type: {where}{key} must be a boolean (true/false), got {v!r:.80}")
    return v


def parse_sampling(sp: Any, *, has_tokenizer: bool) -> tuple[SamplingParams, list[str]]:
    """-> (params, stop strings)."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise ContractError(f"invalid type: sampling_params must be a map, got {type(sp).__name__}")
    for k in sp:
        if k not in SGLANG_SAMPLING_KEYS:
            raise ContractError(f"unknown field `{k}`, expected one of "
                                + ", ".join(f"`{x}`" for x in SGLANG_SAMPLING_KEYS))
    for k, ok in _NEUTRAL.items():
        if k in sp and sp[k] not in ok:
            raise RequestError(f"sampling_params.{k}={sp[k]!r:.80} is not supported by the embedded engine")
    for k in ("ignore_eos",) + _IGNORED[:3]:
        flag(sp, k, where="sampling_params.")

    def num(key, default, kind):
        v = sp.get(key, default)
        if v is None:
            return default
        if kind is int and not _is_int(v):
            raise ContractError(f"invalid type: sampling_params.{key} must be an integer, got {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ContractError(f"invalid type: sampling_params.{key} must be a number, got {v!r}")
        return kind(v)

    stop = sp.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if stop and not has_tokenizer:
        raise RequestError("sampling_params.stop (strings) needs a tokenizer; this model directory has none, "
                           "use stop_token_ids")
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise ContractError(f"invalid type: sampling_params.stop_token_ids must be a list of integers, got {stop_ids!r}")
    seed = sp.get("sampling_seed")
    if seed is not None and not _is_int(seed):
        raise ContractError(f"invalid type: sampling_params.sampling_seed must be an integer, got {seed!r}")
    try:
        params = SamplingParams(
            max_new_tokens=num("max_new_tokens", 128, int), temperature=num("temperature", 1.0, float),
            top_p=num("top_p", 1.0, float), top_k=num("top_k", TOP_K_ALL, int), min_p=num("min_p", 0.0, float),
            stop_token_ids=list(stop_ids), ignore_eos=flag(sp, "ignore_eos"), n=num("n", 1, int),
            sampling_seed=seed)
    except ValueError as e:
        raise RequestError(f"sampling_params: {e}") from e
    return params, stop


def parse_generate(body: Any, *, context_len: int, vocab_size: int, tokenizer=None,
                   max_samples: int = 4096) -> ParsedGenerate:
    if not isinstance(body, dict):
        raise ContractError("invalid type: request body must be a JSON object")
    if flag(body, "stream"):
        raise RequestError("stream=true is not supported by the embedded engine")
    if body.get("input_embeds") is not None:
        raise RequestError("input_embeds is not supported by the embedded engine")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("exactly one of text / input_ids must be given")
    if text is not None:
        if tokenizer is None:
            raise RequestError("text input needs a tokenizer; this model directory has none, send input_ids")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        if not isinstance(ids, list):
            raise ContractError("invalid type: input_ids must be a list")
        single = not (len(ids) > 0 and isinstance(ids[0], list))
        prompts = [ids] if single else ids
    if not prompts:
        raise RequestError("input_ids is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not all(_is_int(t) for t in p):
            raise ContractError(f"invalid type: input_ids[{i}] must be a list of integers")
        if len(p) == 0:
            raise RequestError(f"input_ids[{i}] is empty" if not single else "input_ids is empty")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"input_ids[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    B = len(prompts)
    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if len(sps) != B:
            raise RequestError(f"sampling_params has {len(sps)} entries for {B} prompts")
        parsed = [parse_sampling(sp, has_tokenizer=tokenizer is not None) for sp in sps]
    else:
        parsed = [parse_sampling(sps, has_tokenizer=tokenizer is not None)] * B
    params = [p for p, _ in parsed]
    if any(stop for _, stop in parsed):
        raise RequestError("sampling_params.stop strings are not implemented by the embedded engine yet; "
                           "use stop_token_ids")
    if len({p.n for p in params}) != 1:
        raise RequestError(f"n must be the same in every sampling_params entry, got {[p.n for p in params]}")
    if B * params[0].n > max_samples:
        raise RequestError(f"{B} prompts x n={params[0].n} asks {B * params[0].n} samples; this server takes at "
                           f"most {max_samples} per request (--max-samples-per-request)")
    for i, (p, sp) in enumerate(zip(prompts, params)):
        if len(p) + sp.max_new_tokens > context_len:
            raise RequestError(f"prompt {i}: input tokens ({len(p)}) + max_new_tokens ({sp.max_new_tokens}) "
                               f"exceeds the context length ({context_len})")
    rid = body.get("rid")
    if rid is None:
        rids: list[str | None] = [None] * B
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(B)]
    elif isinstance(rid, list) and len(rid) == B and all(isinstance(r, str) for r in rid):
        rids = list(rid)
    else:
        raise RequestError(f"rid must be a string or a list of {B} strings")
    rl = body.get("return_logprob", False)
    if isinstance(rl, list):
        if not all(isinstance(x, bool) for x in rl):
            raise ContractError(f"invalid type: return_logprob must be a boolean or a list of booleans, got {rl!r:.80}")
        rl_list = list(rl)
    else:
        rl_list = [flag(body, "return_logprob")] * B
    if len(rl_list) != B:
        raise RequestError(f"return_logprob has {len(rl_list)} entries for {B} prompts")
    if body.get("logprob_start_len", -1) not in (-1, None):
        raise RequestError("logprob_start_len >= 0 (prompt log-probs) is not supported by the embedded engine")
    if body.get("top_logprobs_num", 0) or body.get("token_ids_logprob"):
        raise RequestError("top_logprobs_num / token_ids_logprob are not supported by the embedded engine")
    start = body.get("routed_experts_start_len", 0)
    if not _is_int(start) or start < 0 or any(start > len(p) for p in prompts):
        raise RequestError(f"routed_experts_start_len ({start}) must be an integer in [0, prompt tokens "
                           f"({min(len(p) for p in prompts)})]")
    n = params[0].n
    return ParsedGenerate(prompts=prompts, params=params, rids=rids, return_logprob=rl_list,
                          return_routed_experts=flag(body, "return_routed_experts"),
                          routed_experts_start_len=start, single=single and n == 1)
