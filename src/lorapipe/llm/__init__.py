"""The LLM task (`task_type: llm`): instruction tuning a causal language model with LoRA.

The same stages and workflow as the image task; this package holds what differs: the data
rules (`data`), the models (`models`), the adapter (`adapter`), the training recipe's
model-specific steps (`training`), generation (`sampling`), its params rules (`rules`) and
its part of each stage (`stages`). Logging, checkpoints, health, early stopping and the DVC
workflow are the shared core's (lorapipe.core).
"""
