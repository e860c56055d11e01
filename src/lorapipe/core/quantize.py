"""model.quantize: the frozen base in fewer bits, the LoRA in fp32.

- `nf4` (QLoRA) and `int8` (LLM.int8()): bitsandbytes' Linear4bit / Linear8bitLt in place of
  the base's Linear layers, which is what peft expects (it puts its own bitsandbytes LoRA
  layers on them, dequantizing where DoRA needs the weight). Convolutions stay as they are.
- `fp8`: the weights of every Linear and convolution stored as float8 (e4m3) and read in the
  compute dtype as each layer runs: kohya's `--fp8_base` (diffusers' skip patterns keep
  norms and embeddings as they are).

All three run on the CPU and on CUDA (bitsandbytes has CPU kernels since 0.46).

Why a module swap here and not transformers'/diffusers' `BitsAndBytesConfig`: those quantize
while `from_pretrained` reads a checkpoint; the builtins are built in code and a single-file
base goes through diffusers' converter, so the model to quantize is already in memory. The
layers themselves are bitsandbytes' own, filled from the loaded weights.
"""

from __future__ import annotations

import re

import torch

from lorapipe.core.params import QUANTIZE_MODES as MODES  # noqa: F401 (the one list)

BITSANDBYTES = ("int8", "nf4")
FP8 = torch.float8_e4m3fn
# the modules peft adds (lora_A, lora_B, DoRA's lora_magnitude_vector; LoHa's and LoKr's
# factors are parameters of peft's own layer types, which fp8 never touches): left in fp32
LORA_LAYERS = (r"\.lora_",)
# LLM.int8()'s outlier threshold (bitsandbytes' and transformers' default): input features
# above it are computed in 16 bits
INT8_THRESHOLD = 6.0


def before_adapter(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype,
                   skip: tuple[str, ...] = ()) -> int:
    """bitsandbytes' modes, before the adapter is attached or loaded: peft then puts its
    own bitsandbytes layers on the quantized ones. Quantizes in place, on the device the
    layers are on; `skip`: regular expressions of module names left as they are (an LLM's
    lm_head and embeddings). Returns the layers quantized."""
    return _bitsandbytes(model, mode, compute_dtype, skip) if mode in BITSANDBYTES else 0


def after_adapter(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype,
                  skip: tuple[str, ...] = ()) -> int:
    """fp8, once the adapter is on: its own layers (lora_*) are skipped and keep fp32 (cast
    before it, peft would store the new LoRA in the base layer's float8). Returns the layers
    quantized."""
    return stored_as(model, FP8, compute_dtype, skip + LORA_LAYERS) if mode == "fp8" else 0


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(re.search(pattern, name) for pattern in skip)


class _Upcast(torch.nn.Module):
    """The weight kept in float8 (or `storage`), read in the compute dtype on every use (a
    parametrization: nothing is cast in place, so gradient checkpointing's recomputation
    reads what the forward read, and autograd saves the float8 original, not an fp32 copy,
    between steps)."""

    def __init__(self, dtype: torch.dtype, storage: torch.dtype = FP8):
        super().__init__()
        self.dtype, self.storage = dtype, storage

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        # a one-tensor tuple: torch refuses a dtype change for a single tensor, not for a
        # sequence (stored as parametrizations.weight.original0)
        return (weight.to(self.storage),)


def stored_as(model: torch.nn.Module, storage: torch.dtype, compute_dtype: torch.dtype,
              skip: tuple[str, ...]) -> int:
    """Every Linear and convolution weight held in `storage` (fp8: float8 e4m3; the memory
    bench's reference row: bf16) and read in `compute_dtype`; returns the layers."""
    # kohya's --fp8_base, written with torch's parametrizations rather than diffusers'
    # layerwise casting: that one casts the module's weights in place before and after each
    # forward, which gradient checkpointing's recomputation rejects (it found float8 where
    # the forward had saved fp32: tested) and which keeps an upcast copy per layer for the
    # backward. The skip patterns are diffusers' (the model's own, else its defaults), but
    # for the modulation Linear of an adaptive norm (AdaLayerNormZero's `norm1.linear`):
    # "norm" is there for the norms' own weights, and in Flux those Linears are a third of
    # the transformer (3072 x 18432 in every double block), held as every other Linear is.
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from torch.nn.utils import parametrize

    patterns = tuple(skip) + tuple(getattr(model, "_skip_layerwise_casting_patterns", None)
                                   or DEFAULT_SKIP_MODULES_PATTERN)
    modulations = {f"{name}.{child}" for name, m in model.named_modules()
                   if type(m).__name__.startswith("AdaLayerNorm")
                   for child, sub in m.named_children() if type(sub) is torch.nn.Linear}
    layers = [(name, m) for name, m in model.named_modules()
              if type(m) in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
              and (not _skipped(name, patterns)
                   or name in modulations and not _skipped(name, tuple(skip)))]
    for _, layer in layers:
        parametrize.register_parametrization(layer, "weight", _Upcast(compute_dtype, storage))
        layer.parametrizations.weight.original0.requires_grad_(False)
    return len(layers)


def _bitsandbytes(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype,
                  skip: tuple[str, ...]) -> int:
    import bitsandbytes as bnb

    # names only: each full-precision Linear is freed as soon as its replacement is in
    names = [name for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and not _skipped(name, skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        weight, bias, device = linear.weight.data, linear.bias, linear.weight.device
        if mode == "nf4":  # QLoRA's settings: NF4 with double quantization
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                      bias=bias is not None, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            # not bitsandbytes' AVX512-BF16 CPU path: it repacks the weight in place the first
            # time the layer runs in eval mode without grad (every evaluation here, between
            # training steps that need the other layout), and fails on widths below its
            # 64-wide blocks (the tiny builtins': "shape '[128, 0]' is invalid")
            layer.support_avx512bf16_for_cpu = False
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                        bias=bias is not None, has_fp16_weights=False,
                                        threshold=INT8_THRESHOLD, device="meta")
            layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False,
                                             has_fp16_weights=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
        layer = layer.to(device)  # bitsandbytes quantizes as the weight moves to its device
        layer.register_forward_hook(_as_autocast)
        layer.train(linear.training)
        setattr(parent, child, layer)
        del linear, weight, bias
    return len(names)


KINDS = {"int8": "8-bit integers (bitsandbytes LLM.int8())",
         "fp8": "float8 e4m3, computed layer by layer in {compute}",
         "nf4": "4-bit NF4 with double quantization (bitsandbytes: QLoRA)"}


def line(mode: str, n: int, component: str, compute_dtype: torch.dtype) -> list[str]:
    """train's line about model.quantize ([] without it)."""
    if mode == "none":
        return []
    kind = KINDS[mode].format(compute=str(compute_dtype).removeprefix("torch."))
    return [f"train: model.quantize {mode}: {n} layers of the {component} held in {kind}; "
            "the LoRA trains in fp32"]


def _as_autocast(module, inputs, output):
    """A bitsandbytes layer returns its input's dtype, where torch's Linear under autocast
    returns the autocast dtype: an fp32 input (a UNet's or Flux's timestep embedding) then
    made the hidden states fp32 beside bf16 norms ("mixed dtype (CPU)" in group_norm). Under
    autocast the output is cast as a Linear's would be; without it, left as it is."""
    device = output.device.type
    if torch.is_autocast_enabled(device):
        return output.to(torch.get_autocast_dtype(device))
    return output


def is_quantized(parameter: torch.Tensor) -> bool:
    """A weight stored in fewer bits by this module (not a float the optimizer could train)."""
    return not parameter.dtype.is_floating_point or parameter.dtype == FP8


def footprint(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the quantized weights, bytes of every other parameter and buffer)."""
    quantized = other = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        size = tensor.numel() * tensor.element_size()
        if is_quantized(tensor):
            quantized += size
        else:
            other += size
    return quantized, other
