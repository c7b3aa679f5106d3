"""One ``/generate`` response item (SGLang 0.5.23's ``{"text", "output_ids", "meta_info"}``), for
a finished sample or, in a stream, for one that is still running.

``meta_info`` holds SGLang's keys: ``id``, ``finish_reason`` (null while running),
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``,
``weight_version`` (the last span's) and ``weight_versions`` spans, ``num_retractions``;
``e2e_latency`` only once finished; with ``return_logprob`` the log-prob keys
(``logprobs.py``); ``routed_experts`` only once finished. ``prompt_token_ids`` is a top-level
key when asked; ``text`` is there when the server has a tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.embedded.engine import SeqResult
from moe_rl.rollout.embedded.http_context import ServerContext
from moe_rl.rollout.embedded.logprobs import TokenTexts, logprob_meta
from moe_rl.rollout.embedded.output_text import response_text
from moe_rl.rollout.embedded.protocol import ParsedGenerate


def response_item(ctx: ServerContext, req: ParsedGenerate, prompt_idx: int, x: SeqResult, latency: float | None, *,
                  text: str | None = None) -> dict:
    """The item of sample ``x`` of prompt ``prompt_idx``. A running sample (``x.finish`` None)
    has no ``latency``, no routed experts, and its stream's ``text`` so far."""
    engine = ctx.engine
    tok = ctx.tokenizer
    prompt = req.prompts[prompt_idx]
    meta: dict[str, Any] = {
        "id": x.rid, "finish_reason": x.finish, "prompt_tokens": x.prompt_len,
        "completion_tokens": len(x.output_ids), "cached_tokens": 0, "reasoning_tokens": 0,
        "weight_version": x.weight_version, "weight_versions": x.weight_versions,
        "num_retractions": x.num_retractions,
    }
    if latency is not None:
        meta["e2e_latency"] = latency
    if req.return_logprob[prompt_idx]:
        # SGLang: [logprob, id, text]; text only with return_text_in_logprobs and a tokenizer
        texts = TokenTexts(tok) if req.return_text_in_logprobs and tok is not None else None
        meta.update(logprob_meta(
            req.logprobs[prompt_idx] if req.logprobs else None, vocab_size=engine.vocab_size, prompt_ids=prompt,
            prompt=x.input_logprobs, output_ids=x.output_ids, output_logprobs=x.output_logprobs,
            output_top=x.output_top, output_token_ids=x.output_token_ids_logprobs, texts=texts))
    if x.finish is not None and req.return_routed_experts and x.routes_NLK is not None:
        routes_NLK = x.routes_NLK[req.routed_experts_start_len:]
        full_NHK = torch.full((routes_NLK.shape[0], engine.num_hidden_layers, routes_NLK.shape[2]), -1,
                              dtype=torch.int32)
        full_NHK[:, engine.moe_layer_ids] = routes_NLK
        meta["routed_experts"] = routed_experts_codec.encode(full_NHK)
    item: dict[str, Any] = {"output_ids": x.output_ids, "meta_info": meta}
    if req.return_prompt_token_ids:
        item["prompt_token_ids"] = list(prompt)
    if tok is not None:
        if text is None:
            o = req.text_options[prompt_idx]
            text = response_text(tok, prompt, x.output_ids, x.finish, skip_special_tokens=o.skip_special_tokens,
                                 spaces_between_special_tokens=o.spaces_between_special_tokens,
                                 no_stop_trim=o.no_stop_trim)
        item["text"] = text
    return item
