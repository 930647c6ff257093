"""The contract between control and workers: shared-memory layouts and pipe messages."""
