"""The fault model of the model path: which failures are an image's, which are the device's, and what each does.

- **An image's failure** (the model rejects an input; out of memory on one image even when run alone): that image
  becomes an `images` row with status `error`, by the `on_image_error` policy. A batch that fails with out of memory
  is first run again image by image, on the actor's main thread, after the failed pass's memory is released.
- **A device failure** (torch's `AcceleratorError`; CUDA, cuDNN, cuBLAS, NCCL runtime errors other than out of
  memory, which after a sticky fault arrive as plain `RuntimeError`s): the context is unusable for every later call,
  so nothing of the unit is committed and the actor ends its own process (`DeviceFailure`). Ray restarts the actor
  (Ray Data's actor pools restart without limit) and runs the unit again on a fresh context. Classified by what the
  exception is, never by whether a retry happens to succeed.
- **The retry budget is the job's, per unit**, counted in `_faults/<unit>.json` on the output (Ray's own restarts are
  unbounded, so they cannot end a job): after `ISOLATE_AFTER` device failures the unit runs image by image; an image
  that fails the device `BLAME_AFTER` times when run alone, each time right after a pass that succeeded in the same
  process (so the device itself was healthy), becomes one error row naming it; a unit that fails `MAX_ATTEMPTS`
  times ends the job with one `error:` line, every committed unit intact for a resume.

Documented for users in `docs/segment-job.md` ("When the device fails").
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

from pipeline.errors import JobError
from pipeline.segment.schema import FAULTS_DIR
from pipeline.segment.storage import Output

ISOLATE_AFTER = 2  # device failures of a unit before it runs image by image
BLAME_AFTER = 2  # failures of one image run alone on a healthy device before it becomes an error row
MAX_ATTEMPTS = 10  # device failures of one unit before the job gives up

# Messages of CUDA-side runtime errors that torch raises as a plain RuntimeError (a sticky error seen again by a
# later call, cuDNN and cuBLAS status codes, NCCL); out of memory is an image's failure, tested first.
_DEVICE_MESSAGES = re.compile(
    r"CUDA error|CUDA driver|cuDNN error|CUDNN_STATUS_|CUBLAS_STATUS_|cuBLAS error|CUFFT_|CURAND_|CUSOLVER_|"
    r"NCCL error|device-side assert|illegal memory access|unspecified launch failure|uncorrectable ECC|"
    r"no CUDA-capable device|CUDA-capable device\(s\) is/are busy",
    re.IGNORECASE,
)
_OOM_MESSAGES = re.compile(
    r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED", re.IGNORECASE
)


class DeviceFailure(RuntimeError):
    """The device failed: the actor's context is unusable; its unit must run again elsewhere (never committed).
    `alone`: the index (within its unit) of the one image the failed pass ran on, else None."""

    def __init__(self, message: str, *, alone: int | None = None):
        super().__init__(message)
        self.alone = alone


class DeviceGaveUp(JobError):
    """A unit failed the device `MAX_ATTEMPTS` times: the job ends (one line), committed units kept."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and bool(_OOM_MESSAGES.search(str(exc)))
    )


def is_device_failure(exc: BaseException) -> bool:
    """Whether `exc` says the device (not the image) failed. Out of memory is not a device failure."""
    import torch

    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: CUDA runtime errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_DEVICE_MESSAGES.search(str(exc)))


# The NVIDIA driver series each CUDA major version of torch's wheels needs (NVIDIA's CUDA toolkit release notes).
DRIVER_FOR_CUDA = {13: "R580", 12: "R525", 11: "R450"}


def check_cuda(*, memory_fraction: float | None = None) -> None:
    """At actor start on a GPU cluster: torch can use CUDA here, or one `JobError` line saying why and what to
    install. `memory_fraction`: the share of the GPU's memory this process may use (actors sharing a GPU)."""
    import torch

    if not torch.cuda.is_available():
        try:
            torch.cuda.init()
            reason = "no CUDA device visible to torch"
        except Exception as e:  # noqa: BLE001  (its message is the reason, e.g. "driver too old")
            reason = " ".join(str(e).split())[:200]
        built = torch.version.cuda
        if built is None:
            raise JobError(
                f"model.device: cuda, but this node's torch {torch.__version__} is a CPU-only build; install the "
                "CUDA build of the pinned torch and torchvision (the README's install line)"
            )
        major = int(built.split(".")[0])
        raise JobError(
            f"model.device: cuda, but torch {torch.__version__} (built for CUDA {built}) cannot use this node's GPU: "
            f"{reason}. CUDA {built} needs an NVIDIA driver of the {DRIVER_FOR_CUDA.get(major, 'newest')} series or "
            "newer (nvidia-smi shows the driver); on an older driver install PyTorch's CUDA 12 wheels of the same "
            "versions (pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126, pinned "
            "as in pyproject.toml)"
        )
    if memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(memory_fraction)


def describe(exc: BaseException) -> str:
    """The message kept of a failure (never the exception: its traceback holds the failed pass's tensors)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


@dataclasses.dataclass
class UnitFaults:
    """What earlier attempts at a unit met: `_faults/<unit>.json`."""

    unit_id: str
    attempts: int = 0  # device failures so far
    last_error: str = ""
    # Image index (within the unit) → device failures it caused while run alone right after a healthy pass.
    suspects: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def isolate(self) -> bool:
        return self.attempts >= ISOLATE_AFTER

    def blamed(self, index: int) -> bool:
        return self.suspects.get(index, 0) >= BLAME_AFTER

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "suspects": {str(k): v for k, v in self.suspects.items()}}


def record_name(unit_id: str) -> str:
    return posixpath.join(FAULTS_DIR, f"{unit_id}.json")


def load(output: Output, unit_id: str) -> UnitFaults:
    doc = output.read_json(record_name(unit_id))
    if not doc:
        return UnitFaults(unit_id)
    return UnitFaults(
        unit_id,
        attempts=int(doc.get("attempts", 0)),
        last_error=str(doc.get("last_error", "")),
        suspects={int(k): int(v) for k, v in (doc.get("suspects") or {}).items()},
    )


def save(output: Output, faults: UnitFaults) -> None:
    output.write_json(record_name(faults.unit_id), faults.to_json())
