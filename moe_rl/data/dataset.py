"""Prompt datasets from local JSONL or parquet files, read through HuggingFace ``datasets``.

Only the packaged ``json``/``parquet`` builders are used with local ``data_files``; no
hub is contacted. Every row becomes a :class:`PromptRecord`: the ``prompt_key`` column
(a string, or a list of ``{"role", "content"}`` messages) becomes chat messages, the
``answer_key`` column the reward label, the other columns metadata; a dotted key reads a nested
field (``reward_model.ground_truth`` in verl's parquet files). Arrow gives each
column one type, so a file must not mix, say, string and object answers.

Errors are ``ValueError`` naming the file and, for a bad row, its line (JSON) or row
(parquet): an empty file (found by ``_files_and_format``, which the launcher's preflight
runs), a line that is not a JSON object, a row without the prompt column. The per-line
diagnosis reads the files again only when loading or a row check has failed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .chat_template import tokenize_prompt
from .config import DataConfig
from .toy_tasks import SYSTEM_PROMPT, generate_tasks
from .types import PromptRecord, TokenizedPrompt

_EXT_FORMAT = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _files_and_format(cfg: DataConfig) -> tuple[List[str], str]:
    """The files of ``data.path`` and ``data.extra_paths`` and their format; ``ValueError`` for a
    missing or empty file or an unknown format. Cheap (no parsing): the launcher's preflight runs it."""
    files: List[str] = []
    for pattern in [cfg.path, *cfg.extra_paths]:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            missing = [m for m in matches if not os.path.isfile(m)] or [pattern]
            raise ValueError(f"data.path: no such file {missing[0]!r}")
        files.extend(matches)
    for f in files:
        if _is_blank(f):
            raise ValueError(f"data.path: {f!r} is empty (no rows)")
    fmt = cfg.format
    if fmt == "auto":
        kinds = {_EXT_FORMAT.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"data.format=auto: cannot tell one format from the extensions of {files}; "
                             f"use .jsonl/.json or .parquet, or set data.format")
        fmt = kinds.pop()
    return files, fmt


def _is_blank(path: str) -> bool:
    """Whether the file holds nothing but whitespace (reads only up to its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


class RowError(ValueError):
    """A row of the dataset is unusable; ``row`` is its index over all files (0-based)."""

    def __init__(self, row: int, detail: str):
        super().__init__(f"row {row}: {detail}")
        self.row, self.detail = row, detail


def _json_lines(path: str) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` of every non-blank line, 1-based: the rows of a JSON-lines file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _first_bad_line(path: str) -> Optional[Tuple[int, str, str]]:
    """``(line number, text, what is wrong)`` of the first line that is not a JSON object."""
    for n, line in _json_lines(path):
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            return n, line, f"is not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(obj, dict):
            return n, line, f"is not a JSON object (got {type(obj).__name__})"
    return None


def _json_problem(path: str) -> Optional[str]:
    """What makes ``path`` unreadable as JSON lines (or, for ``.json``, as one JSON document)."""
    bad = _first_bad_line(path)
    if bad is None:
        return None
    n, line, what = bad
    if os.path.splitext(path)[1].lower() == ".json":
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                json.load(f)
            return None  # one JSON document: its lines need not be rows
        except json.JSONDecodeError as e:
            if n == next(_json_lines(path))[0]:  # not even JSON lines: report the document's error
                return f"data.path: {path!r} is not valid JSON: {e}"
    return f"data.path: {path!r} line {n} {what}: {line.strip()!r:.200}"


def _row_origin(files: Sequence[str], fmt: str, row: int) -> Tuple[str, Optional[dict]]:
    """Where row ``row`` (0-based, over all files) comes from, e.g. ``"'d.jsonl' line 3 (row 2)"``,
    and, for JSON lines, the row as written in the file; ``("", None)`` when that is unknown (a
    ``.json`` file holding one JSON document)."""
    left = row
    for path in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(path).metadata.num_rows
            if left < n:
                return f"{path!r} row {left}" + (f" (row {row} over all files)" if left != row else ""), None
            left -= n
            continue
        if _first_bad_line(path) is not None:
            return "", None
        for n, line in _json_lines(path):
            if left == 0:
                return f"{path!r} line {n} (row {row})", json.loads(line)
            left -= 1
    return "", None


def to_messages(prompt: Any, system_prompt: str = "", *, row: int = 0) -> List[Dict[str, str]]:
    """Chat messages of a prompt cell (a string or a list of role/content dicts)."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
        return ([{"role": "system", "content": system_prompt}] + msgs) if system_prompt else msgs
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RowError(row, f"prompt must be a string or a non-empty list of {{'role': str, 'content': str}} "
                        f"messages, got {type(prompt).__name__}: {prompt!r:.200}")


def rows_to_records(rows: Sequence[Dict[str, Any]], cfg: DataConfig) -> List[PromptRecord]:
    """Rows as :class:`PromptRecord` (``index`` = row number); ``RowError`` names a bad row.

    Arrow gives every row every column of the file, None where a row lacks it: a None prompt
    is reported as missing (``load_prompts`` then tells missing from null in a JSON line)."""
    out = []
    for i, row in enumerate(rows):
        values = [column_value(row, key, i) for key in (cfg.prompt_key, cfg.answer_key)]
        if values[0] is None:
            raise RowError(i, f"column {cfg.prompt_key!r} missing (or null); columns with a value: "
                              f"{sorted(k for k, v in row.items() if v is not None)}")
        meta = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.answer_key)}
        out.append(PromptRecord(index=i, messages=to_messages(values[0], cfg.system_prompt, row=i),
                                label=values[1], metadata=meta))
    return out


def column_value(row: Dict[str, Any], key: str, i: int) -> Any:
    """``row[key]``; a dotted key whose whole name is not a column reads nested fields (verl's
    files keep the answer in ``reward_model.ground_truth``). RowError names what is missing."""
    if key in row:
        return row[key]
    node, walked = row, []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            where = f"column {walked[0]!r} has no field {'.'.join(walked[1:] + [part])!r}" if walked else \
                f"no column {part!r} (columns: {sorted(row)})"
            raise RowError(i, f"{where}; set data.prompt_key / data.answer_key")
        node = node[part]
        walked.append(part)
    return node


def load_rows(cfg: DataConfig) -> List[Dict[str, Any]]:
    """Rows of the configured local files (or generated toy tasks when ``path`` is empty).

    ``ValueError`` for a file that cannot be read, naming it and, for JSON, its first bad line."""
    if not cfg.path:
        return generate_tasks(cfg.toy_num_prompts, task=cfg.toy_task, seed=cfg.seed)
    import datasets

    files, fmt = _files_and_format(cfg)
    kwargs = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets wraps a parse error in its own types, without the line
        problem = next(filter(None, map(_json_problem, files)), None) if fmt == "json" else None
        cause = e.__cause__ or e
        raise ValueError(problem or f"data.path: cannot read {files} as {fmt}: {type(cause).__name__}: "
                                    f"{cause}") from e
    rows = [dict(r) for r in ds]
    if not rows:
        raise ValueError(f"data.path: {files} hold no rows")
    return rows


def load_prompts(cfg: DataConfig) -> List[PromptRecord]:
    """The dataset as :class:`PromptRecord` rows, in file order (``index`` = row number).

    A bad row's ``ValueError`` names its file and line (JSON) or row (parquet) when it can."""
    if not cfg.path and not cfg.system_prompt:
        cfg = dataclasses.replace(cfg, system_prompt=SYSTEM_PROMPT)
    rows = load_rows(cfg)
    try:
        return rows_to_records(rows, cfg)
    except RowError as e:
        if not cfg.path:
            raise
        files, fmt = _files_and_format(cfg)
        where, written = _row_origin(files, fmt, e.row)
        if not where:
            raise ValueError(f"data.path: {', '.join(map(repr, files))}: {e}") from None
        detail = e.detail
        if written is not None and cfg.prompt_key in rows[e.row] and rows[e.row][cfg.prompt_key] is None:
            detail = (f"column {cfg.prompt_key!r} is null" if cfg.prompt_key in written else
                      f"column {cfg.prompt_key!r} missing (keys: {sorted(written)}); set data.prompt_key")
        raise ValueError(f"data.path: {where}: {detail}") from None


def tokenize_prompts(records: Sequence[PromptRecord], tokenizer: Any, max_prompt_tokens: int = 0) -> List[TokenizedPrompt]:
    """Render and tokenize every record; drops those over ``max_prompt_tokens`` (0 = keep all)."""
    out = [tokenize_prompt(tokenizer, r) for r in records]
    if max_prompt_tokens:
        out = [p for p in out if p.num_tokens <= max_prompt_tokens]
        if not out:
            raise ValueError(f"data.max_prompt_tokens ({max_prompt_tokens}) drops all {len(records)} prompts")
    return out
