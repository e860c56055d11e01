"""lorapipe: a reproducible LoRA training pipeline for Stable Diffusion, as DVC stages.

Kept free of heavy imports: stages that only touch images must start fast.
"""

import os

# No stage ever touches the network: set before huggingface_hub, transformers or diffusers
# are imported (they read these once, at import).
for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_switch, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
