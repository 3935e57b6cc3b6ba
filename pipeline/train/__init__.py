"""The training job: `config` (validated dataclasses) and `run` (the Ray Train driver around model.train_loop)."""
