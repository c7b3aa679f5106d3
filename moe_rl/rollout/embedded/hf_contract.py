"""What the embedded engine needs from a ``transformers`` causal LM, checked when it starts.

The engine drives the HF model class with its own KV cache and masks, so it depends on a
few behaviours that transformers does not promise to keep (5.24 renamed ``past_key_values``
to ``cache`` and changed how attention calls ``cache.update``; such a change used to kill the
engine loop on the first request while ``/health`` kept answering). The contract:

1. ``model.forward`` takes the cache as ``cache=`` (transformers >= 5.24) or
   ``past_key_values=`` (older), together with ``position_ids``, ``use_cache`` and
   ``logits_to_keep``;
2. every attention layer calls ``cache.update(key_BHTD, value_BHTD, layer_idx, ...)`` and
   attends to exactly the keys/values it returns;
3. a 4-D additive ``attention_mask`` is used as given (no causal mask added on top);
4. MoE routers sit at ``model.layers.{i}.mlp.gate`` and return ``(logits, weights, indices)``
   (``router_capture.py``).

:func:`check_engine_contract` runs one prefill and one decode step of a 3-token prompt
through the engine's own path and compares the decode logits with a plain full forward.
A break raises :class:`EngineContractError` naming the transformers version and the clause,
so the server refuses to start instead of failing every request.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from moe_rl.rollout.embedded.kv_cache import SlotKVCache


class EngineContractError(RuntimeError):
    """The installed transformers no longer behaves as the embedded engine relies on."""


def _version() -> str:
    import transformers

    return transformers.__version__


def expected_moe_layer_ids(hf_config) -> list[int] | None:
    """The MoE layers the model family defines (``Family.moe_layer_ids``); None for a model
    type outside the project's families (the engine then takes the routers it finds)."""
    from moe_rl.models import family_for

    try:
        family = family_for(hf_config)
    except ValueError:
        return None
    return family.moe_layer_ids(hf_config)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes the KV cache (clause 1)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise EngineContractError(
        f"transformers {_version()}: {type(model).__name__}.forward takes neither `cache` nor "
        f"`past_key_values` (it takes {sorted(params)}); the embedded engine cannot pass its KV cache")


def check_engine_contract(engine: Any) -> None:
    """One prefill + one decode through ``engine``'s own forward path (an ``EmbeddedEngine``:
    ``forward_prefill``, ``forward_decode``, ``capture``) vs a plain full forward."""
    try:
        _probe(engine)
    except EngineContractError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the probe is a broken contract
        raise EngineContractError(
            f"transformers {_version()}: the engine's probe forward of {type(engine.model).__name__} failed "
            f"({type(e).__name__}: {e}); the model no longer runs with the engine's KV cache and 4-D masks "
            "(clauses 1-3 of moe_rl/rollout/embedded/hf_contract.py)") from e


@torch.no_grad()
def _probe(engine: Any) -> None:
    model = engine.model
    V = engine.vocab_size
    ids = [min(3 + 7 * i, V - 1) for i in range(4)]
    cache = SlotKVCache(1, len(ids), engine.cache.dtype)
    kv, _ = engine.forward_prefill(ids[:3], cache)
    n_layers = engine.num_hidden_layers
    if cache.num_updates != n_layers:
        raise EngineContractError(
            f"transformers {_version()}: a prefill of {type(model).__name__} called cache.update "
            f"{cache.num_updates} times for {n_layers} layers (clause 2: every attention layer must "
            "call cache.update(key, value, layer_idx, ...) and attend to what it returns)")
    expected = engine.expected_moe_layers
    if engine.capture is not None and expected is not None and engine.capture.layer_ids != expected:
        raise EngineContractError(
            f"transformers {_version()}: routers of {type(model).__name__} found at layers "
            f"{engine.capture.layer_ids}, but the model family's MoE layers are {expected} "
            "(clause 4: a router at model.layers.{i}.mlp.gate of every MoE layer)")
    cache.load_prompt(0, kv)
    logits_1V = engine.forward_decode(torch.tensor([ids[3]]), torch.tensor([3]), cache)[0]
    ref_V = model(input_ids=torch.tensor([ids])).logits[0, -1]
    err = float((logits_1V.float() - ref_V.float()).abs().max())
    tol = 1e-3 * max(1.0, float(ref_V.float().abs().max())) * (1 if engine.cache.dtype == torch.float32 else 30)
    if not err <= tol:
        raise EngineContractError(
            f"transformers {_version()}: decode logits through the engine's KV cache differ from a full "
            f"forward of {type(model).__name__} by {err:.3g} (tolerance {tol:.3g}); attention no longer "
            "attends to what cache.update returns, or the 4-D mask is not used as given (clauses 2-3)")
