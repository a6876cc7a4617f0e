"""Backfill and reconciliation from the Jira REST API (``jiralake backfill``, ``jiralake reconcile``)."""
