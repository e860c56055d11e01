"""The LLM task (`task_type: llm`): instruction tuning a causal language model with LoRA.

The same stages and workflow as Stable Diffusion; this package holds what differs: the data
rules (`data`), the models (`models`), the training recipe's model-specific steps
(`training`) and generation (`sampling`). Logging, checkpoints, health, early stopping and
the DVC workflow are lorapipe's shared modules.
"""
