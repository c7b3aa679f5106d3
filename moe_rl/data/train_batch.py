"""From rollout samples to the trainer's micro-batches: the ``TrainBatch`` contract and the
token-budget packing.

Legend: B responses, T response tokens (padded to the longest), S sequence positions of one
micro-batch (prompt + response - 1, padded to the micro-batch's longest).

``TrainBatch`` holds one step's responses in *response space* ([B, T]: token j of response
i), which is what rewards, advantages and the sampling filters work on. The trainer scores
*sequence space*: position t of a row predicts ``targets[t]`` from ``tokens[:t+1]``, so
response token j of a sample with a P-token prompt sits at position ``P - 1 + j``
(:func:`to_microbatch` does the mapping, right-padding each row).

Micro-batches by token budget (:func:`plan_microbatches`): rows are packed in order of
decreasing length, a micro-batch closing when one more row would take its padded size
``rows x longest`` over ``token_budget`` or its row count over ``max_rows``. Every micro-batch
of a step on every rank is then a different [B, S] shape (Megatron's
``variable_seq_lengths``). All ranks must run the same NUMBER of micro-batches (expert
parallelism exchanges tokens in every forward), so :func:`split_rows` re-splits a rank's rows
into the step's global count, evenly by tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from moe_rl.rollout.types import FinishReason, Sample


@dataclasses.dataclass
class TrainBatch:
    """One step's responses, response space."""

    prompt_ids: List[List[int]]  # [B] prompt token ids
    response_ids: List[List[int]]  # [B] response token ids
    group_ids_B: torch.Tensor  # int64 [B], responses of one prompt share an id
    mask_BT: torch.Tensor  # bool [B, T]: response tokens that count in the loss
    rollout_logp_BT: torch.Tensor  # fp32 [B, T]: the engine's log-probs of the sampled tokens
    rewards_B: torch.Tensor  # fp32 [B]: scalar reward (weighted sum, shaping included)
    truncated_B: torch.Tensor  # bool [B]: stopped by the length budget
    versions_B: torch.Tensor  # int64 [B]: the policy version each response was sampled with
    named_rewards: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> fp32 [B]
    adv_BT: Optional[torch.Tensor] = None  # fp32 [B, T], filled by the advantage stage
    token_penalty_BT: Optional[torch.Tensor] = None  # fp32 [B, T] beta*k1 when the KL is in the reward
    # [B] each row's engine routes (``Sample.routed_experts_NLK``: int [P + T - 1, L, K], sequence
    # space) or None where the engine gave none; None when no row has any (routing replay R3 and
    # the rollout->old drift metrics read them)
    routes: Optional[List[Optional[torch.Tensor]]] = None

    @property
    def size(self) -> int:
        return len(self.response_ids)

    @property
    def lengths_B(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.int64)

    @property
    def seq_lengths(self) -> List[int]:
        """Positions each row needs in sequence space: P + T - 1."""
        return [len(p) + len(r) - 1 for p, r in zip(self.prompt_ids, self.response_ids)]

    def select(self, rows: Sequence[int]) -> "TrainBatch":
        idx = torch.as_tensor(list(rows), dtype=torch.int64)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return TrainBatch(
            prompt_ids=[self.prompt_ids[i] for i in rows], response_ids=[self.response_ids[i] for i in rows],
            group_ids_B=pick(self.group_ids_B), mask_BT=pick(self.mask_BT), rollout_logp_BT=pick(self.rollout_logp_BT),
            rewards_B=pick(self.rewards_B), truncated_B=pick(self.truncated_B), versions_B=pick(self.versions_B),
            named_rewards={k: pick(v) for k, v in self.named_rewards.items()},
            adv_BT=pick(self.adv_BT), token_penalty_BT=pick(self.token_penalty_BT),
            routes=None if self.routes is None else [self.routes[i] for i in rows])


def from_samples(samples: Sequence[Sample], rewards_B: torch.Tensor,
                 named_rewards: Optional[Dict[str, torch.Tensor]] = None) -> TrainBatch:
    """Stack ``samples`` (group-major) with their rewards; the version is ``int(weight_version)``;
    ``routes`` are the samples' ``routed_experts_NLK`` (None when no sample has any)."""
    B = len(samples)
    T = max((len(s.response_ids) for s in samples), default=0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    logp = torch.zeros(B, T, dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        mask[i, :n] = True
        logp[i, :n] = s.rollout_logprobs_T
    routes = [s.routed_experts_NLK for s in samples]
    return TrainBatch(
        prompt_ids=[list(s.prompt_ids) for s in samples], response_ids=[list(s.response_ids) for s in samples],
        group_ids_B=torch.tensor([s.group_id for s in samples], dtype=torch.int64), mask_BT=mask,
        rollout_logp_BT=logp, rewards_B=rewards_B.to(torch.float32),
        truncated_B=torch.tensor([s.finish_reason == FinishReason.LENGTH for s in samples], dtype=torch.bool),
        versions_B=torch.tensor([int(s.weight_version) for s in samples], dtype=torch.int64),
        named_rewards=dict(named_rewards or {}),
        routes=routes if any(r is not None for r in routes) else None)


def plan_microbatches(seq_lengths: Sequence[int], *, token_budget: int, max_rows: int) -> List[List[int]]:
    """Row indices per micro-batch: longest rows first, each micro-batch's padded size
    (rows x its longest row) within ``token_budget`` and at most ``max_rows`` rows. A row
    longer than the budget is a micro-batch of its own."""
    order = sorted(range(len(seq_lengths)), key=lambda i: (-seq_lengths[i], i))
    out: List[List[int]] = []
    cur: List[int] = []
    for i in order:
        longest = seq_lengths[cur[0]] if cur else seq_lengths[i]
        if cur and ((len(cur) + 1) * longest > token_budget or len(cur) == max_rows):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def split_rows(seq_lengths: Sequence[int], count: int) -> List[List[int]]:
    """Rows split into exactly ``count`` non-empty micro-batches (``count`` <= rows), longest
    first, each taking a contiguous run so the padded sizes stay close."""
    n = len(seq_lengths)
    if not 1 <= count <= n:
        raise ValueError(f"cannot split {n} rows into {count} micro-batches")
    order = sorted(range(n), key=lambda i: (-seq_lengths[i], i))
    total = sum(seq_lengths)
    out: List[List[int]] = []
    cur: List[int] = []
    acc = 0
    for k, i in enumerate(order):
        cur.append(i)
        acc += seq_lengths[i]
        left_rows, left_mbs = n - k - 1, count - len(out) - 1
        if left_mbs and (acc * count >= total * (len(out) + 1) or left_rows == left_mbs):
            out.append(cur)
            cur = []
    out.append(cur)
    assert len(out) == count and all(out), (len(out), count)
    return out


def to_microbatch(batch: TrainBatch, rows: Sequence[int], *, pad_id: int = 0, pad_multiple: int = 1,
                  device: torch.device | None = None) -> Dict[str, torch.Tensor]:
    """The trainer's [B, S] tensors for ``rows`` of ``batch`` (``moe_rl.train.actor_step``'s
    micro-batch contract): ``tokens``, ``targets``, ``mask``, ``rollout_logp``, ``adv`` (when
    the batch has advantages), plus ``rows`` (the batch rows, in order)."""
    lens = [batch.seq_lengths[i] for i in rows]
    S = max(lens)
    S = -(-S // pad_multiple) * pad_multiple
    B = len(rows)
    tokens = torch.full((B, S), pad_id, dtype=torch.int64)
    targets = torch.full((B, S), pad_id, dtype=torch.int64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    rollout = torch.zeros(B, S, dtype=torch.float32)
    adv = torch.zeros(B, S, dtype=torch.float32) if batch.adv_BT is not None else None
    for b, i in enumerate(rows):
        full = batch.prompt_ids[i] + batch.response_ids[i]
        n = len(full) - 1
        tokens[b, :n] = torch.tensor(full[:-1])
        targets[b, :n] = torch.tensor(full[1:])
        P, T = len(batch.prompt_ids[i]), len(batch.response_ids[i])
        pos = slice(P - 1, P - 1 + T)
        mask[b, pos] = batch.mask_BT[i, :T]
        rollout[b, pos] = batch.rollout_logp_BT[i, :T]
        if adv is not None:
            adv[b, pos] = batch.adv_BT[i, :T].to(torch.float32)
    mb = {"tokens": tokens, "targets": targets, "mask": mask, "rollout_logp": rollout,
          "rows": torch.as_tensor(list(rows), dtype=torch.int64)}
    if adv is not None:
        mb["adv"] = adv
    if device is not None:
        mb = {k: v.to(device) for k, v in mb.items()}
    return mb


def response_values(batch: TrainBatch, mb: Dict[str, torch.Tensor], values_BS: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_microbatch` for one [B, S] tensor: its response tokens as
    [B, T_batch] rows (zero past each response)."""
    T = batch.mask_BT.shape[1]
    out = torch.zeros(len(mb["rows"]), T, dtype=values_BS.dtype)
    for b, i in enumerate(mb["rows"].tolist()):
        P, n = len(batch.prompt_ids[i]), len(batch.response_ids[i])
        out[b, :n] = values_BS[b, P - 1:P - 1 + n].cpu()
    return out
