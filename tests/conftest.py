"""Shared test helpers: build small datasets (good and bad) in temporary folders."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# the warm servers the tests' stages start (lorapipe.core.warm) leave soon after the tests
os.environ.setdefault("LORAPIPE_WARM_IDLE_S", "20")

MACHINE_CPUS = sorted(os.sched_getaffinity(0))  # before the worker is pinned


def _pin_xdist_worker() -> list[int] | None:
    """Under pytest-xdist (the suite runs `-n 2`), each worker gets its own share of the
    cores (its subprocesses inherit it) and its own run registry: runs in the other worker
    then never change this one's automatic thread count, which would move the last bits of
    the runs these tests compare byte for byte (lorapipe.core.threads). Returns the share."""
    import tempfile

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count:
        return None
    index, n = int(worker.removeprefix("gw")), int(count)
    os.environ["LORAPIPE_RUNS_DIR"] = tempfile.mkdtemp(prefix=f"lorapipe-runs-{worker}-")
    if len(MACHINE_CPUS) < n:
        return None
    os.sched_setaffinity(0, MACHINE_CPUS[index::n])
    return MACHINE_CPUS[index::n]


PINNED = _pin_xdist_worker()


# the WebUI file of a run with lora.name "" outside `dvc exp run`
WEBUI_FILE = "lorapipe.safetensors"


def write_csv(path: Path, rows: list[list[str]], header=("file_name", "text")) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def rgb_image(path: Path, size=(96, 80), colour=(200, 60, 40), **save) -> Path:
    Image.new("RGB", size, colour).save(path, **save)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file (links not followed), to prove a folder is untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.is_symlink():
                out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
            else:
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def dataset(tmp_path):
    """A folder with three good 96x80 images and a metadata.csv; returns its path."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        rgb_image(folder / f"img{i}.png", colour=colour)
        rows.append([f"img{i}.png", f"caption {i}"])
    write_csv(folder / "metadata.csv", rows)
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with the repository's params.yaml, for running stage mains in-process.

    Returns a function that writes params.yaml with overrides {"section.key": value}.
    """
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((REPO / "params.yaml").read_text())

    def set_params(**overrides):
        params = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            params[section][key] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return tmp_path

    return set_params


def copy_repo(dest: Path) -> Path:
    """Copy the repository's tracked and unignored files to `dest` (what a clone would hold).
    A dvc.lock left uncommitted by a local run is not part of a clone: it is left out (a
    committed one is copied, so the fresh-clone tests see it)."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    untracked = subprocess.run(
        ["git", "ls-files", "-o", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        if rel == "dvc.lock" and rel in untracked:
            continue
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _preprocess_example(folder: Path, bucketed: bool) -> Path:
    """The example data through preprocess's own worker and layout, at 64 px."""
    import json
    from types import SimpleNamespace

    from lorapipe.diffusion import buckets
    from lorapipe.diffusion.stages.preprocess import SIZE_COLUMNS, Layout, process_one

    folder.mkdir()
    settings = {"resolution": 64, "buckets": bucketed, "bucket_step": 16, "min_side": 32,
                "max_side": 128, "upscale": False}
    layout = Layout.from_params(SimpleNamespace(**settings))
    rows = []
    with open(REPO / "data/example/metadata.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = Path(row["file_name"]).with_suffix(".png").name
            size = process_one(str(REPO / "data/example"), str(folder), layout,
                               (row["file_name"], name))
            rows.append([name, row["text"], row["file_name"], *size])
    write_csv(folder / "metadata.csv", rows, header=("file_name", "text", "source", *SIZE_COLUMNS))
    (folder / buckets.LAYOUT_FILE).write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="session")
def example_processed(tmp_path_factory):
    """The example data preprocessed to 64 px squares, with preprocess's metadata.csv."""
    return _preprocess_example(tmp_path_factory.mktemp("example") / "processed", False)


@pytest.fixture(scope="session")
def example_processed_buckets(tmp_path_factory):
    """The example data in aspect-ratio buckets of at most 64x64 px (3 sizes: its
    portraits, landscapes and squares)."""
    return _preprocess_example(tmp_path_factory.mktemp("example-b") / "processed", True)


def _encoded(processed: Path, family: str) -> Path:
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.families import by_name

    f = by_name(family)
    cache = encode_dataset(f.build_builtin(), processed, batch_size=8)
    save_cache(cache, processed.parent / f"cache-{family}", f.builtin)
    return processed.parent / f"cache-{family}"


@pytest.fixture(scope="session")
def example_cache(example_processed):
    """The example data encoded with the builtin SD model, once."""
    return _encoded(example_processed, "sd")


@pytest.fixture(scope="session")
def example_cache_sdxl(example_processed):
    """The example data encoded with the builtin SDXL model, once."""
    return _encoded(example_processed, "sdxl")


@pytest.fixture(scope="session")
def example_cache_flux(example_processed):
    """The example data encoded with the builtin Flux model, once."""
    return _encoded(example_processed, "flux")


@pytest.fixture(scope="session")
def example_cache_sd3(example_processed):
    """The example data encoded with the builtin SD3 model, once."""
    return _encoded(example_processed, "sd3")


@pytest.fixture(scope="session")
def example_cache_chroma(example_processed):
    """The example data encoded with the builtin Chroma model, once."""
    return _encoded(example_processed, "chroma")


@pytest.fixture(scope="session")
def example_cache_qwen_image(example_processed):
    """The example data encoded with the builtin Qwen-Image model, once."""
    return _encoded(example_processed, "qwen-image")


@pytest.fixture(scope="session")
def bucketed_cache(example_processed_buckets):
    """The bucketed example encoded with the builtin SD model."""
    return _encoded(example_processed_buckets, "sd")


@pytest.fixture(scope="session")
def bucketed_cache_sdxl(example_processed_buckets):
    """The bucketed example encoded with the builtin SDXL model."""
    return _encoded(example_processed_buckets, "sdxl")


def make_params(root: Path, **overrides):
    """params.yaml in `root` from the repository's, with {"section__key": value} overrides;
    returns the checked Params."""
    from lorapipe.tasks import load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(root)
    for dotted, value in overrides.items():
        *path, key = dotted.split("__")
        node = params
        for part in path:
            node = node[part]
        node[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(root / "params.yaml")


def run_dirs(tmp_path: Path, *names: str) -> list[Path]:
    """Fresh folders for runs that are compared with each other."""
    dirs = [tmp_path / name for name in names]
    for d in dirs:
        d.mkdir()
    return dirs


def same_weights(folder_a: Path, folder_b: Path) -> bool:
    """The two diffusers LoRA files hold bit-identical tensors. (Their bytes also carry the
    run's name, which differs when the params differ, e.g. in how often to evaluate.)"""
    import torch
    from safetensors.torch import load_file

    a = load_file(str(folder_a / "pytorch_lora_weights.safetensors"))
    b = load_file(str(folder_b / "pytorch_lora_weights.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# data.dir for runs compared byte for byte: the WebUI file names its dataset folder
# (ss_dataset_dirs), which must not be each run's own temporary folder
SAME_DATA_DIR = {"data__dir": str(REPO / "data" / "example")}


def train_in(root: Path, cache: Path, health_report: Path | None = None, **overrides):
    """Run the training loop in `root` with small defaults; returns TrainResult."""
    from accelerate.state import AcceleratorState, GradientState

    from lorapipe.core.training import Paths, run
    from lorapipe.tasks import stage

    # accelerate keeps one state per process; each in-process run is a fresh "process"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    settings = {"train__max_steps": 20, "train__validation__every": 10,
                "train__checkpoint_every": 0, "train__sample_every": 0, **SAME_DATA_DIR}
    settings.update(overrides)
    params = make_params(root, **settings)
    return run(params, Paths(cache, root / "lora", root / "dvclive", root / "logs",
                             root / "ckpt", health_report, root / "examples.csv"),
               stage(params, "train").recipe_class())


def set_param(root: Path, dotted: str, value) -> None:
    """Edit one top-level `section.key` in root/params.yaml as text, keeping its comments."""
    import re

    section, key = dotted.split(".")
    text = (root / "params.yaml").read_text()
    start = text.index(f"\n{section}:\n")
    match = re.compile(rf"^(  {key}: ).*$", re.M).search(text, start)
    text = text[: match.start()] + f"{match.group(1)}{value}" + text[match.end():]
    (root / "params.yaml").write_text(text)


def ran(output: str) -> list[str]:
    """The stages `dvc repro` / `dvc exp run` ran, from DVC's own output."""
    import re

    return re.findall(r"Running stage '(\w+)'", output)


def shell_in(root: Path):
    """A runner for commands in `root` with this venv's tools and the copy's library."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(root / "src"),  # the copy's library, not the developer's checkout
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )

    def sh(*cmd: str, check=True, extra_env: dict | None = None, spawns: bool = False) -> str:
        """spawns: the command leaves daemons behind (`dvc queue start`'s workers), which
        inherit its output pipes; its output is then not captured, or reading it would
        wait for them to exit."""
        out = subprocess.DEVNULL if spawns else subprocess.PIPE
        result = subprocess.run(cmd, cwd=root, env={**env, **(extra_env or {})},
                                stdout=out, stderr=out, text=True)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return (result.stdout or "") + (result.stderr or "")

    return sh


def git_copy(root: Path):
    """The repository copied into a fresh git repo at `root`, set for short runs; returns
    (root, sh)."""
    copy_repo(root)
    sh = shell_in(root)
    # short runs keep the DVC tests quick; every rule they prove holds at any length
    set_param(root, "train.max_steps", 20)
    set_param(root, "train.sample_every", 0)
    set_param(root, "sample.steps", 4)
    set_param(root, "sample.images_per_prompt", 1)
    set_param(root, "sample.prompts", '["a red circle, lpstyle", "a blue star"]')
    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    return root, sh


SDXL = {"model__base": "builtin:tiny-sdxl"}
FLUX = {"model__base": "builtin:tiny-flux"}
SD3 = {"model__base": "builtin:tiny-sd3"}
CHROMA = {"model__base": "builtin:tiny-chroma"}
QWEN_IMAGE = {"model__base": "builtin:tiny-qwen-image"}


@pytest.fixture(params=["sd", "sdxl", "flux", "sd3", "chroma", "qwen-image"])
def family_run(request):
    """(encoded example cache, params overrides) for each model family's builtin: a test
    using it runs once per family."""
    if request.param == "sd":
        return request.getfixturevalue("example_cache"), {}
    overrides = {"sdxl": SDXL, "flux": FLUX, "sd3": SD3, "chroma": CHROMA,
                 "qwen-image": QWEN_IMAGE}[request.param]
    cache = request.getfixturevalue(f"example_cache_{request.param.replace('-', '_')}")
    return cache, dict(overrides)


def hold_registration(folder: Path) -> subprocess.Popen:
    """Another lorapipe run, as far as the registry can tell: a process that registered."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lorapipe.core import threads; "
         "threads.register(); print('ready', flush=True); time.sleep(600)"],
        env={**os.environ, "LORAPIPE_RUNS_DIR": str(folder)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


# task_type llm on its builtin model and example set, at the learning rate the README uses
LLM_EXAMPLE = REPO / "data" / "example-llm"
LLM = {"task_type": "llm", "model__base": "builtin:tiny-llm", "data__dir": str(LLM_EXAMPLE),
       "train__learning_rate": 3e-3,
       "train__sample_prompts": ["What colour is the sun?", "What is two plus two?"]}


def llm_encoded(data_dir: Path, out: Path, base: str = "builtin:tiny-llm", **llm) -> Path:
    """data.jsonl through validate's reader and encode's tokenizing, as the stages do."""
    from types import SimpleNamespace

    from lorapipe.llm.data import encode_examples, read_examples, save_token_cache
    from lorapipe.llm.models import load_tokenizer

    p = SimpleNamespace(**{"max_length": 256, "too_long": "error", "train_on_prompt": False,
                           "thinking": "keep", **llm})
    examples, findings, _ = read_examples(data_dir)
    assert not findings, findings
    save_token_cache(encode_examples(examples, load_tokenizer(base), p, base), out)
    return out


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory):
    """The LLM example set tokenized for builtin:tiny-llm, once."""
    return llm_encoded(LLM_EXAMPLE, tmp_path_factory.mktemp("llm") / "cache")


# -- a second local user, for the attacker tests -------------------------------------------
ATTACKER = "lorapipe-attacker"


@pytest.fixture(scope="session")
def other_user() -> tuple[int, int]:
    """(uid, gid) of a real second local user, made here where the tests run as root (as CI
    does); skipped elsewhere, with the reason."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("the attacker tests need root to act as a second local user")
    try:
        entry = pwd.getpwnam(ATTACKER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                               "/usr/sbin/nologin", ATTACKER], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"cannot create a second local user: {made.stderr.strip()}")
        entry = pwd.getpwnam(ATTACKER)
    return entry.pw_uid, entry.pw_gid


def as_user(user: tuple[int, int], code: str, argv: tuple = (), **popen) -> subprocess.Popen:
    """Run Python `code` as `user`: the interpreter starts as root (its files may be where
    that user cannot read) and drops to the user's uid, gid and no extra groups before
    `code` runs, so every system call of `code` is that user's."""
    uid, gid = user
    prelude = ("import fcntl, json, os, socket, stat, sys, threading, time\n"
               f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
               f"assert os.getuid() == os.geteuid() == {uid}\n")
    return subprocess.Popen([sys.executable, "-c", prelude + code, *argv], cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture
def shared_tmp():
    """A temporary folder every local user can write, sticky, like /tmp itself."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lorapipe-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def plot_sources() -> list[str]:
    """Every file or folder dvc.yaml's top-level plots name (plot ids that are paths, and the
    files of each chart's y)."""
    import yaml

    out = []
    for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]:
        name, props = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        y = (props or {}).get("y")
        out += list(y) if isinstance(y, dict) else [name]
    return out


def assert_plots_load(root: Path, sh) -> dict:
    """Every plot dvc.yaml names was written by this run, and `dvc plots show` loads each
    one without an error (DVC's 'failed to load some plots'); returns the charts by id."""
    import json

    missing = [p for p in plot_sources() if not (root / p).exists()]
    assert missing == [], f"dvc.yaml plots this run did not write: {missing}"
    shown = json.loads(sh("dvc", "plots", "show", "--json").strip().splitlines()[-1])
    assert not shown.get("errors"), shown.get("errors")
    assert all(shown["data"].values())  # every plot has data
    # and every curve the run logged is drawn
    curves = {p.relative_to(root).as_posix()
              for p in (root / "dvclive/plots/metrics").rglob("*.tsv")}
    assert curves and curves <= set(shown["data"]), sorted(curves - set(shown["data"]))
    return shown["data"]


# the slowest test files, slowest first (measured: the durations pytest prints): xdist hands
# out whole files in collection order, so starting these first keeps the two workers even
SLOW_FILES = ("test_dvc_pipeline.py", "test_resume.py", "test_sharding.py", "test_llm.py",
              "test_methods.py", "test_health.py", "test_quantize.py", "test_distributed.py",
              "test_remote.py", "test_warm.py", "test_sd3.py", "test_flux.py", "test_chroma.py",
              "test_insight.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable
