"""Defaults of the online model that settings name as well (kept apart from model.py so that reading
the scoring settings, e.g. to refuse a bad one at start, does not import river, scipy and sklearn)."""

from __future__ import annotations

# Candidate step sizes (Adam) of the logistic regression, from "barely moves off the prior" to
# the usual 0.01; which one predicts is decided on the stream (see services/scoring/model.py).
LEARNING_RATES = (0.0003, 0.001, 0.003, 0.01)
