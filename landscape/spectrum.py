"""The Hessian's spectrum from exact products: Lanczos with full reorthogonalisation, the top and bottom
eigenpairs with their certificates, stochastic traces, the spectral density, and per-layer curvature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from landscape.distributed import DataShard
from landscape.hessian import NO_EXACT_DIAGONAL, HessianOperator, hessian_operator
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, flat_parameters, gaussian,
                                numpy_blas_single_threaded, parameter_shapes, product_progress, rademacher,
                                start_vector)


# ----------------------------------------------------------------------------- Lanczos


@dataclass
class _Lanczos:
    """One Lanczos run: the tridiagonal T (alphas on the diagonal, betas off it) and the orthonormal basis."""

    alphas: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    beta_next: float = 0.0
    basis: torch.Tensor | None = None  # (m, D) after the run
    finished: bool = False

    def ritz(self, k: int, which: str):
        """The k wanted Ritz values (largest first / most negative first), their vectors, residual estimates
        β_m·|s_m| (exact in exact arithmetic, reliable with full reorthogonalisation) and max |θ|."""
        values, vectors = np.linalg.eigh(np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1))
        order = (np.argsort(-values) if which == "largest" else np.argsort(values))[: min(k, len(values))]
        residuals = abs(self.beta_next) * np.abs(vectors[-1, order])
        ritz_vectors = torch.from_numpy(np.ascontiguousarray(vectors[:, order].T)).to(self.basis) @ self.basis
        return values[order], ritz_vectors, residuals, float(np.abs(values).max())

    def converged(self, k: int, which: str, tol: float) -> bool:
        values, vectors = np.linalg.eigh(np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1))
        order = (np.argsort(-values) if which == "largest" else np.argsort(values))[:k]
        scale = max(float(np.abs(values).max()), 1e-30)  # ≈ ‖H‖: eigenvalues near zero cannot stall the test
        residuals = abs(self.beta_next) * np.abs(vectors[-1, order])
        return len(order) == k and bool(np.all(residuals <= tol * np.maximum(np.abs(values[order]), 1e-8 * scale)))


_DGKS = 1 / math.sqrt(2)  # reorthogonalise again when a pass shrank the vector below this share of its norm


def _lanczos_runs(matmat, starts: torch.Tensor, *, max_steps, done=lambda run: False, outputs=None) -> list[_Lanczos]:
    """Independent Lanczos runs with full reorthogonalisation, advanced in lockstep so that each step is one
    batched product H·[q_1 ... q_R]. Run r stops after max_steps (an int, or one per run), when `done(run)` says
    so, or at breakdown (β ≈ 0: its Krylov space is invariant and its Ritz values are exact).
    `outputs` (R, D) of zeros and ones restricts run r's products to outputs[r] (for diagonal blocks: the start
    must lie in the same block); the operator's matmat(vs, outputs) skips work the restriction makes needless."""
    # numpy's BLAS runs the small eigh of each step on its own threads, which then spin for a while and take
    # the cores from torch's products (seed 42's spectrum: 1.7 s -> 0.9 s with one thread)
    with numpy_blas_single_threaded():
        return _lanczos_steps(matmat, starts, max_steps, done, outputs)


def _lanczos_steps(matmat, starts, max_steps, done, outputs) -> list[_Lanczos]:
    n_runs, dim = starts.shape
    limits = [min(m, dim) for m in (max_steps if isinstance(max_steps, (list, tuple)) else [max_steps] * n_runs)]
    # one basis per run, each grown (doubled, up to its limit) only as its own run needs: a run that goes on
    # after the others stopped does not take their memory with it
    bases = [torch.empty((min(limit, 16) + 1, dim), dtype=starts.dtype, device=starts.device) for limit in limits]
    for basis, start in zip(bases, starts):
        basis[0] = start / start.norm()
    runs = [_Lanczos() for _ in range(n_runs)]
    for j in range(max(limits)):
        active = [r for r in range(n_runs) if not runs[r].finished]
        if not active:
            break
        vectors = torch.stack([bases[r][j] for r in active])
        products = matmat(vectors) if outputs is None else matmat(vectors, outputs[active])
        for w, r in zip(products, active):
            run, q = runs[r], bases[r][: j + 1]
            run.alphas.append(float(w @ q[j]))
            # the three-term recurrence, then full reorthogonalisation by classical Gram-Schmidt, repeated only
            # when it removed much (Daniel, Gragg, Kaufman & Stewart's test: "twice is enough")
            w = torch.sub(w, q[j], alpha=run.alphas[-1])  # a fresh vector, then updated in place
            if j > 0:
                w.sub_(q[j - 1], alpha=run.betas[-1])
            before = float(w.norm())
            w.addmv_(q.T, q @ w, alpha=-1)
            run.beta_next = float(w.norm())
            if run.beta_next < _DGKS * before:
                w.addmv_(q.T, q @ w, alpha=-1)
                run.beta_next = float(w.norm())
            scale = max(abs(a) for a in run.alphas) + max(run.betas, default=0.0)
            if run.beta_next <= 1e-12 * max(scale, 1e-30) or j + 1 == limits[r] or done(run):
                run.finished = True
                continue
            if j + 1 >= bases[r].shape[0]:
                grown = torch.empty((min(2 * bases[r].shape[0], limits[r] + 1), dim), dtype=starts.dtype,
                                    device=starts.device)
                grown[: j + 1] = bases[r][: j + 1]
                bases[r] = grown
            bases[r][j + 1] = w / run.beta_next
            run.betas.append(run.beta_next)
    for run, basis in zip(runs, bases):
        run.basis = _used_rows(basis, len(run.alphas))
    return runs


def _used_rows(basis: torch.Tensor, used: int) -> torch.Tensor:
    """The first `used` rows of a basis buffer: a view while the buffer holds at most twice that many rows (a copy
    would hold the whole basis twice at the run's end, the peak memory of a large model's λ_max: ResNet-18's 12 rows
    are 540 MB), else a copy, so that a short run does not keep a long buffer alive (on a GPU every row is held)."""
    return basis[:used] if basis.shape[0] <= 2 * used else basis[:used].clone()




def _gradient_start(op, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A Lanczos start vector rich in the top eigendirections: the loss gradient, which after training lies
    mostly in the top Hessian eigenspace (Gur-Ari et al. 2018), plus a seeded random tenth so that no
    direction is missed; the random vector alone where the gradient vanishes."""
    random = start_vector(op.dim, seed, like)
    random = random / random.norm()
    gradient = op.gradient().to(like)
    norm = gradient.norm()
    if not torch.isfinite(norm) or norm <= torch.finfo(like.dtype).eps * max(1.0, float(like.abs().max())):
        return random
    return gradient / norm + 0.1 * random


@dataclass
class EigenResult:
    """An eigenpair estimate with its convergence certificate ‖H·v − λ·v‖ (v of unit norm)."""

    eigenvalue: float
    eigenvector: torch.Tensor
    iterations: int  # Hessian-vector products spent
    converged: bool
    residual: float
    method: str


def _power_iteration(matvec, start: torch.Tensor, *, tol: float, max_iter: int):
    """Power iteration; stops when the Rayleigh quotient changes by less than tol relatively."""
    v = start / start.norm()
    previous = None
    for i in range(1, max_iter + 1):
        w = matvec(v)
        value = float(v @ w)
        residual = float((w - value * v).norm())
        if previous is not None and abs(value - previous) < tol * abs(previous):
            return value, v, i, True, residual
        previous = value
        norm = w.norm()
        if norm == 0:
            return 0.0, v, i, True, 0.0
        v = w / norm
    return value, v, max_iter, False, residual


def top_hessian_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "lanczos",
    start: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    operator: HessianOperator | None = None,
    params: ParamSpec = None,
) -> EigenResult:
    """Largest algebraic eigenvalue λ_max of the Hessian of the mean loss (sharpness; Keskar et al. 2017).

    method="lanczos" (default): Lanczos with full reorthogonalisation, stopped when the
    residual ‖Hv − λv‖ ≤ tol·|λ|, which bounds the eigenvalue error by tol·|λ|.
    method="power": power iteration stopped on a relative change below tol (PyHessian's
    rule, which does not bound the error). Power iteration finds the eigenvalue of largest
    magnitude; when that is negative it is rerun on H − λ_neg·I, whose dominant eigenvalue
    is λ_max − λ_neg, so the result is always the largest algebraic eigenvalue. Unless `start` is given,
    both start from the gradient plus a seeded random tenth (`_gradient_start`), which saves a few products
    at a trained point. `operator` reuses a `hessian_operator` of the same model and data.
    """
    op = operator or hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard,
                                      params=params)
    spent = op.matvecs
    like = flat_parameters(model, params)
    v0 = _gradient_start(op, seed, like) if start is None else start.detach().to(like)
    if method == "lanczos":
        with product_progress(max_iter, "λ_max by Lanczos") as count:
            run = _lanczos_runs(count(op.matmat), v0[None], max_steps=max_iter,
                                done=lambda r: r.converged(1, "largest", tol))[0]
        values, vectors, residuals, _ = run.ritz(1, "largest")
        return EigenResult(float(values[0]), vectors[0], op.matvecs - spent, run.converged(1, "largest", tol)
                           or run.beta_next <= 1e-12 * max(abs(values[0]), 1e-30), float(residuals[0]), "lanczos")
    if method != "power":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    value, vector, _, converged, residual = _power_iteration(op, v0, tol=tol, max_iter=max_iter)
    if value < 0:  # the dominant eigenvalue is the most negative one: shift it to zero
        shift = value
        shifted = lambda v: op(v) - shift * v  # noqa: E731
        mu, vector, _, converged_shifted, residual = _power_iteration(shifted, v0, tol=tol, max_iter=max_iter)
        value, converged = mu + shift, converged and converged_shifted
    return EigenResult(value, vector, op.matvecs - spent, converged, residual, "power")


@dataclass
class EigenpairsResult:
    """k extreme eigenpairs of the Hessian with their certificates ‖H·v_i − λ_i·v_i‖ (computed, not estimated)."""

    eigenvalues: list[float]  # largest first ("largest") or most negative first ("smallest")
    eigenvectors: torch.Tensor  # (k, D), orthonormal rows
    residuals: list[float]
    converged: bool
    iterations: int  # Hessian-vector products, the final residual check included
    which: str


def hessian_eigenpairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-6,
    seed: int = 0,
    max_iter: int = 300,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> EigenpairsResult:
    """The k largest (or most negative) eigenvalues of the Hessian and their eigenvectors, by Lanczos with full
    reorthogonalisation, stopped when every wanted pair has ‖Hv − λv‖ ≤ tol·max(|λ|, 1e-8·‖H‖); the residuals
    are then recomputed with k true products. λ_min < 0 means a saddle, not a minimum (Dauphin et al. 2014)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    return _extreme_eigenpairs(model, x, y, {which: k}, tol, seed, max_iter, loss_fn, memory_budget, shard,
                               params)[which]


def hessian_spectrum_ends(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    k_smallest: int = 1,
    tol: float = 1e-6,
    seed: int = 0,
    max_iter: int = 300,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> tuple[EigenpairsResult, EigenpairsResult]:
    """The k largest and the k_smallest most negative eigenpairs from one Lanczos run: a Krylov space converges
    at both ends of the spectrum at once, so one run stopped when both ends meet the test of `hessian_eigenpairs`
    costs the longer of the two separate runs, not their sum. Both results count the shared products."""
    pairs = _extreme_eigenpairs(model, x, y, {"largest": k, "smallest": k_smallest}, tol, seed, max_iter, loss_fn,
                                memory_budget, shard, params)
    return pairs["largest"], pairs["smallest"]


def _extreme_eigenpairs(model, x, y, wanted: dict[str, int], tol, seed, max_iter, loss_fn, memory_budget, shard=None,
                        params=None):
    """One Lanczos run from a seeded Gaussian start until every end in `wanted` ({which: k}) has converged,
    then the true residuals of all wanted pairs in one batched product."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard, params=params)
    _check_wanted(wanted, op.dim)
    v0 = start_vector(op.dim, seed, flat_parameters(model, params))
    steps = max(max_iter, *wanted.values())
    with product_progress(steps, "eigenpairs by Lanczos") as count:
        run = _lanczos_runs(count(op.matmat), v0[None], max_steps=steps, done=lambda r: _ends_converged(r, wanted, tol))[0]
    return _certified_ends(op, run, wanted, tol)


def _ends_converged(run: _Lanczos, wanted: dict[str, int], tol: float) -> bool:
    return all(run.converged(k, which, tol) for which, k in wanted.items())


def _check_wanted(wanted: dict[str, int], dim: int) -> None:
    for k in wanted.values():
        if not 1 <= k <= dim:
            raise ValueError(f"k must be between 1 and the number of parameters ({dim}), got {k}")


def _certified_ends(op, run: _Lanczos, wanted: dict[str, int], tol: float) -> dict[str, EigenpairsResult]:
    """The Ritz pairs of `run` at each end in `wanted`, with their true residuals from one batched product;
    `iterations` counts the run's products and those."""
    ritz = {which: run.ritz(k, which) for which, k in wanted.items()}
    vectors = torch.cat([ritz[which][1] for which in wanted])
    products = op.matmat(vectors)
    out, row = {}, 0
    for which, k in wanted.items():
        values, vecs, _, scale = ritz[which]
        mine = products[row : row + len(values)]
        row += len(values)
        residuals = (mine - torch.as_tensor(values).to(vecs)[:, None] * vecs).norm(dim=1)
        limits = torch.as_tensor(tol * np.maximum(np.abs(values), 1e-8 * scale)).to(residuals)
        converged = len(values) == k and bool(torch.all(residuals <= limits))
        out[which] = EigenpairsResult(values.tolist(), vecs, residuals.tolist(), converged,
                                      len(run.alphas) + len(vectors), which)
    return out




# ----------------------------------------------------------------------------- traces and spectra


@dataclass
class TraceResult:
    """A stochastic trace estimate with its standard error."""

    trace: float
    stderr: float
    matvecs: int
    method: str
    converged: bool  # the standard error reached rel_stderr·|trace| within max_matvecs


def trace_estimate(matmat, dim: int, *, method: str = "hutch++", rel_stderr: float = 0.01,
                   max_matvecs: int = 1000, seed: int = 0, like: torch.Tensor | None = None,
                   block: int = 8, sketch: int = 16) -> TraceResult:
    """tr(A) for a symmetric operator given by `matmat` (rows in, rows out).

    "hutchinson": mean of zᵀAz over Rademacher z, standard error std/√m (Hutchinson 1989).
    "hutch++": tr(QᵀAQ) exactly on the span Q of A·S for `sketch` Rademacher S, plus Hutchinson on
    the deflated (I − QQᵀ)A(I − QQᵀ) (Meyer et al. 2021), whose variance the top directions no
    longer dominate. Both add probes, `block` at a time, until stderr ≤ rel_stderr·|trace|
    (at least 2 blocks), not until the running mean stops moving.
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    like = torch.zeros(1) if like is None else like
    generator = torch.Generator().manual_seed(seed)
    used, exact_part, q = 0, 0.0, None
    if method == "hutch++":
        s = min(sketch, dim, max(1, max_matvecs // 3))
        q, _ = torch.linalg.qr(matmat(rademacher((s, dim), generator, like)).T)  # (D, s)
        exact_part = float(torch.trace(q.T @ matmat(q.T.contiguous()).T))
        used = 2 * s
    if q is not None and q.shape[1] == dim:  # the sketch spans everything: tr(QᵀAQ) is the trace
        return TraceResult(exact_part, 0.0, used, method, True)
    samples: list[float] = []
    estimate, stderr = exact_part, math.inf
    while used < max_matvecs:
        z = rademacher((min(block, max_matvecs - used), dim), generator, like)
        if q is not None:
            z = z - (z @ q) @ q.T
        samples += (z * matmat(z)).sum(dim=1).tolist()
        used += z.shape[0]
        estimate = exact_part + float(np.mean(samples))
        stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
        if len(samples) >= 2 * block and stderr <= rel_stderr * abs(estimate):
            break
    return TraceResult(estimate, stderr, used, method, stderr <= rel_stderr * abs(estimate))




def hessian_trace(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "auto",
    rel_stderr: float = 0.01,
    max_matvecs: int = 1000,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    operator: HessianOperator | None = None,
    params: ParamSpec = None,
) -> TraceResult:
    """tr(H) of the mean loss. "hutch++" or "hutchinson": stochastic, on exact products, stopped when the standard
    error reaches rel_stderr·|tr(H)| or after max_matvecs products, whichever comes first (PyHessian stops when
    the running mean moves < 1e-3, ~3% error here); "exact" sums the exact diagonal (`hessian_diagonal`: plain
    MLPs with piecewise-linear activations, stderr 0, no products); "auto" (default) is "exact" where it applies,
    else Σ_i e_iᵀHe_i over the D unit vectors when D ≤ max_matvecs (exact, D products), else Hutch++.
    `operator` reuses a `hessian_operator` of the same model and data."""
    if method not in ("hutchinson", "hutch++", "exact", "auto"):
        raise ValueError(f"method must be 'hutchinson', 'hutch++', 'exact' or 'auto', got {method!r}")
    op = operator or hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard,
                                      params=params)
    like = flat_parameters(model, params)
    if method in ("exact", "auto"):
        diagonal = op.diagonal()
        if diagonal is not None:
            return TraceResult(float(diagonal.double().sum()), 0.0, 0, "exact", True)
        if method == "exact":
            raise ValueError(f"method='exact': {NO_EXACT_DIAGONAL}; use method='hutch++' or 'auto'")
        if op.dim <= max_matvecs:
            return TraceResult(_unit_vector_trace(op, like, memory_budget), 0.0, op.dim, "exact", True)
        method = "hutch++"
    with product_progress(max_matvecs, f"tr(H) by {method}") as count:
        return trace_estimate(count(op.matmat), op.dim, method=method, rel_stderr=rel_stderr,
                              max_matvecs=max_matvecs, seed=seed, like=like)


def _unit_vector_trace(op, like: torch.Tensor, memory_budget: int) -> float:
    """Σ_i e_iᵀ·H·e_i, the exact trace from the D unit vectors, as many at a time as the memory budget holds."""
    rows = max(1, memory_budget // max(1, 4 * op.dim * like.element_size()))
    total = 0.0
    with product_progress(op.dim, "tr(H) from unit vectors") as count:
        matmat = count(op.matmat)
        for start in range(0, op.dim, rows):
            stop = min(start + rows, op.dim)
            units = torch.zeros((stop - start, op.dim), dtype=like.dtype, device=like.device)
            units[:, start:stop] = torch.eye(stop - start, dtype=like.dtype, device=like.device)
            total += float(torch.diagonal(matmat(units)[:, start:stop]).double().sum())
    return total


@dataclass
class SpectralDensity:
    """Smoothed spectral density of the Hessian from stochastic Lanczos quadrature."""

    grid: np.ndarray
    density: np.ndarray  # integrates to 1 over grid
    nodes: np.ndarray  # (runs, steps) Ritz values; unused entries (early breakdown) have weight 0
    weights: np.ndarray  # (runs, steps) squared first components of T's eigenvectors; each row sums to 1
    sigma: float


def hessian_spectral_density(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lanczos_steps: int = 80,
    runs: int = 10,
    seed: int = 0,
    sigma: float | None = None,
    grid_points: int = 2000,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): for each of `runs` Gaussian vectors v/‖v‖,
    m Lanczos steps give T = U·diag(θ)·Uᵀ, and vᵀf(H)v ≈ Σ_i U_1i²·f(θ_i); the density is the average over
    runs of Σ_i U_1i²·N(t; θ_i, σ²), so it integrates to 1 and its mean is ≈ tr(H)/D. σ defaults to
    1% of the spectral range. All runs advance in lockstep, one batched product per step."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard, params=params)
    results = _slq_runs(op, flat_parameters(model, params), runs, lanczos_steps, seed, memory_budget)
    return _slq_density(results, lanczos_steps, sigma, grid_points)


@dataclass
class HessianSpectrum:
    """Both ends of the Hessian spectrum and its density, from one set of Lanczos runs (`hessian_spectrum`)."""

    top: EigenpairsResult  # the k largest eigenpairs
    bottom: EigenpairsResult  # the k_smallest most negative
    density: SpectralDensity


def hessian_spectrum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    k_smallest: int = 1,
    tol: float = 1e-6,
    lanczos_steps: int = 80,
    runs: int = 10,
    seed: int = 0,
    max_iter: int = 300,
    sigma: float | None = None,
    grid_points: int = 2000,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> HessianSpectrum:
    """`hessian_spectral_density` and `hessian_spectrum_ends` from one set of Lanczos runs. The SLQ runs advance
    in lockstep for `lanczos_steps` steps; the first then goes on alone until the k largest and the k_smallest
    most negative Ritz pairs pass `hessian_eigenpairs`'s test (at most max(max_iter, lanczos_steps) steps), and
    their true residuals take one batched product. A run's first m steps do not depend on how long it goes on,
    so the density, from each run's leading m×m block of T, is `hessian_spectral_density`'s for the same seed;
    the ends cost the few steps past m instead of a run of their own (35-47 products per model here)."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard, params=params)
    wanted = {"largest": k, "smallest": k_smallest}
    _check_wanted(wanted, op.dim)
    results = _slq_runs(op, flat_parameters(model, params), runs, lanczos_steps, seed, memory_budget,
                        first_until=lambda r: _ends_converged(r, wanted, tol),
                        first_max_steps=max(max_iter, lanczos_steps, k, k_smallest))
    ends = _certified_ends(op, results[0], wanted, tol)
    return HessianSpectrum(ends["largest"], ends["smallest"], _slq_density(results, lanczos_steps, sigma, grid_points))


def _slq_runs(op, like: torch.Tensor, runs: int, steps: int, seed: int, memory_budget: int, *, first_until=None,
              first_max_steps: int = 0) -> list[_Lanczos]:
    """SLQ's Lanczos runs from seeded Gaussian starts, in lockstep blocks that fit the memory budget, `steps`
    each; with `first_until`, the first run goes on past `steps` until first_until(run) or first_max_steps.
    A normalised Gaussian vector is uniform on the sphere, so E[vvᵀ] = I/D as quadrature needs, and it is
    orthogonal to a given eigenvector with probability zero, where a Rademacher vector is orthogonal to
    (e_i − e_j)/√2 half the time: the eigenpairs read off the first run rely on that."""
    starts = gaussian((runs, op.dim), torch.Generator().manual_seed(seed), like)
    per_block = max(1, memory_budget // max(1, (steps + 1) * op.dim * like.element_size()))
    results = []
    for s in range(0, runs, per_block):
        block = starts[s : s + per_block]
        limits = [steps] * block.shape[0]
        done = lambda run: False  # noqa: E731
        if s == 0 and first_until is not None:
            limits[0] = first_max_steps  # the others stop at `steps` whatever done says
            done = lambda run: len(run.alphas) >= steps and first_until(run)  # noqa: E731
        with product_progress(sum(limits), "spectral density (SLQ)") as count:
            results += _lanczos_runs(count(op.matmat), block, max_steps=limits, done=done)
    return results


def _slq_density(results: list[_Lanczos], steps: int, sigma: float | None, grid_points: int) -> SpectralDensity:
    """The SLQ density from each run's first `steps` steps (a longer run's leading block of T)."""
    runs = len(results)
    width = min(steps, max(len(r.alphas) for r in results))
    nodes, weights = np.zeros((runs, width)), np.zeros((runs, width))
    for i, run in enumerate(results):
        alphas, betas = run.alphas[:steps], run.betas[: steps - 1]
        values, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        nodes[i, : len(values)], weights[i, : len(values)] = values, vectors[0] ** 2
    used = weights > 0
    low, high = nodes[used].min(), nodes[used].max()
    sigma = sigma if sigma is not None else max(0.01 * (high - low), 1e-12 * max(abs(high), 1.0))
    grid = np.linspace(low - 6 * sigma, high + 6 * sigma, grid_points)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes[used][None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights[used] / runs
    return SpectralDensity(grid, density, nodes, weights, sigma)


@dataclass
class LayerCurvature:
    """Curvature of one parameter tensor's diagonal Hessian block H_bb."""

    name: str
    size: int
    top_eigenvalue: float
    residual: float
    trace: float
    trace_stderr: float  # 0 when the trace is exact
    converged: bool


def layer_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    tol: float = 1e-3,
    max_iter: int = 100,
    rel_stderr: float = 0.02,
    max_probes: int = 200,
    exact_below: int = 64,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> list[LayerCurvature]:
    """Per parameter tensor b (named as `named_parameters()` names it): the top eigenvalue of its diagonal Hessian
    block H_bb (Lanczos restricted to the block, stopped at ‖H_bb v − λv‖ ≤ tol·|λ|) and tr(H_bb): the sum of the
    exact diagonal where `hessian_diagonal` applies (plain MLPs with piecewise-linear activations), else exact
    for blocks of at most `exact_below` entries and Hutchinson with block-restricted Rademacher probes until the
    standard error reaches rel_stderr (at most max_probes). Costs at most Σ_b min(max_iter, n_b) products for
    the eigenvalues and Σ_b min(max_probes, n_b) for the traces. When the blocks' masks, starts and first
    Lanczos bases fit in the memory budget together (blocks·(min(max_iter, 16) + 3)·D numbers), all blocks
    advance at once, one batched product per step; otherwise block after block, in the block's own
    coordinates, in memory (min(max_iter, n_b) + 1)·n_b + a few D-vectors."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, shard=shard, params=params)
    like = flat_parameters(model, params)
    names, sizes = zip(*[(name, math.prod(shape)) for name, shape in parameter_shapes(model, params)])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    together = len(sizes) * (min(max_iter, 16) + 3) * op.dim * like.element_size() <= memory_budget
    budget = sum(min(max_iter, n) for n in sizes) + sum(min(max_probes, n) for n in sizes)
    with product_progress(budget, "per-layer curvature") as count:
        matmat = count(op.matmat)
        if together:
            runs, traces = _layers_together(op, matmat, like, sizes, offsets, seed, tol, max_iter, rel_stderr,
                                            max_probes, exact_below)
        else:
            runs, traces = _layers_one_by_one(op, matmat, like, sizes, offsets, seed, tol, max_iter, rel_stderr,
                                              max_probes, exact_below)
    out = []
    for b, run in enumerate(runs):
        values, _, residuals, _ = run.ritz(1, "largest")
        out.append(LayerCurvature(names[b], sizes[b], float(values[0]), float(residuals[0]), *traces[b],
                                  run.converged(1, "largest", tol) or len(run.alphas) == sizes[b]))
    return out


def _layers_together(op, matmat, like, sizes, offsets, seed, tol, max_iter, rel_stderr, max_probes, exact_below):
    """Every block's Lanczos run in lockstep (one batched product per step) over full-length masked vectors."""
    masks = torch.zeros((len(sizes), op.dim), dtype=like.dtype, device=like.device)
    for b in range(len(sizes)):
        masks[b, offsets[b] : offsets[b + 1]] = 1
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randn((len(sizes), op.dim), generator=generator, dtype=torch.float64).to(like) * masks
    runs = _lanczos_runs(matmat, starts, max_steps=[min(max_iter, n) for n in sizes],
                         done=lambda r: r.converged(1, "largest", tol), outputs=masks)
    diagonal = op.diagonal()
    if diagonal is not None:
        traces = [(float(diagonal[offsets[b] : offsets[b + 1]].double().sum()), 0.0) for b in range(len(sizes))]
    else:
        traces = _block_traces(op, matmat, masks, sizes, offsets, generator, like, rel_stderr, max_probes, exact_below)
    return runs, traces


def _layers_one_by_one(op, matmat, like, sizes, offsets, seed, tol, max_iter, rel_stderr, max_probes, exact_below):
    """Each block on its own: Lanczos and the probes in the block's n_b coordinates, every product one masked
    full-length product whose block is read back, so memory is the block's basis and a few D-vectors."""
    generator = torch.Generator().manual_seed(seed)
    diagonal = op.diagonal()
    runs, traces = [], []
    for b, size in enumerate(sizes):
        block = slice(int(offsets[b]), int(offsets[b + 1]))
        block_matmat = _restricted(matmat, block, op.dim, like)
        start = torch.randn((1, size), generator=generator, dtype=torch.float64).to(like)
        runs += _lanczos_runs(block_matmat, start, max_steps=min(max_iter, size),
                              done=lambda r: r.converged(1, "largest", tol))
        if diagonal is not None:
            traces.append((float(diagonal[block].double().sum()), 0.0))
        elif size <= exact_below:
            eye = torch.eye(size, dtype=like.dtype, device=like.device)
            traces.append((float(torch.diagonal(block_matmat(eye)).double().sum()), 0.0))
        else:
            traces.append(_hutchinson_block(block_matmat, size, generator, like, rel_stderr, max_probes))
    return runs, traces


def _restricted(matmat, block: slice, dim: int, like: torch.Tensor):
    """vs (k, n_b) in a block's coordinates -> the block of H·v for v the vectors placed in that block."""
    def block_matmat(vs: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((vs.shape[0], dim), dtype=like.dtype, device=like.device)
        full[:, block] = vs
        wanted = torch.zeros_like(full)
        wanted[:, block] = 1
        return matmat(full, wanted)[:, block]
    return block_matmat


def _hutchinson_block(block_matmat, size, generator, like, rel_stderr, max_probes, round_size: int = 8):
    """(mean, stderr) of zᵀH_bb z over Rademacher z, rounds of `round_size` probes until the standard error
    reaches rel_stderr·|mean| (after at least 8) or max_probes."""
    samples: list[float] = []
    while len(samples) < max_probes:
        z = rademacher((min(round_size, max_probes - len(samples)), size), generator, like)
        samples += (z * block_matmat(z)).sum(dim=1).tolist()
        stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
        if len(samples) >= 8 and stderr <= rel_stderr * abs(float(np.mean(samples))):
            break
    stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    return float(np.mean(samples)), stderr


def _block_traces(op, matmat, masks, sizes, offsets, generator, like, rel_stderr, max_probes, exact_below):
    """(trace, stderr) of every diagonal block: exact from unit vectors for small blocks, else Hutchinson
    with probes restricted to the block, all blocks of one round in a single batched product."""
    out = [None] * len(sizes)
    for b, size in enumerate(sizes):
        if size <= exact_below:
            eye = torch.zeros((size, op.dim), dtype=like.dtype, device=like.device)
            eye[:, offsets[b] : offsets[b + 1]] = torch.eye(size, dtype=like.dtype)
            wanted = masks[b].expand(size, -1)
            out[b] = (float(torch.diagonal(matmat(eye.to(like), wanted)[:, offsets[b] : offsets[b + 1]]).sum()), 0.0)
    pending = [b for b in range(len(sizes)) if out[b] is None]
    samples = {b: [] for b in pending}
    while pending and min(len(samples[b]) for b in pending) < max_probes:
        z = rademacher((len(pending), op.dim), generator, like) * masks[pending].to(like)
        for b, value in zip(pending, (z * matmat(z, masks[pending])).sum(dim=1).tolist()):
            samples[b].append(value)
        still = []
        for b in pending:
            s = samples[b]
            stderr = float(np.std(s, ddof=1) / math.sqrt(len(s))) if len(s) > 1 else math.inf
            out[b] = (float(np.mean(s)), stderr)
            if len(s) < 8 or stderr > rel_stderr * abs(out[b][0]):
                still.append(b)
        pending = still
    return out
