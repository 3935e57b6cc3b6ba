import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, DistributedSampler

from model.data import (
    CocoInstances,
    GroupedBatchSampler,
    aspect_ratio_group_ids,
    collate,
    load_coco,
    segmentation_to_mask,
)
from pipeline.demo.shapes import make_shapes


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for px in flat:
        if px == value:
            run += 1
        else:
            counts.append(run)
            value, run = px, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """Three real shapes images referenced from a hand-written COCO JSON with every annotation flavour."""
    root = tmp_path_factory.mktemp("custom")
    shapes = make_shapes(str(root), train=3, val=0, seed=3, size=(96, 128))["train"]
    imgs = [dict(img, file_name=f"train/{img['file_name']}") for img in shapes["images"]]  # a subfolder
    (h1, w1), (h2, w2) = (imgs[0]["height"], imgs[0]["width"]), (imgs[1]["height"], imgs[1]["width"])
    crowd = np.zeros((h1, w1), dtype=np.uint8)
    crowd[40:60, 70:100] = 1
    blob = np.zeros((h2, w2), dtype=np.uint8)
    blob[5:25, 10:50] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    anns = [
        # polygon: 40 x 30 rectangle at (10, 10)
        {"id": 1, "image_id": imgs[0]["id"], "category_id": 3, "iscrowd": 0, "area": 1200.0,
         "bbox": [10, 10, 40, 30], "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]},
        {"id": 2, "image_id": imgs[0]["id"], "category_id": 7, "iscrowd": 1, "area": float(crowd.sum()),
         "bbox": [70, 40, 30, 20], "segmentation": _uncompressed_rle(crowd)},
        {"id": 3, "image_id": imgs[0]["id"], "category_id": 42, "iscrowd": 0, "area": 0.0,
         "bbox": [5, 5, 0, 10], "segmentation": [[5, 5, 5, 15, 5, 5]]},  # zero width
        {"id": 4, "image_id": imgs[1]["id"], "category_id": 42, "iscrowd": 0, "area": float(blob.sum()),
         "bbox": [10, 5, 40, 20], "segmentation": {"size": [h2, w2], "counts": rle["counts"].decode()}},
        {"id": 5, "image_id": imgs[1]["id"], "category_id": 7, "iscrowd": 0, "area": 4.0,
         "bbox": [w2 + 5, 3, 10, 10], "segmentation": []},  # entirely right of the image: empty after clipping
    ]  # fmt: skip
    categories = [{"id": 42, "name": "star"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    path = root / "annotations" / "custom.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": categories}))
    return {"root": str(root), "ann": str(path), "images": imgs, "blob": blob, "crowd": crowd}


def _dataset(custom, **kw):
    return CocoInstances(annotations_url=custom["ann"], images_url=custom["root"], **kw)


def test_index_maps_sparse_category_ids_to_contiguous_labels(custom):
    index = load_coco(custom["ann"])
    assert index.cat_ids == (3, 7, 42)
    assert index.cat_to_label == {3: 1, 7: 2, 42: 3}
    assert index.label_to_cat == {1: 3, 2: 7, 3: 42}
    assert index.class_names == ("__background__", "circle", "square", "star")
    assert [img["id"] for img in index.images] == [1, 2, 3]
    assert [len(index.anns_by_image[i]) for i in (1, 2, 3)] == [3, 2, 0]  # image 3 kept without annotations


def test_load_errors_name_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"images": [], "annotations": [{"id": 9, "image_id": 1}], "categories": [{"id": 1, "name": "a"}]}
        )
    )
    with pytest.raises(ValueError, match=r"bad\.json: annotation 9 refers to unknown image_id 1"):
        load_coco(str(bad))


def test_train_drops_crowd_and_degenerate_boxes_and_counts_them(custom):
    ds = _dataset(custom, train=True, flip_prob=0.0)
    assert ds.dropped == {"crowd": 1, "degenerate_box": 2}
    assert len(ds) == 3
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (
        3,
        custom["images"][0]["height"],
        custom["images"][0]["width"],
    )
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["labels"].tolist() == [1]  # only the polygon survives
    assert target["iscrowd"].tolist() == [0]
    # image 2: only the compressed RLE remains; image 3: a negative with well-formed empty tensors
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [3] and np.array_equal(t2["masks"][0].numpy(), custom["blob"])
    _, t3 = ds[2]
    h3, w3 = custom["images"][2]["height"], custom["images"][2]["width"]
    assert t3["boxes"].shape == (0, 4) and t3["masks"].shape == (0, h3, w3) and t3["labels"].shape == (0,)
    assert t3["image_id"].item() == 3


def test_eval_keeps_everything_with_correct_shapes_and_dtypes(custom):
    ds = _dataset(custom, train=False)
    assert ds.dropped == {"crowd": 0, "degenerate_box": 0}
    image, target = ds[0]
    h, w = image.shape[1:]
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (3, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 2, 3]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, h, w)
    assert target["area"].dtype == torch.float32 and target["iscrowd"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [0, 1, 0]
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
    assert target["boxes"][0].tolist() == [10, 10, 50, 40]  # xywh -> xyxy
    # polygon mask area ~ the annotation's area (rasterisation differs by at most a boundary row/column)
    assert abs(int(target["masks"][0].sum()) - 1200) <= 0.05 * 1200
    assert np.array_equal(target["masks"][1].numpy(), custom["crowd"])  # uncompressed RLE
    assert target["masks"][2].sum() == 0  # a zero-width polygon: empty mask, no crash
    _, t2 = ds[1]
    w2 = float(custom["images"][1]["width"])
    assert t2["boxes"][1].tolist() == [
        w2,
        3.0,
        w2,
        13.0,
    ]  # clipped to the right edge: zero width, kept in eval


def test_horizontal_flip_mirrors_image_boxes_and_masks_together(custom):
    plain = _dataset(custom, train=True, flip_prob=0.0)
    flipped = _dataset(custom, train=True, flip_prob=1.0)
    for i in range(2):
        (img, t), (fimg, ft) = plain[i], flipped[i]
        width = img.shape[-1]
        assert torch.equal(fimg, img.flip(-1))
        assert torch.equal(ft["boxes"][:, 0], width - t["boxes"][:, 2])
        assert torch.equal(ft["boxes"][:, 2], width - t["boxes"][:, 0])
        assert torch.equal(ft["boxes"][:, [1, 3]], t["boxes"][:, [1, 3]])
        for m, fm in zip(t["masks"], ft["masks"]):
            assert torch.equal(fm.sum(0), m.sum(0).flip(0))  # column sums reversed
            assert torch.equal(fm.sum(1), m.sum(1))
        # the flipped box still encloses the flipped mask
        ys, xs = torch.nonzero(ft["masks"][0], as_tuple=True)
        x1, y1, x2, y2 = ft["boxes"][0].tolist()
        assert x1 <= xs.min() and xs.max() + 1 <= x2 and y1 <= ys.min() and ys.max() + 1 <= y2
        assert torch.equal(ft["labels"], t["labels"]) and torch.equal(ft["area"], t["area"])


def test_flip_follows_torch_seed(custom):
    ds = _dataset(custom, train=True, flip_prob=0.5)

    def draws():  # the polygon's x1 is 10 unflipped, width - 50 flipped
        return [ds[0][1]["boxes"][0, 0].item() for _ in range(12)]

    torch.manual_seed(5)
    first = draws()
    torch.manual_seed(5)
    assert draws() == first
    assert len(set(first)) == 2  # both outcomes occur


def test_shapes_dataset_through_dataloader(tmp_path):
    make_shapes(str(tmp_path), train=4, val=0, seed=0, size=(96, 128))
    ds = CocoInstances(
        annotations_url=str(tmp_path / "annotations" / "instances_train.json"),
        images_url=str(tmp_path / "train"),
        train=True,
    )
    assert ds.index.class_names == ("__background__", "circle", "square", "triangle", "star")
    ratios = ds.aspect_ratios()
    assert ratios == [img["width"] / img["height"] for img in ds.index.images]
    loader = DataLoader(ds, batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    for image, target in zip(images, targets):
        assert target["masks"].shape[1:] == image.shape[1:]
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) >= 1
    assert collate([]) == ([], [])


def test_segmentation_formats_agree():
    mask = np.zeros((12, 16), dtype=np.uint8)
    mask[2:7, 3:11] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    for segm in (
        _uncompressed_rle(mask),
        {"size": [12, 16], "counts": rle["counts"]},  # bytes
        {"size": [12, 16], "counts": rle["counts"].decode()},  # str
        [[3, 2, 11, 2, 11, 7, 3, 7]],  # polygon on pixel boundaries
    ):
        assert np.array_equal(segmentation_to_mask(segm, height=12, width=16), mask), segm
    with pytest.raises(ValueError, match="does not match"):
        segmentation_to_mask({"size": [5, 5], "counts": rle["counts"]}, height=12, width=16)


def test_aspect_ratio_group_ids():
    assert aspect_ratio_group_ids([0.5, 0.99, 1.0, 2.0], k=0) == [0, 0, 1, 1]
    groups = aspect_ratio_group_ids([0.3, 0.6, 1.0, 1.3, 3.0], k=3)
    assert groups == sorted(groups) and groups[0] == 0 and groups[-1] == 7


@pytest.mark.parametrize("batch_size", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_batches_same_count_on_every_rank(batch_size, seed):
    # uneven groups: 7 portrait, 16 landscape, shuffled; 23 items do not split evenly over 2 ranks either
    rng = np.random.default_rng(seed)
    group_ids = rng.permutation([0] * 7 + [1] * 16).tolist()
    data = list(range(len(group_ids)))
    samplers = [
        GroupedBatchSampler(
            DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=seed),
            group_ids=group_ids,
            batch_size=batch_size,
        )
        for rank in (0, 1)
    ]
    assert len(samplers[0]) == len(samplers[1]) == 12 // batch_size
    for epoch in range(3):
        for s in samplers:
            s.set_epoch(epoch)
            assert s.sampler.epoch == epoch  # forwarded to the DistributedSampler
            batches = list(s)
            assert len(batches) == len(s)
            for batch in batches:
                assert len(batch) == batch_size
                assert len({group_ids[i] for i in batch}) == 1
                assert set(batch) <= set(s.sampler)


def test_grouped_batches_reshuffle_per_epoch_and_work_with_dataloader(custom):
    ds = _dataset(custom, train=False)
    groups = aspect_ratio_group_ids(ds.aspect_ratios(), k=0)
    sampler = GroupedBatchSampler(torch.utils.data.SequentialSampler(ds), group_ids=groups, batch_size=1)
    sampler.set_epoch(1)  # a sampler without set_epoch is fine
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    assert [t[0]["image_id"].item() for _, t in loader] == [1, 2, 3]

    big = GroupedBatchSampler(
        DistributedSampler(list(range(40)), num_replicas=2, rank=0, seed=0), group_ids=[0] * 40, batch_size=4
    )
    big.set_epoch(0)
    first = list(big)
    big.set_epoch(1)
    assert list(big) != first
