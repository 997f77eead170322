"""Training loops: toy manifolds (``training.toy``) and latent images (``training.image``), checkpoints, EMA.

Submodules are imported explicitly (``from manifold_fm.training.toy import train_toy``) so that importing one loop
does not pull in the other's heavy dependencies.
"""
