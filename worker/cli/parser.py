"""The ``leadstage`` command line: every command, its flags and its help (the whole interface).

Each command names the function that runs it as ``"module:function"`` inside ``worker.cli``,
imported only when that command runs. ``parse_command`` builds only the subparser of the command
given (all of them for the top-level help or a bad command), so that start-up stays short.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from worker.cli.common import PROG
from worker.core.change import DEFAULT_ACCOUNT, shown

__all__ = ["COMMANDS", "build_parser", "parse_command", "parse_fake_ivvy_options"]

ENVIRONMENT_HELP = """environment (the settings that matter most; docs/contract.md lists them all):
  REDIS_URL                  redis://, rediss://, unix:// or redis+sentinel:// URL
                             (default redis://localhost:6379/0), or redis+cluster://
                             (a Redis Cluster: every command runs on one)
  IVVY_BASE_URL, IVVY_API_KEY, IVVY_API_SECRET
                             the iVvy account "default" (the worker needs an account)
  LEADSTAGE_ACCOUNTS_FILE    JSON file of accounts: name -> base_url, api_key, api_secret
  WEBHOOK_SECRET             whsec_... secret of the webhook's Standard Webhooks signatures
  LEADSTAGE_REDIS_TIMEOUT, LEADSTAGE_REDIS_CONNECT_TIMEOUT
                             seconds a Redis command / connection may take (default 5)
  LEADSTAGE_LOG_FORMAT       json, console or auto (console on a terminal)
"""

EXIT_STATUS_HELP = """exit status:
  0    success
  1    a failure that may pass on its own or is about the subject, not the input: Redis does
       not answer, the change or dead letter asked about is unknown, an unexpected error
  2    bad input or a refusal, which only a change on the caller's side fixes: an invalid
       change or file line, an idempotency conflict, an unknown account, bad flags, a missing
       or bad setting in the environment
  130  interrupted (SIGINT)
"""

FAKE_IVVY_DESCRIPTION = (
    "Serve a fake iVvy API (addOrUpdateLeadStage, getLeadStageList, ping) with signature checks,\n"
    "the seed's error codes and injectable faults, for the demo, tests and benchmarks."
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option shows its default when it has a telling one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or action.nargs == 0:
            return text
        return f"{text} (default: {default})"


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, not {shown(text)}")
    return int(text)


def _subparser(subparsers: Any, name: str, run: str | None, summary: str, description: str) -> argparse.ArgumentParser:
    """A command ``name`` run by ``run`` (``"module:function"`` in ``worker.cli``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def _add_worker(subparsers: Any) -> None:
    _subparser(
        subparsers,
        "worker",
        "servers:run_worker",
        "run a worker",
        "Run an arq worker that applies queued changes to iVvy (needs IVVY_BASE_URL, IVVY_API_KEY,\n"
        "IVVY_API_SECRET or LEADSTAGE_ACCOUNTS_FILE). SIGTERM finishes the requests in flight, then exits.",
    )


def _add_webhook(subparsers: Any) -> None:
    webhook = _subparser(
        subparsers,
        "webhook",
        "servers:run_webhook",
        "run the HTTP producer",
        "Serve POST /v1/lead-stage-changes (Standard Webhooks signed with WEBHOOK_SECRET), /healthz,\n"
        "/readyz, /metrics and /openapi.json, until SIGINT or SIGTERM.",
    )
    webhook.add_argument("--host", default="0.0.0.0", help="address to listen on")  # noqa: S104 - webhooks come from other hosts
    webhook.add_argument("--port", type=_port, default=8080, help="port to listen on")


def _add_fake_ivvy(subparsers: Any) -> None:
    fake: argparse.ArgumentParser = subparsers.add_parser(
        "fake-ivvy", help="run a local iVvy stand-in", description=FAKE_IVVY_DESCRIPTION, add_help=False
    )
    # Its options (and --help) are left unparsed here and handed to the fake's own parser.
    fake.set_defaults(run="servers:run_fake_ivvy", passes_options=True)


def _add_console(subparsers: Any) -> None:
    console = _subparser(
        subparsers,
        "console",
        "servers:run_console",
        "run the operations console",
        "Serve the operations console (Overview, Failures, a change's timeline) and its JSON API\n"
        "under /api/v1/ (OpenAPI at /api/v1/openapi.json), until SIGINT or SIGTERM. Needs\n"
        "LEADSTAGE_CONSOLE_TOKEN (LEADSTAGE_CONSOLE_READ_TOKEN may read only). Warns when listening\n"
        "beyond loopback unless LEADSTAGE_CONSOLE_TLS_PROXY=1 declares a TLS proxy in front.",
    )
    console.add_argument("--host", default="127.0.0.1", help="address to listen on")
    console.add_argument("--port", type=_port, default=8090, help="port to listen on")


def _add_demo(subparsers: Any) -> None:
    demo = _subparser(
        subparsers,
        "demo",
        "servers:run_demo",
        "run the demo end to end",
        "Run a fake iVvy, a worker and sample changes against REDIS_URL (or a redis-server of its\n"
        "own when nothing answers there), print the results, then exit: 0 when every sample ended\n"
        "as expected, 1 otherwise.",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="keep the fake iVvy and the worker up after the summary"
    )


def _add_enqueue(subparsers: Any) -> None:
    parser = _subparser(
        subparsers,
        "enqueue",
        "enqueue:run_enqueue",
        "enqueue one change, or a file of them",
        "Enqueue one lead-stage change from flags, or many from a JSON Lines file.\n\n"
        "An add needs --name and --apply-to; an update needs --id and at least one field to change.\n"
        'Prints one JSON line per change: {"job_id", "idempotency_key", "status": "queued"|"duplicate"}.\n\n'
        "--file F.jsonl (- for stdin): one change per line, as JSON, optionally with its own\n"
        "idempotency_key, account and source. Every line is validated and its key checked before\n"
        "anything is enqueued: bad lines are listed with their numbers and nothing is enqueued,\n"
        "unless --skip-invalid. Receipts (with their line number) go to stdout, a summary to\n"
        "stderr; on a terminal a progress line too. If Redis stops answering midway, the receipts\n"
        'say which lines were enqueued; lines with status "unknown" may or may not be: run the\n'
        "file again with the same keys (with --key, or keys in the lines) to be sure.",
    )
    change = parser.add_argument_group("the change (without --file)")
    change.add_argument("--id", help="the stage to update (absent: add a new stage)")
    change.add_argument("--name", help="stage name, 1..255 characters")
    change.add_argument("--apply-to", metavar="{lead,opportunity,1,2}", help="what the stage applies to")
    change.add_argument("--colour", "--color", dest="colour", metavar="#RRGGBB", help="stage colour")
    parser.add_argument(
        "--key",
        help="idempotency key (generated if absent); with --file, lines without their own key get KEY:LINE",
    )
    parser.add_argument("--account", default=DEFAULT_ACCOUNT, help="iVvy account (per line: the line's own wins)")
    parser.add_argument("--source", default="cli", help="free text recorded with the change")
    bulk = parser.add_argument_group("bulk")
    bulk.add_argument("--file", metavar="F.jsonl", help="enqueue every line of this file (- for stdin)")
    bulk.add_argument("--skip-invalid", action="store_true", help="with --file: enqueue the valid lines anyway")


def _add_results(subparsers: Any) -> None:
    results = _subparser(
        subparsers,
        "results",
        "reads:run_results",
        "print the results stream",
        'Print the results stream as JSON lines, oldest first (each entry\'s stream id as "id").\n'
        "--follow keeps printing new entries as they arrive, until SIGINT or SIGTERM.\n\n"
        "--group G reads through the Redis consumer group G instead: each entry is printed, then\n"
        "acknowledged, so a consumer that stops resumes where it was (at least once: an entry printed\n"
        "just before a crash is printed again). Entries another consumer of G left unacknowledged for\n"
        "--claim-idle seconds are taken over. --start places a new group: new (from now), all (the\n"
        "whole stream) or a stream id (the entries after it); an existing group keeps its place.",
    )
    results.add_argument("--follow", "-f", action="store_true", help="wait for new results")
    results.add_argument("--key", help="only the results of this idempotency key")
    results.add_argument("--account", help="only the results of this account")
    group = results.add_argument_group("consumer group")
    group.add_argument("--group", "-g", metavar="G", help="read through consumer group G (created if new)")
    group.add_argument("--consumer", metavar="C", help="this consumer's name in G, HOST-PID when absent")
    group.add_argument("--start", metavar="{new,all,ID}", default="new", help="where a new group starts")
    group.add_argument(
        "--claim-idle", type=float, default=60.0, metavar="S", help="take over entries unacked this long"
    )


def _add_status(subparsers: Any) -> None:
    status = _subparser(
        subparsers,
        "status",
        "reads:run_status",
        "show where one change stands",
        "Show one change from the ledger: state (queued, running, retrying, succeeded, failed,\n"
        "superseded), stage id, attempts and the history of each attempt. Exit status 1 when the\n"
        "key is unknown (never enqueued, or finished before the ledger retention).",
    )
    status.add_argument("key", metavar="KEY", help="the idempotency key")
    status.add_argument("--account", default=DEFAULT_ACCOUNT, help="the account the change was enqueued for")


def _add_dlq(subparsers: Any) -> None:
    dlq = _subparser(
        subparsers,
        "dlq",
        None,
        "list or replay dead letters",
        "Dead letters: changes that failed for good, with everything needed to replay them.",
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="{list,replay}", required=True)
    listing = _subparser(
        dlq_commands,
        "list",
        "reads:run_dlq_list",
        "print dead letters",
        "Print the dead letters as JSON lines, oldest first.",
    )
    listing.add_argument("--account", help="only this account's dead letters")
    replay = _subparser(
        dlq_commands,
        "replay",
        "reads:run_dlq_replay",
        "put dead letters back on the queue",
        "Enqueue dead-lettered changes again under their own idempotency keys (a new generation)\n"
        "and remove their dead letters. Prints one JSON line per replayed change; exit status 1 if\n"
        "a KEY has no dead letter.",
    )
    replay.add_argument("keys", nargs="*", metavar="KEY", help="idempotency keys to replay")
    replay.add_argument("--all", action="store_true", help="replay every dead letter (of --account, if given)")
    replay.add_argument("--account", help=f"the account of the keys (default {DEFAULT_ACCOUNT}; with --all: every)")
    replay.add_argument(
        "--error-code", metavar="C", help="replay the dead letters with this error code (e.g. 24320, timeout)"
    )
    replay.add_argument(
        "--since", metavar="DURATION", help="replay the dead letters of the last DURATION (90s, 15m, 2h, 7d)"
    )


def _add_stats(subparsers: Any) -> None:
    _subparser(
        subparsers,
        "stats",
        "reads:run_stats",
        "show queue depth, in progress, retrying, dead letters, recent rates",
        "Show the queue at a glance, as JSON: queue depth, waiting, in progress, retrying (deferred\n"
        "to a later attempt), dead letters, results, and the events per outcome of the last minute\n"
        "and five minutes with the terminal events per second.",
    )


#: Every command and what adds its subparser, in the order the top-level help lists them.
COMMANDS: dict[str, Callable[[Any], None]] = {
    "worker": _add_worker,
    "webhook": _add_webhook,
    "fake-ivvy": _add_fake_ivvy,
    "console": _add_console,
    "demo": _add_demo,
    "enqueue": _add_enqueue,
    "results": _add_results,
    "status": _add_status,
    "dlq": _add_dlq,
    "stats": _add_stats,
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``leadstage`` command line; with ``only``, just that command's subparser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Apply lead-stage changes to the iVvy CRM API from a Redis queue.",
        epilog=ENVIRONMENT_HELP + "\n" + EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in COMMANDS.items():
        if only is None or name == only:
            add(subparsers)
    return parser


def parse_fake_ivvy_options(options: list[str]) -> argparse.Namespace:
    """fake-ivvy's options, parsed by the fake's own parser (so that other commands need not import it)."""
    from worker.devtools import fake_ivvy

    parser = argparse.ArgumentParser(
        prog=f"{PROG} fake-ivvy", description=FAKE_IVVY_DESCRIPTION, formatter_class=_Formatter
    )
    fake_ivvy.add_arguments(parser)
    return parser.parse_args(options)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as ``leadstage`` parses it (exits 2 on bad flags), fake-ivvy's options included."""
    # The first word names the command (argparse takes no option before it but -h): only its
    # subparser is built. Anything else (no command, --help, a typo) gets the whole parser.
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passes_options", False):
        args.fake_options = parse_fake_ivvy_options(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
