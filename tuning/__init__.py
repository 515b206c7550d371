"""Hyperparameter search for fine-tuning pretrained image classifiers (Ray Tune + Optuna)."""

__version__ = "0.1.0"
