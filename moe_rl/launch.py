"""The torchrun entry of every run:

    torchrun --nproc-per-node N -m moe_rl.launch CONFIG.yaml [dotted.key=value ...]

Bad input stops before any work, with a message naming the field and the numbers (exit 2):
an unknown key or a wrong type, parallel degrees that do not divide the world or the model, a
missing dataset file, a rollout batch that the group size does not divide, an engine URL that
does not answer, a checkpoint directory of another model. Then every rank builds its parts
(:func:`build_parts`), resumes from the newest complete checkpoint under ``output_dir`` when
there is one, and runs :class:`moe_rl.loop.RLLoop`. Re-running the same command resumes.

Exit codes: 0 done, 2 bad input, 3 stopped by the loop (too many non-finite steps), 4 a rollout
server of ``rollout.client.server_urls`` died (``moe_rl.parallel.watchdog``), 5 a checkpoint was
saved on ``checkpoint.save_on_signal`` (SIGUSR1: a time limit or preemption ahead) and the run
stopped; the same command resumes (``moe_rl.parallel.stop_signal``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional


def main(argv: List[str]) -> int:
    from moe_rl.config import ConfigError, load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.parallel.launch_env import resolve_launch_env

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    path = argv[0] if "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    me = None
    try:
        me = resolve_launch_env(os.environ)  # torchrun's variables, or an srun task's (SLURM_PROCID ...)
        cfg = load_config(RunConfig, path, overrides)
        preflight(cfg, me.world_size)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if me is None or me.rank == 0:
            print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return run(cfg)


# --------------------------------------------------------------------------- before any work
def tiny_vocab(cfg) -> Optional[int]:
    """The vocabulary a generated tiny policy gets: the toy task's tokenizer size."""
    from moe_rl.data.tokenizer import char_vocab_size
    from moe_rl.data.toy_tasks import MAX_DIGIT_ALPHABET

    if cfg.model.hf_dir is not None:
        return None
    return char_vocab_size(MAX_DIGIT_ALPHABET) if (not cfg.data.path and cfg.data.toy_task == "max_digit") else 512


def model_dir(cfg) -> str:
    if cfg.model.hf_dir is not None:
        return cfg.model.hf_dir
    return os.path.join(cfg.output_dir, f"hf_tiny_{cfg.model.tiny_family}_v{tiny_vocab(cfg)}_s{cfg.train.seed}")


def hf_config_of(cfg):
    """The policy's HF config, without building anything (a tiny one from its recipe)."""
    import transformers

    from moe_rl.models.tiny import tiny_hf_config

    if cfg.model.hf_dir is None:
        return tiny_hf_config(cfg.model.tiny_family, vocab_size=tiny_vocab(cfg))
    if not os.path.isfile(os.path.join(cfg.model.hf_dir, "config.json")):
        raise ValueError(f"model.hf_dir: {cfg.model.hf_dir!r} has no config.json")
    hf = transformers.AutoConfig.from_pretrained(cfg.model.hf_dir)
    quant = getattr(hf, "quantization_config", None)
    if quant:
        method = (quant if isinstance(quant, dict) else quant.to_dict()).get("quant_method")
        raise ValueError(f"model.hf_dir: {cfg.model.hf_dir!r} is quantized (quantization_config.quant_method="
                         f"{method!r}); the trainer and the engines load 16/32-bit weights. An fp8 checkpoint "
                         "converts to its bf16 form with: python tools/convert_checkpoint.py --input "
                         f"{cfg.model.hf_dir} --output DIR --to hf")
    return hf


def preflight(cfg, world: int) -> None:
    """Every check that needs no process group and no model weights (ValueError on failure)."""
    from moe_rl.checkpoint import run_state as ckpt
    from moe_rl.config import to_yaml
    from moe_rl.data.dataset import _files_and_format
    from moe_rl.models import family_for
    from moe_rl.parallel import ParallelDims

    hf = hf_config_of(cfg)
    dims = ParallelDims.build(cfg.parallel, world, family_for(hf).shape(hf))
    if cfg.train.global_batch % dims.dp:
        raise ValueError(f"train.global_batch ({cfg.train.global_batch}) must be divisible by the data-parallel "
                         f"degree ({dims.dp} = {world} ranks / (tensor_parallel x pipeline_parallel))")
    if cfg.routing.replay != "none" and not family_for(hf).moe_layer_ids(hf):
        raise ValueError(f"routing.replay={cfg.routing.replay} needs a MoE model; {hf.model_type} has no MoE "
                         "layers (set routing.replay=none)")
    if cfg.data.path:
        _files_and_format(cfg.data)  # names the missing file
    tokenizer_dir(cfg, model_dir(cfg))
    for url in cfg.rollout.client.server_urls:
        check_engine_answers(url, cfg.rollout.client.health_timeout_s)
    if cfg.rollout.backend == "sglang":
        from moe_rl.rollout.http_rollout import check_sglang_installed, weight_sync_config

        weight_sync_config(cfg)  # engine ranks and transport vs the SGLang layout
        if not cfg.rollout.client.server_urls:
            check_sglang_installed(cfg.rollout.sglang.python)
    check_writable(cfg.output_dir)
    found = ckpt.scan(ckpt.checkpoint_root(cfg.output_dir))
    if found.newest and not cfg.checkpoint.resume:
        raise ValueError(f"checkpoint.resume=false, but output_dir {cfg.output_dir!r} holds checkpoints of an earlier "
                         f"run (newest: {found.newest[1]}): a new run there would overwrite its metrics, and keeping "
                         "the newest checkpoints would delete the new run's; use another output_dir")
    if found.newest:
        ckpt.check_identity(found.newest[1], ckpt.model_identity(hf))
        ckpt.resume_config_changes(found.newest[1], to_yaml(cfg), cfg.checkpoint.resume_changes)


def check_writable(output_dir: str) -> None:
    """ValueError naming ``output_dir`` (and its ``checkpoints``) when the run could not write
    there: it failed at its first write, after the model was built, with a raw traceback."""
    import tempfile

    from moe_rl.checkpoint import run_state as ckpt

    for d in (output_dir, ckpt.checkpoint_root(output_dir)):
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"output_dir: {d!r} exists and is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"output_dir: cannot write to {output_dir!r} ({type(e).__name__}: {e})") from None


def check_engine_answers(url: str, timeout_s: float) -> None:
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=min(timeout_s, 10.0))
    except httpx.HTTPError as e:
        raise ValueError(f"rollout.client.server_urls: {url} does not answer /health ({type(e).__name__}: {e})") from None
    if r.status_code != 200:
        raise ValueError(f"rollout.client.server_urls: {url}/health answered {r.status_code}: {r.text[:200]}")


# --------------------------------------------------------------------------- the run
def run(cfg) -> int:
    from moe_rl.parallel.stop_signal import EXIT_SAVED_ON_SIGNAL, SavedOnSignal, StopSignal

    stop = StopSignal(cfg.checkpoint.save_on_signal)  # first: a signal during the model build counts too
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (before the CPU substitutions: it inspects torch.cuda at import)

    from moe_rl.loop import report
    from moe_rl.parallel import groups as G
    from moe_rl.parallel import watchdog
    from moe_rl.parallel.cpu_platform import activate_cpu_mode
    from moe_rl.config import ConfigError
    from moe_rl.train.trainer import RunStopped

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        activate_cpu_mode()
    G.init_distributed()
    lock = [None, None]
    if dist.get_rank() == 0:
        lock = list(lock_output_dir(cfg.output_dir))
    said = [lock[1]]
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:  # another run writes there: every rank stops before any work
        report(f"config error: {said[0]}")
        dist.destroy_process_group()
        return 2
    watch = watchdog.start_for(cfg, dist.get_rank())  # a dead rollout server ends the run (exit 4)
    rc = 0
    try:
        run_loop(cfg, stop)
        if dist.get_rank() == 0:
            summarize(cfg)
    except SavedOnSignal as e:
        report(f"[moe_rl] {e}")
        rc = EXIT_SAVED_ON_SIGNAL
    except RunStopped as e:
        report(f"[moe_rl] stopped: {e}")
        rc = 3
    except ConfigError as e:  # found by every rank alike before any work (the prompts): no rank waits
        report(f"config error: {e}")
        rc = 2
    if watch is not None:
        watch.stop()
    G.teardown()
    dist.barrier()
    dist.destroy_process_group()
    if lock[0] is not None:
        os.close(lock[0])
    return rc


LOCK_FILE = ".moe_rl.lock"


def lock_output_dir(output_dir: str) -> tuple[int | None, str | None]:
    """``(fd, None)`` holding an exclusive lock on ``output_dir/.moe_rl.lock`` for this run (the
    kernel drops it when the process ends, however it ends), or ``(None, why)`` when another
    live run holds it: two runs writing one output_dir would interleave metrics and prune each
    other's checkpoints. A filesystem without locks (ENOLCK) runs unlocked, said on stderr."""
    import errno
    import fcntl
    import socket

    path = os.path.join(output_dir, LOCK_FILE)
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno == errno.ENOLCK:
            print(f"[moe_rl] warning: {output_dir} has no file locks; nothing stops a second run writing there",
                  file=sys.stderr, flush=True)
            return None, None
        return None, (f"output_dir {output_dir!r} is in use by another run ({holder}); wait for it to end, or use "
                      "another output_dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd, None


def run_loop(cfg, stop=None) -> list:
    """Build the parts, run the loop, close the parts (collective); this rank's records.
    ``stop``: the :class:`~moe_rl.parallel.stop_signal.StopSignal` the loop checks each step."""
    from moe_rl.loop import RLLoop

    parts = build_parts(cfg)
    try:
        return RLLoop(cfg, parts, stop).run()
    finally:
        parts.rollout.close()
        parts.scorer.evaluator.close()
        parts.writer.close()


def build_parts(cfg):
    """Every component of the loop on this rank (collective: every rank calls it)."""
    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.checkpoint import run_state as ckpt
    from moe_rl.config import ConfigError, to_yaml
    from moe_rl.loop import Parts, report
    from moe_rl.models import family_for
    from moe_rl.observability import MetricWriter
    from moe_rl.parallel import ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.rewards.evaluator import RewardEvaluator
    from moe_rl.rewards.scoring import Scorer
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.http_rollout import ServerRollout
    from moe_rl.rollout.in_process import InProcessRollout, check_stop_tokenizer, engine_tokenizer
    from moe_rl.train.model import build_model, build_reference, load_hf_weights
    from moe_rl.train.optimizer import wrap_for_training
    from moe_rl.train.trainer import Trainer, check_microbatching
    from moe_rl.weights.plan import checkpoint_shapes, plan_export

    rank, world = dist.get_rank(), dist.get_world_size()
    hf_dir = model_dir(cfg)
    if rank == 0:
        ensure_model(cfg, hf_dir)
    dist.barrier()
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    if cfg.rollout.backend == "embedded" and not cfg.rollout.client.server_urls:  # before minutes of model building
        check_stop_tokenizer(cfg, cfg.rollout.embedded.model_path or hf_dir)
    try:  # data errors before minutes of model building, as the config errors they are (exit 2)
        tokenizer, prompts = load_prompts_for(cfg, hf_dir, hf_config)
        evaluation = load_evaluation(cfg, tokenizer, hf_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dims = ParallelDims.build(cfg.parallel, world, family_for(hf_config).shape(hf_config))
    check_microbatching(cfg, dims)  # before the model is built
    groups = G.setup(dims, seed=cfg.train.seed)
    dtype = getattr(torch, cfg.model.params_dtype)
    built = build_model(hf_config, groups, params_dtype=dtype, moe_aux_loss_coeff=cfg.train.moe_aux_loss_coeff)
    load_hf_weights(built, hf_dir, groups)
    state = wrap_for_training(built.chunks, cfg.optim, groups)  # one DDP per virtual pipeline chunk
    state.train()
    reference = build_reference(hf_config, hf_dir, groups, params_dtype=dtype) if cfg.algorithm.needs_reference else None
    trainer = Trainer(cfg, built, state, groups, reference)

    plan = plan_export(hf_config, checkpoint_shapes(hf_dir), dims, bucket_bytes=cfg.weights.bucket_bytes)
    show = cfg.metrics.progress and rank == 0
    if cfg.loop.mode == "async" or cfg.rollout.client.server_urls or cfg.rollout.backend == "sglang":
        rollout = ServerRollout(cfg, hf_dir, plan, trainer, show_progress=show)
    else:
        engine_cfg = dataclasses.replace(cfg.rollout.embedded, model_path=cfg.rollout.embedded.model_path or hf_dir,
                                         weight_version="0")
        engine = EmbeddedEngine(engine_cfg, tokenizer=engine_tokenizer(cfg, engine_cfg.model_path))
        rollout = InProcessRollout(cfg, engine, plan, trainer, show_progress=show)
    evaluator = RewardEvaluator(dataclasses.replace(cfg.rewards, progress=cfg.rewards.progress and show))
    evaluator.start()

    start, skipped, kl_coef = 0, (0, 0), None
    root = ckpt.checkpoint_root(cfg.output_dir)
    found = ckpt.scan(root)
    for p in found.partial:
        report(f"[checkpoint] ignoring partial checkpoint {p} (an interrupted write)")
    if cfg.checkpoint.resume and found.newest:
        step, path = found.newest
        ckpt.check_identity(path, ckpt.model_identity(hf_config))
        for change in ckpt.resume_config_changes(path, to_yaml(cfg), cfg.checkpoint.resume_changes):
            report(f"[checkpoint] resuming with {change} (checkpoint.resume_changes)")
        saved = ckpt.load(path, train_state=state, built=built, groups=groups)
        prompts.load_state_dict(saved["sampler"])
        start, skipped, kl_coef = int(saved["step"]), tuple(saved["skipped"]), saved.get("kl_coef")
        rollout.sync_weights(int(saved["weight_version"]))
        report(f"[checkpoint] resumed from {path} (step {start}, optimizer step {state.step})")
    writer = MetricWriter(cfg.output_dir, cfg.metrics, enabled=rank == 0, start_step=state.step,
                          run_config=dataclasses.asdict(cfg))
    if rank == 0:
        _write_text(os.path.join(cfg.output_dir, "config.yaml"), to_yaml(cfg))
        report(f"[moe_rl] {hf_config.model_type} at {dims.describe()}, {cfg.loop.mode} mode, "
               f"{cfg.train.steps} steps of {cfg.loop.rollout_batch_size} responses; output {cfg.output_dir}")
    return Parts(prompts=prompts, rollout=rollout, scorer=Scorer(cfg, tokenizer, evaluator), trainer=trainer,
                 writer=writer, start_step=start, skipped=skipped, show_progress=show, hf_dir=hf_dir,
                 evaluation=evaluation, plan=plan, kl_coef=kl_coef)


def tokenizer_dir(cfg, hf_dir: str) -> str:
    """Where the run's tokenizer is (``data.tokenizer_path``, else the policy checkpoint);
    ValueError for a directory without one: transformers would load an empty tokenizer from
    it, and every prompt would be no tokens."""
    from moe_rl.rollout.embedded.tokenizer import TOKENIZER_FILES, has_tokenizer

    path = cfg.data.tokenizer_path or hf_dir
    if os.path.isdir(path) and not has_tokenizer(path):
        field = "data.tokenizer_path" if cfg.data.tokenizer_path else "model.hf_dir"
        raise ValueError(f"{field}: {path!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the model's "
                         "tokenizer there, or point data.tokenizer_path at it")
    return path


def load_prompts_for(cfg, hf_dir: str, hf_config):
    """The run's tokenizer and prompt stream; ValueError for a tokenizer directory without a
    tokenizer (:func:`tokenizer_dir`), for prompts that do not fit ``train.seq_len`` with their
    responses, and for a prompt that fills the engines' context (no room for a response)."""
    import transformers

    from moe_rl.data.prompts import PromptStream

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir(cfg, hf_dir))
    prompts = PromptStream(cfg.data, tokenizer)
    need = prompts.longest + cfg.rollout.max_new_tokens - 1
    if need > cfg.train.seq_len:
        raise ValueError(f"train.seq_len ({cfg.train.seq_len}) is shorter than the longest prompt ({prompts.longest} "
                         f"tokens) + rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) - 1 = {need}; raise it "
                         f"or set data.max_prompt_tokens")
    check_engine_context(cfg, hf_config, prompts.longest, "prompt")
    return tokenizer, prompts


def check_engine_context(cfg, hf_config, longest: int, what: str) -> None:
    """ValueError when the longest prompt (``what``: which ones) fills the engines' context."""
    context = (cfg.rollout.embedded.max_context_len if cfg.rollout.backend == "embedded" else 0) \
        or int(hf_config.max_position_embeddings)
    if longest >= context:
        raise ValueError(f"the longest {what} ({longest} tokens) leaves no room for a response in the engines' "
                         f"context of {context} tokens (rollout.embedded.max_context_len, else the model's "
                         "max_position_embeddings); set data.max_prompt_tokens to drop longer prompts")


def load_evaluation(cfg, tokenizer, hf_config):
    """The run's held-out evaluation (``moe_rl.evaluation``), or None when ``eval.interval`` is 0;
    ValueError for a bad ``eval.path`` or prompts that fill the engines' context."""
    from moe_rl.evaluation import Evaluation, load_eval_prompts

    if cfg.eval.interval == 0:
        return None
    prompts = load_eval_prompts(cfg, tokenizer)
    check_engine_context(cfg, hf_config, max(p.num_tokens for p in prompts), "eval prompt")
    return Evaluation(cfg, prompts)


def ensure_model(cfg, hf_dir: str) -> None:
    """A generated tiny policy, with its toy-task tokenizer, when no checkpoint is configured.

    It is initialised as an untrained model is (transformers' own init, weights ~ N(0, 0.02)),
    so its first answers are close to uniform guesses. (``moe_rl.models.tiny.save_tiny_hf``
    re-draws weights at a scale that makes MoE routing decisive, for parity tests; a policy
    that starts there collapses onto one answer within a few RL steps.) Written to a
    temporary sibling and renamed into place, so a crash never leaves a half model."""
    if cfg.model.hf_dir is not None:
        return
    from moe_rl.models.tiny import is_complete_hf_dir

    if is_complete_hf_dir(hf_dir) and os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        return
    import shutil

    import torch
    import transformers

    from moe_rl.data.tokenizer import build_char_tokenizer, build_tokenizer
    from moe_rl.data.toy_tasks import MAX_DIGIT_ALPHABET
    from moe_rl.models.tiny import tiny_hf_config

    vocab = tiny_vocab(cfg)
    torch.manual_seed(cfg.train.seed)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_hf_config(cfg.model.tiny_family, vocab_size=vocab), dtype=torch.float32)
    tok = build_char_tokenizer(MAX_DIGIT_ALPHABET) if vocab != 512 else build_tokenizer(vocab)
    tmp = f"{hf_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summarize(cfg) -> None:
    """The reward curve's start and end, and where the metrics are."""
    from moe_rl.observability.writer import read_metrics

    recs = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    by_version = {}
    for r in recs:
        by_version.setdefault(r["policy_version"], r["rollout/reward_mean"])
    curve = [by_version[k] for k in sorted(by_version)]
    if curve:
        k = min(5, len(curve))
        print(f"[moe_rl] reward: first {k} steps {sum(curve[:k]) / k:.3f}, last {k} steps "
              f"{sum(curve[-k:]) / k:.3f} (step 0: {curve[0]:.3f}, step {len(curve) - 1}: {curve[-1]:.3f})", flush=True)
        print("[moe_rl] reward curve: " + " ".join(f"{x:.2f}" for x in curve), flush=True)
    evals = read_metrics(os.path.join(cfg.output_dir, "eval.jsonl"))
    if evals:
        print("[moe_rl] held-out eval reward by policy version: "
              + " ".join(f"{r['policy_version']}: {r['eval/reward_mean']:.3f}" for r in evals)
              + f" ({os.path.join(cfg.output_dir, 'eval.jsonl')})", flush=True)
    print(f"[moe_rl] metrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')} (one JSON object per optimizer step)\n"
          f"[moe_rl] tensorboard: {os.path.join(cfg.output_dir, 'tb')} -> .venv/bin/tensorboard --logdir "
          f"{os.path.join(cfg.output_dir, 'tb')}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
