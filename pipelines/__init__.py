"""The Kubeflow side of psearch (the orchestration wing): the DAG and what handles it.

- person_search.py: the DAG (compiled to person_search.yaml, committed);
- settings.py: the `pipeline:` section of params.yaml (images, resources, PVC, Secret);
- compile.py, local.py (run-local with kfp.local), submit.py, prepare.py: the actions;
- cli.py: `python -m pipelines compile | run-local | submit | prepare` (`psearch-kfp`).

It builds on `components` (one KFP component per stage) and the psearch library;
neither of those imports this package.
"""
