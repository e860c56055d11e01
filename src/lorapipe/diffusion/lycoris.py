"""One adapted module's peft tensors under the names the WebUI loaders read: kohya's LoRA
(`lora_down`/`lora_up`/`alpha`) and LyCORIS's LoHa (`hada_w1_a`...), LoKr (`lokr_w1`...) and
DoRA (`dora_scale`), as A1111/Forge (extensions-builtin/Lora: network_lora.py,
network_hada.py, network_lokr.py), ComfyUI (comfy/weight_adapter/) and LyCORIS itself
(lycoris/modules/) rebuild them. peft's LoHa and LoKr were ported from LyCORIS, so their
tensors are LyCORIS's with the same shapes; what differs is written here:

- DoRA: peft keeps one magnitude per output row (shape (out,)); LyCORIS's output-axis
  `dora_scale` has the weight's rank, (out, 1) or (out, 1, 1, 1), which is what makes
  ComfyUI and LyCORIS read it on the output axis.
- LoKr: peft scales by alpha / rank always; LyCORIS and ComfyUI apply no alpha when both
  Kronecker factors are full matrices (nothing to take a rank from), so there peft's scale
  is multiplied into w2.
"""

from __future__ import annotations

import torch

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def module_tensors(parts: dict[str, torch.Tensor], rank: int, alpha: float
                   ) -> dict[str, torch.Tensor]:
    """A module's peft tensors ({'lora_A.weight': ..., 'lora_magnitude_vector': ...,
    'hada_w1_a': ..., 'lokr_w2': ...}) -> the WebUI names (without the module's name), for
    its rank and alpha."""
    if "lora_A.weight" in parts:
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        out = {"lora_down.weight": down, "lora_up.weight": up}
        if "lora_magnitude_vector" in parts:
            magnitude = parts["lora_magnitude_vector"].reshape(up.shape[0])
            out["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (down.dim() - 1))
    elif "hada_w1_a" in parts:
        out = {name: parts[name] for name in LOHA}
    elif any(name in parts for name in LOKR):
        out = {name: parts[name] for name in LOKR if name in parts}
        if "lokr_w1" in out and "lokr_w2" in out:  # both full: the readers' scale is 1
            out["lokr_w2"] = out["lokr_w2"] * (alpha / rank)
            alpha = float(rank)
    else:
        raise ValueError(f"no WebUI names for adapter tensors {sorted(parts)}")
    out["alpha"] = torch.tensor(float(alpha))
    return out


def split_name(key: str) -> tuple[str, str]:
    """A peft tensor name -> (module, the adapter's part): 'a.b.lora_A.weight' ->
    ('a.b', 'lora_A.weight'); 'a.b.hada_w1_a' -> ('a.b', 'hada_w1_a')."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "hada_", "lokr_")):
            return ".".join(parts[:i]), ".".join(parts[i:])
    raise ValueError(f"{key!r} is not an adapter tensor")


def to_peft(tensors: dict[str, torch.Tensor], rank: int, alpha: float
            ) -> dict[str, torch.Tensor]:
    """One module's LoHa or LoKr tensors in LyCORIS's names (module_tensors' output, or
    another trainer's) -> peft's, rescaled from the file's scale to peft's alpha / rank
    for this run (LyCORIS: alpha / rank, or 1 for a LoKr whose factors are both full)."""
    kinds = LOHA if "hada_w1_a" in tensors else LOKR
    out = {k: tensors[k].float() for k in kinds if k in tensors}
    if not out:
        raise ValueError(f"no LoHa or LoKr tensors among {sorted(tensors)}")
    file_alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if "hada_w1_b" in out:
        file_rank = out["hada_w1_b"].shape[0]
    else:
        factor = out.get("lokr_w1_b", out.get("lokr_w2_b"))
        file_rank = factor.shape[0] if factor is not None else None
    file_scale = 1.0 if file_rank is None or file_alpha is None else file_alpha / file_rank
    first = "hada_w1_a" if "hada_w1_a" in out else ("lokr_w2" if "lokr_w2" in out
                                                   else "lokr_w2_a")
    out[first] = out[first] * (file_scale / (alpha / rank))
    return out
