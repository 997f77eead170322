"""Training: the one loop (``training.trainer``), the run schema (``training.schema``), config sections to objects
(``training.builders``), toy, image and default runs, loading and sampling trained runs, checkpoints, EMA, logs.

Submodules are imported explicitly (``from manifold_fm.training.toy import train_toy``) so that importing one run
kind does not pull in another's heavy dependencies.
"""
