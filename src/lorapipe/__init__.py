"""lorapipe: a reproducible LoRA training pipeline for image diffusion models and LLMs, as
DVC stages.

Kept free of heavy imports: stages that only touch images must start fast.
"""

import logging
import os

# No stage ever touches the network: set before huggingface_hub, transformers or diffusers
# are imported (they read these once, at import).
for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_switch, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"


class _TorchvisionNote(logging.Filter):
    """transformers says, twice per torch stage, that `CLIPImageProcessor` and
    `SiglipImageProcessor` fall back to their PIL versions without torchvision. lorapipe uses
    no image processor and avoids torchvision (a multi-GB CUDA pull): the note is noise. Only
    those records are dropped; every other transformers warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# the logger transformers' lazy-import module logs through (transformers.utils.import_utils)
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNote())
# peft imports bitsandbytes (train.optimizer adamw8bit) at its own import; on a CPU with
# AVX512-BF16, bitsandbytes then warns that its optional 4-bit CPU kernel (the `kernels`
# package, fetched from the Hub) is missing; model.quantize nf4 then takes bitsandbytes'
# own 4-bit path on the CPU, which computes the same (slower), and nothing can be fetched
# offline. And LLM.int8() (model.quantize int8) says on every matmul that it casts its
# fp32 inputs to fp16, which is how it works (README "Low-memory bases"). Those two
# loggers' warnings are dropped, their errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
