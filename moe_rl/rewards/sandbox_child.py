"""The child side of ``sandbox.py``: limits itself, runs the program, then the tests, and proves it.

Run as ``python -I sandbox_child.py LIMITS_JSON USER_FILE CHANNEL_FD PROOF_FD`` in a fresh
temporary directory. Not imported by the parent; kept free of moe_rl imports so it starts fast.

Order matters: read the parent's message, resource limits (inherited by anything the code
forks), compile, the audit hook (it cannot be removed once added), then the user's code. When
this process is PID 1 of a new PID namespace it forks once and stays as a reaper: the kernel
ignores default-action signals such as SIGXCPU sent to a namespace's init, so the code must not
run as PID 1, and when PID 1 exits the kernel kills everything left inside.

Proof of completion. The parent writes ``{"token", "test_code", "guard_values"}`` as JSON into
the pipe CHANNEL_FD and closes it; this process reads it to EOF and closes its end before any
user code runs, so the pipe is empty from then on. The program runs in a thread of its own,
then the test code in another (``exec`` of the compiled tests in a copy of the program's
globals; never appended source). The main thread holds the token, runs no user code and
allocates nothing while they run; it writes the token to PROOF_FD only when the program ended
normally (returned, or without tests ``SystemExit(0)``) and the tests ran to their end. So
``sys.exit``/``SystemExit``/``os._exit`` in a program under test, an exception, a crash, a limit,
an ``atexit`` hook (never run: the harness leaves with ``os._exit``) or a fake token all fail,
whatever the exit status. The main thread's frame is not on any user stack; the other ways to
it (``sys._current_frames``, ``gc.get_objects/referrers/referents``, ``/proc/*/mem``, ctypes,
``sys.settrace``, replacing a function's ``__code__`` or an object's ``__class__``, building
functions or code objects) are refused by the audit hook. The tests see the real builtins (a
snapshot taken before the program ran; names the program binds that shadow a builtin are
dropped from the tests' globals) and private copies, made before the program ran, of the
standard-library modules they import. While the tests run, frames are out of reach too
(``sys._getframe``, ``tb_frame``, ``gi_frame``... raise ``ValueError``), so a function under
test cannot read its caller's expected values.

Values the tests check (``guard_values``, on by default). The operands of every comparison,
the operands of every binary operator and every call argument in the test code pass through a
check that rejects an object (searched through lists, tuples, dicts, sets, deques, numpy object
arrays, instance attributes and slots) whose type gets the methods that receive the other
operand there (``__eq__``, ``__lt__``, ``__contains__``... at a comparison; ``__add__``,
``__rsub__``... at an operator; ``__eq__``, ``__ne__`` and those at a call, which may compare
or combine them, like unittest's ``assertEqual``) from the program: Python code compiled from
the program's file, the sandbox directory, ``exec`` or ``compile`` while it ran; or a program
class that subclasses a library class whose comparisons are Python code. That stops "an object
equal to everything" (alone or inside a list), ``int`` subclasses with a lying ``__eq__``, and
``__sub__`` returning 0 under ``abs(f(x) - y) < eps``. Call results and truth tests are not
checked, so program classes with ``__lt__`` for heapq or ``__bool__`` pass. The check is
referenced from the test code's constants, not by name, so rebinding names cannot skip it.
A rejection is status "rejected" (``EXIT_REJECTED``). Turn it off for tests that compare
objects of classes the program is asked to write (``Vector(1, 2) + Vector(3, 4) == ...``).

Limits, stated plainly: this is one interpreter, not a boundary between the program and the
tests. Not caught: code objects forged by hand-editing marshalled bytes; library code the
tests import that is not in the standard library (numpy, ...), which the program may patch;
test code that hands its own functions to the program (their ``__globals__`` expose the tests'
namespace); more than a million values inside one checked object (the rest is not searched).
With ``allow_subprocess`` a child process may read this process's memory where the kernel's
ptrace policy allows it (root, or ptrace_scope 0), and with it the token. Differences from
appending the tests to the program: the program runs on a non-main thread (``signal.signal``
raises ``ValueError``); the tests run in a copy of the program's globals, so a name the tests
bind is not seen by the program's functions (patch ``builtins`` or ``sys.stdin`` instead);
``SystemExit``, even ``unittest.main()``'s, in the tests is a failure.
"""

import _thread
import ast
import builtins
import gc
import json
import os
import resource
import signal
import sys
import traceback
import types
import warnings

EXIT_MEMORY = 85
EXIT_NETWORK = 86
EXIT_SUBPROCESS = 87
EXIT_PROCESS_LIMIT = 88
EXIT_REJECTED = 89

TESTS_FILENAME = "<tests>"  # co_filename of the test code
CHECK_BUDGET = 1_000_000  # values searched per checked object

_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
_PROC_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn"}
# Ways to reach the harness's memory or rewrite code that the harness or the tests run.
_HARNESS_EVENTS = {"sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                   "sys.settrace", "sys.setprofile", "function.__new__", "code.__new__", "os.symlink"}
# ctypes reads and writes any memory; refused as an ImportError, which libraries that import
# it optionally (numpy) already handle.
_CTYPES_EVENTS = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.addressof", "ctypes.string_at",
                  "ctypes.wstring_at", "ctypes.cdata", "ctypes.create_string_buffer"}
_FRAME_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
_ARITH = ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod", "pow", "lshift",
          "rshift", "and", "xor", "or")
_EQ = ("__eq__", "__ne__")
_ORDER = ("__lt__", "__le__", "__gt__", "__ge__")
_ARITH_METHODS = tuple(f"__{p}{n}__" for n in _ARITH for p in ("", "r", "i"))
# Per kind of place in the test code, the methods that receive the other operand there (the
# expected value): comparison operands, operator operands, call arguments (the callee may
# compare or combine them: unittest's assertEqual, assertAlmostEqual).
CHECK_COMPARE, CHECK_OPERATOR, CHECK_ARGUMENT = 0, 1, 2
GUARDED = {CHECK_COMPARE: _EQ + _ORDER + ("__contains__",), CHECK_OPERATOR: _ARITH_METHODS,
           CHECK_ARGUMENT: _EQ + _ARITH_METHODS}
_PLACEHOLDER = "__moe_rl_check_placeholder__"

PHASE_HARNESS, PHASE_PROGRAM, PHASE_TESTS = 0, 1, 2


class SandboxViolation(PermissionError):
    def __init__(self, kind, event):
        super().__init__(f"sandbox: {kind} is disabled ({event})")
        self.kind = kind


class CtypesDenied(ImportError):
    """ctypes is refused (see ``_CTYPES_EVENTS``)."""


class FrameAccessDenied(ValueError):
    """Frames are out of reach while the tests run (ValueError: libraries that look up their
    caller, such as namedtuple and logging, already fall back on it)."""


class Rejected(BaseException):
    """A checked value comes from a type whose comparisons the program defined (BaseException:
    a test's ``except Exception`` does not swallow it)."""


def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        if hard == resource.RLIM_INFINITY or value <= hard:
            resource.setrlimit(which, (value, hard))


def _read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _make_hook(allow_proc, state, forged):
    """The audit hook. Every name it uses is bound here: the program can reach and rebind this
    module's globals (through its frames' ``f_globals``), not these closure cells."""
    net, proc, harness, frame_attrs = frozenset(_NET_EVENTS), frozenset(_PROC_EVENTS), frozenset(_HARNESS_EVENTS), \
        frozenset(_FRAME_ATTRS)
    foreign = frozenset(_CTYPES_EVENTS)
    Violation, Denied, NoCtypes, _type, _str, _bytes = SandboxViolation, FrameAccessDenied, CtypesDenied, type, str, bytes
    harness_phase, tests_phase = PHASE_HARNESS, PHASE_TESTS

    def hook(event, args):
        phase = state[0]
        if phase == harness_phase:
            return
        if event in net:
            raise Violation("network access", event)
        if event in proc and not allow_proc:
            raise Violation("starting processes", event)
        if event in harness:
            raise Violation("access to the harness", event)
        if event in foreign:
            raise NoCtypes(f"sandbox: ctypes is disabled ({event})")
        if event == "compile":  # code compiled now may claim any file name: distrust that name
            name = args[1]
            if _type(name) is _bytes:
                name = name.decode("utf-8", "surrogateescape")
            forged.add(name if _type(name) is _str else "\0unknown")
        elif event == "object.__setattr__":
            if args[1] == "__code__" or args[1] == "__class__":
                raise Violation("access to the harness", f"setting {args[1]}")
        elif event == "open":
            path = args[0]
            if _type(path) is _bytes:
                path = path.decode("utf-8", "surrogateescape")
            if _type(path) is _str and path.rstrip("/").rsplit("/", 1)[-1] == "mem":  # /proc/*/mem, via any route
                raise Violation("access to the harness", f"open {path}")
        elif phase == tests_phase:
            if event == "sys._getframe" or event == "sys._getframemodulename" or (
                    event == "object.__getattr__" and args[1] in frame_attrs):
                raise Denied(f"sandbox: frames are out of reach while the tests run ({event})")

    return hook


def _make_check(workdir, forged, rejected):
    """``check(value, kind) -> value``, raising ``Rejected`` when ``value`` holds an object whose
    ``GUARDED[kind]`` methods the program defined (see the module docstring). Builtins are bound
    here: the program may rebind names anywhere else."""
    _type, _id, _set, _dict, _Base, _AttributeError = type, id, set, dict, BaseException, AttributeError
    _list, _tuple, _frozenset, _property = list, tuple, frozenset, property
    mro_of = type.__dict__["__mro__"].__get__
    dict_of = type.__dict__["__dict__"].__get__
    flags_of = type.__dict__["__flags__"].__get__
    qualname_of = type.__dict__["__qualname__"].__get__
    module_of = type.__dict__["__module__"].__get__
    heap_flag = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type()
    atomic = frozenset(id(t) for t in (int, float, complex, str, bytes, bool, type(None)))  # ids: no user hash
    c_callables = (types.WrapperDescriptorType, types.MethodDescriptorType, types.BuiltinFunctionType,
                   types.MethodWrapperType, types.ClassMethodDescriptorType)
    Function, Member, Module = types.FunctionType, types.MemberDescriptorType, types.ModuleType
    wrappers = (property, staticmethod, classmethod)
    Namespace = types.SimpleNamespace
    guarded, budget, tests_file = dict(GUARDED), CHECK_BUDGET, TESTS_FILENAME
    list_iter, tuple_iter, set_iter, frozenset_iter = list.__iter__, tuple.__iter__, set.__iter__, frozenset.__iter__
    dict_keys, dict_values = dict.keys, dict.values
    import collections
    deque, deque_iter = collections.deque, collections.deque.__iter__
    prefix = workdir.rstrip("/") + "/"
    Reject, missing = Rejected, object()
    getattr_ = object.__getattribute__

    def is_one_of(t, options):
        for o in options:
            if t is o:
                return True
        return False

    def subclass_of(mro, cls):
        for c in mro:
            if c is cls:
                return True
        return False

    def trusted_code(fn):
        code = fn.__code__
        name = code.co_filename
        if name in forged or "\0unknown" in forged:
            return False
        if name == tests_file or name.startswith("<frozen "):
            return True
        return name.startswith("/") and not name.startswith(prefix)

    def trusted_method(name, value):
        if value is None:
            return True
        t = _type(value)
        if is_one_of(t, c_callables):
            return value.__name__ == name
        # __name__ too: the standard library makes some operators with a factory (fractions' forward).
        return t is Function and (value.__code__.co_name == name or value.__name__ == name) and trusted_code(value)

    def program_defined(d):
        for v in d.values():  # d: a class's mappingproxy
            t = _type(v)
            if t is Function:
                if not trusted_code(v):
                    return True
            elif is_one_of(t, wrappers):
                for f in ((v.fget, v.fset, v.fdel) if t is _property else (v.__func__,)):
                    if _type(f) is Function and not trusted_code(f):
                        return True
        return False

    def verdict(t, names):
        """None when instances of ``t`` use ``names`` honestly, else what the program defined."""
        mro = mro_of(t)
        python_level, program_class = False, None
        for cls in mro:
            d = dict_of(cls)
            for name in names:
                v = d.get(name, missing)
                if v is missing:
                    continue
                if not trusted_method(name, v):
                    return f"{module_of(cls)}.{qualname_of(cls)}.{name} is defined by the program"
                python_level = python_level or _type(v) is Function
            if program_class is None and flags_of(cls) & heap_flag and program_defined(d):
                program_class = cls
        if python_level and program_class is not None:
            return (f"{module_of(program_class)}.{qualname_of(program_class)} (program code) overrides a class "
                    f"whose comparisons are Python code")
        return None

    def children(v, t, mro, stack):
        if t is _list or t is _tuple or t is _set or t is _frozenset:  # exact: nothing but items
            stack.extend(v)
            return
        if t is _dict:
            stack.extend(dict_keys(v))
            stack.extend(dict_values(v))
            return
        if subclass_of(mro, _list):
            stack.extend(list_iter(v))
        elif subclass_of(mro, _tuple):
            stack.extend(tuple_iter(v))
        elif subclass_of(mro, _dict):
            stack.extend(dict_keys(v))
            stack.extend(dict_values(v))
        elif subclass_of(mro, _set):
            stack.extend(set_iter(v))
        elif subclass_of(mro, _frozenset):
            stack.extend(frozenset_iter(v))
        elif subclass_of(mro, deque):
            stack.extend(deque_iter(v))
        if subclass_of(mro, _type) or subclass_of(mro, Module):
            return  # classes and modules are checked themselves, not searched
        for cls in mro:
            d = dict_of(cls)
            if not flags_of(cls) & heap_flag:  # C types: only numpy's object arrays hold values
                if qualname_of(cls) == "ndarray" and module_of(cls) == "numpy" and d["dtype"].__get__(v).hasobject:
                    stack.append(d["tolist"](v))
                continue
            for desc in d.values():
                if _type(desc) is Member:  # __slots__ of a Python class
                    try:
                        stack.append(desc.__get__(v, cls))
                    except _AttributeError:
                        pass
        if flags_of(t) & heap_flag or t is Namespace:
            try:
                state = getattr_(v, "__dict__")
            except _AttributeError:
                return
            if _type(state) is _dict:
                stack.extend(dict_values(state))

    def find(value, names):
        stack, seen, alive, verdicts, n = [value], _set(), [], {}, 0
        pop = stack.pop
        while stack:
            v = pop()
            t = _type(v)
            if _id(t) in atomic:
                continue
            n += 1
            if n > budget:
                return None
            if _id(v) in seen:
                continue
            seen.add(_id(v))
            alive.append(v)  # ids stay unique while the search runs
            r = verdicts.get(_id(t), missing)
            if r is missing:
                r = verdicts[_id(t)] = verdict(t, names)
            if r is not None:
                return r
            children(v, t, mro_of(t), stack)
        return None

    def check(value, kind):
        try:
            reason = find(value, guarded[kind])
        except Reject:
            raise
        except _Base as e:  # noqa: BLE001 - a value that cannot be searched is not trusted
            reason = f"the value could not be checked ({_type(e).__name__})"
        if reason is not None:
            if rejected[0] is None:
                rejected[0] = reason
            raise Reject(f"sandbox: rejected a value the tests check: {reason}")
        return value

    return check


class _Instrument(ast.NodeTransformer):
    """Route the operands of comparisons and operators, and call arguments, through ``check``."""

    def _w(self, node, kind):
        if isinstance(node, (ast.Constant, ast.Lambda)):
            return node
        call = ast.Call(func=ast.Constant(_PLACEHOLDER), args=[node, ast.Constant(kind)], keywords=[])
        return ast.copy_location(call, node)

    def visit_Compare(self, node):
        self.generic_visit(node)
        node.left = self._w(node.left, CHECK_COMPARE)
        node.comparators = [self._w(c, CHECK_COMPARE) for c in node.comparators]
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        node.left, node.right = self._w(node.left, CHECK_OPERATOR), self._w(node.right, CHECK_OPERATOR)
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        node.value = self._w(node.value, CHECK_OPERATOR)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        node.args = [ast.Starred(self._w(a.value, CHECK_ARGUMENT), a.ctx) if isinstance(a, ast.Starred)
                     else self._w(a, CHECK_ARGUMENT) for a in node.args]
        for k in node.keywords:
            k.value = self._w(k.value, CHECK_ARGUMENT)
        return node


def _embed(code, check):
    """Replace the placeholder constant by ``check`` in ``code`` and every nested code object."""
    consts = tuple(check if c == _PLACEHOLDER and type(c) is str else
                   _embed(c, check) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_consts=consts)


def _compile_tests(source, check):
    tree = ast.parse(source, TESTS_FILENAME)
    if check is not None:
        tree = ast.fix_missing_locations(_Instrument().visit(tree))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'str' object is not callable": the placeholder
        code = compile(tree, TESTS_FILENAME, "exec", dont_inherit=True, optimize=0)
    return _embed(code, check) if check is not None else code


def _private_modules(tree, workdir):
    """Copies, made before the program runs, of the standard-library modules the tests import.

    ``{name: module}``: a new module object per name whose namespace is a copy of the real
    one's, so the tests get them as they were even if the program (or a thread it left
    running) patches the real modules. Library functions keep their own globals."""
    import importlib
    import importlib.util

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    real = {}
    for name in sorted(names):
        if name.partition(".")[0] not in sys.stdlib_module_names or name.partition(".")[0] in ("sys", "builtins"):
            continue
        try:
            spec = importlib.util.find_spec(name)
            if spec is None or (spec.origin or "").startswith(workdir):
                continue
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the tests will raise it themselves
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            mod = sys.modules.get(".".join(parts[:k]))
            if isinstance(mod, types.ModuleType):
                real[".".join(parts[:k])] = mod
    private = {}
    for name, mod in real.items():
        copy = types.ModuleType(name)
        copy.__dict__.update(mod.__dict__)
        private[name] = copy
    for name, copy in private.items():  # a package's copy refers to its submodules' copies
        parent, _, child = name.rpartition(".")
        if parent in private:
            private[parent].__dict__[child] = copy
    return private


def _make_import(private, real_import):
    """``__import__`` for the tests: the private copies first, the real import system after."""

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in private:
            return private[name] if fromlist else private[name.partition(".")[0]]
        return real_import(name, globals, locals, fromlist, level)

    return import_


def _make_report(stderr_fd):
    write, _type, _str, _Base = os.write, type, str, BaseException

    def report(e, where, tb=True):
        """One message on fd 2; with ``tb`` the traceback (only while frames may be read)."""
        try:
            text = "".join(traceback.format_exception(e)) if tb else f"{_type(e).__name__}: {e}\n"
        except _Base:  # noqa: BLE001 - the program's __str__ may raise
            text = f"{_type(e).__name__} (unprintable)\n"
        try:
            if _type(text) is not _str:
                text = "(unprintable)\n"
            write(stderr_fd, f"sandbox: {where}: {text}".encode("utf-8", "replace"))
        except _Base:  # noqa: BLE001 - fd 2 may be closed by the program
            pass

    return report


def _tests_line(e):
    """Line of the test code's top level that raised ``e`` (frames are out of reach by then)."""
    tb = e.__traceback__
    return tb.tb_next.tb_lineno if tb is not None and tb.tb_next is not None else "?"


def _exit_code(e, report, where, tb):
    """The process exit code for an exception that ended the program or the tests."""
    if isinstance(e, SandboxViolation):
        report(e, where, tb=False)
        return {"network access": EXIT_NETWORK, "starting processes": EXIT_SUBPROCESS}.get(e.kind, 1)
    if isinstance(e, Rejected):
        report(e, where, tb=False)
        return EXIT_REJECTED
    report(e, where, tb=tb)
    if isinstance(e, MemoryError):
        return EXIT_MEMORY
    if isinstance(e, BlockingIOError):  # fork/clone hit RLIMIT_NPROC
        return EXIT_PROCESS_LIMIT
    return 1


def _flush(streams):
    for s in streams:
        try:
            s.flush()
        except BaseException:  # noqa: BLE001 - the program may have closed or replaced them
            pass


def _run_program(code, ns, box, ok, done, under_test, report, streams):
    """Thread body: the program. ``box = [ok | None, exit code]``."""
    try:
        exec(code, ns)
        box[1] = 0
        box[0] = ok
    except SystemExit as e:
        c = e.code
        if under_test:
            report(e, "the program exited before the tests ran", tb=False)
            box[1] = 1
        elif c is None or c == 0:
            box[1] = 0
            box[0] = ok
        elif isinstance(c, int):
            box[1] = c if 0 < c < 256 else 1
        else:
            report(e, "SystemExit", tb=False)
            box[1] = 1
    except BaseException as e:  # noqa: BLE001
        box[1] = _exit_code(e, report, "program", tb=True)
    finally:
        _flush(streams)
        done.release()


def _make_test_runner(tests, program_ns, test_builtins, report, streams, rejected):
    """Thread body for the tests, with everything bound before the program runs."""
    _dict, _exec, _Base, _System, _Rejected = dict, exec, BaseException, SystemExit, Rejected
    exit_code, flush, exit_rejected, line_of = _exit_code, _flush, EXIT_REJECTED, _tests_line

    def run(go, box, ok, done):
        go.acquire()
        try:
            ns = _dict(program_ns)
            for name in test_builtins:
                if name != "__name__":
                    ns.pop(name, None)
            ns["__builtins__"] = test_builtins
            _exec(tests, ns)
            if rejected[0] is None:
                box[1] = 0
                box[0] = ok
            else:  # the tests caught the rejection
                report(_Rejected(rejected[0]), "tests", tb=False)
                box[1] = exit_rejected
        except _System as e:
            report(e, f"tests (line {line_of(e)}) ended with SystemExit instead of running to the end", tb=False)
            box[1] = 1
        except _Base as e:  # noqa: BLE001
            box[1] = exit_code(e, report, f"tests (line {line_of(e)})", tb=False)
            if rejected[0] is not None:
                box[1] = exit_rejected
        finally:
            flush(streams)
            done.release()

    return run


def main():
    limits = json.loads(sys.argv[1])
    user_file, channel_fd, proof_fd = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if os.getpid() == 1:  # namespace init: become a reaper, run the code in a child
        child = os.fork()
        if child:
            os.close(channel_fd)
            os.close(proof_fd)
            while True:
                pid, status = os.wait()
                if pid == child:
                    if os.WIFSIGNALED(status):
                        os._exit(128 + os.WTERMSIG(status))
                    os._exit(os.WEXITSTATUS(status))
    message = json.loads(_read_all(channel_fd))
    os.close(channel_fd)
    token = message["token"].encode() + b"\n"
    test_source = message.get("test_code")
    workdir = os.getcwd()

    cpu = int(limits["cpu_time_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL at hard
    _limit(resource.RLIMIT_AS, int(limits["memory_mb"]) << 20)
    _limit(resource.RLIMIT_FSIZE, int(limits["max_output_bytes"]))
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
    soft_stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = soft_stack if 0 < soft_stack < (256 << 20) else 8 << 20
    _thread.stack_size(max(1 << 20, min(stack, (int(limits["memory_mb"]) << 20) // 8)))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # no Python-level handler runs on the main thread

    report = _make_report(2)
    with open(user_file) as f:
        source = f.read()
    try:
        program = compile(source, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        report(e, "program does not compile", tb=False)
        os._exit(1)

    state, forged, rejected = [PHASE_HARNESS], set(), [None]
    streams = (sys.stdout, sys.stderr)
    main_module = types.ModuleType("__main__")
    main_module.__file__ = "solution.py"
    ns = main_module.__dict__
    sys.modules["__main__"] = main_module  # the harness module is no longer reachable by name
    sys.argv = ["solution.py"]
    sys.path.insert(0, workdir)

    allocate, start = _thread.allocate_lock, _thread.start_new_thread
    prog_box, prog_ok, prog_done = [None, 1], object(), allocate()
    prog_done.acquire()
    test_box = tests_ok = test_go = test_done = None
    if test_source is not None:
        check = _make_check(workdir, forged, rejected) if message.get("guard_values", True) else None
        tests = _compile_tests(test_source, check)
        test_builtins = dict(builtins.__dict__)
        private = _private_modules(ast.parse(test_source, TESTS_FILENAME), workdir)
        test_builtins["__import__"] = _make_import(private, builtins.__import__)
        runner = _make_test_runner(tests, ns, test_builtins, report, streams, rejected)
        test_box, tests_ok, test_go, test_done = [None, 1], object(), allocate(), allocate()
        test_go.acquire()
        test_done.acquire()
        start(runner, (test_go, test_box, tests_ok, test_done))  # waits for test_go, out of the program's reach
    # Everything the main thread needs from here on is bound before the first line of user code.
    finish, run = _finish, _run_program
    finish_args = (prog_done, prog_box, prog_ok, test_go, test_done, test_box, tests_ok, state, PHASE_TESTS,
                   proof_fd, token, os.write, os._exit, gc.disable, type, int, BaseException)
    run_args = (program, ns, prog_box, prog_ok, prog_done, test_source is not None, report, streams)
    sys.addaudithook(_make_hook(bool(limits["allow_subprocess"]), state, forged))
    state[0] = PHASE_PROGRAM
    start(run, run_args)
    finish(*finish_args)


def _finish(prog_done, prog_box, prog_ok, test_go, test_done, test_box, tests_ok, state, tests_phase, proof_fd,
            token, write, exit_, gc_disable, type_, int_, Base):
    """The main thread while user code runs: every name is a parameter (the program can rebind
    this module's globals), nothing is allocated (a collection here could run the program's
    ``__del__`` on this stack) and no user object is touched; only ``is`` tests on the boxes."""
    prog_done.acquire()
    gc_disable()
    if prog_box[0] is not prog_ok:
        c = prog_box[1]
        exit_(c if type_(c) is int_ and 0 < c < 256 else 1)
        return
    if test_go is not None:
        state[0] = tests_phase
        test_go.release()
        test_done.acquire()
        if test_box[0] is not tests_ok:
            c = test_box[1]
            exit_(c if type_(c) is int_ and 0 < c < 256 else 1)
            return
    try:
        write(proof_fd, token)
    except Base:  # noqa: BLE001 - the program closed or replaced the proof fd
        exit_(1)
        return
    exit_(0)


if __name__ == "__main__":
    main()
