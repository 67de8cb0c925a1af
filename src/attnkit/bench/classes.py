"""Accuracy classes of bench cells and their errors on structured inputs, shared by the report and the plots
(issue 27): a mask that changes the model is not exact, an approximation is judged on inputs with structure."""

from __future__ import annotations

from typing import Any

CLASS_WORDS = {
    "exact": "exact (softmax's outputs)",
    "masked": "exact under a mask (a different model)",
    "approx": "approximate",
    "other": "other operator (exact for its own definition)",
    "mixer": "token mixer (x -> x)",
}
STRUCTURE_LABELS = {"random": "random", "low_rank": "low-rank", "clustered": "clustered", "local": "local"}


def cell_class(c: dict[str, Any]) -> str:
    """A cell's accuracy class (``runner.ACCURACY_CLASSES``); derived for results written before it was stored."""
    if c.get("accuracy_class"):
        return c["accuracy_class"]
    if c["kind"] == "baseline":
        return "exact"
    if (c.get("error_reference") or "").startswith("none"):
        return "mixer"
    if not c["exact"]:
        return "approx"
    if c.get("density") is not None and c["density"] < ((c["seq_len"] + 1) / (2 * c["seq_len"]) if c["causal"]
                                                       else 1.0) * (1 - 1e-9):
        return "masked"
    return "other" if c.get("exact_check") == "differs" else "exact"


def cell_error(c: dict[str, Any], doc: dict[str, Any], structure: str = "clustered") -> float | None:
    """The cell's error against full softmax on ``structure`` inputs: the structured measurement, else (for an
    approximation whose timing inputs were of that structure) the main error; None for exact softmax cells'
    structures not measured and for masks without a full-softmax comparison."""
    errors = c.get("errors") or {}
    if structure in errors:
        return errors[structure]
    cls = cell_class(c)
    main = doc["config"].get("inputs", "gaussian")
    main = "random" if main == "gaussian" else main
    if cls == "exact" or (cls in ("approx", "other") and main == structure):
        return c["error"]
    return None


def structure_lengths(doc: dict[str, Any]) -> list[int]:
    return sorted({c["seq_len"] for c in doc["results"] if c.get("errors")})
