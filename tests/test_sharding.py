"""train.fsdp: the frozen base sharded across 2 CPU processes (gloo, torch's FSDP2) trains as
one process does at the same global batch (image and LLM task, text-encoder LoRA and sample
images included), saves one LoRA that loads, resumes to the same bytes, and what it cannot
run is refused before anything starts."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TEXT, losses

from conftest import REPO, SAME_DATA_DIR, make_params, run_dirs
from lorapipe.core.params import ParamsError

SHARDED = {"train__num_processes": 2, "train__batch_size": 2, "train__fsdp": True}
HEADER = re.compile(r"frozen base sharded over 2 processes \(train\.fsdp: FSDP2, (\d+) units\)")


def validation(root) -> dict:
    metrics = json.loads((root / "dvclive/metrics.json").read_text())
    return {k: v for k, v in metrics["loss"].items() if k in ("validation", "train")}


def test_a_sharded_image_base_trains_as_one_process_does_and_resumes(tmp_path, example_cache):
    """The UNet and the text encoder (it has a LoRA, on changed captions) sharded;
    evaluations and sample images are collective forwards, run on both processes, logged
    once; a SIGKILLed sharded run resumes to the bytes of the uninterrupted one."""
    from test_resume import FILES, kill_after_checkpoint, run_to_end, setup

    common = {"train__max_steps": 12, "train__sample_every": 12, "train__checkpoint_every": 8,
              "train__validation__every": 4, **TEXT}
    sharded = setup(tmp_path / "sharded", **common, **SHARDED)
    single = setup(tmp_path / "single", **common, train__num_processes=1,
                   train__batch_size=4)
    out = run_to_end(sharded, example_cache)
    run_to_end(single, example_cache)
    units = HEADER.search(out)
    # every UNet block and CLIP layer a unit of its own, and the two roots
    assert units and int(units.group(1)) > 2, out
    assert "train: compatibility: the saved files load as" in out, out  # reloaded after saving

    assert losses(sharded) == pytest.approx(losses(single), abs=1e-5)
    a = load_file(sharded / "lora/pytorch_lora_weights.safetensors")
    b = load_file(single / "lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5)
    fixed_a, fixed_b = validation(sharded), validation(single)
    assert fixed_a.keys() == fixed_b.keys() and fixed_a
    assert all(fixed_a[k] == pytest.approx(fixed_b[k], abs=1e-5) for k in fixed_a)
    # sample images logged once, at steps 0 and 12
    images = sorted(p.name for p in (sharded / "dvclive/plots/images").rglob("*.png"))
    assert len(images) == 2 and images == \
        sorted(p.name for p in (single / "dvclive/plots/images").rglob("*.png"))
    assert (sharded / "logs/train.log").read_text().count("step 12/12") == 1

    killed = setup(tmp_path / "killed", **common, **SHARDED)
    kill_after_checkpoint(killed, example_cache, step=8)
    out = run_to_end(killed, example_cache)
    assert "resumed from" in out and HEADER.search(out), out
    for name in FILES:
        assert (killed / name).read_bytes() == (sharded / name).read_bytes(), name


SHARDED_SDXL_TEXT = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from lorapipe.core import sharding
from lorapipe.diffusion.families import by_name
pipe = by_name("sdxl").build_builtin()
ids = torch.arange(77)[None] % 50
for name in ("text_encoder", "text_encoder_2"):
    encoder = getattr(pipe, name).eval()
    with torch.no_grad():
        plain = encoder(ids, output_hidden_states=True).hidden_states[-2]
        sharding.shard({name: encoder}, [], torch.device("cpu"), 1)
        states = encoder(ids, output_hidden_states=True).hidden_states
    assert states is not None, name
    torch.testing.assert_close(states[-2], plain, rtol=0, atol=0)
    print(name, type(encoder).__name__)
"""


def test_sharded_text_encoders_still_return_their_hidden_states():
    """SDXL conditions on CLIP's penultimate layer (output_hidden_states): transformers
    finds what a model records by its class's name, which sharding changes."""
    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-c", SHARDED_SDXL_TEXT], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PORT": str(port),
                                                         "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert "text_encoder FSDPCLIPTextModel" in result.stdout, result.stdout


def test_a_sharded_llm_trains_as_one_process_does(tmp_path, llm_cache):
    from test_llm import ADAPTER, LLM, finish, stage

    sharded, single = run_dirs(tmp_path, "sharded", "single")
    common = {**LLM, "train__max_steps": 8, "train__validation__every": 4,
              "train__sample_every": 8, "train__grad_accum": 2}
    make_params(sharded, **common, **SHARDED)
    make_params(single, **common, train__num_processes=1, train__batch_size=4)
    out = finish(stage(sharded, llm_cache))
    finish(stage(single, llm_cache))
    assert HEADER.search(out) and "x 2 process(es) = global batch 8" in out, out
    a, b = (load_file(str(root / "lora" / ADAPTER)) for root in (sharded, single))
    assert a.keys() == b.keys()
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5)
    assert losses(sharded) == pytest.approx(losses(single), abs=1e-5)
    assert validation(sharded) == pytest.approx(validation(single), abs=1e-5)
    # the generated samples (collective forwards of the sharded model): the same answers
    for name in ("step_000000.md", "step_000008.md"):
        assert (sharded / "dvclive/samples" / name).read_text() == \
            (single / "dvclive/samples" / name).read_text()


@pytest.mark.parametrize("overrides, says", [
    ({"train__fsdp": True}, "train.fsdp shards the base across processes, and "
                            "train.num_processes is 1"),
    ({**SHARDED, "model__quantize": "nf4"}, "train.fsdp cannot shard a model.quantize nf4 base"),
])
def test_params_refuse_what_fsdp_cannot_shard(tmp_path, overrides, says):
    with pytest.raises(ParamsError) as exc:
        make_params(tmp_path, **{**SAME_DATA_DIR, **overrides})
    assert says in str(exc.value)


def test_an_accelerate_config_with_accelerates_fsdp_is_refused(tmp_path, example_cache):
    """On CPU processes accelerate would quietly run plain data parallel instead."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\n"
                      "num_processes: 2\nfsdp_config:\n  fsdp_version: 2\n")
    make_params(tmp_path, train__accelerate_config=str(config), train__num_processes=2)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--cache", str(example_cache), "--out", "lora",
         "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health",
         "health.md"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0, result
    assert "turns on accelerate's FSDP" in result.stderr and "set train.fsdp: true" in \
        result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "lora").exists()
