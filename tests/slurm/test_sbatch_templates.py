"""The sbatch templates in slurm/ on a real two-node Slurm cluster (tests/slurm/cluster.py):
CPU, gloo, moe_rl's embedded engine behind the SGLang launch path in place of SGLang.

Every job is submitted at the start (the first test that asks for one), so they share the
two nodes; the faults are injected by a thread each, as soon as the job reaches the point
where the fault should hit:
- a training rank (rank 1, on n2) is SIGKILLed after the first step's metrics are written;
- a rollout server (on n2) is SIGKILLed after the first step's metrics are written;
- a job is scancelled after its step-1 checkpoint is complete, then the same command is
  submitted again and must resume from its newest complete checkpoint;
- a job's batch script gets SIGUSR1 (what ``--signal=B:USR1@N`` sends before the time limit)
  after the first step's metrics: the ranks save a checkpoint after their step, the job ends
  with exit code 5.
The bound stated in README "Running on a cluster": a rank's or a server's death ends the job
within FAIL_BOUND_S (detection is immediate through srun; the rest is STOP_GRACE_S for the
other steps and Slurm's KillWait).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cluster import env_of, job_processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "tests", "slurm", "rl_tiny.yaml")
FAIL_BOUND_S = 30.0  # from a rank's or server's death to the job's terminal state (STOP_GRACE_S=5, KillWait=5)
JOB_TIMEOUT_S = 600.0


class Job:
    def __init__(self, name: str, job_id: str, out_dir: str, log: str) -> None:
        self.name, self.id, self.out_dir, self.log = name, job_id, out_dir, log
        self.result = None
        self.fault: dict = {}
        self.done = threading.Event()  # set by a fault thread once its follow-up job is known

    def text(self) -> str:
        try:
            return open(self.log).read()
        except OSError:
            return ""


def _metrics(out_dir: str) -> list:
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _wait_for(pred, timeout: float, what: str, job=None, cluster=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if job is not None and cluster is not None and cluster.job(job.id).get("JobState") in ("FAILED", "COMPLETED",
                                                                                            "CANCELLED"):
            raise AssertionError(f"job {job.name} ended before {what}:\n{job.text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Suite:
    def __init__(self, cluster, work: str, model: str) -> None:
        self.cluster, self.work, self.model = cluster, work, model
        self.jobs: dict = {}
        self.errors: list = []

    def env(self, out_dir: str, **extra) -> dict:
        return {"CONFIG": CONFIG, "MODEL_PATH": self.model, "OUTPUT_DIR": out_dir, "PYTHON": sys.executable,
                "MOE_RL_DIR": REPO, "STOP_GRACE_S": "5", "HEALTH_DEADLINE_S": "180", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "MOE_RL_DIST_TIMEOUT_S": "180", **extra}

    def submit(self, name: str, script: str, *, out_dir: str = "", env: dict, args=(), nodes: int = 2,
               per_node: int = 1, sbatch_args=()) -> Job:
        out_dir = out_dir or os.path.join(self.work, name)
        log = os.path.join(self.work, f"{name}.log")
        job_id = self.cluster.sbatch(os.path.join(REPO, "slurm", script), args, env=env, chdir=REPO,
                                     sbatch_args=[f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
                                                  f"--output={log}", "--time=15", f"--job-name={name}",
                                                  *sbatch_args])
        job = Job(name, job_id, out_dir, log)
        self.jobs[name] = job
        return job

    def in_thread(self, fn, *a) -> None:
        def run():
            try:
                fn(*a)
            except BaseException as e:  # noqa: BLE001 - reported by the test that needs it
                self.errors.append(f"{fn.__name__}: {type(e).__name__}: {e}")

        threading.Thread(target=run, daemon=True).start()

    def result(self, name: str):
        job = self.jobs[name]
        if job.result is None:
            job.result = self.cluster.wait(job.id, JOB_TIMEOUT_S)
        return job.result


def _kill_after_first_step(suite: Suite, job: Job, needle: str, procid: str) -> None:
    """SIGKILL the job's process whose command line holds ``needle`` (and SLURM_PROCID), once
    the run has written its first step's metrics."""
    _wait_for(lambda: len(_metrics(job.out_dir)) >= 1, JOB_TIMEOUT_S, f"{job.name}'s first metrics", job,
              suite.cluster)
    pids = [p for p in job_processes(job.id, needle) if env_of(p).get("SLURM_PROCID") == procid]
    assert pids, f"no process of job {job.id} matching {needle!r} with SLURM_PROCID={procid}"
    node = env_of(pids[0]).get("SLURMD_NODENAME", "?")
    os.kill(pids[0], signal.SIGKILL)
    job.fault = {"killed_at": time.monotonic(), "node": node, "pid": pids[0]}
    job.fault["ended"] = suite.cluster.wait(job.id, JOB_TIMEOUT_S)  # polled from the kill on: ended_at is the end


def _cancel_then_resubmit(suite: Suite, job: Job, env: dict) -> None:
    try:
        ckpt = os.path.join(job.out_dir, "checkpoints", "step_00000001", "COMPLETE")
        _wait_for(lambda: os.path.exists(ckpt), JOB_TIMEOUT_S, "the step-1 checkpoint", job, suite.cluster)
        suite.cluster.scancel(job.id)
        job.fault = {"cancelled_at": time.monotonic()}
        job.result = suite.cluster.wait(job.id, 120)
        suite.submit("resume_2", "train_rollout.sbatch", out_dir=job.out_dir, env=env)
    finally:
        job.done.set()


def _usr1_after_first_step(suite: Suite, job: Job) -> None:
    _wait_for(lambda: len(_metrics(job.out_dir)) >= 1, JOB_TIMEOUT_S, f"{job.name}'s first metrics", job,
              suite.cluster)
    suite.cluster.client(["scancel", "--signal=USR1", "--batch", job.id])  # as Slurm's --signal=B:USR1@N
    job.fault = {"signalled_at": time.monotonic()}


def _convert_when_done(suite: Suite, job: Job) -> None:
    """The conversion job, submitted as soon as the run it converts has ended (a Slurm
    dependency would wait for the controller's next scheduling pass, up to a minute here)."""
    try:
        suite.result(job.name)
        suite.submit("convert", "convert.sbatch", nodes=1,
                     env={"INPUT": job.out_dir, "OUTPUT": os.path.join(suite.work, "converted_hf"), "TO": "hf",
                          "PYTHON": sys.executable, "MOE_RL_DIR": REPO, "OMP_NUM_THREADS": "1"})
    finally:
        job.done.set()


@pytest.fixture(scope="session")
def suite(cluster, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("slurm_jobs"))
    os.chmod(work, 0o755)
    # the tiny policy every job loads (MODEL_PATH): generated once, as moe_rl.launch would
    code = ("import sys; from moe_rl.config import load_config; from moe_rl.config.run import RunConfig; "
            "from moe_rl.launch import ensure_model, model_dir; "
            "cfg = load_config(RunConfig, sys.argv[1], ['output_dir=' + sys.argv[2]]); d = model_dir(cfg); "
            "ensure_model(cfg, d); print(d)")
    p = subprocess.run([sys.executable, "-c", code, CONFIG, os.path.join(work, "model")], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    s = Suite(cluster, work, p.stdout.strip().splitlines()[-1])

    a = s.submit("train_rollout", "train_rollout.sbatch", env=s.env(os.path.join(work, "train_rollout")))
    s.submit("colocated", "colocated.sbatch", env=s.env(os.path.join(work, "colocated")),
             args=["parallel.expert_parallel=2", "train.steps=2"])
    rank = s.submit("rank_dies", "colocated.sbatch", env=s.env(os.path.join(work, "rank_dies"), SERVERS_PER_NODE="0"),
                    args=["train.steps=40", "checkpoint.interval=0", "checkpoint.save_at_end=false"])
    server = s.submit("server_dies", "train_rollout.sbatch", env=s.env(os.path.join(work, "server_dies")),
                      args=["train.steps=40", "checkpoint.interval=0", "checkpoint.save_at_end=false"])
    usr1 = s.submit("usr1", "train_rollout.sbatch", env=s.env(os.path.join(work, "usr1")),
                    args=["train.steps=40", "checkpoint.interval=0", "checkpoint.save_at_end=false"])
    resume_env = s.env(os.path.join(work, "resume"))
    resume = s.submit("resume_1", "train_rollout.sbatch", out_dir=resume_env["OUTPUT_DIR"], env=resume_env)
    s.in_thread(_kill_after_first_step, s, rank, "moe_rl.launch", "1")
    s.in_thread(_kill_after_first_step, s, server, "moe_rl.rollout.embedded.server", "0")
    s.in_thread(_cancel_then_resubmit, s, resume, resume_env)
    s.in_thread(_usr1_after_first_step, s, usr1)
    s.in_thread(_convert_when_done, s, a)
    return s


def _assert_ok(suite: Suite, name: str):
    r = suite.result(name)
    job = suite.jobs[name]
    assert (r.state, r.exit_code) == ("COMPLETED", 0), f"{r.record}\n{job.text()[-6000:]}\n{suite.errors}"
    return job


def test_training_node_plus_rollout_node_completes_with_metrics(suite):
    job = _assert_ok(suite, "train_rollout")
    recs = _metrics(job.out_dir)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(0.0 <= r["rollout/reward_mean"] <= 1.0 for r in recs)
    log = job.text()
    # roles from the node list, the servers' URL by node name (never localhost)
    assert "training on n1 (1 ranks each), rollout servers on n2 (1 per node, 1 node(s) per server)" in log
    assert "http://n2:" in log and "localhost" not in log
    assert "no complete checkpoint" in log and "training finished" in log
    assert os.path.exists(os.path.join(job.out_dir, "logs", "rollout-n2-0.log"))


def test_colocated_on_two_nodes_completes_with_metrics(suite):
    job = _assert_ok(suite, "colocated")
    assert [r["step"] for r in _metrics(job.out_dir)] == [0, 1]
    log = job.text()
    assert "http://n1:" in log and "http://n2:" in log  # a server on every node, both used by the trainer
    for n in ("n1", "n2"):
        assert os.path.exists(os.path.join(job.out_dir, "logs", f"rollout-{n}-0.log"))


def _assert_failed_fast(suite: Suite, name: str):
    job = suite.jobs[name]
    suite.result(name)
    _wait_for(lambda: "ended" in job.fault or suite.errors, 60, f"{name}'s fault thread")
    assert "ended" in job.fault, f"the fault was never injected: {suite.errors}\n{job.text()[-4000:]}"
    r = job.fault["ended"]  # the fault thread's own wait, polling from the kill on
    took = r.ended_at - job.fault["killed_at"]
    print(f"\n[slurm] {name}: killed {job.fault} -> job {r.state} exit {r.exit_code} after {took:.1f} s",
          file=sys.stderr)
    with open(os.path.join(suite.work, "fail_fast.json"), "a") as f:
        f.write(json.dumps({"job": name, "seconds_to_end": took, "state": r.state, "exit": r.exit_code}) + "\n")
    assert r.state == "FAILED" and r.exit_code != 0, f"{r.record}\n{job.text()[-6000:]}"
    assert took <= FAIL_BOUND_S, f"the job took {took:.1f} s to end after the kill (bound {FAIL_BOUND_S} s)"
    return job, r


def test_a_dead_rank_fails_the_job_within_the_bound(suite):
    job, r = _assert_failed_fast(suite, "rank_dies")
    log = job.text()
    assert job.fault["node"] == "n2"
    assert "FAILED: training step ended with exit code" in log
    assert f"exited with {r.exit_code}" in log or f"exit code {r.exit_code}" in log
    assert "n2: task 1" in log  # srun names the node and the task that died


def test_a_dead_rollout_server_fails_the_job_within_the_bound(suite):
    job, r = _assert_failed_fast(suite, "server_dies")
    log = job.text()
    assert r.exit_code == 4, log[-4000:]
    # either the supervisor (the server step ended) or rank 0's watchdog (the server stopped answering)
    assert "rollout server(s) on n2" in log or "rollout server http://n2:" in log, log[-4000:]


def test_scancel_then_resubmit_resumes_with_the_uninterrupted_metrics(suite):
    first = suite.jobs["resume_1"]
    assert first.done.wait(JOB_TIMEOUT_S) and "resume_2" in suite.jobs, f"{suite.errors}\n{first.text()[-4000:]}"
    assert first.result.state == "CANCELLED", first.result.record
    job = _assert_ok(suite, "resume_2")
    assert "resuming from " + os.path.join(job.out_dir, "checkpoints", "step_0000000") in job.text()
    resumed = _metrics(job.out_dir)
    reference = _metrics(suite.jobs["train_rollout"].out_dir) or _metrics(_assert_ok(suite, "train_rollout").out_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [0, 1, 2, 3]
    for a, b in zip(resumed, reference):
        def compared(rec):  # every metric but wall-clock times and rates
            return {k for k in rec if not k.startswith("timing/") and not k.endswith("_s") and "per_s" not in k}

        keys = compared(a)
        assert keys == compared(b) and len(keys) > 10, sorted(keys ^ compared(b))
        for k in sorted(keys):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])


def test_sigusr1_to_the_batch_script_saves_a_checkpoint_and_ends_with_5(suite):
    job = suite.jobs["usr1"]
    r = suite.result("usr1")
    log = job.text()
    assert "signalled_at" in job.fault, f"{suite.errors}\n{log[-4000:]}"
    assert (r.state, r.exit_code) == ("FAILED", 5), f"{r.record}\n{log[-6000:]}"
    steps = [m["step"] for m in _metrics(job.out_dir)]
    assert steps == list(range(len(steps))) and 1 <= len(steps) < 40, steps
    saved = os.path.join(job.out_dir, "checkpoints", f"step_{len(steps):08d}")
    assert os.path.exists(os.path.join(saved, "COMPLETE")), log[-4000:]
    assert f"SIGUSR1: saved checkpoint {saved}" in log and "training saved a checkpoint on SIGUSR1" in log


def test_conversion_template_converts_the_run_checkpoint(suite):
    assert suite.jobs["train_rollout"].done.wait(JOB_TIMEOUT_S) and "convert" in suite.jobs, suite.errors
    job = _assert_ok(suite, "convert")
    out = os.path.join(suite.work, "converted_hf")
    from safetensors import safe_open

    def tensors(d):
        got = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as st:
                    got.update({k: st.get_tensor(k) for k in st.keys()})
        return got

    assert os.path.exists(os.path.join(out, "config.json")), job.text()[-4000:]
    new, old = tensors(out), tensors(suite.model)
    assert set(new) == set(old) and all(new[k].shape == old[k].shape for k in old)
    assert any(not (new[k] == old[k]).all() for k in old)  # the trained policy, not the initial one
    assert "checkpoints/step_00000004" in job.text()  # the newest complete checkpoint of the run


def test_too_few_nodes_is_a_clear_error_and_sbatch_wait_returns_the_exit_code(suite):
    """Through the real ``sbatch --wait`` (its first check is 2 s after submission): the
    template's exit code is what sbatch's caller gets."""
    log = os.path.join(suite.work, "one_node.log")
    p = suite.cluster.client(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=1", f"--output={log}",
                              f"--chdir={REPO}", os.path.join(REPO, "slurm", "train_rollout.sbatch")],
                             env=suite.env(os.path.join(suite.work, "x")), check=False, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)  # the template's "bad input" code
    assert "it needs TRAIN_NODES=1 training node(s) plus at least one rollout node" in open(log).read()
