"""Figures and the summary table, drawn from the metrics dictionary alone (what metrics.json holds).

One `plot_<figure>(metrics, path) -> Path` per figure; nothing here computes a measurement,
so every figure can be redrawn from a saved metrics.json:

    python plotting.py figures/metrics.json
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402  (matplotlib's own image library)

from landscape.files import write_atomic  # noqa: E402

__all__ = ["FIGURES", "SWEEP_FIGURES", "format_summary", "format_sweep_summary", "plot_sweep", "format_table", "layer_rows", "plot_all", "plot_connectivity_plane",
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
    """The PNG and, beside it, a vector PDF copy, each cropped to the figure's content and written atomically."""
    path = Path(path)
    try:
        for target in (path, path.with_suffix(".pdf")):
            write_atomic(target, lambda f: fig.savefig(f, format=target.suffix[1:], bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


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
        # one legend for both panels (same colours and styles), below them: inside, it hid the barrier's peak
        # and the accuracy's dip; a column per path, train above test
        if fig.get_layout_engine() is None:  # a user's rc may set one, which places the axes itself
            fig.tight_layout(rect=(0, 0.1, 1, 1))
        fig.legend(*ax_loss.get_legend_handles_labels(), loc="lower center", ncol=len(paths), fontsize=8.5,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
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
    if not r.get("rows"):
        return _placeholder("The rescaling experiment needs a ReLU MLP; it was skipped for this model.", path)
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
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.axhline(1.0, color="0.4", lw=0.8)
        ax.set_xlabel("rescaling α (first layer × α, second layer ÷ α)")
        ax.set_ylabel("measure / measure at α = 1 (invariant ones overlap at 1)")
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


def _placeholder(message: str, path: Path) -> Path:
    """A figure that says why there is nothing to draw (so every run writes the same set of files)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
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
    """λ_max, tr(H) and B_simple of the training loss on a fixed subset, and batch sharpness (Andreyev &
    Beneventano 2024) on mini-batches, every few steps, against the stability thresholds 2/η and 2(1+β)/η
    (Cohen et al. 2021)."""
    cfg = metrics["config"]
    lr, beta = cfg["lr"], cfg["momentum"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        examples, checks = None, 0
        for i, seed in enumerate(_seeds(metrics)):
            track = metrics["models"][seed]["training"].get("tracking", {})
            records = track.get("records", [])
            if not records:
                continue
            examples, checks = track["examples"], max(checks, len(records))
            steps = [r["step"] for r in records]
            for ax, key in zip(axes, ("lambda_max", "trace", "b_simple")):
                ax.plot(steps, [r[key] if r[key] is not None else np.nan for r in records], marker="o", ms=3,
                        color=PALETTE[i % len(PALETTE)], label=f"seed {seed}" + (" λ_max" if key == "lambda_max" else ""))
            if "batch_sharpness" in records[0]:
                axes[0].errorbar(steps, [r["batch_sharpness"] for r in records],
                                 yerr=[r["batch_sharpness_stderr"] for r in records], marker="s", ms=3, ls="--",
                                 capsize=2, color=PALETTE[i % len(PALETTE)], label=f"seed {seed} batch sharpness")
        axes[0].axhline(2 / lr, color="0.3", ls="--", lw=1, label=f"2/η = {2 / lr:.3g}")
        if beta:
            axes[0].axhline(2 * (1 + beta) / lr, color="0.3", ls=":", lw=1, label=f"2(1+β)/η = {2 * (1 + beta) / lr:.3g}")
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        methods = {r.get("trace_method", "hutchinson") for m in metrics["models"].values()
                   for r in m["training"].get("tracking", {}).get("records", [])}
        titles = ("λ_max (—) and batch sharpness (- -)", "trace tr(H) (exact)" if methods == {"exact"} else
                  "trace tr(H) (2 Hutchinson probes)", "noise scale B_simple")
        for ax, title in zip(axes, titles):
            ax.set_xlabel("training step")
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if axes[0].get_legend_handles_labels()[0]:  # six entries: below the panel, clear of the threshold lines
            axes[0].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.16))
        few = (f" (at most {checks} checks per seed within the default 20% overhead target; --track-every N for more)"
               if 0 < checks <= 3 and cfg.get("track_every", 0) == 0 else "")  # few points: straight lines
        fig.suptitle(f"During training, on the first {examples} training examples{few}" if examples else
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


def _trace_text(trace: dict, *, ascii: bool = False) -> str:
    """"39.4 (exact)" for the exact diagonal sum, "39.4 ± 0.73" for a stochastic estimate."""
    if trace.get("method") == "exact":
        return f"{_fmt(trace['trace'])} (exact)"
    return f"{_fmt(trace['trace'])} {'+-' if ascii else '±'} {_fmt(trace['stderr'], 2)}"


def _barrier(path: dict) -> float:
    """A path's loss barrier above the line between its endpoints, with α refined near the peak (as the figure's
    legend shows it); the barrier over the given α alone in metrics written before refinement existed."""
    return path.get("barriers", {}).get("loss_linear", path["barrier"])


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
        ["trace tr(H)", *[_trace_text(x["trace"]) for x in m]],
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
    rows += [[f"loss barrier {pair} ({split})", _fmt(_barrier(c[split])), *[""] * (len(seeds) - 1)]
             for split in ("train", "test")]
    if "aligned" in c:
        rows += [[f"  after weight matching ({split})", _fmt(_barrier(c["aligned"][split])),
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
    inches = [0.4 + 0.085 * max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]  # per column
    width = sum(inches)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(width, 0.3 * (len(rows) + 1) + 0.5))
        ax.axis("off")
        shares = [w / width for w in inches]
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


# ----------------------------------------------------------------------------- the report

REFERENCES = {
    "training": "Zhang et al. 2017, Understanding deep learning requires rethinking generalization",
    "sharpness": "Keskar et al. 2017 (sharp minima); Ghorbani et al. 2019 (Hessian spectra by stochastic Lanczos "
                 "quadrature); Meyer et al. 2021 (Hutch++)",
    "tracking": "Cohen et al. 2021, Gradient descent on neural networks typically occurs at the edge of stability",
    "flatness": "Li et al. 2018, Visualizing the loss landscape of neural nets (filter normalisation); "
                "Chaudhari et al. 2017, Entropy-SGD",
    "robust": "Dinh et al. 2017 (sharp minima can generalize); Kwon et al. 2021 (adaptive sharpness); "
              "Jiang et al. 2020 (PAC-Bayes flatness); Andriushchenko et al. 2023 (worst-case sharpness)",
    "noise": "McCandlish et al. 2018, An empirical model of large-batch training; Smith & Le 2018; Mandt et al. 2017",
    "connectivity": "Entezari et al. 2022; Frankle et al. 2020; Ainsworth et al. 2022 (weight matching); "
                    "Garipov et al. 2018 (Bezier curves)",
    "surface": "Li et al. 2018, Visualizing the loss landscape of neural nets",
}


# The thresholds that choose the report's interpretation sentences; each branch has a unit test.
EDGE_BAND = 0.10  # batch sharpness within 10% of the stability threshold: at the edge of stability
CONNECTED = 0.05  # a barrier below 5% of the mean endpoint loss: the path connects the two models
INVARIANT = 0.01  # a measure that moves by under 1% across function-preserving rescalings: invariant
MOVES = 0.10  # ... and by over 10%: it describes the parametrisation, not the function


def _compare(values: dict[str, float], noun: str, higher: str) -> str:
    """'seed 42 is sharper than seed 0 by 8.8% (3.026 vs 2.781)' for two or more seeds."""
    (a, va), (b, vb) = sorted(values.items(), key=lambda kv: kv[1], reverse=True)[:2]
    if not (np.isfinite(va) and np.isfinite(vb)) or vb == 0:
        return f"{noun}: {', '.join(f'seed {k} {_fmt(v)}' for k, v in values.items())}."
    return (f"seed {a} is {higher} than seed {b} by {100 * (va - vb) / abs(vb):.1f}% "
            f"({noun} {_fmt(va)} vs {_fmt(vb)}).")


def negative_curvature_sentence(lambda_min: dict[str, tuple[float, float]]) -> str:
    """Which models have λ_min < 0 by more than its residual (negative curvature the solver resolves)."""
    negative = [s for s, (value, residual) in lambda_min.items() if value < -abs(residual)]
    if negative:
        return (f" lambda_min < 0 beyond its residual for seed(s) {', '.join(negative)}: SGD stopped near, not at, "
                "a minimum (directions of negative curvature remain).")
    return (" No model has lambda_min below zero by more than its residual: no negative curvature is resolved, as "
            "at a local minimum.")


def stability_sentence(seed: str, batch_sharpness: float, lambda_max: float, lr: float, momentum: float) -> str:
    """Where the tracked batch sharpness ends relative to heavy-ball SGD's stability threshold 2(1+β)/η
    (2/η without momentum), with EDGE_BAND either side counting as the edge; and whether full-batch λ_max is
    below it, as Andreyev & Beneventano 2024 find under mini-batch SGD."""
    threshold = 2 * (1 + momentum) / lr
    name = "2(1+beta)/eta" if momentum else "2/eta"
    if not np.isfinite(batch_sharpness):
        return (f"seed {seed}: tracked lambda_max ends at {lambda_max / threshold:.1%} of {name} = "
                f"{_fmt(threshold)} (batch sharpness was not tracked).")
    ratio = batch_sharpness / threshold
    where = ("below the edge of stability" if ratio < 1 - EDGE_BAND else
             f"at the edge of stability (within {EDGE_BAND:.0%})" if ratio <= 1 + EDGE_BAND else
             "beyond the edge of stability: a step overshoots along its own batch's gradient")
    order = ("below it, as Andreyev & Beneventano 2024 find under mini-batch SGD" if lambda_max < batch_sharpness
             else "not below it, unlike Andreyev & Beneventano 2024's finding under mini-batch SGD")
    return (f"seed {seed}: batch sharpness ends at {_fmt(batch_sharpness)}, {ratio:.1%} of {name} = "
            f"{_fmt(threshold)}: {where}; full-batch lambda_max {_fmt(lambda_max)} is {order}.")


def noise_sentence(b_simple: dict[str, float], batch_size: int) -> str:
    """B_simple against the batch size B (McCandlish et al. 2018): above B, noise dominates a step and a larger
    batch would still have sped training up; below it, a larger batch mostly spends compute."""
    above = [s for s, b in b_simple.items() if b > batch_size]
    below = [s for s in b_simple if s not in above]
    ratios = ", ".join(f"seed {s} {b / batch_size:.2g}x" for s, b in b_simple.items())
    if not below:
        return (f"B_simple exceeds the batch size {batch_size} for every model ({ratios}): gradient noise dominates "
                "each step, so larger batches would still have sped up training at this point.")
    if not above:
        return (f"B_simple is below the batch size {batch_size} for every model ({ratios}): the gradient signal "
                "dominates each step, so larger batches would mostly spend more computation per step.")
    return (f"B_simple exceeds the batch size {batch_size} for seed(s) {', '.join(above)} but not for "
            f"{', '.join(below)} ({ratios}): the regime differs between the models.")


def connectivity_sentence(barrier: float, endpoint_loss: float, aligned: float | None) -> str:
    """The straight-line barrier relative to the mean endpoint loss, connected below CONNECTED; after weight
    matching, how much of it was permutation symmetry."""
    ratio = barrier / max(endpoint_loss, 1e-12)
    text = (f"The straight-line barrier is {ratio:.1%} of the mean endpoint training loss: the two seeds are "
            f"linearly connected (below {CONNECTED:.0%})." if ratio < CONNECTED else
            f"The straight-line barrier is {ratio:.2g}x the mean endpoint training loss: the two seeds are not "
            f"linearly connected (a barrier of {CONNECTED:.0%} or more).")
    if aligned is None:
        return text
    aligned_ratio = aligned / max(endpoint_loss, 1e-12)
    share = 1 - aligned / barrier if barrier > 0 else 0.0
    if aligned_ratio < CONNECTED:
        return text + (f" After aligning hidden units it is {_fmt(aligned)} ({aligned_ratio:.1%} of the endpoint "
                       "loss): linearly connected up to permutation symmetry.")
    if aligned < barrier:
        return text + (f" After aligning hidden units it drops to {_fmt(aligned)} ({share:.0%} of it was permutation "
                       f"symmetry), still {aligned_ratio:.0%} of the endpoint loss: not linearly connected even "
                       "after alignment.")
    return text + f" Aligning hidden units does not lower it ({_fmt(aligned)})."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def path_barrier(ts: list[float], losses: list[float]) -> float:
    """A path's barrier: max over t of its loss above the straight line between its endpoint losses."""
    t, loss = np.asarray(ts), np.asarray(losses)
    return float(np.max(loss - ((1 - t) * loss[0] + t * loss[-1])))


def curve_sentence(curve_barrier: float, line_barrier: float, endpoint_loss: float) -> str:
    """Whether the trained Bézier curve connects the models (its barrier below CONNECTED of the endpoint loss)."""
    ratio = curve_barrier / max(endpoint_loss, 1e-12)
    line_connected = line_barrier / max(endpoint_loss, 1e-12) < CONNECTED
    if ratio < CONNECTED:
        return (f"The trained curve's barrier is {ratio:.1%} of the mean endpoint loss: it joins the two solutions "
                "through low loss" + (" although the straight line between them does not." if not line_connected
                                      else ", as the straight line does."))
    if curve_barrier < line_barrier:
        return (f"The trained curve's barrier {_fmt(curve_barrier)} is {1 - curve_barrier / line_barrier:.0%} lower "
                f"than the straight line's {_fmt(line_barrier)} but still {ratio:.2g}x the mean endpoint loss: not a "
                f"low-loss path (that needs under {CONNECTED:.0%}); more --bezier-epochs may find one.")
    return (f"The trained curve's barrier {_fmt(curve_barrier)} is no lower than the straight line's "
            f"{_fmt(line_barrier)}: the curve's training found no better path.")


def basin_sentence(losses: np.ndarray, alphas: list[float], betas: list[float]) -> str:
    """On a (2k+1)² slice centred on the model (losses[i, j] at alphas[i], betas[j]): whether the slice's
    minimum is the centre, and along how many of the eight rays from the centre (axes and diagonals) the loss
    never falls on the way out."""
    losses = np.asarray(losses)
    c = losses.shape[0] // 2
    centre = losses[c, c]
    lowest = np.unravel_index(np.argmin(losses), losses.shape)
    rays = [np.array([losses[c + k * di, c + k * dj] for k in range(c + 1)])
            for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
    rising = sum(bool(np.all(np.diff(ray) >= 0)) for ray in rays)
    if losses[lowest] < centre:
        return (f"The slice's lowest loss {_fmt(float(losses[lowest]))} lies off the trained model, at (alpha, beta) = "
                f"({alphas[lowest[0]]:.3g}, {betas[lowest[1]]:.3g}), below the centre's {_fmt(float(centre))}: "
                "the model is not at the minimum of this slice.")
    if rising == len(rays):
        return (f"The loss rises along every one of the 8 rays from the trained model, {float(losses.max()) / max(centre, 1e-12):.2g}x "
                "at its highest: a single basin around the model on this slice.")
    return (f"The trained model is the slice's lowest point, but along {len(rays) - rising} of the 8 rays from it the "
            "loss falls again on the way out: more than one basin, or a ridge, on this slice.")


def rescaling_sentence(rows: list[dict]) -> str:
    """Dinh et al. 2017's test: across function-preserving rescalings, which measures stay put (under INVARIANT
    relative spread) and which move (over MOVES)."""
    names = {"top_eigenvalue": "lambda_max", "worst_case_absolute": "absolute worst-case sharpness",
             "worst_case_adaptive": "adaptive worst-case sharpness", "filter_normalised": "filter-normalised flatness",
             "adaptive_average": "adaptive flatness"}
    spread = {}
    for key, name in names.items():
        values = np.asarray([row[key] for row in rows], dtype=float)
        spread[name] = float(values.max() / values.min() - 1) if values.min() > 0 else math.inf
    moved = [f"{name} (x{1 + v:.3g})" for name, v in spread.items() if v > MOVES]
    still = [name for name, v in spread.items() if v < INVARIANT]
    between = [f"{name} ({v:.1%})" for name, v in spread.items() if INVARIANT <= v <= MOVES]
    parts = []
    if moved:
        parts.append(f"moves {_and(moved)}")
    if between:
        parts.append(f"moves {_and(between)} a little")
    text = "Rescaling the first two layers (the same function) " + ("; ".join(parts) if parts else "moves no measure")
    if still:
        text += (f", while {_and(still)} stay within {INVARIANT:.0%}: only these describe the function rather than "
                 "its parametrisation.")
    else:
        text += ": every measure depends on the parametrisation here."
    return text


def report_sections(metrics: dict) -> list[dict]:
    """The report's sections: title, formula (mathtext), reference, numbers per seed, interpretation, figure."""
    return [section for build in SECTIONS if (section := build(metrics)) is not None]


def _training_section(metrics: dict) -> dict | None:
    """Losses, accuracies and the generalisation gap."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    gaps = {s: m[s]["generalization_gap"] for s in seeds}
    return {
        "title": "Training and generalisation", "reference": REFERENCES["training"],
        "formula": r"$\mathrm{gap} = L_{\mathrm{test}}(\theta) - L_{\mathrm{train}}(\theta)$",
        "numbers": [f"seed {s}: train loss {_fmt(m[s]['train']['loss'])}, test loss {_fmt(m[s]['test']['loss'])}, "
                    f"test accuracy {100 * m[s]['test']['accuracy']:.2f}%, generalisation gap {_fmt(gaps[s])}"
                    for s in seeds],
        "interpretation": _compare(gaps, "generalisation gap", "worse at generalising"),
        "figure": None,
    }


def _sharpness_section(metrics: dict) -> dict | None:
    """λ_max, the top eigenvalues, λ_min and tr(H)."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    sharp = {s: m[s]["sharpness"]["eigenvalue"] for s in seeds}
    return {
        "title": "Sharpness and the Hessian spectrum", "reference": REFERENCES["sharpness"],
        "formula": r"$\lambda_{\max} = \max_{v} \frac{v^\top H v}{v^\top v},\quad "
                   r"H = \nabla^2_\theta \frac{1}{N}\sum_i \ell_i(\theta),\quad \mathrm{tr}(H) = \sum_i H_{ii} = E_z[z^\top H z]$",
        "numbers": [f"seed {s}: sharpness lambda_max {_fmt(sharp[s])} (residual {_fmt(m[s]['sharpness']['residual'], 2)}), "
                    f"top eigenvalues {', '.join(_fmt(v) for v in m[s]['eigenpairs']['top'])}, lambda_min "
                    f"{_fmt(m[s]['eigenpairs']['lambda_min'])}, trace {_trace_text(m[s]['trace'], ascii=True)}"
                    for s in seeds],
        "interpretation": _compare(sharp, "lambda_max", "sharper") + negative_curvature_sentence(
            {s: (m[s]["eigenpairs"]["lambda_min"], m[s]["eigenpairs"].get("lambda_min_residual", 0.0)) for s in seeds}),
        "figure": "hessian_spectrum.png",
    }


def _tracking_section(metrics: dict) -> dict | None:
    """λ_max during training against the stability threshold."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    cfg = metrics["config"]
    final = {s: (m[s]["training"].get("tracking", {}).get("records") or [{}])[-1] for s in seeds}
    return {
        "title": "Curvature during training", "reference": REFERENCES["tracking"],
        "formula": r"$\lambda_{\max}(\theta_t),\ E_B\left[\frac{g_B^\top H_B g_B}{\|g_B\|^2}\right]\ "
                   r"\mathrm{vs}\ 2/\eta\ \mathrm{and}\ 2(1+\beta)/\eta$",
        "numbers": [f"seed {s}: at the end, tracked lambda_max {_fmt(final[s].get('lambda_max', math.nan))} on "
                    f"{m[s]['training'].get('tracking', {}).get('examples', 0)} examples, batch sharpness "
                    f"{_fmt(final[s].get('batch_sharpness', math.nan))} +- "
                    f"{_fmt(final[s].get('batch_sharpness_stderr', math.nan), 2)} over batches of "
                    f"{cfg['batch_size']}; checked every {m[s]['training'].get('tracking', {}).get('every', 0)} steps"
                    for s in seeds],
        "interpretation": " ".join(stability_sentence(s, final[s].get("batch_sharpness", math.nan),
                                                      final[s]["lambda_max"], cfg["lr"], cfg["momentum"])
                                   for s in seeds) if all(final.values()) else
                          "Tracking was switched off in this run.",
        "figure": "sharpness_during_training.png",
    }


def _flatness_section(metrics: dict) -> dict | None:
    """Filter-normalised flatness."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    flat = {s: m[s]["flatness"]["mean_increase"][-1] for s in seeds}
    sigma = m[seeds[0]]["flatness"]["sigmas"][-1]
    return {
        "title": "Perturbation flatness", "reference": REFERENCES["flatness"],
        "formula": r"$\Delta L(\sigma) = E_d\,[L(\theta + \sigma d) - L(\theta)],\ "
                   r"d\ \mathrm{filter\text{-}normalised}:\ \|d_{r}\| = \|\theta_{r}\|$",
        "numbers": [f"seed {s}: flatness increase at sigma {_fmt(sigma, 3)} is {_fmt(flat[s])} +- "
                    f"{_fmt(m[s]['flatness']['std_increase'][-1], 2)} (std over {m[s]['flatness']['samples']} "
                    "directions)" for s in seeds],
        "interpretation": _compare(flat, f"loss increase at sigma {_fmt(sigma, 3)}", "less flat"),
        "figure": "flatness_stem.png",
    }


def _robust_flatness_section(metrics: dict) -> dict | None:
    """The measures meant to survive reparametrisation, and the rescaling experiment (MLPs only)."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    if "worst_case" not in m[seeds[0]]:
        return None
    rows = metrics.get("reparametrisation", {}).get("rows", [])
    return {
        "title": "Flatness that survives reparametrisation", "reference": REFERENCES["robust"],
        "formula": r"$S_\rho = \max_{\|T^{-1}\epsilon\|\leq\rho} L(\theta+\epsilon) - L(\theta),\ "
                   r"T = I\ \mathrm{or}\ \mathrm{diag}|\theta|;\quad \mathrm{PAC\text{-}Bayes}: 1/\sigma^2$",
        "numbers": [f"seed {s}: adaptive increase {_fmt(m[s]['adaptive_flatness']['mean_increase'][-1])}, worst-case "
                    f"{_fmt(m[s]['worst_case']['absolute']['sharpness'])} (absolute), "
                    f"{_fmt(m[s]['worst_case']['adaptive']['sharpness'])} (adaptive), PAC-Bayes sigma "
                    f"{_fmt(m[s]['pac_bayes']['plain']['sigma'], 3)}, magnitude-aware "
                    f"{_fmt(m[s]['pac_bayes']['magnitude_aware']['sigma'], 3)}" for s in seeds],
        "interpretation": rescaling_sentence(rows) if rows else
                          "The rescaling experiment needs a ReLU MLP and was skipped for this model.",
        "figure": "reparametrisation.png",
    }


def _noise_section(metrics: dict) -> dict | None:
    """The gradient noise scales."""
    seeds = _seeds(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    cfg = metrics["config"]
    noise = {s: math.inf if m[s]["gradient_noise"]["b_simple"] is None else m[s]["gradient_noise"]["b_simple"]
             for s in seeds}
    return {
        "title": "Gradient noise", "reference": REFERENCES["noise"],
        "formula": r"$B_{\mathrm{simple}} = \frac{\mathrm{tr}\,\Sigma}{|G|^2},\ "
                   r"B_{\mathrm{noise}} = \frac{\mathrm{tr}(H\Sigma)}{G^\top H G},\ "
                   r"g = \frac{\epsilon N}{B(1-m)}$",
        "numbers": [f"seed {s}: noise scale B_simple {_fmt(m[s]['gradient_noise']['b_simple'])}, B_noise "
                    f"{_fmt(m[s]['gradient_noise']['b_noise'])}, temperature "
                    f"{_fmt(m[s]['gradient_noise']['temperature'])}" for s in seeds],
        "interpretation": noise_sentence(noise, cfg["batch_size"]),
        "figure": None,
    }


def _connectivity_section(metrics: dict) -> dict | None:
    """The barriers between the two models."""
    c = metrics["connectivity"]
    base = {s: (c["train"]["endpoint_losses"][i]) for i, s in enumerate(c["seeds"][:2])}
    aligned = _barrier(c["aligned"]["train"]) if "aligned" in c else None
    return {
        "title": "Mode connectivity", "reference": REFERENCES["connectivity"],
        "formula": r"$B = \max_\alpha L((1-\alpha)\theta_A + \alpha\theta_B) - "
                   r"[(1-\alpha) L(\theta_A) + \alpha L(\theta_B)]$",
        "numbers": [f"loss barrier {split} {_fmt(_barrier(c[split]))}"
                    + (f", after weight matching {_fmt(_barrier(c['aligned'][split]))}"
                       if "aligned" in c else "")
                    + (f", Bezier curve max loss {_fmt(max(c['bezier'][split]['losses']))}" if "bezier" in c else "")
                    for split in ("train", "test")],
        "interpretation": connectivity_sentence(_barrier(c["train"]), float(np.mean(list(base.values()))), aligned),
        "figure": "mode_connectivity.png",
    }


def _plane_section(metrics: dict) -> dict | None:
    """The trained Bézier curve (when there is one)."""
    c = metrics["connectivity"]
    if "bezier" not in c:
        return None
    return {"title": "The plane through both solutions and the curve", "reference": REFERENCES["connectivity"],
            "formula": r"$\theta(t) = (1-t)^2\theta_A + 2t(1-t)\theta_C + t^2\theta_B$",
            "numbers": [f"Bezier curve max loss train {_fmt(max(c['bezier']['train']['losses']))}, "
                        f"test {_fmt(max(c['bezier']['test']['losses']))}"],
            "interpretation": curve_sentence(path_barrier(c["bezier"]["ts"], c["bezier"]["train"]["losses"]),
                                             _barrier(c["train"]), float(np.mean(c["train"]["endpoint_losses"]))),
            "figure": "connectivity_plane.png"}


def _surface_section(metrics: dict) -> dict | None:
    """The 2-D loss slice."""
    s = metrics["surface"]
    losses = np.asarray(s["losses"])
    centre = losses[len(losses) // 2, len(losses) // 2]
    return {
        "title": "Loss surface", "reference": REFERENCES["surface"],
        "formula": r"$f(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2)$",
        "numbers": [f"seed {s['seed']}: {s['split']} loss at the centre {_fmt(centre)}, minimum on the slice "
                    f"{_fmt(losses.min())}, maximum {_fmt(losses.max())}"],
        "interpretation": basin_sentence(losses, s["alphas"], s["betas"]),
        "figure": "loss_surface_3d.png",
    }


SECTIONS = (_training_section, _sharpness_section, _tracking_section, _flatness_section, _robust_flatness_section,
            _noise_section, _connectivity_section, _plane_section, _surface_section)  # the report's order


def _wrapped(text: str, fontsize: float) -> str:
    """Break a line to fit an A4 landscape page (cheaper than matplotlib's wrap=True)."""
    return "\n".join(textwrap.wrap(text, width=int(1350 / fontsize))) if text else text


def _text_page(pdf, lines: list[tuple[str, dict]]) -> None:
    fig = plt.figure(figsize=(11.69, 8.27))
    y = 0.95
    for text, style in lines:
        step = style.pop("step", 0.035)
        fig.text(0.06, y, _wrapped(text, style.get("fontsize", 10)), va="top", **style)
        y -= step * (1 + _wrapped(text, style.get("fontsize", 10)).count("\n"))
    pdf.savefig(fig)
    plt.close(fig)


def _write_pdf(path: Path, title: str, pages) -> Path:
    """A multi-page PDF written atomically: pages(pdf) draws every page into the open PdfPages."""
    from matplotlib.backends.backend_pdf import PdfPages

    def write(f) -> None:
        with plt.rc_context({**STYLE, "axes.grid": False}), PdfPages(f) as pdf:
            pages(pdf)
            pdf.infodict()["Title"] = title

    return write_atomic(Path(path), write)


def plot_report(metrics: dict, path: Path) -> Path:
    """Loss_Landscape_Report.pdf: a title page, one page per measure (definition, reference, figure, numbers,
    an interpretation computed from them), the summary table last. Figures are read from path's folder."""

    def pages(pdf) -> None:
        _title_page(pdf, metrics)
        for section in [*report_sections(metrics), SUMMARY_SECTION]:
            _section_page(pdf, section, Path(path).parent)

    return _write_pdf(path, "Loss landscape report", pages)


SUMMARY_SECTION = {"title": "Summary table", "formula": "", "reference": "", "numbers": [], "interpretation": "",
                   "figure": "summary_table.png"}


def _title_page(pdf, metrics: dict) -> None:
    cfg, d, env = metrics["config"], metrics["data"], metrics["environment"]
    timings = metrics.get("timings", {})
    lines = [("Where does SGD land? Loss landscape report", {"fontsize": 20, "weight": "bold", "step": 0.06}),
             (f"created {metrics.get('created', '')}", {"fontsize": 10, "step": 0.05}),
             (f"data: {d['source']} ({d['n_train']} train / {d['n_test']} test, sha256 {d['sha256'][:16]}...)",
              {"fontsize": 9}),
             (f"model: {cfg['model']} {tuple(cfg['hidden'])}, seeds {', '.join(map(str, cfg['seeds']))}; SGD lr "
              f"{cfg['lr']}, momentum {cfg['momentum']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs",
              {"fontsize": 9}),
             (f"versions: python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, "
              f"matplotlib {env['matplotlib']}; {env['device']}, {env['threads']} threads", {"fontsize": 9,
                                                                                              "step": 0.05}),
             ("time per stage (s):", {"fontsize": 10, "weight": "bold"})]
    items = list(timings.items())
    for i in range(0, len(items), 4):
        lines.append(("    ".join(f"{k} {v:.2f}" for k, v in items[i : i + 4]), {"fontsize": 8, "step": 0.028}))
    _text_page(pdf, lines)


def _section_page(pdf, section: dict, folder: Path) -> None:
    fig = plt.figure(figsize=(11.69, 8.27))
    fig.text(0.05, 0.96, section["title"], fontsize=16, weight="bold", va="top")
    y = 0.91
    if section["formula"]:
        fig.text(0.05, y, section["formula"], fontsize=12, va="top")
        y -= 0.06
    for text, size, style, step in ((f"Reference: {section['reference']}" if section["reference"] else "", 8,
                                     {"style": "italic"}, 0.035),
                                    *[(line, 8.5, {}, 0.03) for line in section["numbers"]],
                                    (section["interpretation"], 9.5, {"weight": "bold"}, 0.05)):
        if text:
            wrapped = _wrapped(text, size)
            fig.text(0.05, y, wrapped, fontsize=size, va="top", **style)
            y -= step * (1 + 0.8 * wrapped.count("\n"))
    image = folder / section["figure"] if section["figure"] else None
    if image is not None and image.exists():
        ax = fig.add_axes((0.05, 0.02, 0.9, max(0.1, y - 0.04)))
        with PIL.Image.open(image) as png:  # RGB (alpha only costs encoding time), box-averaged to <= 1,600 px
            pixels = png.convert("RGB").reduce(max(1, math.ceil(png.width / 1600)))  # across: ~140 dpi on the page
        ax.imshow(np.asarray(pixels), interpolation="none")  # embedded as they are: matplotlib resamples nothing
        ax.axis("off")
    pdf.savefig(fig)
    plt.close(fig)


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


REPORT = "Loss_Landscape_Report.pdf"


def plot_all(metrics: dict, out: Path) -> list[Path]:
    """Every figure (PNG at 150 dpi and a vector PDF copy), then the report, which embeds them, into `out`."""
    out = Path(out)
    return [*_plot_figures(FIGURES, metrics, out), plot_report(metrics, out / REPORT)]


def _plot_figures(figures: dict, metrics: dict, out: Path) -> list[Path]:
    """Each figure of `figures` (name -> plot function) into `out`: the PNG and its PDF copy."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in figures.items():
        written += [plot(metrics, out / name), (out / name).with_suffix(".pdf")]
    return written


# ----------------------------------------------------------------------------- the sweep
SWEEP_LABELS = {
    "lambda_max": "λ_max", "lambda_k": "λ_k (k-th largest)", "lambda_min": "λ_min", "trace": "tr(H)",
    "layer_lambda_max": "largest layer-block λ_max", "flatness": "filter-normalised ΔL(σ_max)",
    "adaptive_flatness": "adaptive ΔL(σ_max)", "worst_case_absolute": "worst-case sharpness (absolute)",
    "worst_case_adaptive": "worst-case sharpness (adaptive)", "pac_bayes_inv_sigma_sq": "PAC-Bayes 1/σ²",
    "pac_bayes_magnitude_aware_inv_sigma_sq": "PAC-Bayes 1/σ² (magnitude-aware)", "b_simple": "B_simple",
    "b_noise": "B_noise", "temperature": "temperature εN/(B(1−m))", "weight_norm_sq": "‖θ‖²",
    "batch_sharpness": "batch sharpness", "barrier": "barrier (straight line)",
    "aligned_barrier": "barrier after weight matching",
}


def _sweep_correlations(metrics: dict, gap: str) -> list[tuple[str, dict]]:
    """(measure, its correlation with `gap`) for the measures that have one, sorted by τ, largest first."""
    found = [(k, v[gap]) for k, v in metrics["sweep"]["correlations"].items() if v.get(gap)]
    return sorted(found, key=lambda kv: -np.nan_to_num(kv[1]["tau"], nan=-2.0))


def plot_sweep_measures(metrics: dict, path: Path) -> Path:
    """Each measure against the generalisation gap, one panel per measure: colour the SGD temperature εN/B,
    marker the width; Kendall's τ and Ψ in each panel's title."""
    rows = metrics["sweep"]["rows"]
    measures = [m for m in SWEEP_LABELS if any(np.isfinite(r.get(m, math.nan)) for r in rows)]
    widths = sorted({r["width"] for r in rows})
    markers = dict(zip(widths, "osD^v<>"))
    columns = 4
    lines = max(1, math.ceil(len(measures) / columns))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.9 * lines), squeeze=False,
                                 layout="constrained")
        temperature = np.asarray([r["temperature"] for r in rows])
        norm = matplotlib.colors.LogNorm(vmin=temperature.min(), vmax=max(temperature.max(), temperature.min() * 1.01))
        for ax, measure in zip(axes.flat, measures):
            corr = metrics["sweep"]["correlations"][measure].get("gap_loss")
            for w in widths:
                mine = [r for r in rows if r["width"] == w]
                ax.scatter([r[measure] for r in mine], [r["gap_loss"] for r in mine], c=[r["temperature"] for r in mine],
                           cmap="viridis", norm=norm, marker=markers[w], s=28, edgecolors="0.2", linewidths=0.4,
                           label=f"width {w}")
            ax.set_xlabel(SWEEP_LABELS[measure], fontsize=9)
            ax.set_ylabel("test − train loss", fontsize=9)
            if corr:
                ax.set_title(f"τ = {corr['tau']:.2f}, Ψ = {corr['psi']:.2f}", fontsize=9)
            values = np.asarray([r[measure] for r in rows], dtype=float)
            if np.all(values[np.isfinite(values)] > 0) and np.nanmax(values) > 20 * np.nanmin(values):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        for ax in list(axes.flat)[len(measures):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, shrink=0.6,
                     label="SGD temperature εN/(B(1−m))")
        fig.suptitle(f"{len(rows)} models trained to training loss {metrics['config']['sweep_target_loss']:g}: "
                     "each measure against the generalisation gap", fontsize=11)
        return _save(fig, path)


def plot_sweep_correlation(metrics: dict, path: Path) -> Path:
    """Kendall's τ and the granulated Ψ of each measure with the loss gap, with bootstrap intervals, sorted."""
    found = _sweep_correlations(metrics, "gap_loss")[::-1]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 0.38 * len(found) + 1.6))
        y = np.arange(len(found))
        for offset, key, interval, colour, name in ((0.17, "tau", "tau_interval", PALETTE[0], "Kendall τ"),
                                                    (-0.17, "psi", "psi_interval", PALETTE[1], "granulated Ψ")):
            values = np.asarray([c[key] for _, c in found], dtype=float)
            low = np.asarray([c[interval][0] for _, c in found], dtype=float)
            high = np.asarray([c[interval][1] for _, c in found], dtype=float)
            ax.errorbar(values, y + offset, xerr=np.nan_to_num([values - low, high - values]), fmt="o", ms=4,
                        capsize=2, color=colour, label=f"{name} (95% bootstrap interval)")
        ax.axvline(0, color="0.3", lw=1)
        ax.set_yticks(y, [SWEEP_LABELS.get(k, k) for k, _ in found])
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("rank correlation with the generalisation gap (test − train loss); > 0: larger means worse")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"Which measure ranks the {len(metrics['sweep']['rows'])} models' generalisation", fontsize=10)
        return _save(fig, path)


def plot_batch_sharpness(metrics: dict, path: Path) -> Path:
    """Batch sharpness and full-batch λ_max at the end of training, in units of the stability threshold 2/η
    (so 1 is 2/η for every learning rate; 1 + β is heavy-ball's 2(1+β)/η), against the batch size."""
    rows = metrics["sweep"]["rows"]
    beta = metrics["config"]["momentum"]
    lrs = sorted({r["lr"] for r in rows})
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for i, lr in enumerate(lrs):
            mine = sorted((r for r in rows if r["lr"] == lr), key=lambda r: r["batch_size"])
            colour = PALETTE[i % len(PALETTE)]
            ax.scatter([r["batch_size"] for r in mine], [r["batch_sharpness"] * lr / 2 for r in mine], marker="s",
                       color=colour, s=26, label=f"η = {lr:g}: batch sharpness")
            ax.scatter([r["batch_size"] for r in mine], [r["lambda_max"] * lr / 2 for r in mine], marker="o",
                       facecolors="none", edgecolors=colour, s=26, label=f"η = {lr:g}: λ_max")
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="2/η")
        if beta:
            ax.axhline(1 + beta, color="0.3", ls=":", lw=1, label="2(1+β)/η")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("curvature × η/2 (1 = the threshold 2/η)")
        ax.set_title("At the end of training: batch sharpness and λ_max against the stability threshold", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _save(fig, path)


def _interval_side(c: dict | None, key: str = "tau") -> int:
    """+1 when the 95% interval of c's statistic lies above 0, −1 below, 0 when it contains 0 or is unknown."""
    if not c:
        return 0
    low, high = c[f"{key}_interval"]
    return 1 if low is not None and low > 0 else -1 if high is not None and high < 0 else 0


def ranking_sentences(correlations: dict, gap: str = "gap_loss") -> list[str]:
    """Which measures ranked the models' generalisation gap on this sweep: τ's 95% interval above 0 (a larger
    value went with a larger gap), below 0 (the wrong way round), or containing 0 (no evidence either way)."""
    by_side = {1: [], -1: [], 0: []}
    for measure, c in correlations.items():
        if c.get(gap):
            by_side[_interval_side(c[gap])].append(f"{SWEEP_LABELS.get(measure, measure)} (τ {c[gap]['tau']:+.2f})")
    sentences = []
    if by_side[1]:
        sentences.append(f"Ranked generalisation (τ's 95% interval above 0): {_and(by_side[1])}.")
    else:
        sentences.append("No measure ranked generalisation with a 95% interval above 0 on this sweep.")
    if by_side[-1]:
        sentences.append(f"Ranked it the wrong way round (interval below 0: larger went with a smaller gap): "
                         f"{_and(by_side[-1])}.")
    if by_side[0]:
        sentences.append(f"No evidence either way (interval contains 0): {_and(by_side[0])}.")
    return sentences


def literature_sentences(correlations: dict, batch_vs_sharpness: dict | None, gap: str = "gap_loss") -> list[str]:
    """This sweep against published findings, each verdict chosen by the intervals: Jiang et al. 2020 (sharpness
    and magnitude-aware PAC-Bayes among the best predictors), Keskar et al. 2017 (larger batches, sharper
    minima), Dinh et al. 2017 / Andriushchenko et al. 2023 (raw sharpness depends on the parametrisation and
    can mislead)."""
    ranked = sorted((c[gap]["psi"] if c.get(gap) and c[gap]["psi"] is not None else -2.0, m)
                    for m, c in correlations.items())[::-1]
    top_third = {m for _, m in ranked[: max(1, math.ceil(len(ranked) / 3))]}
    jiang = [m for m in ("worst_case_absolute", "worst_case_adaptive", "pac_bayes_magnitude_aware_inv_sigma_sq")
             if m in correlations]
    among = [SWEEP_LABELS[m] for m in jiang if m in top_third]
    out = []
    verb = "is" if len(among) == 1 else "are"
    if len(among) == len(jiang):
        out.append(f"Jiang et al. 2020: sharpness and magnitude-aware PAC-Bayes among the best predictors. Here "
                   f"too: {_and(among)} {verb} in the top third by Ψ. Our data agree.")
    elif among:
        out.append(f"Jiang et al. 2020: sharpness and magnitude-aware PAC-Bayes among the best predictors. Here only "
                   f"{_and(among)} {verb} in the top third by Ψ: our data partly disagree.")
    else:
        out.append("Jiang et al. 2020: sharpness and magnitude-aware PAC-Bayes among the best predictors. Here none "
                   "of them is in the top third by Ψ: our data disagree.")
    side = _interval_side(batch_vs_sharpness)
    tau = batch_vs_sharpness["tau"] if batch_vs_sharpness else math.nan
    out.append("Keskar et al. 2017: larger batches find sharper minima. " + (
        f"Here τ(batch size, λ_max) = {tau:+.2f} with its interval above 0: our data agree." if side > 0 else
        f"Here τ(batch size, λ_max) = {tau:+.2f} with its interval below 0: larger batches found flatter minima, "
        "our data disagree." if side < 0 else
        f"Here τ(batch size, λ_max) = {tau:+.2f} with an interval that contains 0: our data neither confirm nor "
        "refute it."))
    raw = correlations.get("lambda_max", {}).get(gap)
    adaptive = correlations.get("worst_case_adaptive", {}).get(gap)
    if raw and adaptive:
        better = "better" if adaptive["tau"] > raw["tau"] else "no better"
        out.append(f"Dinh et al. 2017, Andriushchenko et al. 2023: raw sharpness depends on the parametrisation and "
                   f"can mislead. Here λ_max has τ {raw['tau']:+.2f} and the rescaling-invariant adaptive worst-case "
                   f"sharpness {adaptive['tau']:+.2f}: the invariant measure ranks {better}"
                   + (" and λ_max ranks the wrong way round." if _interval_side(raw) < 0 else "."))
    return out


def edge_of_stability_sentence(rows: list[dict], momentum: float) -> str:
    """Andreyev & Beneventano 2024 across the sweep: how many models end with batch sharpness within EDGE_BAND
    of 2/η or 2(1+β)/η, and in how many full-batch λ_max is below batch sharpness."""
    usable = [r for r in rows if r.get("batch_sharpness") is not None and np.isfinite(r["batch_sharpness"])]
    if not usable:
        return "Batch sharpness was not tracked in this sweep."
    thresholds = [2 / r["lr"] for r in usable], [2 * (1 + momentum) / r["lr"] for r in usable]
    at = [sum(abs(r["batch_sharpness"] / t - 1) <= EDGE_BAND for r, t in zip(usable, ts)) for ts in thresholds]
    below = sum(r["lambda_max"] < r["batch_sharpness"] for r in usable)
    return (f"Andreyev & Beneventano 2024: under mini-batch SGD batch sharpness, not λ_max, settles at 2/η. Here "
            f"{at[0]} of {len(usable)} models end with batch sharpness within {EDGE_BAND:.0%} of 2/η and {at[1]} within "
            f"{EDGE_BAND:.0%} of 2(1+β)/η; full-batch λ_max is below batch sharpness in {below} of {len(usable)}"
            + (": our data agree on the order." if below > len(usable) / 2 else
               ": our data disagree on the order."))


def sweep_findings(metrics: dict) -> list[str]:
    """The sweep report's sentences, each chosen by the sweep's numbers."""
    sweep = metrics["sweep"]
    return [*ranking_sentences(sweep["correlations"]),
            *literature_sentences(sweep["correlations"], sweep.get("batch_size_vs_sharpness")),
            edge_of_stability_sentence(sweep["rows"], metrics["config"]["momentum"])]


SWEEP_REPORT = "Sweep_Report.pdf"


def plot_sweep_report(metrics: dict, path: Path) -> Path:
    """Sweep_Report.pdf: the grid and what was left out, a page of findings (chosen by the numbers), then a page
    per sweep figure. Figures are read from path's folder."""
    sweep, cfg = metrics["sweep"], metrics["config"]

    def pages(pdf) -> None:
        _text_page(pdf, [
            ("Which geometry predicts generalisation? Sweep report", {"fontsize": 18, "weight": "bold", "step": 0.06}),
            (f"{len(sweep['rows'])} models measured of {len(sweep['grid']) * len(sweep['seeds'])}: batch sizes "
             f"{cfg['sweep_batch_sizes']}, learning rates {cfg['sweep_lrs']}, widths {cfg['sweep_widths']}, seeds "
             f"{sweep['seeds']}; each trained to training loss {cfg['sweep_target_loss']:g} within "
             f"{cfg['sweep_max_epochs']} epochs", {"fontsize": 10}),
            *[(f"left out: batch {e['batch_size']}, lr {e['lr']}, width {e['width']}, seed {e['seed']} "
               f"({e.get('reason', 'missed the target')})", {"fontsize": 8, "step": 0.025}) for e in sweep["excluded"]]])
        _text_page(pdf, [("Findings", {"fontsize": 16, "weight": "bold", "step": 0.06}),
                         *[(text, {"fontsize": 10, "step": 0.03}) for text in sweep_findings(metrics)]])
        for name, title in (("sweep_correlation.png", "Rank correlations"),
                            ("sweep_measures.png", "Each measure against the gap"),
                            ("batch_sharpness.png", "Batch sharpness across batch sizes")):
            _section_page(pdf, {"title": title, "formula": "", "reference": "", "numbers": [], "interpretation": "",
                                "figure": name}, Path(path).parent)

    return _write_pdf(path, "Sweep report", pages)


SWEEP_FIGURES = {"sweep_measures.png": plot_sweep_measures, "sweep_correlation.png": plot_sweep_correlation,
                 "batch_sharpness.png": plot_batch_sharpness}


def plot_sweep(metrics: dict, out: Path) -> list[Path]:
    """The sweep's figures (PNG and vector PDF each) into `out`."""
    if not metrics["sweep"]["rows"]:
        return []
    out = Path(out)
    return [*_plot_figures(SWEEP_FIGURES, metrics, out), plot_sweep_report(metrics, out / SWEEP_REPORT)]


def format_sweep_summary(metrics: dict) -> str:
    """The terminal's table of the sweep: each measure's τ and Ψ with the loss and error gaps, with intervals."""
    sweep = metrics["sweep"]
    header = ["measure", "tau (loss gap)", "95% interval", "Psi (loss gap)", "95% interval", "tau (error gap)"]
    rows = []
    for measure, c in _sweep_correlations(metrics, "gap_loss"):
        error = sweep["correlations"][measure].get("gap_error") or {"tau": math.nan}
        rows.append([measure, f"{c['tau']:+.2f}", f"[{c['tau_interval'][0]:+.2f}, {c['tau_interval'][1]:+.2f}]",
                     f"{c['psi']:+.2f}", f"[{c['psi_interval'][0]:+.2f}, {c['psi_interval'][1]:+.2f}]",
                     f"{error['tau']:+.2f}"])
    lines = [f"sweep: {len(sweep['rows'])} models measured, {len(sweep['excluded'])} left out (missed training loss "
             f"{metrics['config']['sweep_target_loss']:g}, or diverged)", format_table(header, rows)]
    if sweep["rows"]:
        lines += ["", *(textwrap.fill(text, 110) for text in sweep_findings(metrics))]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python plotting.py <metrics.json or the folder holding it>")
    source = Path(sys.argv[1])
    source = source / "metrics.json" if source.is_dir() else source
    for written in plot_all(json.loads(source.read_text()), source.parent):
        print(written)
