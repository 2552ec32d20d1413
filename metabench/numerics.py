"""How a run computes, apart from what it computes: training precision, deterministic evaluation on
CUDA, and how many test episodes go to a learner at once.

* ``--precision bf16``: :func:`training_precision` runs ``meta_train`` under
  ``torch.autocast(device_type, dtype=torch.bfloat16)`` (parameters, optimiser state and gradients
  stay float32; autocast picks bf16 for matmuls and convolutions). Only for a learner that allows
  it (:attr:`metabench.Learner.precisions`, narrowed by settings in
  :meth:`metabench.Learner.refuses_precision`); fp32 (the default) changes nothing.
* Evaluation (the test episodes, and validation during training) runs under
  :func:`evaluation_numerics`: float32 (autocast off) unless the learner says it evaluates in the
  run's precision (:attr:`metabench.Learner.evaluates_in_precision`), and on a CUDA device with
  :func:`deterministic_cuda`'s settings, so that two evaluations of one trained state give the same
  per-episode values there as they do on a CPU.
* ``--eval-batch N``: :func:`resolve_eval_batch` (default 1 on a CPU, 16 on CUDA); a learner that
  implements :meth:`metabench.Learner.predict_batch` gets N consecutive test episodes per call.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .errors import MetabenchError
from .settings import PRECISIONS

#: ``--eval-batch``'s default per device type (another type: 1). On a CPU an episode's forward is
#: already arithmetic-bound (and 1 keeps CPU results as they were); on a GPU one episode per forward
#: is launch-bound (benchmarks/RESULTS.md, section 6: 2.5x for ProtoNet at 10 episodes per forward).
DEFAULT_EVAL_BATCH = {"cpu": 1, "cuda": 16}

_DTYPES = {"bf16": torch.bfloat16}


def resolve_eval_batch(value: int | None, device: torch.device) -> int:
    """``--eval-batch`` (None: the device's default, :data:`DEFAULT_EVAL_BATCH`); MetabenchError unless
    a positive integer."""
    if value is None:
        return DEFAULT_EVAL_BATCH.get(torch.device(device).type, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MetabenchError(f"--eval-batch {value!r}: must be a positive integer (test episodes per call)")
    return value


def check_precision(precision: str, learner_cls, config, who: str, device: torch.device) -> None:
    """MetabenchError (one line) unless the learner may train in ``precision`` with ``config`` on ``device``."""
    if precision not in PRECISIONS:
        raise MetabenchError(f"--precision {precision!r}: accepted: {', '.join(PRECISIONS)}")
    reason = learner_cls.refuses_precision(precision, config)
    if reason:
        accepted = [p for p in PRECISIONS if not learner_cls.refuses_precision(p, config)]
        raise MetabenchError(f"--precision {precision}: {who} cannot train in {precision}: {reason}; "
                             f"accepted: {', '.join(accepted)}")
    if precision == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MetabenchError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                             "use --precision fp32")


def eval_precision(learner_cls, precision: str) -> str:
    """The precision its evaluation runs in: float32, unless the learner evaluates in the run's precision."""
    return precision if getattr(learner_cls, "evaluates_in_precision", False) else "fp32"


def training_precision(precision: str, device: torch.device):
    """The context ``meta_train`` runs in: autocast to bf16, or (fp32) nothing at all."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def deterministic_cuda() -> Iterator[None]:
    """Deterministic cuDNN algorithms (``cudnn.deterministic``, no ``cudnn.benchmark`` autotuning) and
    no TF32 (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
    ``torch.set_float32_matmul_precision("highest")``) inside the block; every setting is put back as
    it was afterwards, also when the block raises. (The flags are process-wide; they can be set on a
    build or machine without CUDA, where they change nothing.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic,
             cudnn.benchmark)
    try:
        torch.set_float32_matmul_precision("highest")  # also turns matmul.allow_tf32 off
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
        cudnn.deterministic = True
        cudnn.benchmark = False
        yield
    finally:  # the matmul precision first: setting it also sets matmul.allow_tf32
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[1:]


@contextlib.contextmanager
def evaluation_numerics(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """The context test and validation episodes are predicted in: autocast off (``precision`` fp32) or
    to ``precision``; on a CUDA device also :func:`deterministic_cuda`."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(deterministic_cuda())
        dtype = _DTYPES.get(precision)
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                            else torch.autocast(device_type=device.type, enabled=False))
        yield
