"""Serving: the MLflow pyfunc wrapper of a trained model (and the search server)."""
