"""Dataset digest: a fingerprint of the raw dataset on the PVC, computed on every run.

KFP's cache key holds a task's parameters and input artifacts, and for a mounted PVC only
its name: ingest and extract, which read the images there, would be served from the cache
after the data changed. They take this digest as a parameter, so their cache key follows
the data (the digest task itself is never cached).
"""

IMAGE = "cpu"


def dataset_digest(dataset_root: str) -> str:
    """The digest of the files under `dataset_root` (components.runtime.tree_digest)."""
    # Imports inside the body: KFP runs only this function's source in the pod.
    from components.runtime import tree_digest

    digest = tree_digest(dataset_root)
    print(f"psearch dataset-digest: {dataset_root} {digest}")
    return digest
