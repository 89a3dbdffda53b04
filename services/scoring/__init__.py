"""Scoring: per-customer event-time features, online churn/propensity model, ScoreUpdates.

State per customer lives in Redis (not Faust tables: Tansu's ListOffsets answer cuts
changelog recovery short). Each worker process keeps one River model for all the
partitions it owns; it is checkpointed to one shared Redis key and every worker restores
the newest checkpoint on start, so models diverge between restarts and re-converge then.
"""
