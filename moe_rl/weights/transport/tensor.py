"""Tensor transport: each sender rank posts its buckets to every engine
(``/update_weights_from_tensor``), as safetensors bytes for the embedded engine or as
SGLang's own serializer payload for a real SGLang on the trainer's GPUs (``payload.py``)."""

from __future__ import annotations

from moe_rl.rollout.client import RolloutClient
from moe_rl.weights import checksum
from moe_rl.weights.export import ExportedBucket
from moe_rl.weights.payload import SAFETENSORS, encode_safetensors, encode_sglang
from moe_rl.weights.transport import SyncRound, Transport, drain, raise_if_failed
from moe_rl.weights.verify import check_replies


class TensorTransport(Transport):
    name = "tensor"

    def __init__(self, client: RolloutClient, fmt: str, *, engine_tp_size: int = 1) -> None:
        assert fmt in (SAFETENSORS, "sglang"), fmt
        self.client, self.fmt, self.engine_tp_size = client, fmt, engine_tp_size

    def ship(self, plan, stream, rnd: SyncRound) -> None:
        def send(b: ExportedBucket) -> None:
            named = b.named()
            sums = checksum.checksums(named) if rnd.verify else None
            if self.fmt == SAFETENSORS:
                payload, load_format = [encode_safetensors(named)], SAFETENSORS
            else:
                payload, load_format = encode_sglang(named, self.engine_tp_size), None
            replies = self.client.update_weights_from_tensor(payload, None, load_format=load_format,
                                                             stage_id=rnd.stage_id, checksums=sums)
            if sums is not None:
                check_replies([s.url for s in self.client.servers], replies, sums, f"bucket {b.index}")

        raise_if_failed(drain(stream, send, rnd))
