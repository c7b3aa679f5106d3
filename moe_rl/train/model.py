"""Build the policy (or, by the same code, a frozen reference) at a layout and load HF weights.

Parallel semantics: every rank of the job calls :func:`build_model` with the same arguments;
each rank builds only its pipeline stages and its experts and reads only its own shards.

A rank holds one model chunk per virtual pipeline stage (``parallel.virtual_pipeline``; one
chunk without it): ``BuiltModel.chunks`` in virtual-stage order, each a ``GPTModel`` holding
the layers of its stage (``ParallelDims.stage_layers``), the first chunk of the first
pipeline rank the embedding, the last chunk of the last rank the output layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from moe_rl.models import Family, family_for
from moe_rl.models.hf_checkpoint import HFCheckpoint, unmapped_tensors
from moe_rl.models.param_map import ParamMap, canonical_name, shard, spelling_of
from moe_rl.models.spec import decoder_block_spec
from moe_rl.parallel.dims import ParallelDims
from moe_rl.parallel.groups import Groups

_log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    chunks: list  # this rank's GPTModel per virtual pipeline stage (unwrapped), in stage order
    family: Family
    hf_config: Any
    param_map: ParamMap
    layer_offsets: list  # global index of each chunk's first decoder layer
    expert_offset: int
    padded_vocab_size: int

    @property
    def module(self) -> torch.nn.Module:
        """The model of this rank when it holds one chunk (no virtual pipeline)."""
        if len(self.chunks) != 1:
            raise ValueError(f"this rank holds {len(self.chunks)} model chunks (virtual_pipeline); "
                             "use BuiltModel.chunks")
        return self.chunks[0]

    @property
    def layer_offset(self) -> int:
        self.module  # noqa: B018 (one chunk only)
        return self.layer_offsets[0]

    @property
    def head(self) -> torch.nn.Module | None:
        """The chunk with the output layer (last chunk of the last pipeline stage), else None."""
        last = self.chunks[-1]
        return last if getattr(last, "post_process", False) else None


def megatron_config(hf_config, dims: ParallelDims, *, params_dtype=torch.float32, moe_aux_loss_coeff: float = 0.0,
                    log: bool = True, **config_overrides):
    """The Megatron ``TransformerConfig`` :func:`build_model` builds with (pure, no process group).

    ``moe_aux_loss_coeff`` (``TrainConfig.moe_aux_loss_coeff``) is the only source of the MoE
    load-balancing loss; a non-zero value is logged once (``log``), since it adds a gradient
    term beside the RL objective."""
    family = family_for(hf_config)
    tc = family.transformer_config(hf_config, dims, params_dtype=params_dtype,
                                   moe_aux_loss_coeff=moe_aux_loss_coeff, **config_overrides)
    if log and tc.num_moe_experts and tc.moe_aux_loss_coeff > 0:
        hf_coef = getattr(hf_config, "router_aux_loss_coef", None)
        unused = f"; the checkpoint's router_aux_loss_coef {hf_coef:g} is not used" if hf_coef is not None else ""
        _log.warning(f"MoE load-balancing aux loss ON: coefficient {tc.moe_aux_loss_coeff:g} from "
                     f"train.moe_aux_loss_coeff, type {tc.moe_router_load_balancing_type}{unused}")
    return tc


def build_model(hf_config, groups: Groups, *, params_dtype=torch.float32, moe_aux_loss_coeff: float = 0.0,
                use_te: bool | None = None, **config_overrides) -> BuiltModel:
    """The family's Megatron model at ``groups``' layout. ``use_te``: Transformer Engine specs
    (default: when installed and CUDA is present), else Megatron's local specs."""
    from megatron.core.models.gpt import GPTModel

    family = family_for(hf_config)
    dims = groups.dims
    dims.check_model(family.shape(hf_config))
    tc = megatron_config(hf_config, dims, params_dtype=params_dtype, moe_aux_loss_coeff=moe_aux_loss_coeff,
                         log=groups.rank == 0, **config_overrides)
    padded = family.padded_vocab_size(hf_config, dims)
    chunks, offsets = [], []
    for vp in range(dims.vpp):
        vp_stage = vp if dims.vpp > 1 else None
        model = GPTModel(
            config=tc,
            transformer_layer_spec=decoder_block_spec(tc, use_te=use_te, pp_rank=groups.pp_rank, vp_stage=vp_stage,
                                                      out_bias=family.attention_out_bias(hf_config)),
            vocab_size=padded,
            pre_process=groups.is_first_stage and vp == 0,
            post_process=groups.is_last_stage and vp == dims.vpp - 1,
            parallel_output=True,
            vp_stage=vp_stage,
            **family.gpt_kwargs(hf_config),
        )
        _mark_expert_params(model)
        stage = dims.layer_range(hf_config.num_hidden_layers, groups.pp_rank, vp)
        layers = model.decoder.layers
        assert [l.layer_number - 1 for l in layers] == list(stage), (
            f"Megatron built layers {[l.layer_number - 1 for l in layers]} for stage {stage}")
        chunks.append(model)
        offsets.append(stage.start)
    n_exp = family.num_experts(hf_config)
    expert_offset = groups.ep_rank * (n_exp // dims.ep) if n_exp else 0
    # The map in the names of the spec in use (TE fuses norms into linears and may group experts).
    spelling = spelling_of(n for c in chunks for n, _ in c.named_parameters())
    param_map = family.param_map(hf_config).respelled(spelling, moe_layers=family.moe_layers(hf_config),
                                                      mla=bool(getattr(tc, "multi_latent_attention", False)))
    return BuiltModel(chunks, family, hf_config, param_map, offsets, expert_offset, padded)


def build_reference(hf_config, hf_dir, groups: Groups, *, params_dtype=torch.float32) -> BuiltModel:
    """The frozen reference policy: the same build and loading as the policy, then no
    gradients, eval mode, and no DDP/optimizer (it only runs forward)."""
    built = build_model(hf_config, groups, params_dtype=params_dtype)
    load_hf_weights(built, hf_dir, groups)
    for chunk in built.chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return built


def _mark_expert_params(model: torch.nn.Module) -> None:
    """Megatron-Core 0.16.1 tags expert weights ``allreduce=False`` only when EP > 1
    (``tensor_parallel/layers.py:829,886,1209``, ``moe/experts.py:203``). At EP=1 they are
    reduced over the DENSE data-parallel group, which is the wrong group whenever
    expert_tensor_parallel != tensor_parallel: measured TP2 x ETP1 grad norm 4.5254 vs 4.5409
    (transformers) and diverging losses; TP1 x ETP2 summed different shards' gradients. Tag
    them always, so DDP reduces them over the expert data-parallel group and the optimizer
    chain treats them as expert parameters. Applies on GPU too."""
    for name, p in model.named_parameters():
        if ".mlp.experts." in name and "shared_experts" not in name:
            p.allreduce = False


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def local_tensors(built: BuiltModel):
    """(chunk index, local name, canonical name, tensor) for every parameter and mapped buffer
    of this rank."""
    for c, (chunk, offset) in enumerate(zip(built.chunks, built.layer_offsets)):
        for local, t in chunk.state_dict(keep_vars=True).items():
            if local.endswith("_extra_state"):
                continue
            canon = canonical_name(local, layer_offset=offset, expert_offset=built.expert_offset)
            yield c, local, canon, t


def partition_of(t: torch.Tensor) -> int | None:
    return t.partition_dim if getattr(t, "tensor_model_parallel", False) else None


@torch.no_grad()
def load_hf_weights(built: BuiltModel, ckpt: HFCheckpoint | str, groups: Groups) -> int:
    """Copy HF weights into this rank's shards. Returns the number of tensors loaded.

    Every parameter must be covered by the family's map (an unmapped parameter is an error,
    never silently left at its random init); buffers outside the map are Megatron state.
    A checkpoint given as a path is opened and closed here; an open ``HFCheckpoint`` stays
    open (its owner closes it).
    """
    if not isinstance(ckpt, HFCheckpoint):
        with HFCheckpoint(ckpt) as opened:
            return load_hf_weights(built, opened, groups)
    extra = unmapped_tensors(ckpt.keys(), built.param_map.hf_names(), built.hf_config)
    if extra:
        raise ValueError(f"{ckpt.path}: {len(extra)} tensor(s) the {built.family.name} map does not carry would be "
                         f"dropped: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''} (a config option "
                         "this family does not support yet, or a checkpoint of another architecture)")
    params = {(c, n) for c, chunk in enumerate(built.chunks) for n, _ in chunk.named_parameters()}
    loaded = 0
    cache: dict[str, torch.Tensor] = {}

    def get(name):
        if name not in cache:
            cache[name] = ckpt.get(name)
        return cache[name]

    for c, local, canon, t in local_tensors(built):
        if canon not in built.param_map:
            if (c, local) in params:
                raise KeyError(f"parameter {local} (canonical {canon}) has no HF mapping in "
                               f"family {built.family.name}")
            continue
        entry = built.param_map[canon]
        if _is_expert(canon) and "shared_experts" not in canon:
            rank, size = groups.etp_rank, groups.dims.etp
        else:
            rank, size = groups.tp_rank, groups.dims.tp
        pdim = partition_of(t)
        if pdim is not None and size > 1 and all(ckpt.shape(n)[pdim] % size == 0 for n in entry.hf):
            # Even split of every HF source (no vocabulary padding): read only this chunk.
            part = entry.to_mcore_chunk(ckpt.get_chunk, pdim, rank, size)
        else:
            full = entry.to_mcore(get, built.padded_vocab_size)
            part = shard(full, entry, partition_dim=pdim, rank=rank, size=size)
        if tuple(part.shape) != tuple(t.shape):
            raise ValueError(f"{local}: HF gives shape {tuple(part.shape)} for this rank, the "
                             f"model has {tuple(t.shape)}")
        t.copy_(part.to(t.dtype))
        loaded += 1
        cache.clear()
    return loaded
