"""Run the four MeanSparse subcommands (the Trainer methods ``cli.py`` calls) with N gloo CPU processes.

Used by tests/test_distributed.py: ``postprocess``, ``alpha_search``, ``evaluate`` and ``compare`` on real
Fashion-MNIST with random-start PGD and APGD-CE must give the same statistics and the same per-sample
verdicts on 1, 2 and 3 processes. Sizes are odd on purpose: 23 samples in batches of 8 are 3 batches (the last
one of 7), two and one per process at N = 2, one each at N = 3; the 101 training images are uneven batches too.
Usage: python ddp_subcommands.py DEVICES TRAINED_CHECKPOINT OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from meansparse_pl.config import AttackConfig, ComparedModel, ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.module import AdversarialClassifier
from meansparse_pl.trainer import MeanSparseTrainer

ATTACKS = AttackConfig(
    names=["clean", "pgd", "apgd-ce"],
    options={"pgd": {"steps": 3, "random_start": True}, "apgd-ce": {"n_iter": 3}},
)
THREAT = ThreatModel("Linf", 0.1)
SAMPLES = 23  # 3 batches of 8 (the last one 7)


def main(devices: int, trained: str, out: str) -> None:
    torch.set_num_threads(1)
    folder = Path(out)
    trainer = MeanSparseTrainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = FashionMNISTDataModule(train_subset=101, val_subset=40, batch_size=16, eval_batch_size=16)
    model = AdversarialClassifier(  # the network of the demo config, as the CLI links it to the data
        backbone="small_cnn",
        backbone_kwargs={"activation": "relu", "channels": [16, 32], "hidden": 64},
        in_channels=1,
        normalization=data.normalization,
        eps=0.1,
    )
    sparse = str(folder / "meansparse.pt")
    trainer.postprocess(model, data, checkpoint=trained, output=sparse)
    trainer.alpha_search(
        model,
        data,
        checkpoint=sparse,
        alphas=[0.0, 0.35],
        threat=THREAT,
        attacks=AttackConfig(names=["pgd", "apgd-ce"], options=ATTACKS.options),
        batch_size=8,
        limit_samples=SAMPLES,
        output_dir=str(folder / "alpha_search"),
        write_alpha=True,
    )
    trainer.evaluate(
        model,
        data,
        checkpoint=sparse,
        alpha=0.35,  # whatever the search chose: a MeanSparse variant beside the base one on every machine
        attacks=ATTACKS,
        threat=THREAT,
        batch_size=8,
        limit_samples=SAMPLES,
        output_dir=str(folder / "evaluate"),
    )
    trainer.compare(
        model,
        data,
        models=[ComparedModel("meansparse", sparse), ComparedModel("base", sparse, alpha=0.0)],
        control="base",
        attacks=ATTACKS,
        threat=THREAT,
        batch_size=8,
        limit_samples=SAMPLES,
        output_dir=str(folder / "compare"),
    )
    if trainer.is_global_zero:
        evaluated: dict[str, dict[int, bool]] = {}
        for state in sorted((folder / "evaluate").glob("evaluation.state.rank*")):
            for key, verdicts in torch.load(state, weights_only=True)["results"].items():
                evaluated.setdefault(key, {}).update(verdicts)
        (folder / "verdicts.json").write_text(
            json.dumps({k: {str(i): v for i, v in sorted(d.items())} for k, d in sorted(evaluated.items())})
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
