"""Disk transport: the sender ranks write their buckets as safetensors files into one
temporary directory, rank 0 completes it (index, config) and publishes it with a rename,
then every engine loads it (``/update_weights_from_disk``).

The directory is ``<disk_dir>/weight_v<version>``, a checkpoint ``transformers`` and SGLang
open. It appears under that name only once every file is written and fsynced: a crash
leaves ``.weight_v<version>.tmp`` (removed by the next sync), never a partial checkpoint
under the final name; a version an engine refuses is removed again. ``disk_dir`` must be seen by every sender rank and every engine
(one machine, or a shared file system).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from moe_rl.checkpoint.atomic import fsync_dir, fsync_file, fsync_tree
from moe_rl.rollout.client import RolloutClient
from moe_rl.weights import checksum, job
from moe_rl.weights.export import ExportedBucket
from moe_rl.weights.transport import SyncRound, Transport, drain, raise_if_failed
from moe_rl.weights.verify import check_replies

CONFIG_FILES = ("config.json", "generation_config.json")
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def write_safetensors(path: Path, named: list, metadata: dict | None = None) -> None:
    """One safetensors file, fsynced."""
    from safetensors.torch import save_file

    save_file({n: t.detach().to("cpu").contiguous() for n, t in named}, str(path),
              metadata={"format": "pt", **(metadata or {})})
    fsync_file(path)


def write_bucket(directory: Path, b: ExportedBucket, num_buckets: int) -> dict[str, str]:
    """Bucket ``b`` as the safetensors shard of its index; returns tensor name -> file name."""
    fname = f"model-{b.index + 1:05d}-of-{num_buckets:05d}.safetensors"
    write_safetensors(directory / fname, b.named())
    return {name: fname for name in b.names}


def write_index(directory: Path, weight_map: dict[str, str], plan) -> None:
    """``model.safetensors.index.json`` of the plan's shards (what transformers and SGLang read)."""
    index = {"metadata": {"total_size": plan.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_hf_weights(plan, stream, directory: Path) -> None:
    """Collective: this rank's buckets of ``stream`` (every rank iterates it) as safetensors shards
    in ``directory`` (which exists and every sender rank sees), and rank 0 writes the index. Every
    rank raises if any failed."""
    files: dict[str, str] = {}
    error = drain(stream, lambda b: files.update(write_bucket(directory, b, len(plan.buckets))),
                  SyncRound(version="", stage_id=None, verify=False))
    parts = job.gather_objects((error, files))
    if job.rank() == 0 and not any(p[0] for p in parts):
        try:
            write_index(directory, {k: v for p in parts for k, v in p[1].items()}, plan)
        except OSError as e:
            error = f"rank 0: {e}"
    joined = job.first_error(error)
    if joined:
        raise RuntimeError(f"writing the HF weights to {directory} failed: {joined}")


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, client: RolloutClient, disk_dir: str, *, config_dir: str | None = None, keep: int = 1) -> None:
        self.client, self.root, self.config_dir, self.keep = client, Path(disk_dir), config_dir, keep

    def path(self, version: str) -> Path:
        return self.root / f"weight_v{version}"

    def ship(self, plan, stream, rnd: SyncRound) -> None:
        if not _VERSION_RE.match(rnd.version):
            raise ValueError(f"weight version {rnd.version!r} cannot name a directory (letters, digits, . _ -)")
        final = self.path(rnd.version)
        tmp = self.root / f".weight_v{rnd.version}.tmp"
        error = None
        if job.rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed sync
                tmp.mkdir()
            except OSError as e:
                error = f"cannot prepare {tmp}: {e}"
        error = job.from_rank0(error)
        if error:
            raise_if_failed(error if job.rank() == 0 else None)
        n = len(plan.buckets)
        files: dict[str, str] = {}
        sums: dict[str, str] = {}

        def send(b: ExportedBucket) -> None:
            files.update(write_bucket(tmp, b, n))
            if rnd.verify:
                sums.update(checksum.checksums(b.named()))

        error = drain(stream, send, rnd)
        parts = job.gather_objects((error, files, sums))
        if job.rank() == 0 and not any(p[0] for p in parts):
            published = False
            try:
                self._publish(tmp, final, {k: v for p in parts for k, v in p[1].items()}, plan)
                published = True
                all_sums = {k: v for p in parts for k, v in p[2].items()}
                replies = self.client.update_weights_from_disk(str(final), None, stage_id=rnd.stage_id,
                                                               checksums=all_sums if rnd.verify else None)
                if rnd.verify:
                    check_replies([s.url for s in self.client.servers], replies, all_sums, str(final))
                self._prune(keep=final)
            except Exception as e:  # noqa: BLE001 - reported to every rank
                error = f"rank 0: {final}: {e}"
                if published:  # refused by an engine: not a version anyone serves
                    shutil.rmtree(final, ignore_errors=True)
        if job.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # only left when a rank failed
        raise_if_failed(error)

    def _publish(self, tmp: Path, final: Path, weight_map: dict[str, str], plan) -> None:
        write_index(tmp, weight_map, plan)
        if self.config_dir:
            for f in CONFIG_FILES:
                src = Path(self.config_dir) / f
                if src.is_file():
                    shutil.copyfile(src, tmp / f)
        fsync_tree(tmp)
        if final.exists():  # the same version shipped again: swap it out, then drop the old copy
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        """Remove published versions beyond the newest ``self.keep`` (by modification time)."""
        versions = sorted((p for p in self.root.glob("weight_v*") if p.is_dir() and p != keep),
                          key=lambda p: p.stat().st_mtime)
        for p in versions[:max(0, len(versions) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
