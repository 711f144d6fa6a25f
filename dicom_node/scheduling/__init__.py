"""Deciding what runs: series completion, routing rules, and queueing jobs to the workers."""
