"""Counters: per-worker shared-memory blocks, summed by control for `wg show` and metrics."""
