"""The image task's part of each stage (lorapipe.tasks finds `run` in the module named after
the stage)."""
