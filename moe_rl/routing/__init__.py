"""MoE routing: capture of top-k routes in the trainer's passes, drift and load metrics, and
routing replay (R2/R3) on Megatron-Core's own replay, scoped to one model and self-checked.

- :mod:`moe_rl.routing.layout`: routes in the trainer's micro-batch layout, engine routes
  attached to micro-batches, a router's token order.
- :mod:`moe_rl.routing.capture`: router forward hooks -> :class:`Routes` per micro-batch,
  keyed by global layer index, gathered over sequence-parallel slices.
- :mod:`moe_rl.routing.replay`: Megatron's ``RouterReplay`` per router of one model, routes
  fed per micro-batch, every replayed pass checked (mismatch, consumption).
- :mod:`moe_rl.routing.metrics`: pure per-layer counts and their named metrics.
- :mod:`moe_rl.routing.session`: :class:`RoutingSession`, what the loop holds per model.

How the loop (``moe_rl/loop.py``) uses it. Once, on every rank, after the policy is built
(collective under PP; a dense model gets a session that does nothing)::

    self.routing = RoutingSession(cfg.routing, tr.built.chunks, tr.groups, tr.built.hf_config)

The batch carries each row's engine routes: ``TrainBatch.routes`` ([B] of
``Sample.routed_experts_NLK`` or None, set by ``from_samples`` and kept by ``select``), and the
rollout keeps the samples' routes when ``routing.replay == "r3"`` or ``routing.capture``
(``moe_rl.rollout.in_process.keeps_routes``). Stage 5, old log-probs (the reference pass stays
outside: the reference routes live)::

    minibatches = tr.microbatches(batch, cfg.train.global_batch)
    flat = [mb for mbs in minibatches for mb in mbs]
    self.routing.attach(flat, batch.routes, batch.seq_lengths)  # routes_rollout, route_valid
    with self.routing.old_pass(flat):     # r3: replay the engine's routes; records routes_old
        tr.score(flat, tr.built, "old_logp")

Stage 6, the training passes, then the old -> new pass and the step's metrics::

    for _ in range(cfg.train.ppo_epochs):
        for mbs in minibatches:
            with self.routing.train_pass(mbs):  # r2: routes_old, r3: routes_rollout (gaps: routes_old)
                records.append(tr.step(mbs))
    if self.routing.active and cfg.routing.old_new and cfg.routing.records_old:
        with self.routing.new_pass(flat):   # live routing after the update, same batch
            tr.score(flat, tr.built, "new_logp")
    if cfg.routing.dump_every and (step + 1) % cfg.routing.dump_every == 0:
        self.routing.dump(flat, cfg.output_dir, step)   # collective; rank 0 writes
    routing_m = self.routing.metrics(flat)  # collective; merged into every record of the step

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
