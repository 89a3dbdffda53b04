"""Ingest: the HTTP front door. Segment-compatible calls in, Avro touchpoints on Kafka out."""
