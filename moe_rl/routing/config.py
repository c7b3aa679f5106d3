"""``RoutingConfig``: capture, drift/load metrics and routing replay of the MoE routers."""

from __future__ import annotations

from dataclasses import dataclass

REPLAY_MODES = ("none", "r2", "r3")


@dataclass
class RoutingConfig:
    """What ``moe_rl.routing`` records in the trainer's passes and whether it replays routes."""

    replay: str = "none"  # none | r2: the old-policy pass's routes in the training passes | r3: the rollout engine's routes in the old-policy and training passes
    capture: bool = True  # record the top-k routes of every MoE layer in the old-policy pass (drift and load metrics)
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
        """The old-policy pass records its routes (for the metrics, or as R2's source)."""
        return self.capture or self.replay == "r2"
