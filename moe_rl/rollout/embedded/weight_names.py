"""Map HF *checkpoint* tensor names (what SGLang's weight updates carry) onto the model's
in-memory parameters.

transformers 5 fuses experts in memory: ``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` (gate
rows first, then up) and ``mlp.experts.down_proj`` ``[E, H, F]``, while checkpoints keep one
tensor per expert (``mlp.experts.{e}.gate_proj.weight``; Mixtral: ``block_sparse_moe.
experts.{e}.w1/w3/w2.weight`` and ``block_sparse_moe.gate.weight``). Both spellings are
accepted; an in-memory name maps to the whole parameter.
"""

from __future__ import annotations

import re

import torch

_EXPERT_RE = re.compile(
    r"^(?P<pre>.*\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
    r"(?P<w>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_MIXTRAL_GATE_RE = re.compile(r"^(?P<pre>.*\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")

Target = tuple[str, tuple]  # (in-memory name, index into it; () = whole tensor)


def resolve(name: str, params: dict[str, torch.Tensor]) -> Target | None:
    """Where checkpoint tensor ``name`` lives in ``params``; None if nowhere."""
    if name in params:
        return name, ()
    m = _MIXTRAL_GATE_RE.match(name)
    if m:
        tgt = f"{m['pre']}.mlp.gate.weight"
        return (tgt, ()) if tgt in params else None
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    e, w = int(m["e"]), m["w"]
    if w in ("down_proj", "w2"):
        tgt = f"{m['pre']}.mlp.experts.down_proj"
        if tgt not in params or e >= params[tgt].shape[0]:
            return None
        return tgt, (e,)
    tgt = f"{m['pre']}.mlp.experts.gate_up_proj"
    if tgt not in params or e >= params[tgt].shape[0]:
        return None
    F = params[tgt].shape[1] // 2
    rows = slice(0, F) if w in ("gate_proj", "w1") else slice(F, 2 * F)
    return tgt, (e, rows)
