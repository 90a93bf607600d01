"""Seam 1, durable state: the :class:`Store` interface and its implementations."""
