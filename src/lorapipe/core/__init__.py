"""The shared core: what every task uses, and it imports no task.

params (schema and checker), errors and the CLI wrapper, atomic outputs, the training loop
(`training.Recipe`) with its hooks, checkpoints, tracking and the metric names, the
evaluation rhythm and early stop, the health checks, the plan of batches, seeds, CPU threads
and the warm start, the adapter config and state. The tasks are lorapipe.diffusion and
lorapipe.llm; lorapipe.tasks finds them by task_type.
"""
