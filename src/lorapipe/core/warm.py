"""A warm start for the torch stages: their ~4 s of imports paid once per machine, not per stage.

Every `python -m stages.<encode|train|sample>` is a fresh Python that imports torch,
diffusers, transformers, peft and dvclive before it does any work (measured: 4.0 s of
train's 5.6 s fixed cost), and a `dvc exp run` pays that twice. Here a server process
(lorapipe/warm_server.py, standard library only) imports those libraries once and forks a
worker per stage run; the stage's own process becomes a thin client that hands the worker
its argv, working folder, environment, umask and terminal (stdin/stdout/stderr, passed as
file descriptors over a Unix socket), relays Ctrl-C, Ctrl-Z and continue, and exits with
the worker's exit status. No library does this for arbitrary entry points:
multiprocessing's forkserver serves only its own Process objects.

The contract (a stage run warm must be as safe and as faithful as the stage run itself):
- Its owner only: the socket lives in a private folder (lorapipe.core.private: owned by the
  user, 0700, not a symlink, checked with lstat), is 0600, the server checks every peer's
  uid with SO_PEERCRED, and the client checks the server's uid and hello before it sends
  anything (its environment holds the user's secrets).
- The caller's context: a worker runs in its server's namespaces, cgroup, resource limits,
  credentials and CPU affinity, so those are part of the server's key and of its hello; a
  caller in any other context (`unshare -n`, a container, `ulimit -v`, `taskset`) gets a
  server of its own context or none.
- The caller's code: the key covers the interpreter, the server's own source (its digest:
  an edited warm_server.py gets a new server), the search path entries that could
  change what the server preloaded (code_path), where each preloaded library is found and
  its version, and the environment that decides native code (LD_*, OMP_*, ...); the server
  imports nothing of lorapipe, so each worker imports the caller's lorapipe fresh.
- It never hangs: connecting and the hello have time limits; a server that is starting is
  waited for only while it is alive. When the warm start cannot be used the stage runs in
  its own process, with one line saying why where something is wrong.
- The real exit status, or a message: a server that dies leaves its running stages to
  their handlers; a handler that dies takes its worker with it and the client says so.
LORAPIPE_WARM=0 turns all of this off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from lorapipe.core import private
from lorapipe.core.warm_server import context, peer_uid

PRELOAD = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
           "dvclive", "torch.utils.tensorboard", "diffusers.training_utils")
SERVER = Path(__file__).with_name("warm_server.py")
# the server exits after this long with no stage running or asked for (the tests set less)
IDLE_S = float(os.environ.get("LORAPIPE_WARM_IDLE_S", "300"))
START_WAIT_S = 60.0  # the longest a client waits for a server that is importing (~4 s)
CONNECT_TIMEOUT_S = 2.0  # connecting, and then the server's hello: a stuck server costs this
HELLO_TIMEOUT_S = 5.0
CHILD_ENV = "LORAPIPE_WARM_CHILD"  # set in a worker: it runs the stage, never asks again
# environment variables read when native libraries load (so by the server, not the worker)
_NATIVE_ENV = ("LD_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "PYTORCH_", "TORCH_",
               "CUDA_", "NCCL_", "PYTHON", "MALLOC_", "HF_", "TRANSFORMERS_", "DIFFUSERS_")
SOCKET_PATH_MAX = 100  # bytes; a Unix socket's address holds 108


class NotWarm(Exception):
    """The warm start cannot serve this stage; the message says why."""


def enabled() -> bool:
    return os.environ.get("LORAPIPE_WARM", "1") != "0" and CHILD_ENV not in os.environ


def _say(message: str) -> None:
    print(f"lorapipe: {message}", file=sys.stderr, flush=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
                 "dvclive", "tensorboard"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def search_path() -> list[str]:
    """sys.path less its first entry (the script's folder, or the working folder of
    `python -m`): what the server imports from. The worker gets the whole of it."""
    return sys.path[1:]


def _top_names(folder: str) -> set[str]:
    """The top-level module names a sys.path entry provides: modules, extensions and
    regular packages. A folder without __init__.py (a workspace's dvclive/ or models/) is at
    most a namespace portion, which never hides a regular package found later on the path."""
    folder = folder or "."
    try:
        entries = os.listdir(folder)
    except OSError:
        return set()
    names = set()
    for name in entries:
        stem = name.split(".")[0]
        if not stem.isidentifier():
            continue  # .dvc, foo-1.0.dist-info, ...
        if name.endswith((".py", ".pyc", ".so", ".pyd")) or (
                "." not in name and os.path.isfile(os.path.join(folder, name, "__init__.py"))):
            names.add(stem)
    return names


def code_path() -> list[str]:
    """The part of sys.path that decides the server's preloaded code: the interpreter's own
    library folders (stdlib, site-packages), and any other entry only where it holds a name
    that those folders hold too (it could shadow a module a preload imports). A folder that
    holds only lorapipe, or a workspace's stages, changes nothing the server imported (it
    imports nothing of lorapipe; each worker imports the caller's own from the caller's
    sys.path), so clones and workspaces share one server."""
    own = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    library = [e for e in sys.path if e and os.path.realpath(e).startswith(own)]
    provided = set().union(*(_top_names(e) for e in library)) if library else set()
    return [e for e in sys.path if e in library or _top_names(e) & provided]


def key() -> str:
    """What decides the code a worker runs and the context it runs in, hashed."""
    origins = {}
    for name in {n.split(".")[0] for n in PRELOAD}:
        spec = importlib.util.find_spec(name)
        origins[name] = spec.origin if spec else "-"
    # PYTHONPATH counts through code_path: a clone's src on it changes nothing preloaded
    env = {k: v for k, v in os.environ.items() if k.startswith(_NATIVE_ENV)
           and k != "PYTHONPATH"}
    material = {"python": [sys.executable, sys.version], "path": code_path(),
                "origins": origins, "versions": _versions(), "env": env,
                "server": hashlib.sha256(SERVER.read_bytes()).hexdigest(), "context": context()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def socket_path(server_key: str) -> Path:
    """This caller's server socket, in the user's private folder (UnsafeFolder if that
    folder cannot be trusted)."""
    folder = private.private_folder(private.user_folder("lorapipe-warm"))
    path = folder / f"{server_key}.sock"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise NotWarm(f"the socket path {path} is too long for a Unix socket; set TMPDIR "
                      "to a shorter folder")
    return path


# -- the client ---------------------------------------------------------------------------
def start_server() -> subprocess.Popen | None:
    """Start a server for this caller in the background unless one runs or is starting
    (returns at once). The line saying why when the warm start cannot be used."""
    try:
        server_key = key()
        path = socket_path(server_key)
    except (private.UnsafeFolder, NotWarm) as exc:
        _say(f"warm start off: {exc}")
        return None
    return _start(path, server_key)


def _start(path: Path, server_key: str) -> subprocess.Popen | None:
    if _server_busy(path):
        return None
    config = {"path": str(path), "key": server_key, "idle_s": IDLE_S,
              "preload": list(PRELOAD), "search_path": search_path()}
    # the server inherits this process's context (namespaces, cgroup, limits): its key's
    return subprocess.Popen([sys.executable, str(SERVER), json.dumps(config)], cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "LORAPIPE_WARM": "0"})


def _server_busy(path: Path) -> bool:
    """A server holds the lock of this socket (running, or importing before it listens)."""
    import fcntl

    try:
        fd = private.open_private_file(path.with_suffix(".lock"), os.O_RDWR)
    except (OSError, private.UnsafeFolder):
        return True  # cannot tell: do not start a second one
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases our own lock, if we got it
    return False


def _connect(path: Path, server_key: str) -> socket.socket | None:
    """A verified connection to the server at `path` (its uid and hello checked); None when
    nothing listens there. NotWarm when something does but is not this user's matching
    server."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise NotWarm(f"{path} is not this user's socket")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        conn.close()
        return None  # a server that left: start another
    except OSError as exc:
        conn.close()
        raise NotWarm(f"connecting to {path} failed ({exc})") from None
    try:
        if peer_uid(conn) != os.geteuid():
            raise NotWarm(f"the process listening at {path} is not yours")
        conn.settimeout(HELLO_TIMEOUT_S)
        hello = _read_line(conn)
        conn.settimeout(None)
    except (OSError, ValueError) as exc:
        conn.close()
        raise NotWarm(f"the warm server at {path} did not answer within "
                      f"{HELLO_TIMEOUT_S:.0f} s ({exc or 'no hello'})") from None
    except NotWarm:
        conn.close()
        raise
    if hello.get("key") != server_key or hello.get("context") != context():
        conn.close()
        raise NotWarm("the warm server runs in another context (namespaces, cgroup, limits "
                      "or credentials changed since it started)")
    return conn


def _read_line(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ValueError("closed")
        data += chunk
        if len(data) > 1 << 20:
            raise ValueError("too long")
    return json.loads(data)


def _connect_or_start(path: Path, server_key: str) -> socket.socket:
    found = _connect(path, server_key)
    if found is not None:
        return found
    started = _start(path, server_key)
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
        found = _connect(path, server_key)
        if found is not None:
            return found
        starting = started.poll() is None if started is not None else _server_busy(path)
        if not starting:
            if started is not None and started.returncode:
                raise NotWarm(f"the warm server exited with status {started.returncode} "
                              "while starting")
            started = _start(path, server_key)  # the one we waited for left
    raise NotWarm(f"no warm server answered within {START_WAIT_S:.0f} s")


def run_warm(module: str) -> int | None:
    """Run `python -m <module>` (this process's argv) in a worker of the warm server; its
    exit status, or None when the warm start cannot serve it (the caller then runs the
    stage itself; the line saying why is printed)."""
    try:
        server_key = key()
        conn = _connect_or_start(socket_path(server_key), server_key)
    except (private.UnsafeFolder, NotWarm) as exc:
        _say(f"warm start not used ({exc}); running {module} in this process")
        return None
    umask = os.umask(0)
    os.umask(umask)
    request = {"module": module, "argv": sys.argv, "cwd": os.getcwd(),
               "env": {**os.environ, CHILD_ENV: "1"}, "path": sys.path, "umask": umask}
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError as exc:
        _say(f"warm start not used (the request could not be sent: {exc}); running {module} "
             "in this process")
        return None
    _relay_signals(conn)
    try:
        reply = _read_line(conn)
    except (OSError, ValueError):
        reply = {}
    if "exit" not in reply:
        _say(f"{module}: the warm server's process running this stage ended without an exit "
             "status (it was killed, or ran out of memory); the stage did not finish. Run "
             "it again; LORAPIPE_WARM=0 runs stages without the warm server")
        return 1
    return int(reply["exit"])


def _relay_signals(conn: socket.socket) -> None:
    """Ctrl-C, termination and hang-up go to the worker, which answers them as the stage
    would; Ctrl-Z stops the worker and then this process, as a shell's job control expects;
    continuing this process continues the worker."""
    def send(number: int) -> None:
        try:
            conn.sendall(json.dumps({"signal": number}).encode() + b"\n")
        except OSError:
            pass

    def stop(_number, _frame) -> None:
        send(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: send(number))
    signal.signal(signal.SIGTSTP, stop)
    signal.signal(signal.SIGCONT, lambda _number, _frame: send(signal.SIGCONT))
