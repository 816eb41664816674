"""Figures and the summary table, drawn from the metrics dictionary alone (what metrics.json holds).

One `plot_<figure>(metrics, path) -> Path` per figure; nothing here computes a measurement,
so every figure can be redrawn from a saved metrics.json:

    python plotting.py figures/metrics.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["FIGURES", "format_summary", "plot_all", "plot_flatness_stem", "plot_loss_surface_3d",
           "plot_mode_connectivity", "plot_summary_table", "summary_rows"]

# Okabe & Ito's colour-blind-safe palette
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def _save(fig, path: Path) -> Path:
    """Save atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _seeds(metrics: dict) -> list[str]:
    return list(metrics["models"])


def plot_flatness_stem(metrics: dict, path: Path) -> Path:
    """Mean loss increase L(θ + σd) − L(θ) against σ, one stem series per seed, ±1 std over directions."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        seeds = _seeds(metrics)
        sigmas = np.asarray(metrics["models"][seeds[0]]["flatness"]["sigmas"])
        step = np.min(np.diff(np.unique(sigmas))) if len(np.unique(sigmas)) > 1 else max(sigmas.max(), 1.0)
        offsets = (np.arange(len(seeds)) - (len(seeds) - 1) / 2) * 0.15 * step
        for i, (seed, offset) in enumerate(zip(seeds, offsets)):
            f = metrics["models"][seed]["flatness"]
            x = np.asarray(f["sigmas"]) + offset
            color = PALETTE[i % len(PALETTE)]
            markers, stems, base = ax.stem(x, f["mean_increase"], linefmt="-", markerfmt="o", basefmt=" ",
                                           label=f"seed {seed}")
            plt.setp([markers, stems], color=color)
            ax.errorbar(x, f["mean_increase"], yerr=f["std_increase"], fmt="none", ecolor=color, capsize=3, alpha=0.7)
        samples = metrics["models"][seeds[0]]["flatness"]["samples"]
        ax.set_xlabel("perturbation size σ (filter-normalised units)")
        ax.set_ylabel("loss increase  L(θ+σd) − L(θ)")
        ax.set_title(f"Perturbation flatness (mean ± std over {samples} random directions, training loss)")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.legend()
        return _save(fig, path)


def plot_mode_connectivity(metrics: dict, path: Path) -> Path:
    """Loss and accuracy along (1−α)θ_A + αθ_B, train and test, with the loss barriers."""
    c = metrics["connectivity"]
    a, b = c["seeds"]
    with plt.rc_context(STYLE):
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, split in enumerate(("train", "test")):
            s = c[split]
            ax_loss.plot(c["alphas"], s["losses"], color=PALETTE[i], marker=".", label=f"{split} (barrier {s['barrier']:.3f})")
            ax_loss.plot([0, 1], s["endpoint_losses"], color=PALETTE[i], ls="--", lw=0.9)
            ax_acc.plot(c["alphas"], 100 * np.asarray(s["accuracies"]), color=PALETTE[i], marker=".", label=split)
        ax_loss.set_ylabel("mean cross-entropy")
        ax_loss.set_title("Loss along the straight line (dashed: line between endpoint losses)")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title("Accuracy along the straight line")
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel(f"α   (0: seed {a},  1: seed {b})")
            ax.legend()
        return _save(fig, path)


def plot_loss_surface_3d(metrics: dict, path: Path) -> Path:
    """The 2-D loss slice around the first model: a 3-D surface and, beside it, contours."""
    s = metrics["surface"]
    alphas, betas, losses = np.asarray(s["alphas"]), np.asarray(s["betas"]), np.asarray(s["losses"])
    A, B = np.meshgrid(alphas, betas, indexing="ij")
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(12.5, 5))
        ax3d = fig.add_subplot(1, 2, 1, projection="3d")
        ax3d.plot_surface(A, B, losses, cmap="viridis", linewidth=0, antialiased=True, alpha=0.95)
        ax3d.set_xlabel("α (direction 1)")
        ax3d.set_ylabel("β (direction 2)")
        ax3d.set_zlabel(f"{s['split']} loss", labelpad=6)
        ax3d.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax3d.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax3d.set_box_aspect(None, zoom=0.85)
        ax3d.set_title(f"{s['split'].capitalize()} loss around seed {s['seed']}: θ + α·d1 + β·d2")
        ax = fig.add_subplot(1, 2, 2)
        fig.subplots_adjust(wspace=0.3)
        levels = np.linspace(losses.min(), losses.max(), 25) if losses.max() > losses.min() else None
        filled = ax.contourf(A, B, losses, levels=levels, cmap="viridis")
        ax.contour(A, B, losses, levels=levels, colors="k", linewidths=0.4, alpha=0.5)
        ax.plot([0], [0], marker="*", color="white", markeredgecolor="k", ms=12, label="trained model θ")
        fig.colorbar(filled, ax=ax, label=f"{s['split']} loss")
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal")
        ax.set_title("Contours (d1, d2 random, filter-normalised)")
        ax.legend(loc="upper right")
        return _save(fig, path)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "inf"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def summary_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table as (header, rows of strings): one column per seed."""
    seeds = _seeds(metrics)
    m = [metrics["models"][s] for s in seeds]
    last_sigma = m[0]["flatness"]["sigmas"][-1]
    rows = [
        ["train loss", *[_fmt(x["train"]["loss"]) for x in m]],
        ["test loss", *[_fmt(x["test"]["loss"]) for x in m]],
        ["train accuracy (%)", *[f"{100 * x['train']['accuracy']:.2f}" for x in m]],
        ["test accuracy (%)", *[f"{100 * x['test']['accuracy']:.2f}" for x in m]],
        ["generalisation gap (loss)", *[_fmt(x["generalization_gap"]) for x in m]],
        ["sharpness λ_max", *[_fmt(x["sharpness"]["eigenvalue"]) for x in m]],
        ["  converged (HVPs)", *[f"{_fmt(x['sharpness']['converged'])} ({x['sharpness']['iterations']})" for x in m]],
        [f"flatness ΔL at σ={_fmt(last_sigma, 3)}", *[_fmt(x["flatness"]["mean_increase"][-1]) for x in m]],
        ["noise scale B_simple", *[_fmt(x["gradient_noise"]["b_simple"]) for x in m]],
        ["  tr(Σ)", *[_fmt(x["gradient_noise"]["trace_cov"]) for x in m]],
        ["  |G|²", *[_fmt(x["gradient_noise"]["grad_norm_sq"]) for x in m]],
    ]
    c = metrics["connectivity"]
    pair = f"{c['seeds'][0]}↔{c['seeds'][1]}"
    rows += [[f"loss barrier {pair} ({split})", _fmt(c[split]["barrier"]), *[""] * (len(seeds) - 1)]
             for split in ("train", "test")]
    return ["measure", *[f"seed {s}" for s in seeds]], rows


def format_summary(metrics: dict) -> str:
    """The summary table as aligned text for the terminal."""
    header, rows = summary_rows(metrics)
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_summary_table(metrics: dict, path: Path) -> Path:
    """The summary table as a figure, with the data source and configuration underneath."""
    header, rows = summary_rows(metrics)
    first = 0.4 + 0.075 * max(len(r[0]) for r in rows)  # inches for the label column
    width = first + 1.3 * (len(header) - 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(width, 0.3 * (len(rows) + 1) + 0.5))
        ax.axis("off")
        shares = [first / width] + [1.3 / width] * (len(header) - 1)
        table = ax.table(cellText=rows, colLabels=header, cellLoc="right", colLoc="center", colWidths=shares,
                         bbox=[0, 0, 1, 1])
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for (r, col), cell in table.get_celld().items():
            if r == 0:
                cell.set_facecolor("#dde8f3")
                cell.set_text_props(weight="bold")
            if col == 0:
                cell.set_text_props(ha="left")
                cell._loc = "left"
        cfg, d = metrics["config"], metrics["data"]
        ax.set_title(f"{d['name']}: {d['n_train']} train / {d['n_test']} test; {cfg['model']} {tuple(cfg['hidden'])}, "
                     f"{cfg['epochs']} epochs, lr {cfg['lr']}, batch {cfg['batch_size']}", fontsize=9)
        return _save(fig, path)


FIGURES = {
    "flatness_stem.png": plot_flatness_stem,
    "mode_connectivity.png": plot_mode_connectivity,
    "loss_surface_3d.png": plot_loss_surface_3d,
    "summary_table.png": plot_summary_table,
}


def plot_all(metrics: dict, out: Path) -> list[Path]:
    """Every figure into the folder `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [plot(metrics, out / name) for name, plot in FIGURES.items()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python plotting.py <metrics.json or the folder holding it>")
    source = Path(sys.argv[1])
    source = source / "metrics.json" if source.is_dir() else source
    for written in plot_all(json.loads(source.read_text()), source.parent):
        print(written)
