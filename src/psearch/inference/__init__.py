"""Running a trained model: extraction (gallery detections and query features), its shards and
report, and the one-off `psearch search`; loading.py turns model files into checked networks."""
