"""Plotting helpers shared by every part that draws (the lab's experiments, the report); saving is
:func:`hdopt.io.save_figure`."""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are only ever written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
