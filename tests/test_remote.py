"""Sharing through remotes: an experiment pushed from one clone (git remote + local-folder DVC
remote) is pulled into another clone with its LoRA and metrics; a fresh clone reruns only
what it must with `dvc exp run --pull --allow-missing`."""

from __future__ import annotations

import json

from conftest import git_copy, ran, shell_in


def test_experiment_round_trips_through_remotes(tmp_path):
    origin = tmp_path / "origin.git"
    storage = tmp_path / "dvc-storage"
    a, sh_a = git_copy(tmp_path / "a")
    sh_a("git", "init", "-q", "--bare", str(origin))
    sh_a("git", "remote", "add", "origin", str(origin))
    sh_a("dvc", "remote", "add", "-d", "storage", str(storage))
    sh_a("git", "commit", "-qam", "remote storage")
    sh_a("git", "push", "-q", "origin", "HEAD:main")

    sh_a("dvc", "exp", "run", "-S", "lora.rank=8", "-n", "shared")
    sh_a("dvc", "exp", "push", "origin", "shared")
    lora_a = (a / "models/lora/pytorch_lora_weights.safetensors").read_bytes()
    metrics_a = json.loads((a / "dvclive/metrics.json").read_text())

    b = tmp_path / "b"
    sh_a("git", "clone", "-q", "--branch", "main", str(origin), str(b))
    sh_b = shell_in(b)
    sh_b("dvc", "exp", "pull", "origin", "shared")
    shown = json.loads(sh_b("dvc", "exp", "show", "--json"))
    assert "shared" in json.dumps(shown)
    sh_b("dvc", "exp", "apply", "shared")
    sh_b("dvc", "checkout")
    assert (b / "models/lora/pytorch_lora_weights.safetensors").read_bytes() == lora_a
    assert json.loads((b / "dvclive/metrics.json").read_text()) == metrics_a

    # a fresh box: pull only what the changed stage needs, rerun only that stage
    c = tmp_path / "c"
    sh_a("git", "clone", "-q", "--branch", "main", str(origin), str(c))
    sh_c = shell_in(c)
    sh_c("dvc", "exp", "pull", "origin", "shared", "--no-cache")  # the git side only
    # params and dvc.lock apply; the data cannot be checked out (it is not here), which
    # `dvc exp apply` reports as an error
    assert "Checkout failed" in sh_c("dvc", "exp", "apply", "shared", check=False)
    assert not (c / "models/lora").exists()
    out = sh_c("dvc", "exp", "run", "--pull", "--allow-missing", "-S", "sample.steps=3")
    assert ran(out) == ["params", "sample"]  # the params check (no torch) and sample
    assert (c / "samples/grid.png").exists()
