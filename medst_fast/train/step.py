"""One optimizer step: the model + loss module, the forward/backward over micro-batches, the guarded update, and
the step's statistics (:class:`StepStats`), which travel to the host in the step's one all-reduce.

Why one host sync per step: the non-finite-loss check must finish before the optimizer may
touch the weights, and the same small all-reduce carries the stop flag (a signal on any rank), the loss terms
for logging, the gradient norm and the finiteness of the weights after the previous update, so every rank takes
the same decision at the same step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .data import BAD_BATCH

# Parameters the official model creates but whose outputs are never used (the weighting attention's output
# projection: only its attention weights enter the loss). They never receive a gradient, so they are frozen:
# DDP then needs no find_unused_parameters pass, and AdamW skips them exactly as it skips parameters without a
# gradient in the official run.
UNUSED_PARAMS = ("word_weighting.out_proj.", "patch_weighting.out_proj.")
# With loss.local_weighting "uniform" the local loss never reads the weighting attentions: their input
# projections get no gradient either (None on the reference path, zeros from the fused kernels).
WEIGHTING_PARAMS = ("word_weighting.", "patch_weighting.")
LOSS_TERMS = ("ita", "local", "temporal", "cross_local")


class PretrainModule(nn.Module):
    """Model + loss in one module, so DDP sees every parameter used in its forward."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        out = self.model(batch)
        # The losses run outside autocast, in fp32 (they upcast their inputs): softmax/logsumexp over
        # similarity logits with masked -inf/finfo.min entries must not be recast to bf16/fp16 by autocast.
        with torch.autocast(out.img_global.device.type, enabled=False):
            lo = self.loss_fn(out, self.model)
        return lo.total, torch.stack([getattr(lo, k) for k in LOSS_TERMS]).float()


def freeze_unused(model: nn.Module) -> List[str]:
    """Freeze the parameters the loss never uses, so DDP finds no unused parameter and AdamW's weight decay,
    which also acts on a zero gradient, leaves them as initialised; returns their names."""
    unused = UNUSED_PARAMS
    if model.cfg.loss.local_weighting == "uniform":
        unused = UNUSED_PARAMS + WEIGHTING_PARAMS
    names = []
    for n, p in model.named_parameters():
        if n.startswith(unused):
            p.requires_grad_(False)
            names.append(n)
    return names


def amp_dtype(amp: str) -> Optional[torch.dtype]:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in dtypes:
        raise ValueError(f"amp {amp!r}: expected one of {list(dtypes)}")
    return dtypes[amp]


def batch_to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    lat = batch.get("has_lateral")
    if torch.is_tensor(lat) and lat.device.type == "cpu":
        # The model builds its packing plan from the host copy, so the forward needs no device->host sync.
        out["has_lateral_host"] = lat
    return out


def batch_problem(batch: Dict[str, Any]) -> Optional[str]:
    """Why the model cannot take this batch (None when it can); decided on the host, before any forward."""
    if BAD_BATCH in batch:
        return batch[BAD_BATCH]
    n = batch["frontal"].shape[0]
    if n < 2:  # the global heads' BatchNorm1d runs over the studies of the batch and needs two rows in training
        return f"{n} study in the batch: BatchNorm needs at least 2 rows in training"
    return None


def wrap_module(module: nn.Module, compile_: bool, distributed: bool, device: torch.device,
                backend: str = "inductor") -> nn.Module:
    """DDP, then torch.compile over it, the order PyTorch documents for compiled DDP models: dynamo's
    DDPOptimizer then splits the graph at DDP's bucket boundaries, so each bucket's gradient all-reduce starts
    while the rest of the backward still runs (DDP around a compiled module waits for the whole backward)."""
    if distributed:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if compile_:
        # One graph for model + losses (tests/test_train_compile.py checks there is no break); dynamic shapes, so
        # batches with other study/lateral counts reuse it instead of recompiling. Under DDP, fullgraph would
        # force dynamo through DDP's own forward (bucket rebuilds, reducer hooks), which it cannot trace:
        # dynamo skips that frame and compiles the wrapped module's forward inside it.
        module = torch.compile(module, fullgraph=not distributed, dynamic=True, backend=backend)
    return module


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (the DDP module under --compile with DDP), else ``module``."""
    return getattr(module, "_orig_mod", module)


@dataclass
class StepStats:
    """One optimizer step's numbers, summed over the ranks by the step's one all-reduce.

    Loss terms are sums over ranks of each rank's micro-batch mean (divide by the world size for the mean);
    ``grad_norm`` is the same on every rank after DDP's gradient all-reduce, so the sum is finite exactly when
    each rank's is. A step skipped for an unusable batch has NaN loss terms and 0 studies.
    """

    nonfinite: float  # micro-batches whose loss was NaN/inf
    stop: float  # > 0: a rank received a stop signal
    loss: float
    ita: float
    local: float
    temporal: float
    cross_local: float
    studies: float
    weights_bad: float = 0.0  # > 0: the previous update left a NaN/inf parameter or buffer
    grad_norm: float = 0.0

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def pack(cls, **parts: torch.Tensor) -> torch.Tensor:
        """The device vector, in field order, of one (1,)-tensor per field (float64: sums of many ranks' losses)."""
        return torch.cat([parts[n].reshape(1).double() for n in cls.names()])

    @classmethod
    def unpack(cls, values: List[float]) -> "StepStats":
        return cls(*values)

    @classmethod
    def skipped(cls, stop: float) -> "StepStats":
        """A step that ran no forward (an unusable batch on some rank)."""
        nan = float("nan")
        return cls(0.0, stop, nan, nan, nan, nan, nan, 0.0)

    def per_rank(self, world: int) -> Dict[str, float]:
        """The mean over ranks of the loss and its terms."""
        return {k: getattr(self, k) / world for k in ("loss",) + LOSS_TERMS}


@dataclass
class DeviceStats:
    """What :meth:`StepRunner.forward_backward` adds up on the device (no host sync)."""

    nonfinite: torch.Tensor
    loss: torch.Tensor
    terms: torch.Tensor  # (4,): LOSS_TERMS
    studies: torch.Tensor

    def parts(self) -> Dict[str, torch.Tensor]:
        return {"nonfinite": self.nonfinite, "loss": self.loss, "studies": self.studies,
                **{k: self.terms[i] for i, k in enumerate(LOSS_TERMS)}}


def nonfinite_flag(tensors: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(1,) float64 on ``device``: 1 when any tensor holds a NaN/inf, else 0. No host sync.

    One fused max-abs reduction per dtype (torch._foreach_norm, ord=inf: cannot overflow, NaN propagates).
    """
    flag = torch.zeros(1, device=device, dtype=torch.float64)
    groups: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            groups.setdefault(t.dtype, []).append(t.detach())
    for ts in groups.values():
        m = torch.stack(torch._foreach_norm(ts, ord=float("inf")))
        flag += (~torch.isfinite(m)).any().double()
    return flag


class StepRunner:
    """Forward/backward over the micro-batches of one optimizer step, and the guarded optimizer update."""

    def __init__(self, module: nn.Module, optimizer, device: torch.device, amp: str, accum_steps: int = 1,
                 clip_grad: Optional[float] = None):
        self.module, self.opt, self.device = module, optimizer, device
        self.dtype = amp_dtype(amp)
        self.accum, self.clip = accum_steps, clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # Every buffer a forward may write (BatchNorm running statistics and counters): copied before each
        # step's forward, so a skipped step can put them back (a NaN batch must not poison them).
        self.buffers = [b for b in module.buffers()]
        self._snapshot = [b.detach().clone() for b in self.buffers]
        self._norm: Optional[torch.Tensor] = None  # this step's gradient norm (grad_norm), on the device

    def forward_backward(self, batches: List[Dict[str, Any]]) -> DeviceStats:
        """Forward and backward of every micro-batch (gradients averaged over them); this rank's sums, no sync."""
        if self.buffers:
            torch._foreach_copy_(self._snapshot, self.buffers)  # ~17k numbers for ViT-B: one fused copy
        z = lambda n=1: torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        st = DeviceStats(z(), z(), z(len(LOSS_TERMS)), z())
        ddp = isinstance(unwrap_compiled(self.module), nn.parallel.DistributedDataParallel)
        for j, batch in enumerate(batches):
            # skip DDP's gradient all-reduce until the last micro-step
            sync = (not ddp) or j == len(batches) - 1
            with contextlib.nullcontext() if sync else unwrap_compiled(self.module).no_sync():
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    total, parts = self.module(batch)
                self.scaler.scale(total / len(batches)).backward()
            t = total.detach().double()
            st.nonfinite += (~torch.isfinite(t)).double()
            st.loss += t / len(batches)
            st.terms += parts.detach().double() / len(batches)
            st.studies += batch["frontal"].shape[0]
        return st

    def grad_norm(self) -> torch.Tensor:
        """(1,) float64 on the device: the L2 norm of all gradients (unscaled under fp16), as clip_grad_norm_
        computes it; NaN/inf when any gradient is. No host sync: it rides in the step's one stats all-reduce,
        and optimizer_step clips with the device value. Under DDP it is read after backward's all-reduce, so
        every rank holds the same gradients and the same norm."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)  # once per step; scaler.step then does not unscale again
        groups: Dict[torch.dtype, List[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad.detach())
        norms = [n for gs in groups.values() for n in torch._foreach_norm(gs, 2.0)]
        if norms:
            self._norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
        else:
            self._norm = torch.zeros((), device=self.device)
        return self._norm.double().reshape(1)

    def optimizer_step(self, lr: float) -> None:
        """The update, after the caller saw a finite loss and a finite :meth:`grad_norm` (computed here when
        the caller did not ask for it, e.g. a benchmark driving the runner directly)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.clip:
            if self._norm is None:
                self.grad_norm()
            # clip_grad_norm_'s coefficient, from the norm already computed (no second reduction, no sync)
            coef = torch.clamp(self.clip / (self._norm + 1e-6), max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._norm = None

    def skip_step(self) -> None:
        """Drop the step's gradients and restore the buffers its forward wrote. Under fp16 the loss scale is
        lowered as GradScaler does after an overflow (grad_norm's unscale_ recorded it)."""
        if self.scaler.is_enabled() and self._norm is not None:
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self._norm = None
        if self.buffers:
            torch._foreach_copy_(self.buffers, self._snapshot)

    def nonfinite_weights(self) -> torch.Tensor:
        """Device flag: 1 when a trained parameter or a floating buffer is NaN/inf (read at the next sync)."""
        return nonfinite_flag(self.params + self.buffers, self.device)
