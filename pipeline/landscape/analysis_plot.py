"""Figures of an analysis file (to be drawn: see analysis_figures)."""

from __future__ import annotations

from matplotlib.figure import Figure

from landscape.store import SurfaceFile


def analysis_figures(surface: SurfaceFile, maps: dict, labels: list[str]) -> dict[str, Figure]:
    """The analysis job's figures."""
    return {}
