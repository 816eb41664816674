"""The reports' words: every sentence, threshold, section and text table of the default run's report and the
sweep's, as pure functions of the metrics dictionary (what metrics.json holds). Each interpretation is chosen by
numbers against a threshold named here, and each branch has a test. plotting.py draws the figures and lays out
the PDF pages from what this module returns; it decides nothing.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Section:
    """One page of a report: a title, a formula (matplotlib mathtext), a reference, the numbers behind it (one
    line each), an interpretation chosen by those numbers, and the figure file it shows (None: none)."""

    title: str
    formula: str = ""
    reference: str = ""
    numbers: list[str] = field(default_factory=list)
    interpretation: str = ""
    figure: str | None = None


@dataclass(frozen=True)
class TextPage:
    """A page of text: a heading, paragraphs, and smaller detail lines under a subheading."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    details_heading: str = ""
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Document:
    """A report: its file name, its title (the PDF's metadata) and its pages in order."""

    name: str
    title: str
    pages: list[TextPage | Section]


def seeds_of(metrics: dict) -> list[str]:
    """The default run's models, by their seed as metrics.json keys them."""
    return list(metrics["models"])


def barrier_of(path: dict) -> float:
    """A path's loss barrier above the line between its endpoints, with α refined near the peak (as the figure's
    legend shows it); the barrier over the given α alone in metrics written before refinement existed."""
    return path.get("barriers", {}).get("loss_linear", path["barrier"])


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "inf"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def trace_text(trace: dict, *, ascii: bool = False) -> str:
    """"39.4 (exact)" for the exact diagonal sum, "39.4 ± 0.73" for a stochastic estimate."""
    if trace.get("method") == "exact":
        return f"{fmt(trace['trace'])} (exact)"
    return f"{fmt(trace['trace'])} {'+-' if ascii else '±'} {fmt(trace['stderr'], 2)}"


def summary_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table as (header, rows of strings): one column per seed."""
    seeds = seeds_of(metrics)
    m = [metrics["models"][s] for s in seeds]
    last_sigma = m[0]["flatness"]["sigmas"][-1]
    rows = [
        ["train loss", *[fmt(x["train"]["loss"]) for x in m]],
        ["test loss", *[fmt(x["test"]["loss"]) for x in m]],
        ["train accuracy (%)", *[f"{100 * x['train']['accuracy']:.2f}" for x in m]],
        ["test accuracy (%)", *[f"{100 * x['test']['accuracy']:.2f}" for x in m]],
        ["generalisation gap (loss)", *[fmt(x["generalization_gap"]) for x in m]],
        ["sharpness λ_max", *[fmt(x["sharpness"]["eigenvalue"]) for x in m]],
        ["  converged (HVPs)", *[f"{fmt(x['sharpness']['converged'])} ({x['sharpness']['iterations']})" for x in m]],
        *[[f"  λ_{i + 1}", *[fmt(x["eigenpairs"]["top"][i]) for x in m]] for i in range(1, len(m[0]["eigenpairs"]["top"]))],
        ["λ_min (< 0: saddle)", *[fmt(x["eigenpairs"]["lambda_min"]) for x in m]],
        ["trace tr(H)", *[trace_text(x["trace"]) for x in m]],
        [f"flatness ΔL at σ={fmt(last_sigma, 3)}", *[fmt(x["flatness"]["mean_increase"][-1]) for x in m]],
        [f"  adaptive ΔL at σ={fmt(last_sigma, 3)}", *[fmt(x["adaptive_flatness"]["mean_increase"][-1]) for x in m]],
        [f"  worst-case ρ={fmt(m[0]['worst_case']['absolute']['rho'], 3)}",
         *[fmt(x["worst_case"]["absolute"]["sharpness"]) for x in m]],
        [f"  adaptive worst-case ρ={fmt(m[0]['worst_case']['adaptive']['rho'], 3)}",
         *[fmt(x["worst_case"]["adaptive"]["sharpness"]) for x in m]],
        ["  PAC-Bayes σ (1/σ²)", *[f"{fmt(x['pac_bayes']['plain']['sigma'], 3)} ({fmt(x['pac_bayes']['plain']['flatness'], 3)})"
                                   for x in m]],
        ["  magnitude-aware σ (1/σ²)", *[f"{fmt(x['pac_bayes']['magnitude_aware']['sigma'], 3)} "
                                         f"({fmt(x['pac_bayes']['magnitude_aware']['flatness'], 3)})" for x in m]],
        ["noise scale B_simple", *[fmt(x["gradient_noise"]["b_simple"]) for x in m]],
        ["  tr(Σ)", *[fmt(x["gradient_noise"]["trace_cov"]) for x in m]],
        ["  |G|²", *[fmt(x["gradient_noise"]["grad_norm_sq"]) for x in m]],
        ["noise scale B_noise", *[fmt(x["gradient_noise"]["b_noise"]) for x in m]],
        ["noise temperature εN/(B(1−m))", *[fmt(x["gradient_noise"]["temperature"]) for x in m]],
    ]
    if all("stationary" in x for x in m):
        rows.append(["stationary variance, measured/predicted", *[fmt(median_eigen_ratio(x["stationary"]), 3) for x in m]])
    if all("local_entropy" in x for x in m):
        rows += [[f"local entropy ΔF(γ={g:g})", *[f"{fmt(x['local_entropy']['langevin'][i], 3)} ± "
                                                 f"{fmt(x['local_entropy']['langevin_stderr'][i], 2)}" for x in m]]
                 for i, g in enumerate(m[0]["local_entropy"]["scopes"])]
    c = metrics["connectivity"]
    pair = f"{c['seeds'][0]}↔{c['seeds'][1]}"
    rows += [[f"loss barrier {pair} ({split})", fmt(barrier_of(c[split])), *[""] * (len(seeds) - 1)]
             for split in ("train", "test")]
    if "aligned" in c:
        rows += [[f"  after weight matching ({split})", fmt(barrier_of(c["aligned"][split])),
                  *[""] * (len(seeds) - 1)] for split in ("train", "test")]
    if "bezier" in c:
        rows += [[f"  Bézier curve, max loss ({split})", fmt(max(c["bezier"][split]["losses"])),
                  *[""] * (len(seeds) - 1)] for split in ("train", "test")]
    return ["measure", *[f"seed {s}" for s in seeds]], rows


def layer_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Per-layer curvature: top eigenvalue and trace of each parameter tensor's diagonal Hessian block."""
    seeds = seeds_of(metrics)
    layers = [metrics["models"][s]["layers"] for s in seeds]
    header = ["parameter tensor", *[f"seed {s}: λ_max / tr" for s in seeds]]
    rows = [[layer["name"], *[f"{fmt(ls[i]['top_eigenvalue'], 3)} / {fmt(ls[i]['trace'], 3)}" for ls in layers]]
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



# ----------------------------------------------------------------------------- the default run's report
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
    "stationary": "Mandt, Hoffman & Blei 2017, Stochastic gradient descent as approximate Bayesian inference",
    "local_entropy": "Chaudhari et al. 2017, Entropy-SGD: biasing gradient descent into wide valleys",
}


# The thresholds that choose the report's interpretation sentences; each branch has a unit test.
EDGE_BAND = 0.10  # batch sharpness within 10% of the stability threshold: at the edge of stability
CONNECTED = 0.05  # a barrier below 5% of the mean endpoint loss: the path connects the two models
INVARIANT = 0.01  # a measure that moves by under 1% across function-preserving rescalings: invariant
MOVES = 0.10  # ... and by over 10%: it describes the parametrisation, not the function
MATCH_FACTOR = 2.0  # a measured stationary variance within a factor 2 of its prediction matches it
DRIFT = 0.10  # the loss moving by over 10% during the stationary phase: not stationary
AGREES_IN_STDERR = 3.0  # a Laplace value within 3 standard errors of the Langevin estimate agrees with it


def compare_sentence(values: dict[str, float], noun: str, higher: str) -> str:
    """'seed 42 is sharper than seed 0 by 8.8% (3.026 vs 2.781)' for two or more seeds."""
    (a, va), (b, vb) = sorted(values.items(), key=lambda kv: kv[1], reverse=True)[:2]
    if not (np.isfinite(va) and np.isfinite(vb)) or vb == 0:
        return f"{noun}: {', '.join(f'seed {k} {fmt(v)}' for k, v in values.items())}."
    return (f"seed {a} is {higher} than seed {b} by {100 * (va - vb) / abs(vb):.1f}% "
            f"({noun} {fmt(va)} vs {fmt(vb)}).")


def negative_curvature_sentence(lambda_min: dict[str, tuple[float, float]]) -> str:
    """Which models have λ_min < 0 by more than its residual (negative curvature the solver resolves)."""
    negative = [s for s, (value, residual) in lambda_min.items() if value < -abs(residual)]
    if negative:
        return (f" lambda_min < 0 beyond its residual for seed(s) {', '.join(negative)}: SGD stopped near, not at, "
                "a minimum (directions of negative curvature remain).")
    return (" No model has lambda_min below zero by more than its residual: no negative curvature is resolved, as "
            "at a local minimum.")


def stability_sentence(seed: str, batch_sharpness: float, lambda_max: float, lr: float, momentum: float, *,
                       examples: int) -> str:
    """Where the tracked batch sharpness ends relative to heavy-ball SGD's stability threshold 2(1+β)/η
    (2/η without momentum), with EDGE_BAND either side counting as the edge; and whether λ_max (on the tracker's
    `examples`, said so: Andreyev & Beneventano 2024 compare with the full batch's) is below it, as they find under
    mini-batch SGD."""
    threshold = 2 * (1 + momentum) / lr
    name = "2(1+beta)/eta" if momentum else "2/eta"
    on = f"lambda_max on the first {examples:,} training examples"
    if not np.isfinite(batch_sharpness):
        return (f"seed {seed}: the {on} ends at {lambda_max / threshold:.1%} of {name} = "
                f"{fmt(threshold)} (batch sharpness was not tracked).")
    ratio = batch_sharpness / threshold
    where = ("below the edge of stability" if ratio < 1 - EDGE_BAND else
             f"at the edge of stability (within {EDGE_BAND:.0%})" if ratio <= 1 + EDGE_BAND else
             "beyond the edge of stability: a step overshoots along its own batch's gradient")
    order = ("below it, as Andreyev & Beneventano 2024 find under mini-batch SGD" if lambda_max < batch_sharpness
             else "not below it, unlike Andreyev & Beneventano 2024's finding under mini-batch SGD")
    return (f"seed {seed}: batch sharpness ends at {fmt(batch_sharpness)}, {ratio:.1%} of {name} = "
            f"{fmt(threshold)}: {where}; the {on}, {fmt(lambda_max)}, is {order}.")


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
        return text + (f" After aligning hidden units it is {fmt(aligned)} ({aligned_ratio:.1%} of the endpoint "
                       "loss): linearly connected up to permutation symmetry.")
    if aligned < barrier:
        return text + (f" After aligning hidden units it drops to {fmt(aligned)} ({share:.0%} of it was permutation "
                       f"symmetry), still {aligned_ratio:.0%} of the endpoint loss: not linearly connected even "
                       "after alignment.")
    return text + f" Aligning hidden units does not lower it ({fmt(aligned)})."


def joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def curve_sentence(curve_barrier: float, line_barrier: float, endpoint_loss: float) -> str:
    """Whether the trained Bézier curve connects the models (its barrier below CONNECTED of the endpoint loss)."""
    ratio = curve_barrier / max(endpoint_loss, 1e-12)
    line_connected = line_barrier / max(endpoint_loss, 1e-12) < CONNECTED
    if ratio < CONNECTED:
        return (f"The trained curve's barrier is {ratio:.1%} of the mean endpoint loss: it joins the two solutions "
                "through low loss" + (" although the straight line between them does not." if not line_connected
                                      else ", as the straight line does."))
    if curve_barrier < line_barrier:
        return (f"The trained curve's barrier {fmt(curve_barrier)} is {1 - curve_barrier / line_barrier:.0%} lower "
                f"than the straight line's {fmt(line_barrier)} but still {ratio:.2g}x the mean endpoint loss: not a "
                f"low-loss path (that needs under {CONNECTED:.0%}); more --bezier-epochs may find one.")
    return (f"The trained curve's barrier {fmt(curve_barrier)} is no lower than the straight line's "
            f"{fmt(line_barrier)}: the curve's training found no better path.")


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
        return (f"The slice's lowest loss {fmt(float(losses[lowest]))} lies off the trained model, at (alpha, beta) = "
                f"({alphas[lowest[0]]:.3g}, {betas[lowest[1]]:.3g}), below the centre's {fmt(float(centre))}: "
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
        parts.append(f"moves {joined(moved)}")
    if between:
        parts.append(f"moves {joined(between)} a little")
    text = "Rescaling the first two layers (the same function) " + ("; ".join(parts) if parts else "moves no measure")
    if still:
        text += (f", while {joined(still)} stay within {INVARIANT:.0%}: only these describe the function rather than "
                 "its parametrisation.")
    else:
        text += ": every measure depends on the parametrisation here."
    return text


def report_sections(metrics: dict) -> list["Section"]:
    """The report's sections: title, formula (mathtext), reference, numbers per seed, interpretation, figure."""
    return [section for build in SECTIONS if (section := build(metrics)) is not None]


def training_section(metrics: dict) -> Section | None:
    """Losses, accuracies and the generalisation gap."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    gaps = {s: m[s]["generalization_gap"] for s in seeds}
    return Section(**{
        "title": "Training and generalisation", "reference": REFERENCES["training"],
        "formula": r"$\mathrm{gap} = L_{\mathrm{test}}(\theta) - L_{\mathrm{train}}(\theta)$",
        "numbers": [f"seed {s}: train loss {fmt(m[s]['train']['loss'])}, test loss {fmt(m[s]['test']['loss'])}, "
                    f"test accuracy {100 * m[s]['test']['accuracy']:.2f}%, generalisation gap {fmt(gaps[s])}"
                    for s in seeds],
        "interpretation": compare_sentence(gaps, "generalisation gap", "worse at generalising"),
        "figure": None,
    })


def sharpness_section(metrics: dict) -> Section | None:
    """λ_max, the top eigenvalues, λ_min and tr(H)."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    sharp = {s: m[s]["sharpness"]["eigenvalue"] for s in seeds}
    return Section(**{
        "title": "Sharpness and the Hessian spectrum", "reference": REFERENCES["sharpness"],
        "formula": r"$\lambda_{\max} = \max_{v} \frac{v^\top H v}{v^\top v},\quad "
                   r"H = \nabla^2_\theta \frac{1}{N}\sum_i \ell_i(\theta),\quad \mathrm{tr}(H) = \sum_i H_{ii} = E_z[z^\top H z]$",
        "numbers": [f"seed {s}: sharpness lambda_max {fmt(sharp[s])} (residual {fmt(m[s]['sharpness']['residual'], 2)}), "
                    f"top eigenvalues {', '.join(fmt(v) for v in m[s]['eigenpairs']['top'])}, lambda_min "
                    f"{fmt(m[s]['eigenpairs']['lambda_min'])}, trace {trace_text(m[s]['trace'], ascii=True)}"
                    for s in seeds],
        "interpretation": compare_sentence(sharp, "lambda_max", "sharper") + negative_curvature_sentence(
            {s: (m[s]["eigenpairs"]["lambda_min"], m[s]["eigenpairs"].get("lambda_min_residual", 0.0)) for s in seeds}),
        "figure": "hessian_spectrum.png",
    })


def tracking_numbers(seed: str, tracking: dict, batch_size: int, n_train: int) -> str:
    """One seed's tracked curvature at the last check, each number with what it is measured on, and how many
    of the λ_max checks met their tolerance."""
    records = tracking.get("records") or []
    if not records:
        return f"seed {seed}: not tracked"
    last = records[-1]
    converged = sum(bool(r["converged"]) for r in records)
    return (f"seed {seed}: {len(records)} checks, every {tracking['every']} steps; at the last, lambda_max "
            f"{fmt(last['lambda_max'])} on the first {tracking['examples']:,} training examples (Lanczos residual "
            f"{fmt(last['residual'], 2)}; {converged} of {len(records)} checks within tol {last['tol']:g} x lambda), "
            f"batch sharpness {fmt(last['batch_sharpness'])} +- {fmt(last['batch_sharpness_stderr'], 2)} over "
            f"{tracking['batches']} mini-batches of {batch_size} from all {n_train:,} training examples")


def tracking_section(metrics: dict) -> Section | None:
    """λ_max during training against the stability threshold."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    cfg = metrics["config"]
    final = {s: (m[s]["training"].get("tracking", {}).get("records") or [{}])[-1] for s in seeds}
    return Section(**{
        "title": "Curvature during training", "reference": REFERENCES["tracking"],
        "formula": r"$\lambda_{\max}(\theta_t),\ E_B\left[\frac{g_B^\top H_B g_B}{\|g_B\|^2}\right]\ "
                   r"\mathrm{vs}\ 2/\eta\ \mathrm{and}\ 2(1+\beta)/\eta$",
        "numbers": [tracking_numbers(s, m[s]["training"].get("tracking", {}), cfg["batch_size"],
                                     metrics["data"]["n_train"]) for s in seeds],
        "interpretation": " ".join(stability_sentence(s, final[s].get("batch_sharpness", math.nan),
                                                      final[s]["lambda_max"], cfg["lr"], cfg["momentum"],
                                                      examples=m[s]["training"]["tracking"]["examples"])
                                   for s in seeds) if all(final.values()) else
                          "Tracking was switched off in this run.",
        "figure": "sharpness_during_training.png",
    })


def flatness_section(metrics: dict) -> Section | None:
    """Filter-normalised flatness."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    flat = {s: m[s]["flatness"]["mean_increase"][-1] for s in seeds}
    sigma = m[seeds[0]]["flatness"]["sigmas"][-1]
    return Section(**{
        "title": "Perturbation flatness", "reference": REFERENCES["flatness"],
        "formula": r"$\Delta L(\sigma) = E_d\,[L(\theta + \sigma d) - L(\theta)],\ "
                   r"d\ \mathrm{filter\text{-}normalised}:\ \|d_{r}\| = \|\theta_{r}\|$",
        "numbers": [f"seed {s}: flatness increase at sigma {fmt(sigma, 3)} is {fmt(flat[s])} +- "
                    f"{fmt(m[s]['flatness']['std_increase'][-1], 2)} (std over {m[s]['flatness']['samples']} "
                    "directions)" for s in seeds],
        "interpretation": compare_sentence(flat, f"loss increase at sigma {fmt(sigma, 3)}", "less flat"),
        "figure": "flatness_stem.png",
    })


def robust_flatness_section(metrics: dict) -> Section | None:
    """The measures meant to survive reparametrisation, and the rescaling experiment (MLPs only)."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    if "worst_case" not in m[seeds[0]]:
        return None
    rows = metrics.get("reparametrisation", {}).get("rows", [])
    return Section(**{
        "title": "Flatness that survives reparametrisation", "reference": REFERENCES["robust"],
        "formula": r"$S_\rho = \max_{\|T^{-1}\epsilon\|\leq\rho} L(\theta+\epsilon) - L(\theta),\ "
                   r"T = I\ \mathrm{or}\ \mathrm{diag}|\theta|;\quad \mathrm{PAC\text{-}Bayes}: 1/\sigma^2$",
        "numbers": [f"seed {s}: adaptive increase {fmt(m[s]['adaptive_flatness']['mean_increase'][-1])}, worst-case "
                    f"{fmt(m[s]['worst_case']['absolute']['sharpness'])} (absolute), "
                    f"{fmt(m[s]['worst_case']['adaptive']['sharpness'])} (adaptive), PAC-Bayes sigma "
                    f"{fmt(m[s]['pac_bayes']['plain']['sigma'], 3)}, magnitude-aware "
                    f"{fmt(m[s]['pac_bayes']['magnitude_aware']['sigma'], 3)}" for s in seeds],
        "interpretation": rescaling_sentence(rows) if rows else
                          "The rescaling experiment needs a ReLU MLP and was skipped for this model.",
        "figure": "reparametrisation.png",
    })


def noise_section(metrics: dict) -> Section | None:
    """The gradient noise scales."""
    seeds = seeds_of(metrics)
    m = {s: metrics["models"][s] for s in seeds}
    cfg = metrics["config"]
    noise = {s: math.inf if m[s]["gradient_noise"]["b_simple"] is None else m[s]["gradient_noise"]["b_simple"]
             for s in seeds}
    return Section(**{
        "title": "Gradient noise", "reference": REFERENCES["noise"],
        "formula": r"$B_{\mathrm{simple}} = \frac{\mathrm{tr}\,\Sigma}{|G|^2},\ "
                   r"B_{\mathrm{noise}} = \frac{\mathrm{tr}(H\Sigma)}{G^\top H G},\ "
                   r"g = \frac{\epsilon N}{B(1-m)}$",
        "numbers": [f"seed {s}: noise scale B_simple {fmt(m[s]['gradient_noise']['b_simple'])}, B_noise "
                    f"{fmt(m[s]['gradient_noise']['b_noise'])}, temperature "
                    f"{fmt(m[s]['gradient_noise']['temperature'])}" for s in seeds],
        "interpretation": noise_sentence(noise, cfg["batch_size"]),
        "figure": None,
    })


def connectivity_section(metrics: dict) -> Section | None:
    """The barriers between the two models."""
    c = metrics["connectivity"]
    base = {s: (c["train"]["endpoint_losses"][i]) for i, s in enumerate(c["seeds"][:2])}
    aligned = barrier_of(c["aligned"]["train"]) if "aligned" in c else None
    return Section(**{
        "title": "Mode connectivity", "reference": REFERENCES["connectivity"],
        "formula": r"$B = \max_\alpha L((1-\alpha)\theta_A + \alpha\theta_B) - "
                   r"[(1-\alpha) L(\theta_A) + \alpha L(\theta_B)]$",
        "numbers": [f"loss barrier {split} {fmt(barrier_of(c[split]))}"
                    + (f", after weight matching {fmt(barrier_of(c['aligned'][split]))}"
                       if "aligned" in c else "")
                    + (f", Bezier curve max loss {fmt(max(c['bezier'][split]['losses']))}" if "bezier" in c else "")
                    for split in ("train", "test")],
        "interpretation": connectivity_sentence(barrier_of(c["train"]), float(np.mean(list(base.values()))), aligned),
        "figure": "mode_connectivity.png",
    })


def plane_section(metrics: dict) -> Section | None:
    """The trained Bézier curve (when there is one)."""
    c = metrics["connectivity"]
    if "bezier" not in c:
        return None
    return Section(**{"title": "The plane through both solutions and the curve", "reference": REFERENCES["connectivity"],
            "formula": r"$\theta(t) = (1-t)^2\theta_A + 2t(1-t)\theta_C + t^2\theta_B$",
            "numbers": [f"Bezier curve max loss train {fmt(max(c['bezier']['train']['losses']))}, "
                        f"test {fmt(max(c['bezier']['test']['losses']))}"],
            "interpretation": curve_sentence(c["bezier"]["train"]["barrier"],
                                             barrier_of(c["train"]), float(np.mean(c["train"]["endpoint_losses"]))),
            "figure": "connectivity_plane.png"})


def surface_section(metrics: dict) -> Section | None:
    """The 2-D loss slice."""
    s = metrics["surface"]
    losses = np.asarray(s["losses"])
    centre = losses[len(losses) // 2, len(losses) // 2]
    return Section(**{
        "title": "Loss surface", "reference": REFERENCES["surface"],
        "formula": r"$f(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2)$",
        "numbers": [f"seed {s['seed']}: {s['split']} loss at the centre {fmt(centre)}, minimum on the slice "
                    f"{fmt(losses.min())}, maximum {fmt(losses.max())}"],
        "interpretation": basin_sentence(losses, s["alphas"], s["betas"]),
        "figure": "loss_surface_3d.png",
    })


def median_eigen_ratio(stationary: dict) -> float:
    """The median measured/predicted variance over the top-eigenvector directions (the sweep's column too)."""
    ratios = [r for label, r in zip(stationary["labels"], stationary["ratio"]) if label.startswith("eigen")
              and r is not None and math.isfinite(r)]
    return float(np.median(ratios)) if ratios else math.nan


def stationary_sentence(seed: str, stationary: dict) -> str:
    """How many top-eigenvector directions' measured variance lies within MATCH_FACTOR of the discrete Lyapunov
    prediction, and whether the loss drifted by over DRIFT during the phase (then it was not stationary)."""
    pairs = [(label, r) for label, r in zip(stationary["labels"], stationary["ratio"]) if label.startswith("eigen")]
    if not stationary.get("stable", True) or not pairs:
        return f"seed {seed}: SGD at this step size has no stationary distribution along these directions."
    matched = sum(r is not None and 1 / MATCH_FACTOR <= r <= MATCH_FACTOR for _, r in pairs)
    start, end = stationary["loss_start"], stationary["loss_end"]
    drift = abs(end - start) / max(abs(start), 1e-12)
    text = (f"seed {seed}: along {matched} of the {len(pairs)} top eigenvectors the measured variance is within a "
            f"factor {MATCH_FACTOR:g} of the prediction (median ratio {median_eigen_ratio(stationary):.2g}); ")
    if drift > DRIFT:
        return text + (f"the loss moved from {fmt(start)} to {fmt(end)} during the phase ({drift:.0%}): cross-entropy "
                       "has no minimum, so SGD was not stationary and the prediction is only indicative.")
    return text + f"the loss moved by {drift:.1%} during the phase: close to stationary."


def local_entropy_sentence(seed: str, entropy: dict) -> str:
    """Whether the Laplace approximation (plus the gradient term, since θ is not a minimum) agrees with the
    Langevin estimate within AGREES_IN_STDERR standard errors, at each scope."""
    agree = []
    for gamma, value, stderr, laplace, gradient in zip(entropy["scopes"], entropy["langevin"], entropy["langevin_stderr"],
                                                       entropy["laplace"], entropy["gradient_term"]):
        quadratic = laplace + gradient
        if all(v is not None and math.isfinite(v) for v in (value, stderr, quadratic)):
            agree.append((gamma, abs(value - quadratic) <= AGREES_IN_STDERR * max(stderr, 1e-12)))
    if not agree:
        return f"seed {seed}: no scope has both estimates."
    yes = [f"{g:g}" for g, ok in agree if ok]
    no = [f"{g:g}" for g, ok in agree if not ok]
    if not no:
        return (f"seed {seed}: the quadratic (Laplace) model agrees with the Langevin estimate within "
                f"{AGREES_IN_STDERR:g} standard errors at every scope: the loss is close to quadratic at these scales.")
    return (f"seed {seed}: the quadratic (Laplace) model departs from the Langevin estimate by more than "
            f"{AGREES_IN_STDERR:g} standard errors at scope(s) {joined(no)}" + (f" (agrees at {joined(yes)})" if yes else "")
            + ": the loss is not quadratic over the region those scopes reach.")


def stationary_section(metrics: dict) -> Section | None:
    """Mandt et al.'s stationary covariance, predicted against measured."""
    seeds = [s for s in seeds_of(metrics) if "stationary" in metrics["models"][s]]
    if not seeds:
        return None
    m = {s: metrics["models"][s]["stationary"] for s in seeds}
    return Section(**{
        "title": "SGD's stationary distribution", "reference": REFERENCES["stationary"],
        "formula": r"$\Sigma = (I - \eta H)\Sigma(I - \eta H)^\top + \eta^2 (\frac{1}{B} - \frac{1}{N}) C,\quad "
                   r"H\Sigma + \Sigma H \approx \frac{\eta}{B} C$",
        "numbers": [f"seed {s}: SGD continued at lr {m[s]['lr']:g}, batch {m[s]['batch_size']}, momentum "
                    f"{m[s]['momentum']:g} for {m[s]['burn_in']} + {m[s]['steps']} steps; measured/predicted variance "
                    + ", ".join(f"{label} {fmt(r, 2)}" for label, r in zip(m[s]["labels"], m[s]["ratio"]))
                    + f"; loss {fmt(m[s]['loss_start'])} -> {fmt(m[s]['loss_end'])}, |theta| "
                    f"{fmt(m[s]['norm_start'])} -> {fmt(m[s]['norm_end'])}" for s in seeds],
        "interpretation": " ".join(stationary_sentence(s, m[s]) for s in seeds),
        "figure": "stationary_covariance.png",
    })


def local_entropy_section(metrics: dict) -> Section | None:
    """Chaudhari et al.'s local entropy: Langevin beside Laplace."""
    seeds = [s for s in seeds_of(metrics) if "local_entropy" in metrics["models"][s]]
    if not seeds:
        return None
    m = {s: metrics["models"][s]["local_entropy"] for s in seeds}
    middle = len(m[seeds[0]]["scopes"]) // 2
    gamma = m[seeds[0]]["scopes"][middle]
    return Section(**{
        "title": "Local entropy", "reference": REFERENCES["local_entropy"],
        "formula": r"$\Delta F(\theta;\gamma) = \log E_{\theta' \sim N(\theta, T/\gamma)} "
                   r"e^{-[L(\theta') - L(\theta)]/T} \approx -\frac{1}{2}\sum_i \log(1 + \lambda_i/\gamma),\ T = 1/N$",
        "numbers": [f"seed {s}: " + "; ".join(
            f"gamma {g:g}: Langevin {fmt(v, 3)} +- {fmt(e, 2)}, Laplace {fmt(lp, 3)} (+ gradient term {fmt(gt, 3)})"
            for g, v, e, lp, gt in zip(m[s]["scopes"], m[s]["langevin"], m[s]["langevin_stderr"], m[s]["laplace"],
                                      m[s]["gradient_term"])) for s in seeds],
        "interpretation": compare_sentence({s: -m[s]["langevin"][middle] for s in seeds},
                                           f"minus the local entropy at gamma {gamma:g}", "sharper") + " "
                          + " ".join(local_entropy_sentence(s, m[s]) for s in seeds),
        "figure": None,
    })


SECTIONS = (training_section, sharpness_section, tracking_section, flatness_section, robust_flatness_section,
            noise_section, stationary_section, local_entropy_section, connectivity_section, plane_section,
            surface_section)  # the report's order



# ----------------------------------------------------------------------------- the sweep's report
SWEEP_LABELS = {
    "lambda_max": "λ_max", "lambda_k": "λ_k (k-th largest)", "lambda_min": "λ_min", "trace": "tr(H)",
    "layer_lambda_max": "largest layer-block λ_max", "flatness": "filter-normalised ΔL(σ_max)",
    "adaptive_flatness": "adaptive ΔL(σ_max)", "worst_case_absolute": "worst-case sharpness (absolute)",
    "worst_case_adaptive": "worst-case sharpness (adaptive)", "pac_bayes_inv_sigma_sq": "PAC-Bayes 1/σ²",
    "pac_bayes_magnitude_aware_inv_sigma_sq": "PAC-Bayes 1/σ² (magnitude-aware)", "b_simple": "B_simple",
    "b_noise": "B_noise", "temperature": "temperature εN/(B(1−m))", "weight_norm_sq": "‖θ‖²",
    "batch_sharpness": "batch sharpness", "barrier": "barrier (straight line)",
    "aligned_barrier": "barrier after weight matching", "local_entropy": "local entropy ΔF (middle scope γ)",
    "stationary_ratio": "stationary variance, measured / predicted (median)",
}


SWEEP_LABELS.update({"lr": "learning rate η", "inv_batch_size": "1/B", "steps": "steps to the target",
                     "inv_margin_sq": "1/γ² (10th-percentile output margin)"})
VERDICT_WORDS = {"predicts": "predicts", "reverse": "reverse", "no evidence": "no evidence"}


def label(name: str) -> str:
    """A sweep column's name as the report writes it."""
    return SWEEP_LABELS.get(name, name)


def sorted_findings(findings: list[dict]) -> list[dict]:
    """The findings by Ψ, largest first (undefined Ψ last)."""
    return sorted(findings, key=lambda f: -np.nan_to_num(f["psi"] if f["psi"] is not None else math.nan, nan=-9.0))


def _finding_text(f: dict) -> str:
    replicated = "replicated in both halves of the seeds" if f["replicated"] else "not replicated"
    return f"{label(f['measure'])} (Ψ {f['psi']:+.2f}, Holm p {f['p_holm']:.3g}, {replicated})"


def verdict_sentences(findings: list[dict], alpha: float) -> list[str]:
    """Which measures predict the outcome: each verdict is Ψ's within-group permutation test with Holm's
    correction across every measure and baseline (p below `alpha`), and says whether both halves of the seeds
    reach it too."""
    measures = [f for f in sorted_findings(findings) if f["kind"] == "measure"]
    by = {v: [f for f in measures if f["verdict"] == v] for v in VERDICT_WORDS}
    out = []
    if by["predicts"]:
        out.append(f"Predict the error gap (Ψ's permutation test, Holm-adjusted p < {alpha:g}): "
                   f"{joined([_finding_text(f) for f in by['predicts']])}.")
    else:
        out.append(f"No measure predicts the error gap at Holm-adjusted p < {alpha:g}.")
    if by["reverse"]:
        out.append(f"Significant against the direction the measure claims (larger went with a smaller gap): "
                   f"{joined([_finding_text(f) for f in by['reverse']])}.")
    if by["no evidence"]:
        out.append(f"No evidence either way: {joined([label(f['measure']) for f in by['no evidence']])}.")
    return out


def baseline_sentence(findings: list[dict]) -> str:
    """Jiang et al. 2020's test: does a predicting measure carry information about the gap beyond the
    hyper-parameters? Its CMI (the minimum over conditioning sets of up to two hyper-parameters) against the best
    baseline's."""
    baselines = [f for f in findings if f["kind"] == "baseline" and f["cmi"] is not None and math.isfinite(f["cmi"])]
    if not baselines:
        return "Beyond the hyper-parameters: not tested here (no baseline has a defined CMI)."
    best = max(baselines, key=lambda f: f["cmi"])
    beats = [f for f in findings if f["kind"] == "measure" and f["verdict"] == "predicts" and f["cmi"] is not None
             and math.isfinite(f["cmi"]) and f["cmi"] > best["cmi"]]
    head = (f"Beyond the hyper-parameters (Jiang et al. 2020's conditional mutual information, against the best "
            f"baseline, {label(best['measure'])} with CMI {best['cmi']:.3f}): ")
    if beats:  # each with its verdict's replication: a finding the report states holds in both halves or says not
        return head + joined([label(f["measure"]) + f" (CMI {f['cmi']:.3f}, " + (
            "replicated" if f["replicated"] else "not replicated") + ")" for f in beats]) + " beat it."
    return head + "no predicting measure beats it, so none predicts beyond the hyper-parameters here."


def keskar_sentence(keskar: dict | None, alpha: float) -> str:
    """Keskar et al. 2017, tested as they state it: within groups that fix the learning rate, width and seed,
    does λ_max rise with the batch size (the batch-size axis of Ψ and its permutation p-value)?"""
    claim = "Keskar et al. 2017: at a fixed recipe, larger batches find sharper minima. "
    if not keskar or keskar["p_value"] is None or not math.isfinite(keskar["p_value"]):
        return claim + "Not tested here (no group of models that differ in the batch size only)."
    numbers = (f"the mean τ(batch size, λ_max) within the {keskar['groups']} groups of models that share a learning "
               f"rate, width and seed is {keskar['psi']:+.2f} (permutation p = {keskar['p_value']:.3g}: whole "
               "configurations, each with all its seeds, shuffled across the batch sizes within each learning rate "
               "and width)")
    if keskar["p_value"] < alpha:
        return claim + (f"Here {numbers}: our data agree." if keskar["psi"] > 0 else
                        f"Here {numbers}: larger batches found flatter minima, our data disagree.")
    return claim + f"Here {numbers}: no evidence either way."


def invariance_sentence(findings: list[dict]) -> str:
    """Dinh et al. 2017 and Andriushchenko et al. 2023, stated as they claim: sharpness changes under
    reparametrisation, and even adaptive sharpness correlates poorly with generalisation and mostly tracks the
    learning rate. Here: adaptive worst-case sharpness's verdict and its CMI against the best baseline's."""
    by = {f["measure"]: f for f in findings}
    adaptive = by.get("worst_case_adaptive")
    claim = ("Dinh et al. 2017: sharpness can be changed by reparametrising a network without changing its function "
             "(the default run's rescaling experiment shows it). Andriushchenko et al. 2023: even adaptive "
             "(rescaling-invariant) sharpness correlates poorly with generalisation and mostly tracks the "
             "learning rate. ")
    if not adaptive or adaptive["psi"] is None:
        return claim + "Not tested here (adaptive worst-case sharpness was not measured)."
    baselines = [f["cmi"] for f in findings if f["kind"] == "baseline" and f["cmi"] is not None and math.isfinite(f["cmi"])]
    best = max(baselines) if baselines else math.nan
    numbers = f"adaptive worst-case sharpness has Ψ {adaptive['psi']:+.2f} (Holm p {adaptive['p_holm']:.3g})"
    if adaptive["verdict"] != "predicts":
        return claim + f"Here {numbers}: no evidence that it predicts the error gap, as they found."
    if adaptive["cmi"] is not None and math.isfinite(best) and adaptive["cmi"] > best:
        return claim + (f"Here {numbers} and CMI {adaptive['cmi']:.3f} above every baseline's: it predicts beyond "
                        "the hyper-parameters, unlike their finding.")
    return claim + f"Here {numbers}, but its CMI is no higher than a baseline's: no better than the hyper-parameters, as they found."


def temperature_sentence(test: dict | None, alpha: float) -> str:
    """Smith & Le 2018: configurations at equal noise temperature εN/(B(1−m)) should generalise alike; the
    variance ratio within/between equal-temperature groups with its permutation p-value."""
    claim = "Smith & Le 2018: the noise temperature εN/(B(1−m)) sets generalisation, so equal temperature means equal gaps. "
    if not test or test["p_value"] is None or not math.isfinite(test["p_value"]):
        return claim + "Not tested here (fewer than two groups of configurations at equal temperature)."
    numbers = (f"the error gaps' variance within equal-temperature groups is {test['variance_ratio']:.2g} of that "
               f"between them (F = {test['f_statistic']:.3g}, {test['groups']} groups of {test['configurations']} "
               f"configurations, permutation p = {test['p_value']:.3g})")
    if test["p_value"] < alpha:
        return claim + f"Here {numbers}: configurations at equal temperature generalise alike, our data agree."
    return claim + f"Here {numbers}: no evidence that equal temperature means equal gaps."


def edge_of_stability_sentence(rows: list[dict], momentum: float) -> str:
    """Andreyev & Beneventano 2024 across the sweep: batch sharpness, not λ_max, settles at 2/η. Tested only when
    some model ends with batch sharpness within EDGE_BAND of 2/η or 2(1+β)/η; else "not tested here"."""
    usable = [r for r in rows if r.get("batch_sharpness") is not None and np.isfinite(r["batch_sharpness"])]
    claim = "Andreyev & Beneventano 2024: under mini-batch SGD batch sharpness, not λ_max, settles at 2/η. "
    if not usable:
        return claim + "Not tested here (batch sharpness was not tracked)."
    ratios = [[r["batch_sharpness"] * r["lr"] / (2 * (1 + beta)) for r in usable] for beta in (0.0, momentum)]
    at = [sum(abs(q - 1) <= EDGE_BAND for q in qs) for qs in ratios]
    if not any(at):
        closest = max(ratios[0], key=lambda q: -abs(q - 1))
        return claim + (f"Not tested here: no model ended with batch sharpness within {EDGE_BAND:.0%} of 2/η "
                        f"(the closest at {closest:.2f}× of it; {len(usable)} models).")
    below = sum(r["lambda_max"] < r["batch_sharpness"] for r in usable)
    return claim + (f"Here {at[0]} of {len(usable)} models end with batch sharpness within {EDGE_BAND:.0%} of 2/η"
                    + (f" and {at[1]} within {EDGE_BAND:.0%} of 2(1+β)/η" if momentum else "")
                    + f"; full-batch λ_max is below batch sharpness in {below} of {len(usable)}"
                    + (": our data agree on the order." if below > len(usable) / 2 else ": our data disagree on the order."))


def noise_sentence_of_sweep(noise: dict) -> str:
    """Whether the outcome's measurement noise is small against its spread (ratio at most the stated threshold)."""
    numbers = (f"one model's test error on {noise['test_examples']} held-out examples has a median binomial "
               f"standard error of {100 * noise['median_test_error_se']:.2f} points; the error gap varies by "
               f"{100 * noise['gap_sd']:.2f} points (SD) across models: a ratio of {noise['ratio']:.2f}")
    if noise["ratio"] is not None and math.isfinite(noise["ratio"]) and noise["ratio"] <= noise["threshold"]:
        return f"Outcome noise: {numbers}, within the {noise['threshold']:.2g} this study needs."
    return (f"Outcome noise: {numbers}, above the {noise['threshold']:.2g} this study needs: differences between "
            "models are partly measurement noise, so a real but small effect would read as 'no evidence'.")


def sweep_findings(metrics: dict) -> list[str]:
    """The sweep report's sentences, each chosen by the sweep's numbers."""
    sweep, cfg = metrics["sweep"], metrics["config"]
    findings, alpha = sweep["findings"], sweep["alpha"]
    return [noise_sentence_of_sweep(sweep["noise"]), *verdict_sentences(findings, alpha), baseline_sentence(findings),
            keskar_sentence(sweep.get("keskar"), alpha), invariance_sentence(findings),
            temperature_sentence(sweep.get("temperature_test"), alpha),
            edge_of_stability_sentence(sweep["rows"], cfg["sweep_momentum"])]


def findings_rows(findings: list[dict], half_verdicts: dict) -> tuple[list[str], list[list[str]]]:
    """The findings as a text table: Ψ with its interval, Holm p, CMI, the verdict and each half's."""
    header = ["measure", "kind", "tau", "Psi", "95% interval", "Holm p", "CMI", "verdict", "halves", "replicated"]
    rows = []
    for f in sorted_findings(findings):
        low, high = f["psi_interval"]
        halves = half_verdicts.get(f["measure"])
        rows.append([f["measure"], f["kind"], fmt(f["tau"], 2), fmt(f["psi"], 2), f"[{fmt(low, 2)}, {fmt(high, 2)}]",
                     fmt(f["p_holm"], 2), fmt(f["cmi"], 2), f["verdict"], " / ".join(halves) if halves else "-",
                     "yes" if f["replicated"] else "no"])
    return header, rows


def sweep_summary(metrics: dict) -> str:
    """The terminal's account of the sweep: what was trained, the findings table, the sentences."""
    sweep = metrics["sweep"]
    lines = [f"sweep: {len(sweep['rows'])} models measured ({sweep['trained_fraction']:.0%} of the grid), "
             f"{len(sweep['excluded'])} left out; outcome: {sweep['outcome']} (test - train error)",
             format_table(*findings_rows(sweep["findings"], sweep.get("half_verdicts", {})))]
    if sweep["rows"]:
        lines += ["", *(textwrap.fill(text, 110) for text in sweep_findings(metrics))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the edge of stability (--dynamics)
# What the readings of a --dynamics run count (landscape.dynamics takes them as arguments; EDGE_BAND is the band):
SHARPENING_RISE = 1.2  # λ_max more than 1.2x its start before it reaches the band: progressive sharpening
EOS_INSIDE = 0.8  # "stays within the band" from a step: at least 80% of the checks from it on lie in the band ...
EOS_HELD = 0.25  # ... and those checks span at least a quarter of the run's steps
LOSS_NAMES = {"mse": "MSE", "cross_entropy": "cross-entropy"}


def dynamics_run_name(r: dict) -> str:
    """"MSE, gradient descent, eta 0.1" or "MSE, SGD eta 0.1, batch 32"."""
    if r["family"] == "gd":
        return f"{LOSS_NAMES[r['loss']]}, gradient descent, eta {r['lr']:g}"
    return f"{LOSS_NAMES[r['loss']]}, SGD eta {r['lr']:g}, batch {r['batch_size']}"


def thresholds_of(reading: dict) -> dict:
    """The thresholds a run's reading was made with (stored beside it, so a redraw words it as it was read)."""
    return reading.get("thresholds") or {"band": EDGE_BAND, "rise": SHARPENING_RISE, "min_inside": EOS_INSIDE,
                                         "min_held": EOS_HELD}


def _stayed(onset: dict, threshold: float, t: dict) -> str:
    return (f"within ±{t['band']:.0%} of 2/eta = {fmt(threshold, 3)} from step {onset['onset']} on "
            f"({onset['inside_share']:.0%} of the checks from there, over {onset['held_share']:.0%} of the run)")


def _not_stayed(onset: dict, t: dict) -> str:
    return (f"did not stay within ±{t['band']:.0%} of it (at least {t['min_inside']:.0%} of the checks over at least "
            f"{t['min_held']:.0%} of the run)")


def gradient_descent_sentence(r: dict) -> str:
    """Cohen et al. 2021 for one gradient-descent run: did λ_max rise by more than SHARPENING_RISE before reaching
    the band (1 − EDGE_BAND)·2/η (progressive sharpening), and from which step did it stay within EDGE_BAND of 2/η
    (at least EOS_INSIDE of the checks over at least EOS_HELD of the run); "not reached within N steps" otherwise."""
    e, name, steps = r["reading"], dynamics_run_name(r), r["records"][-1]["step"]
    t = thresholds_of(e)
    sharp, onset, threshold = e["sharpening"], e["lambda_max"], r["threshold"]
    where = (f"{name} ({r['examples']} examples, 2/eta = {fmt(threshold, 3)}"
             + (f", diverged at step {r['diverged_at']})" if r["outcome"] == "diverged" else f", {steps} steps)"))
    if sharp["started_in_band"]:
        return (f"{where}: lambda_max started at {fmt(sharp['start'], 3)}, already at least {1 - t['band']:.0%} of "
                f"2/eta: progressive sharpening not tested (nothing to sharpen towards).")
    path = f"went from {fmt(sharp['start'], 3)} to a peak of {fmt(sharp['peak'], 3)}"
    words = (f"{sharp['ratio']:.2f}x its start: "
             + (f"progressive sharpening, more than {t['rise']:g}x" if sharp["rose"] else
                f"no progressive sharpening, not more than {t['rise']:g}x"))
    if onset["reached"] is None:
        return (f"{where}: lambda_max {path} ({words}) and did not reach {1 - t['band']:.0%} of 2/eta within "
                f"{steps} steps (median {e['lambda_ratio']:.2f}x 2/eta over the last {t['min_held']:.0%} of the run): the "
                "edge of stability not reached.")
    head = (f"{where}: lambda_max {path} by step {onset['reached']}, where it first reached {1 - t['band']:.0%} of "
            f"2/eta ({words})")
    if onset["onset"] is None:
        return (f"{head}; it {_not_stayed(onset, t)}, with a median of {e['lambda_ratio']:.2f}x 2/eta over the last "
                f"{t['min_held']:.0%} of the run.")
    verdict = ("progressive sharpening, then the edge of stability, as Cohen et al. 2021 find" if sharp["rose"] else
               "at the edge of stability without progressive sharpening")
    return f"{head}; it then stayed {_stayed(onset, threshold, t)}: {verdict}."


def sgd_sentence(r: dict) -> str:
    """Andreyev & Beneventano 2024 for one SGD run: does batch sharpness settle within EDGE_BAND of 2/η (the same
    rule as λ_max's under gradient descent), and where is full-batch λ_max meanwhile (its median over the settled
    window against the band: below it, as they find, or not)."""
    e, name, steps = r["reading"], dynamics_run_name(r), r["records"][-1]["step"]
    t = thresholds_of(e)
    batch, threshold = e["batch_sharpness"], r["threshold"]
    where = (f"{name} (2/eta = {fmt(threshold, 3)}"
             + (f", diverged at step {r['diverged_at']})" if r["outcome"] == "diverged" else f", {steps} steps)"))
    lam = e["lambda_ratio"]
    lam_words = (f"full-batch lambda_max stayed below the band (median {lam:.2f}x 2/eta)" if lam < 1 - t['band'] else
                 f"full-batch lambda_max was in the band too (median {lam:.2f}x 2/eta)" if lam <= 1 + t['band'] else
                 f"full-batch lambda_max was above the band (median {lam:.2f}x 2/eta)")
    if batch["onset"] is not None:
        agree = ("as Andreyev & Beneventano 2024 find" if lam < 1 - t['band'] else
                 "so here batch sharpness does not single itself out from lambda_max")
        return (f"{where}: batch sharpness settled {_stayed(batch, threshold, t)}, median {e['batch_ratio']:.2f}x; "
                f"{lam_words}: {agree}.")
    if batch["reached"] is None:
        return (f"{where}: batch sharpness did not reach {1 - t['band']:.0%} of 2/eta within {steps} steps (median "
                f"{e['batch_ratio']:.2f}x over the last {t['min_held']:.0%}); {lam_words}: the edge of stochastic "
                "stability not reached.")
    return (f"{where}: batch sharpness reached {1 - t['band']:.0%} of 2/eta at step {batch['reached']} but "
            f"{_not_stayed(batch, t)}, with a median of {e['batch_ratio']:.2f}x 2/eta over the last {t['min_held']:.0%} of "
            f"the run; {lam_words}.")


def dynamics_sentences(metrics: dict) -> list[str]:
    """One sentence per run: gradient descent's read by Cohen et al.'s claim, SGD's by Andreyev & Beneventano's."""
    return [gradient_descent_sentence(r) if r["family"] == "gd" else sgd_sentence(r)
            for r in metrics["dynamics"]["runs"]]


def dynamics_tally(metrics: dict) -> str:
    """How many runs of each family and loss show the claim: gradient descent sharpened and stayed at 2/η; SGD's
    batch sharpness settled at 2/η with λ_max below the band."""
    runs = metrics["dynamics"]["runs"]
    losses = list(dict.fromkeys(r["loss"] for r in runs))

    def shows(r: dict) -> bool:
        e = r["reading"]
        if r["family"] == "gd":
            return e["sharpening"]["rose"] and e["lambda_max"]["onset"] is not None
        return e["batch_sharpness"]["onset"] is not None and e["lambda_ratio"] < 1 - thresholds_of(e)["band"]

    def counts(family: str) -> str:
        return " and ".join(f"{sum(shows(r) for r in mine)} of {len(mine)} {LOSS_NAMES[loss]} runs" for loss in losses
                            if (mine := [r for r in runs if r["family"] == family and r["loss"] == loss]))

    t = thresholds_of(runs[0]["reading"] if runs else {})
    return (f"Gradient descent: lambda_max rose by more than {t['rise']:g}x and then stayed within ±{t['band']:.0%} "
            f"of 2/eta in {counts('gd')} (Cohen et al. 2021). SGD: batch sharpness settled within ±{t['band']:.0%} of "
            f"2/eta while full-batch lambda_max stayed below {1 - t['band']:.0%} of it in {counts('sgd')} (Andreyev & "
            "Beneventano 2024).")


def dynamics_rows_text(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The runs as a text table: λ_max at the start, peak and end against 2/η, the steps the reading found."""
    header = ["run", "2/eta", "lambda_max start", "peak", "end", "reached", "stays from", "batch sharpness end",
              "settles from", "loss end"]
    rows = []
    for r in metrics["dynamics"]["runs"]:
        e, last = r["reading"], r["records"][-1]
        batch = e["batch_sharpness"]
        step = lambda v: "-" if v is None else str(v)  # noqa: E731
        rows.append([dynamics_run_name(r), fmt(r["threshold"], 3), fmt(e["sharpening"]["start"], 3),
                     fmt(e["sharpening"]["peak"], 3), fmt(last["lambda_max"], 3), step(e["lambda_max"]["reached"]),
                     step(e["lambda_max"]["onset"]), fmt(last["batch_sharpness"], 3),
                     "n/a" if batch is None else step(batch["onset"]), fmt(last["loss"], 3)])
    return header, rows


def dynamics_title_page(metrics: dict) -> TextPage:
    """The study's first page: data, model, runs, how each check measures, the thresholds, the time."""
    d, cfg, dyn = metrics["dynamics"], metrics["config"], metrics["dynamics"]
    runs, t = d["runs"], thresholds_of({"thresholds": d.get("thresholds")})
    header, rows = dynamics_rows_text(metrics)
    losses = ", ".join(LOSS_NAMES[x] for x in cfg["dynamics_losses"])
    seconds = sum(r["seconds"] + r["tracking_seconds"] for r in runs)
    return TextPage(
        "The edge of stability: gradient descent and SGD against 2/eta",
        [f"Data: {metrics['data']['source']}; every run trains and is measured on the first {dyn['examples']} "
         f"training examples (Cohen et al. 2021 used a 5,000-example subset of CIFAR-10).",
         f"Model: MLP 784-{'-'.join(map(str, dyn['hidden']))}-10 (ReLU, {dyn['parameters']} parameters) from seed "
         f"{dyn['seed']}, the same initial weights for every run; losses {losses} "
         "(MSE: 1/2 ||f(x) - onehot(y)||^2 summed over classes, mean over examples).",
         f"Runs: full-batch gradient descent (momentum 0) at each step size, SGD (momentum 0, batches drawn without "
         f"replacement each epoch) at batch sizes {', '.join(map(str, cfg['dynamics_batch_sizes']))}; "
         f"{cfg['dynamics_steps']} steps each.",
         f"Each check (step 0, every {cfg['dynamics_check_every']} steps, the last step): the full-batch loss; "
         f"full-batch lambda_max by Lanczos warm-started from the last eigenvector, to ||Hv - lambda v|| <= "
         f"{cfg['dynamics_tol']:g} |lambda| (at most {cfg['dynamics_max_iter']} products); batch sharpness "
         f"E_B[g_B' H_B g_B / ||g_B||^2] over {cfg['dynamics_batches']} batches (gradient descent: the full "
         "gradient's own curvature).",
         f"Readings: progressive sharpening is lambda_max rising more than {t['rise']:g}x from its start before "
         f"it first reaches {1 - t['band']:.0%} of 2/eta; a series stays at the edge from the first check from which "
         f"at least {t['min_inside']:.0%} of the checks lie within ±{t['band']:.0%} of 2/eta over at least "
         f"{t['min_held']:.0%} of the run.",
         f"Time: {seconds:.0f} s training and tracking over {len(runs)} runs."],
        f"runs ({', '.join(header)}):", [", ".join(row) for row in rows])


def dynamics_summary(metrics: dict) -> str:
    """The terminal's account of the study: the runs' table, the tally and one sentence per run."""
    return "\n".join([format_table(*dynamics_rows_text(metrics)), "", textwrap.fill(dynamics_tally(metrics), 110),
                      *(textwrap.fill(text, 110) for text in dynamics_sentences(metrics))])


DYNAMICS_REPORT = "Dynamics_Report.pdf"


def dynamics_document(metrics: dict) -> Document:
    """The study's report: the title page, the figure with the tally, the sentences of every run."""
    return Document(DYNAMICS_REPORT, "Edge of stability report", [
        dynamics_title_page(metrics),
        Section("The edge of stability", reference="Cohen et al. 2021, Gradient descent on neural networks "
                "typically occurs at the edge of stability; Andreyev & Beneventano 2024, Edge of stochastic stability",
                formula=r"$\lambda_{\max}(\theta_t)\ \mathrm{and}\ E_B\left[\frac{g_B^\top H_B g_B}{\|g_B\|^2}\right]"
                        r"\ \mathrm{vs}\ 2/\eta$",
                interpretation=dynamics_tally(metrics), figure="edge_of_stability.png"),
        *[TextPage(f"The edge of stability: {words}, run by run",
                   [text for r, text in zip(metrics["dynamics"]["runs"], dynamics_sentences(metrics))
                    if r["family"] == family])
          for family, words in (("gd", "gradient descent"), ("sgd", "SGD"))]])


# ----------------------------------------------------------------------------- documents
REPORT = "Loss_Landscape_Report.pdf"
SWEEP_REPORT = "Sweep_Report.pdf"
SUMMARY_SECTION = Section("Summary table", figure="summary_table.png")


def title_page(metrics: dict) -> TextPage:
    """The default run's first page: what was run on which data with which versions, and each stage's time."""
    cfg, d, env = metrics["config"], metrics["data"], metrics["environment"]
    items = list(metrics.get("timings", {}).items())
    return TextPage(
        "Where does SGD land? Loss landscape report",
        [f"created {metrics.get('created', '')}",
         f"data: {d['source']} ({d['n_train']} train / {d['n_test']} test, sha256 {d['sha256'][:16]}...)",
         f"model: {cfg['model']} {tuple(cfg['hidden'])}, seeds {', '.join(map(str, cfg['seeds']))}; SGD lr "
         f"{cfg['lr']}, momentum {cfg['momentum']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs",
         f"versions: python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, "
         f"matplotlib {env['matplotlib']}; {env['device']}, {env['threads']} threads"],
        "time per stage (s):",
        ["    ".join(f"{k} {v:.2f}" for k, v in items[i : i + 4]) for i in range(0, len(items), 4)])


EQUAL_FIT = 0.10  # a model stopped within 10% of the target loss counts as trained to equal fit (issue 25)


def equal_fit_count(rows: list[dict], target: float) -> int:
    """How many models ended with a training loss within EQUAL_FIT of the target, either side."""
    return sum(abs(r["train_loss"] - target) <= EQUAL_FIT * target for r in rows)


def sweep_title_page(metrics: dict) -> TextPage:
    """The sweep's first page: the outcome, the data and its size, the momentum, the stopping rule, how many
    models trained, and every model left out with the reason."""
    sweep, cfg, d = metrics["sweep"], metrics["config"], metrics["data"]
    rows, total = sweep["rows"], len(sweep["grid"]) * len(sweep["seeds"])
    n_train = rows[0]["train_examples"] if rows else cfg["sweep_train_examples"]
    n_test = sweep["noise"]["test_examples"]
    return TextPage(
        "Which geometry predicts generalisation? Sweep report",
        [f"Outcome: the error gap (test error − training error) of each model, its test error on {n_test} held-out "
         f"examples; the cross-entropy gap is a secondary table (metrics.json: secondary_findings).",
         f"Data: {d['source']}; each model trains on {n_train} examples.",
         f"Grid: batch sizes {tuple(cfg['sweep_batch_sizes'])} × learning rates {tuple(cfg['sweep_lrs'])} × widths "
         f"{tuple(cfg['sweep_widths'])} × seeds {tuple(sweep['seeds'])}, SGD with momentum {cfg['sweep_momentum']:g}.",
         f"Stopping rule: each model trained until its training cross-entropy on all its training examples, "
         + ("checked after every step" if cfg["sweep_check_every"] == 1 else f"checked every {cfg['sweep_check_every']} steps")
         + f" from the first time its recent mini-batch losses were within {sweep['stopping_gate']:g}x of the target, "
         f"reached {cfg['sweep_target_loss']:g} (of the "
         f"step that crossed it and the one before, the one closer to it), within "
         f"{cfg['sweep_max_steps']} steps; one whose mini-batch loss stays at chance for "
         f"{cfg['sweep_collapse_steps']} steps is stopped as collapsed"
         + (f"; the studied models ended at training losses {min(r['train_loss'] for r in rows):.4f} to "
            f"{max(r['train_loss'] for r in rows):.4f}, {equal_fit_count(rows, cfg['sweep_target_loss'])} of "
            f"{len(rows)} within {EQUAL_FIT:.0%} of the target." if rows else "."),
         f"{len(rows)} of {total} models reached the target ({sweep['trained_fraction']:.0%}) and are studied; "
         f"verdicts: Ψ's within-group permutation test, Holm's correction over {len(sweep['findings'])} measures "
         f"and baselines, at {sweep['alpha']:g}; intervals resample configurations."],
        "left out:" if sweep["excluded"] else "",
        [f"batch {e['batch_size']}, lr {e['lr']}, width {e['width']}, seed {e['seed']} "
         f"({e.get('reason', 'missed the target')})" for e in sweep["excluded"]])


def replication_page(metrics: dict) -> TextPage:
    """Every measure's and baseline's verdict on all models and on each half of the seeds."""
    sweep = metrics["sweep"]
    header, rows = findings_rows(sweep["findings"], sweep.get("half_verdicts", {}))
    return TextPage("Findings table and replication",
                    ["A finding counts when both halves of the seeds reach the verdict of all the models "
                     "(replicated); with one pair of seeds the barriers cannot be replicated."],
                    ", ".join(header),
                    [", ".join(r) for r in rows])


SWEEP_PAGES = (("sweep_correlation.png", "Ψ of every measure and baseline with the error gap"),
               ("sweep_measures.png", "Each measure against the error gap"),
               ("gap_temperature.png", "The error gap against the noise temperature"),
               ("batch_sharpness.png", "Batch sharpness across batch sizes"))


def document(metrics: dict) -> Document:
    """The report of a run's metrics: the default run's (a title page, one section per measure, the summary
    table) or the sweep's (the grid and what was left out, the findings, a page per figure)."""
    if metrics.get("kind", "run") == "dynamics":
        return dynamics_document(metrics)
    if metrics.get("kind", "run") == "sweep":
        return Document(SWEEP_REPORT, "Sweep report",
                        [sweep_title_page(metrics), TextPage("Findings", sweep_findings(metrics)),
                         replication_page(metrics),
                         *[Section(title, figure=name) for name, title in SWEEP_PAGES]])
    return Document(REPORT, "Loss landscape report", [title_page(metrics), *report_sections(metrics), SUMMARY_SECTION])


def summary_text(metrics: dict) -> str:
    """What the terminal prints after a run: the summary tables of the default run, or the sweep's."""
    if metrics.get("kind", "run") == "dynamics":
        return dynamics_summary(metrics)
    return sweep_summary(metrics) if metrics.get("kind", "run") == "sweep" else format_summary(metrics)
