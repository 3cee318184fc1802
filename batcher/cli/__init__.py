"""The ``batcher`` command."""
