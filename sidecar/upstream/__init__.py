"""Connections to a destination: the pool, the choice of endpoint, and when to retry."""
