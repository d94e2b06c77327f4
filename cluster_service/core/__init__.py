"""The math: NIW prior and statistics, Gaussian densities, nets, split/merge decisions, schedule.
Pure torch; no I/O, Ray or MLflow.
"""
