"""The `touchstream` command and the local stack: tooling that may depend on every service.

The core package (`touchstream/`) is imported by the services and never imports them;
this package sits above both: `touchstream local up` spawns the services, `touchstream keys`,
`import`, `rules validate|backtest` call into them, `touchstream demo` replays CDNOW through
the whole stack. `tests/unit/core/test_core_imports.py` holds the core to that.
"""
