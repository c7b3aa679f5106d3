"""``DataConfig``: where prompts come from, how they are rendered, and how they are batched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

FORMATS = ("auto", "json", "parquet")


@dataclass
class DataConfig:
    """Prompt dataset, chat rendering, token-budget batching and sampling order."""

    path: str = ""  # local .jsonl/.json or .parquet file (or glob); "" = generated toy tasks
    extra_paths: List[str] = field(default_factory=list)  # more local files of the same format
    format: str = "auto"  # auto | json | parquet (auto: from the file extension)
    prompt_key: str = "prompt"  # column with a prompt string or a list of chat messages
    answer_key: str = "answer"  # column with the ground truth handed to the rewards
    system_prompt: str = ""  # prepended as a system message to string prompts ("" = none)
    cache_dir: str = ""  # HF datasets cache for the Arrow conversion ("" = datasets' default)
    max_prompt_tokens: int = 0  # prompts longer than this are dropped (0 = no limit)
    token_budget: int = 4096  # max tokens of one batch: sum over prompts of (prompt + response_tokens) * samples
    response_tokens: int = 0  # tokens reserved per response in the budget (usually max_new_tokens)
    samples_per_prompt: int = 1  # responses per prompt (GRPO group size) counted in the budget
    max_prompts_per_batch: int = 0  # also cap a batch at this many prompts (0 = budget only)
    shuffle: bool = True  # reshuffle the prompt order every epoch
    seed: int = 0  # seed of the per-epoch permutation
    toy_task: str = "arithmetic"  # arithmetic | countdown: generated prompts when path is ""
    toy_num_prompts: int = 256  # how many toy prompts to generate
    tokenizer_path: str = ""  # HF tokenizer directory ("" = the policy model's)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        for name in ("max_prompt_tokens", "response_tokens", "max_prompts_per_batch", "toy_num_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} ({getattr(self, name)}) must be >= 0")
        if self.token_budget < 1:
            raise ValueError(f"data.token_budget ({self.token_budget}) must be >= 1")
        if self.samples_per_prompt < 1:
            raise ValueError(f"data.samples_per_prompt ({self.samples_per_prompt}) must be >= 1")
        if self.max_prompt_tokens and (self.max_prompt_tokens + self.response_tokens) * self.samples_per_prompt > self.token_budget:
            raise ValueError(
                f"data.token_budget ({self.token_budget}) cannot hold one prompt of max_prompt_tokens "
                f"({self.max_prompt_tokens}) + response_tokens ({self.response_tokens}) times "
                f"samples_per_prompt ({self.samples_per_prompt})")
