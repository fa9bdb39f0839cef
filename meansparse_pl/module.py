"""Adversarial training of image classifiers as a LightningModule (the models MeanSparse post-processes).

The paper (Amini et al., 2024, appendix A) trains its ResNet-18 ablation models with PGD-10 adversarial
training (Madry et al., 2018), TRADES (Zhang et al., 2019) or plain cross-entropy, evaluates clean and PGD
accuracy after every epoch and keeps the epoch with the best PGD accuracy. :class:`AdversarialClassifier`
does exactly that; the model-selection rule is the ``ModelCheckpoint(monitor="val/pgd_acc", mode="max")``
callback of the configs in ``configs/``.

Where the normalisation comes from: networks of :mod:`meansparse_pl.models` take ``[0, 1]`` images and
normalise inside, so the attack's eps-ball and ``[0, 1]`` box are in pixel space. The per-channel
mean / std is a constructor argument (``normalization``). The CLI links it from the datamodule when the
classes are instantiated, so the network is always built eagerly in ``__init__`` there. When the module is
used from Python with ``normalization=None``, the network is built lazily in :meth:`configure_model`
(Lightning's hook that runs after ``setup``), taking the attached datamodule's ``normalization`` or, without
one, the identity; the resolved value is written back into ``hparams`` so that a checkpoint always rebuilds
the very same network eagerly in ``load_from_checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from meansparse_pl.attacks import pgd_perturb, trades_loss
from meansparse_pl.checkpoint import load_model_or_weights, load_weights, placement_record, rebuild_operators
from meansparse_pl.config import (
    ThreatModel,
)
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.hyperparameters import (
    Normalization,
    Objective,
    checked_hyperparameters,
    plain_normalization,
)
from meansparse_pl.inputs import check_images, check_labels
from meansparse_pl.models import create_model
from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import BackwardMode, backward_mode, operators, set_alpha
from meansparse_pl.robustbench import load_robustbench_weights


class AdversarialClassifier(pl.LightningModule):
    """Image classifier trained with standard, PGD (Madry) or TRADES adversarial training.

    Attacks during training are generated with the network in **eval** mode: BatchNorm uses its running
    statistics, so the adversarial search neither updates them nor depends on the rest of the batch (as in
    the TRADES reference implementation and the MeanSparse training code). The training loss is then
    computed in train mode, and each submodule's own train flag is restored afterwards.

    Validation and test report clean accuracy and PGD accuracy (``val_attack_steps`` steps, same eps, norm,
    step size and random start as training) through torchmetrics objects, so Lightning reduces them across
    DDP processes. PGD needs input gradients: the attack re-enables them locally (``torch.enable_grad`` under
    ``torch.inference_mode(False)``, cloning the batch out of inference mode), so the module works with any
    ``Trainer(inference_mode=...)``; the configs set ``inference_mode: false`` anyway, which avoids the clone.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        normalization: Normalization | None = None,
        objective: Objective = "pgd",
        threat: ThreatModel = ThreatModel(),
        step_size: float = 0.0078,
        attack_steps: int = 10,
        random_start: bool = True,
        trades_beta: float = 6.0,
        val_attack_steps: int = 10,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (100, 150),
        lr_gamma: float = 0.1,
        init_checkpoint: str | None = None,
        operator_alpha: float | None = None,
        operator_backward: BackwardMode = "straight_through",
        norm: Literal["Linf", "L2"] | None = None,
        eps: float | None = None,
    ) -> None:
        """
        Args:
            backbone: Network name for ``meansparse_pl.models.create_model``: resnet18, preact_resnet18,
                wrn_28_10, wrn_34_10, wrn_70_16, small_cnn or torchvision:<name>.
            backbone_kwargs: Extra keyword arguments of the network, e.g. {"activation": "gelu"}.
            num_classes: Number of classes (linked from the datamodule by the CLI).
            in_channels: Input channels (linked from the datamodule by the CLI).
            normalization: Per-channel (mean, std) the network applies to its [0, 1] input (the CLI links
                it from the datamodule). None: build the network in configure_model() with the attached
                datamodule's normalization, or the identity (mean 0, std 1) without one.
            objective: standard (clean cross-entropy), pgd (Madry PGD-AT) or trades (Zhang et al.).
            threat: Threat model of the training and validation attacks: norm (Linf or L2) and eps in [0, 1]
                pixel units (paper: Linf 8/255), as every subcommand names it (--threat.*). eps must be > 0 for
                every objective, since validation always measures PGD accuracy.
            step_size: PGD step size (paper: 0.0078 for Linf eps 8/255).
            attack_steps: PGD steps of the training attack (paper: 10).
            random_start: Start PGD at a uniform random point of the eps-ball (training and validation).
            trades_beta: TRADES weight of the KL term (Zhang et al. use 6.0; the MeanSparse paper A.5 uses 0.6).
            val_attack_steps: PGD steps of the attack measuring val/pgd_acc and test/pgd_acc.
            optimizer: sgd (paper) or adam.
            lr: Initial learning rate (paper: 0.1 with SGD).
            momentum: SGD momentum (paper: 0.9); ignored by adam.
            weight_decay: L2 weight decay (paper: 5e-4).
            lr_milestones: Epochs at which the learning rate is multiplied by lr_gamma (paper: 100, 150).
            lr_gamma: Learning-rate decay factor at each milestone (paper: 0.1).
            init_checkpoint: Start from these weights instead of a random initialisation (fine-tuning): a
                sparsified, calibrated MeanSparse checkpoint (its operators are rebuilt and trained through),
                a Lightning checkpoint or a plain state dict of the network. Loaded once, when the network is
                set up (``configure_model``); a ``ckpt_path`` given to ``fit`` is restored on top of it.
            operator_alpha: The alpha of every MeanSparse operator while fine-tuning (None: the checkpoint's).
                0 makes every operator the identity in the forward and the backward pass: the equal-budget
                control, the base network fine-tuned the same way without operators.
            operator_backward: How the training attack, the loss and the validation attack differentiate
                through the operators: straight_through (BPDA: identity backward, the default; the exact
                gradient is zero inside the band and would mask the attack), surrogate (a smooth sigmoid
                relaxation of the band) or exact.
            norm: Old name of threat.norm (accepted until meansparse_pl 0.3; checkpoints that store it load).
            eps: Old name of threat.eps (accepted until meansparse_pl 0.3; checkpoints that store it load).
        """
        super().__init__()
        # every argument above, by name; LightningCLI's instantiator and class path are left out, so a checkpoint
        # names no import path for load_from_checkpoint to follow
        self.save_hyperparameters(ignore=["_instantiator", "_class_path"])
        # then stored checked, as plain Python types, so that checkpoints load with weights_only=True; the old
        # names norm / eps live on in threat
        checked = checked_hyperparameters(self.hparams)
        for old in ("norm", "eps"):
            self.hparams.pop(old, None)
        self.save_hyperparameters(checked)
        self.threat = ThreatModel(**self.hparams.threat)
        self.started_from: str | None = None  # the init_checkpoint once loaded (never loaded twice)

        self.model: nn.Module | None = None
        if self.hparams.normalization is not None:
            self.model = self._build(self.hparams.normalization)
        else:
            # Fail on an unknown backbone now, not at setup: build on the meta device (no memory, no init).
            with torch.device("meta"):
                self._build(None)

        # One metric collection per stage: Lightning calls compute() at epoch end, which reduces the counts over
        # DDP processes (micro average = correct / total over the whole set). Keys are the logged names.
        def accuracy() -> MulticlassAccuracy:
            return MulticlassAccuracy(self.hparams.num_classes, average="micro")

        # (no compute groups: clean and PGD accuracy are updated with different inputs)
        self.train_metrics = MetricCollection({"acc": accuracy()}, prefix="train/", compute_groups=False)
        self.val_metrics = MetricCollection(
            {"clean_acc": accuracy(), "pgd_acc": accuracy()}, prefix="val/", compute_groups=False
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    # ----------------------------------------------------------------------------------------- the network
    def _build(self, normalization: Normalization | None) -> nn.Module:
        hp = self.hparams
        return create_model(
            hp.backbone,
            num_classes=hp.num_classes,
            in_channels=hp.in_channels,
            normalization=normalization,
            **hp.backbone_kwargs,
        )

    def architecture(self) -> dict[str, Any]:
        """How to rebuild this network from the model registry (stored in MeanSparse checkpoints)."""
        hp = self.hparams
        kwargs = {"num_classes": hp.num_classes, "in_channels": hp.in_channels, **hp.backbone_kwargs}
        if hp.normalization is not None:
            kwargs["normalization"] = hp.normalization
        return {"name": hp.backbone, "kwargs": kwargs}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A sparsified network also saves its placement, so loading can rebuild the operators."""
        if self.model is not None and getattr(self.model, "meansparse_placement", None) is not None:
            checkpoint["meansparse"] = placement_record(self.model, self.architecture())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-insert MeanSparse operators before Lightning loads a sparsified state dict into the network."""
        record = checkpoint.get("meansparse")
        if (
            record is None
            or self.model is None
            or getattr(self.model, "meansparse_placement", None) is not None
        ):
            return
        self.model = rebuild_operators(self.model, record)

    def configure_model(self) -> None:
        """Build the network now if ``normalization`` was left to the datamodule (see the module docstring), then
        load ``init_checkpoint`` into it (once)."""
        if self.model is None:
            self.model = self._build(self._resolved_normalization())
        if self.hparams.init_checkpoint is not None and self.started_from is None:
            self.start_from(self.hparams.init_checkpoint)

    def start_from(self, path: str | os.PathLike) -> None:
        """Load the weights to fine-tune (see ``init_checkpoint``) and set ``operator_alpha`` on the operators."""
        if not Path(path).is_file():
            raise ConfigurationError(f"init_checkpoint {path} is not a file; check the path.")
        self.model = load_model_or_weights(path, self._network())
        alpha = self.hparams.operator_alpha
        if alpha is not None:
            if not operators(self.model):
                raise ConfigurationError(
                    f"operator_alpha is set but {path} has no MeanSparse operators; start from a sparsified, "
                    "calibrated checkpoint (cli.py postprocess or the MeanSparseCallback) or drop operator_alpha."
                )
            set_alpha(self.model, alpha)
        self.started_from = str(path)
        if operators(self.model):
            rank_zero_info(
                f"fine-tuning from {path} with {len(operators(self.model))} MeanSparse operators (alpha "
                f"{', '.join(sorted({f'{a:g}' for a in (float(op.alpha) for op in operators(self.model))}))}, "
                f"{self.hparams.operator_backward} backward)"
            )

    def _resolved_normalization(self) -> Normalization:
        normalization = None
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "normalization", None) is not None:
            normalization = plain_normalization(datamodule.normalization, self.hparams.in_channels)
        if normalization is None:
            c = self.hparams.in_channels
            normalization = ((0.0,) * c, (1.0,) * c)  # identity, stated explicitly so checkpoints rebuild it
        self.hparams["normalization"] = normalization
        return normalization

    def _through_operators(self) -> contextlib.AbstractContextManager:
        """The operators' backward while training and validating (``operator_backward``); a no-op without them."""
        return backward_mode(self._network(), self.hparams.operator_backward)

    def _network(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "the network is built in configure_model() because normalization=None; run it through a "
                "Trainer or pass normalization=(mean, std) to the constructor."
            )
        return self.model

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the network for images ``x`` in [0, 1]."""
        return self._network()(x)

    # --------------------------------------------------------------------------------------------- attacks
    def attack(self, x: Tensor, y: Tensor, steps: int) -> Tensor:
        """PGD adversarial examples for ``(x, y)``, generated with the network in eval mode."""
        hp = self.hparams
        model = self._network()
        with eval_mode(model), self._through_operators():
            return pgd_perturb(
                model,
                x,
                y,
                eps=self.threat.eps,
                step_size=hp.step_size,
                steps=steps,
                norm=self.threat.norm,
                random_start=hp.random_start,
            )

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The objective's loss and the logits it was computed from (for the training accuracy).

        Kept separate from :meth:`training_step` so that the plain-PyTorch benchmark loop and the tests run
        exactly the same computation.
        """
        with self._through_operators():
            return self._objective(x, y)

    def _objective(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        model = self._network()
        if hp.objective == "standard":
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        if hp.objective == "pgd":
            x_adv = self.attack(x, y, hp.attack_steps)
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits
        loss, _, adv_logits = trades_loss(
            model,
            x,
            y,
            eps=self.threat.eps,
            step_size=hp.step_size,
            steps=hp.attack_steps,
            beta=hp.trades_beta,
            norm=self.threat.norm,
        )
        return loss, adv_logits

    # ------------------------------------------------------------------------------------------ lightning
    def _check_first_batch(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """The input contract (:mod:`meansparse_pl.inputs`) on each epoch's first batch of a stage: finite
        [0, 1] pixels and labels of the model's classes (one host read per epoch)."""
        if batch_idx == 0:
            x, y = batch
            check_labels(
                y,
                self.hparams.num_classes,
                check_images(x, where=f"{stage} batch 0").shape[0],
                where=f"{stage} batch 0",
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self._check_first_batch(batch, batch_idx, "training")
        x, y = batch
        loss, logits = self.training_loss(x, y)
        self.train_metrics(logits.detach(), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: Literal["val", "test"]) -> None:
        x, y = batch
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        model = self._network()
        logits = model(x)
        metrics["clean_acc"](logits, y)
        # pgd_perturb re-enables gradients itself, also under Lightning's no_grad / inference_mode.
        x_adv = self.attack(x, y, self.hparams.val_attack_steps)
        with torch.no_grad():
            adv_logits = model(x_adv)
        metrics["pgd_acc"](adv_logits, y)
        n = len(y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=n)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._check_first_batch(batch, batch_idx, "validation")
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._check_first_batch(batch, batch_idx, "test")
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD (or Adam) with a step decay at ``lr_milestones`` epochs, the paper's schedule."""
        hp = self.hparams
        params = self._network().parameters()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(hp.lr_milestones), gamma=hp.lr_gamma
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def load_trained_weights(module: pl.LightningModule, path: str | os.PathLike, *, from_network: bool) -> None:
    """Trained weights into ``module.model`` (``postprocess``'s input): a RobustBench file (its own key
    conventions) for a ``robustbench`` backbone, else a Lightning checkpoint or a plain state dict of the
    network; ``from_network``: the network is a ``--network`` of its own, not the backbone."""
    hparams: Any = getattr(module, "hparams", {})
    if not from_network and hparams.get("backbone") == "robustbench":
        options = hparams.get("backbone_kwargs") or {}
        if "model_name" not in options:
            raise ConfigurationError(
                "backbone robustbench needs backbone_kwargs.model_name (a RobustBench name)."
            )
        load_robustbench_weights(module.model, path, options["model_name"], options.get("dataset", "cifar10"))
        return
    load_weights(module.model, path, hint="check model.backbone / backbone_kwargs or --network.")
