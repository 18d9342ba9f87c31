"""Artifact folders: run folders, cross-validation folders and export folders.

One owner for each folder's contract (its layout, how it is created, opened, recognised and how
its models are loaded and checked). Training writes these folders; evaluation and inference read
them only through this package and never import :mod:`medseg.training`.
"""
