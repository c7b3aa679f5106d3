"""Typed configuration of the rollout stage: which engine, how it is launched, how it is called."""

from __future__ import annotations

import dataclasses
import math

from moe_rl.rollout.types import check_stop_strings

# HF attention backends that use the engine's 4-D additive attention mask as given (hf_contract.py)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclasses.dataclass
class EmbeddedEngineConfig:
    """The in-process engine (HF model class, continuous batching on a slot KV cache)."""

    model_path: str = ""  # HF checkpoint directory (config.json + safetensors)
    max_running: int = 32  # sequences decoding at once (KV cache slots)
    max_context_len: int = 0  # prompt + response tokens per slot; 0 = max_position_embeddings
    dtype: str = "float32"  # model and KV cache dtype
    attn_implementation: str = "sdpa"  # HF attention backend ("sdpa" or "eager")
    capture_routed_experts: bool = True  # record each MoE layer's top-k per token
    seed: int = 0  # engine RNG seed for requests without sampling_seed
    weight_version: str = "default"  # initial weight version (SGLang's --weight-version)
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    trust_remote_code: bool = False  # run a checkpoint's own modelling code (only for checkpoints you trust)

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"embedded.max_running ({self.max_running}) must be >= 1")
        if self.max_context_len < 0:
            raise ValueError(f"embedded.max_context_len ({self.max_context_len}) must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"embedded.dtype ({self.dtype!r}) must be float32, bfloat16 or float16")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"embedded.attn_implementation ({self.attn_implementation!r}) must be one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)} (the engine passes a 4-D additive mask, "
                             "which flash attention does not take)")


@dataclasses.dataclass
class SGLangConfig:
    """Real SGLang servers (``python -m sglang.launch_server``); flag names per sglang 0.5.23."""

    model_path: str = ""  # HF checkpoint the servers load first
    num_servers: int = 1  # independent engines (each one /generate endpoint)
    tp_size: int = 1  # --tp-size, GPUs per engine
    ep_size: int = 1  # --ep-size, expert parallel degree inside an engine (divides tp_size)
    dp_size: int = 1  # --dp-size, data-parallel replicas inside one engine (replica r: GPUs from its base + r*tp_size)
    attn_dp_size: int = 1  # --attn-dp-size, DP attention degree (1 = off)
    mem_fraction_static: float = 0.7  # --mem-fraction-static, GPU memory for weights + KV
    enable_memory_saver: bool = True  # --enable-memory-saver (release/resume_memory_occupation)
    enable_weights_cpu_backup: bool = False  # --enable-weights-cpu-backup (colocated offload)
    enable_return_routed_experts: bool = True  # --enable-return-routed-experts (routing replay)
    host: str = "127.0.0.1"  # --host each server binds
    base_port: int = 30000  # server i listens on base_port + i
    nnodes: int = 1  # --nnodes, nodes one engine spans (multi-node TP/EP)
    node_rank: int = 0  # --node-rank of this launcher within an engine
    dist_init_addr: str = ""  # --dist-init-addr host:port of the engine's node 0 (nnodes > 1)
    base_gpu_id: int = 0  # --base-gpu-id of server 0; server i starts at base_gpu_id + i*dp_size*tp_size/nnodes
    weight_version: str = "default"  # --weight-version at startup
    random_seed: int | None = None  # --random-seed
    skip_server_warmup: bool = True  # --skip-server-warmup
    enable_metrics: bool = True  # --enable-metrics
    extra_args: list[str] = dataclasses.field(default_factory=list)  # appended verbatim
    python: str = "python"  # interpreter that has sglang installed
    module: str = "sglang.launch_server"  # server module; moe_rl.rollout.embedded.server takes the same flags (CPU)
    startup_timeout_s: float = 900.0  # deadline for every server to answer /health
    router_port: int = 0  # start sglang-router on this port (0 = no router)
    trust_remote_code: bool = False  # --trust-remote-code: run the checkpoint's own Python (trusted checkpoints only)
    api_key: str = dataclasses.field(default="", repr=False)  # --api-key the servers require; the client sends it

    def __post_init__(self) -> None:
        for name in ("num_servers", "tp_size", "ep_size", "dp_size", "attn_dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"sglang.{name} ({getattr(self, name)}) must be >= 1")
        if self.tp_size % self.ep_size:
            raise ValueError(f"sglang.ep_size ({self.ep_size}) must divide sglang.tp_size ({self.tp_size})")
        if self.tp_size % self.attn_dp_size:
            raise ValueError(
                f"sglang.attn_dp_size ({self.attn_dp_size}) must divide sglang.tp_size ({self.tp_size})")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"sglang.mem_fraction_static ({self.mem_fraction_static}) must be in (0, 1)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"sglang.node_rank ({self.node_rank}) must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError(f"sglang.dist_init_addr is required when sglang.nnodes ({self.nnodes}) > 1")
        # SGLang 0.5.23 refuses these two at startup (srt/arg_groups/parallel_hook.py and
        # validation_hook.py); refusing them here saves a GPU job that would die in its first minute.
        if self.dp_size > 1 and self.attn_dp_size > 1:
            raise ValueError(
                f"sglang.dp_size ({self.dp_size}) with sglang.attn_dp_size ({self.attn_dp_size}): SGLang refuses "
                "data-parallel replicas combined with attention data parallelism; set one of them to 1")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ValueError(
                f"sglang.dp_size ({self.dp_size}) with sglang.nnodes ({self.nnodes}): SGLang does not support "
                "multi-node data-parallel replicas; use attention DP (sglang.attn_dp_size) across nodes, or "
                "more servers (one per node group)")
        if self.tp_size % self.nnodes:
            raise ValueError(f"sglang.nnodes ({self.nnodes}) must divide sglang.tp_size ({self.tp_size}): "
                             "SGLang spreads one engine's tensor-parallel ranks evenly over its nodes")
        if self.base_gpu_id < 0:
            raise ValueError(f"sglang.base_gpu_id ({self.base_gpu_id}) must be >= 0")
        placement = [f for f in ("--base-gpu-id", "--gpu-id-step") if any(a.split("=")[0] == f for a in self.extra_args)]
        if placement:
            raise ValueError(f"sglang.extra_args sets {', '.join(placement)}: GPU placement is computed from "
                             "sglang.base_gpu_id, tp_size and dp_size (set those instead)")
        if self.nnodes > 1 and self.num_servers != 1:
            raise ValueError(
                f"sglang.num_servers ({self.num_servers}) must be 1 per launcher when nnodes ({self.nnodes}) > 1")


@dataclasses.dataclass
class ClientConfig:
    """How the trainer calls the engines over HTTP."""

    server_urls: list[str] = dataclasses.field(default_factory=list)  # every engine, for control calls
    router_url: str = ""  # send /generate via sglang-router (drops return_routed_experts!)
    # the servers' --api-key, sent as "Authorization: Bearer <key>" on every call ("" = none)
    api_key: str = dataclasses.field(default="", repr=False)
    max_concurrency: int = 64  # /generate requests in flight at once, over all servers
    request_timeout_s: float = 600.0  # one /generate call, then it is retried elsewhere
    control_timeout_s: float = 300.0  # one control call (pause, update, ...)
    health_timeout_s: float = 30.0  # one /health probe of a failed server (SGLang's may generate for 20 s)
    max_attempts: int = 8  # failed tries per group (5xx, 408, 429, connection error, timeout)
    retry_backoff_base_s: float = 0.25  # retry n of a group waits uniform(0, base * 2^(n-1)) (full jitter)
    retry_backoff_max_s: float = 10.0  # cap on one retry wait, a server's Retry-After included
    server_cooldown_s: float = 5.0  # a failed server gets no new requests for this long
    allow_mixed_versions: bool = False  # keep groups spanning weight versions (else stale samples are redone)
    return_routed_experts: bool = True  # ask for routed experts (needs direct server URLs)

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"client.max_concurrency ({self.max_concurrency}) must be >= 1")
        if self.max_attempts < 1:
            raise ValueError(f"client.max_attempts ({self.max_attempts}) must be >= 1")
        for name in ("request_timeout_s", "control_timeout_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"client.{name} ({getattr(self, name)}) must be > 0")
        if not 0 <= self.retry_backoff_base_s <= self.retry_backoff_max_s:
            raise ValueError(f"client.retry_backoff_base_s ({self.retry_backoff_base_s}) must be in "
                             f"[0, retry_backoff_max_s={self.retry_backoff_max_s}]")


def check_sampling(section: str, temperature: float, top_p: float, top_k: int) -> None:
    """The ranges ``SamplingParams`` (rollout/types.py) checks per request, checked where a config
    section sets them (``section``: its name in the message), before any work."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{section}.temperature ({temperature}) must be a finite number >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise ValueError(f"{section}.top_p ({top_p}) must be in (0, 1]")
    if top_k < 1 and top_k != -1:
        raise ValueError(f"{section}.top_k ({top_k}) must be >= 1, or -1 for all tokens")


@dataclasses.dataclass
class RolloutConfig:
    """The rollout stage: engine kind, its settings, and the client's."""

    backend: str = "embedded"  # "embedded" (in-process or HTTP) or "sglang"
    embedded: EmbeddedEngineConfig = dataclasses.field(default_factory=EmbeddedEngineConfig)
    sglang: SGLangConfig = dataclasses.field(default_factory=SGLangConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    n_samples_per_prompt: int = 8  # group size
    max_new_tokens: int = 256  # response budget
    temperature: float = 1.0  # sampling temperature, >= 0 (also divides the trainer's logits; 0 = greedy)
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1] (1 = off)
    top_k: int = -1  # top-k sampling, >= 1 (-1 = off)
    # slime's --rollout-stop / --rollout-stop-token-ids. A response ends at the token that completes
    # a stop string, finish reason "stop", and every token it sampled stays in the trained response
    # (SGLang's output_ids). Matching text needs the checkpoint's tokenizer: a run whose engine
    # checkpoint has none refuses rollout.stop at start.
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings (at most 32); need a tokenizer
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # stop token ids besides EOS

    def __post_init__(self) -> None:
        if self.backend not in ("embedded", "sglang"):
            raise ValueError(f"rollout.backend ({self.backend!r}) must be 'embedded' or 'sglang'")
        self._check_stops()
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"rollout.n_samples_per_prompt ({self.n_samples_per_prompt}) must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens ({self.max_new_tokens}) must be >= 1")
        check_sampling("rollout", self.temperature, self.top_p, self.top_k)
        if self.sglang.api_key and self.client.api_key and self.sglang.api_key != self.client.api_key:
            raise ValueError("rollout.sglang.api_key and rollout.client.api_key differ; set one (the client "
                             "uses the key of the servers it launched)")
        if self.backend == "sglang" and self.sglang.api_key:
            self.client.api_key = self.sglang.api_key
        if self.client.router_url and self.client.return_routed_experts:
            raise ValueError(
                "rollout.client.router_url is set but client.return_routed_experts is true: "
                "sglang-router 0.3.2 drops return_routed_experts; use server_urls for routing replay")

    def _check_stops(self) -> None:
        check_stop_strings(self.stop, "rollout.stop")
        for i, t in enumerate(self.stop_token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"rollout.stop_token_ids[{i}] ({t!r}) must be a non-negative integer token id")
