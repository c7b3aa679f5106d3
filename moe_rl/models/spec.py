"""Layer specs: Transformer Engine specs on GPU when installed, local specs otherwise.

The local (pure PyTorch) spec from Megatron-Core needs three fixes that are spec choices,
not patches (``docs/cpu-mode.md``, "What stays Megatron's own code" and "Megatron behaviours
we correct, on every platform"):

* ``SPRMSNorm``: Megatron's ``WrappedTorchNorm`` refuses sequence parallelism. Ours is a
  ``torch.nn.RMSNorm`` whose weight is tagged ``sequence_parallel`` so that
  ``finalize_model_grads`` all-reduces its gradient over TP.
* MLA core attention: ``DotProductAttention`` does not accept the ``k_channels``/``v_channels``
  keywords that multi-latent attention passes; ``MLADotProductAttention`` drops them.
* Checkpoint keys: a norm the TE spec fuses into the next linear is stored under TE's key
  (``te_checkpoint_keys_map``), so our checkpoints and Megatron-LM's TE-spec ones share keys.
  Megatron's local spec does this for dense layers only: for a MoE layer it stores the
  pre-MLP norm under the fused name TE does not use, and for MLA it maps nothing.
* MLA down-projections: as ColumnParallelLinear (the stock local spec) the rope part of the
  key gradient is never reduced over TP — silently wrong gradients at TP>1. They are
  replicated ``Linear`` layers instead (as the TE spec does with its duplicated TELinear).
* An attention output bias (Llama/Qwen3 ``attention_bias``): Megatron gives ``linear_proj``
  a bias only with ``add_bias_linear``, which would give every MLP linear one too; the spec
  swaps in the same linear class with its bias forced on (local and TE specs alike).
* Context parallelism: ``DotProductAttention`` refuses it; with CP > 1 the core attention is
  ``moe_rl.models.cp_attention`` (on GPU with TE, TE's own attention does CP).
"""

from __future__ import annotations

import copy

import torch

from megatron.core.transformer.spec_utils import ModuleSpec


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class SPRMSNorm(torch.nn.RMSNorm):
    """RMSNorm usable under sequence parallelism (weight tagged for the TP grad all-reduce)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        # Compute in fp32 like HF's RMSNorm, then cast back (identical in fp32).
        return super().forward(x.float()).to(x.dtype) if x.dtype != torch.float32 else super().forward(x)


def _mla_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                heads = self.num_attention_heads_per_partition
                self.hidden_size_per_partition = v_channels * heads

    return MLADotProductAttention


_NORM_FIELDS = ("input_layernorm", "pre_mlp_layernorm")
_ATTN_NORM_FIELDS = ("q_layernorm", "k_layernorm", "kv_layernorm")


def _fix_local_layer(spec: ModuleSpec, mla: bool, cp: bool = False) -> ModuleSpec:
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from moe_rl.models.param_map import te_checkpoint_keys_map

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    moe = isinstance(sub.mlp, ModuleSpec) and issubclass(sub.mlp.module, MoELayer)
    sub.sharded_state_dict_keys_map = te_checkpoint_keys_map(moe_layer=moe, mla=mla)
    for f in _NORM_FIELDS:
        if getattr(sub, f) is not IdentityOp:
            setattr(sub, f, SPRMSNorm)
    attn = sub.self_attention.submodules
    for f in _ATTN_NORM_FIELDS:
        if hasattr(attn, f) and getattr(attn, f) not in (None, IdentityOp):
            setattr(attn, f, SPRMSNorm)
    if mla:
        from megatron.core.post_training.modelopt.layers import Linear

        attn.core_attention = _mla_core_attention()
        attn.linear_q_down_proj = Linear
        attn.linear_kv_down_proj = Linear
    if cp:
        from moe_rl.models.cp_attention import context_parallel_attention_class

        attn.core_attention = context_parallel_attention_class()
    return spec


def with_bias(cls: type) -> type:
    """``cls`` (a Megatron linear) built with a bias whatever ``bias=`` its caller passes."""

    class Biased(cls):
        def __init__(self, *args, bias: bool = False, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    Biased.__name__ = Biased.__qualname__ = f"Biased{cls.__name__}"
    return Biased


def _out_bias(spec: ModuleSpec) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    attn.linear_proj = with_bias(attn.linear_proj)
    return spec


def decoder_block_spec(config, *, use_te: bool | None = None, pp_rank: int | None = None,
                       vp_stage: int | None = None, out_bias: bool = False):
    """The decoder block spec for ``config`` (dense and MoE layers mixed per
    ``config.moe_layer_freq``), sliced to this pipeline stage (and virtual stage).
    ``out_bias``: the attention output projection has a bias (``Family.attention_out_bias``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_te is None:
        use_te = te_available()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                       normalization="RMSNorm", pp_rank=pp_rank,
                                       vp_stage=vp_stage)
    if out_bias:
        block.layer_specs = [_out_bias(s) for s in block.layer_specs]
    if use_te:
        return block
    mla = bool(getattr(config, "multi_latent_attention", False))
    cp = getattr(config, "context_parallel_size", 1) > 1
    block.layer_specs = [_fix_local_layer(s, mla, cp) for s in block.layer_specs]
    block.layer_norm = SPRMSNorm
    return block
