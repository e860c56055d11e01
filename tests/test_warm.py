"""The warm server (lorapipe.core.warm): a stage run through it sees its client's folder,
arguments, environment, umask and terminal, returns its exit code, answers Ctrl-C as the
stage would, and dies with its client. It runs in the caller's context (network namespace,
resource limits, CPU affinity) and the caller's code, answers Ctrl-Z, survives its server,
never hangs, and serves its owner only: the attacker tests act as a real second local user."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, as_user

PROBE = '''
import json, os, resource, socket, sys, time
from pathlib import Path
info = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
        "marker": os.environ.get("PROBE_MARKER"), "umask": os.umask(0),
        "preloaded": sorted(m for m in sys.modules if m.split(".")[0] == "lorapipe"),
        "netns": os.readlink("/proc/self/ns/net"), "handler": os.getppid(),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "affinity": sorted(os.sched_getaffinity(0)), "cgroup": open("/proc/self/cgroup").read()}
try:  # the handler's parent: the server
    info["server"] = int(open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[1])
except OSError:
    info["server"] = None
if "--lorapipe" in sys.argv:
    import lorapipe
    info["lorapipe"] = lorapipe.__file__
    info["edited"] = getattr(lorapipe, "WARM_PROBE", None)
if "--net" in sys.argv:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[sys.argv.index("--net") + 1])),
                                 timeout=5).close()
        info["net"] = "connected"
    except OSError as exc:
        info["net"] = f"offline: {exc}"
Path("probe.json.tmp").write_text(json.dumps(info))
os.replace("probe.json.tmp", "probe.json")
print("probe says hello"); print("probe error line", file=sys.stderr)
if "--wait" in sys.argv:
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        print("probe interrupted", file=sys.stderr); sys.exit(130)
if "--until" in sys.argv:
    until = Path(sys.argv[sys.argv.index("--until") + 1])
    while not until.exists():
        time.sleep(0.05)
sys.exit(3)
'''
CLIENT = ("import sys; from lorapipe.core import warm; code = warm.run_warm('warm_probe'); "
          "sys.exit(99 if code is None else code)")


def client_env(tmp_path, src=REPO / "src", **extra) -> dict:
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods/warm_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'mods'}{os.pathsep}{src}",
           "PROBE_MARKER": "from the client", "LORAPIPE_WARM": "1", **extra}
    env.pop("LORAPIPE_WARM_CHILD", None)
    env.pop("XDG_RUNTIME_DIR", None)
    return env


def client(tmp_path, *args, prefix=(), env=None, umask=0o027, **popen) -> subprocess.Popen:
    env = env or client_env(tmp_path)

    def start():
        os.umask(umask)
    return subprocess.Popen([*prefix, sys.executable, "-c", CLIENT, *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=popen.pop("preexec_fn", None) or start, **popen)


def probe(tmp_path) -> dict:
    return json.loads((tmp_path / "probe.json").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(path, proc, seconds=90):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


def test_a_warm_child_runs_in_its_clients_place_and_returns_its_exit_code(tmp_path):
    proc = client(tmp_path, "a b", "--flag")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # the child's code, not 99 (no server) or 0
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["cwd"] == str(tmp_path) and probe["argv"] == ["a b", "--flag"]
    assert probe["marker"] == "from the client" and probe["umask"] == 0o027
    assert probe["pid"] != proc.pid  # it ran in a child of the server, not in the client
    assert out == "probe says hello\n" and "probe error line" in err


def test_a_warm_child_answers_ctrl_c_and_dies_with_its_client(tmp_path):
    proc = client(tmp_path, "--wait")
    wait_for(tmp_path / "probe.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "probe interrupted" in err

    (tmp_path / "probe.json").unlink()
    proc = client(tmp_path, "--wait", start_new_session=True)
    wait_for(tmp_path / "probe.json", proc)
    child = json.loads((tmp_path / "probe.json").read_text())["pid"]
    assert alive(child)
    os.killpg(proc.pid, signal.SIGKILL)  # as DVC or the OOM killer stops a stage
    proc.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_lorapipe_warm_0_runs_the_stage_in_its_own_process(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods/warm_probe.py").write_text(PROBE)
    code = ("import sys; from lorapipe.core import warm; sys.exit(7 if warm.enabled() else 0)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORAPIPE_WARM": "0"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    env["LORAPIPE_WARM"] = "1"
    env["LORAPIPE_WARM_CHILD"] = "1"  # a stage already in a child never asks again
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def warm_key(env) -> str:
    """The server key a client with `env` computes (what an attacker can compute too)."""
    out = subprocess.run([sys.executable, "-c",
                          "from lorapipe.core import warm; print(warm.key())"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def state(pid: int) -> str:
    """A process's state letter from /proc: R, S, T (stopped), Z ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def eventually(check, seconds=15) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- the caller's code -------------------------------------------------------------------
def test_the_worker_imports_the_callers_lorapipe_never_the_servers(tmp_path):
    """Two clones sharing one interpreter and one server: each runs its own lorapipe; the
    server holds none of it, so an edit made while it runs counts."""
    clone = tmp_path / "clone" / "src"
    shutil.copytree(REPO / "src" / "lorapipe", clone / "lorapipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = client_env(tmp_path, src=clone)
    first = client(tmp_path, "--lorapipe", env=env)
    assert first.wait(timeout=120) == 3, first.communicate()
    seen = probe(tmp_path)
    assert seen["pid"] != first.pid and seen["preloaded"] == []
    assert seen["lorapipe"] == str(clone / "lorapipe" / "__init__.py")
    with open(clone / "lorapipe" / "__init__.py", "a") as f:  # edited while the server runs
        f.write('\nWARM_PROBE = "edited"\n')
    again = client(tmp_path, "--lorapipe", env=env)
    assert again.wait(timeout=120) == 3, again.communicate()
    assert probe(tmp_path)["server"] == seen["server"]  # the same warm server, the new code
    assert probe(tmp_path)["edited"] == "edited"

    other = client(tmp_path, "--lorapipe")  # the repository's own src, the same server
    assert other.wait(timeout=120) == 3, other.communicate()
    assert probe(tmp_path)["lorapipe"] == str(REPO / "src" / "lorapipe" / "__init__.py")
    assert probe(tmp_path)["server"] == seen["server"] and probe(tmp_path)["edited"] is None


def test_the_key_follows_what_could_change_the_preloaded_code(tmp_path):
    """Folders that hold only other code (a clone's src, a workspace) share a server; one
    that shadows a module the preloads import (here typing_extensions, which torch imports)
    gets its own."""
    plain, other, shadow = (tmp_path / name for name in ("plain", "other", "shadow"))
    for folder in (plain, other, shadow):
        folder.mkdir()
    (other / "my_helpers.py").write_text("")
    (other / "dvclive").mkdir()  # a workspace's output folder: no __init__.py, hides nothing
    (shadow / "typing_extensions.py").write_text("")

    def key_with(folder):
        return warm_key({**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{REPO / 'src'}"})

    assert key_with(plain) == key_with(other) != key_with(shadow)


def test_a_removed_socket_does_not_stall_the_next_stage(tmp_path, shared_tmp):
    tmp = shared_tmp  # a short path: a socket's address holds 108 bytes
    env = client_env(tmp_path, TMPDIR=str(tmp))
    first = client(tmp_path, env=env)
    assert first.wait(timeout=120) == 3, first.communicate()
    server = probe(tmp_path)["server"]
    (tmp / f"lorapipe-warm-{os.geteuid()}" / f"{warm_key(env)}.sock").unlink()
    assert eventually(lambda: not alive(server))  # it saw its socket go and left
    again = client(tmp_path, env=env)
    assert again.wait(timeout=120) == 3, again.communicate()
    assert probe(tmp_path)["server"] not in (None, server)  # a new warm server served it


# -- the caller's context ----------------------------------------------------------------
def test_the_worker_has_the_callers_limits_and_cpu_affinity(tmp_path):
    env = client_env(tmp_path)
    warm = client(tmp_path, env=env)  # a server started with the usual limits
    assert warm.wait(timeout=120) == 3
    usual = probe(tmp_path)
    soft, hard = usual["nofile"]
    cpus = sorted(os.sched_getaffinity(0))

    def limited():
        import resource

        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft // 2, hard))
        os.sched_setaffinity(0, cpus[:1])

    proc = client(tmp_path, env=env, preexec_fn=limited)
    assert proc.wait(timeout=120) == 3, proc.communicate()
    seen = probe(tmp_path)
    assert seen["nofile"] == [soft // 2, hard] and seen["affinity"] == cpus[:1]
    assert seen["server"] != usual["server"]  # not the server of the other context


def _new_cgroup() -> Path | None:
    """A fresh child cgroup this process may move processes into (v2, else v1's pids
    controller), or None where that is not allowed."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids")):
        group = root / f"lorapipe-test-{os.getpid()}"
        try:
            group.mkdir()
        except OSError:
            continue
        if (group / "cgroup.procs").exists():
            return group
        group.rmdir()
    return None


def test_the_worker_is_in_the_callers_cgroup(tmp_path):
    """A stage started in another cgroup (systemd-run, a job scheduler's, a container's
    memory limit) is not run by a server of the first cgroup."""
    group = _new_cgroup()
    if group is None:
        pytest.skip("this machine does not let the tests make a cgroup")
    env = client_env(tmp_path)
    try:
        usual = client(tmp_path, env=env)
        assert usual.wait(timeout=120) == 3, usual.communicate()
        first = probe(tmp_path)

        def moved():
            os.umask(0o027)
            (group / "cgroup.procs").write_text(str(os.getpid()))

        proc = client(tmp_path, env=env, preexec_fn=moved)
        assert proc.wait(timeout=120) == 3, proc.communicate()
        seen = probe(tmp_path)
        assert group.name in seen["cgroup"] and group.name not in first["cgroup"]
        assert seen["server"] != first["server"]
    finally:
        for line in (group / "cgroup.procs").read_text().split():  # the server started there
            os.kill(int(line), signal.SIGKILL)
        assert eventually(lambda: not (group / "cgroup.procs").read_text().strip())
        group.rmdir()


def test_offline_under_unshare_n_is_offline(tmp_path):
    """A listener on the host's loopback: reachable from a warm worker of the host, not
    from a stage run under `unshare -n`, warm or not."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("this machine cannot make a network namespace (unshare -n)")
    listener = socket.create_server(("127.0.0.1", 0))
    port = str(listener.getsockname()[1])
    try:
        env = client_env(tmp_path)
        host = client(tmp_path, "--net", port, env=env)
        assert host.wait(timeout=120) == 3, host.communicate()
        assert probe(tmp_path)["net"] == "connected"
        host_ns = probe(tmp_path)["netns"]
        offline = client(tmp_path, "--net", port, env=env, prefix=["unshare", "-n"])
        out, err = offline.communicate(timeout=120)
        assert offline.returncode == 3, err
        assert probe(tmp_path)["net"].startswith("offline") and probe(tmp_path)["netns"] != host_ns
    finally:
        listener.close()


def test_ctrl_z_stops_the_work_and_continue_resumes_it(tmp_path):
    proc = client(tmp_path, "--wait")
    wait_for(tmp_path / "probe.json", proc)
    worker = probe(tmp_path)["pid"]
    proc.send_signal(signal.SIGTSTP)  # what the terminal sends on Ctrl-Z
    assert eventually(lambda: state(worker) == "T" and state(proc.pid) == "T"), state(worker)
    proc.send_signal(signal.SIGCONT)  # `fg`
    assert eventually(lambda: state(worker) != "T" and state(proc.pid) != "T")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "probe interrupted" in err


def test_a_killed_server_leaves_the_stage_its_real_exit_code(tmp_path):
    done = tmp_path / "done"
    proc = client(tmp_path, "--until", str(done))
    wait_for(tmp_path / "probe.json", proc)
    os.kill(probe(tmp_path)["server"], signal.SIGKILL)
    done.touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err  # the stage's own status, not a silent 1

    (tmp_path / "probe.json").unlink()
    done.unlink()
    proc = client(tmp_path, "--until", str(done))
    wait_for(tmp_path / "probe.json", proc)
    worker = probe(tmp_path)["pid"]
    os.kill(probe(tmp_path)["handler"], signal.SIGKILL)  # its process on the server's side
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "ended without an exit status" in err, err
    assert eventually(lambda: not alive(worker))  # the work did not go on behind the user


def test_a_server_that_never_answers_costs_seconds_not_a_hang(tmp_path, shared_tmp):
    """The user's own stuck server (stopped, or wedged): the stage runs in its own process
    after the hello's time limit, with one line saying why."""
    tmp = shared_tmp
    env = client_env(tmp_path, TMPDIR=str(tmp))
    folder = tmp / f"lorapipe-warm-{os.geteuid()}"
    folder.mkdir(mode=0o700)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(folder / f"{warm_key(env)}.sock"))
    silent.listen(8)  # accepts, never says hello
    try:
        proc = client(tmp_path, env=env)
        _, err = proc.communicate(timeout=40)  # the old client waited forever
    finally:
        silent.close()
    assert proc.returncode == 99  # the caller runs the stage itself
    assert "warm start not used" in err and "did not answer" in err, err
    assert len(err.strip().splitlines()) == 1


# -- another local user ------------------------------------------------------------------
LISTENER = r"""
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
server.settimeout(60)
print("listening", flush=True)
while True:
    try:
        conn, _ = server.accept()
    except OSError:
        break
    conn.settimeout(5)
    got = b""
    try:
        while chunk := conn.recv(1 << 16):
            got += chunk
    except OSError:
        pass
    with open(log, "ab") as f:
        f.write(b"CONNECTION " + got + b"\n")
"""


def test_a_folder_another_user_made_first_is_refused(tmp_path, shared_tmp, other_user):
    """The attacker makes the victim's predictable folder (open to all), listens on the
    victim's socket name and plants a lock symlink to a victim's file. The victim's stages
    never connect, nothing of theirs is truncated, and they still run."""
    env = client_env(tmp_path, TMPDIR=str(shared_tmp), HF_TOKEN="hf_victims_secret",
                     AWS_SECRET_ACCESS_KEY="aws_victims_secret")
    key = warm_key(env)
    folder = shared_tmp / f"lorapipe-warm-{os.geteuid()}"
    victim_file = tmp_path / "victims-file.txt"
    victim_file.write_text("precious\n")
    log = shared_tmp / "attacker.log"
    attacker = as_user(other_user, f"""
os.mkdir({str(folder)!r}, 0o777); os.chmod({str(folder)!r}, 0o777)
os.symlink({str(victim_file)!r}, {str(folder / (key + ".lock"))!r})
{LISTENER}""", argv=[str(folder / f"{key}.sock"), str(log)])
    try:
        assert attacker.stdout.readline().strip() == "listening", attacker.communicate()
        proc = client(tmp_path, env=env)
        _, err = proc.communicate(timeout=60)
        starter = subprocess.run([sys.executable, "-c", "from lorapipe.core import warm; "
                                  "warm.start_server()"], env=env, capture_output=True,
                                 text=True, timeout=60)
    finally:
        attacker.kill()
        attacker.communicate()
    assert proc.returncode == 99, err  # run in its own process, not by the attacker
    assert "warm start not used" in err and f"belongs to uid {other_user[0]}" in err, err
    assert "warm start off" in starter.stderr and starter.returncode == 0
    assert not log.exists() or log.read_bytes() == b"", log.read_bytes()
    assert victim_file.read_text() == "precious\n"


def test_a_symlinked_folder_is_refused(tmp_path, shared_tmp, other_user):
    env = client_env(tmp_path, TMPDIR=str(shared_tmp))
    theirs = shared_tmp / "theirs"
    attacker = as_user(other_user, f"os.mkdir({str(theirs)!r}, 0o777); os.chmod({str(theirs)!r}, "
                       f"0o777); os.symlink({str(theirs)!r}, "
                       f"{str(shared_tmp / f'lorapipe-warm-{os.geteuid()}')!r})")
    assert attacker.wait(timeout=30) == 0, attacker.communicate()
    proc = client(tmp_path, env=env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 99 and "is a symlink" in err, err
    assert list(theirs.iterdir()) == []


def test_another_user_cannot_reach_the_socket_or_be_served(tmp_path, shared_tmp, other_user):
    """With the victim's umask 000 the folder is still 0700 and the socket 0600; and a server
    whose socket another user does reach (here: made reachable on purpose) serves only its
    owner: SO_PEERCRED on every connection. The old server ran such a caller's code."""
    env = client_env(tmp_path, TMPDIR=str(shared_tmp))
    proc = client(tmp_path, env=env, umask=0)
    assert proc.wait(timeout=120) == 3
    folder = shared_tmp / f"lorapipe-warm-{os.geteuid()}"
    sock = folder / f"{warm_key(env)}.sock"
    assert folder.stat().st_mode & 0o777 == 0o700 and sock.stat().st_mode & 0o777 == 0o600
    blocked = as_user(other_user, f"""
try:
    socket.socket(socket.AF_UNIX).connect({str(sock)!r}); print("connected")
except PermissionError:
    print("refused")""")
    assert blocked.communicate(timeout=30)[0].strip() == "refused"

    folder.chmod(0o755)  # as if the victim had opened it up
    sock.chmod(0o666)
    planted = tmp_path / "mods" / "attack_probe.py"
    planted.write_text("open('/tmp/pwned-by-attacker', 'w').write('ran as the victim')\n")
    request = json.dumps({"module": "attack_probe", "argv": ["x"], "cwd": "/",
                          "env": {}, "path": [str(planted.parent)], "umask": 0})
    attacker = as_user(other_user, f"""
conn = socket.socket(socket.AF_UNIX); conn.connect({str(sock)!r}); conn.settimeout(10)
try:
    socket.send_fds(conn, [{request!r}.encode() + b"\\n"], [0, 1, 2])
    print(repr(conn.recv(1 << 16)))
except OSError as exc:
    print("closed:", exc)""")
    out, err = attacker.communicate(timeout=60)
    assert out.strip() in ("b''", ) or out.startswith("closed"), (out, err)
    assert not os.path.exists("/tmp/pwned-by-attacker")


def test_the_torchvision_note_is_silenced_and_nothing_else(tmp_path):
    """transformers' "requires torchvision ... falling back" note, printed by every torch
    stage, is filtered; another warning of the same logger still shows."""
    import importlib.util

    if importlib.util.find_spec("torchvision"):
        pytest.skip("torchvision is installed here: transformers prints no such note")
    code = ("import {first}transformers; transformers.CLIPImageProcessor; "
            "transformers.utils.logging.get_logger('transformers.utils.import_utils')"
            ".warning('another note')")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    plain = subprocess.run([sys.executable, "-c", code.format(first="")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "requires torchvision (not installed)" in plain.stderr  # what users saw
    ours = subprocess.run([sys.executable, "-c", code.format(first="lorapipe, ")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "requires torchvision" not in ours.stderr and "another note" in ours.stderr


def test_xdg_runtime_dir_comes_first(shared_tmp, monkeypatch):
    """systemd's per-user runtime folder (0700, removed at logout) holds the socket and the
    thread registry where it is set; the shared temporary folder is the fallback."""
    from lorapipe.core import threads, warm

    runtime = shared_tmp / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("LORAPIPE_RUNS_DIR", raising=False)
    path = warm.socket_path("k" * 24)
    assert path == runtime / "lorapipe-warm" / f"{'k' * 24}.sock"
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert threads.registry() == runtime / "lorapipe-runs"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert warm.socket_path("k" * 24).parent == shared_tmp / f"lorapipe-warm-{os.geteuid()}"
