"""The real pipeline: `dvc repro` and `dvc status` in a temporary git copy of the repository.

Proves each stage reruns exactly when something it reads changes, and never otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_plots_load, git_copy, ran, set_param, tree_digest


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return git_copy(tmp_path_factory.mktemp("repo"))


def changed(sh) -> set[str]:
    status = json.loads(sh("dvc", "status", "--json").strip().splitlines()[-1])
    return set(status)


ALL = ["params", "validate", "preprocess", "encode", "train", "sample"]


def lock_hashes(root) -> dict[str, str]:
    """out path -> md5 that dvc.lock records for every stage output."""
    import yaml

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values()
            for out in stage.get("outs", [])}


def test_pipeline_reruns_exactly_what_a_change_touches(repo, tmp_path):
    root, shared_sh = repo
    # a thread registry of this test's own: lorapipe runs elsewhere on the machine (another
    # checkout's tests) would change the automatic thread count between the runs compared
    # byte for byte below, and with it the last bits (params.yaml's train.cpu_threads)
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o700)

    def sh(*cmd, **kw):
        return shared_sh(*cmd, extra_env={"LORAPIPE_RUNS_DIR": str(runs)}, **kw)

    raw_before = tree_digest(root / "data/example")

    out = sh("dvc", "repro")
    assert ran(out) == ALL
    processed = sorted((root / "data/processed").glob("*.png"))
    assert len(processed) == 20
    assert Image.open(processed[0]).size == (64, 64)
    report = json.loads((root / "reports/validation.json").read_text())
    assert (report["rows"], report["usable"], report["errors"]) == (20, 20, 0)
    assert (root / "data/cache/latents.safetensors").exists()
    assert (root / "models/lora/pytorch_lora_weights.safetensors").exists()
    assert Image.open(root / "samples/grid.png").size[0] == 2 * 128
    metrics = sh("dvc", "metrics", "show")
    assert "dvclive/metrics.json" in metrics and "reports/validation.json" not in metrics
    assert_plots_load(root, sh)  # every plot dvc.yaml names: written, and loads
    sh("dvc", "plots", "show", "-o", "plots_out")  # loss curves and sample images, one page
    html = (root / "plots_out/index.html").read_text()
    # works offline: vega is in the page, no script comes from the network
    assert not re.search(r"<script[^>]*\bsrc=", html) and "vegaEmbed" in html
    # overfitting shows as two lines in one chart: both fixed-noise series in one spec
    specs = {title(s): s for s in
             (json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", html, re.S))}
    [fixed] = [s for t, s in specs.items() if t.startswith("fixed-noise loss")]
    files = {row["filename::field"] for row in fixed["data"]["values"]}
    assert files == {"train/fixed.tsv::fixed", "validation/step_average.tsv::step_average"}
    [lr] = [s for t, s in specs.items() if t.startswith("learning rate")]
    assert '"format": ".1e"' in json.dumps(lr)  # 1e-03, not 0.0010000
    assert any(p.name.endswith("grid.png") for p in (root / "plots_out/static").iterdir())
    shutil.rmtree(root / "plots_out")

    assert ran(sh("dvc", "repro")) == []  # nothing changed: nothing runs

    # same params and data on the same machine: the same bytes in every output DVC hashes
    # but TensorBoard's (its event files carry wall times and the host name by design)
    before = lock_hashes(root)
    assert ran(sh("dvc", "repro", "-f", "-s", "encode")) == ["encode"]
    assert ran(sh("dvc", "repro", "-f", "-s", "train")) == ["train"]
    after = lock_hashes(root)
    changed_outs = {path for path in before if before[path] != after[path]}
    assert changed_outs <= {"logs/tensorboard"}, changed_outs
    assert ran(sh("dvc", "repro")) == []  # so sample does not rerun

    # the README: nothing reruns
    with open(root / "README.md", "a") as f:
        f.write("\nan edit\n")
    assert changed(sh) == set()
    assert ran(sh("dvc", "repro")) == []

    # model.quantize changes how train and sample hold the base, never the encode cache;
    # so do the prediction type and noise schedule
    for dotted, value, default in (("model.quantize", "nf4", "none"),
                                   ("model.prediction_type", "v_prediction", "auto"),
                                   ("model.noise_schedule", "zero_terminal_snr", "auto")):
        set_param(root, dotted, value)
        assert changed(sh) == {"params", "train", "sample"}, dotted
        set_param(root, dotted, default)
    assert changed(sh) == set()

    # preprocess.workers: preprocess reruns, writes the same bytes, so nothing after it does
    set_param(root, "preprocess.workers", 1)
    assert changed(sh) == {"params", "preprocess"}
    assert ran(sh("dvc", "repro")) == ["params", "preprocess"]

    # lora.* and train.*: train and sample; the encode cache is reused, also for a
    # text-encoder LoRA on the kohya preset (the cache holds the token ids it encodes)
    set_param(root, "lora.rank", 8)
    set_param(root, "lora.targets", "kohya")
    set_param(root, "lora.text_encoder", "true")
    set_param(root, "train.learning_rate", "2e-3")
    assert changed(sh) == {"params", "train"}
    out = sh("dvc", "repro")
    assert ran(out) == ["params", "train", "sample"]
    assert "lora.targets preset kohya: 60 modules (48 unet, 12 text_encoder)" in out

    # sample.*: sample only
    set_param(root, "sample.steps", 3)
    assert changed(sh) == {"params", "sample"}
    assert ran(sh("dvc", "repro")) == ["params", "sample"]

    # preprocess.resolution: validate (it reports the buckets images will land in) and
    # preprocess (and, once its output changed, all after it)...
    set_param(root, "preprocess.resolution", 32)
    assert changed(sh) == {"params", "validate", "preprocess"}
    # ...and a validate key that drops images: validate, then the rest on what is left
    # (one repro for both: each full run costs half a minute here)
    set_param(root, "validate.min_side", 170)  # the 160-px-wide half of the examples
    set_param(root, "validate.on_error", "skip")
    assert changed(sh) == {"params", "validate", "preprocess"}
    assert ran(sh("dvc", "repro")) == ALL
    processed = sorted((root / "data/processed").glob("*.png"))
    assert len(processed) == 10 and Image.open(processed[0]).size == (32, 32)

    # a validate key whose change leaves the usable rows as they were: validate reruns,
    # and DVC sees its output unchanged, so preprocess is rightly skipped
    set_param(root, "validate.max_pixels", 50_000_000)
    assert ran(sh("dvc", "repro")) == ["params", "validate"]

    # errors with on_error: fail stop the pipeline with a non-zero exit
    set_param(root, "validate.on_error", "fail")
    result = sh("dvc", "repro", check=False)
    assert "smaller than validate.min_side=170" in result
    assert tree_digest(root / "data/example") == raw_before  # the raw data never changed
    sh("git", "checkout", "params.yaml")  # back to the committed params for the next test
    sh("dvc", "repro")


def experiments(shown) -> dict[str, dict]:
    """Experiment name -> {"params": ..., "metrics": ...} from `dvc exp show --json`
    (baselines such as the workspace and the branch are left out)."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "metrics": data.get("metrics", {}).get("dvclive/metrics.json", {}).get("data", {}),
            }
    return found


def title(spec: dict) -> str:
    """A vega-lite spec's title text ('' when it has none)."""
    value = spec.get("title") or ""
    return value.get("text", "") if isinstance(value, dict) else str(value)


def exp_show_screen(root, sh, columns: int) -> list[str]:
    """What `dvc exp show` puts on a terminal `columns` wide: run in a pseudo-terminal, so it
    pages as for a user (DVC_PAGER=cat instead of less -S), each line cut at the width."""
    import os
    import re
    import subprocess

    env = {**os.environ, "COLUMNS": str(columns), "DVC_PAGER": "cat", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["script", "-qec", "dvc exp show", "/dev/null"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out)
    return [line[:columns] for line in plain.splitlines()]


def test_experiment_workflow(repo, tmp_path):
    root, sh = repo
    sh("dvc", "repro")
    before = {p.name for p in (root / "logs/tensorboard").iterdir()}

    # aspect-ratio buckets are one switch: validate (it reports them) onward reruns; the
    # later experiments inherit them, so the SDXL one below trains on buckets too
    out = sh("dvc", "exp", "run", "-S", "lora.rank=16", "-S", "preprocess.buckets=true",
             "-n", "rank16")
    assert ran(out) == ["params", "validate", "preprocess", "encode", "train", "sample"]
    assert "train: 3 buckets (training images per size): 80x48:" in out
    # lora.name "": the WebUI file is named after the experiment, so two LoRAs never clash
    assert sorted(p.name for p in (root / "models/lora").iterdir()) == [
        "pytorch_lora_weights.safetensors", "rank16.safetensors"]
    out = sh("dvc", "exp", "run", "-S", "sample.steps=6", "-n", "steps6")
    assert ran(out) == ["params", "sample"]
    sh("dvc", "exp", "run", "--queue", "-S", "lora.rank=4,8", "-S", "train.learning_rate=1e-3",
       "-S", "train.max_steps=20")
    # two workers: the two runs side by side. Each train process takes its share of the
    # cores (train.cpu_threads 0, lorapipe.core.threads); with torch's default, a thread per core
    # in each, the two oversubscribed the 2 cores and ran 10-40x slower here
    sh("dvc", "queue", "start", "-j", "2", spawns=True)
    # wait for both tasks' final states: "neither Queued nor Running" also holds for a moment
    # while a worker takes a task off the queue, so it cannot be the end condition
    deadline = time.time() + 600
    while True:
        status = sh("dvc", "queue", "status")
        done = [line for line in status.splitlines() if re.search(r"\b(Success|Failed)\b", line)]
        if len(done) == 2:
            break
        assert time.time() < deadline, status
        time.sleep(3)
    assert "Failed" not in status, status

    # another model family is one params change (the data stages stay cached); with a bad
    # learning rate: the verdict shows in dvc exp show and reports/health.md
    out = sh("dvc", "exp", "run", "-S", "model.base=builtin:tiny-sdxl", "-S",
             "train.learning_rate=1e-6", "-S", "train.max_steps=60", "-n", "lrtiny")
    # validate reads model.base for task_type llm (token lengths) and reruns, in a second;
    # its outputs are unchanged for images, so preprocess does not
    assert ran(out) == ["params", "validate", "encode", "train", "sample"]
    assert "train: sdxl base builtin:tiny-sdxl;" in out and "train: 3 buckets" in out
    [verdict_line] = [line for line in out.splitlines() if line.startswith("train: health:")]
    assert verdict_line.endswith("try: dvc exp run -S train.learning_rate=0.0001")
    assert (root / "reports/health.md").read_text().startswith(
        "# Training health: not_learning")

    # Flux.1 likewise: a transformer trained by flow matching, on the same buckets (rank 16
    # at alpha 4 from rank16 above: a LoRA scale of 0.25, so a higher learning rate)
    out = sh("dvc", "exp", "run", "-S", "model.base=builtin:tiny-flux", "-S",
             "train.learning_rate=5e-3", "-n", "flux")
    assert ran(out) == ["params", "validate", "encode", "train", "sample"]
    assert "train: flux base builtin:tiny-flux;" in out and "train: 3 buckets" in out

    # and SD3, Chroma and Qwen-Image, a family module each (shorter runs: the suite's time)
    for family in ("sd3", "chroma", "qwen-image"):
        out = sh("dvc", "exp", "run", "-S", f"model.base=builtin:tiny-{family}", "-S",
                 "train.learning_rate=5e-3", "-S", "train.max_steps=100", "-S",
                 "sample.steps=4", "-n", family)
        assert ran(out) == ["params", "validate", "encode", "train", "sample"]
        assert f"train: {family} base builtin:tiny-{family};" in out

    exps = experiments(json.loads(sh("dvc", "exp", "show", "--json")))
    assert exps["sd3"]["metrics"]["model"]["family"] == "sd3"
    assert exps["chroma"]["metrics"]["model"]["family"] == "chroma"
    assert exps["qwen-image"]["metrics"]["model"]["family"] == "qwen-image"
    assert exps["flux"]["metrics"]["model"]["family"] == "flux"
    assert exps["lrtiny"]["metrics"]["model"]["family"] == "sdxl"
    assert exps["rank16"]["metrics"]["model"]["family"] == "sd"
    assert exps["rank16"]["params"]["lora"]["rank"] == 16
    # the plain `dvc exp show` as a 120-column terminal shows it (its pager chops the rest):
    # the verdict and both fixed-noise losses, with values, for every experiment
    screen = exp_show_screen(root, sh, columns=120)
    header = next(line for line in screen if "Experiment" in line)
    for column in ("health.status", "loss.train", "loss.val", "gain", "best_step"):
        assert column in header, header
    for name, exp in exps.items():
        [row] = [line for line in screen if f"[{name}]" in line]
        cells = row.split()
        assert exp["metrics"]["health"]["status"] in cells, row
        for value in exp["metrics"]["loss"].values():
            assert f"{value:.5g}" in cells, (name, row)  # DVC shows 5 significant digits
    assert exps["steps6"]["params"]["sample"]["steps"] == 6
    assert sorted(e["params"]["lora"]["rank"] for e in exps.values()) == [4, 8] + [16] * 7
    # rank16, steps6, 2 queued, lrtiny (SDXL), flux, sd3, chroma, qwen-image
    for name, exp in exps.items():
        assert exp["metrics"]["final_average_loss"] > 0, name
        expected = "not_learning" if name == "lrtiny" else "healthy"
        assert exp["metrics"]["health"]["status"] == expected, name

    # TensorBoard: every run side by side, none lost
    runs = {p.name for p in (root / "logs/tensorboard").iterdir()}
    assert "rank16" in runs and before <= runs
    # the sample stage's run is named after its training run (steps6 resampled rank16's LoRA)
    assert (root / "logs/sample/rank16").is_dir() and (root / "logs/sample/rank16/steps6").is_dir()

    # plots diff between two experiments: both loss curves in one HTML page
    queued = next(n for n, e in exps.items() if e["params"]["lora"]["rank"] == 4)
    sh("dvc", "plots", "diff", "rank16", queued, "-o", str(tmp_path / "diff"))
    html = (tmp_path / "diff/index.html").read_text()
    assert "rank16" in html and queued in html and "step_average.tsv::step_average" in html

    # applying an experiment brings back its own event files (and not later ones)
    sh("dvc", "exp", "apply", "rank16")
    assert "rank16" in {p.name for p in (root / "logs/tensorboard").iterdir()}
    assert not (root / "logs/sample/rank16/steps6").exists()


def test_params_typo_and_a_data_folder_with_spaces(tmp_path):
    """A key no stage reads is still checked, before any other stage runs; a data folder
    whose name has a space works (every interpolated path is quoted)."""
    root, sh = git_copy(tmp_path / "repo")
    with open(root / "params.yaml", "a", encoding="utf-8") as f:
        f.write("trian:\n  seed: 1\n")
    out = sh("dvc", "repro", check=False)
    assert "unknown section trian; did you mean train?" in out
    assert ran(out) == ["params"] and not (root / "reports/usable.csv").exists()
    sh("git", "checkout", "params.yaml")

    shutil.copytree(root / "data/example", root / "data/my photos")
    set_param(root, "data.dir", '"data/my photos"')
    out = sh("dvc", "repro", "preprocess")
    assert ran(out) == ["params", "validate", "preprocess"]
    assert len(list((root / "data/processed").glob("*.png"))) == 20


def test_fresh_clone_runs_one_stage_as_an_experiment(tmp_path):
    """`dvc exp run train` on a clone with no outputs trains and records the experiment
    (a committed dvc.lock naming outputs the clone lacked made it fail); a plain
    `dvc exp run` then runs what is left."""
    root, sh = git_copy(tmp_path / "repo")
    out = sh("dvc", "exp", "run", "train", "-n", "only-train")
    assert ran(out) == ["params", "validate", "preprocess", "encode", "train"]
    assert not (root / "samples").exists()
    out = sh("dvc", "exp", "run", "-n", "all")
    assert ran(out) == ["sample"]
    exps = experiments(json.loads(sh("dvc", "exp", "show", "--json")))
    assert {"only-train", "all"} <= set(exps)
    assert exps["only-train"]["metrics"]["health"]["status"] == "healthy"
