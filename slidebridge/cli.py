"""Operator CLI: ``python -m slidebridge tokens create|list|revoke`` and ``runs list|show|cancel``.

It talks to the table (and, to cancel, to the job launcher) with the same settings as the Lambda:
``SLIDEBRIDGE_TABLE_NAME`` and friends, plus the standard AWS variables boto3 reads. Against the
local stack, point ``AWS_ENDPOINT_URL`` at the moto endpoint its ready line names; against AWS,
use the deployed stack's ``TableName`` output and ordinary AWS credentials.

Exit codes: 0 done, 1 the request could not be carried out (unknown run or token, run already
ended, AWS refused), 2 usage error.

Nothing printed here may carry a secret: plain tokens appear only once, from ``tokens create``;
URLs (presigned downloads, vendor callbacks) are cut down to scheme and host; values under
credential-like keys are replaced by ``<redacted>``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import islice
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from slidebridge.errors import SlidebridgeError
from slidebridge.jobs import cancel_run
from slidebridge.launcher import launcher_from_settings
from slidebridge.outbound import redact_url
from slidebridge.runs import Item, Run
from slidebridge.settings import Settings, get_settings
from slidebridge.store import ApiTokenInfo, RunStore

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_LIST_LIMIT = 20
DEFAULT_CANCEL_REASON = "cancelled by an operator"
REDACTED = "<redacted>"

# Keys whose values are never shown, wherever they appear (vendor context, custom metadata).
_SECRET_KEY = re.compile(r"token|secret|passw|jwt|authori[sz]ation|credential|signature|api.?key|cookie", re.I)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+")

Handler = Callable[[argparse.Namespace, RunStore, Settings], int]


# --- output helpers ---------------------------------------------------------------------------------


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _json(value: Any) -> None:
    _out(json.dumps(value, indent=2, sort_keys=False))


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value is not None else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    # Hand-written: a dozen lines; rich and tabulate are not runtime dependencies of slidebridge.
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def host_only(url: str) -> str:
    """``scheme://host[:port]`` of a URL: no path (object keys, slide names), query (signatures) or userinfo."""
    redacted = redact_url(url)
    scheme, separator, rest = redacted.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if separator else redacted


def scrub(value: Any) -> Any:
    """A JSON-like value with every URL cut to its host and every credential-like key's value redacted."""
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(key, str) and _SECRET_KEY.search(key) and item is not None else scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scrub(item) for item in value]
    if isinstance(value, str):
        return _URL_IN_TEXT.sub(lambda match: host_only(match.group(0)), value)
    return value


def _scrubbed(view: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = scrub(view)
    return result


# --- views (every value shown passes through scrub) ---------------------------------------------------


def _token_view(info: ApiTokenInfo) -> dict[str, Any]:
    return info.model_dump(mode="json")


def _run_summary(run: Run) -> dict[str, Any]:
    return _scrubbed(
        {
            "run_id": run.run_id,
            "source": run.source.value,
            "application_id": run.application_id,
            "version_number": run.version_number,
            "organization_id": run.organization_id,
            "state": run.state.value,
            "termination_reason": run.termination_reason.value if run.termination_reason else None,
            "output": run.output.value,
            "statistics": run.statistics.model_dump(),
            "submitted_at": _when(run.submitted_at),
            "submitted_by": run.submitted_by,
            "terminated_at": _when(run.terminated_at) if run.terminated_at else None,
            "error_code": run.error_code,
            "error_message": run.error_message,
        }
    )


def _run_detail(run: Run) -> dict[str, Any]:
    detail = _run_summary(run)
    detail |= _scrubbed(
        {
            "job_id": run.job_id,
            "vendor_context": run.vendor_context,
            "custom_metadata": run.custom_metadata,
        }
    )
    return detail


def _item_view(item: Item) -> dict[str, Any]:
    return _scrubbed(
        {
            "index": item.index,
            "item_id": item.item_id,
            "external_id": item.external_id,
            "state": item.state.value,
            "termination_reason": item.termination_reason.value if item.termination_reason else None,
            "output": item.output.value,
            "error_code": item.error_code,
            "error_message": item.error_message,
            "terminated_at": _when(item.terminated_at) if item.terminated_at else None,
            # Input URLs are presigned or carry vendor tokens: the host is all an operator needs.
            "input_artifacts": [
                {"name": artifact.name, "download_host": host_only(artifact.download_url)}
                for artifact in item.input_artifacts
            ],
            "output_artifacts": [
                {
                    "name": artifact.name,
                    "output": artifact.output.value,
                    "size_bytes": artifact.metadata.size_bytes if artifact.metadata else None,
                    "s3_key": artifact.s3_key,
                    "error_code": artifact.error_code,
                }
                for artifact in item.output_artifacts
            ],
        }
    )


def _state_text(view: dict[str, Any]) -> str:
    reason = view["termination_reason"]
    return f"{view['state']}/{reason}" if reason else str(view["state"])


# --- tokens -----------------------------------------------------------------------------------------


def _tokens_create(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    token, info = store.create_api_token(user_id=args.user, organization_id=args.org, label=args.label)
    if args.json:
        _json({"token": token, **_token_view(info)})
    else:
        _out(token)
    _err(
        f"created API token {info.token_id} (prefix {info.prefix}) for user {info.user_id} in organisation "
        f"{info.organization_id}.\nStore it now: it is shown only this once and cannot be recovered."
    )
    return EXIT_OK


def _tokens_list(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    tokens = store.list_api_tokens(None if args.all else (args.org or settings.default_organization_id))
    if args.json:
        _json([_token_view(info) for info in tokens])
        return EXIT_OK
    rows = [
        [
            info.token_id,
            info.prefix or "-",
            info.user_id,
            info.organization_id,
            info.label or "-",
            _when(info.created_at),
            _when(info.revoked_at),
        ]
        for info in tokens
    ]
    _out(_table(["TOKEN_ID", "PREFIX", "USER", "ORGANIZATION", "LABEL", "CREATED", "REVOKED"], rows))
    return EXIT_OK


def _tokens_revoke(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    info = store.revoke_api_token(args.token_id)
    _out(
        f"revoked API token {info.token_id} (prefix {info.prefix or '-'}, user {info.user_id}, "
        f"organisation {info.organization_id}) at {_when(info.revoked_at)}"
    )
    return EXIT_OK


# --- runs -------------------------------------------------------------------------------------------


def _runs_list(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    organization = args.org or settings.default_organization_id
    runs = [
        _run_summary(run)
        for run in islice(store.iter_runs(organization, newest_first=True, first_page=args.limit), args.limit)
    ]
    if args.json:
        _json(runs)
        return EXIT_OK
    rows = []
    for view in runs:
        stats = view["statistics"]
        rows.append(
            [
                view["run_id"],
                view["source"],
                f"{view['application_id']}:{view['version_number']}",
                _state_text(view),
                str(stats["item_count"]),
                str(stats["item_succeeded_count"]),
                str(stats["item_user_error_count"] + stats["item_system_error_count"]),
                str(stats["item_skipped_count"]),
                str(stats["item_pending_count"] + stats["item_processing_count"]),
                view["submitted_at"],
            ]
        )
    headers = ["RUN_ID", "SOURCE", "APPLICATION", "STATE", "ITEMS", "OK", "ERR", "SKIP", "OPEN", "SUBMITTED"]
    _out(_table(headers, rows) if rows else f"no runs in organisation {organization}")
    return EXIT_OK


def _runs_show(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    run = _run_detail(store.get_run(args.run_id))
    items = [_item_view(item) for item in store.list_items(args.run_id)]
    if args.json:
        _json({"run": run, "items": items})
        return EXIT_OK
    stats = run["statistics"]
    lines = [
        f"run           {run['run_id']}",
        f"source        {run['source']}",
        f"application   {run['application_id']} {run['version_number']}",
        f"organization  {run['organization_id']}",
        f"submitted     {run['submitted_at']} by {run['submitted_by']}",
        f"state         {_state_text(run)} (output {run['output']})",
    ]
    if run["terminated_at"]:
        lines.append(f"terminated    {run['terminated_at']}")
    if run["error_code"] or run["error_message"]:
        lines.append(f"error         {run['error_code'] or '-'}: {run['error_message'] or ''}".rstrip())
    lines.append(f"job           {run['job_id'] or '-'}")
    lines.append(
        "items         "
        + ", ".join(
            f"{name.removeprefix('item_').removesuffix('_count').replace('count', 'total')} {count}"
            for name, count in stats.items()
        )
    )
    for key, value in (run["vendor_context"] or {}).items():
        lines.append(f"vendor        {key} = {json.dumps(value) if not isinstance(value, str) else value}")
    for item in items:
        line = f"  #{item['index']:<4} {_state_text(item):<26} {item['external_id']}"
        if item["error_code"] or item["error_message"]:
            line += f"  [{item['error_code'] or '-'}: {item['error_message'] or ''}]"
        lines.append(line)
        lines.extend(f"        input  {a['name']} from {a['download_host']}" for a in item["input_artifacts"])
        for artifact in item["output_artifacts"]:
            size = f"{artifact['size_bytes']} bytes" if artifact["size_bytes"] is not None else "-"
            lines.append(f"        output {artifact['name']} {artifact['output']} {size}")
    _out("\n".join(lines))
    return EXIT_OK


def _runs_cancel(args: argparse.Namespace, store: RunStore, settings: Settings) -> int:
    run = cancel_run(
        store,
        launcher_from_settings(settings),
        args.run_id,
        reason=args.reason,
        credential_ttl_after_run_s=settings.credential_ttl_after_run_s,
        settings=settings,
    )
    stats = run.statistics
    _out(
        f"cancelled run {run.run_id}: {run.state.value}/{run.termination_reason}; "
        f"{stats.item_skipped_count} item(s) skipped, {stats.item_succeeded_count} succeeded before"
    )
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slidebridge",
        description="slidebridge operator commands (settings from SLIDEBRIDGE_* and the standard AWS variables)",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="{tokens,runs}")

    tokens = groups.add_parser("tokens", help="Platform API tokens").add_subparsers(
        dest="command", required=True, metavar="{create,list,revoke}"
    )
    create = tokens.add_parser("create", help="create a token (printed once: store it)")
    create.add_argument("--user", required=True, type=_non_empty, help="user id the token acts as")
    create.add_argument("--org", required=True, type=_non_empty, help="organisation whose runs it can see")
    create.add_argument("--label", help="a note for whoever lists tokens later")
    create.add_argument("--json", action="store_true", help="print token and record as JSON")
    create.set_defaults(handler=_tokens_create)

    list_tokens = tokens.add_parser("list", help="list tokens (never their values)")
    scope = list_tokens.add_mutually_exclusive_group()
    scope.add_argument(
        "--org", type=_non_empty, help="this organisation (default: SLIDEBRIDGE_DEFAULT_ORGANIZATION_ID)"
    )
    scope.add_argument("--all", action="store_true", help="every organisation")
    list_tokens.add_argument("--json", action="store_true")
    list_tokens.set_defaults(handler=_tokens_list)

    revoke = tokens.add_parser("revoke", help="revoke a token: it is refused from then on")
    revoke.add_argument("token_id", type=_non_empty, metavar="TOKEN_ID", help="token id or display prefix")
    revoke.set_defaults(handler=_tokens_revoke)

    runs = groups.add_parser("runs", help="runs of every front door").add_subparsers(
        dest="command", required=True, metavar="{list,show,cancel}"
    )
    list_runs = runs.add_parser("list", help="an organisation's runs, newest first")
    list_runs.add_argument("--org", type=_non_empty, help="default: SLIDEBRIDGE_DEFAULT_ORGANIZATION_ID")
    list_runs.add_argument("--limit", type=_positive_int, default=DEFAULT_LIST_LIMIT)
    list_runs.add_argument("--json", action="store_true")
    list_runs.set_defaults(handler=_runs_list)

    show = runs.add_parser("show", help="a run and its items (URLs cut to their host)")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_runs_show)

    cancel = runs.add_parser("cancel", help="stop the run's job; open items end SKIPPED")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--reason", type=_non_empty, default=DEFAULT_CANCEL_REASON)
    cancel.set_defaults(handler=_runs_cancel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse's own exits are turned into return values)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        settings = get_settings()
    except ValidationError as exc:
        _err(f"invalid SLIDEBRIDGE_* settings:\n{exc}")
        return EXIT_USAGE
    store = RunStore(settings.table_name)
    handler: Handler = args.handler
    try:
        return handler(args, store, settings)
    except SlidebridgeError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILED
    except (BotoCoreError, ClientError) as exc:
        _err(
            f"error: AWS refused or could not be reached: {exc}\n"
            f"(table {settings.table_name!r} from SLIDEBRIDGE_TABLE_NAME; region, credentials and "
            "AWS_ENDPOINT_URL from the standard AWS variables)"
        )
        return EXIT_FAILED
