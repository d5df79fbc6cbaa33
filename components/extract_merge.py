"""Extract-merge: combine the extraction shards into the contract's detection files."""

from kfp.dsl import Dataset, Input, Output

IMAGE = "cpu"


def extract_merge(parts: Input[list[Dataset]], detections: Output[Dataset]):
    """Concatenate the shards (refusing gaps and overlaps) into one detections artifact."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from pathlib import Path

    from components.runtime import shard_parts, summary_line
    from psearch import stages

    part_dirs = shard_parts([part.path for part in parts])
    summary = stages.extract_merge(part_dirs, Path(detections.path))
    print(summary_line("extract-merge", summary))
