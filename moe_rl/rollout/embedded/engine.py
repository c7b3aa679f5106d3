"""The embedded engine: continuous batching over the HF model class, in-process.

Legend: B rows in a forward, S KV slots, P prompt tokens, T response tokens, V vocab,
L MoE layers, K experts per token.

Scheduling (where the speed over ``generate`` comes from):
- A group (one prompt, ``n`` samples) is prefilled **once**; its prompt KV is copied into
  each sample's slot and every sample's first token is drawn from the shared last logits.
- A finished sequence frees its slot at once and the next waiting sample takes it
  (continuous batching), so a long-tailed budget distribution does not idle the batch.
- A decode step runs rows ``0..max busy slot``; new samples take the lowest free slot, and
  when a sequence finishes with nothing waiting (the tail of a batch), the highest busy
  sequence moves into the hole (one KV copy), so the range stays dense and no step pays for
  idle rows.

Numerics: log-probs are ``log_softmax(logits / temperature)`` in fp32 of the sampled token
(see ``sampler.py``); routed experts are the router's own top-k of the forward that
produced the token (``router_capture.py``). A group submitted with a :class:`LogprobSpec`
also gets SGLang's prompt log-probs from its one prefill (that forward then keeps the logits
of positions ``start..P-1`` instead of the last one only) and top-k / chosen-id log-probs
of its output tokens, read off the sampled row (``logprobs.py``); other groups pay nothing.
SGLang's penalties (frequency, presence, repetition, ``min_new_tokens``) and ``logit_bias``
process the logits of the rows that ask them before sampling, so the draw and every log-prob
of those rows come from the processed logits, as in SGLang (``penalties.py``); rows without
them take the plain path.

Streaming: a sample submitted with ``on_token`` reports every token as it is taken (a
:class:`TokenEvent`, called on the engine thread; it must only hand the event over, e.g.
``loop.call_soon_threadsafe``). A callback that raises is dropped for that sample, so a
consumer's bug cannot end the engine; the sample's future still resolves.

Threading: the engine is driven by one thread. In-process, :meth:`generate` drives it;
behind the HTTP server, :meth:`start` runs the loop in a background thread and other
threads talk to it through :meth:`submit`, :meth:`abort` and :meth:`call` /
:meth:`submit_call` (a function run between two steps), so weights never change in the
middle of a forward.

Failures are loud: an exception in the loop ends the engine. Every running, waiting and
later request fails at once with the error's text (``EngineFailed``), pending control calls
raise it, and :attr:`error` says why, for the server's ``/health``. A control call whose
caller gave up (its future cancelled) before it ran never runs.

Seeds: a request with ``sampling_seed`` and ``n > 1`` draws sample ``i`` from
:func:`~moe_rl.rollout.types.per_sample_seed` ``(seed, i)``, so the samples of a
group differ (and sample 0 is what ``n = 1`` gives).

Finishing, in SGLang's order after each token: a stop string (``stop_strings.py``, only for
requests submitted with one), then a stop token, then the length budget. Every sampled token
stays in the output. The stop tokens are SGLang's (``_check_token_based_finish``): the
request's ``stop_token_ids``, the model's EOS ids (``config.json`` and
``generation_config.json``) and, when the engine is given the checkpoint's tokenizer, the
tokenizer's EOS and additional stop ids (``tokenizer.tokenizer_stop_ids``); ``ignore_eos``
turns them all off.

Pausing (SGLang's ``pause_generation`` modes): ``abort`` ends every request; ``in_place`` only
stops stepping, running sequences keep their slots and KV; ``retract`` also moves every running
sequence back to the front of the waiting list with its slot freed, as SGLang's scheduler
retracts them (so nothing holds KV and a flush or a KV release can proceed). A retracted
sequence keeps its output, log-probs and sampling state (its penalty counts are rebuilt from
its output); when admitted again it re-prefills its prompt and output but the last token (with
the weights then loaded, as SGLang recomputes the KV) and decodes on, so with unchanged weights
it continues as if never paused. Its routed experts are those of that re-prefill (SGLang drops
and recomputes them on retraction), and its result counts the retractions (``num_retractions``).
Samples submitted during a pause are held outside the scheduler until :meth:`resume` (SGLang
holds them in its tokenizer manager): ``abort_all`` and a flush do not see them.

Weight versions: setting :attr:`weight_version` to a new value records, for every running (or
retracted) sequence with output, how many tokens the old version produced, so a result carries SGLang's
``weight_versions`` spans (``version_spans.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import queue
import threading
import time
import uuid
from typing import Any, Callable

import torch

from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.hf_contract import cache_kwarg, check_engine_contract, expected_moe_layer_ids
from moe_rl.rollout.embedded.kv_cache import SlotKVCache
from moe_rl.rollout.embedded.logprobs import LogprobSpec, PromptLogprobs, TopEntry, prompt_logprobs, row_extras
from moe_rl.rollout.embedded.penalties import Penalties, apply_penalties
from moe_rl.rollout.embedded.router_capture import RouterCapture
from moe_rl.rollout.embedded.sampler import RowParams, sample_tokens_with_logprobs
from moe_rl.rollout.embedded.stop_strings import StopStrings
from moe_rl.rollout.embedded.tokenizer import tokenizer_stop_ids
from moe_rl.rollout.embedded.version_spans import version_spans
from moe_rl.rollout.types import (FinishReason, RolloutRequest, Sample, SamplingParams, logit_bias_range_error,
                                  per_sample_seed)


class EngineFailed(RuntimeError):
    """The engine loop ended (an error, or shutdown); the message says why."""


@dataclasses.dataclass
class SeqResult:
    """A finished sequence, in the engine's terms (the server turns it into SGLang JSON)."""

    rid: str
    prompt_len: int
    output_ids: list[int]
    output_logprobs: list[float]
    routes_NLK: torch.Tensor | None  # [P+T-1, L, K]: routes of positions 0..P+T-2
    finish: dict[str, Any] | None  # SGLang finish_reason object (None: a running stream's snapshot)
    weight_version: str
    weight_versions: list[dict] = dataclasses.field(default_factory=list)  # [{version, start, end}] spans
    num_retractions: int = 0  # times a pause (mode "retract") moved it back to the waiting list
    # with a LogprobSpec: the group's prompt log-probs (when it asked a start), and per output
    # token its top entries / chosen-id log-probs (when it asked them)
    input_logprobs: PromptLogprobs | None = None
    output_top: list[TopEntry | None] | None = None
    output_token_ids_logprobs: list[list[float] | None] | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One token just taken by a streamed sample (``submit(on_token=...)``)."""

    index: int  # the sample's position in its submit call
    token: int
    logprob: float
    top: TopEntry | None  # with a LogprobSpec asking top_k
    token_ids_logprobs: list[float] | None  # with a LogprobSpec asking token_ids
    weight_version: str  # the version that produced it
    num_retractions: int
    input_logprobs: PromptLogprobs | None  # the group's prompt log-probs (same object every token)
    finished: bool = False  # the token ended the sample (its future is already resolved)


def _id_set(ids: int | list[int] | None) -> set[int]:
    """An ``eos_token_id`` field (one id, a list, or None) as a set."""
    return {ids} if isinstance(ids, int) else set(ids or [])


class _Group:
    def __init__(self, prompt_ids: list[int], remaining: int, logprobs: LogprobSpec | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.remaining = remaining  # samples not yet admitted
        self.prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_logits_V: torch.Tensor | None = None
        self.prompt_routes_PLK: torch.Tensor | None = None
        self.logprobs = logprobs
        self.prompt_logprobs: PromptLogprobs | None = None  # kept for every sample's result

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs.input_start is not None


@dataclasses.dataclass
class RequestCounts:
    """Finished samples since the engine started (SGLang's ``num_requests_total``,
    ``prompt_tokens_total`` and ``generation_tokens_total``; a prompt counts once per sample)."""

    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class _Seq:
    def __init__(self, rid: str, group: _Group, params: SamplingParams, future: cf.Future | None,
                 seed: int | None = None, stop: StopStrings | None = None, index: int = 0,
                 on_token: Callable[[TokenEvent], None] | None = None, penalties: Penalties | None = None) -> None:
        self.rid = rid
        self.group = group
        self.params = params
        self.penalties = penalties  # None: no penalty or logit bias (the plain sampling path)
        self.stop = stop
        self.index = index
        self.on_token = on_token
        self.streamed = on_token is not None  # for the request counters (on_token is dropped if it fails)
        spec = group.logprobs
        self.out_top: list[TopEntry | None] | None = [] if spec is not None and spec.top_k > 0 else None
        self.out_chosen: list[list[float] | None] | None = [] if spec is not None and spec.token_ids is not None \
            else None
        self.version_events: list[tuple[str, int]] = []  # (old version, tokens it produced)
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.future = future
        self.slot = -1
        self.out_ids: list[int] = []
        self.out_lp: list[float] = []
        self.routes: list[torch.Tensor] = []  # one [L, K] per response token
        # routes of prompt positions 0..P-2 when the sequence re-prefilled after a retraction
        # (else its group's); with ``routes`` they cover positions 0..P+T-2
        self.prefix_routes: torch.Tensor | None = None
        self.retracted = False  # waiting again after a retraction: re-prefills on admission
        self.num_retractions = 0
        self.aborted: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.group.prompt_ids)


class EmbeddedEngine:
    """HF causal LM + slot KV cache + continuous-batching scheduler."""

    def __init__(self, cfg: EmbeddedEngineConfig, model: torch.nn.Module | None = None, *,
                 tokenizer: Any = None) -> None:
        """``tokenizer``: the checkpoint's (``tokenizer.load_tokenizer``), whose EOS and
        additional stop ids then also end samples, as in SGLang; None when there is none."""
        import transformers as tf

        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        dtype = getattr(torch, cfg.dtype)
        if model is None:
            if not cfg.model_path:
                raise ValueError("embedded.model_path is empty")
            model = tf.AutoModelForCausalLM.from_pretrained(
                cfg.model_path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code)
        self.model = model.eval()
        self._cache_kw = cache_kwarg(model)
        self.hf_config = model.config
        # SGLang's hf_eos_token_id: the config's EOS ids and those of generation_config.json
        # (transformers loads it into model.generation_config; instruct checkpoints often list
        # more ids there, e.g. a chat end token next to the base EOS)
        gen = getattr(model, "generation_config", None)
        self.eos_ids = _id_set(self.hf_config.eos_token_id) | _id_set(getattr(gen, "eos_token_id", None))
        # and the tokenizer's (SGLang's scheduler gives every request its tokenizer)
        self.tokenizer = tokenizer
        self.eos_ids |= tokenizer_stop_ids(tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        self.context_len = cfg.max_context_len or int(self.hf_config.max_position_embeddings)
        self.capture = RouterCapture(model) if cfg.capture_routed_experts else None
        self.expected_moe_layers = expected_moe_layer_ids(self.hf_config)
        self.expects_routers = bool(self.expected_moe_layers)
        self.num_hidden_layers = int(self.hf_config.num_hidden_layers)
        self.top_k_experts = int(getattr(self.hf_config, "num_experts_per_tok", 0) or 0)
        self.cache = SlotKVCache(cfg.max_running, self.context_len, dtype)
        self._weight_version = cfg.weight_version
        self.gen = torch.Generator().manual_seed(cfg.seed)

        self._slots: list[_Seq | None] = [None] * cfg.max_running
        self._waiting: list[_Seq] = []
        self._held: list[_Seq] = []  # arrived while paused: outside the scheduler until resumed
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._idle_commands: list[tuple[Callable[[], Any], cf.Future]] = []
        self._abort_lock = threading.Lock()
        self._abort_rids: set[str] = set()
        self._abort_prefixes: set[str] = set()
        self._abort_all = False
        self.paused = False
        self.released: set[str] = set()  # released memory tags
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stop_message = "engine stopped"
        self._state_lock = threading.Lock()  # orders submit/call against the loop's death
        self.error: str | None = None  # why the loop ended; None while it serves
        self._rid_counter = itertools.count()
        self.num_generated_tokens = 0
        # finished samples since start, by streamed or not ("true"/"false", SGLang's is_streaming label)
        self.finished_counts = {"false": RequestCounts(), "true": RequestCounts()}
        self.num_aborted_requests = 0
        check_engine_contract(self)

    # ---------------------------------------------------------------- public, any thread
    @property
    def moe_layer_ids(self) -> list[int]:
        return self.capture.layer_ids if self.capture else []

    @property
    def weight_version(self) -> str:
        return self._weight_version

    @weight_version.setter
    def weight_version(self, new: str) -> None:
        """Set on the engine thread (between steps); a change ends the old version's span of
        every sequence that has output, as SGLang's ``record_weight_version_change``."""
        if new == self._weight_version:
            return
        for s in [s for s in self._slots if s is not None] + self._waiting:  # retracted ones wait with output
            if s.out_ids:
                s.version_events.append((self._weight_version, len(s.out_ids)))
        self._weight_version = new

    def submit(self, prompt_ids: list[int], params: SamplingParams | list[SamplingParams],
               rids: list[str] | None = None, *, stop: StopStrings | None = None,
               logprobs: LogprobSpec | None = None,
               on_token: Callable[[TokenEvent], None] | None = None) -> list[cf.Future]:
        """Queue one prompt with ``params.n`` samples (or one sample per entry of a list of
        params, e.g. different budgets); they share one prefill. One future (-> SeqResult) each.
        ``stop``: the matcher of ``params.stop``, the samples' stop strings (built by the caller,
        who has the tokenizer: the server, or :meth:`generate`). ``logprobs``: the prompt /
        top-k / chosen-id log-probs the samples report besides their tokens' (the caller checked
        ``0 <= input_start < len(prompt_ids)`` and ``top_k <= vocab``). ``on_token``: called on
        the engine thread with each sample's every new token (streaming). A ``logit_bias`` key
        outside the vocabulary is SGLang's ValueError."""
        if len(prompt_ids) >= self.context_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room for a response in the engine's "
                             f"context of {self.context_len} tokens")
        per_sample = [params] * params.n if isinstance(params, SamplingParams) else list(params)
        for sp in per_sample:
            bad = next((k for k in sp.logit_bias or {} if not 0 <= k < self.vocab_size), None)
            if bad is not None:
                raise ValueError(logit_bias_range_error(bad, self.vocab_size))
        assert all(list(sp.stop) == (stop.strs if stop is not None else []) for sp in per_sample), (
            "submit(stop=...) must match every sample's SamplingParams.stop")
        n = len(per_sample)
        rids = rids or [uuid.uuid4().hex for _ in range(n)]
        assert len(rids) == n
        if logprobs is not None and logprobs.input_start is not None:
            assert 0 <= logprobs.input_start < len(prompt_ids), (logprobs.input_start, len(prompt_ids))
        group = _Group(list(prompt_ids), n, logprobs)
        futs = [cf.Future() for _ in range(n)]
        seqs = [_Seq(rid, group, sp, f, None if sp.sampling_seed is None else per_sample_seed(sp.sampling_seed, i),
                     stop, i, on_token, Penalties.of(sp, self.eos_ids))
                for i, (rid, sp, f) in enumerate(zip(rids, per_sample, futs))]
        with self._state_lock:
            if self.error is not None:
                raise EngineFailed(self.error)
            for seq in seqs:
                self._inbox.put(seq)
        self._wake.set()
        return futs

    def abort(self, rid: str = "", abort_all: bool = False, *, prefix: bool = False) -> None:
        """End every request (``abort_all``) or those of ``rid``: exactly that sample, or with
        ``prefix`` every sample whose rid starts with it, as SGLang's scheduler matches
        ``/abort_request`` (so a request's rid also ends its ``rid_i`` samples). Their finish
        reasons carry SGLang's texts: "Aborted" for a running sample, "Abort in waiting queue"
        for one not started (or retracted). An empty rid without ``abort_all`` does nothing."""
        with self._abort_lock:
            if abort_all:
                self._abort_all = True
            elif rid:
                (self._abort_prefixes if prefix else self._abort_rids).add(rid)
        self._wake.set()

    def submit_call(self, fn: Callable[[], Any], *, when_idle: bool = False) -> cf.Future:
        """Queue ``fn`` to run on the engine thread between steps (``when_idle``: once nothing
        runs); its future. Cancelling the future before it starts means it never runs."""
        fut: cf.Future = cf.Future()
        if self._thread is None or threading.current_thread() is self._thread:
            if when_idle:
                assert not self.num_running, "when_idle call with running sequences and no engine thread"
            self._run_one(fn, fut)
            return fut
        with self._state_lock:
            if self.error is not None:
                raise EngineFailed(self.error)
            self._commands.put((fn, fut, when_idle))
        self._wake.set()
        return fut

    def call(self, fn: Callable[[], Any], *, when_idle: bool = False, timeout: float | None = None) -> Any:
        """:meth:`submit_call` and wait; on timeout the call is cancelled if it has not started."""
        fut = self.submit_call(fn, when_idle=when_idle)
        try:
            return fut.result(timeout=timeout)
        except cf.TimeoutError:
            if fut.cancel():
                raise TimeoutError(f"engine call not started within {timeout}s; cancelled") from None
            return fut.result()  # already running: it takes effect, so wait for it

    def wake(self) -> None:
        """Make the loop look for work now (after a resume)."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        """The loop serves requests (started, not stopped, no error)."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        """Samples queued in the scheduler (not those held by a pause, :attr:`num_held`)."""
        return len(self._waiting) + (0 if self.paused else self._inbox.qsize())

    @property
    def num_used_tokens(self) -> int:
        """Tokens (prompt + output so far) of the running samples: what their KV slots hold."""
        return sum(s.prompt_len + len(s.out_ids) for s in list(self._slots) if s is not None)

    @property
    def max_total_num_tokens(self) -> int:
        """KV capacity in tokens, SGLang's ``max_total_num_tokens``: one context per slot."""
        return self.cfg.max_running * self.context_len

    def waiting_counts(self) -> tuple[int, int]:
        """(tokens to prefill again or for the first time, retracted samples) of the waiting list."""
        waiting = list(self._waiting)
        return sum(s.prompt_len + len(s.out_ids) for s in waiting), sum(s.retracted for s in waiting)

    @property
    def num_held(self) -> int:
        """Samples that arrived during a pause and wait for ``/continue_generation``."""
        return len(self._held) + (self._inbox.qsize() if self.paused else 0)

    def start(self) -> None:
        """Run the step loop in a daemon thread (for the HTTP server)."""
        assert self._thread is None
        self._thread = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)
        self._thread.start()

    def stop(self, message: str = "engine stopped") -> None:
        """End the loop; what is running or waiting fails with ``message``."""
        self._stop_message = message
        self._stop = True
        self._wake.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------- in-process API
    def generate(self, requests: list[RolloutRequest], *, tokenizer: Any = None) -> list[Sample]:
        """Sample every request to completion; returns group-major, sample-minor ``Sample``s.
        ``tokenizer``: the checkpoint's, to match stop strings (``SamplingParams.stop``) as the
        server does; required when a request has them."""
        assert self._thread is None, "generate() drives the engine itself; use submit() with start()"
        matchers: dict[tuple[str, ...], StopStrings] = {}

        def stop_of(sp: SamplingParams) -> StopStrings | None:
            if not sp.stop:
                return None
            if tokenizer is None:
                raise ValueError(f"stop strings {sp.stop!r:.80} need the checkpoint's tokenizer: pass it to "
                                 "EmbeddedEngine.generate(..., tokenizer=)")
            key = tuple(sp.stop)
            if key not in matchers:
                matchers[key] = StopStrings(list(key), tokenizer)
            return matchers[key]

        stops = [stop_of(r.sampling) for r in requests]  # every request checked before any is queued
        futs = [(r, i, f) for r, stop in zip(requests, stops)
                for i, f in enumerate(self.submit(r.prompt_ids, r.sampling, stop=stop))]
        while any(not f.done() for _, _, f in futs):
            self.step()
        out = []
        for r, i, f in futs:
            res: SeqResult = f.result()
            out.append(Sample(
                group_id=r.group_id, sample_index=i, prompt_ids=list(r.prompt_ids),
                response_ids=res.output_ids,
                rollout_logprobs_T=torch.tensor(res.output_logprobs, dtype=torch.float32),
                routed_experts_NLK=res.routes_NLK, finish_reason=FinishReason(res.finish["type"]),
                weight_version=res.weight_version))
        return out

    # ------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        message, status = self._stop_message, 503
        try:
            while not self._stop:
                self._run_commands()
                if self._has_work():
                    self.step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            message = self._stop_message
        except BaseException as e:  # noqa: BLE001 - the engine ends; every request learns why
            import traceback

            traceback.print_exc()
            message, status = f"engine error: {type(e).__name__}: {e}", 500
        self._die(message, status)

    def _die(self, message: str, status: int) -> None:
        with self._state_lock:  # after this, submit/submit_call raise instead of queueing
            self.error = message
        self._fail_all(message, status)
        pending = self._idle_commands + [self._commands.get_nowait()[:2] for _ in range(self._commands.qsize())]
        self._idle_commands = []
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineFailed(message))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut, when_idle = self._commands.get_nowait()
            except queue.Empty:
                break
            if when_idle:
                self._idle_commands.append((fn, fut))
                continue
            self._run_one(fn, fut)
        if self._idle_commands and self.num_running == 0:
            cmds, self._idle_commands = self._idle_commands, []
            for fn, fut in cmds:
                self._run_one(fn, fut)

    @staticmethod
    def _run_one(fn, fut: cf.Future) -> None:
        if not fut.set_running_or_notify_cancel():  # its caller gave up: it must not take effect
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _has_work(self) -> bool:
        self._drain_inbox()
        if self._abort_all or self._abort_rids or self._abort_prefixes:
            return True
        if self.paused or "weights" in self.released or "kv_cache" in self.released:
            return False
        return bool(self._waiting) or self.num_running > 0

    def _drain_inbox(self) -> None:
        """Move submitted samples to the waiting list, or while paused to the held list: SGLang
        blocks a request that arrives during a pause before it reaches the scheduler, so an
        ``abort_all`` (e.g. the one of ``/update_weight_version``) does not end it, a flush
        does not count it, and it runs after ``/continue_generation``."""
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            (self._held if self.paused else self._waiting).append(seq)

    def _fail_all(self, message: str, status: int) -> None:
        self._drain_inbox()
        for s in [s for s in self._slots if s is not None] + self._waiting + self._held:
            self._finish(s, {"type": "abort", "message": message, "status_code": status, "err_type": None})
        self._waiting, self._held = [], []

    # ------------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self) -> None:
        """Apply aborts, admit waiting samples into free slots, decode one token for all."""
        self._drain_inbox()
        self._apply_aborts()
        if self.paused or "weights" in self.released or "kv_cache" in self.released:
            return
        if not self._idle_commands:
            self._admit()
        if self.num_running:
            self._decode()

    def _apply_aborts(self) -> None:
        with self._abort_lock:
            everything, self._abort_all = self._abort_all, False
            rids, self._abort_rids = self._abort_rids, set()
            prefixes, self._abort_prefixes = self._abort_prefixes, set()
        if not (everything or rids or prefixes):
            return

        def named(s: _Seq) -> bool:
            return s.rid in rids or any(s.rid.startswith(p) for p in prefixes)

        def end(s: _Seq, message: str) -> None:
            self._finish(s, {"type": "abort", "message": message, "status_code": None, "err_type": None})

        for s in [s for s in self._slots if s is not None]:
            if everything or named(s):
                end(s, "Aborted")
        for s in list(self._waiting):  # _finish takes it out of the list
            if everything or named(s):
                end(s, "Abort in waiting queue")
        for s in list(self._held):  # by rid only (a client that gave up): abort_all does not reach them
            if named(s):
                end(s, "Abort in waiting queue")
        live = lambda s: s.future is not None and not s.future.done()  # noqa: E731
        self._waiting = [s for s in self._waiting if live(s)]
        self._held = [s for s in self._held if live(s)]

    def _admit(self) -> None:
        admitted: list[_Seq] = []
        free = [i for i, s in enumerate(self._slots) if s is None]
        while free and self._waiting:
            seq = self._waiting[0]  # stays waiting until admitted, so a failing prefill fails it too
            if seq.retracted:  # has its first token already: rebuild its KV, decode on
                self._readmit(seq, free.pop(0))
                self._waiting.pop(0)
                continue
            g = seq.group
            if g.prompt_kv is None and (seq.params.max_new_tokens > 0 or self.capture is not None
                                        or (g.wants_prompt_logprobs and g.prompt_logprobs is None)):
                self._prefill(g)
            self._waiting.pop(0)
            if seq.params.max_new_tokens == 0:  # prefilled for the prompt's routed experts or log-probs
                self._release_prompt(g)
                self._finish(seq, {"type": "length", "length": 0})
                continue
            slot = free.pop(0)
            self.cache.load_prompt(slot, g.prompt_kv)  # type: ignore[arg-type]
            seq.slot = slot
            self._slots[slot] = seq
            self._release_prompt(g)
            admitted.append(seq)
        if not admitted:
            return
        logits_BV = torch.stack([s.group.last_logits_V for s in admitted])  # type: ignore[misc]
        routes = [s.group.prompt_routes_PLK[-1] if s.group.prompt_routes_PLK is not None else None
                  for s in admitted]
        self._take_tokens(admitted, logits_BV, routes)

    def _readmit(self, seq: _Seq, slot: int) -> None:
        """A retracted sequence re-prefills its prompt and output but the last token (whose KV
        the next decode step writes) into ``slot``; the prefill's logits are not sampled."""
        ids = seq.group.prompt_ids + seq.out_ids[:-1]
        kv, _ = self.forward_prefill(ids, self.cache)
        if self.capture is not None and self.capture.num_moe_layers:
            rows_NLK = self.capture.stacked()  # [P+T-1, L, K]
            P = seq.prompt_len
            seq.prefix_routes = rows_NLK[: P - 1]
            seq.routes = list(rows_NLK[P - 1:].unbind(0))
        self.cache.load_prompt(slot, kv)
        seq.slot = slot
        seq.retracted = False
        self._slots[slot] = seq

    @staticmethod
    def _release_prompt(g: _Group) -> None:
        """One more sample of ``g`` left the waiting list; the last one drops the prompt KV."""
        g.remaining -= 1
        if g.remaining == 0:
            g.prompt_kv = None

    # The two forwards, shared with the startup contract check (hf_contract.py).
    def forward_prefill(self, prompt_ids: list[int], cache: SlotKVCache):
        """Prompt forward in capture mode -> (per-layer prompt KV ``[1, H, P, D]``, last logits ``[V]``)."""
        kv, logits_KV = self._forward_prefill_rows(prompt_ids, cache, 1)
        return kv, logits_KV[-1].float()

    def _forward_prefill_rows(self, prompt_ids: list[int], cache: SlotKVCache, keep: int):
        """Prompt forward in capture mode -> (prompt KV, logits ``[keep, V]`` of the last ``keep``
        positions, in the model's dtype)."""
        P = len(prompt_ids)
        causal_PP = torch.ones(P, P, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, P, P, dtype=cache.dtype).masked_fill(~causal_PP, torch.finfo(cache.dtype).min)
        captured = cache.plan_capture()
        out = self.model(input_ids=torch.tensor([prompt_ids]), position_ids=torch.arange(P)[None],
                         attention_mask=mask, use_cache=True, logits_to_keep=keep, **{self._cache_kw: cache})
        return dict(captured), out.logits[0, -keep:]

    def forward_decode(self, ids_B: torch.Tensor, pos_B: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """One token for rows = slots ``0..B-1`` at positions ``pos_B`` -> logits ``[B, V]``."""
        B = ids_B.shape[0]
        kv_len = int(pos_B.max()) + 1
        allowed_BL = torch.arange(kv_len)[None, :] <= pos_B[:, None]
        mask = torch.zeros(B, 1, 1, kv_len, dtype=cache.dtype).masked_fill(
            ~allowed_BL[:, None, None, :], torch.finfo(cache.dtype).min)
        cache.plan_decode(pos_B, kv_len)
        out = self.model(input_ids=ids_B[:, None], position_ids=pos_B[:, None], attention_mask=mask,
                         use_cache=True, **{self._cache_kw: cache})
        return out.logits[:, -1]

    def _prefill(self, g: _Group) -> None:
        if g.wants_prompt_logprobs and g.prompt_logprobs is None:
            # SGLang's prompt log-probs come from this same forward: keep the rows from start on
            start = g.logprobs.input_start  # type: ignore[union-attr]
            g.prompt_kv, logits_KV = self._forward_prefill_rows(g.prompt_ids, self.cache, len(g.prompt_ids) - start)
            g.last_logits_V = logits_KV[-1].float().clone()  # not a view: the rows are dropped below
            g.prompt_logprobs = prompt_logprobs(logits_KV[:-1], g.prompt_ids, g.logprobs)  # type: ignore[arg-type]
        else:
            g.prompt_kv, g.last_logits_V = self.forward_prefill(g.prompt_ids, self.cache)
        if self.capture is not None and self.capture.num_moe_layers:
            g.prompt_routes_PLK = self.capture.stacked()  # [P, L, K]

    def _compact(self) -> None:
        """Move the highest busy sequences into lower free slots until busy slots are ``0..n-1``."""
        lo, hi = 0, len(self._slots) - 1
        while True:
            while lo < len(self._slots) and self._slots[lo] is not None:
                lo += 1
            while hi >= 0 and self._slots[hi] is None:
                hi -= 1
            if lo >= hi:
                return
            seq = self._slots[hi]
            # positions 0..P+T-2 hold KV; the next step writes position P+T-1
            self.cache.move(hi, lo, seq.prompt_len + len(seq.out_ids) - 1)
            self._slots[lo], self._slots[hi] = seq, None
            seq.slot = lo

    def _decode(self) -> None:
        self._compact()
        B = max(i for i, s in enumerate(self._slots) if s is not None) + 1
        rows = self._slots[:B]
        ids_B = torch.zeros(B, dtype=torch.long)
        pos_B = torch.zeros(B, dtype=torch.long)
        for i, s in enumerate(rows):
            if s is not None:
                ids_B[i] = s.out_ids[-1]
                pos_B[i] = s.prompt_len + len(s.out_ids) - 1
        all_logits_BV = self.forward_decode(ids_B, pos_B, self.cache)
        live = [i for i, s in enumerate(rows) if s is not None]
        live_t = torch.tensor(live)
        logits_BV = all_logits_BV[live_t]
        routes = [None] * len(live)
        if self.capture is not None and self.capture.num_moe_layers:
            routes_BLK = self.capture.stacked()[live_t]
            routes = list(routes_BLK.unbind(0))
        self._take_tokens([rows[i] for i in live], logits_BV, routes)  # type: ignore[misc]

    def _take_tokens(self, seqs: list[_Seq], logits_BV: torch.Tensor, routes: list) -> None:
        params = RowParams(
            temperature_B=torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32),
            top_p_B=torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32),
            top_k_B=torch.tensor([s.params.top_k for s in seqs], dtype=torch.long),
            min_p_B=torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32),
            generators=[s.gen for s in seqs])
        penalised = [(b, s.penalties, s.out_ids) for b, s in enumerate(seqs) if s.penalties is not None]
        if penalised:
            logits_BV = apply_penalties(logits_BV, penalised)
        tok_B, lp_B, logprobs_BV = sample_tokens_with_logprobs(logits_BV, params, self.gen)
        self.num_generated_tokens += len(seqs)
        specs = [s.group.logprobs if s.group.logprobs is not None and s.group.logprobs.per_token else None
                 for s in seqs]
        tops, chosen = row_extras(logprobs_BV, specs) if any(specs) else ([None] * len(seqs), [None] * len(seqs))
        for s, tok, lp, r, top, ch in zip(seqs, tok_B.tolist(), lp_B.tolist(), routes, tops, chosen):
            s.out_ids.append(tok)
            s.out_lp.append(lp)
            if s.penalties is not None:
                s.penalties.observe(tok)
            if s.out_top is not None:
                s.out_top.append(top)
            if s.out_chosen is not None:
                s.out_chosen.append(ch)
            if r is not None:
                s.routes.append(r)
            self._check_finished(s, tok)
            if s.on_token is not None:  # after the finish check: a last token is not reported as running
                self._report(s, TokenEvent(s.index, tok, lp, top, ch, self.weight_version, s.num_retractions,
                                           s.group.prompt_logprobs, finished=s.future is not None and s.future.done()))

    @staticmethod
    def _report(s: _Seq, event: TokenEvent) -> None:
        try:
            s.on_token(event)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - the consumer's failure: stop reporting, keep serving
            import traceback

            traceback.print_exc()
            s.on_token = None

    def _check_finished(self, s: _Seq, tok: int) -> None:
        """SGLang's order (``update_finish_state``): stop string, stop token, length."""
        matched = s.stop.match(s.out_ids) if s.stop is not None else None
        if matched is not None:
            self._finish(s, {"type": "stop", "matched": matched})
        elif not s.params.ignore_eos and (tok in self.eos_ids or tok in s.params.stop_token_ids):
            self._finish(s, {"type": "stop", "matched": tok})
        elif len(s.out_ids) >= s.params.max_new_tokens or s.prompt_len + len(s.out_ids) >= self.context_len:
            self._finish(s, {"type": "length", "length": len(s.out_ids)})

    def _finish(self, s: _Seq, finish: dict[str, Any]) -> None:
        c = self.finished_counts["true" if s.streamed else "false"]
        c.requests += 1
        c.prompt_tokens += s.prompt_len
        c.generation_tokens += len(s.out_ids)
        if finish["type"] == "abort":
            self.num_aborted_requests += 1
        if s.slot >= 0:
            self._slots[s.slot] = None
            s.slot = -1
        if s in self._waiting:
            self._waiting.remove(s)
            if not s.retracted:  # a retracted one left the group's count when first admitted
                self._release_prompt(s.group)
        routes = None
        g = s.group
        if g.prompt_routes_PLK is not None:
            P = s.prompt_len
            parts = [g.prompt_routes_PLK[: P - 1] if s.prefix_routes is None else s.prefix_routes]
            if s.routes:
                parts.append(torch.stack(s.routes))
            routes = torch.cat(parts)
        res = SeqResult(rid=s.rid, prompt_len=s.prompt_len, output_ids=s.out_ids, output_logprobs=s.out_lp,
                        routes_NLK=routes, finish=finish, weight_version=self.weight_version,
                        weight_versions=version_spans(s.version_events, self.weight_version, len(s.out_ids)),
                        num_retractions=s.num_retractions, input_logprobs=g.prompt_logprobs,
                        output_top=s.out_top, output_token_ids_logprobs=s.out_chosen)
        if s.future is not None and not s.future.done():
            s.future.set_result(res)

    # ------------------------------------------------------------------- control (engine thread)
    def pause(self, mode: str = "abort") -> None:
        """Stop stepping (on the engine thread). ``abort``: end every request first;
        ``retract``: move the running sequences back to the waiting list, slots freed;
        ``in_place``: leave them in their slots."""
        if mode == "abort":
            self.abort(abort_all=True)
            self._apply_aborts()
        elif mode == "retract":
            self._retract_running()
        self.paused = True

    def _retract_running(self) -> None:
        """SGLang's retraction: every running sequence frees its slot and waits, first in line
        (in slot order), to re-prefill on admission."""
        running = [s for s in self._slots if s is not None]
        for s in running:
            self._slots[s.slot] = None
            s.slot = -1
            s.retracted = True
            s.num_retractions += 1
            if s.penalties is not None:
                s.penalties.drop_counts()  # rebuilt from the output when it runs again
        self._waiting[:0] = running

    def resume(self) -> None:
        """End a pause (on the engine thread): the held requests join the waiting list."""
        self._drain_inbox()
        self.paused = False
        self._waiting.extend(self._held)
        self._held = []
        self._wake.set()

    def new_rid(self) -> str:
        return f"{uuid.uuid4().hex[:16]}{next(self._rid_counter)}"

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.num_running or self.num_waiting:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
