"""One weight sync: training layout -> every engine, verified, all engines or none.

    sync = WeightSync(cfg.weights, client, plan, groups, hf_dir=...)   # every rank, once
    metrics = sync.sync(built, version)                                  # every rank, each step

The sequence (SGLang's, ``pause -> flush -> update -> continue``):

1. rank 0 pauses every engine (requests in flight come back aborted and are asked again by
   the rollout client) and flushes their caches;
2. every rank takes part in the export stream; the transport ships the buckets. Engines that
   can stage (the embedded one: ``GET /weight_sync_info``) hold them and check each tensor's
   checksum; a real SGLang applies each bucket as it arrives;
3. rank 0 commits on every engine (one apply, the new version), or, for SGLang, closes the
   weight-update session and sets the version with ``/update_weight_version``; then checks
   every engine reports that version;
4. rank 0 lets the engines continue, and the log-prob probe compares them with the trainer.

Failure: any error in 1-3 discards what the engines staged, lets them continue on their old
weights and version, and raises :class:`SyncError` on every rank, naming the engine (and the
tensor, for a checksum). A probe above ``probe_max_logprob_diff`` raises too: the run stops.
With a real SGLang a failure in step 2 can leave an engine with part of the new weights (it
cannot stage): the engines then stay paused and the error says so.

SGLang 0.5.23 takes ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``
only inside a weight-update session (its scheduler refuses them otherwise): for engines that
cannot stage, step 1 opens one on every engine (``POST /begin_weight_update {}``) and step 3
closes it (``POST /end_weight_update {}``) before setting the version. The disk transport
needs none. The embedded engine accepts the same two calls.

Parallel semantics: every rank of the training job constructs :class:`WeightSync` with the
same arguments and calls :meth:`WeightSync.sync` together; every rank gets the same metrics
or the same exception.
"""

from __future__ import annotations

import time
from typing import Iterable

from moe_rl.rollout.client import RolloutClient
from moe_rl.weights import job
from moe_rl.weights.config import WeightSyncConfig
from moe_rl.weights.export import ExportedBucket, export_buckets
from moe_rl.weights.payload import SAFETENSORS
from moe_rl.weights.plan import ExportPlan
from moe_rl.weights.probe import probe_and_check
from moe_rl.weights.transport import SyncRound, Transport
from moe_rl.weights.verify import SyncError, check_versions


def make_transport(cfg: WeightSyncConfig, client: RolloutClient, *, staging: bool, hf_dir: str | None) -> Transport:
    if cfg.transport == "disk":
        from moe_rl.weights.transport.disk import DiskTransport

        return DiskTransport(client, cfg.disk_dir, config_dir=hf_dir, keep=cfg.keep_disk_versions)
    if cfg.transport == "tensor":
        from moe_rl.weights.transport.tensor import TensorTransport

        fmt = cfg.tensor_format
        if fmt == "auto":
            fmt = SAFETENSORS if staging else "sglang"
        return TensorTransport(client, fmt, engine_tp_size=cfg.engine_ranks)
    from moe_rl.weights.transport.distributed import DistributedTransport

    return DistributedTransport(client, address=group_address(cfg), port=cfg.group_port, group_name=cfg.group_name,
                                engine_ranks=cfg.engine_ranks, timeout_s=cfg.timeout_s, flatten=cfg.flatten_buckets,
                                backend="gloo" if staging else None)  # the embedded engine joins over gloo


def group_address(cfg: WeightSyncConfig) -> str:
    """Where the engines reach rank 0 for the weight-update group: ``weights.group_address``,
    else the job's rendezvous host (rank 0's node under Slurm; a fixed 127.0.0.1 hung a
    multi-node job until the rendezvous deadline), else this host's loopback."""
    if cfg.group_address:
        return cfg.group_address
    import os

    from moe_rl.parallel.launch_env import resolve_launch_env

    try:
        host = resolve_launch_env(os.environ).master_addr
    except ValueError:  # no launcher variables: a single process
        host = ""
    return "127.0.0.1" if host in ("", "localhost", "::1") else host  # one node: IPv4 loopback, as before


SESSION_TRANSPORTS = ("tensor", "distributed")  # the SGLang updates that need a weight-update session


def weight_update_session(client: RolloutClient, which: str) -> None:
    """``POST /begin_weight_update {}`` or ``/end_weight_update {}`` on every engine (SGLang
    0.5.23, ``BeginWeightUpdateReqInput`` / ``EndWeightUpdateReqInput``; no fields needed).
    Through the client's per-server control call until it has a method of its own."""
    assert which in ("begin", "end"), which
    client._all("POST", f"/{which}_weight_update", {})


class WeightSync:
    """The sync of one trainer to its engines (see the module docstring). Construction asks the
    engines what they support (staging, checksums) and sets the transport up (the distributed
    one joins its group): every rank constructs it, with the same arguments."""

    def __init__(self, cfg: WeightSyncConfig, client: RolloutClient, plan: ExportPlan, groups, *,
                 hf_dir: str | None = None) -> None:
        self.cfg, self.client, self.plan, self.groups = cfg, client, plan, groups
        info, error = None, None
        if job.rank() == 0:
            try:
                info = client.weight_sync_info()
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = f"rank 0: asking the engines for /weight_sync_info: {e}"
        info, error = job.from_rank0((info, error))
        if error:
            raise SyncError(error)
        # stage only when every engine can: otherwise one would apply what another holds
        self.staging = all(i is not None and i.get("staging") for i in info)
        self.verify = cfg.verify_checksums and all(i is not None and i.get("checksum") for i in info)
        self.transport = make_transport(cfg, client, staging=self.staging, hf_dir=hf_dir)
        self.session = not self.staging and self.transport.name in SESSION_TRANSPORTS
        self.transport.setup()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.client.servers]

    def close(self) -> None:
        self.transport.close()

    def sync(self, built, version: int | str, *, stream: Iterable[ExportedBucket] | None = None) -> dict[str, float]:
        """Ship the weights of ``built`` (this rank's ``BuiltModel``) as ``version``.

        ``stream`` replaces the export stream of ``built`` (a single process pushing an HF
        checkpoint: :func:`moe_rl.weights.export.buckets_from_hf`); with ``built`` None there
        is no probe."""
        version = str(version)
        if stream is None:
            stream = export_buckets(self.plan, built, self.groups)
        t0 = time.perf_counter()
        rnd = SyncRound(version=version, stage_id=f"moe_rl-sync-{version}" if self.staging else None,
                        verify=self.verify)
        try:
            self._on_rank0(self._pause, "pausing the engines")
        except SyncError as e:
            self._on_rank0(self._recover, "recovering after a failed pause", reraise=False)
            raise SyncError(f"{e} -- nothing was sent; every engine keeps its old weights and version") from e
        try:
            self.transport.ship(self.plan, stream, rnd)
        except SyncError as e:
            if not self.staging:
                raise SyncError(f"{e} -- the engines cannot stage updates and may hold part of version "
                                f"{version}; they stay paused") from e
            self._on_rank0(self._recover, "recovering after a failed sync", reraise=False)
            raise SyncError(f"{e} -- every engine keeps its old weights and version") from e
        try:
            self._on_rank0(lambda: self._commit(rnd), "committing")
        except SyncError as e:
            self._on_rank0(self._recover, "recovering after a failed commit", reraise=False)
            raise SyncError(f"{e} -- versions now: {self._versions()}") from e
        self._on_rank0(self.client.continue_generation, "resuming the engines")
        t_update = time.perf_counter() - t0
        totals = job.gather_objects((rnd.tensors, rnd.bytes))
        metrics = {"weights/sync_s": t_update, "weights/tensors": float(sum(t for t, _ in totals)),
                   "weights/bytes": float(sum(b for _, b in totals)), "weights/buckets": float(len(self.plan.buckets))}
        if self.cfg.probe_due(version) and built is not None:
            metrics.update(probe_and_check(self.cfg, version, self.client if job.rank() == 0 else None, built,
                                           self.groups, self.urls))
        return metrics

    # ------------------------------------------------------------------ rank 0's calls
    def _on_rank0(self, fn, what: str, *, reraise: bool = True) -> None:
        """Run ``fn`` on rank 0; its failure becomes the same SyncError on every rank."""
        error = None
        if job.rank() == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = f"{what}: {e}"
        error = job.from_rank0(error)
        if error and reraise:
            raise SyncError(error)

    def _pause(self) -> None:
        self.client.pause()
        self.client.flush_cache()
        if self.staging:
            self.client.discard_staged_weights()  # what a crashed sync left behind
        if self.session:
            weight_update_session(self.client, "begin")

    def _commit(self, rnd: SyncRound) -> None:
        if self.staging:
            self.client.commit_staged_weights(rnd.stage_id, rnd.version, expected_tensors=len(self.plan.tensors()),
                                              complete=True)
        else:
            if self.session:
                weight_update_session(self.client, "end")
            self.client.update_weight_version(rnd.version, abort_all_requests=False)
        check_versions(self.urls, self.client.weight_versions(), rnd.version)

    def _versions(self) -> str:
        """Each engine's version now, for an error message (collective: rank 0 asks)."""
        report = "; ".join(self.client.weight_version_report()) if job.rank() == 0 else None
        return job.from_rank0(report)

    def _recover(self) -> None:
        """Best effort on every engine: drop what is staged, serve again."""
        try:
            if self.staging:
                self.client.discard_staged_weights()
        finally:
            self.client.continue_generation()
