"""``meta_info.weight_versions``: which weight version produced which output tokens, as
SGLang 0.5.23 reports it (``srt/utils/weight_versions.py``).

When the served version changes, every sequence that has output tokens records an event
``(old_version, tokens so far)``; when it finishes, the events and the version current then
become contiguous spans ``{"version", "start", "end"}`` over ``[0, completion_tokens)``.
A sequence decoded under one version gets one span; one with no output gets
``[{"version": v, "start": 0, "end": 0}]``. ``meta_info.weight_version`` is the last span's.
"""

from __future__ import annotations


def version_spans(events: list[tuple[str, int]], current_version: str, num_output_tokens: int) -> list[dict]:
    """Spans from ``events`` (``(old_version, tokens produced before the change)``, in order)."""
    spans: list[dict] = []
    for version, end in [*events, (current_version, num_output_tokens)]:
        end = min(end, num_output_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans
