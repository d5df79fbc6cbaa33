"""Evaluation: search and detection metrics of one set of detections against the manifests.

inputs reads and checks the files, search and detection score them (vectorised), run writes
metrics.json and per-query results (docs/contract.md), plots the CSV curves and PNGs.
"""
