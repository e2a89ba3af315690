"""Audit tools over the event log: the history of an upload or a repository."""
