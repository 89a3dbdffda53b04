"""Scoring: per-customer event-time features, online churn/propensity model, ScoreUpdates.

Flow per batch (service.py): load the batch's customer states and the crossing checks its
event times pass; in event order, run each due check, then apply each touchpoint
(engine.py); score the whole batch in one model evaluation; schedule each scored customer's
next crossing check; learn every example whose step ended by the partition's watermark minus
the allowed lateness (silent customers' from their stored paths); save; send one ScoreUpdate
per touchpoint and one per check that crossed a threshold a rule watches. README.md in this
folder has the details and how each setting was chosen.

State per customer lives in Redis (not Faust tables: Tansu's ListOffsets answer cuts
changelog recovery short); see store.py for the key layout. Features are in event time
(features.py, state.py), labels arrive late (labels.py), segments and stages come from
online quantiles and thresholds (segments.py).

Models per worker, and checkpoints:
- Each worker process keeps one Learner (model.py) for all the partitions it owns: the
  River model, its prequential quality and drift detector, the purchases-per-window mean
  and the RFM quantile sketches. Customer state is partitioned; the model is not.
- Every `checkpoint_interval_s` and on shutdown the worker pickles its Learner to one
  shared Redis key, `{prefix}:model` (last writer wins), signed with HMAC-SHA256 under
  `checkpoint_key` (checkpoint.py). A starting worker restores that newest checkpoint,
  unless it was written by an older version or for another `model` kind, in which case it
  starts a fresh model and logs why. A checkpoint whose signature is missing or wrong is
  never unpickled: the worker starts a fresh model, logs an ERROR, counts it in
  `touchstream_scoring_checkpoints_refused_total` (alert TouchstreamScoringCheckpointRefused)
  and keeps the bytes at `{prefix}:model:refused`.
- So with N workers, N models learn from disjoint customers between restarts and each
  restart re-seeds all of them from whichever checkpoint was written last. Every model
  sees a random share of customers (partitioning is by customer id hash), so they learn
  the same function; the price is that each one learns from 1/N of the examples.
  A ScoreUpdate's `model_version` (`logreg-v3-n<examples learned>`) says which state of
  which model scored it.
"""
