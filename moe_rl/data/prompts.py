"""Stage 1 of the loop: the prompts of each step, in a resumable order.

The dataset (or the generated toy tasks) is rendered through the chat template and tokenized
once at start; a :class:`~moe_rl.data.sampler.ResumableSampler` then hands out indices, epoch
after epoch. The state is the sampler's (epoch, position), saved in run checkpoints, so a
resumed run sees exactly the prompts the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .config import DataConfig
from .dataset import load_prompts, tokenize_prompts
from .sampler import ResumableSampler
from .types import TokenizedPrompt


class PromptStream:
    def __init__(self, cfg: DataConfig, tokenizer: Any) -> None:
        self.prompts: List[TokenizedPrompt] = tokenize_prompts(load_prompts(cfg), tokenizer, cfg.max_prompt_tokens)
        self.sampler = ResumableSampler(len(self.prompts), seed=cfg.seed, shuffle=cfg.shuffle)

    @property
    def longest(self) -> int:
        """Tokens of the longest prompt."""
        return max(p.num_tokens for p in self.prompts)

    def next(self, num: int) -> List[TokenizedPrompt]:
        return [self.prompts[i] for i in self.sampler.take(num)]

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
