"""Loss-landscape measurements: pure functions of a model and in-memory data.

Every function takes a model and tensors `x, y`, measures the mean loss over all examples (cross-entropy
unless a `loss_fn(outputs, targets)` returning a mean over examples is given) as a function of the measured
parameters (those with requires_grad=True, or the ones `params=` names, in `named_parameters()` order, a tied
weight once), works in the model's dtype and device, leaves the model exactly as it found it (parameters and
their identity, `.grad`, train/eval mode, buffers) and returns a small dataclass. One input check refuses,
with one sentence, what no measurement can use (`check_inputs`). Randomness comes from a `torch.Generator`
built from the `seed` argument. Second-order work runs attention through its twice-differentiable math kernel.

This module is the public interface; the code lives in the package `landscape/`, one module per capability:
1. Plumbing (`landscape.plumbing`): which parameters (`select_parameters`, `Selection`), flat parameter vectors,
   the input check (`check_measurable`, `check_inputs`), `max_output_change`.
2. Many parameter points (`landscape.points`): `losses_at_points`, `point_evaluator`; `bn="recompute"` there and
   in flatness, surfaces and connectivity recomputes BatchNorm statistics at each point (`recompute_batchnorm`).
3. Curvature (`landscape.hessian`, `landscape.spectrum`): `hessian_operator`, `hessian_vector_product`,
   `exact_hessian`, `hessian_diagonal`; Lanczos with full reorthogonalisation (`top_hessian_eigenvalue`, also
   by power iteration; `hessian_eigenpairs`, `hessian_spectrum_ends`), stochastic traces (`trace_estimate`,
   `hessian_trace`: Hutchinson, Hutch++), the spectral density (`hessian_spectral_density`, stochastic Lanczos
   quadrature; `hessian_spectrum`) and per-layer blocks (`layer_curvature`).
4. Flatness (`landscape.flatness`): `filter_normalize`, `random_direction(s)`, `perturbation_flatness`
   (filter-normalised or adaptive), `worst_case_sharpness`, `pac_bayes_flatness`, `rescaled_copy`.
5. Gradient noise (`landscape.noise`): `per_example_gradient_norms_sq`, `gradient_noise_scale` (B_simple,
   B_noise), `two_batch_noise_scale`, `noise_temperature`, `batch_sharpness` (the mini-batch Hessians along
   their own gradients, the quantity SGD drives to 2/η).
6. Connectivity (`landscape.connectivity`): `barrier_height`, `barrier_definitions`, `linear_interpolation`,
   `weight_matching` (`permute_hidden_units`), `bezier_curve` (`bezier_points`, `bezier_losses`).
7. Surfaces (`landscape.surfaces`): `symmetric_grid`, `loss_surface_2d`, `loss_plane`.
8. Exact answers (`landscape.exact`): `exact_curvature`, `product_rounding`, for small models.
9. Across processes (`landscape.distributed`): `DataShard` (this process holds a slice of the examples;
   `hessian_operator`, the eigenvalue, spectrum, trace and per-layer functions, `losses_at_points`,
   `perturbation_flatness` and `loss_surface_2d` then measure the whole set, their sums all-reduced over
   torch.distributed), `PointShare` (the points spread instead), `shard_rows`.
10. Rank statistics (`landscape.statistics`): `kendall_tau`, `granulated_kendall_tau` (Jiang et al. 2020's Ψ),
   `rank_correlation` (both with bootstrap intervals), for which measure ranks models by generalisation.
11. SGD's stationary distribution (`landscape.stationary`, Mandt et al. 2017): `stationary_distribution` (predicted
   against measured variance along the top Hessian eigenvectors and random controls), `sgd_stationary_covariance`
   (the discrete Lyapunov equation, with heavy-ball momentum), `continuous_stationary_covariance` (its small-η
   limit), `minibatch_noise_covariance`, `projected_sgd`, `batch_means_variance`.
12. Local entropy (`landscape.local_entropy`, Chaudhari et al. 2017): `local_entropy` (Langevin thermodynamic
   integration beside the Laplace approximation), `langevin_local_entropy`, `laplace_local_entropy`,
   `laplace_local_entropy_from_density`, `gradient_local_entropy`.
13. Dynamics (`landscape.dynamics`): `stability_threshold` (2(1+β)/η), `gradient_descent_is_stable`, and the
   edge of stability read off a tracked curvature series (Cohen et al. 2021; Andreyev & Beneventano 2024):
   `band_onset` (from which step it stays within a band around 2/η), `progressive_sharpening` (did it rise
   before reaching the band), `edge_of_stability` (both, for one run).
14. Losses by name (`landscape.losses`): `loss_function` ("cross_entropy", "mse"), `squared_error_loss`
   (½‖f(x) − onehot(y)‖², Cohen et al.'s MSE), one definition for training and for every `loss_fn=`.

Fast paths: three capabilities have one for plain MLPs (an `nn.Sequential` of distinct Linear and element-wise
modules, nothing reused, no parameter shared, all parameters measured, such as `models.SmallMLP`): Hessian products (`MLPHessian`, the R-operator), many parameter
points (`MLPPoints`, the first layer's linearity in its weights) and per-example gradients (`MLPPerExample`,
closed forms from one backward pass). Each implements the same interface as its autograd reference, is chosen
at one dispatch point (`path="auto"`; "fast" and "general" force one) and is tested equal to it.
"""

from landscape.connectivity import (BezierResult, InterpolationResult, WeightMatchingResult, barrier_definitions,
                                    barrier_height, bezier_curve, bezier_losses, bezier_points, linear_interpolation,
                                    permute_hidden_units, weight_matching)
from landscape.distributed import DataShard, PointShare, shard_rows
from landscape.exact import ExactCurvature, exact_curvature, product_rounding
from landscape.flatness import (FlatnessResult, PacBayesResult, WorstCaseResult, filter_normalize, pac_bayes_flatness,
                                perturbation_flatness, random_direction, random_directions, rescaled_copy,
                                worst_case_sharpness)
from landscape.hessian import HessianOperator, exact_hessian, hessian_diagonal, hessian_operator, hessian_vector_product
from landscape.noise import (BatchSharpnessResult, NoiseScaleResult, PerExampleGradients, TwoBatchNoiseResult,
                             batch_sharpness, gradient_noise_scale, noise_temperature, per_example_gradient_norms_sq,
                             per_example_gradient_rows, per_example_gradients, two_batch_noise_scale)
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, Selection, check_inputs, check_measurable, flat_parameters,
                                max_output_change, numpy_blas_single_threaded, select_parameters)
from landscape.points import PointEvaluator, PointLosses, losses_at_points, point_evaluator, recompute_batchnorm
from landscape.spectrum import (EigenpairsResult, EigenResult, HessianSpectrum, LayerCurvature, SpectralDensity,
                                TraceResult, hessian_eigenpairs, hessian_spectral_density, hessian_spectrum,
                                hessian_spectrum_ends, hessian_trace, layer_curvature, top_hessian_eigenvalue,
                                trace_estimate)
from landscape.dynamics import (BandOnset, EdgeOfStability, Sharpening, band_onset, edge_of_stability,
                                gradient_descent_is_stable, progressive_sharpening, stability_threshold)
from landscape.losses import LOSSES, loss_function, squared_error_loss
from landscape.local_entropy import (LangevinEntropy, LocalEntropyResult, gradient_local_entropy, laplace_local_entropy,
                                     laplace_local_entropy_from_density, langevin_local_entropy, local_entropy)
from landscape.stationary import (SGDTrajectory, StationaryResult, batch_means_variance,
                                  continuous_stationary_covariance, minibatch_noise_covariance, projected_sgd,
                                  sgd_stationary_covariance, stationary_distribution)
from landscape.statistics import RankCorrelation, granulated_kendall_tau, kendall_tau, rank_correlation
from landscape.surfaces import PlaneResult, SurfaceResult, loss_plane, loss_surface_2d, symmetric_grid

__all__ = [
    "BandOnset",
    "EdgeOfStability",
    "LOSSES",
    "Sharpening",
    "band_onset",
    "edge_of_stability",
    "loss_function",
    "progressive_sharpening",
    "squared_error_loss",
    "LangevinEntropy",
    "LocalEntropyResult",
    "SGDTrajectory",
    "StationaryResult",
    "batch_means_variance",
    "continuous_stationary_covariance",
    "gradient_descent_is_stable",
    "gradient_local_entropy",
    "laplace_local_entropy",
    "laplace_local_entropy_from_density",
    "langevin_local_entropy",
    "local_entropy",
    "minibatch_noise_covariance",
    "projected_sgd",
    "sgd_stationary_covariance",
    "stability_threshold",
    "stationary_distribution",
    "BatchSharpnessResult",
    "BezierResult",
    "DEFAULT_MEMORY_BUDGET",
    "DataShard",
    "EigenResult",
    "EigenpairsResult",
    "ExactCurvature",
    "FlatnessResult",
    "HessianOperator",
    "HessianSpectrum",
    "InterpolationResult",
    "LayerCurvature",
    "NoiseScaleResult",
    "PacBayesResult",
    "PerExampleGradients",
    "PlaneResult",
    "PointEvaluator",
    "PointLosses",
    "PointShare",
    "RankCorrelation",
    "Selection",
    "SpectralDensity",
    "SurfaceResult",
    "TraceResult",
    "TwoBatchNoiseResult",
    "WeightMatchingResult",
    "WorstCaseResult",
    "barrier_definitions",
    "batch_sharpness",
    "barrier_height",
    "bezier_curve",
    "bezier_losses",
    "bezier_points",
    "check_inputs",
    "check_measurable",
    "exact_curvature",
    "exact_hessian",
    "filter_normalize",
    "flat_parameters",
    "granulated_kendall_tau",
    "gradient_noise_scale",
    "hessian_diagonal",
    "hessian_eigenpairs",
    "hessian_operator",
    "hessian_spectral_density",
    "hessian_spectrum",
    "hessian_spectrum_ends",
    "hessian_trace",
    "hessian_vector_product",
    "kendall_tau",
    "layer_curvature",
    "linear_interpolation",
    "loss_plane",
    "loss_surface_2d",
    "losses_at_points",
    "max_output_change",
    "noise_temperature",
    "numpy_blas_single_threaded",
    "pac_bayes_flatness",
    "per_example_gradient_norms_sq",
    "per_example_gradient_rows",
    "per_example_gradients",
    "permute_hidden_units",
    "perturbation_flatness",
    "point_evaluator",
    "product_rounding",
    "random_direction",
    "random_directions",
    "rank_correlation",
    "recompute_batchnorm",
    "rescaled_copy",
    "select_parameters",
    "shard_rows",
    "symmetric_grid",
    "top_hessian_eigenvalue",
    "trace_estimate",
    "two_batch_noise_scale",
    "weight_matching",
    "worst_case_sharpness",
]
