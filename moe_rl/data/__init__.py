"""Prompts: local datasets, chat rendering, token-budget batches, resumable order, toy tasks."""

from .config import DataConfig
from .dataset import load_prompts, tokenize_prompts
from .sampler import ResumableSampler
from .token_budget import TokenBudgetBatcher, plan_token_batches
from .types import PromptRecord, TokenizedPrompt

__all__ = ["DataConfig", "PromptRecord", "ResumableSampler", "TokenBudgetBatcher", "TokenizedPrompt",
           "load_prompts", "plan_token_batches", "tokenize_prompts"]
