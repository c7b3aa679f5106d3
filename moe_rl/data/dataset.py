"""Prompt datasets from local JSONL or parquet files, read through HuggingFace ``datasets``.

Only the packaged ``json``/``parquet`` builders are used with local ``data_files``; no
hub is contacted. Every row becomes a :class:`PromptRecord`: the ``prompt_key`` column
(a string, or a list of ``{"role", "content"}`` messages) becomes chat messages, the
``answer_key`` column the reward label, the other columns metadata. Arrow gives each
column one type, so a file must not mix, say, string and object answers.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Dict, List, Sequence

from .chat_template import tokenize_prompt
from .config import DataConfig
from .toy_tasks import SYSTEM_PROMPT, generate_tasks
from .types import PromptRecord, TokenizedPrompt

_EXT_FORMAT = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _files_and_format(cfg: DataConfig) -> tuple[List[str], str]:
    files: List[str] = []
    for pattern in [cfg.path, *cfg.extra_paths]:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            missing = [m for m in matches if not os.path.isfile(m)] or [pattern]
            raise ValueError(f"data.path: no such file {missing[0]!r}")
        files.extend(matches)
    fmt = cfg.format
    if fmt == "auto":
        kinds = {_EXT_FORMAT.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"data.format=auto: cannot tell one format from the extensions of {files}; "
                             f"use .jsonl/.json or .parquet, or set data.format")
        fmt = kinds.pop()
    return files, fmt


def to_messages(prompt: Any, system_prompt: str = "", *, row: int = 0) -> List[Dict[str, str]]:
    """Chat messages of a prompt cell (a string or a list of role/content dicts)."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
        return ([{"role": "system", "content": system_prompt}] + msgs) if system_prompt else msgs
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(f"row {row}: prompt must be a string or a non-empty list of "
                     f"{{'role': str, 'content': str}} messages, got {type(prompt).__name__}: {prompt!r:.200}")


def rows_to_records(rows: Sequence[Dict[str, Any]], cfg: DataConfig) -> List[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        for key in (cfg.prompt_key, cfg.answer_key):
            if key not in row:
                raise ValueError(f"row {i}: no column {key!r} (columns: {sorted(row)}); "
                                 f"set data.prompt_key / data.answer_key")
        meta = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.answer_key)}
        out.append(PromptRecord(index=i, messages=to_messages(row[cfg.prompt_key], cfg.system_prompt, row=i),
                                label=row[cfg.answer_key], metadata=meta))
    return out


def load_rows(cfg: DataConfig) -> List[Dict[str, Any]]:
    """Rows of the configured local files (or generated toy tasks when ``path`` is empty)."""
    if not cfg.path:
        return generate_tasks(cfg.toy_num_prompts, task=cfg.toy_task, seed=cfg.seed)
    import datasets

    files, fmt = _files_and_format(cfg)
    kwargs = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    ds = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    return [dict(r) for r in ds]


def load_prompts(cfg: DataConfig) -> List[PromptRecord]:
    """The dataset as :class:`PromptRecord` rows, in file order (``index`` = row number)."""
    if not cfg.path and not cfg.system_prompt:
        cfg = dataclasses.replace(cfg, system_prompt=SYSTEM_PROMPT)
    return rows_to_records(load_rows(cfg), cfg)


def tokenize_prompts(records: Sequence[PromptRecord], tokenizer: Any, max_prompt_tokens: int = 0) -> List[TokenizedPrompt]:
    """Render and tokenize every record; drops those over ``max_prompt_tokens`` (0 = keep all)."""
    out = [tokenize_prompt(tokenizer, r) for r in records]
    if max_prompt_tokens:
        out = [p for p in out if p.num_tokens <= max_prompt_tokens]
        if not out:
            raise ValueError(f"data.max_prompt_tokens ({max_prompt_tokens}) drops all {len(records)} prompts")
    return out
