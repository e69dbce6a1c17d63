"""Admission, queueing, keep_alive and eviction; memory estimates and GPU layer planning."""
