"""What every sync checks, and the error it raises when a check fails.

* Checksums: the trainer computes one per tensor before sending (``checksum.py``); an
  engine that supports it (the embedded one) checks them on arrival and refuses a bucket
  naming the first tensor that differs, and reports its own; the trainer compares those
  too, so an engine that silently ignored them is caught as well.
* Versions: after the update every engine reports the new weight version (``/model_info``).
* The log-prob probe (``probe.py``) compares what the engines compute with the trainer.
"""

from __future__ import annotations

from moe_rl.weights import checksum


class SyncError(RuntimeError):
    """A weight sync that failed; the message names the engine, and the tensor where one is
    to blame. Raised on every rank of the job with the same message."""


def check_replies(urls: list[str], replies: list, sent: dict[str, str], what: str) -> None:
    """Each engine's reported checksums of ``what`` equal the ones sent."""
    for url, reply in zip(urls, replies):
        got = reply.get("checksums") if isinstance(reply, dict) else None
        if got is None:
            raise SyncError(f"{url}: {what}: the engine reported no checksums (it does not verify updates); "
                            "set weights.verify_checksums=false for such engines")
        try:
            checksum.verify(got, sent, where=url)
        except checksum.ChecksumMismatch as e:
            raise SyncError(f"{url}: {what}: {e}") from e


def check_versions(urls: list[str], versions: list[str], want: str) -> None:
    wrong = [f"{u} reports {v!r}" for u, v in zip(urls, versions) if v != want]
    if wrong:
        raise SyncError(f"after the update to weight version {want!r}: " + "; ".join(wrong))
