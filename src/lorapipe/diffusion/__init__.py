"""The image-diffusion task (task_type sd): dataset checks, images and buckets, captions,
the encode cache, the objectives, the model families, export (diffusers and kohya/WebUI
names), sampling, and its part of each stage (diffusion.stages)."""
