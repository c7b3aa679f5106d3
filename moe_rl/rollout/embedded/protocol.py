"""SGLang 0.5.23's ``/generate`` request and response shapes, for the embedded engine.

Parsing follows SGLang's gates, and each failure has SGLang's reply shape:
1. FastAPI/pydantic parse of ``GenerateReqInput``: an unparseable body (malformed JSON, not
   an object, empty) or a top-level field of the wrong type (``input_ids`` not integers,
   ``text``/``rid``/``sampling_params`` of the wrong kind) is a :class:`SchemaError`, HTTP 400
   ``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``;
2. the API contract (``api_contract.py``): ``sampling_params`` keys outside SGLang's schema and
   values of the wrong JSON type are a :class:`ContractError`, 400 ``{"error": "<text>"}``;
   unknown top-level keys are ignored;
3. the tokenizer manager and scheduler (limits, lengths): a :class:`RequestError`,
   400 ``{"error": {"message": ...}}``.
On top, the embedded engine rejects (400) the SGLang features it does not implement when they
are given non-default values, instead of silently ignoring them (grammar, penalties,
``stop_regex``, stop strings without a tokenizer, prompt log-probs...).
Batch and ``n``: the response is a list ordered prompt-major (item ``i*n + j`` is sample
``j`` of prompt ``i``); a single prompt with ``n == 1`` gets a single object.

Lengths are SGLang's: ``text`` is tokenized as ``tokenizer(text)`` (special tokens added, e.g.
BOS); a prompt must be shorter than the context length minus 6 (the scheduler's
``max_req_input_len``); an explicit ``max_new_tokens`` with the prompt must fit the context
length; absent it is 128, ``null`` means no limit; and every budget is capped at
``context_len - prompt - 2`` (the scheduler's ``max_req_len - input_len - 1``).

Values are checked at the door, so one request's numbers can never fail inside the engine
(where they would take every other request in flight down with them): booleans must be
JSON booleans (as in SGLang's schema: ``"false"`` is not false), numbers finite and in
range, and a request asks at most ``max_samples`` samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_rl.rollout.types import TOP_K_ALL, SamplingParams, check_stop_strings

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
    "stop_regex": (None, []), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "min_new_tokens": (None, 0), "json_schema": (None,),
    "regex": (None,), "ebnf": (None,), "structural_tag": (None,), "logit_bias": (None, {}),
    "custom_params": (None, {}), "beam_width": (None, 0, 1), "watermark": (None, False), "choice": (None,),
}
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when the key is absent
UNLIMITED_NEW_TOKENS = 1 << 30  # scheduler.py: "max_new_tokens": null
# The scheduler's max_req_len is context_len - 1; prompts must be shorter than it minus this.
_INPUT_MARGIN = 5


class SchemaError(ValueError):
    """Body fails SGLang's FastAPI/pydantic parse: reply 400 with SGLang's ``ErrorResponse``
    (``type`` "Bad Request" for validation errors, "400" where FastAPI raises HTTPException)."""

    def __init__(self, message: str, type_: str = "Bad Request") -> None:
        super().__init__(message)
        self.type = type_


class ContractError(ValueError):
    """Body violates SGLang's schema: reply 400 ``{"error": "<text>"}``."""


class RequestError(ValueError):
    """Body is well-formed but unusable: reply 400 ``{"error": {"message": ...}}``."""


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How one prompt's ``text`` is built from its output ids (``output_text.py``). Its stop
    strings are ``SamplingParams.stop`` (the engine ends samples on them, ``stop_strings.py``)."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop token / string in the text


@dataclasses.dataclass
class ParsedGenerate:
    prompts: list[list[int]]  # [B] prompts
    params: list[SamplingParams]  # [B], each with the shared n and its prompt's budget
    text_options: list[TextOptions]  # [B]
    rids: list[str | None]  # [B]
    return_logprob: list[bool]  # [B]
    return_text_in_logprobs: bool
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


def _parse_stop(sp: dict, *, has_tokenizer: bool) -> list[str]:
    """``sampling_params.stop`` (a string or a list of strings) -> the stop strings."""
    stop = sp.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ContractError(f"invalid type: sampling_params.stop must be a string or a list of strings, "
                            f"got {stop!r:.80}")
    if stop and not has_tokenizer:
        raise RequestError(f"sampling_params.stop={stop!r:.80} needs a tokenizer to match text; this model "
                           "directory has none (SGLang: unavailable with skip_tokenizer_init), use stop_token_ids")
    try:
        check_stop_strings(stop, "sampling_params.stop")
    except ValueError as e:
        raise RequestError(str(e)) from e
    return list(stop)


@dataclasses.dataclass(frozen=True)
class ParsedSampling:
    """One ``sampling_params`` object. ``params.max_new_tokens`` holds the default until
    :func:`generation_budget` sets the prompt's budget from the two fields below."""

    params: SamplingParams
    max_new_tokens: int | None  # 128 when absent, None for null (no limit)
    explicit_max_new_tokens: int | None  # the value given (not null): the one SGLang checks against the context
    text: TextOptions


def parse_sampling(sp: Any, *, has_tokenizer: bool) -> ParsedSampling:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise SchemaError(f"sampling_params: input should be a valid dictionary, got {type(sp).__name__}")
    for k in sp:
        if k not in SGLANG_SAMPLING_KEYS:
            raise ContractError(f"unknown field `{k}`, expected one of "
                                + ", ".join(f"`{x}`" for x in SGLANG_SAMPLING_KEYS))
    for k, ok in _NEUTRAL.items():
        if k in sp and sp[k] not in ok:
            raise RequestError(f"sampling_params.{k}={sp[k]!r:.80} is not supported by the embedded engine")

    def num(key, default, kind):
        v = sp.get(key, default)
        if v is None:
            return default
        if kind is int and not _is_int(v):
            raise ContractError(f"invalid type: sampling_params.{key} must be an integer, got {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ContractError(f"invalid type: sampling_params.{key} must be a number, got {v!r}")
        return kind(v)

    stop = _parse_stop(sp, has_tokenizer=has_tokenizer)
    text = TextOptions(
        skip_special_tokens=flag(sp, "skip_special_tokens", True, where="sampling_params."),
        spaces_between_special_tokens=flag(sp, "spaces_between_special_tokens", True, where="sampling_params."),
        no_stop_trim=flag(sp, "no_stop_trim", where="sampling_params."))
    explicit = num("max_new_tokens", None, int)
    if explicit is not None and explicit < 0:
        raise RequestError(f"sampling_params: max_new_tokens ({explicit}) must be >= 0")
    requested = explicit if "max_new_tokens" in sp else DEFAULT_MAX_NEW_TOKENS
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise ContractError(f"invalid type: sampling_params.stop_token_ids must be a list of integers, got {stop_ids!r}")
    seed = sp.get("sampling_seed")
    if seed is not None and not _is_int(seed):
        raise ContractError(f"invalid type: sampling_params.sampling_seed must be an integer, got {seed!r}")
    try:
        params = SamplingParams(
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=num("temperature", 1.0, float),
            top_p=num("top_p", 1.0, float), top_k=num("top_k", TOP_K_ALL, int), min_p=num("min_p", 0.0, float),
            stop=stop, stop_token_ids=list(stop_ids), ignore_eos=flag(sp, "ignore_eos"), n=num("n", 1, int),
            sampling_seed=seed)
    except ValueError as e:
        raise RequestError(f"sampling_params: {e}") from e
    return ParsedSampling(params, requested, explicit, text)


def max_req_input_len(context_len: int) -> int:
    """Prompts must be shorter than this (SGLang's ``max_req_input_len``: ``context_len - 1 - 5``)."""
    return context_len - 1 - _INPUT_MARGIN


def generation_budget(s: ParsedSampling, prompt_len: int, context_len: int, where: str) -> int:
    """The tokens a prompt may generate, as SGLang bounds them. The tokenizer manager refuses
    a prompt that fills the context, and an explicit ``max_new_tokens`` that overflows it
    (the default 128 and ``null`` are not checked there); the scheduler refuses prompts of
    ``max_req_len - 5`` tokens or more and caps every budget (``null``: no limit) at
    ``max_req_len - prompt - 1``, with ``max_req_len = context_len - 1``."""
    if prompt_len >= context_len:
        raise RequestError(f"{where}: the input ({prompt_len} tokens) is longer than the model's context length "
                           f"({context_len} tokens)")
    if s.explicit_max_new_tokens is not None and prompt_len + s.explicit_max_new_tokens > context_len:
        raise RequestError(f"{where}: input tokens ({prompt_len}) + max_new_tokens ({s.explicit_max_new_tokens}) "
                           f"exceeds the context length ({context_len})")
    max_req_len = context_len - 1
    if prompt_len >= max_req_input_len(context_len):
        raise RequestError(f"{where}: input length ({prompt_len} tokens) exceeds the maximum allowed length "
                           f"({max_req_input_len(context_len)} tokens = context length {context_len} - 6)")
    cap = max_req_len - prompt_len - 1
    return max(0, min(UNLIMITED_NEW_TOKENS if s.max_new_tokens is None else s.max_new_tokens, cap))


def _check_input_ids(ids: Any) -> None:
    """SGLang's ``validate_optional_list_i64_1d_2d`` (gate 1): a list of integers or a list of
    lists of integers."""
    if not isinstance(ids, list):
        raise SchemaError(f"input_ids: must be list or null; got {type(ids).__name__}")
    if not ids:
        return
    if not (isinstance(ids[0], list) or _is_int(ids[0])):
        raise SchemaError(f"input_ids: elements must be int or list; got {type(ids[0]).__name__}")
    batch = isinstance(ids[0], list)
    for i, row in enumerate(ids if batch else [ids]):
        bad = [t for t in row if not _is_int(t)] if isinstance(row, list) else [row]
        if bad:
            where = f"input_ids[{i}]" if batch else "input_ids"
            raise SchemaError(f"{where}: must be a list of integers; got {bad[0]!r:.40}")


def _check_body_types(body: Any) -> None:
    """Gate 1: what pydantic refuses before SGLang looks at the request."""
    if not isinstance(body, dict):
        raise SchemaError(f"request body: input should be a JSON object, got {type(body).__name__}")
    text, ids, rid, sps = body.get("text"), body.get("input_ids"), body.get("rid"), body.get("sampling_params")
    if text is not None and not (isinstance(text, str) or
                                 (isinstance(text, list) and all(isinstance(t, str) for t in text))):
        raise SchemaError(f"text: must be a string or a list of strings, got {text!r:.80}")
    if ids is not None:
        _check_input_ids(ids)
    if rid is not None and not (isinstance(rid, str) or
                                (isinstance(rid, list) and all(isinstance(r, str) for r in rid))):
        raise SchemaError(f"rid: must be a string or a list of strings, got {rid!r:.80}")
    if isinstance(sps, list):
        for i, sp in enumerate(sps):
            if not isinstance(sp, dict):
                raise SchemaError(f"sampling_params[{i}]: input should be a valid dictionary, got {sp!r:.80}")
    elif sps is not None and not isinstance(sps, dict):
        raise SchemaError(f"sampling_params: input should be a dictionary or a list of dictionaries, got {sps!r:.80}")


def _prompts(body: dict, tokenizer) -> tuple[list[list[int]], bool]:
    """-> (prompts, single): ``text`` tokenized as SGLang does (``tokenizer(text)``, special
    tokens added), or ``input_ids`` as given."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("exactly one of text / input_ids must be given")
    if text is not None:
        if tokenizer is None:
            raise RequestError("text input needs a tokenizer; this model directory has none, send input_ids")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts:
            raise RequestError("text is an empty list")
        prompts = []
        for i, t in enumerate(texts):
            try:
                prompts.append(list(tokenizer(t)["input_ids"]))
            except Exception as e:  # noqa: BLE001 - e.g. a word-level vocabulary without an unknown token
                raise RequestError(f"text{'' if single else f'[{i}]'} ({t!r:.40}) cannot be tokenized: {e}") from e
        for i, (t, p) in enumerate(zip(texts, prompts)):
            if not p:
                raise RequestError(f"text{'' if single else f'[{i}]'} ({t!r:.40}) tokenizes to no tokens: empty prompt")
        return prompts, single
    single = not (len(ids) > 0 and isinstance(ids[0], list))
    return ([ids] if single else ids), single


def parse_generate(body: Any, *, context_len: int, vocab_size: int, tokenizer=None,
                   max_samples: int = 4096) -> ParsedGenerate:
    """A ``/generate`` body -> what the engine runs, or the first of SGLang's errors for it."""
    _check_body_types(body)
    if flag(body, "stream"):
        raise RequestError("stream=true is not supported by the embedded engine")
    if body.get("input_embeds") is not None:
        raise RequestError("input_embeds is not supported by the embedded engine")
    prompts, single = _prompts(body, tokenizer)
    if not prompts:
        raise RequestError("input_ids is empty")
    for i, p in enumerate(prompts):
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
    ns = [p.params.n for p in parsed]
    if len(set(ns)) != 1:
        raise RequestError(f"n must be the same in every sampling_params entry, got {ns}")
    if B * ns[0] > max_samples:
        raise RequestError(f"{B} prompts x n={ns[0]} asks {B * ns[0]} samples; this server takes at "
                           f"most {max_samples} per request (--max-samples-per-request)")
    params = [dataclasses.replace(s.params, max_new_tokens=generation_budget(s, len(p), context_len, f"prompt {i}"))
              for i, (p, s) in enumerate(zip(prompts, parsed))]
    rid = body.get("rid")
    if rid is None:
        rids: list[str | None] = [None] * B
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(B)]
    elif len(rid) == B:
        rids = list(rid)
    else:
        raise RequestError(f"rid must be a string or a list of {B} strings, got {len(rid)}")
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
    return ParsedGenerate(prompts=prompts, params=params, text_options=[s.text for s in parsed], rids=rids,
                          return_logprob=rl_list, return_text_in_logprobs=flag(body, "return_text_in_logprobs"),
                          return_routed_experts=flag(body, "return_routed_experts"),
                          routed_experts_start_len=start, single=single and ns[0] == 1)
