"""Convert a RobustBench model to a meansparse_pl checkpoint, offline.

A published MeanSparse model (``Amini2024MeanSparse_*``) becomes a calibrated checkpoint that carries the
published statistics and alpha, ready for ``cli.py evaluate`` (and ``alpha_search``)::

    python scripts/import_published.py Amini2024MeanSparse_S-WRN-94-16 --model-dir models \\
        --dataset cifar10 --threat-model Linf --output runs/paper/cifar10_linf_swrn_94_16/meansparse.pt

The file must already be at ``<model-dir>/<dataset>/<threat-model>/<name>.pt`` (RobustBench's layout; this
script never downloads), or be given with ``--weights``. A base RobustBench model (no MeanSparse modules)
needs ``--preset``: it is written with operators at the preset's sites but *uncalibrated*; collect the
statistics with ``meansparse_pl.calibrate`` on the training set before evaluating.

Exit status 0 on success, 2 with a one-line ``error:`` message for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import meansparse_pl  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meansparse_pl.checkpoint import save_checkpoint
from meansparse_pl.errors import ConfigurationError, MeanSparseError
from meansparse_pl.ops import get_alpha, operators
from meansparse_pl.placement import PRESETS, describe, sparsify
from meansparse_pl.published import convert_published, find_published_modules


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="RobustBench model name, e.g. Amini2024MeanSparse_S-WRN-94-16")
    parser.add_argument("--model-dir", default="models", help="RobustBench model directory (default: models)")
    parser.add_argument("--output", required=True, help="where to write the meansparse_pl checkpoint")
    parser.add_argument(
        "--dataset", default="cifar10", help="cifar10, cifar100 or imagenet (default: cifar10)"
    )
    parser.add_argument("--threat-model", default="Linf", help="Linf, L2 or corruptions (default: Linf)")
    parser.add_argument("--weights", help="read the weights from this file instead of the RobustBench layout")
    parser.add_argument(
        "--input-size",
        type=int,
        help="image side of the probe forward (default: 224 for imagenet, 32 otherwise)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        help="with --preset: fnmatch pattern of site module paths to leave out (repeatable), e.g. '*.se.*'",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="placement preset for a base model without MeanSparse modules (published_wrn, ...)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from meansparse_pl import robustbench

        dataset = robustbench.normalise_dataset(args.dataset)
        threat_model = robustbench.normalise_threat_model(args.threat_model)
        model = robustbench.load_model(args.name, args.model_dir, dataset, threat_model, weights=args.weights)
        size = args.input_size or (224 if dataset == "imagenet" else 32)
        published = bool(find_published_modules(model))
        if published:
            if args.preset:
                raise ConfigurationError(
                    f"{args.name} already contains published MeanSparse modules; --preset is for base models."
                )
            sparse = convert_published(model, (3, size, size))
        elif args.preset:
            sparse = sparsify(model, (3, size, size), preset=args.preset, exclude=args.exclude)
        else:
            raise ConfigurationError(
                f"{args.name} has no MeanSparse modules: pass --preset (one of {', '.join(sorted(PRESETS))}) "
                "to place operators, then calibrate them."
            )
        architecture = {
            "name": "robustbench",
            "kwargs": {"model_name": args.name, "dataset": dataset, "threat_model": threat_model},
        }
        metadata = {
            "source": {
                "robustbench_name": args.name,
                "dataset": dataset,
                "threat_model": threat_model,
                "weights": str(
                    args.weights
                    or robustbench.checkpoint_path(args.model_dir, args.name, dataset, threat_model)
                ),
                "published_statistics": published,
            }
        }
        path = save_checkpoint(sparse, args.output, architecture=architecture, metadata=metadata)
    except MeanSparseError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    ops = operators(sparse)
    state = (
        f"published statistics, alpha {get_alpha(sparse):g}"
        if published
        else "UNCALIBRATED: run meansparse_pl.calibrate on the training set before evaluating"
    )
    print(describe(sparse).splitlines()[0])
    print(f"wrote {path}: {len(ops)} operators, {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
