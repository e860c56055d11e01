"""lorapipe: a reproducible LoRA training pipeline for Stable Diffusion, as DVC stages.

Kept free of heavy imports: stages that only touch images must start fast.
"""

__version__ = "0.1.0"
