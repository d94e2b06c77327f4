"""The frameworks: the one Ray session policy, Ray Train workers, the Ray Data assign job, Ray
Tune, MLflow tracking.
"""
