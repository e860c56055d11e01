"""The warm server (lorapipe.warm): a stage run through it sees its client's folder,
arguments, environment, umask and terminal, returns its exit code, answers Ctrl-C as the
stage would, and dies with its client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

PROBE = '''
import json, os, sys, time
from pathlib import Path
Path("probe.json").write_text(json.dumps({
    "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
    "marker": os.environ.get("PROBE_MARKER"), "umask": os.umask(0)}))
print("probe says hello"); print("probe error line", file=sys.stderr)
if "--wait" in sys.argv:
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        print("probe interrupted", file=sys.stderr); sys.exit(130)
sys.exit(3)
'''
CLIENT = ("import sys; from lorapipe import warm; code = warm.run_warm('warm_probe'); "
          "sys.exit(99 if code is None else code)")


def client(tmp_path, *args, **popen) -> subprocess.Popen:
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods/warm_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'mods'}{os.pathsep}{REPO / 'src'}",
           "PROBE_MARKER": "from the client", "LORAPIPE_WARM": "1"}
    env.pop("LORAPIPE_WARM_CHILD", None)
    return subprocess.Popen([sys.executable, "-c", CLIENT, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o027), **popen)


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
    code = ("import sys; from lorapipe import warm; sys.exit(7 if warm.enabled() else 0)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORAPIPE_WARM": "0"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    env["LORAPIPE_WARM"] = "1"
    env["LORAPIPE_WARM_CHILD"] = "1"  # a stage already in a child never asks again
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
