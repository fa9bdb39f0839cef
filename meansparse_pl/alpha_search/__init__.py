"""Choose alpha: :class:`AlphaSearch` (the sweep, :mod:`.search`), its schedules (:mod:`.schedules`, and the
per-site search in :mod:`.per_site`) and its result object (:mod:`.result`)."""

from meansparse_pl.alpha_search.per_site import PerSite
from meansparse_pl.alpha_search.result import AlphaSearchResult
from meansparse_pl.alpha_search.schedules import ELIMINATIONS, Exhaustive, Schedule, SuccessiveHalving
from meansparse_pl.alpha_search.search import (
    CRITERIA,
    PAPER_ALPHAS,
    SEARCH_ATTACKS,
    SELECTIONS,
    AlphaSearch,
    Criterion,
    Selection,
    check_alphas,
)

__all__ = [
    "CRITERIA",
    "ELIMINATIONS",
    "PAPER_ALPHAS",
    "SEARCH_ATTACKS",
    "SELECTIONS",
    "AlphaSearch",
    "AlphaSearchResult",
    "Criterion",
    "Exhaustive",
    "PerSite",
    "Schedule",
    "Selection",
    "SuccessiveHalving",
    "check_alphas",
]
