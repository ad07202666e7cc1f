"""Evaluation metrics as objects with update() / compute() / reset(), reduced across processes."""
from fastgan.metrics.base import Metric
from fastgan.metrics.fid import FID, FeatureStatistics, frechet_distance
from fastgan.metrics.geometry_score import GeometryScore  # the module keeps its name: functions in it
from fastgan.metrics.inception import InceptionV3
from fastgan.metrics.inception_score import InceptionScore
from fastgan.metrics.kid import KID
from fastgan.metrics.ms_ssim import MSSSIM

__all__ = ["Metric", "FID", "FeatureStatistics", "frechet_distance", "InceptionV3", "InceptionScore", "KID", "MSSSIM",
           "GeometryScore"]
