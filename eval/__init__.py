"""Evaluation: reads a model and a dataset; knows nothing of training."""
