"""``DataConfig``: where prompts come from and how they are rendered.

How many prompts a step takes, how many responses each gets and how long they may be are
the loop's and the rollout's (``loop.rollout_batch_size``, ``rollout.n_samples_per_prompt``,
``rollout.max_new_tokens``): one definition each, not repeated here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

FORMATS = ("auto", "json", "parquet")


@dataclass
class DataConfig:
    """Prompt dataset, chat rendering and sampling order."""

    path: str = ""  # local .jsonl/.json or .parquet file (or glob); "" = generated toy tasks
    extra_paths: List[str] = field(default_factory=list)  # more local files of the same format
    format: str = "auto"  # auto | json | parquet (auto: from the file extension)
    prompt_key: str = "prompt"  # column with a prompt string or a list of chat messages (a.b: nested field)
    answer_key: str = "answer"  # column with the ground truth for the rewards (verl files: reward_model.ground_truth)
    system_prompt: str = ""  # prepended as a system message to string prompts ("" = none)
    cache_dir: str = ""  # HF datasets cache for the Arrow conversion ("" = datasets' default)
    max_prompt_tokens: int = 0  # prompts longer than this are dropped (0 = no limit)
    shuffle: bool = True  # reshuffle the prompt order every epoch
    seed: int = 0  # seed of the per-epoch permutation
    toy_task: str = "arithmetic"  # arithmetic | countdown | max_digit: generated prompts when path is ""
    toy_num_prompts: int = 256  # how many toy prompts to generate (>= 1)
    tokenizer_path: str = ""  # HF tokenizer directory ("" = the policy model's)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        from .toy_tasks import TASKS

        if self.toy_task not in TASKS + ("mixed",):
            raise ValueError(f"data.toy_task={self.toy_task!r} is not one of {', '.join(TASKS + ('mixed',))}")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"data.max_prompt_tokens ({self.max_prompt_tokens}) must be >= 0")
        if self.toy_num_prompts < 1:
            raise ValueError(f"data.toy_num_prompts ({self.toy_num_prompts}) must be >= 1")
