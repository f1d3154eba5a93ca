"""PNG pictures of attention: block-pooled maps of single heads (log colour scale) and
layer x head heat maps of a statistic. matplotlib with the Agg backend, as in the arena's
report; figures have a fixed size in pixels (``figsize * dpi``, no tight bounding box)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from torch import Tensor

MAP_FIGSIZE = (6.4, 5.6)  # inches
DPI = 100  # so a map picture is 640 x 560 pixels


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def attention_map_png(
    pooled: Tensor,
    path: str | Path,
    *,
    block: int,
    title: str = "",
    sinks: Sequence[int] = (),
    floor: float = 1e-6,
) -> Path:
    """Write one head's pooled attention map ``pooled [nQ, nK]`` (mean probability of each
    ``block x block`` tile of the ``[Tq, Tk]`` map) as a PNG of 640 x 560 pixels.

    Log colour scale from ``max * floor`` to ``max``; tiles with no mass (above the causal
    diagonal) are left blank. Axes are in tokens; ``sinks`` (key positions) are marked with
    ticks on the top edge."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _plt()
    img = pooled.detach().double().cpu().numpy()
    top = float(img.max()) if img.size else 0.0
    vmax = top if top > 0 else 1.0
    vmin = vmax * floor
    shown = np.ma.masked_where(img <= 0, np.clip(img, vmin, None))
    fig, ax = plt.subplots(figsize=MAP_FIGSIZE)
    nq, nk = img.shape
    im = ax.imshow(shown, norm=LogNorm(vmin=vmin, vmax=vmax), cmap="magma", interpolation="nearest",
                   extent=(0, nk * block, nq * block, 0), aspect="auto")
    ax.set_facecolor("white")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if title:
        ax.set_title(title, fontsize=9)
    for j in sinks:
        ax.axvline(j + 0.5, ymin=0.97, ymax=1.0, color="cyan", linewidth=1.5)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"mean attention per {block}x{block} tile" if block > 1 else "attention")
    return _save(fig, Path(path))


def heatmap_png(
    values: Sequence[Sequence[float]],
    path: str | Path,
    *,
    title: str,
    label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Path:
    """A layer x head heat map (rows = layers) of one statistic."""
    import numpy as np

    plt = _plt()
    arr = np.array(values, dtype=float)
    n_layers, n_heads = arr.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2.0), max(3.0, 0.22 * n_layers + 1.5)))
    im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    step = max(1, math.ceil(n_layers / 16))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax).set_label(label)
    return _save(fig, Path(path))


def class_grid_png(classes: Sequence[Sequence[str]], path: str | Path, *, title: str) -> Path:
    """A layer x head grid coloured by head class."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .stats import HEAD_CLASSES

    plt = _plt()
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#bcbd22", "#7f7f7f"]
    arr = np.array([[HEAD_CLASSES.index(c) for c in row] for row in classes], dtype=float)
    n_layers, n_heads = arr.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n_heads + 3.5), max(3.0, 0.22 * n_layers + 1.5)))
    ax.imshow(arr, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=len(HEAD_CLASSES) - 0.5,
              interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    step = max(1, math.ceil(n_layers / 16))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, HEAD_CLASSES)],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.72, top=0.93, bottom=0.08)
    return _save(fig, Path(path))


__all__ = ["DPI", "MAP_FIGSIZE", "attention_map_png", "class_grid_png", "heatmap_png"]
