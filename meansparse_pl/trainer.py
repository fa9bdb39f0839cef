"""A Trainer with the MeanSparse subcommands: ``postprocess``, ``alpha_search`` and ``evaluate``.

LightningCLI builds each subcommand's options from the method's signature (so every argument below is a
``--name`` option and a config key) and passes the configured ``model`` and ``datamodule``. Each step runs
through ``Trainer.predict``, so ``--trainer.devices`` / ``--trainer.strategy`` shard the work across GPUs
or nodes (predict never pads the data, so every sample counts once), with Lightning's progress bar.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.alpha_search import (
    PAPER_ALPHAS,
    SEARCH_ATTACKS,
    AlphaSearch,
    Criterion,
    Elimination,
    Schedule,
    Selection,
)
from meansparse_pl.calibration import StatisticsCollector, _inputs_of
from meansparse_pl.checkpoint import load_checkpoint, load_weights, safe_load, save_checkpoint
from meansparse_pl.errors import CheckpointError, ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, run_tasks, worst_case
from meansparse_pl.io import atomic_write_json, atomic_write_text
from meansparse_pl.operator import Centre, _require_operators, check_alpha, get_alpha, set_alpha
from meansparse_pl.placement import Strategy, describe, sparsify
from meansparse_pl.report import COMPOSITE_ATTACKS, RobustnessReport, VariantResult, summarise

DEFAULT_EVALUATE_ATTACKS = ("clean", "autoattack", "apgd-ce", "apgd-ce+dlr", "bpda-apgd-ce")


class CalibrationModule(pl.LightningModule):
    """Feeds each predict batch to a :class:`StatisticsCollector`; statistics are merged at the end."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0
        self._observing = contextlib.ExitStack()
        self.collector: StatisticsCollector | None = None

    def on_predict_start(self) -> None:
        self.collector = StatisticsCollector(self.model)
        self._observing.enter_context(self.collector.observing())

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        assert self.collector is not None
        images = _inputs_of(batch)
        if not torch.isfinite(images).all():
            raise ConfigurationError(
                f"calibration batch {batch_idx} contains NaN or Inf pixels; clean the data."
            )
        self.collector.observe(images)

    def on_predict_end(self) -> None:
        self._observing.close()
        assert self.collector is not None
        self.images = self.collector.finish()


def _subset(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if limit < 1:
        raise ConfigurationError(f"limit_samples must be >= 1 or null, got {limit}.")
    return Subset(dataset, range(limit))


class MeanSparseTrainer(pl.Trainer):
    """``pl.Trainer`` plus the post-processing steps; see the module docstring."""

    def _sparse_model(self, model: pl.LightningModule, checkpoint: str) -> nn.Module:
        sparse = load_checkpoint(checkpoint, fallback_model=getattr(model, "model", None))
        operators = _require_operators(sparse)
        if not all(op.is_calibrated for op in operators):
            raise CheckpointError(
                f"{checkpoint} has uncalibrated MeanSparse operators; run `cli.py postprocess` on it first."
            )
        return sparse.to(self.strategy.root_device)

    # ------------------------------------------------------------------------------------ postprocess
    def postprocess(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str | None = None,
        network: nn.Module | None = None,
        output: str = "runs/meansparse.pt",
        alpha: float = 0.0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sites: list[int] | None = None,
        centre: Centre = "channel_mean",
        strategy: Strategy = "auto",
        leaf_modules: list[str] | None = None,
        preset: str = "activations",
    ) -> None:
        """Insert MeanSparse operators into a trained model and collect their statistics on the training split.

        Args:
            checkpoint: Trained weights: a Lightning checkpoint of the model or a state dict of the network.
            network: Any nn.Module (class_path + init_args) to use instead of the model section's backbone.
            output: Where to write the sparsified checkpoint.
            alpha: Alpha stored in the output (choose it with alpha_search; 0 = identical to the base model).
            include: fnmatch patterns of activation module paths to sparsify (default: all).
            exclude: fnmatch patterns to leave out (e.g. "*.se.*" for squeeze-and-excitation blocks).
            sites: Keep only these activation site indices (paper A.9 ablations).
            centre: Band centre: channel_mean (paper), zero or global_mean (paper A.7).
            strategy: Placement strategy: auto (torch.fx, else hooks), fx or hooks.
            leaf_modules: fnmatch patterns of submodules torch.fx should not trace into.
            preset: Site rule: activations (paper), or the published models' published_wrn,
                published_convnext, published_swin (also after residual sums / MLP outputs).
        """
        check_alpha(alpha)
        if network is not None:
            model.model = network
        if getattr(model, "model", None) is None:
            raise ConfigurationError("no network to post-process: configure model.backbone or --network.")
        if checkpoint:
            _load_trained_weights(model, checkpoint, from_network=network is not None)
        datamodule.setup("fit")
        loader = datamodule.calibration_dataloader()
        example = _inputs_of(next(iter(loader)))[:1]
        start = time.perf_counter()
        sparse = sparsify(
            model.model,
            example,
            include=include,
            exclude=exclude,
            sites=sites,
            centre=centre,
            strategy=strategy,
            leaf_modules=leaf_modules or (),
            preset=preset,
        )
        calibration = CalibrationModule(sparse)
        self.predict(calibration, dataloaders=loader, return_predictions=False)
        set_alpha(sparse, alpha)
        summary = {
            "images": calibration.images,
            "seconds": round(time.perf_counter() - start, 2),
            "limit_predict_batches": self.limit_predict_batches,
            "source_checkpoint": checkpoint,
        }
        if self.is_global_zero:
            architecture = (
                model.architecture() if network is None and hasattr(model, "architecture") else None
            )
            save_checkpoint(sparse, output, architecture=architecture, metadata={"calibration": summary})
            rank_zero_info(
                f"{describe(sparse)}\n\nStatistics over {calibration.images} training images in "
                f"{summary['seconds']} s; wrote {output}"
            )
        self.strategy.barrier("postprocess_saved")

    # ----------------------------------------------------------------------------------- alpha_search
    def alpha_search(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str,
        alphas: list[float] = list(PAPER_ALPHAS),  # noqa: B006 - LightningCLI reads the default from here
        eps: float = 8 / 255,
        norm: Literal["Linf", "L2"] = "Linf",
        attacks: list[str] = list(SEARCH_ATTACKS),  # noqa: B006
        n_iter: int = 100,
        max_clean_drop: float = 0.5,
        criterion: Criterion = "worst_case",
        seed: int = 0,
        batch_size: int = 256,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/alpha_search",
        resume: bool = True,
        write_alpha: bool = True,
        schedule: Schedule = "exhaustive",
        elimination: Elimination = "half",
        selection: Selection = "highest",
        nonzero_finalists: int = 2,
    ) -> None:
        """Choose alpha on the held-out validation split (never the test set) and write it into the checkpoint.

        Args:
            checkpoint: Sparsified, calibrated checkpoint (from postprocess or MeanSparseCallback).
            alphas: Grid of alpha values (paper: 0, 0.15, ..., 0.5); 0 is always included.
            eps: Attack radius in [0, 1] pixel units.
            norm: Threat model: Linf or L2.
            attacks: Robust columns (default APGD-CE, APGD-DLR and BPDA-APGD-CE).
            n_iter: APGD iterations per attack.
            max_clean_drop: Clean-accuracy points an alpha may lose against alpha = 0.
            criterion: worst_case (per-sample worst case over all attacks) or apgd (the paper's rule).
            seed: Attack seed.
            batch_size: Evaluation batch size.
            limit_samples: Use the first N held-out images (null: all).
            output_dir: Where alpha_search.md / .json / .png and the resume state go.
            resume: Continue an interrupted search from its state file.
            write_alpha: Store the chosen alpha (and the search result) in the checkpoint.
            schedule: exhaustive (every alpha on every image) or successive_halving (growing subsets,
                dropping alphas early; see benchmarks/README.md for its measured agreement and cost).
            elimination: successive_halving only: half (drop the worse half every round) or clearly_worse
                (drop only alphas ruled out by two paired standard errors).
            selection: highest (the highest criterion accuracy) or smallest_within_error (the smallest alpha
                within one paired standard error of the highest: a more reproducible choice when alphas are
                within noise of each other).
            nonzero_finalists: successive_halving only: the non-zero alphas that reach the final round on
                every image (default 2).
        """
        search = AlphaSearch(
            alphas,
            eps,
            norm,
            attacks,
            n_iter,
            max_clean_drop,
            criterion,
            seed,
            batch_size,
            schedule=schedule,
            elimination=elimination,
            selection=selection,
            nonzero_finalists=nonzero_finalists,
        )
        sparse = self._sparse_model(model, checkpoint)
        datamodule.setup("fit")
        dataset = _subset(datamodule.val_dataloader().dataset, limit_samples)
        out = Path(output_dir)
        state = out / "alpha_search.state" if resume else None
        result = search.run(sparse, dataset, trainer=self, state_path=state)
        if self.is_global_zero:
            atomic_write_text(out / "alpha_search.md", result.table() + "\n")
            atomic_write_json(out / "alpha_search.json", result.to_json())
            result.plot(out / "alpha_search.png")
            if write_alpha:
                set_alpha(sparse, result.suggestion())
                payload = safe_load(checkpoint)
                metadata = dict(payload.get("metadata") or {})
                metadata["alpha_search"] = result.to_json()
                architecture = (payload.get("meansparse") or {}).get("architecture")
                save_checkpoint(sparse.cpu(), checkpoint, architecture=architecture, metadata=metadata)
            print(result.table())
            print(
                f"\nwrote {out}/alpha_search.{{md,json,png}}"
                + (f"; alpha stored in {checkpoint}" if write_alpha else "")
            )
        self.strategy.barrier("alpha_search_saved")

    # --------------------------------------------------------------------------------------- evaluate
    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str,
        attacks: list[str] = list(DEFAULT_EVALUATE_ATTACKS),  # noqa: B006
        eps: list[float] = [8 / 255],  # noqa: B006
        norm: Literal["Linf", "L2"] = "Linf",
        alpha: float | None = None,
        compare_base: bool = True,
        attack_options: dict[str, dict[str, Any]] | None = None,
        large_eps: float | None = None,
        split: Literal["test", "val"] = "test",
        seed: int = 0,
        batch_size: int = 256,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/evaluate",
        resume: bool = True,
        histogram_site: int | None = None,
    ) -> None:
        """Attack the MeanSparse model and its base model; report per-attack and best-known accuracy.

        Args:
            checkpoint: Sparsified, calibrated checkpoint (alpha from alpha_search).
            attacks: clean, autoattack, apgd-ce, apgd-dlr, apgd-ce+dlr, apgd-t, fab-t, pgd, square,
                bpda-apgd-ce, adaptive.
            eps: One or more attack radii (paper Table 9 sweeps 1/255 ... 16/255).
            norm: Threat model: Linf or L2.
            alpha: Override the checkpoint's alpha.
            compare_base: Also evaluate alpha = 0 (the base model) side by side.
            attack_options: Per-attack options, e.g. {"apgd-ce": {"n_iter": 100}, "pgd": {"steps": 50}}.
            large_eps: Also run APGD-CE and BPDA-APGD-CE at this radius; accuracy must be about zero.
            split: test (reported numbers) or val.
            seed: Attack seed.
            batch_size: Evaluation batch size.
            limit_samples: First N images of the split (null: all).
            output_dir: Where evaluation.md / .json, plots and the resume state go.
            resume: Continue an interrupted evaluation from its state file.
            histogram_site: Also plot this operator site's channel histogram before / after (paper Fig. 1).
        """
        if not eps or any(not e > 0 for e in eps):
            raise ConfigurationError(f"every eps must be > 0, got {eps}; e.g. eps: [0.0313725].")
        if large_eps is not None and not large_eps > 0:
            raise ConfigurationError(f"large_eps must be > 0 or null, got {large_eps}.")
        sparse = self._sparse_model(model, checkpoint)
        alpha = get_alpha(sparse) if alpha is None else check_alpha(alpha)
        variants = [("meansparse", alpha)] + ([("base", 0.0)] if compare_base and alpha != 0 else [])
        options = attack_options or {}
        atomic = sorted(
            {a for name in attacks for a in COMPOSITE_ATTACKS.get(name, (name,))}, key=attacks_order(attacks)
        )
        tasks = [
            EvaluationTask(f"{v}/eps={e:g}/{a}", a, e, norm, dict(options.get(a, {})), va)
            for v, va in variants
            for e in eps
            for a in atomic
        ]
        if large_eps is not None:
            tasks += [
                EvaluationTask(f"{v}/large/{a}", a, large_eps, norm, dict(options.get(a, {})), va)
                for v, va in variants
                for a in ("apgd-ce", "bpda-apgd-ce")
            ]
        datamodule.setup("test" if split == "test" else "fit")
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        dataset = _subset(loader.dataset, limit_samples)
        out = Path(output_dir)
        per_sample = run_tasks(
            sparse,
            dataset,
            tasks,
            batch_size=batch_size,
            seed=seed,
            state_path=out / "evaluation.state" if resume else None,
            trainer=self,
        )
        results = []
        for v, va in variants:
            for e in eps:
                subset = {a: per_sample[f"{v}/eps={e:g}/{a}"] for a in atomic}
                results.append(VariantResult(v, va, e, summarise(subset, attacks)))
        report = RobustnessReport(norm, len(dataset), list(attacks), results, large_eps=large_eps)  # type: ignore[arg-type]
        if large_eps is not None:
            for v, _ in variants:
                both = [per_sample[f"{v}/large/{a}"] for a in ("apgd-ce", "bpda-apgd-ce")]
                report.large_eps_check[v] = 100.0 * sum(worst_case(both).values()) / len(dataset)  # type: ignore[arg-type]
        if self.is_global_zero:
            atomic_write_text(out / "evaluation.md", report.table() + "\n")
            atomic_write_json(out / "evaluation.json", report.to_json())
            if histogram_site is not None:
                _histogram(
                    sparse, dataset, histogram_site, alpha, out / f"histogram_site{histogram_site}.png"
                )
            print(report.table())
            print(f"\nwrote {out}/evaluation.{{md,json}}")
        self.strategy.barrier("evaluate_saved")


def attacks_order(attacks: Sequence[str]):
    """Sort key keeping the user's attack order for the atomic attacks behind composites."""
    order: list[str] = []
    for name in attacks:
        for atomic in COMPOSITE_ATTACKS.get(name, (name,)):
            if atomic not in order:
                order.append(atomic)
    return order.index


def _histogram(model: nn.Module, dataset: Dataset, site: int, alpha: float, path: os.PathLike) -> None:
    """Collect one site's input over a few images and plot its most populated channel before / after."""
    from meansparse_pl.operator import operators
    from meansparse_pl.report import plot_channel_histogram

    ops = [op for op in operators(model) if op.site_name.startswith(f"site {site} ")]
    if not ops:
        raise ConfigurationError(f"histogram_site {site} is not an operator site; see the placement table.")
    op = ops[0]
    captured: list[torch.Tensor] = []
    handle = op.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    images = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))])  # type: ignore[arg-type]
    set_alpha(model, alpha)
    with torch.no_grad():
        model.eval()(images.to(op.mean.device))
    handle.remove()
    features = captured[0].movedim(op.channel_dim, -1).reshape(-1, op.num_channels)
    channel = int(torch.argmax(op.var))
    before = features[:, channel]
    after = (
        op.without_activation(captured[0])
        .movedim(op.channel_dim, -1)
        .reshape(-1, op.num_channels)[:, channel]
    )
    mean = float(op.mean[channel])
    threshold = alpha * float(op.var[channel].sqrt())
    plot_channel_histogram(
        before.cpu().numpy(),
        after.detach().cpu().numpy(),
        mean,
        threshold,
        path,
        f"{op.site_name}, channel {channel}, alpha={alpha:g}",
    )


def _load_trained_weights(model: pl.LightningModule, checkpoint: str, *, from_network: bool) -> None:
    """Weights for ``postprocess``: a RobustBench file (its own key conventions) for a ``robustbench``
    backbone, else a Lightning checkpoint or a plain state dict of the network."""
    hparams = getattr(model, "hparams", {})
    if not from_network and hparams.get("backbone") == "robustbench":
        from meansparse_pl.robustbench import load_robustbench_weights

        options = hparams.get("backbone_kwargs") or {}
        if "model_name" not in options:
            raise ConfigurationError(
                "backbone robustbench needs backbone_kwargs.model_name (a RobustBench name)."
            )
        load_robustbench_weights(
            model.model, checkpoint, options["model_name"], options.get("dataset", "cifar10")
        )
        return
    load_weights(model.model, checkpoint, hint="check model.backbone / backbone_kwargs or --network.")
