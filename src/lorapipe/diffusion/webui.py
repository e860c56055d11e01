"""The WebUI file's name and metadata, as kohya's sd-scripts write them.

AUTOMATIC1111/Forge, ComfyUI and kohya's tools read a LoRA's training record from the
safetensors metadata: the `ss_*` fields (kohya's, shown by A1111's metadata view; A1111 uses
`ss_output_name` as the LoRA's alias and tells SD versions apart by
`ss_base_model_version` and `ss_v2 == "True"`), the `sshs_*` hashes the additional-networks
extension checks, and the Stability AI model spec (`modelspec.*`). Values are strings, written
the way kohya writes them: Python's `str()` for numbers and booleans ("True"/"False"), JSON for
dicts.

Nothing here reads the clock: training times and the model-spec date come from
SOURCE_DATE_EPOCH when it is set (as reproducible builds do) and are left out otherwise, so
identical runs write identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from datetime import datetime, timezone

import torch
from safetensors.torch import save as safetensors_bytes

DEFAULT_NAME = "lorapipe"
def output_name(configured: str) -> str:
    """lora.name, else the DVC experiment's name, else 'lorapipe'."""
    return configured or os.environ.get("DVC_EXP_NAME") or DEFAULT_NAME


def file_name(name: str) -> str:
    return f"{name}.safetensors"


def tag_frequency(captions: list[str], dirs: list[str]) -> dict[str, dict[str, int]]:
    """How often each comma-separated tag occurs in the training captions, per dataset
    folder (kohya's ss_tag_frequency, which A1111 shows as the LoRA's training tags and
    suggests activation text from)."""
    out: dict[str, Counter] = {}
    for caption, folder in zip(captions, dirs, strict=True):
        out.setdefault(folder, Counter()).update(
            tag.strip() for tag in caption.split(",") if tag.strip())
    return {folder: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            for folder, counts in sorted(out.items())}


# ss_optimizer as kohya writes it (the optimizer class's module path)
OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                   "prodigy": "prodigyopt.Prodigy",
                   "adafactor": "transformers.optimization.Adafactor",
                   "schedulefree": "schedulefree.AdamWScheduleFree"}
LYCORIS_MODULE = "lycoris.kohya"  # kohya's --network_module for LyCORIS's methods


def network_args(lp) -> dict[str, str]:
    """lora.targets and lora.method in kohya's network_args vocabulary (strings, as
    `--network_args k=v` gives them): `kohya` is networks.lora's default and needs none;
    `attn` leaves out what kohya's default also wraps; a list of UNet names is kept under
    lorapipe's own key. LoCon adds conv_dim/conv_alpha; LyCORIS's methods their `algo`
    (DoRA: LyCORIS's LoRA with dora_wd), as lycoris.kohya reads them."""
    if lp.targets == "kohya":
        out = {}
    elif lp.targets == "attn":
        out = {"exclude_patterns": r"['.*(proj_in|proj_out|ff[._]net|mlp[._]fc).*']"}
    else:
        out = {"lorapipe_targets": ",".join(lp.targets)}
    if lp.conv_rank:
        out.update(conv_dim=str(lp.conv_rank), conv_alpha=f"{lp.conv_alpha:g}")
    if lp.method in ("loha", "lokr"):
        out["algo"] = lp.method
        if lp.method == "lokr":
            out.update(factor=str(lp.lokr_factor), decompose_both=str(lp.decompose_both))
    elif lp.method == "dora":
        out.update(algo="lora", dora_wd="True", wd_on_output="True")
    return out


def build_metadata(params, name: str, record) -> dict:
    """The ss_* and modelspec.* fields (values not yet strings) of a lora.Record; its
    resolution is (width, height), its step the one whose weights the file holds."""
    p, lp, cp = params.train, params.lora, params.train.captions
    base = record.base
    width, height = record.resolution
    images: dict[str, int] = Counter(record.dirs)
    meta = {
        "ss_output_name": name,
        "ss_network_module": (LYCORIS_MODULE if lp.method != "lora"
                              else base.get("network_module", "networks.lora")),
        "ss_network_dim": lp.rank, "ss_network_alpha": lp.alpha,
        "ss_network_dropout": lp.dropout,
        "ss_network_args": (record.network_args if record.network_args is not None
                            else network_args(lp)),
        "ss_network_train_unet_only": not lp.text_encoder,
        "ss_base_model_version": base["version"], "ss_v2": base["v2"],
        "ss_v_parameterization": base["v_pred"],
        "ss_zero_terminal_snr": base.get("zero_terminal_snr", False),
        "ss_sd_model_name": params.model.base,
        "ss_resolution": f"({width}, {height})", "ss_num_train_images": len(record.captions),
        "ss_tag_frequency": tag_frequency(record.captions, record.dirs),
        "ss_dataset_dirs": {folder: {"n_repeats": 1, "img_count": n}
                            for folder, n in sorted(images.items())},
        "ss_shuffle_caption": cp.shuffle, "ss_keep_tokens": cp.keep_tokens,
        "ss_caption_dropout_rate": cp.dropout, "ss_caption_tag_dropout_rate": cp.tag_dropout,
        "ss_max_train_steps": record.max_steps, "ss_steps": record.step,
        "ss_num_epochs": record.epochs,
        "ss_learning_rate": p.learning_rate, "ss_unet_lr": p.learning_rate,
        "ss_text_encoder_lr": p.text_encoder_lr if lp.text_encoder else 0,
        "ss_lr_scheduler": p.lr_scheduler,
        "ss_lr_warmup_steps": p.lr_warmup_steps, "ss_batch_size_per_device": p.batch_size,
        "ss_gradient_accumulation_steps": p.grad_accum, "ss_seed": p.seed,
        "ss_mixed_precision": p.mixed_precision,
        "ss_gradient_checkpointing": p.gradient_checkpointing,
        "ss_noise_offset": p.noise_offset, "ss_min_snr_gamma": p.min_snr_gamma,
        "ss_max_grad_norm": p.max_grad_norm, "ss_optimizer": OPTIMIZER_NAMES[p.optimizer],
        "ss_training_comment": "trained with lorapipe",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{base['architecture']}/lora",
        "modelspec.implementation": base.get("implementation", "diffusers"),
        "modelspec.title": name, "modelspec.resolution": f"{width}x{height}",
    }
    # SD's "epsilon" or "v"; a flow-matching base has none of the two (kohya writes none)
    prediction = base.get("prediction_type", "v" if base["v_pred"] else "epsilon")
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    layout = record.layout or {}
    meta["ss_enable_bucket"] = bool(layout.get("buckets"))
    if layout.get("buckets"):  # kohya's bucket fields: A1111 shows ss_bucket_info's counts
        meta.update({
            "ss_min_bucket_reso": layout["min_side"], "ss_max_bucket_reso": layout["max_side"],
            "ss_bucket_no_upscale": not layout["upscale"],
            "ss_bucket_info": {"buckets": {
                str(i): {"resolution": [int(x) for x in size.split("x")], "count": n}
                for i, (size, n) in enumerate((record.histogram or {}).items())}},
        })
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        seconds = int(epoch)
        meta["ss_training_started_at"] = float(seconds)
        meta["ss_training_finished_at"] = float(seconds)
        meta["modelspec.date"] = datetime.fromtimestamp(seconds, timezone.utc).isoformat()
    return meta


def as_strings(metadata: dict) -> dict[str, str]:
    """safetensors metadata must be strings: kohya writes str() of numbers and booleans
    (so "True", not JSON's "true": A1111 compares ss_v2 == "True") and JSON of dicts."""
    out = {}
    for key, value in metadata.items():
        out[key] = (json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list)
                    else str(value))
    return out


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash as kohya computes them for the additional-networks
    extension: over the file serialised with only the ss_* metadata, the SHA-256 of the
    tensor data after the header, and the first 8 hex digits of the SHA-256 of 64 KiB from
    offset 1 MiB (empty for a smaller file)."""
    data = safetensors_bytes(tensors, metadata={k: v for k, v in metadata.items()
                                                if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}
