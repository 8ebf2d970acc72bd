"""A PNG histogram of curation scores, drawn from pre-binned counts (the scores are never held)."""

from __future__ import annotations

from pathlib import Path


def score_histogram(counts: list[int], lo: float, hi: float, threshold: float, path: Path, title: str) -> None:
    """Bars of `counts` over equal bins of [lo, hi], with the selection threshold marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    width = (hi - lo) / len(counts)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([lo + i * width for i in range(len(counts))], counts, width=width, align="edge", color="#4878a8")
    ax.axvline(threshold, color="#c03030", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.set_xlim(lo, hi)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
