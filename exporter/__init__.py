"""The exporter: streams ``ap_jira_task`` from PostgreSQL to S3 (CSV, gzip'd CSV or Parquet), atomically,
in constant memory, on demand or on a schedule. Entry points: :func:`exporter.run.export_once` and
``jiralake export`` (:mod:`exporter.command`). Design notes: docs/exporter.md.
"""
