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
are given non-default values, instead of silently ignoring them (grammar, ``stop_regex``,
``custom_params``, ``beam_width``, ``watermark``, ``choice``, stop strings without a tokenizer,
``input_embeds``).

Penalties and ``logit_bias`` are served (``penalties.py``) and checked as SGLang's
``SamplingParams.verify`` checks them, with its messages (400 ``{"error": {"message"}}``):
``frequency_penalty`` and ``presence_penalty`` in [-2, 2], ``repetition_penalty`` in (0, 2],
``min_new_tokens`` in [0, max_new_tokens] (against the ``max_new_tokens`` given, the default 128
when absent, no bound for null; then lowered to the prompt's capped budget, as the scheduler
does), ``logit_bias`` keys integer strings in [0, vocab) (a key ``int()`` cannot read is
Python's ValueError text, as in SGLang; ``"1"`` and ``"01"`` name one token, the last wins).
As with SGLang without a tokenizer, ``min_new_tokens > 0`` is a 400 on a server whose model
directory has none. Unlike SGLang, a bias not finite in float32 is refused, naming the token:
``Infinity`` or a JSON number beyond float32's range (``1e300``) becomes ``inf`` in SGLang's
fp32 bias tensor, and the row's probabilities NaN. What SGLang ignores is
ignored here too: ``logprob_start_len``, ``top_logprobs_num`` and ``token_ids_logprob`` of a
prompt without ``return_logprob``; an empty grammar string (SGLang treats ``""`` as unset).

Log-probs (``logprobs.py`` computes them): with ``return_logprob``, a ``logprob_start_len`` in
``[0, prompt)`` asks prompt log-probs from that position, -1 or the prompt's length output
log-probs only, more than the prompt is SGLang's 400, and below -1 (which SGLang does not
check and mishandles) a 400 here; ``top_logprobs_num > 0`` asks top log-probs (at most the
vocabulary size), ``token_ids_logprob`` (a list of ids, or one list per prompt; ``[]`` is
unset) the log-probs of those ids, both at prompt and output positions.

Streaming: ``stream: true`` is served as SGLang's Server-Sent Events (``generate_stream.py``);
``sampling_params.stream_interval`` (an integer, default 1) sets how many new tokens a chunk
waits for. With ``stream: true`` a :class:`RequestError` is not a 400 but an error event of an
HTTP 200 stream, as SGLang raises those inside the stream it has already started.

``priority`` is accepted and ignored (no priority scheduling), but checked as SGLang checks it:
an integer or null, within signed 64 bits. ``sampling_seed`` is SGLang's ``[-2**63, 2**63)``.

What SGLang refuses with a 400 is refused here with its message: duplicate ``rid`` values (within the
request, or one still in flight: ``generate_api.py``), a list-valued logprob field with
``n > 1``, and the features a server started without them refuses (``lora_path``,
``custom_logit_processor``, ``return_hidden_states``, ``max_thinking_tokens``, a
``routed_dp_rank`` other than 0).
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
import math
from typing import Any

from moe_rl.rollout.embedded.logprobs import LogprobSpec
from moe_rl.rollout.types import (FP32_MAX, TOP_K_ALL, SamplingParams, check_penalties, check_stop_strings,
                                  logit_bias_range_error)

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
    "stop_regex": (None, []), "json_schema": (None, ""),
    "regex": (None, ""), "ebnf": (None, ""), "structural_tag": (None, ""),
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
    return_prompt_token_ids: bool  # each item carries its prompt's ids (SGLang: top-level "prompt_token_ids")
    return_routed_experts: bool
    routed_experts_start_len: int
    single: bool  # reply with one object instead of a list
    # per prompt, with return_logprob: the extra log-probs it asks (None: output log-probs only,
    # or no return_logprob)
    logprobs: list[LogprobSpec | None] = dataclasses.field(default_factory=list)
    stream: bool = False
    stream_intervals: list[int] = dataclasses.field(default_factory=list)  # [B], >= 1


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
    """One ``sampling_params`` object. ``params.max_new_tokens`` holds the value asked (the
    default 128, or :data:`UNLIMITED_NEW_TOKENS` for null) until :func:`generation_budget` sets
    the prompt's budget from the two fields below."""

    params: SamplingParams
    max_new_tokens: int | None  # 128 when absent, None for null (no limit)
    explicit_max_new_tokens: int | None  # the value given (not null): the one SGLang checks against the context
    text: TextOptions
    stream_interval: int = 1  # new tokens per streamed chunk (SGLang: null / 0 mean the default, 1)


def _parse_logit_bias(sp: dict, vocab_size: int) -> dict[int, float] | None:
    """``sampling_params.logit_bias`` (``{"<token id>": bias}``) -> ``{id: bias}``, checked as
    SGLang checks it (module docstring); None when absent or empty."""
    bias = sp.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ContractError(f"invalid type: sampling_params.logit_bias must be a map of token id strings to "
                            f"numbers, got {bias!r:.80}")
    for k, v in bias.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ContractError(f"invalid type: sampling_params.logit_bias[{k!r}] must be a number, got {v!r:.80}")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            token = int(k)  # SGLang's parse: a key int() cannot read is its ValueError
        except ValueError as e:
            raise RequestError(str(e)) from e
        if not 0 <= token < vocab_size:
            raise RequestError(logit_bias_range_error(k, vocab_size))
        if abs(v) > FP32_MAX or not math.isfinite(v):  # abs first: math.isfinite(10**400) overflows
            raise RequestError(f"sampling_params.logit_bias[{k!r}]={v} (token {token}) must be a finite number "
                               f"within float32's range (|bias| <= {FP32_MAX:.7g})")
        out[token] = float(v)
    return out or None


def _parse_penalties(sp: dict, requested: int | None, *, has_tokenizer: bool) -> dict[str, Any]:
    """The penalty fields (type-checked, then SGLang's range checks on the values as given) ->
    SamplingParams keyword arguments."""
    raw: dict[str, Any] = {}
    for key, default in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0)):
        v = sp.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ContractError(f"invalid type: sampling_params.{key} must be a number, got {v!r}")
        raw[key] = default if v is None else v
    m = sp.get("min_new_tokens")
    if m is not None and not _is_int(m):
        raise ContractError(f"invalid type: sampling_params.min_new_tokens must be an integer, got {m!r}")
    raw["min_new_tokens"] = 0 if m is None else m
    try:
        check_penalties(raw["frequency_penalty"], raw["presence_penalty"], raw["repetition_penalty"],
                        raw["min_new_tokens"], requested)
    except ValueError as e:
        raise RequestError(str(e)) from e
    if raw["min_new_tokens"] > 0 and not has_tokenizer:  # SGLang's raise_if_tokenizer_required
        raise RequestError(f"min_new_tokens={raw['min_new_tokens']} is unavailable when skip_tokenizer_init=True "
                           "(requires tokenizer for eos_token_id).")
    return {k: (v if k == "min_new_tokens" else float(v)) for k, v in raw.items()}


def parse_sampling(sp: Any, *, has_tokenizer: bool, vocab_size: int) -> ParsedSampling:
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
        try:
            return kind(v)
        except OverflowError as e:  # a JSON integer beyond any float (10**400)
            raise RequestError(f"sampling_params: {key} ({v!r:.40}...) must be a finite number") from e

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
    penalties = _parse_penalties(sp, requested, has_tokenizer=has_tokenizer)
    logit_bias = _parse_logit_bias(sp, vocab_size)
    try:
        params = SamplingParams(
            max_new_tokens=UNLIMITED_NEW_TOKENS if requested is None else requested,
            temperature=num("temperature", 1.0, float),
            top_p=num("top_p", 1.0, float), top_k=num("top_k", TOP_K_ALL, int), min_p=num("min_p", 0.0, float),
            stop=stop, stop_token_ids=list(stop_ids), ignore_eos=flag(sp, "ignore_eos", where="sampling_params."),
            n=num("n", 1, int), sampling_seed=seed, logit_bias=logit_bias, **penalties)
    except ContractError:  # a value of the wrong JSON type (num, flag): SGLang's flat {"error": "..."}
        raise
    except ValueError as e:
        raise RequestError(f"sampling_params: {e}") from e
    interval = num("stream_interval", 0, int)
    return ParsedSampling(params, requested, explicit, text, max(1, interval))


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
    stream = flag(body, "stream")
    _check_priority(body.get("priority"))
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
        parsed = [parse_sampling(sp, has_tokenizer=tokenizer is not None, vocab_size=vocab_size) for sp in sps]
    else:
        parsed = [parse_sampling(sps, has_tokenizer=tokenizer is not None, vocab_size=vocab_size)] * B
    ns = [p.params.n for p in parsed]
    if len(set(ns)) != 1:
        raise RequestError(f"n must be the same in every sampling_params entry, got {ns}")
    if B * ns[0] > max_samples:
        raise RequestError(f"{B} prompts x n={ns[0]} asks {B * ns[0]} samples; this server takes at "
                           f"most {max_samples} per request (--max-samples-per-request)")
    budgets = [generation_budget(s, len(p), context_len, f"prompt {i}")
               for i, (p, s) in enumerate(zip(prompts, parsed))]
    # the scheduler lowers min_new_tokens to a capped budget (scheduler.py, after the clipping)
    params = [dataclasses.replace(s.params, max_new_tokens=b, min_new_tokens=min(s.params.min_new_tokens, b))
              for s, b in zip(parsed, budgets)]
    rid = body.get("rid")
    if rid is None:
        rids: list[str | None] = [None] * B
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(B)]
    elif len(rid) == B:
        rids = list(rid)
    else:
        raise RequestError(f"rid must be a string or a list of {B} strings, got {len(rid)}")
    rids_given = [r for r in rids if r is not None]
    if len(set(rids_given)) != len(rids_given):  # io_struct.py _validate_rid_uniqueness
        dups = [r for r in dict.fromkeys(rids_given) if rids_given.count(r) > 1]
        raise RequestError(f"Duplicate request IDs detected within the request: {dups}")
    rl = body.get("return_logprob", False)
    if isinstance(rl, list):
        if not all(isinstance(x, bool) for x in rl):
            raise ContractError(f"invalid type: return_logprob must be a boolean or a list of booleans, got {rl!r:.80}")
    else:
        flag(body, "return_logprob")
    n = ns[0]
    rl_list = [bool(x) for x in _per_prompt(body, "return_logprob", False, B, n)]
    specs = _logprob_specs(body, prompts, rl_list, n, vocab_size)
    _check_unserved_features(body, single and n == 1)
    start = body.get("routed_experts_start_len", 0)
    if not _is_int(start) or start < 0 or any(start > len(p) for p in prompts):
        raise RequestError(f"routed_experts_start_len ({start}) must be an integer in [0, prompt tokens "
                           f"({min(len(p) for p in prompts)})]")
    return ParsedGenerate(prompts=prompts, params=params, text_options=[s.text for s in parsed], rids=rids,
                          return_logprob=rl_list, return_text_in_logprobs=flag(body, "return_text_in_logprobs"),
                          return_prompt_token_ids=flag(body, "return_prompt_token_ids"),
                          return_routed_experts=flag(body, "return_routed_experts"),
                          routed_experts_start_len=start, single=single and ns[0] == 1, logprobs=specs,
                          stream=stream, stream_intervals=[s.stream_interval for s in parsed])


def _check_priority(v: Any) -> None:
    """``priority`` (unused: this engine has no priority scheduling) as SGLang checks it: an
    integer or null (its contract's ``Optional[int]``: ``"5"``, ``5.0`` and ``true`` are type
    errors), within signed 64 bits (the tokenizer manager's check, its message)."""
    if v is None:
        return
    if not _is_int(v):
        raise ContractError(f"invalid type: priority must be an integer, got {v!r:.80}")
    if not -(1 << 63) <= v < (1 << 63):
        raise RequestError(f"priority must be a signed 64-bit integer between -9223372036854775808 and "
                           f"9223372036854775807, got {v}")


def _per_prompt(body: dict, key: str, default: Any, B: int, n: int) -> list:
    """``body[key]`` for each of the B prompts: one value for all, or a list of B (SGLang's
    ``normalize_param``: a list with ``n > 1`` is a 400)."""
    v = body.get(key)
    if v is None:
        return [default] * B
    if not isinstance(v, list):
        return [v] * B
    if n > 1:
        raise RequestError(f"Cannot use list {key} with parallel_sample_num > 1")
    if len(v) != B:
        raise RequestError(f"{key} has {len(v)} entries for {B} prompts")
    return list(v)


def _int_or_ints(body: dict, key: str) -> None:
    v = body.get(key)
    if v is None:
        return
    if not (_is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))):
        raise SchemaError(f"{key}: must be an integer or a list of integers, got {v!r:.80}")


def _token_ids_logprob(token_ids: Any, B: int, n: int, vocab_size: int) -> list[tuple[int, ...] | None]:
    """SGLang's ``token_ids_logprob`` (checked with or without ``return_logprob``): a list of
    ids for every prompt, or one list per prompt (not with ``n > 1``), each id in the
    vocabulary; absent or ``[]`` is unset. -> per prompt, the ids (None: unset)."""
    if not token_ids:
        return [None] * B
    rows = token_ids if isinstance(token_ids, list) and isinstance(token_ids[0], list) else [token_ids]
    if not isinstance(token_ids, list) or not all(isinstance(r, list) and all(_is_int(t) for t in r) for r in rows):
        raise SchemaError(f"token_ids_logprob: must be a list of integers or a list of lists of integers, "
                          f"got {token_ids!r:.80}")
    per_prompt = isinstance(token_ids[0], list)
    if per_prompt and n > 1:
        raise RequestError("Cannot use list token_ids_logprob with parallel_sample_num > 1")
    for t in (t for r in rows for t in r):
        if not 0 <= t < vocab_size:
            raise RequestError(f"token_ids_logprob contains out-of-vocabulary token id {t}; valid range is "
                               f"[0, {vocab_size}).")
    if not per_prompt:
        return [tuple(token_ids)] * B
    if len(rows) != B:
        raise RequestError(f"token_ids_logprob has {len(rows)} lists for {B} prompts")
    return [tuple(r) for r in rows]


def _logprob_specs(body: dict, prompts: list[list[int]], return_logprob: list[bool], n: int,
                   vocab_size: int) -> list[LogprobSpec | None]:
    """``logprob_start_len`` / ``top_logprobs_num`` / ``token_ids_logprob`` as SGLang's scheduler
    reads them, per prompt: ignored without ``return_logprob``; a start of -1 or of the
    prompt's length means output log-probs only; a start past the prompt is SGLang's 400.
    -> per prompt, what it asks besides output log-probs (None: nothing more)."""
    for key in ("logprob_start_len", "top_logprobs_num"):
        _int_or_ints(body, key)
    B = len(prompts)
    starts = _per_prompt(body, "logprob_start_len", -1, B, n)
    tops = _per_prompt(body, "top_logprobs_num", 0, B, n)
    token_ids = _token_ids_logprob(body.get("token_ids_logprob"), B, n, vocab_size)
    specs: list[LogprobSpec | None] = []
    for i, (p, want, start, top, ids) in enumerate(zip(prompts, return_logprob, starts, tops, token_ids)):
        where = "" if B == 1 else f" (prompt {i})"
        if not want:
            specs.append(None)
            continue
        if start > len(p):
            raise RequestError(f"req.logprob_start_len={start} is higher than the number of input tokens "
                               f"len(req.origin_input_ids)={len(p)}. Please use a smaller logprob_start_len.")
        if start < -1:
            raise RequestError(f"logprob_start_len={start}{where} must be -1 (output log-probs only) or a prompt "
                               f"position in [0, {len(p)}]")
        if top > vocab_size:
            raise RequestError(f"top_logprobs_num={top}{where} exceeds the vocabulary size ({vocab_size})")
        spec = LogprobSpec(input_start=start if 0 <= start < len(p) else None, top_k=max(0, top), token_ids=ids)
        specs.append(None if spec == LogprobSpec() else spec)
    return specs


def _lora_asked(v: Any, single: bool) -> tuple[bool, str | None]:
    """Whether SGLang sees an adapter requested (``_validate_and_resolve_lora``: ``lora_path``
    truthy after normalization, where a batch repeats a string per prompt, so there even ``""``
    counts), and the first one named."""
    if v is None:
        return False, None
    if not (isinstance(v, str) or (isinstance(v, list) and all(x is None or isinstance(x, str) for x in v))):
        raise SchemaError(f"lora_path: must be a string or a list of strings, got {v!r:.80}")
    names = [v] if isinstance(v, str) else v
    asked = bool(v) if single else bool(names)
    return asked, next((a for a in names if a), None)


def _hidden_states_asked(v: Any) -> bool:
    """``return_hidden_states`` (a boolean, "last", or a list of them) asks for hidden states."""
    items = v if isinstance(v, list) else [v]
    for x in items:
        if x is None or x is False:
            continue
        if x is True or x == "last":
            return True
        raise SchemaError(f"return_hidden_states: must be a boolean or the string literal 'last', got {x!r:.80}")
    return False


def _check_unserved_features(body: dict, single: bool) -> None:
    """What SGLang refuses (400, its messages) on a server started without the feature; this
    engine has none of them."""
    for key in ("max_thinking_tokens", "routed_dp_rank", "data_parallel_rank"):
        v = body.get(key)
        if v is not None and not _is_int(v):
            raise SchemaError(f"{key}: must be an integer, got {v!r:.80}")
    if body.get("max_thinking_tokens") is not None:
        raise RequestError("max_thinking_tokens requires the server to be launched with --enable-strict-thinking")
    dp = body.get("routed_dp_rank")
    if dp is None:
        dp = body.get("data_parallel_rank")  # SGLang's deprecated alias
    if dp is not None and dp != 0:  # one DP rank: 0 is ignored, anything else out of range
        raise RequestError(f"routed_dp_rank={dp} out of range [0, 1)")
    asked, lora = _lora_asked(body.get("lora_path"), single)
    if asked:
        raise RequestError(f"LoRA adapter '{lora}' was requested, but LoRA is not enabled. Please launch the server "
                           "with --enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter "
                           "endpoint.")
    if _hidden_states_asked(body.get("return_hidden_states")):
        raise RequestError("The server is not configured to return hidden states. Please set "
                           "`--return-hidden-states-mode last`, `--return-hidden-states-mode full`, or the legacy "
                           "`--enable-return-hidden-states` flag.")
    clp = body.get("custom_logit_processor")
    if clp is not None and not (isinstance(clp, str) or
                                (isinstance(clp, list) and all(x is None or isinstance(x, str) for x in clp))):
        raise SchemaError(f"custom_logit_processor: must be a string or a list of strings, got {clp!r:.80}")
    if any(clp if isinstance(clp, list) else [clp]):
        raise RequestError("The server is not configured to enable custom logit processor. Please set "
                           "`--enable-custom-logit-processor` to enable this feature.")
