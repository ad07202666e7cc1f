"""The Geometry Score computed set by set, as the paper's Algorithm 1 reads (Khrulkov &
Oseledets, ICML 2018): the oracle of ``fastgan.metrics.geometry_score`` in the tests and
the baseline of its benchmark. numpy / scipy / gudhi only, one landmark set at a time;
no shared tables, no truncation, no workers.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def witness_h1_intervals(points: np.ndarray, landmarks: np.ndarray, gamma: float):
    """H1 intervals (Z/2) of the relaxed witness complex of one landmark set, and alpha_max.

    Witnesses: all points. Table: for each witness, every landmark (its position in
    ``landmarks``) with its Euclidean distance, nearest first. alpha_max = gamma times the
    largest witness-landmark distance; complex up to triangles."""
    import gudhi

    distances = cdist(points, points[landmarks])
    order = np.argsort(distances, axis=1)
    table = np.stack((order.astype(np.float64), np.take_along_axis(distances, order, axis=1)), axis=2)
    alpha_max = gamma * distances.max()
    complex_ = gudhi.WitnessComplex(table).create_simplex_tree(max_alpha_square=alpha_max, limit_dimension=2)
    complex_.persistence(homology_coeff_field=2)
    return complex_.persistence_intervals_in_dimension(1), alpha_max


def relative_living_times(intervals, alpha_max: float, i_max: int) -> np.ndarray:
    """RLT(i) for i < i_max: the measure of {alpha in [0, alpha_max]: beta_1(alpha) = i}
    over alpha_max, beta_1 counted at the midpoint of each stretch between consecutive
    end points; infinite deaths are alpha_max, and no interval means beta_1 = 0 throughout."""
    clipped = [(birth, alpha_max if np.isinf(death) else death) for birth, death in intervals]
    rlt = np.zeros(i_max)
    if not clipped:
        rlt[0] = 1.0
        return rlt
    ends = sorted(set([0.0, alpha_max] + [value for pair in clipped for value in pair]))
    for left, right in zip(ends[:-1], ends[1:]):
        middle = (left + right) / 2
        holes = sum(1 for birth, death in clipped if birth <= middle < death)
        if holes < i_max:
            rlt[holes] += right - left
    return rlt / alpha_max


def relative_living_times_of_sets(points: np.ndarray, landmark_sets: np.ndarray, gamma: float = None,
                                  i_max: int = 100) -> np.ndarray:
    """(n, i_max) RLTs, one landmark set (row of indices) after the other;
    gamma defaults to 1/128 * N/5000."""
    points = np.asarray(points, dtype=np.float64)
    gamma = points.shape[0] / 5000 / 128 if gamma is None else gamma
    return np.stack([relative_living_times(*witness_h1_intervals(points, np.asarray(landmarks), gamma), i_max)
                     for landmarks in landmark_sets])
