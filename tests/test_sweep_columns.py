"""The sweep's one number per model from the theories' stages: the local entropy at the middle scope and the
median stationary ratio over the top Hessian eigenvectors (the random controls left out)."""

import math

from experiment.sweep import MODEL_MEASURES, median_eigen_ratio, middle_scope_entropy


def test_middle_scope_entropy_takes_the_langevin_value_at_the_middle_of_the_sorted_scopes():
    assert middle_scope_entropy({"scopes": [100.0, 1.0, 10.0], "langevin": [0.5, 19.0, 4.2]}) == 4.2
    assert middle_scope_entropy({"scopes": [1.0, 10.0], "langevin": [19.0, 4.2]}) == 19.0  # the lower middle
    assert middle_scope_entropy({"scopes": [10.0], "langevin": [4.2]}) == 4.2


def test_median_eigen_ratio_ignores_the_controls_and_the_directions_without_a_prediction():
    result = {"labels": ["eigen 1", "eigen 2", "eigen 3", "eigen 4", "random 1"],
              "ratio": [0.2, None, 0.4, float("nan"), 50.0]}
    assert math.isclose(median_eigen_ratio(result), 0.3)
    assert math.isnan(median_eigen_ratio({"labels": ["eigen 1", "random 1"], "ratio": [None, 1.0]}))


def test_the_theories_measures_carry_their_claimed_directions():
    """Larger local entropy is a wider valley (Chaudhari et al.: a smaller gap); the stationary ratio claims none."""
    assert MODEL_MEASURES["local_entropy"] == -1 and MODEL_MEASURES["stationary_ratio"] == 0
