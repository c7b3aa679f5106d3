"""A preallocated, slot-addressed KV cache that HF attention layers write through.

Legend: S slots, B rows in this forward, H kv heads, T new tokens, C context (slot
capacity), L kv length attended this step, D head dim.

HF attention calls ``cache.update(k_BHTD, v_BHTD, layer_idx, ...)`` and attends to what it
returns (transformers 4.x passes ``cache_kwargs`` positionally, 5.2x ``kwargs=``; neither is
needed here, the plan below says where keys go). ``hf_contract.py`` checks at engine start
that the installed transformers still calls it that way. Before each forward the engine sets a *plan*: which slot each row is, and where
its T new tokens go. Rows of a decode step are always slots ``0..B-1`` (idle slots below
the highest busy one ride along, masked), so ``update`` returns views of the buffers, no
gathers. Prefill runs in *capture* mode: keys/values pass through unchanged and are kept
so the engine can copy one prompt's KV into the n slots of its group.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """KV buffers ``[S, H, C, D]`` per layer, allocated on the first write of each layer."""

    is_compileable = False

    def __init__(self, num_slots: int, capacity: int, dtype: torch.dtype) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.dtype = dtype
        self.k_SHCD: dict[int, torch.Tensor] = {}
        self.v_SHCD: dict[int, torch.Tensor] = {}
        # plan for the next forward
        self._capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._write_pos_B: torch.Tensor | None = None  # decode: position of the single new token
        self._kv_len = 0
        self.num_updates = 0  # calls of update(), for the startup contract check

    # -- plans -------------------------------------------------------------------------
    def plan_capture(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Next forward is a prefill: pass KV through and record it per layer."""
        self._capture = {}
        return self._capture

    def plan_decode(self, write_pos_B: torch.Tensor, kv_len: int) -> None:
        """Next forward is one token for rows = slots 0..B-1, written at ``write_pos_B``."""
        self._capture = None
        self._write_pos_B = write_pos_B
        self._kv_len = kv_len

    # -- slot management -----------------------------------------------------------------
    def load_prompt(self, slot: int, prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a captured prompt's KV (``[1, H, P, D]`` per layer) into ``slot``."""
        for layer, (k, v) in prompt_kv.items():
            if layer not in self.k_SHCD:
                self.k_SHCD[layer] = k.new_zeros(self.num_slots, k.shape[1], self.capacity, k.shape[3])
                self.v_SHCD[layer] = v.new_zeros(self.num_slots, v.shape[1], self.capacity, v.shape[3])
            P = k.shape[2]
            self.k_SHCD[layer][slot, :, :P] = k[0]
            self.v_SHCD[layer][slot, :, :P] = v[0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (compaction)."""
        for d in (self.k_SHCD, self.v_SHCD):
            for buf in d.values():
                buf[dst, :, :length] = buf[src, :, :length]

    def nbytes(self) -> int:
        """Bytes held by the KV buffers now (0 after :meth:`release`)."""
        return sum(t.numel() * t.element_size() for d in (self.k_SHCD, self.v_SHCD) for t in d.values())

    def release(self) -> None:
        """Free the buffers (release_memory_occupation kv_cache); reallocated on next load."""
        self.k_SHCD.clear()
        self.v_SHCD.clear()

    # -- the HF Cache surface the models use ---------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.num_updates += 1
        if self._capture is not None:
            self._capture[layer_idx] = (key_states, value_states)
            return key_states, value_states
        assert self._write_pos_B is not None
        k_buf, v_buf = self.k_SHCD[layer_idx], self.v_SHCD[layer_idx]
        B = key_states.shape[0]
        rows_B = torch.arange(B)
        # k_BHTD with T == 1 -> [B, H, D] written at (row, :, pos)
        k_buf[rows_B, :, self._write_pos_B] = key_states[:, :, 0]
        v_buf[rows_B, :, self._write_pos_B] = value_states[:, :, 0]
        return k_buf[:B, :, : self._kv_len], v_buf[:B, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
