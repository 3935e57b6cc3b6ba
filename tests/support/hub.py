"""torchvision's COCO weights, offline: a state dict of the right shapes, made here, planted where torch's hub cache
(`$TORCH_HOME/hub/checkpoints/<file name of the weights' URL>`) holds a finished download. `weights.get_state_dict`
loads a cached file without downloading it or checking its hash (the hash is checked on download only), so the code
under test runs exactly as it does after a real download."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

import torch

# The planted weights are drawn with this seed: not model.build's RANDOM_INIT_SEED, so a model that loaded them
# differs from a `weights: none` one.
SEED = 1234
# A small tensor that every Mask R-CNN has, compared to tell which weights a model holds.
PROBE = "rpn.head.cls_logits.weight"


@dataclasses.dataclass(frozen=True)
class PlantedHub:
    torch_home: str  # set TORCH_HOME to this
    probes: dict[str, torch.Tensor]  # architecture name -> the planted weights' PROBE tensor


def cache_path(torch_home: str, weights_name: str) -> str:
    """Where torch.hub keeps the download of torchvision weights `weights_name` ("Enum.MEMBER")."""
    from torchvision.models import get_weight

    name = os.path.basename(urllib.parse.urlparse(get_weight(weights_name).url).path)
    return os.path.join(torch_home, "hub", "checkpoints", name)


def plant_coco_weights(torch_home: str, architectures: tuple[str, ...]) -> PlantedHub:
    """Plant COCO weights of the right shapes for each of `architectures` (names from model.architectures)."""
    from torchvision.models import get_model

    from model import architectures as table

    probes = {}
    for name in architectures:
        arch = table.get(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = get_model(arch.builder, weights=None, weights_backbone=None, num_classes=91)
        path = cache_path(torch_home, arch.coco_weights)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(model.state_dict(), path)
        probes[name] = model.state_dict()[PROBE].clone()
    return PlantedHub(torch_home=torch_home, probes=probes)
