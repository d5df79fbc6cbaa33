"""The Kubeflow pipeline definitions (person_search.py) and their compiled IR."""
