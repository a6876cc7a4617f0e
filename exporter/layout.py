"""Where an export's objects go in S3. Athena reads every object under a table's location except names
starting with ``_`` or ``.``, so each location below holds one table's data in one format, and the
manifests start with ``_``.

For format csv and prefix ``jiralake`` (the other formats use ``ap_jira_task_csv_gz`` and
``ap_jira_task_parquet`` as the table folder, with ``.csv.gz`` and ``.parquet`` names)::

    jiralake/ap_jira_task/latest/ap_jira_task.csv                 the current table, same name every run
    jiralake/ap_jira_task/latest/_manifest.json
    jiralake/ap_jira_task/history/dt=2024-05-10/ap_jira_task.csv  one per day (UTC); a re-run replaces it
    jiralake/ap_jira_task/history/dt=2024-05-10/_manifest.json
    jiralake/ap_jira_task/changes/dt=2024-05-10/ap_jira_task-20240510T030000Z-r42.csv   --changed-since-last
    jiralake/ap_jira_task/changes/dt=2024-05-10/_ap_jira_task-20240510T030000Z-r42.manifest.json
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from exporter.columns import TABLE
from exporter.settings import ExportFormat

_TABLE_FOLDER = {
    ExportFormat.CSV: TABLE,
    ExportFormat.CSV_GZ: f"{TABLE}_csv_gz",
    ExportFormat.PARQUET: f"{TABLE}_parquet",
}

CONTENT_TYPE = {
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.CSV_GZ: "application/gzip",
    ExportFormat.PARQUET: "application/vnd.apache.parquet",
}

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class ExportLayout:
    bucket: str
    prefix: str
    format: ExportFormat

    @property
    def table_folder(self) -> str:
        """The folder name, also the stem of the Athena table names (ap_jira_task, ap_jira_task_parquet)."""
        return _TABLE_FOLDER[self.format]

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.table_folder}" if self.prefix else self.table_folder

    @property
    def object_name(self) -> str:
        return f"{TABLE}.{self.format.value}"

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE[self.format]

    # -- folders (Athena table locations) --
    @property
    def latest_folder(self) -> str:
        return f"{self.root}/latest"

    @property
    def history_folder(self) -> str:
        return f"{self.root}/history"

    @property
    def changes_folder(self) -> str:
        return f"{self.root}/changes"

    # -- objects --
    @property
    def latest_key(self) -> str:
        return f"{self.latest_folder}/{self.object_name}"

    def history_key(self, dt: date) -> str:
        return f"{self.history_folder}/dt={dt.isoformat()}/{self.object_name}"

    def changes_key(self, started_at: datetime, run_id: int) -> str:
        stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
        name = f"{TABLE}-{stamp}-r{run_id}.{self.format.value}"
        return f"{self.changes_folder}/dt={started_at.date().isoformat()}/{name}"

    def manifest_key(self, data_key: str) -> str:
        """``_manifest.json`` beside a stable name; ``_<name>.manifest.json`` beside a per-run name."""
        folder, name = data_key.rsplit("/", 1)
        if name == self.object_name:
            return f"{folder}/{MANIFEST}"
        return f"{folder}/_{name.removesuffix('.' + self.format.value)}.manifest.json"

    def uri(self, key_or_folder: str) -> str:
        return f"s3://{self.bucket}/{key_or_folder}"

    def location(self, folder: str) -> str:
        """An Athena LOCATION: a folder, with its trailing slash."""
        return f"s3://{self.bucket}/{folder}/"
