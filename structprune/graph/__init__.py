"""Tracing, coupling and grouping."""
