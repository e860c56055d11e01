"""Reading the loss deeper: the gains over the base, the per-timestep curves, the
per-example losses and their outliers, on real runs of the builtin models."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import LLM, LLM_EXAMPLE, llm_encoded, run_dirs, train_in
from lorapipe.diffusion.cache import load_cache, save_cache


def tsv(root: Path, name: str) -> dict[int, float]:
    path = root / "dvclive/plots/metrics" / f"{name}.tsv"
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    return {int(r["step"]): float(r[name.rsplit("/", 1)[-1]]) for r in rows}


def examples_csv(root: Path) -> list[dict]:
    return list(csv.DictReader((root / "examples.csv").open()))


def outliers(root: Path) -> list[dict]:
    return [r for r in examples_csv(root) if r["outlier"]]


SD_RUN = {"train__max_steps": 150, "train__validation__every": 25}


@pytest.fixture(scope="module")
def clean_sd(tmp_path_factory, example_cache):
    root = tmp_path_factory.mktemp("clean-sd")
    result = train_in(root, example_cache, root / "health.md", **SD_RUN)
    return root, result


def test_gains_are_logged_against_the_base_and_shown_in_exp_show(clean_sd):
    root, result = clean_sd
    fixed, val = tsv(root, "loss/train/fixed"), tsv(root, "loss/validation/step_average")
    gain_train, gain_val = tsv(root, "improvement/train"), tsv(root, "improvement/validation")
    assert sorted(gain_train) == sorted(fixed) == [0, 25, 50, 75, 100, 125, 150]
    for step in fixed:  # 1 - loss / the base's loss (step 0: the LoRA is still a no-op)
        assert gain_train[step] == pytest.approx(1 - fixed[step] / fixed[0])
        assert gain_val[step] == pytest.approx(1 - val[step] / val[0])
    assert gain_train[0] == 0 and gain_train[150] > 0.1
    metrics = json.loads((root / "dvclive/metrics.json").read_text())
    # dvc exp show's columns: the held-out gain right after the losses, then best_step, then
    # the training gain
    keys = list(metrics)
    assert keys[keys.index("loss"):keys.index("loss") + 4] == [
        "loss", "gain", "best_step", "gain_train"]
    assert metrics["gain"] == round(gain_val[150], 4)
    assert metrics["gain_train"] == round(gain_train[150], 4)
    report = (root / "health.md").read_text()
    assert (f"the LoRA lowers the fixed training loss by {gain_train[150]:.0%} against the "
            "base (step 150)") in report
    assert f"lowers the held-out loss by {gain_val[150]:.0%}" in report


def test_per_timestep_curves_in_tensorboard_and_dvc_plots(clean_sd):
    root, _ = clean_sd
    events = EventAccumulator(str(next((root / "logs/tensorboard").iterdir())))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    timesteps = (100, 300, 500, 700, 900)
    for t in timesteps:
        assert {f"loss/validation/step_average/t{t:04d}", f"loss/train/fixed/t{t:04d}",
                f"improvement/validation/t{t:04d}", f"improvement/train/t{t:04d}"} <= tags
    # the band losses average to the fixed loss they break down
    val = {e.step: e.value for e in events.Scalars("loss/validation/step_average")}
    bands = [{e.step: e.value for e in events.Scalars(f"loss/validation/step_average/t{t:04d}")}
             for t in timesteps]
    assert sum(b[150] for b in bands) / 5 == pytest.approx(val[150], rel=1e-5)
    # the running best marks the best step in TensorBoard's overlay chart
    best = [e.value for e in events.Scalars("loss/validation/best")]
    assert best == [min(list(val.values())[:i + 1]) for i in range(len(best))]
    # dvc plots: one chart, a line per timestep (dvc.yaml: improvement.json), not a file each
    rows = json.loads((root / "dvclive/plots/custom/improvement.json").read_text())
    assert {r["part"] for r in rows} == {f"t={t}" for t in timesteps}
    assert len(rows) == 5 * 7
    last = {r["part"]: r["improvement"] for r in rows if r["step"] == 150}
    improvement = {e.step: e.value for e in events.Scalars("improvement/validation/t0100")}
    assert last["t=100"] == pytest.approx(improvement[150])
    assert not list((root / "dvclive/plots/metrics").rglob("t0100.tsv"))
    assert not (root / "dvclive/plots/metrics/loss/validation/best.tsv").exists()


def test_a_clean_image_set_names_no_outlier(clean_sd):
    root, _ = clean_sd
    rows = examples_csv(root)
    assert [r["set"] for r in rows] == ["train"] * 8 + ["validation"] * 4
    assert not outliers(root)
    first = rows[0]  # the least improved training image, with its file and caption
    assert first["rank"] == "1" and first["example"].endswith(".png") and "lpstyle" in first["text"]
    assert float(first["improvement"]) == pytest.approx(
        1 - float(first["final_loss"]) / float(first["base_loss"]), abs=1e-4)
    report = (root / "health.md").read_text()
    assert "training set: 8 images, median improvement over the base" in report
    assert "no outliers" in report


def planted_cache(cache: Path, out: Path, position: int, how) -> tuple[Path, str]:
    """A copy of the cache with one image's latents replaced by `how(latents)`."""
    loaded = load_cache(cache)
    shutil.rmtree(out, ignore_errors=True)
    for key, (size, row) in enumerate(loaded.latents.where):
        if key == position:
            loaded.latents.buckets[size][row] = how(loaded.latents.buckets[size][row])
    save_cache(loaded, out, loaded.meta["base"])
    return out, loaded.meta["sources"][position]


def test_an_image_unlike_the_rest_is_named_as_an_outlier(tmp_path, example_cache):
    # the image at index 5 is a training image in the fixed subset (the held-out four are
    # 02, 07, 11 and 14); the tiny random VAE maps even a noise picture to latents like a
    # shape's, so the unlike image is planted where the denoiser sees it: in the latents
    gen = torch.Generator().manual_seed(0)
    cache, name = planted_cache(example_cache, tmp_path / "cache", 5,
                                lambda z: 5 * torch.randn(z.shape, generator=gen))
    train_in(tmp_path, cache, tmp_path / "health.md", **SD_RUN)
    odd = outliers(tmp_path)
    assert [(r["set"], r["example"], r["text"]) for r in odd] == [
        ("train", name, "a red square, lpstyle")], examples_csv(tmp_path)
    report = (tmp_path / "health.md").read_text()
    assert f"`{name}` (\"a red square, lpstyle\")" in report
    assert "open the image and read its caption" in report


def llm_data(folder: Path, change: dict[int, str] | None = None) -> Path:
    """The LLM example set in one shape (its plain-text lines, a format of their own that
    trains on the question too, left out), with the answers of `change` replaced."""
    lines = [line for line in (LLM_EXAMPLE / "data.jsonl").read_text().splitlines()
             if '"text"' not in line]
    for i, answer in (change or {}).items():
        body = json.loads(lines[i])
        body["response"] = answer
        lines[i] = json.dumps(body)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder


LLM_RUN = {**LLM, "train__max_steps": 150, "train__validation__every": 25}


def test_llm_clean_set_names_none_and_a_contradicting_answer_is_named(tmp_path):
    clean, planted = run_dirs(tmp_path, "clean", "planted")
    folder = llm_data(clean / "data")
    train_in(clean, llm_encoded(folder, clean / "cache"), clean / "health.md",
             **{**LLM_RUN, "data__dir": str(folder)})
    assert not outliers(clean), examples_csv(clean)
    # line 1 ("What is zero plus one?") answered against every other example's pattern
    folder = llm_data(planted / "data", {0: "No. Bananas are purple and the moon is cheese."})
    train_in(planted, llm_encoded(folder, planted / "cache"), planted / "health.md",
             **{**LLM_RUN, "data__dir": str(folder)})
    odd = outliers(planted)
    assert [(r["set"], r["example"], r["text"]) for r in odd] == [
        ("train", "line 1", "What is zero plus one?")], examples_csv(planted)
    report = (planted / "health.md").read_text()
    assert "`line 1` (\"What is zero plus one?\")" in report
    assert "does its answer contradict the other examples'" in report


def test_the_breakdown_does_not_change_the_training(tmp_path, example_cache):
    on, off = run_dirs(tmp_path, "on", "off")
    train_in(on, example_cache, lora__dropout=0.1, train__max_steps=20)
    train_in(off, example_cache, lora__dropout=0.1, train__max_steps=20,
             train__validation__breakdown=False)
    a = load_file(str(on / "lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(off / "lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tsv(on, "loss/train/fixed") == pytest.approx(tsv(off, "loss/train/fixed"), rel=1e-12)
    # without the breakdown the chart has the two sets' gains
    assert {r["part"] for r in json.loads(
        (off / "dvclive/plots/custom/improvement.json").read_text())} == {"training",
                                                                           "validation"}
    assert [r["set"] for r in examples_csv(on)] == ["train"] * 8 + ["validation"] * 4
    assert examples_csv(off) == []


def test_after_lora_init_the_gains_are_against_the_base_not_the_init(tmp_path, example_cache):
    first, second = run_dirs(tmp_path, "first", "second")
    train_in(first, example_cache, train__max_steps=40)
    train_in(second, example_cache, train__max_steps=10,
             lora__init=str(first / "lora/pytorch_lora_weights.safetensors"))
    # step 0 already has the first run's LoRA: lower than the base, so a gain above 0
    start = tsv(second, "improvement/train")[0]
    end_first = tsv(first, "improvement/train")[40]
    assert start == pytest.approx(end_first, rel=1e-5) and start > 0.01


@pytest.mark.parametrize("gains, named", [
    ([0.30, 0.31, 0.29, 0.32, 0.30, 0.31, 0.30, 0.29], []),  # alike: none
    ([0.30, 0.31, 0.29, 0.32, 0.30, 0.31, 0.30, 0.05], [7]),  # one learned far less
    ([0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.28], []),  # no spread, a small shortfall
    ([0.30, 0.31, 0.29, 0.32, 0.05], [4]),  # 5 examples are enough to call one
    ([0.31, 0.29, 0.32, 0.05], []),  # 4: too few to call
    ([-0.02, -0.01, 0.0, -0.03, -0.02, -0.5], []),  # a set that learned nothing has none
])
def test_the_outlier_rule(gains, named):
    from lorapipe.core.examples import outliers
    from lorapipe.tasks import load_params

    t = load_params(Path(__file__).parents[1] / "params.yaml").health
    base = [1.0] * len(gains)
    why = outliers(base, [1 - g for g in gains], t)
    assert [i for i, w in enumerate(why) if w] == named


def test_a_loss_far_above_the_rest_is_named():
    from lorapipe.core.examples import outliers
    from lorapipe.tasks import load_params

    t = load_params(Path(__file__).parents[1] / "params.yaml").health
    # every example improved alike, but one stays at 4x the others' loss
    base, final = [1.0] * 5 + [4.0], [0.7] * 5 + [2.8]
    why = outliers(base, final, t)
    assert [bool(w) for w in why] == [False] * 5 + [True] and "4.0x" in why[5]
