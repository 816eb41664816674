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

__all__ = ["FIGURES", "format_summary", "format_table", "layer_rows", "plot_all", "plot_connectivity_plane",
           "plot_flatness_stem", "plot_reparametrisation",
           "plot_hessian_spectrum", "plot_loss_surface_3d", "plot_mode_connectivity", "plot_sharpness_during_training",
           "plot_summary_table", "summary_rows"]

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
    """Loss and accuracy between the two models along the straight line, the straight line to the
    permutation-aligned second model, and the trained Bézier curve; train solid, test dashed."""
    c = metrics["connectivity"]
    a, b = c["seeds"]
    paths = [("straight line", c, PALETTE[0])]
    if "aligned" in c:
        paths.append(("aligned (weight matching)", c["aligned"], PALETTE[2]))
    if "bezier" in c:
        paths.append(("Bézier curve", {**c["bezier"], "alphas": c["bezier"]["ts"]}, PALETTE[1]))
    with plt.rc_context(STYLE):
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.6))
        for label, p, color in paths:
            for split, style in (("train", "-"), ("test", "--")):
                s = p[split]
                barrier = s.get("barriers", {}).get("loss_linear")
                tag = f"{label}, {split}" + (f" (barrier {barrier:.3f})" if barrier is not None else
                                              f" (max {max(s['losses']):.3f})")
                ax_loss.plot(p["alphas"], s["losses"], color=color, ls=style, lw=1.6, label=tag)
                ax_acc.plot(p["alphas"], 100 * np.asarray(s["accuracies"]), color=color, ls=style, lw=1.6,
                            label=f"{label}, {split}")
        ax_loss.set_ylabel("mean cross-entropy")
        ax_loss.set_title("Loss between the two solutions (barrier: above the line between the endpoints)")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title("Accuracy between the two solutions")
        for ax in (ax_loss, ax_acc):
            ax.set_xlabel(f"α or t   (0: seed {a},  1: seed {b})")
            ax.legend(fontsize=7.5)
        return _save(fig, path)


def plot_connectivity_plane(metrics: dict, path: Path) -> Path:
    """The loss on the plane through θ_A, θ_B and the Bézier control point, with the three points and the curve."""
    c = metrics["connectivity"]
    plane = c["bezier"]["plane"]
    xs, ys, losses = np.asarray(plane["xs"]), np.asarray(plane["ys"]), np.asarray(plane["losses"])
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 5.2))
        levels = np.quantile(losses, np.linspace(0, 1, 26))
        filled = ax.contourf(X, Y, losses, levels=np.unique(levels), cmap="viridis")
        fig.colorbar(filled, ax=ax, label=f"{plane['split']} loss")
        curve = np.asarray(plane["curve"])
        ax.plot(curve[:, 0], curve[:, 1], color="white", lw=2, label="Bézier curve")
        ax.plot([plane["points"][0][0], plane["points"][1][0]], [0, 0], color="white", ls="--", lw=1.2,
                label="straight line")
        for (px, py), name, marker in zip(plane["points"], (f"θ_A (seed {c['seeds'][0]})", f"θ_B (seed {c['seeds'][1]})",
                                                            "control point θ_C"), ("o", "s", "^")):
            ax.plot(px, py, marker=marker, color="white", markeredgecolor="k", ms=9, ls="none", label=name)
        ax.set_xlabel("along θ_B − θ_A (parameter-space distance)")
        ax.set_ylabel("towards θ_C, orthogonal part")
        ax.set_title("Loss on the plane through both solutions and the trained curve")
        ax.legend(fontsize=8, loc="upper right")
        return _save(fig, path)


def plot_reparametrisation(metrics: dict, path: Path) -> Path:
    """Each measure on function-preserving rescaled copies (first layer ×α, second ÷α), relative to α = 1."""
    r = metrics["reparametrisation"]
    rows = sorted(r["rows"], key=lambda row: row["alpha"])
    alphas = [row["alpha"] for row in rows]
    base = next(row for row in rows if row["alpha"] == 1.0)
    measures = [("top_eigenvalue", "top Hessian eigenvalue λ_max"),
                ("worst_case_absolute", "worst-case sharpness, absolute ρ-ball"),
                ("worst_case_adaptive", "worst-case sharpness, adaptive (|w|-scaled)"),
                ("filter_normalised", f"average-case, filter-normalised (σ = {r['sigma']})"),
                ("adaptive_average", f"average-case, adaptive (σ = {r['sigma']})")]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for i, (key, label) in enumerate(measures):
            values = np.asarray([row[key] for row in rows]) / base[key]
            ax.plot(alphas, values, marker="os^vD"[i], color=PALETTE[i], label=label, lw=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.4", lw=0.8)
        ax.set_xlabel("rescaling α (first layer × α, second layer ÷ α)")
        ax.set_ylabel("measure / measure at α = 1")
        change = max(row["max_output_change"] for row in rows)
        ax.set_title(f"Reparametrisation (Dinh et al. 2017): same function (max |Δ output| = {change:.1e}), "
                     f"seed {r['seed']}", fontsize=10)
        ax.legend(fontsize=8)
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


def plot_hessian_spectrum(metrics: dict, path: Path) -> Path:
    """Spectral density of the Hessian (stochastic Lanczos quadrature), log scale, both seeds, top eigenvalues
    and λ_min marked."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(10, 4.4))
        for i, seed in enumerate(_seeds(metrics)):
            m = metrics["models"][seed]
            d, color = m["density"], PALETTE[i % len(PALETTE)]
            density = np.maximum(np.asarray(d["density"]), 1e-12)
            ax.semilogy(d["grid"], density, color=color, lw=1.4, label=f"seed {seed} (σ = {d['sigma']:.2g})")
            top = m["eigenpairs"]["top"]
            ax.plot(top, [density.max() * 2] * len(top), ls="none", marker="v", color=color, ms=7,
                    label=f"seed {seed}: top-{len(top)} eigenvalues (Lanczos)")
            ax.plot([m["eigenpairs"]["lambda_min"]], [density.max() * 2], ls="none", marker="^", color=color, ms=7,
                    mfc="none", label=f"seed {seed}: λ_min = {m['eigenpairs']['lambda_min']:.3g}")
        ax.set_xlabel("eigenvalue of the Hessian of the training loss")
        ax.set_ylabel("spectral density (log scale)")
        ax.set_ylim(bottom=1e-8)
        ax.set_title("Hessian spectrum of the training loss (stochastic Lanczos quadrature)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _save(fig, path)


def plot_sharpness_during_training(metrics: dict, path: Path) -> Path:
    """λ_max, tr(H) and B_simple of the training loss on a fixed subset, every few steps, against the stability
    thresholds 2/η and 2(1+β)/η (Cohen et al. 2021)."""
    cfg = metrics["config"]
    lr, beta = cfg["lr"], cfg["momentum"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        examples = None
        for i, seed in enumerate(_seeds(metrics)):
            track = metrics["models"][seed]["training"].get("tracking", {})
            records = track.get("records", [])
            if not records:
                continue
            examples = track["examples"]
            steps = [r["step"] for r in records]
            for ax, key in zip(axes, ("lambda_max", "trace", "b_simple")):
                ax.plot(steps, [r[key] if r[key] is not None else np.nan for r in records], marker="o", ms=3,
                        color=PALETTE[i % len(PALETTE)], label=f"seed {seed}")
        axes[0].axhline(2 / lr, color="0.3", ls="--", lw=1, label=f"2/η = {2 / lr:.3g}")
        if beta:
            axes[0].axhline(2 * (1 + beta) / lr, color="0.3", ls=":", lw=1, label=f"2(1+β)/η = {2 * (1 + beta) / lr:.3g}")
        axes[0].set_yscale("log")
        titles = ("sharpness λ_max", "trace tr(H) (2 Hutchinson probes)", "noise scale B_simple")
        for ax, title in zip(axes, titles):
            ax.set_xlabel("training step")
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"During training, on the first {examples} training examples" if examples else
                     "No tracking in this run (--track-every -1)", fontsize=10)
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
        *[[f"  λ_{i + 1}", *[_fmt(x["eigenpairs"]["top"][i]) for x in m]] for i in range(1, len(m[0]["eigenpairs"]["top"]))],
        ["λ_min (< 0: saddle)", *[_fmt(x["eigenpairs"]["lambda_min"]) for x in m]],
        ["trace tr(H) ± stderr", *[f"{_fmt(x['trace']['trace'])} ± {_fmt(x['trace']['stderr'], 2)}" for x in m]],
        [f"flatness ΔL at σ={_fmt(last_sigma, 3)}", *[_fmt(x["flatness"]["mean_increase"][-1]) for x in m]],
        [f"  adaptive ΔL at σ={_fmt(last_sigma, 3)}", *[_fmt(x["adaptive_flatness"]["mean_increase"][-1]) for x in m]],
        [f"  worst-case ρ={_fmt(m[0]['worst_case']['absolute']['rho'], 3)}",
         *[_fmt(x["worst_case"]["absolute"]["sharpness"]) for x in m]],
        [f"  adaptive worst-case ρ={_fmt(m[0]['worst_case']['adaptive']['rho'], 3)}",
         *[_fmt(x["worst_case"]["adaptive"]["sharpness"]) for x in m]],
        ["  PAC-Bayes σ (1/σ²)", *[f"{_fmt(x['pac_bayes']['plain']['sigma'], 3)} ({_fmt(x['pac_bayes']['plain']['flatness'], 3)})"
                                   for x in m]],
        ["  magnitude-aware σ (1/σ²)", *[f"{_fmt(x['pac_bayes']['magnitude_aware']['sigma'], 3)} "
                                         f"({_fmt(x['pac_bayes']['magnitude_aware']['flatness'], 3)})" for x in m]],
        ["noise scale B_simple", *[_fmt(x["gradient_noise"]["b_simple"]) for x in m]],
        ["  tr(Σ)", *[_fmt(x["gradient_noise"]["trace_cov"]) for x in m]],
        ["  |G|²", *[_fmt(x["gradient_noise"]["grad_norm_sq"]) for x in m]],
        ["noise scale B_noise", *[_fmt(x["gradient_noise"]["b_noise"]) for x in m]],
        ["noise temperature εN/(B(1−m))", *[_fmt(x["gradient_noise"]["temperature"]) for x in m]],
    ]
    c = metrics["connectivity"]
    pair = f"{c['seeds'][0]}↔{c['seeds'][1]}"
    rows += [[f"loss barrier {pair} ({split})", _fmt(c[split]["barrier"]), *[""] * (len(seeds) - 1)]
             for split in ("train", "test")]
    if "aligned" in c:
        rows += [[f"  after weight matching ({split})", _fmt(c["aligned"][split]["barriers"]["loss_linear"]),
                  *[""] * (len(seeds) - 1)] for split in ("train", "test")]
    if "bezier" in c:
        rows += [[f"  Bézier curve, max loss ({split})", _fmt(max(c["bezier"][split]["losses"])),
                  *[""] * (len(seeds) - 1)] for split in ("train", "test")]
    return ["measure", *[f"seed {s}" for s in seeds]], rows


def layer_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Per-layer curvature: top eigenvalue and trace of each parameter tensor's diagonal Hessian block."""
    seeds = _seeds(metrics)
    layers = [metrics["models"][s]["layers"] for s in seeds]
    header = ["parameter tensor", *[f"seed {s}: λ_max / tr" for s in seeds]]
    rows = [[layer["name"], *[f"{_fmt(ls[i]['top_eigenvalue'], 3)} / {_fmt(ls[i]['trace'], 3)}" for ls in layers]]
            for i, layer in enumerate(layers[0])]
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned text: first column left, the others right."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(metrics: dict) -> str:
    """The summary table and the per-layer table as aligned text for the terminal."""
    return format_table(*summary_rows(metrics)) + "\n\n" + format_table(*layer_rows(metrics))


def plot_summary_table(metrics: dict, path: Path) -> Path:
    """The summary table as a figure, the per-layer table under it, the data and configuration above."""
    header, rows = summary_rows(metrics)
    layer_header, layers = layer_rows(metrics)
    rows = rows + [[""] * len(header), [f"[{layer_header[0]}]", *layer_header[1:]], *layers]
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
    "connectivity_plane.png": plot_connectivity_plane,
    "reparametrisation.png": plot_reparametrisation,
    "hessian_spectrum.png": plot_hessian_spectrum,
    "sharpness_during_training.png": plot_sharpness_during_training,
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
