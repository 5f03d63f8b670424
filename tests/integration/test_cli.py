"""The operator CLI (``python -m slidebridge``) against DynamoDB in moto, called in process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from slidebridge import cli
from slidebridge.errors import IllegalTransitionError
from slidebridge.runs import (
    ArtifactMetadata,
    InputArtifact,
    Item,
    ItemState,
    ItemTerminationReason,
    OutputArtifact,
    Run,
    RunSource,
    RunState,
    RunTerminationReason,
)
from slidebridge.settings import get_settings
from slidebridge.store import RunStore
from tests.integration.conftest import TABLE

PRESIGNED = (
    "https://slides.s3.eu-central-1.amazonaws.com/incoming/patient-4711/slide.svs"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
)
CALLBACK = "https://pacs.hospital.example:8443/SectraPathologyImport/callback?access=cb-secret-1"
CALLBACK_TOKEN = "sectra-callback-token-very-secret"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def new_run(
    store: RunStore,
    *,
    org: str = "org-a",
    items: int = 2,
    submitted_at: datetime | None = None,
    source: RunSource = RunSource.PLATFORM,
    vendor_context: dict[str, object] | None = None,
) -> Run:
    run = Run(
        application_id="he-tissue",
        version_number="1.0.0",
        organization_id=org,
        submitted_by="user-1",
        source=source,
        submitted_at=submitted_at or datetime.now(UTC),
        vendor_context=vendor_context or {},
    )
    return store.create_run(
        run,
        [
            Item(
                run_id=run.run_id,
                index=i,
                external_id=f"slide-{i}.svs",
                input_artifacts=[InputArtifact(name="whole_slide_image", download_url=PRESIGNED)],
            )
            for i in range(items)
        ],
    )


class RecordingLauncher:
    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str]] = []

    def submit(self, run_id: str, item_count: int) -> str:
        raise AssertionError("the CLI never submits jobs")

    def cancel(self, job_id: str, reason: str) -> None:
        self.cancelled.append((job_id, reason))


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch) -> RecordingLauncher:
    recording = RecordingLauncher()
    monkeypatch.setattr(cli, "launcher_from_settings", lambda settings: recording)
    return recording


# --- tokens -------------------------------------------------------------------------------------------


def test_create_prints_a_working_token_once_and_stores_only_its_hash(
    store: RunStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "tokens", "create", "--user", "alice", "--org", "org-a", "--label", "ci")

    assert code == 0
    token = out.strip()
    assert token.startswith("sb_") and len(token) > 40
    assert "cannot be recovered" in err and token not in err
    principal = store.authenticate(token)
    assert principal is not None
    assert (principal.user_id, principal.organization_id) == ("alice", "org-a")
    table = str(boto3.client("dynamodb").scan(TableName=TABLE)["Items"])
    assert token not in table
    assert token[len("sb_") + 6 :] not in table


def test_two_created_tokens_differ(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    _, first, _ = run_cli(capsys, "tokens", "create", "--user", "alice", "--org", "org-a")
    _, second, _ = run_cli(capsys, "tokens", "create", "--user", "alice", "--org", "org-a")
    assert first.strip() != second.strip()


def test_list_shows_one_organisations_tokens_or_all_without_their_values(
    store: RunStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, token_a, _ = run_cli(capsys, "tokens", "create", "--user", "alice", "--org", "org-a", "--label", "lab scanner")
    _, token_b, _ = run_cli(capsys, "tokens", "create", "--user", "bob", "--org", "org-b")
    store.register_api_token("a-token-given-from-outside-0123456789", user_id="local", organization_id="default")

    code, out, _ = run_cli(capsys, "tokens", "list", "--org", "org-a", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(t["user_id"], t["organization_id"], t["label"]) for t in listed] == [("alice", "org-a", "lab scanner")]
    assert listed[0]["prefix"] == token_a.strip()[:9]
    assert listed[0]["revoked_at"] is None

    _, out, _ = run_cli(capsys, "tokens", "list", "--all", "--json")
    assert sorted(t["user_id"] for t in json.loads(out)) == ["alice", "bob", "local"]
    assert token_a.strip() not in out and token_b.strip() not in out

    # Without --org: the deployment's default organisation.
    _, out, _ = run_cli(capsys, "tokens", "list")
    assert "local" in out and "alice" not in out and "bob" not in out
    assert "a-token-given-from-outside" not in out
    assert out.splitlines()[0].split() == ["TOKEN_ID", "PREFIX", "USER", "ORGANIZATION", "LABEL", "CREATED", "REVOKED"]


def test_listing_every_token_needs_no_scan(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_api_token(user_id="alice", organization_id="org-a")
    store.create_api_token(user_id="bob", organization_id="org-b")
    # Runs in the same table must not be read to list tokens either.
    new_run(store, org="org-a")

    def no_scan(**kwargs: object) -> None:
        raise AssertionError("listing tokens scanned the table")

    monkeypatch.setattr(store.client, "scan", no_scan)
    assert sorted(t.organization_id for t in store.list_api_tokens(None)) == ["org-a", "org-b"]


def test_revoked_token_no_longer_authenticates(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "tokens", "create", "--user", "alice", "--org", "org-a", "--json")
    created = json.loads(out)
    token = created["token"]
    other, _ = store.create_api_token(user_id="carol", organization_id="org-a")

    code, out, _ = run_cli(capsys, "tokens", "revoke", created["token_id"])

    assert code == 0
    assert created["token_id"] in out and "revoked" in out
    assert store.authenticate(token) is None
    assert store.authenticate(other) is not None
    _, out, _ = run_cli(capsys, "tokens", "list", "--org", "org-a", "--json")
    revoked = {t["token_id"]: t["revoked_at"] for t in json.loads(out)}
    assert revoked[created["token_id"]] is not None
    assert list(revoked.values()).count(None) == 1


def test_revoke_by_display_prefix_or_by_the_leaked_token_itself(
    store: RunStore, capsys: pytest.CaptureFixture[str]
) -> None:
    first, first_info = store.create_api_token(user_id="alice", organization_id="org-a")
    second, _ = store.create_api_token(user_id="bob", organization_id="org-b")

    assert run_cli(capsys, "tokens", "revoke", first_info.prefix)[0] == 0
    assert run_cli(capsys, "tokens", "revoke", second)[0] == 0

    assert store.authenticate(first) is None
    assert store.authenticate(second) is None


def test_revoking_twice_or_an_unknown_token_exits_1(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    _, info = store.create_api_token(user_id="alice", organization_id="org-a")
    assert run_cli(capsys, "tokens", "revoke", info.token_id)[0] == 0

    code, out, err = run_cli(capsys, "tokens", "revoke", info.token_id)
    assert (code, out) == (1, "")
    assert "already revoked" in err

    code, _, err = run_cli(capsys, "tokens", "revoke", "0123456789abcdef")
    assert code == 1
    assert "no API token" in err


def test_a_revoked_token_cannot_be_registered_again(store: RunStore) -> None:
    store.register_api_token("given-token-abcdefghijklmnop", user_id="local", organization_id="default")
    info = store.find_api_token("given-token-abcdefghijklmnop")
    store.revoke_api_token(info.token_id)

    with pytest.raises(IllegalTransitionError):
        store.register_api_token("given-token-abcdefghijklmnop", user_id="local", organization_id="default")
    assert store.authenticate("given-token-abcdefghijklmnop") is None


# --- runs ---------------------------------------------------------------------------------------------


def test_runs_list_shows_one_organisation_newest_first(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    start = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
    runs = [new_run(store, submitted_at=start + timedelta(minutes=i)) for i in range(3)]
    foreign = new_run(store, org="org-b", submitted_at=start + timedelta(minutes=10))
    store.transition_item(runs[1].run_id, 0, ItemState.PROCESSING)
    store.transition_item(runs[1].run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)

    code, out, _ = run_cli(capsys, "runs", "list", "--org", "org-a", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [r["run_id"] for r in listed] == [r.run_id for r in reversed(runs)]
    assert listed[1]["statistics"]["item_succeeded_count"] == 1
    assert listed[1]["state"] == "PROCESSING"
    assert listed[0]["submitted_at"] == "2025-05-01T08:02:00Z"

    _, out, _ = run_cli(capsys, "runs", "list", "--org", "org-a", "--limit", "2")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["RUN_ID", "SOURCE", "APPLICATION", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == [runs[2].run_id, runs[1].run_id]
    assert lines[2].split()[1:9] == ["platform", "he-tissue:1.0.0", "PROCESSING", "2", "1", "0", "0", "1"]
    assert foreign.run_id not in out


def test_runs_list_defaults_to_the_default_organisation(
    store: RunStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIDEBRIDGE_DEFAULT_ORGANIZATION_ID", "vendors")
    get_settings.cache_clear()
    sectra = new_run(store, org="vendors", source=RunSource.SECTRA)
    new_run(store, org="org-a")

    code, out, _ = run_cli(capsys, "runs", "list", "--json")

    assert code == 0
    assert [(r["run_id"], r["source"]) for r in json.loads(out)] == [(sectra.run_id, "sectra")]


def test_runs_show_gives_items_and_errors_but_never_urls_or_credentials(
    store: RunStore, capsys: pytest.CaptureFixture[str]
) -> None:
    run = new_run(
        store,
        source=RunSource.SECTRA,
        vendor_context={"applicationId": "he-tissue", "slideId": "S-1", "callback_url": CALLBACK, "authToken": "x1y2"},
    )
    store.put_credential(run.run_id, "sectra_callback_token", CALLBACK_TOKEN)
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(
        run.run_id,
        0,
        ItemState.TERMINATED,
        reason=ItemTerminationReason.USER_ERROR,
        error_code="URL_EXPIRED",
        error_message=f"the download URL has expired: {PRESIGNED}",
    )
    store.transition_item(run.run_id, 1, ItemState.PROCESSING)
    artifact = OutputArtifact(
        name="tissue:geojson",
        s3_key=f"artifacts/{run.run_id}/1/tissue.geojson",
        metadata=ArtifactMetadata(
            media_type="application/geo+json", size_bytes=1234, checksum_base64_crc32c="AAAAAA=="
        ),
    )
    store.transition_item(
        run.run_id, 1, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED, output_artifacts=[artifact]
    )

    code, text, _ = run_cli(capsys, "runs", "show", run.run_id)
    assert code == 0
    assert run.run_id in text
    assert "URL_EXPIRED" in text and "the download URL has expired" in text
    assert "TERMINATED/USER_ERROR" in text and "TERMINATED/SUCCEEDED" in text
    assert "tissue:geojson AVAILABLE 1234 bytes" in text
    assert "https://slides.s3.eu-central-1.amazonaws.com" in text
    assert "https://pacs.hospital.example:8443" in text

    code, raw, _ = run_cli(capsys, "runs", "show", run.run_id, "--json")
    assert code == 0
    shown = json.loads(raw)
    assert shown["run"]["termination_reason"] == "ALL_ITEMS_PROCESSED"
    assert shown["run"]["output"] == "PARTIAL"
    assert shown["run"]["vendor_context"]["slideId"] == "S-1"
    assert shown["run"]["vendor_context"]["callback_url"] == "https://pacs.hospital.example:8443"
    assert [i["error_code"] for i in shown["items"]] == ["URL_EXPIRED", None]
    assert shown["items"][0]["input_artifacts"] == [
        {"name": "whole_slide_image", "download_host": "https://slides.s3.eu-central-1.amazonaws.com:443"}
    ]

    for output in (text, raw):
        for secret in ("X-Amz-Signature", "deadbeefcafe", "AKIAEXAMPLE", "patient-4711", "cb-secret-1", "x1y2"):
            assert secret not in output
        assert CALLBACK_TOKEN not in output
        assert "SectraPathologyImport" not in output


def test_runs_show_unknown_run_exits_1(store: RunStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "runs", "show", "no-such-run")
    assert (code, out) == (1, "")
    assert "no-such-run not found" in err


def test_cancel_stops_the_job_and_skips_open_items_once(
    store: RunStore, capsys: pytest.CaptureFixture[str], launcher: RecordingLauncher
) -> None:
    run = new_run(store, items=3)
    store.set_job_id(run.run_id, "batch-job-42")
    store.transition_item(run.run_id, 0, ItemState.PROCESSING)
    store.transition_item(run.run_id, 0, ItemState.TERMINATED, reason=ItemTerminationReason.SUCCEEDED)
    store.transition_item(run.run_id, 1, ItemState.PROCESSING)

    code, out, _ = run_cli(capsys, "runs", "cancel", run.run_id, "--reason", "wrong slides")

    assert code == 0
    assert "CANCELED_BY_USER" in out
    assert launcher.cancelled == [("batch-job-42", "wrong slides")]
    cancelled = store.get_run(run.run_id)
    assert cancelled.state is RunState.TERMINATED
    assert cancelled.termination_reason is RunTerminationReason.CANCELED_BY_USER
    assert [i.termination_reason for i in store.list_items(run.run_id)] == [
        ItemTerminationReason.SUCCEEDED,
        ItemTerminationReason.SKIPPED,
        ItemTerminationReason.SKIPPED,
    ]

    code, out, err = run_cli(capsys, "runs", "cancel", run.run_id)
    assert (code, out) == (1, "")
    assert "already ended" in err
    assert len(launcher.cancelled) == 1


def test_cancel_expires_the_runs_vendor_credentials(
    store: RunStore, capsys: pytest.CaptureFixture[str], launcher: RecordingLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIDEBRIDGE_CREDENTIAL_TTL_AFTER_RUN_S", "0")
    get_settings.cache_clear()
    run = new_run(store, items=1, source=RunSource.SECTRA)
    store.put_credential(run.run_id, "sectra_callback_token", CALLBACK_TOKEN)

    assert run_cli(capsys, "runs", "cancel", run.run_id)[0] == 0

    # TTL 0 from now: gone as soon as the clock moves past this second.
    record = boto3.client("dynamodb").get_item(
        TableName=TABLE, Key={"pk": {"S": f"RUN#{run.run_id}"}, "sk": {"S": "CRED#sectra_callback_token"}}
    )["Item"]
    assert int(record["expires_at"]["N"]) <= int(datetime.now(UTC).timestamp())
    assert launcher.cancelled == []  # no job had been started


def test_cancel_unknown_run_exits_1(
    store: RunStore, capsys: pytest.CaptureFixture[str], launcher: RecordingLauncher
) -> None:
    code, _, err = run_cli(capsys, "runs", "cancel", "no-such-run")
    assert code == 1
    assert "not found" in err
    assert launcher.cancelled == []


# --- usage and environment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["tokens"],
        ["tokens", "create", "--user", "alice"],
        ["tokens", "create", "--user", " ", "--org", "org-a"],
        ["tokens", "list", "--org", "org-a", "--all"],
        ["runs", "list", "--limit", "0"],
        ["runs", "show"],
        ["runs", "explode", "x"],
    ],
)
def test_usage_errors_exit_2(store: RunStore, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert "usage:" in err
    assert out == ""


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "--help")
    assert code == 0
    assert "cancel" in out


def test_a_missing_table_is_a_clear_error(
    store: RunStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIDEBRIDGE_TABLE_NAME", "no-such-table")
    get_settings.cache_clear()

    code, _, err = run_cli(capsys, "runs", "list", "--org", "org-a")

    assert code == 1
    assert "no-such-table" in err and "SLIDEBRIDGE_TABLE_NAME" in err
