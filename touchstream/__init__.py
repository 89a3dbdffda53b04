"""touchstream: a real-time customer-retention engine."""

__version__ = "0.1.0"
