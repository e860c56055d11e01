"""The warm server: imports torch & co. once and forks a worker per stage run.

Standard library only, and run by file path (`python .../warm_server.py ...`), never as
`lorapipe.core.warm_server`: the server must hold no lorapipe code, so that every worker imports
the caller's own lorapipe fresh from the caller's sys.path (two clones sharing one venv,
or an edit made while a server runs, each get their own code). lorapipe.core.warm, the client,
imports `context()` from here so that both sides describe a process the same way.

Per connection the server forks a *handler*, which owns the connection: it says hello (the
server's key and context, for the client to compare with its own), takes the request and
the caller's stdin/stdout/stderr, forks the *worker* that runs the stage, relays the
caller's signals (Ctrl-C, Ctrl-Z and continue), and reports the worker's real exit status.
A handler outlives its server: a server that is killed or times out does not take a
running stage with it. The worker dies with its handler (PR_SET_PDEATHSIG) and the handler
kills the worker when the caller's connection closes (the caller was killed).

Only the server's own user may connect: the folder is the client's to check (private,
0700), the socket is 0600, and every connection's peer uid is read with SO_PEERCRED.
"""

import sys

if __name__ == "__main__":
    # Run by path, Python put lorapipe's own folder first on sys.path; nothing there may be
    # found by an import in the server (see the docstring).
    del sys.path[0]

import errno  # noqa: E402 - after the sys.path repair above
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")
# /proc/self/status lines that decide what a process may do
_STATUS_KEYS = ("NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
REQUEST_TIMEOUT_S = 10.0  # a handler waits this long for the client's request
MAX_REQUEST = 16 << 20  # bytes: argv, environment and sys.path of one stage run


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return "-"


def context() -> dict:
    """What a process's work depends on besides its code and arguments: namespaces, cgroup,
    resource limits, credentials, CPU affinity, priority. A worker runs in its server's
    context, so a client uses a server only when the two are equal."""
    out = {}
    for name in NAMESPACES:
        try:
            out[f"ns.{name}"] = os.readlink(f"/proc/self/ns/{name}")
        except OSError:
            out[f"ns.{name}"] = "-"
    out["cgroup"] = _read("/proc/self/cgroup")
    out["rlimits"] = {name: list(resource.getrlimit(getattr(resource, name)))
                      for name in sorted(dir(resource)) if name.startswith("RLIMIT_")}
    out["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())]
    out["affinity"] = sorted(os.sched_getaffinity(0))
    out["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    out["oom_score_adj"] = _read("/proc/self/oom_score_adj").strip()
    status = _read("/proc/self/status").splitlines()
    out["status"] = [line for line in status if line.split(":")[0] in _STATUS_KEYS]
    return out


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass


# -- the server ---------------------------------------------------------------------------
def serve(path: str, key: str, idle_s: float, preload: list[str], search_path: list[str]
          ) -> None:
    lock_path = path[:-len(".sock")] + ".lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:  # one server per socket: a second one started in the same moment leaves at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    sys.path[:] = search_path  # the client's, less its script folder: the same imports
    import importlib

    for name in preload:
        importlib.import_module(name)
    tmp = f"{path}.{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: its owner only may connect
    try:
        listener.bind(tmp)
    finally:
        os.umask(old)
    listener.listen(16)
    os.replace(tmp, path)
    mine = os.stat(path)
    handlers: set[int] = set()
    last_work = time.monotonic()
    while handlers or time.monotonic() - last_work < idle_s:
        if not _still_mine(path, mine):
            break  # our socket was removed or replaced: leave, so a new server can start
        ready, _, _ = select.select([listener], [], [], 0.2)
        if ready:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if peer_uid(conn) != os.geteuid():
                conn.close()  # another user: not a byte is read or written
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                os.close(lock)  # the lock is the server's: a handler must not keep it
                _handle(conn, key)  # never returns
            conn.close()
            handlers.add(pid)
            last_work = time.monotonic()
        for pid in list(handlers):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                handlers.discard(pid)
                last_work = time.monotonic()
    listener.close()
    if _still_mine(path, mine):
        os.unlink(path)
    if _still_mine(lock_path, os.fstat(lock)):  # removed while still held: no debris left
        os.unlink(lock_path)


def _still_mine(path: str, mine: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


# -- one connection -----------------------------------------------------------------------
def _handle(conn: socket.socket, key: str) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # signals come as messages, from the client
        _send(conn, {"key": key, "context": context()})
        conn.settimeout(REQUEST_TIMEOUT_S)
        request, fds = _receive(conn)
        conn.settimeout(None)
        worker = os.fork()
        if worker == 0:
            _work(conn, fds, request)  # never returns
        for fd in fds:
            os.close(fd)
        code = _relay(conn, worker)
    except (OSError, ValueError):
        pass
    finally:
        os._exit(code)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
        more = conn.recv(1 << 20)
        if not more:
            raise OSError("request cut short")
        data += more
    if len(fds) != 3:
        raise ValueError("expected stdin, stdout and stderr")
    return json.loads(data), fds


def _relay(conn: socket.socket, worker: int) -> int:
    """Pass the client's signals to the worker's process group until the worker ends; then
    tell the client its exit status. The client gone: the worker is killed."""
    buffer = b""
    # SIGCHLD wakes the select below the moment the worker ends (no polling delay)
    wake, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda _number, _frame: None)
    while True:
        done, status = os.waitpid(worker, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            _send(conn, {"exit": code if code >= 0 else 128 - code})
            return 0
        ready, _, _ = select.select([conn, wake], [], [], 1.0)
        if wake in ready:
            os.read(wake, 4096)
        if conn not in ready:
            continue
        try:
            chunk = conn.recv(256)
        except OSError:
            chunk = b""
        if not chunk:  # the client died (killed by DVC, a test, the OOM killer)
            _signal(worker, signal.SIGKILL)
            os.waitpid(worker, 0)
            return 1
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                number = int(json.loads(line)["signal"])
            except (ValueError, KeyError, TypeError):
                continue
            if number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGSTOP,
                          signal.SIGCONT):
                _signal(worker, number)


def _signal(worker: int, number: int) -> None:
    """To the worker's whole process group, as a terminal signals its foreground job."""
    try:
        os.killpg(worker, number)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills this worker when its handler dies."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the handler died before the line above
        os._exit(1)


def _work(conn: socket.socket, fds: list[int], request: dict) -> None:
    code = 1
    try:
        os.setsid()  # its own process group, signalled and killed whole
        _die_with_parent()
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(request["umask"])
        sys.path[:] = request["path"]
        sys.argv[:] = request["argv"]
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        import importlib
        import runpy

        importlib.invalidate_caches()  # files written since the server's imports count
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


if __name__ == "__main__":
    _config = json.loads(sys.argv[1])
    serve(_config["path"], _config["key"], _config["idle_s"], _config["preload"],
          _config["search_path"])
