"""Mask R-CNN (ResNet-50-FPN) shared by training and inference.

Importable without Ray and without any storage layout: builders, checkpoint (de)serialisation, and pure
post-processing functions. `jobs/train.py` writes checkpoints with `model.checkpoint.save_checkpoint`; the segment
job rebuilds the same module from them with `model.build.load_model`.
"""
