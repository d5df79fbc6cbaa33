"""The synthetic benchmark's ground truth: who stands where in which image, and the protocols.

`plan_dataset(preset, seed)` is pure numpy (no drawing), deterministic for a
seed, and is what `synthesize` renders and writes; tests compare the ingested
manifests with it. Counts follow CUHK-SYSU's: every labelled identity appears
in 2-5 images of its split, about 4 unlabelled background people per image,
query appearances larger on average than background people, a share of small
and of heavily occluded people (the low-resolution and occlusion subsets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from psearch.errors import PsearchError
from psearch.synth.layout import PRESETS, Figure, Scene, layout_scene

OCCLUDED_OVER = 0.4  # the paper's occlusion subset: more than 40 % of the query covered


@dataclass
class Query:
    identity: int
    image: int  # index into scenes
    box: tuple[int, int, int, int]
    occluded: bool


@dataclass
class DatasetPlan:
    preset: str
    seed: int
    scenes: list[Scene]  # Images.mat order
    identity_names: list[str]  # every named person (Person.mat); the split uses the first ones
    train_ids: list[int]
    test_ids: list[int]
    appearances: dict[int, list[tuple[int, Figure]]]  # identity -> [(scene index, figure)]
    queries: list[Query]
    # gallery_size -> (queries x G) scene indices, positives first then distractors
    galleries: dict[int, np.ndarray] = field(default_factory=dict)
    low_resolution: list[int] = field(default_factory=list)  # query indices

    def test_scenes(self) -> list[int]:
        return [i for i, s in enumerate(self.scenes) if s.split == "test"]

    def positives(self, query: int) -> list[int]:
        """Scene indices of the query person's other appearances (gallery order)."""
        q = self.queries[query]
        return [i for i, _ in self.appearances[q.identity] if i != q.image]

    def box_of(self, identity: int, scene: int) -> tuple[int, int, int, int]:
        for i, fig in self.appearances[identity]:
            if i == scene:
                return fig.box
        raise KeyError((identity, scene))


def plan_dataset(preset: str, seed: int) -> DatasetPlan:
    if preset not in PRESETS:
        raise PsearchError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    rng = np.random.default_rng([seed, 0x5EED])
    n_images = cfg.train_images + cfg.test_images
    numbers = rng.permutation(n_images) + 1  # s<N>.jpg: train and test interleave in Images.mat
    split_of_number = {
        int(n): ("train" if k < cfg.train_images else "test") for k, n in enumerate(numbers)
    }
    order = sorted(split_of_number)  # Images.mat lists s1, s2, ...
    n_named = cfg.train_ids + cfg.test_ids + cfg.extra_named
    names = [f"p{int(n)}" for n in rng.permutation(n_named) + 1]

    scene_splits = [split_of_number[n] for n in order]
    train_scenes = [i for i, s in enumerate(scene_splits) if s == "train"]
    test_scenes = [i for i, s in enumerate(scene_splits) if s == "test"]
    train_ids = list(range(cfg.train_ids))
    test_ids = list(range(cfg.train_ids, cfg.train_ids + cfg.test_ids))
    # Each identity's images: 2-4 in training, 2-5 in test (a query and 1-4 gallery images).
    visits: dict[int, list[int]] = {}
    visits.update(_assign(rng, train_ids, train_scenes, [2, 3, 4], [0.55, 0.33, 0.12]))
    visits.update(_assign(rng, test_ids, test_scenes, [2, 3, 4, 5], [0.35, 0.35, 0.2, 0.1]))

    # Which appearance is each test identity's query, and which queries get an occluder.
    query_visit = {pid: int(rng.integers(len(visits[pid]))) for pid in test_ids}
    # 187 of 2,900 in the release; about 1 % more end up hidden by chance.
    n_occluded = max(2, round(0.0565 * len(test_ids)))
    occluded_queries = set(rng.choice(test_ids, size=n_occluded, replace=False).tolist())

    people_in: dict[int, list[tuple[int, bool, bool]]] = {i: [] for i in range(n_images)}
    for pid, scenes in visits.items():
        for k, scene in enumerate(scenes):
            is_query = pid in query_visit and query_visit[pid] == k
            occlude = (is_query and pid in occluded_queries) or (
                not is_query and rng.random() < 0.06
            )
            people_in[scene].append((pid, is_query, occlude))

    scenes: list[Scene] = []
    appearances: dict[int, list[tuple[int, Figure]]] = {pid: [] for pid in visits}
    n_zero = max(2, n_images // 600)
    zero_scenes = set(rng.choice(n_images, size=n_zero, replace=False).tolist())
    for index, number in enumerate(order):
        scene_rng = np.random.default_rng([seed, 1, index])
        scene = layout_scene(
            scene_rng,
            cfg,
            f"s{number}.jpg",
            scene_splits[index],
            people_in[index],
            index in zero_scenes,
        )
        scenes.append(scene)
        for fig in scene.figures():
            if fig.identity >= 0:
                appearances[fig.identity].append((index, fig))

    queries = []
    for pid in test_ids:
        scene = visits[pid][query_visit[pid]]
        fig = next(f for i, f in appearances[pid] if i == scene)
        queries.append(Query(pid, scene, fig.box, fig.occlusion > OCCLUDED_OVER))
    plan = DatasetPlan(preset, seed, scenes, names, train_ids, test_ids, appearances, queries)
    plan.galleries = _galleries(rng, plan, cfg.gallery_sizes)
    plan.low_resolution = low_resolution_queries([q.box[3] for q in queries])
    return plan


def low_resolution_queries(heights: list[float]) -> list[int]:
    """The round-half-up 10 % of queries with the smallest box height, ties to the lower index."""
    count = int(np.floor(len(heights) * 0.1 + 0.5))
    order = sorted(range(len(heights)), key=lambda q: (heights[q], q))
    return sorted(order[:count])


def _assign(rng, ids, scenes, counts, probs) -> dict[int, list[int]]:
    """Spread identities over images: each takes the least-loaded of a few random candidates."""
    load = np.zeros(len(scenes), dtype=np.int64)
    out = {}
    for pid in ids:
        k = int(rng.choice(counts, p=probs))
        candidates = rng.choice(len(scenes), size=min(len(scenes), 4 * k), replace=False)
        chosen = candidates[np.argsort(load[candidates], kind="stable")[:k]]
        load[chosen] += 1
        out[pid] = [scenes[c] for c in sorted(chosen.tolist())]
    return out


def _galleries(rng, plan: DatasetPlan, sizes: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Per query: the other images holding the person, then distractors (nested across sizes)."""
    test = np.array(plan.test_scenes())
    largest = max(sizes)
    if largest > len(test) - 1:
        raise PsearchError(f"gallery size {largest} exceeds the {len(test)} test images")
    rows = np.empty((len(plan.queries), largest), dtype=np.int32)
    for qi, q in enumerate(plan.queries):
        holding = {i for i, _ in plan.appearances[q.identity]}
        positives = [i for i, _ in plan.appearances[q.identity] if i != q.image]
        pool = test[~np.isin(test, list(holding))]
        distractors = rng.permutation(pool)[: largest - len(positives)]
        rows[qi] = np.concatenate(
            [np.asarray(positives, dtype=np.int32), distractors.astype(np.int32)]
        )
    return {g: rows[:, :g] for g in sizes}
