"""MoE routing: capture of top-k routes in the trainer's passes, drift and load metrics, and
routing replay (R2/R3) on Megatron-Core's own replay, scoped to one model and self-checked.

- :mod:`moe_rl.routing.capture`: router forward hooks -> :class:`Routes` per micro-batch,
  keyed by global layer index, gathered over sequence-parallel slices.
- :mod:`moe_rl.routing.replay`: Megatron's ``RouterReplay`` per router of one model, routes
  fed per micro-batch, every replayed pass checked (mismatch, consumption).
- :mod:`moe_rl.routing.metrics`: pure per-layer counts and their named metrics.
- :mod:`moe_rl.routing.session`: :class:`RoutingSession`, what the loop holds per model.

How the loop uses it (``cfg.routing`` is a :class:`RoutingConfig`; ``tr`` the Trainer;
``batch`` the step's TrainBatch, whose rows carry their samples' ``routed_experts_NLK``)::

    routing = RoutingSession(cfg.routing, [tr.built.module], tr.groups, tr.built.hf_config)  # once

    # (5) old log-probs
    minibatches = tr.microbatches(batch, cfg.train.global_batch)
    flat = [mb for mbs in minibatches for mb in mbs]
    if cfg.routing.replay == "r3" or cfg.routing.capture:   # engine routes of each batch row
        attach_engine_routes(flat, batch_routes, batch.seq_lengths, moe_layer_ids, num_experts=E)
    else:
        attach_positions(flat, batch.seq_lengths)
    with routing.old_pass(flat):
        tr.score(flat, tr.built, "old_logp")
    # (the reference pass stays outside: the reference routes live)

    # (6) training passes
    for mbs in minibatches:
        with routing.train_pass(mbs):
            records.append(self.train(mbs))
    if cfg.routing.old_new:                                  # after the update, same batch
        with routing.new_pass(flat):
            tr.score(flat, tr.built, "new_logp")
    routing_metrics = routing.metrics(flat)                  # collective; same dict on every rank

An R2/R3 self-check failure raises :class:`ReplayError` inside the forward (before the
optimizer step) or at the end of the pass; the run stops.
"""

from moe_rl.routing.config import RoutingConfig

# The rest imports Megatron-Core: loaded on first use, so the pure metrics (and the report tool)
# import without it.
_LAZY = {"Routes": "layout", "attach_engine_routes": "layout", "attach_positions": "layout",
         "moe_routers": "capture", "ModelReplay": "replay", "ReplayError": "replay", "RoutingSession": "session"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"moe_rl.routing.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moe_rl.routing' has no attribute {name!r}")


__all__ = ["RoutingConfig", *_LAZY]
