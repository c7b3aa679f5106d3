"""A real two-node Slurm cluster on this machine, for the sbatch template tests.

Debian's ``slurm-wlm`` and ``munge`` packages run a real controller (slurmctld) and compute
daemons (slurmd). Two nodes are emulated in one of two ways:

- ``netns`` (preferred): each node is a network namespace of its own, joined to the other by
  a veth pair, with its own address (n1 = 127.0.1.1, n2 = 127.0.1.2) and its own hostname
  (a UTS namespace). The loopback address of each namespace is shrunk to 127.0.0.1/32, so a
  job that says ``localhost`` where it means "the first node" fails here as it would on a
  real cluster.
- ``multi``: two slurmd processes on the host's network (Slurm's multiple-slurmd mode). Both
  nodes share one address, so a localhost mistake goes unnoticed; used only when namespaces
  cannot be created.

In both modes the daemons run in a private mount namespace whose /etc/hosts names n1 and n2
(the host's /etc/hosts is never touched), with their own munged (own socket and pid file),
config, state and logs under one temporary directory. Clients (sbatch, scontrol, scancel) run
"on the login node": inside n1's namespaces.

Needs root. What it cannot do it says: :class:`Unavailable` names the missing piece (root,
apt-get, namespaces), and the tests skip with that reason, or fail when
``MOE_RL_SLURM_REQUIRED=1`` (CI).

Details that matter (measured on Debian 12, Slurm 22.05):
- slurmd needs a cgroup filesystem at /sys/fs/cgroup even with proctrack/linuxproc, so the
  node namespaces are entered with ``nsenter --net`` (``ip netns exec`` remounts /sys).
- ``sbatch --wait`` polls at 2, 10, 42 ... s; :meth:`Cluster.wait` polls ``scontrol show
  job`` every 0.5 s instead and returns the job's state and exit code.
- Teardown is by PID (pid files), SIGKILL for survivors; never by process name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

NODES = ("n1", "n2")
ADDRS = {"n1": "127.0.1.1", "n2": "127.0.1.2"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
PACKAGES = ("slurm-wlm", "munge")


class Unavailable(RuntimeError):
    """This machine cannot run the local cluster (the message says why)."""


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str  # COMPLETED, FAILED, CANCELLED, ...
    exit_code: int  # the batch script's exit code, or 128 + signal
    ended_at: float  # time.monotonic() when the terminal state was first seen
    record: str  # the last `scontrol show job -o` line


def _run(cmd: Sequence[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ensure_installed(log) -> None:
    """slurm-wlm and munge from Debian's packages, unless already there."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if shutil.which("apt-get") is None:
        raise Unavailable("slurmctld/slurmd/munged are not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.monotonic()
    log("installing slurm-wlm and munge with apt-get")
    p = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], timeout=600, check=False,
             env=env)
    if p.returncode != 0:  # a fresh machine: no package lists yet
        _run(["apt-get", "update", "-q"], timeout=300, env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], timeout=600, env=env)
    log(f"installed in {time.monotonic() - t0:.1f} s")


class Cluster:
    """``up()``, then ``sbatch``/``wait``/``scancel``/``scontrol``; ``down()`` stops every
    daemon it started, by PID, and removes its namespaces."""

    def __init__(self, root: Optional[str] = None, mode: str = "auto", log=print) -> None:
        self.root = root or tempfile.mkdtemp(prefix="moe_rl_slurm_")
        self.mode = mode
        self.log = log
        tag = f"{os.getpid() % 100000}"
        self.netns = {"n1": f"mrl{tag}a", "n2": f"mrl{tag}b"}
        self.veth = {"n1": f"mrl{tag}a", "n2": f"mrl{tag}b"}
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_dir = os.path.join(self.root, "munge")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self.ctld_pid: Optional[int] = None
        self.made_netns: List[str] = []
        self.setup_s = 0.0

    # ------------------------------------------------------------------ bring up
    def up(self) -> "Cluster":
        if os.geteuid() != 0:
            raise Unavailable("needs root (it installs packages, starts slurmctld/slurmd/munged and creates "
                              "network namespaces)")
        for tool in ("nsenter", "unshare", "mount", "hostname"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is missing (util-linux)")
        if not os.path.isdir("/sys/fs/cgroup") or not os.listdir("/sys/fs/cgroup"):
            raise Unavailable("no cgroup filesystem at /sys/fs/cgroup (slurmd 22.05 requires one)")
        ensure_installed(self.log)
        t0 = time.monotonic()
        if self.mode in ("auto", "netns"):
            try:
                self._make_netns()
                self.mode = "netns"
            except (RuntimeError, OSError) as e:
                self._del_netns()
                if self.mode == "netns":
                    raise Unavailable(f"cannot create network namespaces: {e}") from None
                self.log(f"network namespaces unavailable ({e}); falling back to two slurmd on the host network")
                self.mode = "multi"
        for sub in ("state/ctld", "run", "log", "jobs"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)
        with open(os.path.join(self.root, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n")
            for n in NODES:
                f.write(f"{ADDRS[n] if self.mode == 'netns' else '127.0.0.1'} {n}\n")
            if self.mode != "netns":
                f.write(f"127.0.0.1 {socket.gethostname()}\n")
        self._start_munge()
        self._write_conf()
        try:
            self._start_nodes()
            self._wait_idle(30)
        except BaseException:
            self.down()
            raise
        self.setup_s = time.monotonic() - t0
        self.log(f"slurm cluster up in {self.setup_s:.1f} s ({self.mode} mode, {self.root})")
        return self

    def _make_netns(self) -> None:
        if shutil.which("ip") is None:
            raise RuntimeError("the ip command (iproute2) is missing")
        for n in NODES:
            _run(["ip", "netns", "add", self.netns[n]])
            self.made_netns.append(self.netns[n])
        a, b = NODES
        _run(["ip", "link", "add", self.veth[a], "netns", self.netns[a], "type", "veth", "peer", "name",
              self.veth[b], "netns", self.netns[b]])
        for n in NODES:
            ns = ["nsenter", f"--net=/run/netns/{self.netns[n]}"]
            dev = self.veth[n]
            for cmd in (["ip", "link", "set", "lo", "up"],
                        # 127.0.1.x must not be "local" in every namespace: only its own address is
                        ["ip", "addr", "del", "127.0.0.1/8", "dev", "lo"],
                        ["ip", "addr", "add", "127.0.0.1/32", "dev", "lo"],
                        ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"],
                        ["sysctl", "-q", "-w", f"net.ipv4.conf.{dev}.route_localnet=1"],
                        ["ip", "addr", "add", f"{ADDRS[n]}/24", "dev", dev],
                        ["ip", "link", "set", dev, "up"]):
                _run(ns + cmd)

    def _start_munge(self) -> None:
        os.makedirs(self.munge_dir, exist_ok=True)
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            if shutil.which("mungekey"):
                _run(["mungekey", "--create", f"--keyfile={key}"])
            else:
                with open(key, "wb") as f:
                    f.write(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            os.chmod(key, 0o600)
        shutil.chown(self.munge_dir, "munge", "munge")
        os.chmod(self.munge_dir, 0o755)
        pid_file = os.path.join(self.munge_dir, "munged.pid")
        _run(["runuser", "-u", "munge", "--", shutil.which("munged"), "--force",
              f"--socket={self.munge_socket}", f"--pid-file={pid_file}",
              f"--log-file={os.path.join(self.munge_dir, 'munged.log')}",
              f"--seed-file={os.path.join(self.munge_dir, 'munged.seed')}"])
        end = time.monotonic() + 10
        while _run(["munge", "-n", f"--socket={self.munge_socket}"], check=False,
                   stdin=subprocess.DEVNULL).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError(f"munged did not answer on {self.munge_socket}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        r = self.root
        ctld_port, d_port = _free_port(), _free_port()
        if self.mode == "netns":
            host_line = f"SlurmctldHost=n1({ADDRS['n1']})"
            nodes = [f"NodeName={n} NodeHostname={n} NodeAddr={ADDRS[n]} Port={d_port}" for n in NODES]
        else:
            host_line = f"SlurmctldHost={socket.gethostname()}(127.0.0.1)"  # the host's own name here
            nodes = [f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={_free_port()}"
                     for n in NODES]
        # CPUs are declared (config_overrides), not probed: several test jobs share the two nodes.
        nodes = [f"{line} CPUs=8 RealMemory=16000 State=UNKNOWN" for line in nodes]
        text = "\n".join([
            "ClusterName=moerltest", host_line, "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state/ctld", f"SlurmdSpoolDir={r}/state/d-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/jobcomp.txt", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            "KillWait=5", "MinJobAge=300", "SchedulerParameters=sched_interval=1",
            *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"
        with open(self.conf, "w") as f:
            f.write(text)

    def _node_script(self, node: str, ctld: bool, hostname: bool) -> str:
        r = self.root
        lines = ["set -e", f"mount --bind {r}/hosts /etc/hosts"]
        if hostname:
            lines.append(f"hostname {node}")
        if ctld:
            lines.append(f"slurmctld -f {self.conf}")
        for n in ([node] if self.mode == "netns" else list(NODES)):
            lines.append(f"slurmd -f {self.conf} -N {n}")
        return "\n".join(lines)

    def _start_nodes(self) -> None:
        env = {**os.environ, "SLURM_CONF": self.conf}
        if self.mode == "netns":
            for n in NODES:
                cmd = ["nsenter", f"--net=/run/netns/{self.netns[n]}", "unshare", "--mount", "--uts",
                       "--propagation", "private", "bash", "-c", self._node_script(n, n == "n1", True)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                                   stdin=subprocess.DEVNULL)
                if p.returncode != 0:
                    raise RuntimeError(f"starting node {n} failed: {p.stderr[-2000:]}")
        else:
            cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c",
                   self._node_script("n1", True, False)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                raise RuntimeError(f"starting the nodes failed: {p.stderr[-2000:]}")
        self.ctld_pid = self._read_pid("slurmctld.pid", 10)
        for n in NODES:
            self._read_pid(f"slurmd-{n}.pid", 10)

    def _read_pid(self, name: str, timeout: float) -> int:
        path = os.path.join(self.root, "run", name)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                return int(open(path).read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"{path} did not appear (see {self.root}/log)")

    def _wait_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        out = ""
        while time.monotonic() < end:
            p = self.client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
            out = p.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").rstrip("*") == "idle" for n in NODES):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nodes not idle after {timeout} s: {out!r} (logs in {self.root}/log)")

    # ------------------------------------------------------------------ clients
    def client(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client on the "login node" (n1's network, mount and UTS namespaces)."""
        full_env = {**os.environ, **(env or {}), "SLURM_CONF": self.conf}
        for k in [k for k in full_env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del full_env[k]  # a developer's own Slurm session must not leak in
        ns = ["nsenter", "-t", str(self.ctld_pid), "-m", "-u"] + (["-n"] if self.mode == "netns" else [])
        return _run(ns + list(cmd), env=full_env, check=check, timeout=timeout, stdin=subprocess.DEVNULL)

    def sbatch(self, script: str, args: Sequence[str] = (), *, env: Dict[str, str], sbatch_args: Sequence[str] = (),
               chdir: str) -> str:
        p = self.client(["sbatch", "--parsable", f"--chdir={chdir}", *sbatch_args, script, *args], env=env)
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        p = self.client(["scontrol", "show", "job", "-o", job_id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Poll every 0.5 s until the job is in a terminal state (not COMPLETING)."""
        end = time.monotonic() + timeout
        rec: Dict[str, str] = {}
        while time.monotonic() < end:
            rec = self.job(job_id)
            state = rec.get("JobState", "")
            if state in TERMINAL:
                code, sig = (int(x) for x in rec.get("ExitCode", "0:0").split(":"))
                return JobResult(job_id, state, code if not sig else 128 + sig, time.monotonic(),
                                 " ".join(f"{k}={v}" for k, v in rec.items()))
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {rec}")

    def scancel(self, job_id: str) -> None:
        self.client(["scancel", job_id])

    # ------------------------------------------------------------------ tear down
    def down(self) -> None:
        """Cancel the jobs still running, stop every daemon started here (by PID), end any
        process that still carries this cluster's SLURM_CONF (steps of cancelled jobs), then
        remove the namespaces."""
        if self.ctld_pid is not None and _pid_alive(self.ctld_pid):
            self.client(["scancel", "--user=root", "--full"], check=False)
            end = time.monotonic() + 20
            while time.monotonic() < end and self.client(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.2)
        run = os.path.join(self.root, "run")
        pids = []
        for name in sorted(os.listdir(run)) if os.path.isdir(run) else []:
            if name.endswith(".pid"):
                try:
                    pids.append(int(open(os.path.join(run, name)).read().strip()))
                except (OSError, ValueError):
                    pass
        self._stop(pids)
        self._stop(processes_with_env("SLURM_CONF", self.conf))
        munge_pid = os.path.join(self.munge_dir, "munged.pid")
        if os.path.exists(munge_pid):
            try:
                self._stop([int(open(munge_pid).read().strip())])
            except (OSError, ValueError):
                pass
        self._del_netns()
        for ctrl in os.listdir("/sys/fs/cgroup") if os.path.isdir("/sys/fs/cgroup") else []:
            for n in NODES:
                d = os.path.join("/sys/fs/cgroup", ctrl, f"slurm_{n}")
                if os.path.isdir(d):
                    subprocess.run(["find", d, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"],
                                   capture_output=True)

    def _stop(self, pids: List[int]) -> None:
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 10
        while any(_pid_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.1)
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _del_netns(self) -> None:
        for ns in list(self.made_netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self.made_netns.remove(ns)


def processes_with_env(key: str, value: str) -> List[int]:
    """PIDs of the live processes (not this one) whose environment has ``key=value``."""
    want = f"{key}={value}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if want in f.read().split(b"\0") and _pid_alive(int(d)):
                    out.append(int(d))
        except OSError:
            continue
    return out


def job_processes(job_id: str, needle: str) -> List[int]:
    """PIDs of this machine's processes of Slurm job ``job_id`` whose command line contains
    ``needle`` (the node namespaces share the host's PID namespace)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and needle in cmd and _pid_alive(int(d)):
            out.append(int(d))
    return out


def env_of(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}
