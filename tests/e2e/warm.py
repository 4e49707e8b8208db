"""`python -m MODULE ARGS` for the end-to-end tests, in a process forked from a warm interpreter.

A `python -m rlkit` of the tiny model spends about 10 of its 12 seconds importing torch,
transformers and peft (2 CPU cores). The end-to-end tests start such a process some 100 times,
so each test process keeps warm interpreters that have imported those libraries once (and
nothing else: no rlkit module, no Python thread, no torch op) and fork them for each command. The
child is a process of its own, as `python -m` would start it: its own pid, environment,
working directory, `sys.argv`, `sys.path` (the working directory first, then PYTHONPATH's
entries, whose `sitecustomize` it runs), stdin, stdout and stderr; rlkit is imported fresh in
it; its exit status is the interpreter's (SystemExit's code, a message on stderr and 1, or a
traceback and 1), after its threads are joined and its atexit handlers run.

Two ways in:
- `run` (like `subprocess.run`) and `start` (like `Popen`: one at a time, signals go to the
  child's own pid), stdin from /dev/null, output to files;
- `python()`, an executable to put in place of sys.executable in `[python, "-m", ...]` commands
  that subprocess starts, or a launcher (`accelerate launch` with PYTHON_EXEC, which torchrun
  documents): a small script that has the rank server fork the process with the script's own
  fds, passes on the signals it gets and ends as the process did. Many at once; a SIGKILL to
  the script reaches the process a moment after.

What a fork cannot do is what only a new interpreter does: another PYTHONHASHSEED, environment
variables read when torch or transformers load (OMP_WAIT_POLICY, HF_HUB_OFFLINE: the tests set
theirs before this starts; OMP_NUM_THREADS is given by torch.set_num_threads, as a launcher sets
it for its processes). A command whose environment changes one of those (`FRESH_ONLY`) gets a
new interpreter, as does every command under RLKIT_TEST_FRESH=1. A child's parent is the warm
interpreter: what reads its parent's command line (rlkit's warning about `accelerate launch
--cpu`) and the process that holds a lock under another's pid start with subprocess directly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import threading

# What the warm interpreter imports: the libraries that every `python -m rlkit` loads.
PRELOAD = (
    "import torch, transformers, peft, hydra, omegaconf, safetensors\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "import matplotlib.pyplot\n"
    # peft's LoRA layers import bitsandbytes (installed: the quant extra), which imports torch's
    # compiler: 1.4 of the 2.5 s a tiny run takes once the rest is imported.
    "import peft.tuners.lora.bnb\n"
    # The architectures of rlkit's built-in models (transformers imports each on first use).
    "import transformers.models.qwen3.modeling_qwen3, transformers.models.llama.modeling_llama\n"
)
# Environment variables a forked child cannot change (read at interpreter start or library load;
# OMP_NUM_THREADS is, by torch.set_num_threads).
FRESH_ONLY = ("PYTHONHASHSEED", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE")


def _child(request: dict) -> int:
    """Run one request in this (forked) process, its output to the request's files; returns the
    exit status."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
    if request["stderr"] == request["stdout"]:  # one file, as with stderr=subprocess.STDOUT
        os.dup2(1, 2)
    else:
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    return _run(request)


def _run(request: dict) -> int:
    """`python -m` of the request in this (forked) process, on its fds 0, 1 and 2; returns the
    exit status."""
    import runpy
    import traceback

    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads != os.environ.get("OMP_NUM_THREADS") and threads and threads.isdigit():
        # Read by OpenMP as torch loads, which in this process it already did: what a new
        # interpreter would do with it (a launcher sets 1 for its processes).
        import torch

        torch.set_num_threads(int(threads))
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [request["cwd"], *extra]
    sys.argv = [request["module"], *request["args"]]
    code = 0
    try:
        if any(os.path.exists(os.path.join(p, "sitecustomize.py")) for p in extra):
            sys.modules.pop("sitecustomize", None)
            __import__("sitecustomize")
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with it
        traceback.print_exc()
        code = 1
    try:  # what the interpreter does before it exits
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    """The warm interpreter: one JSON request a line on stdin; it forks a child for each, writes
    `{"pid": N}` at once and `{"status": S}` (waitpid's) when the child ends."""
    exec(PRELOAD, {})
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        print(json.dumps({"pid": pid}), file=out, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), file=out, flush=True)


def _server(call: str, **popen) -> subprocess.Popen:
    """A new interpreter running `call` of this module (a server; it ends when its stdin, a
    pipe from this process, closes), in the repository with this process's sys.path; killed at
    this process's exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tests.e2e import warm; warm.{call}"],
        stdin=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        **popen,
    )
    atexit.register(proc.kill)
    return proc


class Warm:
    """One warm interpreter (per test process, started on first use); one child at a time."""

    def __init__(self) -> None:
        self.proc = _server("serve()", stdout=subprocess.PIPE, bufsize=0)
        self.lock = threading.Lock()

    def reply(self, timeout: float | None) -> dict | None:
        """The warm interpreter's next line, or None if none came within `timeout` seconds."""
        import select

        line = b""
        fd = self.proc.stdout.fileno()
        while not line.endswith(b"\n"):
            if not select.select([fd], [], [], timeout)[0]:
                if line:
                    continue  # a line begun is finished at once
                return None
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError("the warm interpreter died")
            line += chunk
        return json.loads(line)

    def start(self, module, args, cwd, env, stdout, stderr) -> Child:
        self.lock.acquire()
        try:
            request = {
                "module": module,
                "args": [str(a) for a in args],
                "cwd": str(cwd),
                "env": dict(env),
                "stdout": str(stdout),
                "stderr": str(stderr),
            }
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            return Child(self, self.reply(None)["pid"], request)
        except BaseException:
            self.lock.release()
            raise


class Child:
    """A command forked from the warm interpreter, as much of `subprocess.Popen` as the tests
    use: pid, poll, wait, send_signal, kill, returncode."""

    def __init__(self, warm: Warm, pid: int, request: dict) -> None:
        self.warm, self.pid, self.request = warm, pid, request
        self.args = [sys.executable, "-m", request["module"], *request["args"]]
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            reply = self.warm.reply(timeout)
            if reply is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            status = reply["status"]
            self.returncode = (
                -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            )
            self.warm.lock.release()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL, and reap it: the warm interpreter serves one child at a time."""
        import signal

        self.send_signal(signal.SIGKILL)
        self.wait()

    def output(self) -> tuple[str, str]:
        with open(self.request["stdout"]) as f, open(self.request["stderr"]) as g:
            return f.read(), g.read()


# `python()`'s script. `accelerate launch` (torch's elastic agent under it) runs each process as
# `PYTHON_EXEC -u -m MODULE ARGS` (PYTHON_EXEC: torchrun's documented override of
# sys.executable); tests run `[python(), "-m", MODULE, ...]`. The script has the rank server (a
# warm interpreter listening on a Unix socket) fork the process instead, with the script's own
# stdin, stdout and stderr, environment and working directory; it passes on the signals it gets
# and ends as the process did (its exit status, or killed by the same signal). The process is
# SIGKILLed if the script is killed first. What a fork cannot give (FRESH_ONLY) execs a new
# interpreter instead.
PROXY = """#!{python} -IS
import json, os, signal, socket, sys

SOCKET, PYTHON, FRESH = {socket!r}, {python!r}, {fresh!r}
args = sys.argv[1:]
if args[:1] == ["-u"]:
    args = args[1:]
if (
    args[:1] != ["-m"]
    or len(args) < 2
    or os.environ.get("RLKIT_TEST_FRESH")
    or any(os.environ.get(k) != v for k, v in FRESH.items())
):
    os.execv(PYTHON, [PYTHON, *sys.argv[1:]])
conn = socket.socket(socket.AF_UNIX)
conn.connect(SOCKET)
socket.send_fds(conn, [b"r"], [0, 1, 2])
request = {{"module": args[1], "args": args[2:], "cwd": os.getcwd(), "env": dict(os.environ)}}
conn.sendall(json.dumps(request).encode() + b"\\n")
replies = conn.makefile("rb")
pid = json.loads(replies.readline())["pid"]
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
    signal.signal(signum, lambda signum, _: os.kill(pid, signum))
status = json.loads(replies.readline())["status"]
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def serve_ranks(path: str) -> None:
    """The rank server: listens on the Unix socket `path`; for each connection (PROXY's), a
    handler process forks the requested process. Ends when its stdin closes."""
    import select
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    exec(PRELOAD, {})
    while True:
        ready = select.select([listener, sys.stdin], [], [], 1.0)[0]
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                os._exit(_handle(conn))
            conn.close()


def _handle(conn) -> int:
    """One launched process: PROXY's fds and request; forks it, replies its pid and, once it
    ends, its waitpid status; SIGKILLs it if the proxy goes first."""
    import select
    import signal
    import socket

    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    request = json.loads(conn.makefile("rb").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        os._exit(_run(request))
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    ended = os.pidfd_open(pid)
    while ended not in select.select([conn, ended], [], [])[0]:
        if not conn.recv(1):  # the proxy was killed: so is its process
            os.kill(pid, signal.SIGKILL)
            break
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
    return 0


class Ranks:
    """The rank server of this test process, and PROXY written beside its socket."""

    def __init__(self) -> None:
        import tempfile
        import time

        folder = tempfile.mkdtemp(prefix="rlkit-ranks-")
        socket_path = os.path.join(folder, "socket")
        self.proc = _server(f"serve_ranks({socket_path!r})")
        self.python = os.path.join(folder, "python")
        fresh = {k: os.environ.get(k) for k in FRESH_ONLY}
        with open(self.python, "w") as f:
            f.write(PROXY.format(python=sys.executable, socket=socket_path, fresh=fresh))
        os.chmod(self.python, 0o755)
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path):  # bound before the server imports anything
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the rank server did not start")
            time.sleep(0.05)


_ranks: Ranks | None = None


def python() -> str:
    """An executable to run `python -m MODULE ARGS` with, in place of sys.executable, in a
    command that subprocess or a launcher (PYTHON_EXEC) starts: the process is forked from a
    warm interpreter (RLKIT_TEST_FRESH=1: a new one), and the command started is PROXY."""
    global _ranks
    if _ranks is None or _ranks.proc.poll() is not None:
        _ranks = Ranks()
    return _ranks.python


_warm: Warm | None = None


def warm() -> Warm:
    global _warm
    if _warm is None or _warm.proc.poll() is not None:
        _warm = Warm()
    return _warm


def start(module: str, args, cwd, env, stdout, stderr) -> Child:
    """`python -m module *args` forked from the warm interpreter, running on while the caller
    goes on (like `subprocess.Popen`), its output to the files `stdout` and `stderr`. Wait for
    it (or kill and wait) before starting another."""
    return warm().start(module, args, cwd, env, stdout, stderr)


def fresh(env) -> bool:
    """Whether `env` changes what a forked child cannot (FRESH_ONLY): then only a new
    interpreter runs it as it would run (RLKIT_TEST_FRESH=1: always)."""
    return bool(os.environ.get("RLKIT_TEST_FRESH")) or any(
        env.get(k) != os.environ.get(k) for k in FRESH_ONLY
    )


def run(module: str, args, cwd, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module *args` in `cwd` with environment `env` (default: this process's),
    forked from the warm interpreter (a new one where `fresh(env)`), its output captured as
    text, like `subprocess.run(capture_output=True, timeout=timeout)`."""
    import tempfile

    env = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", module, *map(str, args)]
    if fresh(env):
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    with tempfile.TemporaryDirectory() as tmp:
        child = start(module, args, cwd, env, f"{tmp}/stdout", f"{tmp}/stderr")
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise subprocess.TimeoutExpired(command, timeout, *child.output()) from None
        return subprocess.CompletedProcess(command, child.returncode, *child.output())
