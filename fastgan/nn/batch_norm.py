"""Batch norm whose batch statistics span every process of a data-parallel run.

``torch.nn.SyncBatchNorm`` only runs on GPUs; GAN training under
``torchrun`` on CPUs (and the gloo tests that check that a 2-process run equals
one process on the combined batch) needs the same on any device. In training
mode with an initialised process group of more than one rank, the per-channel
sum, sum of squares and count are all-reduced (differentiably, so gradients see
the global statistics too); otherwise it is exactly ``nn.BatchNorm{1,2}d``.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

# torch.distributed.nn.functional.all_reduce is the differentiable all-reduce; its suggested
# replacement (functional collectives) has no autograd for all_reduce, so the notice is muted here.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the union of all ranks' batches (any device, any backend).

    Inputs (N, C) or (N, C, *). Running statistics use the global unbiased variance,
    as single-process batch norm on the combined batch would.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C) or (N, C, ...), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and _distributed()):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        # Two passes, mean then the centred second moment: E[x²] − mean² cancels catastrophically
        # when |mean| ≫ std. The per-channel sums are taken in at least float32 and reduced in
        # float64, so neither a half-precision input nor a large count (held exactly) rounds them.
        channels = input.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        reduce_dims = [0] + list(range(2, input.dim()))
        accumulate = torch.promote_types(input.dtype, torch.float32)
        count = input.new_full((1,), input.numel() // channels, dtype=torch.float64)
        sums = all_reduce(torch.cat([input.sum(reduce_dims, dtype=accumulate).double(), count]))
        total = sums[-1]
        mean = (sums[:channels] / total).to(accumulate)
        centered = input.to(accumulate) - mean.view(shape)
        var = (all_reduce((centered * centered).sum(reduce_dims).double()) / total).to(accumulate)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1).clamp_min(1)).to(accumulate)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:  # torch's batch norm may be built affine with bias=False
            out = out + self.bias.view(shape)
        return out.to(input.dtype)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a
    :class:`CrossProcessBatchNorm` holding the same parameter and buffer tensors (as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does). Returns the converted module
    (a new one when ``module`` itself is a batch norm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"convert_batch_norm: {type(module).__name__} has no shape yet; run a forward first")
        # The module's own tensors, not copies: a frozen scale stays frozen, and an optimizer
        # built before the conversion still trains the model.
        converted = CrossProcessBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                          module.track_running_stats, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batch_norm(child))
    return module


__all__ = ["CrossProcessBatchNorm", "convert_batch_norm"]
