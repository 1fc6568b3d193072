"""The audits' chart plumbing: matplotlib without a display, and a figure as PNG bytes that
are the same run to run (no "Software" stamp), so a report's files are reproducible."""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (compute nodes have no display); imported on use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """`fig` as PNG bytes; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
