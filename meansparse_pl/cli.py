"""Command-line interface: ``python cli.py SUBCOMMAND --config configs/<name>.yaml``.

Subcommands: ``fit``, ``validate``, ``test`` (Lightning's) and the MeanSparse steps ``postprocess``,
``alpha_search``, ``evaluate`` and ``compare`` (methods of :class:`~meansparse_pl.trainer.MeanSparseTrainer`).

A thin :class:`~lightning.pytorch.cli.LightningCLI` subclass. The model is always
:class:`~meansparse_pl.module.AdversarialClassifier` (its arguments are the ``model:`` section); the data is
any ``LightningDataModule`` given by ``class_path`` (``data:`` section), and the data-dependent model
arguments (``num_classes``, ``in_channels``, ``normalization``) are linked from the instantiated datamodule so
that a config cannot disagree with its data set.

Extending: a new subcommand is a method of :class:`~meansparse_pl.trainer.MeanSparseTrainer` listed in
:meth:`MeanSparseCLI.subcommands` (LightningCLI builds each subcommand's parser from that method's
signature and runs it).

Errors a user can cause (:class:`~meansparse_pl.errors.MeanSparseError`) are printed by :func:`main` as one
``error: <message>`` line on stderr with exit status 2, like argparse's own errors, instead of a traceback; the
subcommand's own options are checked right after parsing, before the model and the data are built. SIGTERM and
SIGUSR1 stop a running subcommand at its next safe point with its progress saved: one ``stopped: ...`` line says
how to resume, and the exit status is ``128 + signal``.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import textwrap
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from meansparse_pl import preemption
from meansparse_pl.determinism import float32_reference_math
from meansparse_pl.errors import Interrupted, MeanSparseError
from meansparse_pl.lightning_runs import check_lightning_checkpoint
from meansparse_pl.module import AdversarialClassifier
from meansparse_pl.options import check_options
from meansparse_pl.trainer import MeanSparseTrainer

EXIT_USER_ERROR = 2
LONG_SUBCLASS_LIST = 8  # more known subclasses than this are summarised in --help


ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "al.", "vs.", "cf.", "Fig.", "Eq.")


def first_sentence(text: str) -> str:
    """``text`` up to its first full stop that ends a sentence: not an abbreviation's (e.g., et al.) and not one
    inside parentheses."""
    depth = 0
    for position, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        end = position + 1
        if char != "." or depth > 0 or (end < len(text) and not text[end].isspace()):
            continue
        if not text[:end].endswith(ABBREVIATIONS):
            return text[:end]
    return text


#: the titles of the option groups every subcommand has (the others are the Args lines of their config objects)
GROUP_TITLES = {
    "trainer": "Lightning's Trainer (--trainer.*): devices, strategy, precision, loggers, callbacks",
    "model": "The model (--model.*): AdversarialClassifier's network and how it is trained",
    "data": "The data (--data.*): a LightningDataModule given by class_path and init_args",
}


class HelpFormatter(DefaultHelpFormatter):
    """Compact help: per option its description's first sentence and its default, on whole lines, so that ``--help``
    of a subcommand fits on a few screens. An option typed by a broad base class (``--network: nn.Module``,
    ``--trainer.callbacks``) is described by its class-path syntax instead of a list of every subclass imported.
    ``--print_config`` shows every value in full."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 46)
        kwargs.setdefault("width", 120)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action: Any) -> str | None:
        text = super()._get_help_string(action)
        if not text:
            return text
        text = " ".join(text.split())
        if ", known subclasses: " in text and text.count(", ") > LONG_SUBCLASS_LIST:
            head, _, rest = text.partition(", known subclasses: ")
            text = head + ", any subclass: class_path + init_args" + (")" if rest.endswith(")") else "")
        details = ""
        if text.endswith(")") and (
            text.startswith("(") or " (" in text
        ):  # jsonargparse's "(type: ..., default: ...)"
            text, _, details = text[1:].rpartition("(") if text.startswith("(") else text.rpartition(" (")
            defaults = re.findall(r"default: ([^,)]*(?:\)[^,)]*)?)", details)
            details = f"(default: {defaults[0]})" if defaults else ""
        return " ".join(part for part in (first_sentence(text), details) if part)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # whole words on as many lines as the sentence needs: nothing of an option's help is cut off
        return textwrap.wrap(text, max(width, 20)) or [""]


class OneLineErrorParser(LightningArgumentParser):
    """A parsing error is a short usage line and one ``error:`` line (jsonargparse's own prints the whole usage,
    some 50 lines, and a message over several lines, so the last line is not the error)."""

    def format_help(self) -> str:
        """Group titles that are sentences of ours: the Trainer's, the model's and the data's instead of their
        classes' docstring fragments, the subcommand's own options under its name, each title on one line."""
        for key, group in (self.groups or {}).items():
            title = GROUP_TITLES.get(key) or (
                f"Options of {key}" if key in MeanSparseCLI.subcommands() else group.title
            )
            group.title = " ".join((title or key).split())
        return super().format_help()

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"usage: {prog} [options] (every option: {prog} --help)\nerror: {_one_line(message)}\n"
        )
        sys.exit(EXIT_USER_ERROR)


class QuietLightning(logging.Filter):
    """Drop Lightning's advertising tip and its lines about accelerators that are not there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip"):
            return False
        return not re.match(r"^(GPU|TPU|HPU|IPU) available: False", message)


class MeanSparseCLI(LightningCLI):
    """LightningCLI for training and evaluating the classifiers that MeanSparse post-processes.

    Defaults that differ from LightningCLI's: the model class is fixed to ``AdversarialClassifier``, the
    datamodule is chosen by ``class_path``, ``Trainer(inference_mode=False)`` (validation runs PGD, which
    needs gradients), the optimiser and schedule are the model's own arguments (the paper's SGD + step
    decay, stored in the checkpoint's hyper-parameters) instead of LightningCLI's ``--optimizer`` injection,
    and the saved ``config.yaml`` of a run is overwritten when a run directory is reused.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", AdversarialClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", MeanSparseTrainer)
        kwargs.setdefault("parser_class", OneLineErrorParser)
        kwargs.setdefault("trainer_defaults", {"inference_mode": False})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": "Adversarial training / evaluation for MeanSparse.",
                "formatter_class": HelpFormatter,
            },
        )
        super().__init__(args=args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Subcommands and the Trainer-method arguments they do not expose (filled from the config)."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
            "postprocess": {"model", "datamodule"},
            "alpha_search": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "compare": {"model", "datamodule"},
            "diagnose": {"model", "datamodule"},
        }

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parsing, then a ``--ckpt_path`` file checked before LightningCLI reads its
        hyper-parameters (a truncated checkpoint: one line, not torch's traceback)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_lightning_checkpoint(self.config[subcommand]["ckpt_path"])

    def before_instantiate_classes(self) -> None:
        """Check the subcommand's own options before the model and the data are built (a bad attack name or
        batch size is one line at once, not after the loading)."""
        subcommand = self.subcommand
        config = self.config[subcommand] if subcommand is not None else self.config
        if subcommand is not None:
            check_options(subcommand, config)
        if config.get("trainer", {}).get(
            "deterministic"
        ):  # Lightning's flags, plus no TF32 (see determinism)
            float32_reference_math()

    def _record_network(self) -> None:
        """Tell the trainer which ``--network`` was given (class path and init arguments, as text), so the
        checkpoint it writes says how to rebuild the network."""
        network = self.config[self.subcommand].get("network")
        if network is not None:
            init_args = network.get("init_args")
            self.trainer.network_record = {
                "class_path": network["class_path"],
                "init_args": init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {}),
            }

    before_postprocess = before_alpha_search = before_evaluate = before_diagnose = _record_network

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the datamodule's data-set facts into the model at instantiation time."""
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments(
            "data.input_shape", "model.in_channels", compute_fn=_channels_of, apply_on="instantiate"
        )
        parser.link_arguments("data.normalization", "model.normalization", apply_on="instantiate")


def _channels_of(input_shape: tuple[int, ...]) -> int:
    """Channels of a ``(C, H, W)`` input shape."""
    return int(input_shape[0])


def main(args: ArgsType = None) -> MeanSparseCLI:
    """Run the CLI; a :class:`MeanSparseError` becomes ``error: <message>`` on stderr and exit status 2.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.

    Returns:
        The finished CLI, whose ``model``, ``datamodule`` and ``trainer`` can be inspected (in-process use).
    """
    quiet = QuietLightning()
    lightning_info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lightning_info.addFilter(quiet)
    try:
        with preemption.watching():
            return MeanSparseCLI(args=args)
    except MeanSparseError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except MisconfigurationException as err:  # Lightning's refusal of a Trainer setting: a user's error too
        print(f"error: {_one_line(err)}{_trainer_fix(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as stop:
        print(f"stopped: {_one_line(stop)}", file=sys.stderr)
        sys.exit(128 + stop.signal_number)
    except KeyboardInterrupt:
        print(
            "stopped: interrupted by Ctrl-C (SIGINT); run the same command again to resume", file=sys.stderr
        )
        sys.exit(128 + signal.SIGINT)
    finally:
        lightning_info.removeFilter(quiet)


def _trainer_fix(message: str) -> str:
    """The fix Lightning's message leaves out."""
    text = message.lower()
    if any(word in text for word in ("gpu", "cuda", "accelerator", "backend", "mps", "tpu")):
        return "; this machine lacks that accelerator: use --trainer.accelerator=cpu (or auto)"
    return "; check the --trainer.* options (cli.py SUBCOMMAND --help lists them)"


def _one_line(message: object) -> str:
    """One line, whatever the message's own line breaks; an error re-raised from a DataLoader worker process
    keeps only its own message, not the worker's traceback that PyTorch puts in front of it."""
    text = str(message)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(text.split())
