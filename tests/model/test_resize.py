"""The early 8-bit resize of huge images: same output size as torchvision's transform, pixels within about one grey
level, and a forward pass on the shrunk image that equals the full-size one where the resize is exact."""

import numpy as np
import torch
from torchvision.models.detection.transform import _resize_image_and_masks

from model.build import load_model, resolve_spec
from model.postprocess import forward_to_mask_probs
from model.resize import shrink_for_model
from tests.conftest import TINY_MODEL


def test_shrink_matches_torchvisions_resize_in_size_and_within_a_grey_level():
    rng = np.random.default_rng(0)
    for h, w in [(4100, 5000), (5000, 4100), (1500, 4500), (777, 3333)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        small = shrink_for_model(image, min_size=800, max_size=1333, above_pixels=0)
        full = torch.from_numpy(image).permute(2, 0, 1).float()
        ref, _ = _resize_image_and_masks(full, 800.0, 1333.0, None, None)
        assert small.shape[:2] == tuple(ref.shape[-2:])
        assert (ref - torch.from_numpy(small).permute(2, 0, 1).float()).abs().max() < 1.5


def test_small_images_and_images_the_model_enlarges_are_left_alone():
    image = np.zeros((600, 800, 3), np.uint8)
    assert (
        shrink_for_model(image, min_size=800, max_size=1333, above_pixels=0) is image
    )  # the model enlarges it
    big = np.zeros((3000, 4000, 3), np.uint8)
    assert shrink_for_model(big, min_size=800, max_size=1333) is big  # 12 MP: under the threshold


def test_forward_on_a_shrunk_image_equals_the_full_size_forward_where_the_resize_is_exact():
    # Constant 4x4 blocks: a bilinear resize by exactly 1/4 samples between the two middle pixels of each block, so
    # the 8-bit and the float resize give the same pixels, and the model must see the same input either way.
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    torch.manual_seed(0)
    model = load_model(spec, box_score_thresh=0.0, box_detections_per_img=20).eval()
    small_h, small_w = (
        TINY_MODEL["min_size"],
        TINY_MODEL["min_size"] * 3 // 2,
    )  # 128 x 192: what the model uses
    blocks = np.random.default_rng(1).integers(0, 256, (small_h, small_w, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)  # 512 x 768
    shrunk = shrink_for_model(image, min_size=spec.min_size, max_size=spec.max_size, above_pixels=0)
    assert shrunk.shape == blocks.shape

    def tensor(a):
        return torch.from_numpy(a).permute(2, 0, 1).float() / 255

    with torch.inference_mode():
        full = forward_to_mask_probs(model, [tensor(image)])[0]
        early = forward_to_mask_probs(model, [tensor(shrunk)], original_sizes=[image.shape[:2]])[0]
    assert len(full["boxes"]) > 0
    torch.testing.assert_close(early["boxes"], full["boxes"])
    torch.testing.assert_close(early["scores"], full["scores"])
    torch.testing.assert_close(early["masks"], full["masks"])
    assert early["boxes"][:, 2].max() > small_w  # boxes are reported at the original size
