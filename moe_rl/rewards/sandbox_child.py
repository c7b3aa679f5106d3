"""The child side of ``sandbox.py``: limits itself, then runs the user's file.

Run as ``python -I sandbox_child.py LIMITS_JSON USER_FILE`` in a fresh temporary
directory. Not imported by the parent; kept free of moe_rl imports so it starts fast.

Order matters: resource limits first (they are inherited by anything the code forks),
then the audit hook (it cannot be removed once added), then the user's code. When this
process is PID 1 of a new PID namespace it forks once and stays as a reaper: the kernel
ignores default-action signals such as SIGXCPU sent to a namespace's init, so the code
must not run as PID 1, and when PID 1 exits the kernel kills everything left inside.
"""

import json
import os
import resource
import sys

EXIT_MEMORY = 85
EXIT_NETWORK = 86
EXIT_SUBPROCESS = 87
EXIT_PROCESS_LIMIT = 88

_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
_PROC_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn",
                "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function"}


class SandboxViolation(PermissionError):
    def __init__(self, kind, event):
        super().__init__(f"sandbox: {kind} is disabled ({event})")
        self.kind = kind


def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        if hard == resource.RLIM_INFINITY or value <= hard:
            resource.setrlimit(which, (value, hard))


def main():
    limits = json.loads(sys.argv[1])
    user_file = sys.argv[2]
    if os.getpid() == 1:  # namespace init: become a reaper, run the code in a child
        child = os.fork()
        if child:
            while True:
                pid, status = os.wait()
                if pid == child:
                    if os.WIFSIGNALED(status):
                        os._exit(128 + os.WTERMSIG(status))
                    os._exit(os.WEXITSTATUS(status))
    cpu = int(limits["cpu_time_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL at hard
    _limit(resource.RLIMIT_AS, int(limits["memory_mb"]) << 20)
    _limit(resource.RLIMIT_FSIZE, int(limits["max_output_bytes"]))
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
    allow_proc = bool(limits["allow_subprocess"])

    def hook(event, args):
        if event in _NET_EVENTS:
            raise SandboxViolation("network access", event)
        if not allow_proc and event in _PROC_EVENTS:
            raise SandboxViolation("starting processes", event)

    with open(user_file) as f:
        source = f.read()
    code = compile(source, "solution.py", "exec")
    sys.argv = ["solution.py"]
    sys.path.insert(0, os.getcwd())
    sys.addaudithook(hook)
    try:
        exec(code, {"__name__": "__main__", "__file__": "solution.py"})
    except SandboxViolation as e:
        _report(e)
        os._exit(EXIT_NETWORK if e.kind == "network access" else EXIT_SUBPROCESS)
    except MemoryError as e:
        _report(e)
        os._exit(EXIT_MEMORY)
    except BlockingIOError as e:  # fork/clone hit RLIMIT_NPROC
        _report(e)
        os._exit(EXIT_PROCESS_LIMIT)
    sys.stdout.flush()


def _report(e):
    try:
        sys.stdout.flush()
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        sys.stderr.flush()
    except BaseException:
        pass


if __name__ == "__main__":
    main()
