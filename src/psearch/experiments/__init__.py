"""The paper's experiments in one command (`psearch paper`): every training, extraction and
evaluation its tables and figures need, composed from psearch.stages, cached per step
(cache), and written up as one report directory (report, figures) with the paper's own
numbers beside ours (published).
"""
