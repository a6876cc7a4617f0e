"""deploy/terraform/: ``terraform fmt`` where terraform is installed, and, everywhere, the structure the
"infrastructure as code" issue asks for, read from the parsed HCL (python-hcl2): FIFO queue and DLQ
with SSE and a redrive policy, the bucket's protections and lifecycle rule, one role per process whose
policy is the matching deploy/iam/*.json, the alarms, and documented variables and outputs.

The provider registry is not reachable here. Where a local provider mirror holds an older aws provider
(``TF_PLUGIN_DIR``, or /opt/tf-plugins on the development machine), ``terraform validate`` runs against
it on a copy whose provider pin and SQS message size are lowered to what that provider accepts;
everything else is checked as written."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from consumer.settings import ConsumerSettings
from ops.setup import SetupSettings
from shared.provision import MAX_MESSAGE_BYTES, RETENTION_S

ROOT = Path(__file__).resolve().parent.parent
TF = ROOT / "deploy" / "terraform"
IAM = ROOT / "deploy" / "iam"
TF_README = TF / "README.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _clean(node: Any) -> Any:
    """python-hcl2's output without its bookkeeping keys, with labels and string literals unquoted."""
    if isinstance(node, dict):
        return {_unquote(k): _clean(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    if isinstance(node, str):
        return _unquote(node)
    return node


def _unquote(text: str) -> str:
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    return text


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        loaded: dict[str, Any] = _clean(hcl2.load(f))
    return loaded


@cache
def config() -> dict[str, list[Any]]:
    """Every top-level block of every .tf file, by block type."""
    blocks: dict[str, list[Any]] = {}
    for path in sorted(TF.glob("*.tf")):
        for kind, items in _load(path).items():
            blocks.setdefault(kind, []).extend(items)
    return blocks


def labelled(kind: str) -> dict[str, dict[str, Any]]:
    """Blocks with one label (variable, output): name -> body."""
    return {name: body for item in config().get(kind, []) for name, body in item.items()}


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (rtype, name): body
        for item in config()["resource"]
        for rtype, named in item.items()
        for name, body in named.items()
    }


def resource(rtype: str, name: str) -> dict[str, Any]:
    found = resources().get((rtype, name))
    assert found is not None, f"deploy/terraform declares no {rtype}.{name}"
    return found


def locals_() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for block in config()["locals"]:
        merged.update(block)
    return merged


def variables() -> dict[str, dict[str, Any]]:
    return labelled("variable")


def default(name: str) -> Any:
    return variables()[name]["default"]


def test_a_name_is_short_enough_for_every_role_name_built_from_it() -> None:
    # IAM role names stop at 64 characters; each role is named <name>-<role> (iam.tf).
    [rule] = variables()["name"]["validation"]
    pattern = re.search(r'regex\("(.+?)", var\.name\)', rule["condition"])
    assert pattern is not None
    longest_suffix = max(len(f"-{role}") for role in iam_roles_in_config())
    longest_name = "n" * (64 - longest_suffix)
    assert re.fullmatch(pattern[1], longest_name)
    assert not re.fullmatch(pattern[1], longest_name + "n")


def iam_roles_in_config() -> set[str]:
    """The role names iam.tf builds (each names its policy file deploy/iam/<name>.json)."""
    names = set()
    for key in ("workload_roles", "operator_roles"):
        names |= set(re.findall(r'"(\w+)"', locals_()[key]))
    return names


# -- terraform itself --


def test_terraform_fmt() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not on PATH: `terraform fmt -check` not run (the HCL structure is checked)")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", str(TF)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"terraform fmt -check failed:\n{result.stdout}\n{result.stderr}"


def _mirrored_aws_versions(plugin_dir: Path) -> list[str]:
    return sorted(p.name for p in (plugin_dir / "registry.terraform.io" / "hashicorp" / "aws").glob("*"))


def test_terraform_validates_and_applies_with_a_mock_provider(tmp_path: Path) -> None:
    """``terraform validate``, then ``terraform test`` (deploy/terraform/tests/: applies with a mock
    provider, values known), against a local provider mirror: offline, no AWS account."""
    terraform = shutil.which("terraform")
    plugin_dir = Path(os.environ.get("TF_PLUGIN_DIR", "/opt/tf-plugins"))
    if terraform is None or not plugin_dir.is_dir() or not _mirrored_aws_versions(plugin_dir):
        pytest.skip("terraform or a local aws provider mirror (TF_PLUGIN_DIR) is missing: validate not run")
    version = _mirrored_aws_versions(plugin_dir)[-1]
    shutil.copytree(TF.parent, tmp_path / "deploy")  # the policies in deploy/iam/ come along
    copy = tmp_path / "deploy" / "terraform"
    shutil.rmtree(copy / ".terraform", ignore_errors=True)
    versions = (copy / "versions.tf").read_text()
    sqs = (copy / "sqs.tf").read_text()
    assert '"~> 6.8"' in versions and "max_message_size_bytes = 1048576" in sqs
    if not version.startswith("6."):  # 5.x caps SQS messages at 256 KiB: the only 6.x-only value used
        (copy / "versions.tf").write_text(versions.replace('"~> 6.8"', f'"= {version}"'))
        (copy / "sqs.tf").write_text(
            sqs.replace("max_message_size_bytes = 1048576", "max_message_size_bytes = 262144")
        )
    env = {
        **os.environ,
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
        "TF_CLI_CONFIG_FILE": "/dev/null",
    }
    outputs = {}
    for command in (
        ["init", "-backend=false", "-input=false", f"-plugin-dir={plugin_dir}"],
        ["validate"],
        ["test"],
    ):
        result = subprocess.run(
            [terraform, f"-chdir={copy}", *command, "-no-color"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        assert result.returncode == 0, f"terraform {command[0]} failed:\n{result.stdout}\n{result.stderr}"
        outputs[command[0]] = result.stdout
    assert "The configuration is valid" in outputs["validate"]
    assert "Success! 3 passed, 0 failed." in outputs["test"]


def test_versions_pin_terraform_and_the_aws_provider() -> None:
    (block,) = config()["terraform"]
    assert block["required_version"] == ">= 1.5"
    (providers,) = block["required_providers"]
    # 6.8.0 is the first provider accepting a 1 MiB max_message_size (see versions.tf).
    assert providers["aws"] == {"source": "hashicorp/aws", "version": "~> 6.8"}


# -- SQS --


def test_queue_and_dlq_are_fifo_with_sse_and_explicit_deduplication() -> None:
    assert locals_()["queue_name"] == "${var.name}.fifo"
    assert locals_()["dlq_name"] == "${var.name}-dlq.fifo"
    assert locals_()["sqs_sse_kms"] == "${var.sqs_kms_key_arn != null}"
    assert locals_()["max_message_size_bytes"] == MAX_MESSAGE_BYTES
    assert locals_()["message_retention_s"] == RETENTION_S
    for name, queue_name in (("main", "${local.queue_name}"), ("dlq", "${local.dlq_name}")):
        queue = resource("aws_sqs_queue", name)
        assert queue["name"] == queue_name
        assert queue["fifo_queue"] is True
        # The receiver, backfill, dead-lettering and replay all send MessageDeduplicationId.
        assert queue["content_based_deduplication"] is False
        assert queue["max_message_size"] == "${local.max_message_size_bytes}"
        assert queue["message_retention_seconds"] == "${local.message_retention_s}"
        assert queue["sqs_managed_sse_enabled"] == "${local.sqs_sse_kms ? null : true}"
        assert queue["kms_master_key_id"] == "${var.sqs_kms_key_arn}"
    assert default("sqs_kms_key_arn") is None


def test_high_throughput_mode_is_an_option_off_by_default() -> None:
    main = resource("aws_sqs_queue", "main")
    assert main["deduplication_scope"] == '${var.high_throughput_fifo ? "messageGroup" : "queue"}'
    assert main["fifo_throughput_limit"] == '${var.high_throughput_fifo ? "perMessageGroupId" : "perQueue"}'
    assert default("high_throughput_fifo") is False


def test_redrive_policy_points_at_the_dlq_which_only_the_main_queue_may_use() -> None:
    redrive = resource("aws_sqs_queue", "main")["redrive_policy"]
    assert re.fullmatch(
        r"\$\{jsonencode\(\{deadLetterTargetArn = aws_sqs_queue\.dlq\.arn, "
        r"maxReceiveCount = var\.max_receive_count\}\)\}",
        redrive,
    ), redrive
    assert "redrive_policy" not in resource("aws_sqs_queue", "dlq")
    allow = resource("aws_sqs_queue_redrive_allow_policy", "dlq")
    assert allow["queue_url"] == "${aws_sqs_queue.dlq.id}"
    assert allow["redrive_allow_policy"] == (
        '${jsonencode({redrivePermission = "byQueue", sourceQueueArns = [aws_sqs_queue.main.arn]})}'
    )
    setup_default = {f.name: f.default for f in dataclasses.fields(SetupSettings)}["max_receive_count"]
    assert default("max_receive_count") == setup_default


def test_visibility_timeout_matches_the_consumer() -> None:
    main = resource("aws_sqs_queue", "main")
    assert main["visibility_timeout_seconds"] == "${var.visibility_timeout_s}"
    consumer_default = {f.name: f.default for f in dataclasses.fields(ConsumerSettings)}[
        "visibility_timeout_s"
    ]
    assert default("visibility_timeout_s") == consumer_default
    assert main["receive_wait_time_seconds"] == 20


# -- S3 --


def test_bucket_is_versioned_encrypted_private_and_owner_enforced() -> None:
    for rtype in (
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_ownership_controls",
        "aws_s3_bucket_lifecycle_configuration",
        "aws_s3_bucket_policy",
    ):
        assert resource(rtype, "exports")["bucket"] == "${aws_s3_bucket.exports.id}", rtype
    assert resource("aws_s3_bucket", "exports")["bucket"] == "${var.bucket_name}"

    versioning = resource("aws_s3_bucket_versioning", "exports")
    assert versioning["versioning_configuration"] == [{"status": "Enabled"}]

    (sse_rule,) = resource("aws_s3_bucket_server_side_encryption_configuration", "exports")["rule"]
    assert sse_rule["apply_server_side_encryption_by_default"] == [
        {
            "sse_algorithm": '${local.s3_sse_kms ? "aws:kms" : "AES256"}',
            "kms_master_key_id": "${var.s3_kms_key_arn}",
        }
    ]
    assert locals_()["s3_sse_kms"] == "${var.s3_kms_key_arn != null}"
    assert default("s3_kms_key_arn") is None

    block = resource("aws_s3_bucket_public_access_block", "exports")
    flags = ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    assert {flag: block.get(flag) for flag in flags} == dict.fromkeys(flags, True)

    ownership = resource("aws_s3_bucket_ownership_controls", "exports")
    assert ownership["rule"] == [{"object_ownership": "BucketOwnerEnforced"}]


def test_lifecycle_aborts_incomplete_multipart_uploads_bucket_wide() -> None:
    lifecycle = resource("aws_s3_bucket_lifecycle_configuration", "exports")
    aborting = [rule for rule in lifecycle["rule"] if "abort_incomplete_multipart_upload" in rule]
    assert aborting == [
        {
            "id": "abort-incomplete-multipart-uploads",
            "status": "Enabled",
            "filter": [{}],
            "abort_incomplete_multipart_upload": [
                {"days_after_initiation": "${var.abort_incomplete_multipart_upload_days}"}
            ],
        }
    ]
    assert default("abort_incomplete_multipart_upload_days") == 1


def test_history_expiry_covers_the_exporters_table_folders() -> None:
    from exporter.layout import ExportLayout
    from exporter.settings import ExportFormat

    folders = {ExportLayout(bucket="b", prefix="", format=f).table_folder for f in ExportFormat}
    assert set(default("export_table_folders")) == folders
    assert default("history_expiration_days") is None
    expiring = locals_()["expiring_folders"]
    assert 'prefix = "${local.export_prefix_path}${folder}/history/"' in expiring
    assert 'prefix = "${local.export_prefix_path}${folder}/changes/"' in expiring


def test_cross_account_exporter_gets_the_exporter_policy_from_the_bucket_policy() -> None:
    assert default("exporter_role_arn_cross_account") is None
    statements = locals_()["cross_account_exporter_statements"]
    assert 'jsondecode(local.role_policies["exporter"]).Statement' in statements
    assert "Principal = {AWS = var.exporter_role_arn_cross_account}" in statements
    policy = resource("aws_s3_bucket_policy", "exports")["policy"]
    assert "local.cross_account_exporter_statements" in policy


# -- IAM --


def test_each_role_policy_is_its_deploy_iam_file_filled_in() -> None:
    roles = iam_roles_in_config()
    # Every shipped policy has its role, and every role its policy file.
    assert roles == {path.stem for path in IAM.glob("*.json")}
    assert {"receiver", "consumer", "exporter"} <= set(
        re.findall(r'"(\w+)"', locals_()["workload_roles"].split("var.create_backfill_role")[0])
    )

    assert locals_()["iam_policy_dir"] == "${path.module}/../iam"
    assert (TF / ".." / "iam").resolve() == IAM
    assert locals_()["role_policies"] == (
        "${{for role in setunion(local.workload_roles, local.operator_roles) : "
        'role => templatefile("${local.iam_policy_dir}/${role}.json", local.iam_policy_vars)}}'
    )
    # templatefile() fails on a placeholder without a value: the values are exactly the placeholders.
    placeholders = {p for role in roles for p in _PLACEHOLDER.findall((IAM / f"{role}.json").read_text())}
    assert set(locals_()["iam_policy_vars"]) == placeholders

    for kind in ("workload", "operator"):
        role = resource("aws_iam_role", kind)
        policy = resource("aws_iam_role_policy", kind)
        assert role["for_each"] == policy["for_each"] == f"${{local.{kind}_roles}}"
        assert role["name"] == "${var.name}-${each.key}"
        assert policy["role"] == f"${{aws_iam_role.{kind}[each.key].id}}"
        assert policy["policy"] == "${local.role_policies[each.key]}"


def test_service_roles_trust_a_configurable_principal_ecs_by_default() -> None:
    assert default("trusted_service_principals") == ["ecs-tasks.amazonaws.com"]
    assert default("assume_role_policy_json") is None
    assert default("assume_role_policy_json_by_role") == {}
    # A role's own trust policy (IRSA: its service account only) wins over the shared one.
    assert resource("aws_iam_role", "workload")["assume_role_policy"] == (
        "${lookup(var.assume_role_policy_json_by_role, each.key, local.workload_trust_policy)}"
    )
    trust = locals_()["workload_trust_policy"]
    assert trust.startswith("${coalesce(var.assume_role_policy_json, jsonencode(")
    assert "Principal = {Service = var.trusted_service_principals}" in trust


# -- alarms --


def test_alarms_on_queue_depth_oldest_age_and_dlq_depth() -> None:
    alarms = {
        name: body for (rtype, name), body in resources().items() if rtype == "aws_cloudwatch_metric_alarm"
    }
    kinds = {
        (body["metric_name"], body["dimensions"]["QueueName"], body["threshold"]) for body in alarms.values()
    }
    assert kinds == {
        (
            "ApproximateNumberOfMessagesVisible",
            "${aws_sqs_queue.main.name}",
            "${var.queue_depth_alarm_threshold}",
        ),
        (
            "ApproximateAgeOfOldestMessage",
            "${aws_sqs_queue.main.name}",
            "${var.queue_oldest_message_age_alarm_threshold_s}",
        ),
        (
            "ApproximateNumberOfMessagesVisible",
            "${aws_sqs_queue.dlq.name}",
            "${var.dlq_depth_alarm_threshold}",
        ),
        (
            "ApproximateAgeOfOldestMessage",
            "${aws_sqs_queue.dlq.name}",
            "${var.dlq_oldest_message_age_alarm_threshold_s}",
        ),
    }
    for body in alarms.values():
        assert body["namespace"] == "AWS/SQS"
        assert body["comparison_operator"] == "GreaterThanThreshold"
        assert body["alarm_actions"] == "${var.alarm_sns_topic_arns}"
    assert default("alarm_sns_topic_arns") == []
    assert default("dlq_depth_alarm_threshold") == 0


def test_alarm_thresholds_match_the_prometheus_alerts() -> None:
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }

    def threshold(alert: str) -> int:
        match = re.search(r">\s*([\d\s*]+)$", rules[alert]["expr"].strip())
        assert match, rules[alert]["expr"]
        product = 1
        for factor in match.group(1).split("*"):
            product *= int(factor)
        return product

    assert default("queue_depth_alarm_threshold") == threshold("JiralakeQueueBacklog")
    assert f"{default('queue_depth_alarm_minutes')}m" == rules["JiralakeQueueBacklog"]["for"]
    assert default("dlq_depth_alarm_threshold") == threshold("JiralakeDeadLetterQueueNotEmpty")
    assert default("dlq_oldest_message_age_alarm_threshold_s") == threshold("JiralakeDeadLetterMessageOld")


# -- variables, outputs, docs --


def test_every_variable_has_a_type_and_a_description() -> None:
    assert variables()
    for name, body in variables().items():
        assert body.get("type"), f"variable {name} has no type"
        assert body.get("description", "").strip(), f"variable {name} has no description"


def test_every_output_has_a_description() -> None:
    outputs = labelled("output")
    assert {"queue_url", "queue_arn", "dlq_url", "dlq_arn", "bucket_name", "environment"} <= set(outputs)
    assert {"receiver_role_arn", "consumer_role_arn", "exporter_role_arn"} <= set(outputs)
    for name, body in outputs.items():
        assert body.get("description", "").strip(), f"output {name} has no description"


def test_environment_output_names_jiralakes_own_variables() -> None:
    environment = locals_()["environment"]
    assert environment["JIRALAKE_QUEUE_URL"] == "${aws_sqs_queue.main.url}"
    assert environment["JIRALAKE_DLQ_URL"] == "${aws_sqs_queue.dlq.url}"
    assert environment["JIRALAKE_BUCKET"] == "${aws_s3_bucket.exports.bucket}"
    documented = set(re.findall(r"^\| `(JIRALAKE_\w+)` \|", (ROOT / "README.md").read_text(), re.M))
    assert {name for name in environment if name.startswith("JIRALAKE_")} <= documented
    assert labelled("output")["environment"]["value"] == "${local.environment}"


def _readme_table_names(section: str) -> set[str]:
    text = TF_README.read_text()
    match = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"deploy/terraform/README.md has no '## {section}' section"
    return set(re.findall(r"^\| `(\w+)` \|", match.group(1), re.M))


def test_readme_documents_every_variable_and_output() -> None:
    assert _readme_table_names("Variables") == set(variables())
    assert _readme_table_names("Outputs") == set(labelled("output"))


def test_example_tfvars_sets_only_declared_variables_and_every_required_one() -> None:
    example = _load(TF / "example.tfvars")
    assert set(example) <= set(variables())
    required = {name for name, body in variables().items() if "default" not in body}
    assert required == {"bucket_name"}
    assert required <= set(example)
