"""Figures and the reports' PDF pages, drawn from the metrics dictionary alone (what metrics.json holds).

One `plot_<figure>(metrics, path) -> Path` per figure, and `plot_report`, which lays out the pages that
experiment/report.py writes (the words: every sentence and table is chosen there, never here). Nothing here
computes a measurement, so everything can be redrawn from a saved metrics.json: `python main.py --plot-only`.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402  (matplotlib's own image library)

from experiment.report import (SWEEP_LABELS, Document, Section, TextPage, document, layer_rows,  # noqa: E402
                               seeds_of, sorted_findings, summary_rows)
from landscape.files import write_atomic  # noqa: E402

__all__ = ["DYNAMICS_FIGURES", "FIGURES", "SWEEP_FIGURES", "plot_all", "plot_batch_sharpness", "plot_connectivity_plane",
           "plot_edge_of_stability",
           "plot_flatness_stem", "plot_hessian_spectrum", "plot_loss_surface_3d", "plot_mode_connectivity",
           "plot_gap_temperature", "plot_reparametrisation", "plot_report", "plot_sharpness_during_training", "plot_stationary_covariance", "plot_summary_table",
           "plot_sweep_correlation", "plot_sweep_measures"]

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


def plot_flatness_stem(metrics: dict, path: Path) -> Path:
    """Mean loss increase L(θ + σd) − L(θ) against σ, one stem series per seed, ±1 std over directions."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        seeds = seeds_of(metrics)
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
        for i, seed in enumerate(seeds_of(metrics)):
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
        examples, tol, batches = None, None, None
        for i, seed in enumerate(seeds_of(metrics)):
            track = metrics["models"][seed]["training"].get("tracking", {})
            records = track.get("records", [])
            if not records:
                continue
            examples, tol, batches = track["examples"], records[-1]["tol"], track["batches"]
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
        titles = (f"λ_max (—): first {examples} examples, Lanczos tol {tol:g}\nbatch sharpness (- -): {batches} "
                  f"batches of {cfg['batch_size']} from all {metrics['data']['n_train']:,}"
                  if examples else "λ_max and batch sharpness",
                  f"trace tr(H): first {examples} examples\n(" + ("exact diagonal)" if methods == {"exact"} else
                                                                 "2 Hutchinson probes)"),
                  f"noise scale B_simple:\nfirst {examples} examples")
        for ax, title in zip(axes, titles):
            ax.set_xlabel("training step")
            ax.set_title(title, fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if axes[0].get_legend_handles_labels()[0]:  # six entries: below the panel, clear of the threshold lines
            axes[0].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.16))
        fig.suptitle("During training: the training loss's curvature at each check" if examples else
                     "No tracking in this run (--track-every -1)", fontsize=10, y=1.03)
        return _save(fig, path)


def plot_stationary_covariance(metrics: dict, path: Path) -> Path:
    """Mandt et al.: the measured variance of SGD's iterates along each direction against the discrete Lyapunov
    prediction, log-log, with the line y = x; filled: top Hessian eigenvectors, open: random controls."""
    seeds = [s for s in seeds_of(metrics) if "stationary" in metrics["models"][s]]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.2, 5.2))
        values = []
        for i, seed in enumerate(seeds):
            st = metrics["models"][seed]["stationary"]
            for label, pred, meas, err in zip(st["labels"], st["predicted"], st["measured"], st["measured_stderr"]):
                if pred is None or meas is None or not (pred > 0 and meas > 0):
                    continue
                eigen = label.startswith("eigen")
                ax.errorbar(pred, meas, yerr=min(err, 0.99 * meas), fmt="o", ms=6, color=PALETTE[i],
                            mfc=PALETTE[i] if eigen else "white", capsize=2)
                values += [pred, meas]
        if values:
            low, high = min(values) / 2, max(values) * 2
            ax.plot([low, high], [low, high], color="0.3", lw=1, ls="--", label="measured = predicted")
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted variance (discrete Lyapunov equation)")
        ax.set_ylabel("measured variance of the SGD iterates")
        handles = [matplotlib.lines.Line2D([], [], color=PALETTE[i], marker="o", ls="", label=f"seed {s}")
                   for i, s in enumerate(seeds)]
        handles += [matplotlib.lines.Line2D([], [], color="0.3", marker="o", ls="", label="top eigenvector"),
                    matplotlib.lines.Line2D([], [], color="0.3", marker="o", mfc="white", ls="", label="random control")]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=8, loc="upper left")
        ax.set_title("SGD's stationary variance along each direction (Mandt et al. 2017)", fontsize=10)
        return _save(fig, path)


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


# ----------------------------------------------------------------------------- the sweep
def _findings_by_name(metrics: dict) -> dict[str, dict]:
    return {f["measure"]: f for f in metrics["sweep"]["findings"]}


def plot_sweep_measures(metrics: dict, path: Path) -> Path:
    """Each measure and baseline against the error gap, one panel each: colour the learning rate, marker the
    batch size (so equal-temperature configurations, on the grid's diagonals, can be told apart); Ψ and the
    verdict in each panel's title."""
    rows, found = metrics["sweep"]["rows"], _findings_by_name(metrics)
    names = [m for m in found if any(np.isfinite(np.asarray(r.get(m, math.nan), dtype=float)) for r in rows)]
    lrs, batches = sorted({r["lr"] for r in rows}), sorted({r["batch_size"] for r in rows})
    markers = dict(zip(batches, "osD^v<>"))
    colours = {lr: PALETTE[i % len(PALETTE)] for i, lr in enumerate(lrs)}
    columns = 4
    lines = max(1, math.ceil(len(names) / columns))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.9 * lines), squeeze=False,
                                 layout="constrained")
        for ax, name in zip(axes.flat, names):
            for r in rows:
                ax.scatter(r[name], 100 * r["gap_error"], color=colours[r["lr"]], marker=markers[r["batch_size"]],
                           s=26, edgecolors="0.2", linewidths=0.4)
            ax.set_xlabel(SWEEP_LABELS.get(name, name) + (" (baseline)" if found[name]["kind"] == "baseline" else ""),
                          fontsize=9)
            ax.set_ylabel("error gap (points)", fontsize=9)
            f = found[name]
            if f["psi"] is not None and math.isfinite(f["psi"]):
                ax.set_title(f"Ψ = {f['psi']:+.2f}, {f['verdict']}", fontsize=9)
            values = np.asarray([r.get(name, math.nan) for r in rows], dtype=float)
            values = values[np.isfinite(values)]
            if len(values) and np.all(values > 0) and values.max() > 20 * values.min():
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        handles = [matplotlib.lines.Line2D([], [], color=colours[lr], marker="o", ls="", label=f"η = {lr:g}")
                   for lr in lrs] + [matplotlib.lines.Line2D([], [], color="0.4", marker=markers[b], ls="",
                                                             label=f"B = {b}") for b in batches]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
        fig.suptitle(f"{len(rows)} models trained to training loss {metrics['config']['sweep_target_loss']:g}: "
                     "each measure against the error gap", fontsize=11)
        return _save(fig, path)


def plot_sweep_correlation(metrics: dict, path: Path) -> Path:
    """Ψ of each measure and baseline with the error gap, with its cluster-bootstrap interval, sorted; filled
    where the verdict is significant after Holm's correction."""
    found = [f for f in sorted_findings(metrics["sweep"]["findings"]) if f["psi"] is not None][::-1]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 0.36 * len(found) + 1.6))
        for y, f in enumerate(found):
            colour = PALETTE[0] if f["kind"] == "measure" else PALETTE[1]
            low, high = (np.nan if v is None else v for v in f["psi_interval"])
            ax.errorbar(f["psi"], y, xerr=np.nan_to_num([[f["psi"] - low], [high - f["psi"]]]), fmt="o", ms=5,
                        capsize=2, color=colour, mfc=colour if f["verdict"] != "no evidence" else "white")
        ax.axvline(0, color="0.3", lw=1)
        ax.set_yticks(range(len(found)), [SWEEP_LABELS.get(f["measure"], f["measure"]) for f in found])
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("granulated Kendall Ψ with the error gap (95% interval over configurations); filled: Holm p < "
                      f"{metrics['sweep']['alpha']:g}")
        ax.legend(handles=[matplotlib.lines.Line2D([], [], color=PALETTE[0], marker="o", ls="", label="measure"),
                           matplotlib.lines.Line2D([], [], color=PALETTE[1], marker="o", ls="", label="baseline")],
                  fontsize=8, loc="lower right")
        ax.set_title(f"Which measure ranks the {len(metrics['sweep']['rows'])} models' error gap", fontsize=10)
        return _save(fig, path)


def plot_gap_temperature(metrics: dict, path: Path) -> Path:
    """The error gap against the noise temperature εN/(B(1−m)), each configuration's seeds joined; configurations
    at equal temperature (Smith & Le 2018) share an x position and are ringed."""
    rows = metrics["sweep"]["rows"]
    widths = sorted({r["width"] for r in rows})
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for i, w in enumerate(widths):
            mine = [r for r in rows if r["width"] == w]
            temperatures = [round(r["temperature"], 9) for r in mine]
            shared = {t for t in temperatures if len({(r["lr"], r["batch_size"]) for r, u in zip(mine, temperatures)
                                                     if u == t}) > 1}
            ax.scatter([r["temperature"] for r in mine], [100 * r["gap_error"] for r in mine], color=PALETTE[i],
                       s=22, label=f"width {w}")
            ring = [r for r, t in zip(mine, temperatures) if t in shared]
            ax.scatter([r["temperature"] for r in ring], [100 * r["gap_error"] for r in ring], facecolors="none",
                       edgecolors=PALETTE[i], s=90, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("noise temperature εN/(B(1−m)) (ringed: configurations sharing a temperature)")
        ax.set_ylabel("error gap (points)")
        test = metrics["sweep"].get("temperature_test") or {}
        p = test.get("p_value")
        ax.set_title("Error gap against temperature" + (f": equal-temperature test p = {p:.3g}" if p is not None and
                                                        math.isfinite(p) else ""), fontsize=10)
        ax.legend(fontsize=8)
        return _save(fig, path)


def plot_batch_sharpness(metrics: dict, path: Path) -> Path:
    """Batch sharpness and full-batch λ_max at the end of training, in units of the stability threshold 2/η
    (so 1 is 2/η for every learning rate; 1 + β is heavy-ball's 2(1+β)/η), against the batch size."""
    rows = metrics["sweep"]["rows"]
    beta = metrics["config"].get("sweep_momentum", metrics["config"]["momentum"])
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


def plot_edge_of_stability(metrics: dict, path: Path) -> Path:
    """--dynamics: curvature against step on a log axis, one row per loss. Left, full-batch gradient descent:
    λ_max per step size, its 2/η dashed in the run's colour (Cohen et al. 2021). Middle, SGD: batch sharpness
    (solid) and full-batch λ_max (dotted) per batch size, against the one 2/η (Andreyev & Beneventano 2024).
    Right: each run's full-batch training loss at the checks."""
    dyn = metrics["dynamics"]
    losses = list(dict.fromkeys(r["loss"] for r in dyn["runs"]))
    names = {"mse": "MSE", "cross_entropy": "cross-entropy"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(losses), 3, figsize=(15, 4.6 * len(losses)), squeeze=False)
        fig.subplots_adjust(hspace=0.45)
        for row, loss in zip(axes, losses):
            runs = [r for r in dyn["runs"] if r["loss"] == loss]
            for family, ax in (("gd", row[0]), ("sgd", row[1])):
                for i, r in enumerate(x for x in runs if x["family"] == family):
                    _draw_run(ax, row[2], r, PALETTE[(i + (0 if family == "gd" else 3)) % len(PALETTE)])
            titles = (f"{names[loss]}, gradient descent (full batch)\nλ_max on all {dyn['examples']} examples",
                      f"{names[loss]}, SGD\nbatch sharpness (—) and full-batch λ_max (···)",
                      f"{names[loss]}: training loss\non all {dyn['examples']} examples, at the checks")
            for ax, title in zip(row, titles):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("step")
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0), numticks=12))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, loc="best")
            row[0].set_ylabel("curvature")
            row[1].set_ylabel("curvature")
            row[2].set_ylabel(f"{names[loss]} loss")
        fig.suptitle(f"The edge of stability: MLP {'-'.join(map(str, dyn['hidden']))}, seed {dyn['seed']}; dashed: 2/η "
                     "of the run in the same colour", fontsize=10)
        return _save(fig, path)


def _draw_run(curvature, loss_axis, r: dict, colour: str) -> None:
    """One run's curves: λ_max (and, for SGD, batch sharpness), its 2/η dashed, and its loss."""
    steps = [rec["step"] for rec in r["records"]]
    lam = [np.nan if rec["lambda_max"] is None else rec["lambda_max"] for rec in r["records"]]
    two_over_eta = f"2/η = {r['threshold']:.3g}"
    if r["family"] == "gd":
        curvature.plot(steps, lam, color=colour, lw=1.3, label=f"η = {r['lr']:g}: λ_max ({two_over_eta})")
        curvature.axhline(r["threshold"], color=colour, ls="--", lw=1)
        run_name = f"GD η = {r['lr']:g}"
    else:
        batch = [np.nan if rec["batch_sharpness"] is None else rec["batch_sharpness"] for rec in r["records"]]
        curvature.plot(steps, batch, color=colour, lw=1.3, label=f"batch {r['batch_size']}: batch sharpness")
        curvature.plot(steps, lam, color=colour, lw=1.2, ls=":", label=f"batch {r['batch_size']}: λ_max")
        shared = f"η = {r['lr']:g}: {two_over_eta}"  # the SGD runs of a panel share their step size: label it once
        curvature.axhline(r["threshold"], color="0.3", ls="--", lw=1,
                          label=None if shared in curvature.get_legend_handles_labels()[1] else shared)
        run_name = f"SGD b = {r['batch_size']}"
    loss_axis.plot(steps, [np.nan if rec["loss"] is None else rec["loss"] for rec in r["records"]], color=colour,
                   lw=1.2, ls="-" if r["family"] == "gd" else "-.", label=run_name)


# ----------------------------------------------------------------------------- the reports' pages
def _wrapped(text: str, fontsize: float) -> str:
    """Break a line to fit an A4 landscape page (cheaper than matplotlib's wrap=True)."""
    return "\n".join(textwrap.wrap(text, width=int(1350 / fontsize))) if text else text


def _text_page(pdf, page: TextPage) -> None:
    """A heading, its paragraphs, and the details in smaller type under their subheading."""
    # (text, style, height of one line, space after the block) in figure fractions of an A4 landscape page
    lines = [(page.heading, {"fontsize": 18, "weight": "bold"}, 0.04, 0.02),
             *[(text, {"fontsize": 10}, 0.024, 0.014) for text in page.paragraphs]]
    if page.details:
        lines += [(page.details_heading, {"fontsize": 10, "weight": "bold"}, 0.024, 0.006),
                  *[(text, {"fontsize": 8}, 0.02, 0.004) for text in page.details]]
    fig = plt.figure(figsize=(11.69, 8.27))
    y = 0.95
    for text, style, line, gap in lines:
        wrapped = _wrapped(text, style["fontsize"])
        fig.text(0.06, y, wrapped, va="top", **style)
        y -= line * (1 + wrapped.count("\n")) + gap
    pdf.savefig(fig)
    plt.close(fig)


def _section_page(pdf, section: Section, folder: Path) -> None:
    """A section's title, formula, reference, numbers and interpretation, and its figure below them."""
    fig = plt.figure(figsize=(11.69, 8.27))
    fig.text(0.05, 0.96, section.title, fontsize=16, weight="bold", va="top")
    y = 0.91
    if section.formula:
        fig.text(0.05, y, section.formula, fontsize=12, va="top")
        y -= 0.06
    for text, size, style, step in ((f"Reference: {section.reference}" if section.reference else "", 8,
                                     {"style": "italic"}, 0.035),
                                    *[(line, 8.5, {}, 0.03) for line in section.numbers],
                                    (section.interpretation, 9.5, {"weight": "bold"}, 0.05)):
        if text:
            wrapped = _wrapped(text, size)
            fig.text(0.05, y, wrapped, fontsize=size, va="top", **style)
            y -= step * (1 + 0.8 * wrapped.count("\n"))
    image = folder / section.figure if section.figure else None
    if image is not None and image.exists():
        ax = fig.add_axes((0.05, 0.02, 0.9, max(0.1, y - 0.04)))
        with PIL.Image.open(image) as png:  # RGB (alpha only costs encoding time), box-averaged to <= 1,600 px
            pixels = png.convert("RGB").reduce(max(1, math.ceil(png.width / 1600)))  # across: ~140 dpi on the page
        ax.imshow(np.asarray(pixels), interpolation="none")  # embedded as they are: matplotlib resamples nothing
        ax.axis("off")
    pdf.savefig(fig)
    plt.close(fig)


def plot_report(report: Document, folder: Path) -> Path:
    """`report`'s pages as one PDF in `folder`, written atomically; section figures are read from `folder`."""
    from matplotlib.backends.backend_pdf import PdfPages

    folder = Path(folder)

    def write(f) -> None:
        with plt.rc_context({**STYLE, "axes.grid": False}), PdfPages(f) as pdf:
            for page in report.pages:
                if isinstance(page, TextPage):
                    _text_page(pdf, page)
                else:
                    _section_page(pdf, page, folder)
            pdf.infodict()["Title"] = report.title

    return write_atomic(folder / report.name, write)


FIGURES = {
    "flatness_stem.png": plot_flatness_stem,
    "mode_connectivity.png": plot_mode_connectivity,
    "loss_surface_3d.png": plot_loss_surface_3d,
    "connectivity_plane.png": plot_connectivity_plane,
    "reparametrisation.png": plot_reparametrisation,
    "hessian_spectrum.png": plot_hessian_spectrum,
    "sharpness_during_training.png": plot_sharpness_during_training,
    "stationary_covariance.png": plot_stationary_covariance,
    "summary_table.png": plot_summary_table,
}
SWEEP_FIGURES = {"sweep_measures.png": plot_sweep_measures, "sweep_correlation.png": plot_sweep_correlation,
                 "gap_temperature.png": plot_gap_temperature, "batch_sharpness.png": plot_batch_sharpness}


DYNAMICS_FIGURES = {"edge_of_stability.png": plot_edge_of_stability}


def figures_of(metrics: dict) -> dict:
    """The figures a run's metrics have: the default run's, the sweep's (none for a sweep with no model), or the
    edge-of-stability study's."""
    if metrics.get("kind", "run") == "dynamics":
        return DYNAMICS_FIGURES if metrics["dynamics"]["runs"] else {}
    if metrics.get("kind", "run") != "sweep":
        return FIGURES
    return SWEEP_FIGURES if metrics["sweep"]["rows"] else {}


def plot_all(metrics: dict, out: Path) -> list[Path]:
    """Every figure (PNG at 150 dpi and a vector PDF copy), then the report, which embeds them, into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = figures_of(metrics)
    written = []
    for name, plot in figures.items():
        written += [plot(metrics, out / name), (out / name).with_suffix(".pdf")]
    return [*written, plot_report(document(metrics), out)] if figures else written
