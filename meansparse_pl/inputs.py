"""The input contract: what every path that consumes images and labels (calibration, the alpha search,
evaluation, comparison, fine-tuning) checks, so that bad data is one clear error instead of a number.

* images: a floating tensor ``(N, *input_shape)``, every pixel finite and, for image batches ``(N, C, H, W)``, in
  [0, 1] (0-255 pixels, normalised pixels and NaN each get their own fix; other inputs, such as token
  embeddings, only finite); float64 is converted to the model's dtype;
* labels: integer class indices ``(N,)`` in ``[0, num_classes)``, ``num_classes`` read from the model's output;
* the model's output: one logits tensor ``(N, num_classes)`` (a tuple, a dict or an output object is refused
  with the fix: make ``forward`` return the logits).

The first batch is checked in full at once (:func:`check_images`, :func:`check_labels`, :func:`logits_of`:
one host read). Every later batch is checked by :class:`InputProblems`, a torchmetrics ``Metric`` whose counts
stay on the device (no host read per batch, which would be a device sync on a GPU) and are merged across
processes by torchmetrics; :meth:`InputProblems.verify` reads them once, at the end of the pass, before
anything is reported or written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from meansparse_pl.errors import ConfigurationError, DataFormatError, PixelRangeError


def parameter_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (``default`` without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def range_problem(low: float, high: float, nonfinite: int) -> str | None:
    """What is wrong with images whose finite pixels span ``[low, high]`` with ``nonfinite`` NaN / Inf pixels
    (images outside [0, 1]), and the fix; None when nothing is."""
    if nonfinite:
        return (
            f"{nonfinite} pixels are NaN or infinite; clean the data (a failed decode, or a division by zero "
            "in the transforms) before calibrating or evaluating"
        )
    if low >= 0 and 1 < high <= 255:
        return (
            f"the pixels reach {high:g}: 0-255 values, not [0, 1]; divide the images by 255 (torchvision's "
            "ToTensor does)"
        )
    if low < 0:
        return (
            f"the pixels span [{low:.3g}, {high:.3g}], not [0, 1]: the images look normalised; remove Normalize "
            "from the data transforms and let the model normalise its input (its normalization)"
        )
    if high > 1:
        return f"the pixels span [{low:.3g}, {high:.3g}], not [0, 1]; scale the images into [0, 1]"
    return None


def _pixel_summary(images: Tensor) -> Tensor:
    """``[nonfinite count, finite min, finite max]`` (float64) of a batch, computed where the batch is."""
    finite = torch.isfinite(images)
    values = images.detach()
    low = torch.where(finite, values, torch.full_like(values, math.inf)).amin()
    high = torch.where(finite, values, torch.full_like(values, -math.inf)).amax()
    return torch.stack([(~finite).sum().to(torch.float64), low.to(torch.float64), high.to(torch.float64)])


def check_images(
    images: Any,
    *,
    where: str,
    input_shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The first batch's images in full (one host read): a floating tensor of ``input_shape`` (when known), all
    pixels finite and in [0, 1]. Returns them, float64 converted to ``dtype`` (the model's)."""
    if not isinstance(images, Tensor):
        raise DataFormatError(
            f"{where}: the images are a {type(images).__name__}, not a tensor; yield (image tensor, label) pairs "
            "(torchvision's ToTensor makes the tensors)."
        )
    if not images.is_floating_point():
        raise DataFormatError(
            f"{where}: the images are {str(images.dtype).removeprefix('torch.')}, not floating point; convert "
            "them to float in [0, 1] (images.float() / 255 for 8-bit pixels, or torchvision's ToTensor)."
        )
    if input_shape is not None:
        _check_shape(images, tuple(int(s) for s in input_shape), where)
    if images.numel():
        nonfinite, low, high = _pixel_summary(images).tolist()
        if images.dim() != 4:  # not image batches (tokens, features, signals): only finiteness applies
            low, high = min(max(low, 0.0), 1.0), max(min(high, 1.0), 0.0)
        problem = range_problem(low, high, int(nonfinite))
        if problem is not None:
            raise PixelRangeError(f"{where}: {problem}.")
    if images.dtype == torch.float64 and dtype is not None and dtype != torch.float64:
        images = images.to(dtype)
    return images


def _check_shape(images: Tensor, expected: tuple[int, ...], where: str) -> None:
    got = tuple(images.shape[1:])
    if got == expected:
        return
    if images.dim() == len(expected) and expected[0] == 1 and tuple(images.shape[1:]) == expected[1:]:
        raise DataFormatError(
            f"{where}: the images have shape {tuple(images.shape)} (N, H, W) without a channel axis, and the model "
            f"takes {expected}; add the channel axis (images.unsqueeze(1), or ToTensor on each image)."
        )
    raise ConfigurationError(
        f"{where}: the images have shape {got} but the model's operators were placed for {expected} (channels, "
        "height, width); use data of that shape, or sparsify the model again for this one."
    )


def check_labels(labels: Any, num_classes: int, num_images: int, *, where: str) -> Tensor:
    """The first batch's labels in full (one host read): integer class indices ``(N,)`` in
    ``[0, num_classes)``. Returns them as a tensor."""
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DataFormatError(
            f"{where}: the labels are {str(labels.dtype).removeprefix('torch.')}; give class indices as integers "
            "(torch.long)."
        )
    if labels.dim() != 1 or labels.shape[0] != num_images:
        hint = " (one-hot labels? give labels.argmax(1))" if labels.dim() == 2 else ""
        raise DataFormatError(
            f"{where}: the labels have shape {tuple(labels.shape)} for {num_images} images; give one class index "
            f"per image, shape ({num_images},){hint}."
        )
    if labels.numel():
        low, high = torch.stack([labels.amin(), labels.amax()]).tolist()
        if low < 0 or high >= num_classes:
            raise DataFormatError(f"{where}: {label_problem(int(low), int(high), num_classes)}.")
    return labels


def label_problem(low: int, high: int, num_classes: int) -> str:
    return (
        f"the labels span [{low}, {high}] but the model has {num_classes} outputs (classes 0-{num_classes - 1}), so "
        "those samples could never count as correct; fix the labels (negative or 1-based ones?) or use a model "
        "with one output per class of the data"
    )


def logits_of(outputs: Any, num_images: int, *, where: str) -> Tensor:
    """The model's output as one logits tensor ``(N, classes)``, or one error naming what it returned and the
    fix."""
    if isinstance(outputs, Tensor):
        if outputs.dim() == 2 and outputs.shape[0] == num_images and outputs.shape[1] >= 1:
            return outputs
        raise DataFormatError(
            f"{where}: the model returns a tensor of shape {tuple(outputs.shape)} for {num_images} images, not "
            f"logits ({num_images}, classes); make its forward return one row of class scores per image."
        )
    if isinstance(outputs, Mapping):
        what = f"a dict with keys {sorted(map(str, outputs))}"
    elif isinstance(outputs, tuple | list):
        what = f"a {type(outputs).__name__} of {len(outputs)}"
    else:
        what = f"a {type(outputs).__name__}" + (" (with .logits)" if hasattr(outputs, "logits") else "")
    raise DataFormatError(
        f"{where}: the model returns {what}, not a logits tensor (N, classes); wrap it in a module whose forward "
        "returns the logits alone (e.g. model(x)[0], model(x)['logits'] or model(x).logits)."
    )


def check_finite_logits(logits: Tensor, *, where: str) -> None:
    """The first batch's logits (one host read): NaN or infinite outputs on valid images are a broken model,
    not a data problem (later batches: a non-finite row never counts as a correct prediction)."""
    if not bool(torch.isfinite(logits).all()):
        raise DataFormatError(
            f"{where}: the model's outputs are NaN or infinite on finite images in [0, 1] (diverged weights, or a "
            "zero std in its normalization?); fix the model: a NaN output is never a correct prediction."
        )


class InputProblems(Metric):
    """Every batch's cheap check, kept on the device and merged across processes by torchmetrics: NaN / Inf
    pixels, the finite pixel range, and labels outside ``[0, num_classes)``. :meth:`verify` reads it once."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nonfinite", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("low", torch.full((), math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("high", torch.full((), -math.inf, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("bad_labels", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("label_low", torch.full((), math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("label_high", torch.full((), -math.inf, dtype=torch.float64), dist_reduce_fx="max")
        # the first batch (in this process's order) with a problem, for the message
        self.add_state("first_bad_batch", torch.full((), math.inf, dtype=torch.float64), dist_reduce_fx="min")

    def update(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        num_classes: int | None = None,
        batch: int = 0,
    ) -> None:
        before = self.nonfinite + self.bad_labels
        outside_before = (self.low < 0) | (self.high > 1)
        if images.numel():
            nonfinite, low, high = _pixel_summary(images).to(self.nonfinite.device).unbind()
            if images.dim() != 4:  # not image batches: only finiteness applies
                low, high = low.clamp(0.0, 1.0), high.clamp(0.0, 1.0)
            self.nonfinite += nonfinite
            self.low = torch.minimum(self.low, low)
            self.high = torch.maximum(self.high, high)
        if labels is not None and num_classes is not None and labels.numel():
            outside = ((labels < 0) | (labels >= num_classes)).sum().to(self.bad_labels)
            self.bad_labels += outside
            self.label_low = torch.minimum(self.label_low, labels.amin().to(self.label_low))
            self.label_high = torch.maximum(self.label_high, labels.amax().to(self.label_high))
        bad = (self.nonfinite + self.bad_labels > before) | (
            ((self.low < 0) | (self.high > 1)) & ~outside_before
        )
        self.first_bad_batch = torch.where(
            bad & torch.isinf(self.first_bad_batch),
            torch.full_like(self.first_bad_batch, batch),
            self.first_bad_batch,
        )

    def compute(self) -> Tensor:
        return torch.stack(
            [
                self.nonfinite,
                self.low,
                self.high,
                self.bad_labels,
                self.label_low,
                self.label_high,
                self.first_bad_batch,
            ]
        )

    def verify(self, where: str, num_classes: int | None = None) -> None:
        """One host read of the merged counts; one error naming the problem, the first batch with it and the
        fix, if there is one (every process of a merged pass raises the same one). ``where`` is e.g.
        ``"calibration"``."""
        nonfinite, low, high, bad_labels, label_low, label_high, first = self.compute().tolist()
        at = f"{where} batch {int(first)}" if math.isfinite(first) else where
        if math.isfinite(low):  # no image at all leaves the range empty: nothing to say about pixels
            problem = range_problem(low, high, int(nonfinite))
            if problem is not None:
                raise PixelRangeError(f"{at}: {problem}.")
        if bad_labels and num_classes is not None:
            problem = label_problem(int(label_low), int(label_high), num_classes)
            raise DataFormatError(f"{at}: {int(bad_labels)} samples: {problem}.")


def sample_pair(sample: Any, index: int) -> tuple[Any, Any]:
    """``(image, label)`` of one data-set sample: a pair (or longer tuple) or a dict with ``image`` / ``input``
    and ``label`` / ``target`` keys."""
    if isinstance(sample, Mapping):
        image = next((sample[k] for k in ("image", "input", "img") if k in sample), None)
        label = next((sample[k] for k in ("label", "target", "labels") if k in sample), None)
        if image is None or label is None:
            raise DataFormatError(
                f"sample {index} is a dict with keys {sorted(map(str, sample))}; give (image, label) pairs or a "
                "dict with 'image' and 'label' keys."
            )
        return image, label
    if isinstance(sample, tuple | list) and len(sample) >= 2:
        return sample[0], sample[1]
    raise DataFormatError(
        f"sample {index} is a {type(sample).__name__}, not an (image, label) pair; the data set must return "
        "(image, label) for evaluation."
    )


__all__ = [
    "InputProblems",
    "check_finite_logits",
    "check_images",
    "check_labels",
    "label_problem",
    "parameter_dtype",
    "logits_of",
    "range_problem",
    "sample_pair",
]
