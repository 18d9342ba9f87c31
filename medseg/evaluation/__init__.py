"""Evaluation: metrics on arrays, scoring a model or a folder, cross-validation summaries and
reports, post-processing tuned out of fold, and plots.

Built on io, data, models and artifacts; it may use inference's predictor to score a model and never
imports :mod:`medseg.training`.
"""
