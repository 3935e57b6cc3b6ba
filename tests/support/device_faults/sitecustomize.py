"""Device failures injected into the segment job's actors, for tests/reliability/test_device_faults.py.

A GPU that loses its context cannot exist on a CPU machine, so the tests inject what torch raises then. This file is
imported by every Python process started with this folder on PYTHONPATH and `SEGMENT_FAULTS` set (the job's driver
and the Ray workers it starts, which inherit its environment); it wraps `Segmenter.forward` when
`pipeline.segment.infer` is imported. Only processes that run the model (the actors) are affected.

`SEGMENT_FAULTS` (JSON):
- `{"mode": "transient", "dead_processes": N, "at_call": K, "dir": D}`: the first N processes to reach their K-th
  forward call fail there and on every later call (a dead context), each with the next of the three forms below;
  later processes are healthy.
- `{"mode": "poison", "shape": [H, W]}`: a call holding an image of that shape fails (AcceleratorError), and the
  process's context is dead from then on.
- `{"mode": "oom", "shape": [H, W]}`: a call holding an image of that shape raises torch's OutOfMemoryError (the
  context survives).
"""

import json
import os
import sys

SPEC = os.environ.get("SEGMENT_FAULTS")


def _failure(form: int) -> BaseException:
    import torch

    if form % 3 == 0:
        return torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    if form % 3 == 1:
        return RuntimeError(
            "CUDA error: unspecified launch failure\nCompile with `TORCH_USE_CUDA_DSA` to enable"
        )
    return RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")


def _claim(folder: str, limit: int) -> int | None:
    """A failure ordinal for this process, or None once `limit` processes have failed (O_EXCL files, no races)."""
    for n in range(limit):
        try:
            os.close(os.open(os.path.join(folder, f"failed-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            continue
    return None


def _patch(module) -> None:
    spec = json.loads(SPEC)
    real = module.Segmenter.forward
    state = {"calls": 0, "dead": None}

    def forward(self, images, original_sizes=None):
        state["calls"] += 1
        if state["dead"] is not None:
            raise _failure(state["dead"])
        shapes = {tuple(int(v) for v in image.shape[:2]) for image in images}
        if spec["mode"] == "transient" and state["calls"] == spec["at_call"]:
            ordinal = _claim(spec["dir"], spec["dead_processes"])
            if ordinal is not None:
                state["dead"] = ordinal
                raise _failure(ordinal)
        elif spec["mode"] == "poison" and tuple(spec["shape"]) in shapes:
            state["dead"] = 0
            raise _failure(0)
        elif spec["mode"] == "oom" and tuple(spec["shape"]) in shapes:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(self, images, original_sizes)

    module.Segmenter.forward = forward


if SPEC:
    import importlib.abc
    import importlib.machinery

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != "pipeline.segment.infer":
                return None
            found = importlib.machinery.PathFinder.find_spec(fullname, path)
            if found is None or found.loader is None:
                return None
            run = found.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            found.loader.exec_module = exec_module
            return found

    sys.meta_path.insert(0, _Finder())
