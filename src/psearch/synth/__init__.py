"""The synthetic CUHK-SYSU-layout dataset generator behind `psearch synth` (the `synth` stage).

Independent of `psearch.data`: it writes the raw layout (images and annotation/*.mat) that
the readers in `psearch.data` ingest, so a test or a user can check one against the other.
    layout       where each person, occluder and piece of clutter stands in one scene
    plan         the whole dataset's ground truth and protocols (pure numpy, from the seed)
    drawing      the pixels (PIL)
    matwriter    a fast MATLAB v5 writer for the values CUHK-SYSU's .mat files hold
    sysu_writer  the plan as CUHK-SYSU's annotation files
    generate     `synthesize`: all of it into a directory, atomically
"""

from psearch.synth.generate import synthesize

__all__ = ["synthesize"]
