"""Contracts of the data stage: one prompt with its ground truth, and a batch of them."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List


@dataclasses.dataclass
class PromptRecord:
    """One prompt of a dataset, before tokenization."""

    index: int  # row of the dataset (stable across epochs and resumes)
    messages: List[Dict[str, str]]  # chat messages [{"role": ..., "content": ...}]
    label: Any = None  # ground truth handed to the rewards (RewardInput.label)
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)  # remaining columns


@dataclasses.dataclass
class TokenizedPrompt:
    """A prompt rendered through the chat template and tokenized."""

    record: PromptRecord
    text: str  # the rendered prompt (template applied, generation prompt appended)
    input_ids: List[int]  # token ids of ``text``

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)
