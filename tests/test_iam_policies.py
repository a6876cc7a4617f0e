"""The least-privilege IAM policies in deploy/iam/ against an IAM-enforcing moto server: each role runs
its real code paths with exactly its policy, and is refused what it has no business doing.

This module starts its own moto server with ``INITIAL_NO_AUTH_ACTION_COUNT=3``: those three calls,
made with unknown keys, create a test-only admin user (an IAM user, its allow-everything policy and
its access key). From then on every call is signed by an IAM user and checked against that user's
policies: the admin creates the queues, the bucket and one user per role with the role's policy
(placeholders substituted), and each test runs the product code with a role's keys in the standard
credential chain (the environment).

Where moto's IAM differs from AWS, the test bridges it in the open (deploy/iam/README.md lists them):
moto authorizes the SQS batch calls under their own names (``sqs:SendMessageBatch``), which AWS
authorizes as ``sqs:SendMessage`` (and likewise for DeleteMessage and ChangeMessageVisibility), so the
policies given to moto also carry the batch names on the same resources (:func:`for_moto`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import string
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest
import structlog
from botocore.exceptions import ClientError
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from backfill.enqueue import max_entry_bytes, send_envelopes
from consumer.service import run_consumer
from exporter.errors import ExportError
from exporter.progress import ProgressSnapshot
from exporter.run import export_once
from jiralake import cli
from ops.local_aws import LocalAws
from shared import aws, provision
from shared.envelope import Envelope, error_attributes
from shared.metrics import QUEUE_MESSAGES, QUEUE_OLDEST_AGE_SECONDS
from shared.provision import MAX_MESSAGE_BYTES, QueuePair
from shared.queue_limits import DEAD_LETTER_ROOM_BYTES
from shared.settings import AwsSettings, DatabaseSettings, QueueSettings
from tests.jira_fixtures import make_event, raw
from tests.test_consumer_helpers import consumer_settings, envelope_of, holds, wait_for
from tests.test_export_support import insert_awkward_rows, make_settings
from tests.test_receiver import post, receiver_settings, running

IAM_DIR = Path(__file__).resolve().parent.parent / "deploy" / "iam"
ROLES = ("receiver", "consumer", "exporter", "operator", "backfill")
PLACEHOLDERS = ("QueueArn", "DlqArn", "BucketArn", "ExportPrefix")
REGION = "us-east-1"
BUCKET = "jiralake-iam-exports"
# The exporter test's JIRALAKE_EXPORT_PREFIX (tests/test_export_support.make_settings uses "lake").
EXPORT_PREFIX = "lake"
# Unauthenticated calls moto serves before it enforces IAM: the admin's CreateUser, PutUserPolicy and
# CreateAccessKey, exactly.
BOOTSTRAP_CALLS = 3
# Test-only: the admin that sets up queues, bucket and users, and checks results. Never shipped.
ADMIN = "admin"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}

QUEUE, DLQ, OBJECTS = "${QueueArn}", "${DlqArn}", "${BucketArn}/${ExportPrefix}*"
# The contract: every (action, resource) each role is granted, and nothing else.
GRANTS: dict[str, set[tuple[str, str]]] = {
    "receiver": {("sqs:SendMessage", QUEUE), ("sqs:GetQueueAttributes", QUEUE)},
    "consumer": {
        ("sqs:ReceiveMessage", QUEUE),
        ("sqs:ChangeMessageVisibility", QUEUE),
        ("sqs:DeleteMessage", QUEUE),
        ("sqs:GetQueueAttributes", QUEUE),
        ("sqs:SendMessage", DLQ),
        ("sqs:GetQueueAttributes", DLQ),
        ("sqs:ReceiveMessage", DLQ),
        ("sqs:ChangeMessageVisibility", DLQ),
    },
    "exporter": {("s3:PutObject", OBJECTS), ("s3:AbortMultipartUpload", OBJECTS), ("s3:GetObject", OBJECTS)},
    "operator": {
        ("sqs:GetQueueAttributes", QUEUE),
        ("sqs:SendMessage", QUEUE),
        ("sqs:GetQueueAttributes", DLQ),
        ("sqs:ReceiveMessage", DLQ),
        ("sqs:ChangeMessageVisibility", DLQ),
        ("sqs:DeleteMessage", DLQ),
        ("sqs:PurgeQueue", DLQ),
    },
    "backfill": {("sqs:SendMessage", QUEUE), ("sqs:GetQueueAttributes", QUEUE)},
}

# AWS authorizes each SQS batch call as its single-message action; moto checks the batch name.
MOTO_BATCH_NAMES = {
    "sqs:SendMessage": "sqs:SendMessageBatch",
    "sqs:DeleteMessage": "sqs:DeleteMessageBatch",
    "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch",
}

CREATED = "mattermost-plugin-jira__webhook-issue-created.json"
EXPORT_DAY = datetime(2024, 5, 10, 6, 0, tzinfo=UTC)


# -- the policies as files --


def load(role: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((IAM_DIR / f"{role}.json").read_text())
    return document


def render(role: str, values: dict[str, str]) -> dict[str, Any]:
    """The policy with its placeholders substituted (a missing value raises KeyError)."""
    text = string.Template((IAM_DIR / f"{role}.json").read_text()).substitute(values)
    document: dict[str, Any] = json.loads(text)
    return document


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def grants(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (action, resource)
        for statement in document["Statement"]
        for action in as_list(statement["Action"])
        for resource in as_list(statement["Resource"])
    }


def for_moto(document: dict[str, Any]) -> dict[str, Any]:
    """The same policy with each SQS single-message action joined by its batch name, same resources."""
    statements = []
    for statement in document["Statement"]:
        actions = as_list(statement["Action"])
        batch = [MOTO_BATCH_NAMES[a] for a in actions if a in MOTO_BATCH_NAMES]
        statements.append({**statement, "Action": actions + batch})
    return {**document, "Statement": statements}


EXAMPLE_VALUES = {
    "QueueArn": "arn:aws:sqs:eu-west-1:111122223333:jiralake.fifo",
    "DlqArn": "arn:aws:sqs:eu-west-1:111122223333:jiralake-dlq.fifo",
    "BucketArn": "arn:aws:s3:::acme-jiralake",
    "ExportPrefix": "jiralake/",
}


@pytest.mark.parametrize("role", ROLES)
def test_each_policy_is_a_plain_document_of_scoped_allows(role: str) -> None:
    # GIVEN the shipped policy file
    text = (IAM_DIR / f"{role}.json").read_text()
    document = json.loads(text)
    # THEN it is a 2012-10-17 policy of Allow statements with a unique Sid, an Action and a Resource
    assert set(document) == {"Version", "Statement"}
    assert document["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in document["Statement"]]
    assert len(sids) == len(set(sids)) and all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids)
    for statement in document["Statement"]:
        assert set(statement) == {"Sid", "Effect", "Action", "Resource"}
        assert statement["Effect"] == "Allow"
        # AND every action is one named action: no wildcard, no NotAction
        for action in as_list(statement["Action"]):
            assert re.fullmatch(r"(sqs|s3):[A-Z][A-Za-z]+", action), action
        # AND every resource is one of our queues or objects under the export prefix: never "*"
        for resource in as_list(statement["Resource"]):
            assert resource in (QUEUE, DLQ, OBJECTS), resource
    # AND the only placeholders are the documented ones
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= set(PLACEHOLDERS)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_is_granted_exactly_what_its_code_calls(role: str) -> None:
    assert grants(load(role)) == GRANTS[role]


@pytest.mark.parametrize("role", ROLES)
def test_substituted_policies_name_real_arns_only(role: str) -> None:
    # WHEN the placeholders are substituted as deploy/iam/README.md shows
    document = render(role, EXAMPLE_VALUES)
    # THEN no placeholder is left and every resource is a concrete ARN of the example account
    assert "${" not in json.dumps(document)
    for _, resource in grants(document):
        assert resource.startswith(("arn:aws:sqs:eu-west-1:111122223333:", "arn:aws:s3:::acme-jiralake/"))
    assert {r for _, r in grants(render("exporter", EXAMPLE_VALUES))} == {
        "arn:aws:s3:::acme-jiralake/jiralake/*"
    }


def test_the_moto_translation_only_adds_the_batch_names() -> None:
    # GIVEN the consumer's policy as moto gets it
    document = for_moto(load("consumer"))
    # THEN each statement gained exactly the batch names of its single-message SQS actions
    added = grants(document) - grants(load("consumer"))
    assert added == {
        ("sqs:DeleteMessageBatch", QUEUE),
        ("sqs:ChangeMessageVisibilityBatch", QUEUE),
        ("sqs:SendMessageBatch", DLQ),
        ("sqs:ChangeMessageVisibilityBatch", DLQ),
    }


def test_the_readme_explains_every_policy() -> None:
    readme = (IAM_DIR / "README.md").read_text()
    for role in ROLES:
        assert f"`{role}.json`" in readme
    for placeholder in PLACEHOLDERS:
        assert "${" + placeholder + "}" in readme
    assert sorted(p.stem for p in IAM_DIR.glob("*.json")) == sorted(ROLES)


# -- an IAM-enforcing moto server --


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class World:
    aws: AwsSettings
    queues: QueueSettings
    bucket: str
    admin: Keys
    roles: dict[str, Keys]
    # One botocore session per identity: a session loads the service models once and resolves the
    # credential chain once (see as_role).
    sessions: dict[str, aioboto3.Session] = field(default_factory=dict)

    @property
    def pair(self) -> QueuePair:
        return QueuePair(queue_url=self.queues.queue_url, dlq_url=self.queues.dlq_url)

    def session(self, identity: str) -> aioboto3.Session:
        if identity not in self.sessions:
            self.sessions[identity] = (
                aioboto3.Session(
                    aws_access_key_id=self.admin.access_key_id,
                    aws_secret_access_key=self.admin.secret_access_key,
                    region_name=REGION,
                )
                if identity == ADMIN
                # A role's session reads its keys from the environment, where as_role puts them.
                else aioboto3.Session()
            )
        return self.sessions[identity]

    def admin_client(self, service: str) -> Any:
        """A client signed with the test admin's keys (untyped: one helper for every service)."""
        session: Any = self.session(ADMIN)
        return session.client(service, endpoint_url=self.aws.endpoint_url)


async def create_user(iam: Any, name: str, policy: dict[str, Any]) -> Keys:
    """An IAM user with one inline policy, and its access key: three IAM calls."""
    await iam.create_user(UserName=name)
    await iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = (await iam.create_access_key(UserName=name))["AccessKey"]
    return Keys(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture(scope="module")
async def iam_world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    server = LocalAws(
        extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_CALLS)},
        log_path=tmp_path_factory.mktemp("moto-iam") / "moto.log",
    )
    with server:
        endpoint = server.endpoint_url
        # The only unauthenticated calls: the test admin.
        unknown = aioboto3.Session(
            aws_access_key_id="bootstrap", aws_secret_access_key="x", region_name=REGION
        )
        async with unknown.client("iam", endpoint_url=endpoint) as iam:
            admin = await create_user(iam, "jiralake-test-admin", ADMIN_POLICY)
        world = World(
            aws=AwsSettings(region=REGION, endpoint_url=endpoint),
            queues=QueueSettings(queue_url="(made below)", dlq_url="(made below: dlq)"),
            bucket=BUCKET,
            admin=admin,
            roles={},
        )
        async with world.admin_client("sqs") as sqs, world.admin_client("s3") as s3:
            pair = await provision.ensure_queues(
                sqs,
                queue_name="jiralake-iam.fifo",
                dlq_name="jiralake-iam-dlq.fifo",
                max_receive_count=5,
                visibility_timeout_s=30,
            )
            # Tests don't wait 20 s on an empty queue unless they ask to.
            await sqs.set_queue_attributes(
                QueueUrl=pair.queue_url, Attributes={"ReceiveMessageWaitTimeSeconds": "0"}
            )
            await provision.ensure_bucket(s3, BUCKET, REGION)
            values = {
                "QueueArn": await queue_arn(sqs, pair.queue_url),
                "DlqArn": await queue_arn(sqs, pair.dlq_url),
                "BucketArn": f"arn:aws:s3:::{BUCKET}",
                "ExportPrefix": f"{EXPORT_PREFIX}/",
            }
        async with world.admin_client("iam") as iam:
            roles = {
                role: await create_user(iam, f"jiralake-{role}", for_moto(render(role, values)))
                for role in ROLES
            }
        yield replace(world, queues=QueueSettings(pair.queue_url, pair.dlq_url), roles=roles)


async def queue_arn(sqs: Any, url: str) -> str:
    arn: str = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"][
        "QueueArn"
    ]
    return arn


@pytest.fixture
async def world(iam_world: World) -> World:
    """The module's server with both queues drained by the admin before the test (not purged: moto, as
    SQS, allows one PurgeQueue per queue a minute, and the operator's test purges the DLQ)."""
    await drain_queue(iam_world, iam_world.queues.queue_url, iam_world.queues.dlq_url)
    return iam_world


@pytest.fixture
def as_role(world: World, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Put a role's keys where the standard AWS credential chain looks first: the environment."""

    def switch(role: str) -> None:
        keys = world.roles[role]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys.secret_access_key)
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_REGION", REGION)
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        assert world.aws.endpoint_url is not None
        monkeypatch.setenv("AWS_ENDPOINT_URL", world.aws.endpoint_url)
        # A process has one role, and botocore resolves the credential chain once per session: each
        # role gets its own session, which resolves the chain from the environment just set.
        monkeypatch.setattr(aws, "_SESSION", world.session(role))

    return switch


async def drain_queue(world: World, *urls: str) -> list[dict[str, Any]]:
    """Every visible message on the queues, received and deleted by the admin."""
    messages: list[dict[str, Any]] = []
    async with world.admin_client("sqs") as sqs:
        for url in urls:
            while batch := (
                await sqs.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
                )
            ).get("Messages", []):
                messages.extend(batch)
                await sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)
                    ],
                )
    return messages


async def queue_counts(world: World, url: str) -> tuple[int, int]:
    """(visible, in flight), as the admin sees them."""
    async with world.admin_client("sqs") as sqs:
        attrs = (
            await sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
        )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


async def admin_send(world: World, url: str, entries: list[dict[str, Any]]) -> None:
    async with world.admin_client("sqs") as sqs:
        resp = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert not resp.get("Failed"), resp["Failed"]


_NOT_AUTHORIZED = re.compile(r"not authorized to perform: ([\w:]+)")


def refusal(exc: ClientError) -> str:
    """What moto refused. SQS names the action (``sqs:ReceiveMessage``); S3 says ``AccessDenied`` only.

    moto answers an SQS refusal with an XML error to a JSON-protocol client, so botocore reports the
    code as "403" with the XML as its message; the code is read from there.
    """
    error = exc.response.get("Error", {})
    message = str(error.get("Message", ""))
    if error.get("Code") == "AccessDenied" or "<Code>AccessDenied</Code>" in message:
        named = _NOT_AUTHORIZED.search(message)
        return named.group(1) if named else "AccessDenied"
    return f"not a refusal: {error}"


def sqs_error_counts() -> dict[str, float]:
    """``jiralake_sqs_requests_total{outcome="error"}`` per operation that had any (the services
    expose every operation's error series at 0 from the start)."""
    return {
        sample.labels["operation"]: sample.value
        for metric in REGISTRY.collect()
        if metric.name == "jiralake_sqs_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("outcome") == "error" and sample.value
    }


# -- enforcement is on --


async def test_moto_refuses_keys_that_are_no_iam_users(world: World) -> None:
    # GIVEN keys no IAM user has (the module's bootstrap allowance is used up)
    session = aioboto3.Session(aws_access_key_id="nobody", aws_secret_access_key="x", region_name=REGION)
    # WHEN they read a queue attribute
    async with session.client("sqs", endpoint_url=world.aws.endpoint_url) as sqs:
        with pytest.raises(ClientError) as refused:
            await sqs.get_queue_attributes(QueueUrl=world.queues.queue_url, AttributeNames=["QueueArn"])
    # THEN moto refuses the keys themselves
    assert "InvalidClientTokenId" in str(refused.value)


# -- each role's real code paths, with exactly its policy --


async def test_receiver_enqueues_a_webhook_and_is_ready(world: World, as_role: Callable[[str], None]) -> None:
    # GIVEN the receiver's credentials
    as_role("receiver")
    body = raw(CREATED)
    # WHEN Jira posts a signed webhook and a probe asks /readyz (GetQueueAttributes)
    async with running(receiver_settings(world.aws, world.queues.queue_url)) as client:
        status, answer, _ = await post(client, body)
        async with client.get("/readyz") as ready:
            readiness = (ready.status, await ready.json())
    # THEN the webhook is accepted (SendMessageBatch) and the receiver is ready
    assert (status, answer["status"]) == (202, "accepted")
    assert readiness == (200, {"status": "ready"})
    # AND the event is on the queue exactly as sent
    assert [m["Body"] for m in await drain_queue(world, world.queues.queue_url)] == [body.decode()]


async def test_consumer_applies_extends_dead_letters_deletes_and_gauges(
    world: World, as_role: Callable[[str], None], pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN a good event and a message that is not an envelope on the queue
    good = envelope_of(make_event(CREATED, issue_id=41, ts=1000))
    await admin_send(world, world.queues.queue_url, [good.send_entry("0")])
    await admin_send(
        world,
        world.queues.queue_url,
        [
            {
                "Id": "0",
                "MessageBody": "not json",
                "MessageGroupId": "stray",
                "MessageDeduplicationId": "stray-41",
            }
        ],
    )
    # AND the tables locked, so the batch runs long enough for the visibility extender to renew it
    await pg.execute("BEGIN; LOCK TABLE ap_jira_task, ap_jira_task_event IN SHARE MODE")
    # AND the dead-letter gauges reset, so only this run can set them
    QUEUE_MESSAGES.labels("dlq", "visible").set(-1)
    with contextlib.suppress(KeyError):
        QUEUE_OLDEST_AGE_SECONDS.remove("dlq")
    errors_before = sqs_error_counts()
    as_role("consumer")
    settings = consumer_settings(
        world.aws, world.pair, db_settings, visibility_timeout_s=1, queue_stats_interval_s=0.2
    )
    # WHEN the consumer service runs, with its queue-depth poller
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(run_consumer(settings, stop), name="iam-consumer")
        try:
            await wait_for(
                holds(lambda: any(e["event"] == "visibility_extended" for e in logs)),
                what="the visibility extender (ChangeMessageVisibilityBatch on the queue)",
            )
            await pg.execute("COMMIT")
            await wait_for(holds(_dlq_gauged), what="the dead-letter gauges (peek of the DLQ)")
            await wait_for(lambda: _has_row(pg, 41), what="the event applied")
        finally:
            if pg.is_in_transaction():
                await pg.execute("ROLLBACK")
            stop.set()
            await asyncio.wait_for(task, timeout=30)
    # THEN no SQS call failed: the extension, the dead-lettering and the deletes were all allowed
    assert sqs_error_counts() == errors_before
    assert {e["event"] for e in logs if e["log_level"] in ("warning", "error")} == {"message_dead_lettered"}
    # AND the good event is applied, the stray one is in the DLQ with its reason, the queue is empty
    assert [tuple(r) for r in await pg.fetch("SELECT issue_id, version FROM ap_jira_task")] == [(41, 1000)]
    [dead] = await drain_queue(world, world.queues.dlq_url)
    assert (dead["Body"], dead["MessageAttributes"]["error_class"]["StringValue"]) == (
        "not json",
        "InvalidEnvelope",
    )
    assert await queue_counts(world, world.queues.queue_url) == (0, 0)


def _dlq_gauged() -> bool:
    visible = REGISTRY.get_sample_value("jiralake_queue_messages", {"queue": "dlq", "state": "visible"})
    age = REGISTRY.get_sample_value("jiralake_queue_oldest_message_age_seconds", {"queue": "dlq"})
    return visible == 1 and age is not None


async def _has_row(pg: asyncpg.Connection, issue_id: int) -> bool:
    return bool(await pg.fetchval("SELECT count(*) FROM ap_jira_task WHERE issue_id = $1", issue_id))


async def test_exporter_writes_copies_and_aborts_under_its_prefix(
    world: World, as_role: Callable[[str], None], pg: asyncpg.Connection, db_settings: DatabaseSettings
) -> None:
    # GIVEN rows to export and the exporter's credentials
    await insert_awkward_rows(pg, 20)
    as_role("exporter")
    settings = make_settings(world.aws, db_settings, world.bucket)
    assert settings.prefix == EXPORT_PREFIX

    def fail_after_a_part(progress: ProgressSnapshot) -> None:
        if progress.parts_stored:
            raise RuntimeError("failed after a part was stored")

    # WHEN it exports with a single CopyObject to latest/, then with a part-by-part copy
    # (CreateMultipartUpload, UploadPartCopy, CompleteMultipartUpload), then fails mid-upload
    first = await export_once(settings, clock=lambda: EXPORT_DAY)
    second = await export_once(replace(settings, single_copy_max_bytes=1), clock=lambda: EXPORT_DAY)
    with pytest.raises(ExportError, match="RuntimeError: failed after a part was stored"):
        await export_once(settings, clock=lambda: EXPORT_DAY, on_progress=fail_after_a_part)
    # THEN both exports stored their objects and manifests under the prefix
    assert (first.rows, second.rows) == (20, 20)
    root = f"{EXPORT_PREFIX}/ap_jira_task"
    async with world.admin_client("s3") as s3:
        listed = await s3.list_objects_v2(Bucket=world.bucket)
        keys = sorted(o["Key"] for o in listed.get("Contents", []))
        # AND the failed upload was aborted (AbortMultipartUpload allowed): none is left open
        uploads = (await s3.list_multipart_uploads(Bucket=world.bucket)).get("Uploads", [])
        latest = await s3.get_object(Bucket=world.bucket, Key=f"{root}/latest/ap_jira_task.csv")
        async with latest["Body"] as stream:
            latest_bytes = await stream.read()
    assert keys == [
        f"{root}/history/dt=2024-05-10/_manifest.json",
        f"{root}/history/dt=2024-05-10/ap_jira_task.csv",
        f"{root}/latest/_manifest.json",
        f"{root}/latest/ap_jira_task.csv",
    ]
    assert uploads == []
    assert len(latest_bytes) == second.bytes
    statuses = [r["status"] for r in await pg.fetch("SELECT status FROM jiralake_export_run ORDER BY run_id")]
    assert statuses == ["succeeded", "succeeded", "failed"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``cli.main`` configures structlog for the captured stderr; put the suite's setup back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("restore_logging")
def test_operator_runs_queue_stats_and_dlq_list_replay_purge(
    world: World,
    as_role: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN two dead-lettered events of one issue, and the on-call operator's credentials
    issue = "10051"
    letters = [envelope_of(make_event(CREATED, issue_id=issue, ts=1_700_000_051_000 + i)) for i in range(2)]
    asyncio.run(admin_send(world, world.queues.dlq_url, [_dead_letter_entry(e) for e in letters]))
    as_role("operator")
    monkeypatch.setenv("JIRALAKE_QUEUE_URL", world.queues.queue_url)
    monkeypatch.setenv("JIRALAKE_DLQ_URL", world.queues.dlq_url)

    # WHEN queue stats runs: GetQueueAttributes on both queues, a peek of the DLQ for its age
    assert cli.main(["queue", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["queues"]
    # THEN it sees both queues and dates the DLQ's oldest message
    assert [(q["queue"], q["visible"], q["in_flight"]) for q in stats] == [("main", 0, 0), ("dlq", 2, 0)]
    assert stats[1]["oldest_age_s"] is not None

    # WHEN dlq list runs: receive from the DLQ, visibility back to 0
    assert cli.main(["dlq", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    # THEN it lists both
    assert [m["issue_id"] for m in listed["messages"]] == [issue, issue]

    # WHEN dlq replay runs: send to the queue, delete from the DLQ
    assert cli.main(["dlq", "replay"]) == 0
    # THEN both went back to the queue, in order
    assert capsys.readouterr().out.strip() == "replayed 2, skipped 0, failed 0"
    replayed = asyncio.run(drain_queue(world, world.queues.queue_url))
    assert [m["Body"] for m in replayed] == [e.body for e in letters]

    # WHEN a new dead letter arrives and dlq purge --yes runs
    asyncio.run(admin_send(world, world.queues.dlq_url, [_dead_letter_entry(letters[0], dedup="again")]))
    assert cli.main(["dlq", "purge", "--yes"]) == 0
    # THEN the DLQ is empty
    assert capsys.readouterr().out.strip() == f"purged {world.queues.dlq_url} (it held about 1 message(s))"
    assert asyncio.run(queue_counts(world, world.queues.dlq_url)) == (0, 0)


def _dead_letter_entry(envelope: Envelope, *, dedup: str | None = None) -> dict[str, Any]:
    """What the consumer puts on the DLQ: the envelope plus the four error attributes."""
    entry = envelope.send_entry("0", dedup_id=dedup)
    entry["Id"] = str(envelope.event_ts_ms)
    entry["MessageAttributes"] = {
        **entry["MessageAttributes"],
        **error_attributes(
            error_class="InvalidEvent",
            error_message="cannot apply",
            failed_at_iso="2026-01-02T03:04:05Z",
            original_group_id=envelope.group_id,
        ),
    }
    return entry


async def test_backfill_enqueues_envelopes(world: World, as_role: Callable[[str], None]) -> None:
    # GIVEN three snapshots and backfill's credentials
    envelopes = [envelope_of(make_event(CREATED, issue_id=issue, ts=5000)) for issue in (61, 62, 63)]
    as_role("backfill")
    # WHEN backfill's enqueue learns what the queue takes and sends them (the path of backfill and
    # reconcile alike)
    async with aws.sqs_client(world.aws) as sqs:
        limit = await max_entry_bytes(sqs, world.queues.queue_url)
        outcome = await send_envelopes(sqs, world.queues.queue_url, envelopes, max_bytes=limit)
    # THEN it read the queue's limit (1 MiB, less the room kept for dead-letter reasons) and SQS
    # stored all three
    assert limit == MAX_MESSAGE_BYTES - DEAD_LETTER_ROOM_BYTES
    assert (outcome.sent, outcome.refused) == (3, [])
    stored = await drain_queue(world, world.queues.queue_url)
    assert sorted(m["Body"] for m in stored) == sorted(e.body for e in envelopes)


# -- and nothing more --


def on_queue(**extra: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"QueueUrl": w.queues.queue_url, **extra}


def on_dlq(**extra: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"QueueUrl": w.queues.dlq_url, **extra}


def in_bucket(**extra: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: {"Bucket": w.bucket, **extra}


PROBE_MESSAGE = {"MessageBody": "{}", "MessageGroupId": "probe", "MessageDeduplicationId": "probe"}
LATEST_EXPORT = f"{EXPORT_PREFIX}/ap_jira_task/latest/ap_jira_task.csv"

# role, what it tries, the IAM action that refuses it, the client method and its arguments
DENIED: list[tuple[str, str, str, str, Callable[[World], dict[str, Any]]]] = [
    ("receiver", "receive from the queue", "sqs:ReceiveMessage", "receive_message", on_queue()),
    ("receiver", "delete from the queue", "sqs:DeleteMessage", "delete_message", on_queue(ReceiptHandle="x")),
    ("receiver", "send to the DLQ", "sqs:SendMessage", "send_message", on_dlq(**PROBE_MESSAGE)),
    ("receiver", "purge the queue", "sqs:PurgeQueue", "purge_queue", on_queue()),
    ("receiver", "write an export", "s3:PutObject", "put_object", in_bucket(Key=LATEST_EXPORT, Body=b"x")),
    ("consumer", "send to the queue", "sqs:SendMessage", "send_message", on_queue(**PROBE_MESSAGE)),
    ("consumer", "delete from the DLQ", "sqs:DeleteMessage", "delete_message", on_dlq(ReceiptHandle="x")),
    ("consumer", "purge the DLQ", "sqs:PurgeQueue", "purge_queue", on_dlq()),
    (
        "consumer",
        "reconfigure the queue",
        "sqs:SetQueueAttributes",
        "set_queue_attributes",
        on_queue(Attributes={"VisibilityTimeout": "1"}),
    ),
    ("consumer", "write an export", "s3:PutObject", "put_object", in_bucket(Key=LATEST_EXPORT, Body=b"x")),
    ("exporter", "send to the queue", "sqs:SendMessage", "send_message", on_queue(**PROBE_MESSAGE)),
    ("exporter", "receive from the queue", "sqs:ReceiveMessage", "receive_message", on_queue()),
    (
        "exporter",
        "write outside its prefix",
        "s3:PutObject",
        "put_object",
        in_bucket(Key="elsewhere/probe", Body=b"x"),
    ),
    ("exporter", "list the bucket", "s3:ListBucket", "list_objects_v2", in_bucket()),
    ("exporter", "delete an export", "s3:DeleteObject", "delete_object", in_bucket(Key=LATEST_EXPORT)),
    ("operator", "receive from the queue", "sqs:ReceiveMessage", "receive_message", on_queue()),
    ("operator", "delete from the queue", "sqs:DeleteMessage", "delete_message", on_queue(ReceiptHandle="x")),
    ("operator", "purge the queue", "sqs:PurgeQueue", "purge_queue", on_queue()),
    (
        "operator",
        "create a queue (setup)",
        "sqs:CreateQueue",
        "create_queue",
        lambda w: {"QueueName": "probe.fifo", "Attributes": {"FifoQueue": "true"}},
    ),
    (
        "operator",
        "reconfigure the queue (setup)",
        "sqs:SetQueueAttributes",
        "set_queue_attributes",
        on_queue(Attributes={"VisibilityTimeout": "1"}),
    ),
    ("operator", "read an export", "s3:GetObject", "get_object", in_bucket(Key=LATEST_EXPORT)),
    ("backfill", "send to the DLQ", "sqs:SendMessage", "send_message", on_dlq(**PROBE_MESSAGE)),
    ("backfill", "receive from the queue", "sqs:ReceiveMessage", "receive_message", on_queue()),
    (
        "backfill",
        "read the DLQ's attributes",
        "sqs:GetQueueAttributes",
        "get_queue_attributes",
        on_dlq(AttributeNames=["All"]),
    ),
    ("backfill", "write an export", "s3:PutObject", "put_object", in_bucket(Key=LATEST_EXPORT, Body=b"x")),
]


@pytest.mark.parametrize(
    ("role", "action", "method", "arguments"),
    [(role, action, method, arguments) for role, _, action, method, arguments in DENIED],
    ids=[f"{role} may not {what}" for role, what, _, _, _ in DENIED],
)
async def test_a_role_is_refused_what_it_does_not_need(
    world: World,
    as_role: Callable[[str], None],
    role: str,
    action: str,
    method: str,
    arguments: Callable[[World], dict[str, Any]],
) -> None:
    # GIVEN a role's credentials
    as_role(role)
    service = action.split(":")[0]
    # WHEN it calls something outside its policy
    with pytest.raises(ClientError) as refused:
        if service == "sqs":
            async with aws.sqs_client(world.aws) as sqs:
                await getattr(sqs, method)(**arguments(world))
        else:
            async with aws.s3_client(world.aws) as s3:
                await getattr(s3, method)(**arguments(world))
    # THEN moto refuses it: SQS names the action, S3 only says AccessDenied
    assert refusal(refused.value) == (action if service == "sqs" else "AccessDenied")
