"""Evaluation metrics as objects with update() / compute() / reset(), reduced across processes."""
from fastgan.metrics.base import Metric
from fastgan.metrics.fid import FID, FeatureStatistics, frechet_distance

__all__ = ["Metric", "FID", "FeatureStatistics", "frechet_distance"]
