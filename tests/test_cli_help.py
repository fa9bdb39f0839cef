"""``--help`` as a new user reads it: every option on whole lines with its default, group titles of ours, and the
boundary check of every MeanSparse subcommand in one table."""

from __future__ import annotations

import re

import pytest

from meansparse_pl.cli import GROUP_TITLES, MeanSparseCLI, first_sentence, main
from meansparse_pl.options import CHECKS

MEANSPARSE_SUBCOMMANDS = ["postprocess", "alpha_search", "evaluate", "diagnose", "compare"]


def _help(subcommand: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("subcommand", MEANSPARSE_SUBCOMMANDS)
def test_help_shows_every_option_whole_with_its_default_under_our_titles(subcommand, capsys):
    text = _help(subcommand, capsys)
    body = text[text.index("\noptions:") :]
    assert not [line for line in body.splitlines() if line.rstrip().endswith("...")]  # nothing cut off
    titles = [line for line in body.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert f"{GROUP_TITLES['trainer']}:" in titles and f"{GROUP_TITLES['model']}:" in titles
    assert f"{GROUP_TITLES['data']}:" in titles and f"Options of {subcommand}:" in titles
    assert not any("DataModule standardizes" in t or "``pl.Trainer``" in t for t in titles)
    # every option of the subcommand's own group and of its config objects says its default (or is required)
    own = body[body.index(f"Options of {subcommand}:") :]
    entries = re.split(r"\n  (?=--)", own)[1:]
    without = [e.split()[0] for e in entries if "(default:" not in e and ".help" not in e.split()[0]]
    required = {
        "--checkpoint",
        "--models",
        "--control",
        "--threat",
        "--attacks",
        "--diagnostics",
        "--placement",
    }
    assert set(without) <= required, without


def test_a_sentence_is_not_cut_at_an_abbreviation_or_inside_parentheses(capsys):
    assert first_sentence("TRADES weight (Zhang et al. use 6.0; A.5 uses 0.6). More.") == (
        "TRADES weight (Zhang et al. use 6.0; A.5 uses 0.6)."
    )
    assert first_sentence("Extra arguments, e.g. {'a': 1}. Then more.") == "Extra arguments, e.g. {'a': 1}."
    assert first_sentence("No full stop at all") == "No full stop at all"
    assert "TRADES weight of the KL term (Zhang et al. use 6.0; the MeanSparse paper" in _help(
        "postprocess", capsys
    )


def test_every_meansparse_subcommand_has_its_boundary_check():
    own = {name for name in MeanSparseCLI.subcommands() if name not in ("fit", "validate", "test")}
    assert own == set(CHECKS) == set(MEANSPARSE_SUBCOMMANDS)
