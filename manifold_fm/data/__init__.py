"""Datasets: built-in toy manifolds and tiny images, image folders, latent caches."""
