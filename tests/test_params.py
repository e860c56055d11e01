"""The params.yaml schema: every kind of mistake is refused with the key's name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from lorapipe.core.params import ParamsError, all_keys
from lorapipe.tasks import load_params


def write(tmp_path, mutate) -> object:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(tmp_path)
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def error_for(tmp_path, mutate) -> str:
    with pytest.raises(ParamsError) as exc:
        load_params(write(tmp_path, mutate))
    return str(exc.value)


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.preprocess.resolution % 8 == 0
    assert params.validate.on_error in ("fail", "skip")


def test_every_key_has_a_comment_in_params_yaml():
    lines = (REPO / "params.yaml").read_text().splitlines()
    for dotted in all_keys():
        at = -1
        for depth, part in enumerate(dotted.split(".")):
            prefix = "  " * depth + f"{part}:"
            at = next(i for i in range(at + 1, len(lines)) if lines[i].startswith(prefix))
            assert lines[at - 1].strip().startswith("#"), f"{dotted}: {part} has no comment"


def test_unknown_key(tmp_path):
    msg = error_for(tmp_path, lambda p: p["lora"].update(rnak=8))
    assert "unknown key lora.rnak; did you mean lora.rank?" in msg


def test_unknown_section(tmp_path):
    msg = error_for(tmp_path, lambda p: p.update(lroa={"rank": 4}))
    assert "unknown section lroa; did you mean lora?" in msg


def test_wrong_type(tmp_path):
    msg = error_for(tmp_path, lambda p: p["lora"].update(rank="four"))
    assert "lora.rank must be an integer, got str 'four'" in msg


def test_bool_is_not_a_number(tmp_path):
    msg = error_for(tmp_path, lambda p: p["preprocess"].update(workers=True))
    assert "preprocess.workers must be an integer" in msg


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("lora", "rank", 0, "lora.rank must be at least 1, got 0"),
        ("lora", "rank", -4, "lora.rank must be at least 1"),
        ("preprocess", "resolution", 60, "preprocess.resolution must be a multiple of 8, got 60"),
        ("train", "learning_rate", -1e-4, "train.learning_rate must be greater than 0"),
        # the README says learning rates <= 0 are refused: 0 trains nothing for 300 steps
        ("train", "learning_rate", 0, "train.learning_rate must be greater than 0, got 0.0"),
        ("validate", "on_error", "skpi", "validate.on_error must be one of fail, skip, got 'skpi'"),
    ],
)
def test_out_of_range(tmp_path, section, key, value, expected):
    msg = error_for(tmp_path, lambda p: p[section].update({key: value}))
    assert expected in msg


def test_missing_path(tmp_path):
    msg = error_for(tmp_path, lambda p: p["data"].update(dir="no/such/folder"))
    assert "data.dir: path 'no/such/folder' does not exist" in msg


def test_model_path_or_builtin(tmp_path):
    msg = error_for(tmp_path, lambda p: p["model"].update(base="models/sd15.safetensors"))
    assert "model.base: path 'models/sd15.safetensors' does not exist" in msg
    msg = error_for(tmp_path, lambda p: p["model"].update(base="builtin:huge-sd"))
    assert "unknown builtin model 'builtin:huge-sd'" in msg


def test_missing_key_and_section(tmp_path):
    msg = error_for(tmp_path, lambda p: (p["lora"].pop("alpha"), p.pop("train")))
    assert "missing key lora.alpha" in msg
    assert "missing section train" in msg


def test_all_problems_reported_at_once(tmp_path):
    msg = error_for(tmp_path, lambda p: (p["lora"].update(rank=0, rnak=1),
                                         p["preprocess"].update(resolution=63)))
    assert re.search(r"has 3 problem", msg)


def test_exponent_without_dot_is_a_float(tmp_path):
    path = write(tmp_path, lambda p: None)
    text = re.sub(r"learning_rate: .*", "learning_rate: 3e-4", path.read_text())
    path.write_text(text)
    assert "3e-4" in text
    assert load_params(path).train.learning_rate == pytest.approx(3e-4)


def test_cross_key_rules_are_reported_beside_key_problems(tmp_path):
    """A typo elsewhere in the file used to hide the rules across keys until it was fixed."""
    msg = error_for(tmp_path, lambda p: (p.update(trian={"seed": 1}),
                                         p["train"].update(max_steps=0, epochs=0)))
    assert "unknown section trian; did you mean train?" in msg
    assert "train.max_steps and train.epochs are both 0" in msg
    assert re.search(r"has 2 problem", msg)


@pytest.mark.parametrize("name, expected", [
    ("sd15.ckpt", "is a pickle checkpoint (.ckpt), which can run code"),
    ("sd15.bin", "is a pickle checkpoint (.bin)"),
    ("sd15.gguf", "is not a .safetensors checkpoint or a diffusers folder"),
    ("weights", "is a folder but not a diffusers model (no model_index.json)"),
])
def test_model_base_format_is_checked_with_the_params(tmp_path, name, expected):
    """Found by the params check in a second, not by the encode stage after its imports."""
    if name == "weights":
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(b"not even read")
    msg = error_for(tmp_path, lambda p: p["model"].update(base=str(tmp_path / name)))
    assert f"model.base: '{tmp_path / name}' {expected}" in msg


@pytest.mark.parametrize("name", ["my/style", ".hidden", "a b"])
def test_lora_name_must_be_a_plain_file_name(tmp_path, name):
    msg = error_for(tmp_path, lambda p: p["lora"].update(name=name))
    assert f"lora.name {name!r} must be a plain file name" in msg


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lora:\n  rank: [4\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_stage_exits_cleanly_on_bad_params(tmp_path, dataset):
    """A stage started with a broken params.yaml names the key and shows no traceback."""
    write(tmp_path, lambda p: p["validate"].update(min_sid=64))
    result = subprocess.run(
        [sys.executable, "-m", "stages.validate", "--images", str(dataset),
         "--report", "r.json", "--usable", "u.csv"],
        cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "unknown key validate.min_sid; did you mean validate.min_side?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_params_stage_refuses_a_key_no_stage_reads(tmp_path):
    """`trian:` is read by no stage, so only the params stage, which depends on the whole
    file, can catch it; it exits 1 with the problem and writes nothing."""
    path = write(tmp_path, lambda p: p.update(trian={"seed": 1}))
    result = subprocess.run(
        [sys.executable, "-m", "stages.params", "--params", str(path), "--out", "ok.txt"],
        cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert "unknown section trian; did you mean train?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ok.txt").exists()


def test_yaml_1_2_scalars_as_dvc_writes_them(tmp_path):
    """`dvc exp run -S` writes `no` unquoted; it must stay the string 'no'."""
    path = write(tmp_path, lambda p: None)
    text = re.sub(r"mixed_precision: .*", "mixed_precision: no", path.read_text())
    text = re.sub(r"gradient_checkpointing: .*", "gradient_checkpointing: true", text)
    path.write_text(text)
    params = load_params(path)
    assert params.train.mixed_precision == "no"
    assert params.train.gradient_checkpointing is True


def test_nested_keys(tmp_path):
    msg = error_for(tmp_path, lambda p: p["train"]["validation"].update(splt=0.1))
    assert "unknown key train.validation.splt; did you mean train.validation.split?" in msg
    msg = error_for(tmp_path, lambda p: p["train"]["validation"].update(timesteps=[100, -5]))
    assert "train.validation.timesteps must be a list of integers >= 0" in msg
    msg = error_for(tmp_path, lambda p: p["train"].pop("early_stop"))
    assert "missing section train.early_stop" in msg
    msg = error_for(tmp_path, lambda p: (p["train"]["validation"].update(split=0),
                                         p["train"]["early_stop"].update(patience=3)))
    assert "train.early_stop.patience needs a validation set" in msg


def test_device_list(tmp_path):
    params = load_params(write(tmp_path, lambda p: p["train"].update(devices=[1, 3])))
    assert params.train.devices == [1, 3]
    msg = error_for(tmp_path, lambda p: p["train"].update(devices="1"))
    assert "train.devices must be a list of integers >= 0" in msg


def test_bucket_range_is_checked_only_with_buckets_on(tmp_path):
    write(tmp_path, lambda p: p["preprocess"].update(resolution=512))  # squares: fine
    msg = error_for(tmp_path, lambda p: p["preprocess"].update(
        resolution=512, buckets=True, min_side=40))
    assert "preprocess.min_side 40 <= preprocess.resolution 512 <= preprocess.max_side 128" \
        in msg and "preprocess.min_side 40 is not a multiple of preprocess.bucket_step 16" in msg


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["model"].update(prediction_type="epsilon", noise_schedule="zero_terminal_snr"),
     "model.noise_schedule zero_terminal_snr needs v-prediction"),
    (lambda p: p["model"].update(base="builtin:tiny-flux", prediction_type="v_prediction"),
     "model.prediction_type is v_prediction but Flux.1 bases are trained by flow matching"),
    (lambda p: (p.update(task_type="llm"), p["model"].update(base="builtin:tiny-llm",
                                                             noise_schedule="zero_terminal_snr")),
     "model.noise_schedule is for task_type sd"),
    (lambda p: (p["model"].update(base="builtin:tiny-sd3"), p["train"].update(noise_offset=0.05)),
     "train.noise_offset is 0.05 but SD3 bases are trained by flow matching"),
    (lambda p: p["model"].update(prediction_type="v-pred"),
     "model.prediction_type must be one of auto, epsilon, v_prediction, got 'v-pred'"),
])
def test_ddpm_keys_are_refused_where_they_cannot_apply(
        tmp_path, edit, expected):
    assert expected in error_for(tmp_path, edit)
