"""Tiny random HuggingFace checkpoints of every supported family, built offline.

Tests, the quickstart and ``tools/check_parity.py`` need real HF checkpoints without a model
hub: this builds one from a ``transformers`` config with random weights and
``save_pretrained``. Weights are re-drawn with a scale large enough that MoE routing is
decisive (a swapped expert changes the logits by O(1)) while activations stay finite.

``save_pretrained`` writes config.json before the weights, so a directory is written under a
temporary sibling name and renamed into place: a crash never leaves a half checkpoint under
the real name. :func:`ensure_tiny_hf` rebuilds a directory that is not complete (left by an
older writer or by hand) instead of trusting its config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from moe_rl.checkpoint.atomic import fsync_dir, fsync_tree
from moe_rl.models import FAMILIES

TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)  # every supported family has a tiny checkpoint


def tiny_hf_config(family: str, **overrides: Any):
    """A small ``transformers`` config of ``family`` (hidden 64, 4 heads, 8 experts top-2)."""
    import transformers as tf

    common = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], router_aux_loss_coef=0.0,
        )
    elif family == "mixtral":
        cfg = tf.MixtralConfig(
            **common, head_dim=16, intermediate_size=64, num_local_experts=8,
            num_experts_per_tok=2, router_aux_loss_coef=0.0,
        )
    elif family == "deepseek_v3":
        c = dict(common)
        c.update(num_key_value_heads=4)
        cfg = tf.DeepseekV3Config(
            **c, intermediate_size=128, moe_intermediate_size=32, n_shared_experts=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
            kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, rope_interleave=True, num_nextn_predict_layers=0,
        )
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16, intermediate_size=128)
    elif family == "llama":
        # attention biases on (q/k/v/o, as some Llama derivatives have): every layout and
        # conversion test of the family then covers the bias paths too
        cfg = tf.LlamaConfig(**common, head_dim=16, intermediate_size=128, attention_bias=True)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight: norms 1+0.1N, routers 0.5N, router bias 0.05N, others 0.1N.

    Matrices are scaled by 1/sqrt(fan_in) on top so deep stacks stay in range.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * n)
        elif name.endswith("gate.weight") and p.dim() == 2 and "proj" not in name:
            p.copy_(0.5 * n * (64 / p.shape[-1]) ** 0.5)
        elif "bias" in name:
            p.copy_(0.05 * n)
        elif p.dim() >= 2:
            p.copy_(n * (p.shape[-1] ** -0.5))
        else:
            p.copy_(0.1 * n)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))


def save_tiny_hf(family: str, out_dir: str | os.PathLike, *, seed: int = 0, **overrides: Any) -> str:
    """Write a tiny random ``family`` checkpoint (config + safetensors) to ``out_dir``,
    atomically: built in a temporary sibling directory, fsynced, then renamed into place
    (replacing whatever ``out_dir`` held)."""
    import transformers as tf

    out = Path(out_dir)
    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        fsync_tree(tmp)
        if out.exists():
            old = _sibling(out, "old", create=False)
            os.replace(out, old)
            shutil.rmtree(old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def is_complete_hf_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds config.json and every safetensors file its weights need (the
    index's files, else at least one ``*.safetensors``), each with a readable header."""
    from safetensors import safe_open

    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    index = p / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(p.glob("*.safetensors"))
        if not files:
            return False
        for f in files:
            with safe_open(str(f), "pt") as h:
                h.keys()
    except Exception:  # missing, truncated or garbled (safetensors raises its own error type)
        return False
    return True


def ensure_tiny_hf(family: str, out_dir: str | os.PathLike, *, seed: int = 0, **overrides: Any) -> str:
    """``out_dir`` if it already holds a complete checkpoint, else (re)build it there."""
    if is_complete_hf_dir(out_dir):
        return str(out_dir)
    return save_tiny_hf(family, out_dir, seed=seed, **overrides)


def _sibling(out: Path, tag: str, create: bool = True) -> Path:
    """A fresh hidden name next to ``out`` (same file system, so renames are atomic)."""
    p = out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if create:
        p.mkdir()  # not mkdtemp: its 0700 mode would become the checkpoint's
    return p


