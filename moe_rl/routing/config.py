"""``RoutingConfig``: capture, drift/load metrics and routing replay of the MoE routers."""

from __future__ import annotations

from dataclasses import dataclass

REPLAY_MODES = ("none", "r2", "r3")


@dataclass
class RoutingConfig:
    """What ``moe_rl.routing`` records in the trainer's passes and whether it replays routes."""

    replay: str = "none"  # none | r2: the old-policy pass's routes in the training passes | r3: the rollout engine's routes in the old-policy and training passes
    capture: bool = True  # record the top-k routes of every MoE layer in the old-policy pass (drift and load metrics; always on with r2/r3, which need them)
    router_probs: bool = True  # also keep each router's distribution over the experts (router_kl; E floats per token and MoE layer)
    old_new: bool = True  # one extra forward-only pass over the batch after the update, for the old->new drift (costs one forward)
    dump_every: int = 0  # save the step's routes every N steps for tools/routing_report.py (0 = never)

    def __post_init__(self) -> None:
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"routing.replay={self.replay!r} is not one of {', '.join(REPLAY_MODES)}")
        if self.dump_every < 0:
            raise ValueError(f"routing.dump_every ({self.dump_every}) must be >= 0")

    @property
    def records_old(self) -> bool:
        """The old-policy pass records its routes: for the metrics, as R2's source, and for R3 the
        routes of tokens the engine returned none for (replayed in the training passes, so the
        ratio's two sides route them alike instead of live)."""
        return self.capture or self.replay in ("r2", "r3")
