"""A Trainer with the MeanSparse subcommands: ``postprocess``, ``alpha_search``, ``evaluate`` and ``compare``.

LightningCLI builds each subcommand's options from the method's signature (so every argument below is a
``--name`` option and a config key) and passes the configured ``model`` and ``datamodule``. The options are the
package's config objects, named the same in every subcommand: ``--placement.*`` (:class:`PlacementConfig`),
``--threat.*`` (:class:`ThreatModel`), ``--attacks.*`` (:class:`AttackConfig`), ``--schedule`` (an alpha-search
schedule by class path). Each step runs through ``Trainer.predict``, so ``--trainer.devices`` /
``--trainer.strategy`` shard the work across GPUs or nodes (predict never pads the data, so every sample counts
once), with Lightning's progress bar. The methods are glue: the work is done by the Python API.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.alpha_search import (
    PAPER_ALPHAS,
    SEARCH_ATTACKS,
    AlphaSearch,
    Criterion,
    Exhaustive,
    Schedule,
    Selection,
)
from meansparse_pl.architecture import network_record
from meansparse_pl.calibration import CalibrationModule, check_data_fits, images_of
from meansparse_pl.checkpoint import load_calibrated, load_compared, resave_checkpoint, save_checkpoint
from meansparse_pl.comparison import compare_models, operator_setting
from meansparse_pl.config import (
    AttackConfig,
    ComparedModel,
    DiagnosticsConfig,
    PlacementConfig,
    ThreatModel,
    renamed,
)
from meansparse_pl.data import split_samples
from meansparse_pl.diagnostics import diagnose
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.io import (
    LOCK_NAME,
    Result,
    file_version,
    output_lock,
    write_report,
    write_result,
)
from meansparse_pl.lightning_runs import LightningSubcommands, log_rows
from meansparse_pl.module import load_trained_weights
from meansparse_pl.ops import set_alpha
from meansparse_pl.placement import describe, sparsify
from meansparse_pl.report import (
    channel_histogram,
)
from meansparse_pl.robustness import RobustnessEvaluation, evaluated_variants
from meansparse_pl.sharding import whole_batches_of

# AutoAttack and the white-box columns, then the cheap adaptive attacks every best-known number includes
EVALUATE_ATTACKS = (
    "clean",
    "autoattack",
    "apgd-ce",
    "apgd-ce+dlr",
    "bpda-apgd-ce",
    "surrogate-apgd-ce",
    "transfer-base",
)


class MeanSparseTrainer(LightningSubcommands):
    """``pl.Trainer`` plus the post-processing steps (see the module docstring); ``fit``, ``validate`` and ``test``
    are :class:`~meansparse_pl.lightning_runs.LightningSubcommands`'."""

    # ------------------------------------------------------------------------------------ postprocess
    def postprocess(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        weights: str | None = None,
        network: nn.Module | None = None,
        output_dir: str = "runs",
        alpha: float = 0.0,
        placement: PlacementConfig = PlacementConfig(),
        allow_untrained: bool = False,
        limit_samples: int | None = None,
        checkpoint: str | None = None,
        output: str | None = None,
    ) -> None:
        """Insert MeanSparse operators into a trained model and collect their statistics on the training split.

        Args:
            weights: Trained weights: a Lightning checkpoint of the model or a state dict of the network.
            network: Any nn.Module (class_path + init_args) to use instead of the model section's backbone.
            output_dir: Where the MeanSparse checkpoint (meansparse.pt) goes.
            alpha: Alpha stored in the output (choose it with alpha_search; 0 = identical to the base model).
            placement: Where the operators go (include, exclude, sites, centre, preset, channel_dims,
                fuse_activations, strategy, leaf_modules; see PlacementConfig).
            allow_untrained: Sparsify the freshly initialised network when no weights are given (for tests).
            limit_samples: Collect the statistics over the first N images of the calibration split (null: all).
            checkpoint: Old name of --weights (accepted until meansparse_pl 0.3).
            output: Old way to name the output file instead of --output_dir (accepted until meansparse_pl 0.3).
        """
        weights = renamed("postprocess", "checkpoint", checkpoint, "weights", weights)
        target = Path(
            renamed("postprocess", "output", output, "output_dir", None) or Path(output_dir) / "meansparse.pt"
        )
        if not weights and not allow_untrained:
            raise ConfigurationError(
                "postprocess needs trained weights and got no --weights, so it would sparsify a randomly "
                "initialised network; give --weights (a Lightning checkpoint or a state dict of the network), or "
                "--allow_untrained true to sparsify the untrained network on purpose."
            )
        self.with_network(model, network)
        if getattr(model, "model", None) is None:
            raise ConfigurationError("no network to post-process: configure model.backbone or --network.")
        with self._holding(target.parent, f".{target.name}.lock"):
            if weights:
                load_trained_weights(model, weights, from_network=network is not None)
            sparse, summary = self._sparsified_and_calibrated(
                model.model, datamodule, placement, limit_samples, alpha, target
            )
            if self.is_global_zero:
                summary["source_checkpoint"] = weights
                metadata = {"calibration": summary}
                save_checkpoint(
                    sparse, target, architecture=self._architecture(model, network), metadata=metadata
                )
                rank_zero_info(
                    f"{describe(sparse)}\n\nStatistics over {summary['images']} training images in "
                    f"{summary['seconds']} s; wrote {target}"
                )
            self.strategy.barrier("postprocess_saved")

    def _sparsified_and_calibrated(
        self,
        network: nn.Module,
        datamodule: pl.LightningDataModule,
        placement: PlacementConfig,
        limit_samples: int | None,
        alpha: float,
        output: Path,
    ) -> tuple[nn.Module, dict]:
        """Operators placed by ``placement``, their statistics over the calibration split (its first
        ``limit_samples`` images) sharded over the Trainer's processes (resumable from
        ``<output>.statistics-state``), and ``alpha`` set; with the calibration's summary."""
        datamodule.setup("fit")
        loader = datamodule.calibration_dataloader()
        start = time.perf_counter()
        sparse = sparsify(network, images_of(next(iter(loader)))[:1], placement)
        calibration = CalibrationModule(sparse, state_path=f"{output}.statistics-state")
        shard = whole_batches_of(loader, self.world_size, self.global_rank, limit_samples)
        self.predict(calibration, dataloaders=shard, return_predictions=False)
        calibration.finish_without_batches(self)
        set_alpha(sparse, alpha)
        summary = {
            "images": calibration.images,
            "dtype": calibration.statistics_dtype,
            "seconds": round(time.perf_counter() - start, 2),
            "limit_predict_batches": self.limit_predict_batches,
            "limit_samples": limit_samples,
        }
        return sparse, summary

    # ----------------------------------------------------------------------------------- alpha_search
    def alpha_search(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str,
        network: nn.Module | None = None,
        alphas: list[float] = list(PAPER_ALPHAS),  # noqa: B006 - LightningCLI reads the default from here
        threat: ThreatModel = ThreatModel(),
        attacks: AttackConfig = AttackConfig(names=list(SEARCH_ATTACKS)),
        max_clean_drop: float = 0.5,
        criterion: Criterion = "worst_case",
        selection: Selection = "highest",
        schedule: Schedule = lazy_instance(Exhaustive),
        seed: int = 0,
        batch_size: int = 256,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/alpha_search",
        resume: bool = True,
        write_alpha: bool = True,
    ) -> None:
        """Choose alpha on the held-out validation split (never the test set) and write it into the checkpoint.

        Args:
            checkpoint: Sparsified, calibrated checkpoint (from postprocess or MeanSparseCallback).
            network: The network class the checkpoint was saved from (class_path + init_args), when it is not
                a registry model.
            alphas: Grid of alpha values (paper: 0, 0.15, ..., 0.5); 0 is always included.
            threat: Threat model of the attacks: norm (Linf or L2) and eps in [0, 1] pixel units.
            attacks: Robust columns (default APGD-CE, APGD-DLR and BPDA-APGD-CE) and their options.
            max_clean_drop: Clean-accuracy points an alpha may lose against alpha = 0.
            criterion: worst_case (per-sample worst case over all attacks) or apgd (the paper's rule).
            selection: highest (the highest criterion accuracy) or smallest_within_error (the smallest alpha
                within one paired standard error of the highest: a more reproducible choice when alphas are
                within noise of each other).
            schedule: Exhaustive (every alpha on every image), SuccessiveHalving (growing subsets, dropping
                alphas early; see benchmarks/README.md for its measured agreement and cost) or PerSite (one
                alpha per operator or group, by coordinate ascent from the best global alpha).
            seed: Attack seed (and the seeded order of the held-out samples).
            batch_size: Evaluation batch size.
            limit_samples: Use the first N held-out images (null: all).
            output_dir: Where alpha_search.md / .json / .png and the resume state go.
            resume: Continue an interrupted search from its state file.
            write_alpha: Store the chosen alpha (and the search result) in the checkpoint.
        """
        search = AlphaSearch.from_options(locals())
        out = Path(output_dir)
        source = Path(checkpoint)
        # the checkpoint is read now and rewritten at the end: held like postprocess holds its output, so neither
        # overwrites what the other wrote meanwhile
        holding_source = self._holding(source.parent, f".{source.name}.lock") if write_alpha else None
        with self._holding(out), holding_source or contextlib.nullcontext():
            version = file_version(source)
            sparse = self._calibrated_model(checkpoint, network, model)
            dataset = split_samples(datamodule, "val", limit_samples)
            check_data_fits(sparse, dataset, datamodule, checkpoint)
            state = out / "alpha_search.state" if resume else None
            result = search.run(sparse, dataset, trainer=self, state_path=state)
            if self.is_global_zero:
                self._publish(out, "alpha_search", result)
                if write_alpha:  # the report is written first: a refused rewrite loses no result
                    result.apply_to(sparse)
                    metadata = {"alpha_search": result.to_json()}
                    resave_checkpoint(sparse.cpu(), checkpoint, read_version=version, metadata=metadata)
                    print(f"alpha {result.suggestion():g} stored in {checkpoint}")
            self.strategy.barrier("alpha_search_saved")

    # --------------------------------------------------------------------------------------- evaluate
    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str,
        network: nn.Module | None = None,
        attacks: AttackConfig = AttackConfig(names=list(EVALUATE_ATTACKS)),
        threat: ThreatModel = ThreatModel(),
        extra_eps: list[float] | None = None,
        alpha: float | None = None,
        compare_base: bool = True,
        large_eps: float | None = None,
        split: Literal["test", "val"] = "test",
        seed: int = 0,
        batch_size: int = 256,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/evaluate",
        resume: bool = True,
        histogram_site: int | None = None,
        diagnostics: DiagnosticsConfig = DiagnosticsConfig(),
    ) -> None:
        """Attack the MeanSparse model and its base model; report per-attack and best-known accuracy.

        Args:
            checkpoint: Sparsified, calibrated checkpoint (alpha from alpha_search).
            network: The network class the checkpoint was saved from (class_path + init_args), when it is not
                a registry model.
            attacks: Attacks and their options; names: clean, autoattack, apgd-ce, apgd-dlr, apgd-ce+dlr,
                apgd-t, fab-t, pgd, square, bpda-apgd-ce, adaptive.
            threat: Threat model: norm (Linf or L2) and eps in [0, 1] pixel units.
            extra_eps: More radii to evaluate besides threat.eps (paper Table 9 sweeps 1/255 to 16/255).
            alpha: Override the checkpoint's alpha.
            compare_base: Also evaluate alpha = 0 (the base model) side by side.
            large_eps: Also run APGD-CE and BPDA-APGD-CE at this radius; accuracy must be about zero.
            split: test (reported numbers) or val.
            seed: Attack seed.
            batch_size: Evaluation batch size.
            limit_samples: First N images of the split (null: all).
            output_dir: Where evaluation.md / .json, plots and the resume state go.
            resume: Continue an interrupted evaluation from its state file.
            histogram_site: Also plot this operator site's channel histogram before / after (paper Fig. 1).
            diagnostics: The indicators of attack failure that run with the evaluation (subset size, forwards,
                large eps, test level; see DiagnosticsConfig).
        """
        evaluation = RobustnessEvaluation(
            attacks, threat, tuple(extra_eps or ()), large_eps, diagnostics, seed, batch_size
        )
        out = Path(output_dir)
        with self._holding(out):
            sparse, variants, dataset = self._variants_and_samples(locals())
            report = evaluation.run(
                sparse,
                dataset,
                variants=variants,
                trainer=self,
                state_path=out / "evaluation.state" if resume else None,
                with_diagnostics=self.is_global_zero,  # no collective inside: the others wait at the barrier
            )
            if self.is_global_zero:
                assert report.diagnostics is not None
                rank_zero_info(
                    f"diagnostics: {report.diagnostics.verdict()} ({report.diagnostics.seconds:.1f} s)"
                )
                self._publish(out, "evaluation", report)
                if histogram_site is not None:
                    channel_histogram(
                        sparse, dataset, histogram_site, alpha, out / f"histogram_site{histogram_site}.png"
                    )
            self.strategy.barrier("evaluate_saved")

    # --------------------------------------------------------------------------------------- diagnose
    def diagnose(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoint: str,
        network: nn.Module | None = None,
        attacks: AttackConfig = AttackConfig(names=["apgd-ce"]),
        threat: ThreatModel = ThreatModel(),
        alpha: float | None = None,
        compare_base: bool = True,
        split: Literal["test", "val"] = "test",
        seed: int = 0,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/diagnose",
        diagnostics: DiagnosticsConfig = DiagnosticsConfig(),
    ) -> None:
        """Probe whether attacks on the model can be trusted (gradients, randomness, saturation, operator band,
        convergence, large eps), without a full evaluation; evaluate and compare run the same indicators.

        Args:
            checkpoint: Sparsified, calibrated checkpoint.
            network: The network class the checkpoint was saved from, when it is not a registry model.
            attacks: Attack options; APGD-CE's n_iter, n_restarts and eot_iter are the ones probed.
            threat: Threat model: norm (Linf or L2) and eps in [0, 1] pixel units.
            alpha: Override the checkpoint's alpha.
            compare_base: Also probe alpha = 0 (the base model).
            split: test or val.
            seed: Seed of the subset and the attacks.
            limit_samples: First N images of the split the subset is drawn from (null: all).
            output_dir: Where diagnostics.md / .json go.
            diagnostics: Subset size, forwards, large eps, test level (see DiagnosticsConfig).
        """
        out = Path(output_dir)
        with self._holding(out):
            sparse, variants, dataset = self._variants_and_samples(locals())
            if self.is_global_zero:  # no collective inside: the other ranks wait at the barrier below
                options = {"threat": threat, "attacks": attacks, "config": diagnostics, "seed": seed}
                found = diagnose(sparse, dataset, variants=variants, **options)
                log_rows(self.loggers, [found.metrics("diagnose")])
                write_report(out, "diagnostics", found)
                print(f"{found.table()}\n\nwrote {out}/diagnostics.{{md,json}} ({found.seconds:.1f} s)")
            self.strategy.barrier("diagnose_saved")

    # ---------------------------------------------------------------------------------------- compare
    def compare(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        models: list[ComparedModel],
        control: str,
        network: nn.Module | None = None,
        attacks: AttackConfig = AttackConfig(names=list(EVALUATE_ATTACKS)),
        threat: ThreatModel = ThreatModel(),
        split: Literal["test", "val"] = "test",
        seed: int = 0,
        batch_size: int = 256,
        limit_samples: int | None = 1000,
        output_dir: str = "runs/compare",
        resume: bool = True,
        diagnostics: DiagnosticsConfig = DiagnosticsConfig(),
    ) -> None:
        """Attack several models on the same samples with the same attacks and seeds; report each one's accuracy
        per attack and best known, and its paired difference to the equal-budget control.

        Args:
            models: The models: label, checkpoint (a MeanSparse checkpoint, a Lightning checkpoint or a plain
                state dict) and optionally one alpha for every operator (0: the base network).
            control: The label every other model is compared with (the equal-budget control).
            network: The network class the checkpoints were saved from (class_path + init_args), when it is not
                a registry model.
            attacks: Attacks and their options (names: full columns; cascade: best known only, each attack on the
                survivors of all before it).
            threat: Threat model: norm (Linf or L2) and eps in [0, 1] pixel units.
            split: test (reported numbers) or val.
            seed: Attack seed, the same for every model.
            batch_size: Evaluation batch size.
            limit_samples: First N images of the split (null: all).
            output_dir: Where comparison.md / .json / .png and the resume states go.
            resume: Continue an interrupted comparison from its state files.
            diagnostics: The indicators of attack failure run on every model (see DiagnosticsConfig).
        """
        out = Path(output_dir)
        with self._holding(out):
            fallback = None if network is not None else getattr(model, "model", None)
            loaded = {m.label: load_compared(m, network, fallback) for m in models}
            dataset = split_samples(datamodule, split, limit_samples)
            for m in models:
                check_data_fits(loaded[m.label], dataset, datamodule, m.checkpoint)
            result = compare_models(
                {label: net.to(self.strategy.root_device) for label, net in loaded.items()},
                dataset,
                control=control,
                attacks=attacks,
                threat=threat,
                batch_size=batch_size,
                seed=seed,
                state_dir=out if resume else None,
                trainer=self,
                settings={label: operator_setting(net) for label, net in loaded.items()},
                diagnostics=diagnostics,
            )
            if self.is_global_zero:
                self._publish(out, "comparison", result)
            self.strategy.barrier("compare_saved")

    # ----------------------------------------------------------------------------------------- shared
    #: set by ``cli.py`` before a subcommand runs: the ``--network`` it was given, as a checkpoint records it
    network_record: dict | None = None

    def _holding(self, folder: Path, lock_name: str = LOCK_NAME) -> contextlib.AbstractContextManager:
        """The output folder held for this run (by rank 0, which writes the reports), or a refusal before any
        file is written."""
        return output_lock(folder, lock_name) if self.is_global_zero else contextlib.nullcontext(folder)

    def _publish(self, out: Path, stem: str, result: Result) -> None:
        """A result's numbers in the loggers, its ``<stem>.md`` / ``.json`` / ``.png`` in ``out`` and its table on
        stdout: what every subcommand does with its result, on rank 0 (the one process that writes)."""
        log_rows(self.loggers, result.metrics())
        write_result(out, stem, result)
        print(f"{result.table()}\n\nwrote {out}/{stem}.{{md,json,png}}")

    def _variants_and_samples(self, options: dict) -> tuple[nn.Module, dict, Dataset]:
        """``evaluate``'s and ``diagnose``'s model (from ``checkpoint``), its variants (MeanSparse and, with
        ``compare_base``, alpha 0) and the samples of ``split``, checked against the model."""
        get = options.get
        sparse = self._calibrated_model(get("checkpoint"), get("network"), get("model"))
        variants = evaluated_variants(sparse, get("alpha"), get("compare_base"))
        dataset = split_samples(get("datamodule"), get("split"), get("limit_samples"))
        check_data_fits(sparse, dataset, get("datamodule"), get("checkpoint"))
        return sparse, variants, dataset

    def _calibrated_model(
        self, checkpoint: str, network: nn.Module | None, model: pl.LightningModule
    ) -> nn.Module:
        fallback = None if network is not None else getattr(model, "model", None)
        return load_calibrated(checkpoint, network, fallback_model=fallback).to(self.strategy.root_device)

    def _architecture(self, model: pl.LightningModule, network: nn.Module | None) -> dict | None:
        """How the output checkpoint records its network: the ``--network`` class and init arguments, or the
        model section's registry backbone."""
        if network is not None:
            return self.network_record or network_record(network)
        return model.architecture() if hasattr(model, "architecture") else None
