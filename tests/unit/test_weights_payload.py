"""Payloads and checksums of the weight sync: safetensors bytes round-trip exactly, a pickle
is never accepted as one, SGLang's payload is its own serializer's, and a checksum changes
with any flipped bit, reshape or cast."""

from __future__ import annotations

import base64
import io
import sys
import types

import pytest
import torch

from moe_rl.weights import checksum
from moe_rl.weights.config import WeightSyncConfig
from moe_rl.weights.payload import decode_safetensors, encode_safetensors, encode_sglang


def test_safetensors_payload_round_trips_bitwise():
    full = torch.randn(6, 4)
    gate, up = full.chunk(2)  # views of one storage, as the export's glu split gives
    named = [("a.bf16", torch.randn(3, 5).bfloat16()), ("gate", gate), ("up", up), ("scalar", torch.tensor(2.5)),
             ("ids", torch.arange(7))]
    back = dict(decode_safetensors(encode_safetensors(named)))
    assert back.keys() == dict(named).keys()
    for n, t in named:
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    with pytest.raises(ValueError, match="appears twice"):
        encode_safetensors([("x", gate), ("x", up)])


def test_a_pickle_or_garbage_is_not_a_safetensors_payload():
    buf = io.BytesIO()
    torch.save([("w", torch.zeros(2))], buf)
    with pytest.raises(ValueError, match="not a safetensors payload"):
        decode_safetensors(base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(ValueError, match="not base64"):
        decode_safetensors("!!")
    with pytest.raises(ValueError, match="base64 string"):
        decode_safetensors(b"abc")


def test_sglang_payload_is_its_serializer_once_per_engine_tp_rank(monkeypatch):
    calls = []

    class FakeSerializer:
        @staticmethod
        def serialize(obj, output_str=False):
            calls.append((obj, output_str))
            return "blob"

    utils = types.ModuleType("sglang.srt.utils")
    utils.MultiprocessingSerializer = FakeSerializer
    for name, mod in (("sglang", types.ModuleType("sglang")), ("sglang.srt", types.ModuleType("sglang.srt")),
                      ("sglang.srt.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    named = [("w", torch.zeros(2))]
    assert encode_sglang(named, engine_tp_size=2) == ["blob", "blob"]
    assert calls == [(named, True)]


def test_without_sglang_its_payload_is_a_clear_error(monkeypatch):
    # as if not installed: no sglang module at all, including submodules other tests imported
    for name in [m for m in sys.modules if m.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(RuntimeError, match="needs the sglang package"):
        encode_sglang([("w", torch.zeros(2))])


def test_checksum_sees_every_bit_shape_and_dtype():
    t = torch.randn(8, 16)
    base = checksum.tensor_checksum(t)
    assert checksum.tensor_checksum(t.clone()) == base
    flipped = t.clone()
    flipped.view(torch.int32)[3, 7] ^= 1  # the lowest mantissa bit of one element
    assert checksum.tensor_checksum(flipped) != base
    assert checksum.tensor_checksum(t.reshape(16, 8)) != base
    assert checksum.tensor_checksum(t.t()) != base  # same elements, other layout
    assert checksum.tensor_checksum(t.double()) != base
    assert checksum.tensor_checksum(torch.randn(3).bfloat16()) != checksum.tensor_checksum(torch.randn(3).bfloat16())
    sent = {"a": base, "b": "00000000"}
    checksum.verify({"a": base, "b": "00000000"}, sent)
    with pytest.raises(checksum.ChecksumMismatch, match=r"b: checksum 11111111 of the received tensor \(x\) differs"):
        checksum.verify({"a": base, "b": "11111111"}, sent, where="x")
    with pytest.raises(checksum.ChecksumMismatch, match="b: checksum sent but the tensor did not arrive"):
        checksum.verify({"a": base}, sent)
    with pytest.raises(checksum.ChecksumMismatch, match="c: received but no checksum"):
        checksum.verify({**sent, "c": base}, sent)


@pytest.mark.parametrize("kw,msg", [
    ({"transport": "carrier-pigeon"}, r"weights.transport \('carrier-pigeon'\) must be one of"),
    ({"transport": "disk"}, "needs weights.disk_dir"),
    ({"tensor_format": "pickle"}, "weights.tensor_format"),
    ({"bucket_bytes": 10}, r"weights.bucket_bytes \(10\) must be at least 1024"),
    ({"probe_new_tokens": 0}, r"weights.probe_new_tokens \(0\) must be >= 1"),
    ({"probe_max_logprob_diff": 0.0}, "must be > 0"),
    ({"probe_interval": 0}, r"weights.probe_interval \(0\) must be >= 1"),
])
def test_config_refuses_bad_values_with_the_numbers(kw, msg):
    with pytest.raises(ValueError, match=msg):
        WeightSyncConfig(**kw)


def test_probe_runs_after_the_first_sync_and_every_interval_th():
    assert [v for v in range(13) if WeightSyncConfig().probe_due(v)] == list(range(13))
    assert [v for v in range(25) if WeightSyncConfig(probe_interval=10).probe_due(v)] == [0, 1, 10, 20]
    assert not any(WeightSyncConfig(probe=False).probe_due(v) for v in range(5))
    # the sync passes the engines' version string
    assert [v for v in map(str, range(25)) if WeightSyncConfig(probe_interval=10).probe_due(v)] == ["0", "1", "10", "20"]
    assert WeightSyncConfig(probe_interval=10).probe_due("v7-hotfix")


def test_flattened_bucket_is_what_the_receiver_reads_back_bitwise():
    """The sender's layout against the receiver's own view of it (the embedded server's
    ``flattened_bucket``, SGLang's ``FlattenedTensorBucket`` layout): a bucket that mixes
    fp32, bf16 and odd sizes goes widest first, so no offset is unaligned, and every tensor
    comes back bit for bit."""
    import torch

    from moe_rl.rollout.embedded.weights_api import flattened_bucket
    from moe_rl.weights.transport.distributed import flatten_bucket

    g = torch.Generator().manual_seed(0)
    named = [("a.bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 30 bytes: would misalign fp32
             ("b.fp32", torch.randn(7, generator=g)),
             ("c.bf16", torch.randn(1, generator=g).to(torch.bfloat16)),
             ("d.fp32", torch.randn(2, 3, generator=g)[:, 1]),  # not contiguous
             ("e.i64", torch.arange(3))]
    tensors = [t for _, t in named]
    order, flat = flatten_bucket(tensors)
    assert [named[i][0] for i in order] == ["e.i64", "b.fp32", "d.fp32", "a.bf16", "c.bf16"]
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for t in tensors)
    buf, views = flattened_bucket([named[i][0] for i in order], [(list(tensors[i].shape), tensors[i].dtype)
                                                                for i in order])
    buf.copy_(flat)  # what the broadcast delivers
    for i, v in zip(order, views):
        assert v.dtype == tensors[i].dtype and torch.equal(v.view(torch.uint8), tensors[i].contiguous().view(torch.uint8))
