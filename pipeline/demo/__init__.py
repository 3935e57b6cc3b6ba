"""The offline demo: `shapes` (a synthetic COCO-format archive) and `run` (its steps in order)."""
