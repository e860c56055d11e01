"""A warm start for the torch stages: their ~4 s of imports paid once per machine, not per stage.

Every `python -m stages.<encode|train|sample>` is a fresh Python that imports torch,
diffusers, transformers, peft and dvclive before it does any work (measured: 4.0 s of
train's 5.6 s fixed cost), and a `dvc exp run` pays that twice. Here a server process
imports those libraries once and forks a child per stage run; the stage's own process
becomes a thin client that hands the child its argv, working folder, environment, umask and
terminal (stdin/stdout/stderr, passed as file descriptors over a Unix socket), forwards
Ctrl-C and other signals, and exits with the child's exit code. The server never imports
lorapipe itself: each child imports the stage's code fresh, from the client's sys.path, so
an edited file is always the one that runs.

The server is started by the first stage that wants it (the params stage starts it in the
background, so it is warm by the time train runs), keyed by the interpreter and the
preloaded libraries' versions (an upgraded venv gets a new one), and exits after IDLE_S
without work. A client whose server cannot be reached runs the stage itself, as before.
LORAPIPE_WARM=0 turns all of this off. No library does this for arbitrary entry points:
multiprocessing's forkserver serves only its own Process objects.

If the client dies (SIGKILL from DVC, a test or the OOM killer), the child sees its socket
close and kills itself and its process group: a stage never outlives its command.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
           "dvclive", "torch.utils.tensorboard", "diffusers.training_utils")
# the server exits after this long with no stage running or asked for (the tests set less)
IDLE_S = float(os.environ.get("LORAPIPE_WARM_IDLE_S", "300"))
START_WAIT_S = 60.0  # how long a client waits for a server that is starting
CHILD_ENV = "LORAPIPE_WARM_CHILD"  # set in a child: it runs the stage, never asks again


def enabled() -> bool:
    return os.environ.get("LORAPIPE_WARM", "1") != "0" and CHILD_ENV not in os.environ


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "dvclive"):
        try:
            out.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name}=-")
    return ",".join(out)


def _namespaces() -> str:
    """The mount and user namespaces this process sees (Linux): a client inside `unshare`
    or a container must not be served by a child that sees other files."""
    out = []
    for name in ("mnt", "user"):
        try:
            out.append(os.readlink(f"/proc/self/ns/{name}"))
        except OSError:
            out.append("-")
    return ",".join(out)


def socket_path() -> Path:
    """One server per user, interpreter, set of library versions and namespace."""
    key = hashlib.sha256(f"{sys.executable}|{_versions()}|{_namespaces()}".encode()
                         ).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"lorapipe-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{key}.sock"


# -- the client ---------------------------------------------------------------------------
def start_server(path: Path | None = None) -> None:
    """Start a server in the background if none answers at `path` (returns at once)."""
    path = path or socket_path()
    if _connect(path) is not None:
        return
    subprocess.Popen([sys.executable, "-m", "lorapipe.warm", str(path)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True,
                     env={**os.environ, "LORAPIPE_WARM": "0"})


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def run_warm(module: str) -> int | None:
    """Run `python -m <module>` (this process's argv) in a child of the warm server; its
    exit code, or None when no server could be reached (the caller then runs it itself)."""
    path = socket_path()
    conn = _connect(path)
    if conn is None:
        start_server(path)
        deadline = time.monotonic() + START_WAIT_S
        while conn is None and time.monotonic() < deadline:
            time.sleep(0.05)
            conn = _connect(path)
        if conn is None:
            return None
    umask = os.umask(0)
    os.umask(umask)
    request = {"module": module, "argv": sys.argv, "cwd": os.getcwd(),
               "env": {**os.environ, CHILD_ENV: "1"}, "path": sys.path, "umask": umask}
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError:
        return None
    # Ctrl-C and termination go to the child, which answers them as the stage would
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: _send(conn, f"signal {number}\n"))
    reply = b""
    while not reply.endswith(b"\n"):
        try:
            chunk = conn.recv(64)
        except InterruptedError:
            continue
        if not chunk:
            return 1  # the server died under the stage: a failure, not a silent success
        reply += chunk
    return int(reply.decode().split()[-1])


def _send(conn: socket.socket, text: str) -> None:
    try:
        conn.sendall(text.encode())
    except OSError:
        pass


# -- the server ---------------------------------------------------------------------------
def serve(path: Path) -> None:
    import fcntl

    # one server per socket: a second one started in the same moment leaves at once
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as lorapipe/__init__ sets for the stages
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    listener.listen(16)
    os.replace(tmp, path)
    children: dict[int, socket.socket] = {}
    last_work = time.monotonic()
    while children or time.monotonic() - last_work < IDLE_S:
        ready, _, _ = select.select([listener], [], [], 0.1)
        if ready:
            conn, _ = listener.accept()
            pid = _fork_child(conn, [listener, *children.values()])
            if pid:
                children[pid] = conn
            last_work = time.monotonic()
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                conn = children.pop(pid)
                _send(conn, f"exit {code if code >= 0 else 128 - code}\n")
                conn.close()
                last_work = time.monotonic()
    listener.close()
    if path.exists() and not _connect(path):
        path.unlink(missing_ok=True)


def _fork_child(conn: socket.socket, others: list[socket.socket]) -> int | None:
    """Receive one request and fork the child that runs it; the child's pid (None when
    the request was unreadable)."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                raise OSError("request cut short")
            data += more
        request = json.loads(data)
    except (OSError, ValueError):
        conn.close()
        return None
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    for other in others:  # the server's sockets are not the child's
        other.close()
    _run_child(conn, fds, request)  # never returns
    return None


def _run_child(conn: socket.socket, fds: list[int], request: dict) -> None:
    code = 1
    try:
        os.setsid()  # its own process group: killed whole when the client dies
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        sys.path[:] = request["path"]
        sys.argv[:] = request["argv"]
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        _watch(conn)
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # as the interpreter would: the traceback, exit status 1
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed terminal must not block the exit
                pass
        os._exit(code)


def _watch(conn: socket.socket) -> None:
    """A thread that relays the client's signals to this process, and kills this process
    group when the client is gone."""
    import threading

    def relay():
        buffer = b""
        while True:
            try:
                chunk = conn.recv(64)
            except OSError:
                chunk = b""
            if not chunk:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                parts = line.decode().split()
                if len(parts) == 2 and parts[0] == "signal":
                    os.kill(os.getpid(), int(parts[1]))

    threading.Thread(target=relay, daemon=True).start()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
