"""worker.core.logs: one format for every line, the job's context on each, and no secret ever written."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from worker.core.errors import ConfigError
from worker.core.logs import (
    FLUSH_AFTER_S,
    LOG_LEVELS,
    bind_job_context,
    configure_logging,
    get_logger,
    merge_job_context,
)
from worker.core.redaction import REDACTED, secret_redactor
from worker.core.settings import LOG_LEVEL_NAMES, Account, LogFormat, Secret, Settings

API_SECRET = "s3cr3t-api-VALUE-9f8e7d"
OTHER_SECRET = "another-account-secret-42"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEBHOOK_KEY = WEBHOOK_SECRET.removeprefix("whsec_")
ALL_SECRETS = (API_SECRET, OTHER_SECRET, WEBHOOK_SECRET, WEBHOOK_KEY)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_settings(log_format: LogFormat = "json") -> Settings:
    accounts = {
        "default": Account("default", "http://127.0.0.1:8765", "key-default", Secret(API_SECRET), 10.0),
        "other": Account("other", "http://127.0.0.1:8766", "key-other", Secret(OTHER_SECRET), 5.0),
    }
    return Settings(accounts=accounts, webhook_secret=Secret(WEBHOOK_SECRET), log_format=log_format)


class TtyStringIO(io.StringIO):
    """An in-memory stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [orjson.loads(line) for line in lines]


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text


# --- event content (capture_logs) ---------------------------------------------------------------


def test_bound_job_context_is_on_every_event_and_gone_afterwards() -> None:
    log = get_logger("worker.jobs")
    with capture_logs(processors=[merge_job_context]) as events:
        with bind_job_context("default:k-1", "k-1", "default", 3):
            log.info("attempt_started", operation="update")
            log.warning("attempt_failed", http_status=503)
        log.info("idle")
    assert events[0] == {
        "event": "attempt_started",
        "log_level": "info",
        "operation": "update",
        "job_id": "default:k-1",
        "idempotency_key": "k-1",
        "account": "default",
        "attempt": 3,
    }
    assert events[1]["attempt"] == 3
    assert events[1]["http_status"] == 503
    assert "job_id" not in events[2]


async def test_concurrent_jobs_keep_their_own_context() -> None:
    log = get_logger("worker.jobs")

    async def job(key: str) -> None:
        with bind_job_context(f"default:{key}", key, "default", 1):
            await asyncio.sleep(0)  # let the other job run in between
            log.info("done")

    with capture_logs(processors=[merge_job_context]) as events:
        await asyncio.gather(job("a"), job("b"))
    assert sorted((e["job_id"], e["idempotency_key"]) for e in events) == [("default:a", "a"), ("default:b", "b")]


def test_nested_bind_restores_the_outer_job() -> None:
    log = get_logger("worker.jobs")
    with (
        capture_logs(processors=[merge_job_context]) as events,
        bind_job_context("default:outer", "outer", "default", 1),
    ):
        with bind_job_context("other:inner", "inner", "other", 2):
            log.info("inner")
        log.info("outer")
    assert [(e["job_id"], e["attempt"]) for e in events] == [("other:inner", 2), ("default:outer", 1)]


# --- the full pipeline: JSON ---------------------------------------------------------------------


def test_json_lines_have_timestamp_level_logger_event_and_job_context() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    with bind_job_context("default:k-9", "k-9", "default", 2):
        get_logger("worker.jobs").info("change_applied", stage_id=42, duration_ms=12.5)
    (line,) = json_lines(out)
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]
    assert line["level"] == "info"
    assert line["logger"] == "worker.jobs"
    assert line["event"] == "change_applied"
    assert line["stage_id"] == 42
    assert line["duration_ms"] == 12.5
    assert line["job_id"] == "default:k-9"
    assert line["idempotency_key"] == "k-9"
    assert line["account"] == "default"
    assert line["attempt"] == 2
    moment = datetime.fromisoformat(line["timestamp"])
    assert moment.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 60


def test_stdlib_records_share_the_format_and_the_job_context() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    with bind_job_context("default:k-2", "k-2", "default", 1):
        logging.getLogger("arq.worker").info("%d jobs in queue", 7)
    (line,) = json_lines(out)
    assert line["logger"] == "arq.worker"
    assert line["level"] == "info"
    assert line["event"] == "7 jobs in queue"
    assert line["job_id"] == "default:k-2"
    assert "timestamp" in line


def test_auto_format_is_json_when_not_a_terminal() -> None:
    out = io.StringIO()
    configure_logging(make_settings("auto"), stream=out)
    get_logger("t").info("hello", n=1)
    assert json_lines(out)[0]["event"] == "hello"


def test_warnings_are_logged_in_the_same_format() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated thing {API_SECRET}", UserWarning, stacklevel=1)
    (line,) = json_lines(out)
    assert line["logger"] == "py.warnings"
    assert "deprecated thing" in line["event"]
    assert_no_secret(out.getvalue())


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(make_settings("json"))
    get_logger("t").info("to_stderr")
    captured = capsys.readouterr()
    assert "to_stderr" in captured.err
    assert "to_stderr" not in captured.out


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(make_settings("json"), stream=first)
    configure_logging(make_settings("json"), stream=second)
    get_logger("t").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


# --- levels --------------------------------------------------------------------------------------


def test_level_defaults_to_info() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    log = get_logger("t")
    log.debug("hidden")
    logging.getLogger("aiohttp.client").debug("hidden too")
    log.info("shown")
    assert [line["event"] for line in json_lines(out)] == ["shown"]


def test_level_from_settings() -> None:
    out = io.StringIO()
    settings = Settings.from_env({"LEADSTAGE_LOG_LEVEL": "Warning", "LEADSTAGE_LOG_FORMAT": "json"})
    configure_logging(settings, stream=out)
    get_logger("t").info("hidden")
    get_logger("t").warning("shown")
    assert [line["event"] for line in json_lines(out)] == ["shown"]


def test_bad_level_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"LEADSTAGE_LOG_LEVEL must be one of .*'loud'"):
        Settings.from_env({"LEADSTAGE_LOG_LEVEL": "loud"})
    assert Settings.from_env({}).log_level is None
    assert Settings.from_env({"LEADSTAGE_LOG_LEVEL": " debug "}).log_level == "debug"


def test_every_level_name_of_the_settings_has_a_logging_level() -> None:
    assert set(LOG_LEVELS) == set(LOG_LEVEL_NAMES)


# --- secrets never written -----------------------------------------------------------------------


def test_secret_in_event_values_is_redacted() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    log = get_logger("worker.ivvy")
    log.info(f"calling with {API_SECRET}", note=f"prefix-{OTHER_SECRET}-suffix")
    log.info("webhook", raw=WEBHOOK_SECRET, bare=f"key={WEBHOOK_KEY}")
    first, second = json_lines(out)
    assert first["event"] == f"calling with {REDACTED}"
    assert first["note"] == f"prefix-{REDACTED}-suffix"
    assert second["raw"] == REDACTED
    assert second["bare"] == f"key={REDACTED}"
    assert_no_secret(out.getvalue())


def test_secrets_read_from_the_environment_are_masked_and_the_rest_of_the_line_kept() -> None:
    # Every kind of secret the settings accept, the Redis password included: each is masked where
    # it occurs, and the ordinary words around it (full of the letters it is made of) stay whole.
    redis_password = "r3dis-PASSWORD-0a1b2c"
    env = {
        "IVVY_BASE_URL": "https://ivvy.example",
        "IVVY_API_KEY": "key-default",
        "IVVY_API_SECRET": API_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LEADSTAGE_CONSOLE_TOKEN": OTHER_SECRET,
        "REDIS_URL": f"redis://user:{redis_password}@cache:6379/0",
        "LEADSTAGE_LOG_FORMAT": "json",
    }
    out = io.StringIO()
    configure_logging(Settings.from_env(env), stream=out)
    words = "sales stage status: secrets stay set"
    get_logger("worker.ivvy").info(
        words, detail=f"{words} {API_SECRET}/{redis_password} {WEBHOOK_KEY}, token={OTHER_SECRET}."
    )
    (line,) = json_lines(out)
    assert line["event"] == words
    assert line["detail"] == f"{words} {REDACTED}/{REDACTED} {REDACTED}, token={REDACTED}."
    assert redis_password not in out.getvalue()
    assert_no_secret(out.getvalue())


def test_secret_in_nested_values_is_redacted_without_touching_the_callers_objects() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    headers = {"X-Api-Authorization": f"IWS key-default:{'ab' * 20}", "Content-Type": "application/json"}
    payload: dict[str, Any] = {"outer": [{"deep": API_SECRET}, (OTHER_SECRET, 1)], API_SECRET: "as a key"}
    get_logger("t").info("request", headers=headers, payload=payload, stages={3, 4})
    (line,) = json_lines(out)
    assert line["headers"] == {"X-Api-Authorization": REDACTED, "Content-Type": "application/json"}
    assert line["payload"] == {"outer": [{"deep": REDACTED}, [REDACTED, 1]], REDACTED: "as a key"}
    assert sorted(line["stages"]) == [3, 4]
    assert_no_secret(out.getvalue())
    # What was logged is a copy: the request still goes out with its real headers.
    assert headers["X-Api-Authorization"].startswith("IWS key-default:abab")
    assert payload["outer"][0]["deep"] == API_SECRET


def test_credential_keys_are_masked_at_any_depth() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    get_logger("t").info(
        "keys",
        api_secret="not-configured-but-secret",
        password="hunter2",
        token="t0k3n",
        nested={"webhook-signature": "v1,abc=", "Authorization": "Bearer xyz", "webhook-id": "msg_1"},
        api_key="key-default",
        none_token=None,
    )
    (line,) = json_lines(out)
    assert line["api_secret"] == line["password"] == line["token"] == REDACTED
    assert line["nested"] == {"webhook-signature": REDACTED, "Authorization": REDACTED, "webhook-id": "msg_1"}
    # The API key identifies the account and is sent in clear in every request: it stays readable.
    assert line["api_key"] == "key-default"
    assert line["none_token"] is None
    for value in ("not-configured-but-secret", "hunter2", "t0k3n", "v1,abc=", "Bearer xyz"):
        assert value not in out.getvalue()


def test_iws_signature_is_redacted_in_free_text_and_the_key_kept() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    signature = "0123456789abcdef0123456789abcdef01234567"
    get_logger("t").info(f"sent X-Api-Authorization: IWS key-default:{signature} to iVvy", raw=f"'IWS k:{signature}'")
    (line,) = json_lines(out)
    assert line["event"] == f"sent X-Api-Authorization: IWS key-default:{REDACTED} to iVvy"
    assert line["raw"] == f"'IWS k:{REDACTED}'"
    assert signature not in out.getvalue()


def test_secret_in_exception_message_and_traceback_is_redacted() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    log = get_logger("worker.jobs")

    def fail() -> None:
        raise RuntimeError(f"iVvy said no to {API_SECRET}")

    try:
        try:
            fail()
        except RuntimeError as exc:
            raise ValueError(f"wrapped {WEBHOOK_KEY}") from exc
    except ValueError:
        log.exception("attempt_crashed")
    (line,) = json_lines(out)
    assert line["level"] == "error"
    assert "Traceback (most recent call last)" in line["exception"]
    assert f"RuntimeError: iVvy said no to {REDACTED}" in line["exception"]
    assert f"ValueError: wrapped {REDACTED}" in line["exception"]
    assert_no_secret(out.getvalue())


def test_exception_object_as_a_value_is_redacted() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    get_logger("t").warning("retrying", error=OSError(f"reset by {OTHER_SECRET}"), data=API_SECRET.encode())
    (line,) = json_lines(out)
    assert REDACTED in line["error"]
    assert REDACTED in line["data"]
    assert_no_secret(out.getvalue())


def test_secret_in_stdlib_records_and_their_tracebacks_is_redacted() -> None:
    out = io.StringIO()
    configure_logging(make_settings("json"), stream=out)
    logging.getLogger("arq.worker").info("job failed with %s", API_SECRET)
    try:
        raise ConnectionError(f"secret in stdlib traceback {OTHER_SECRET}")
    except ConnectionError:
        logging.getLogger("aiohttp.server").exception("Error handling request %s", WEBHOOK_SECRET)
    first, second = json_lines(out)
    assert first["event"] == f"job failed with {REDACTED}"
    assert second["event"] == f"Error handling request {REDACTED}"
    assert f"ConnectionError: secret in stdlib traceback {REDACTED}" in second["exception"]
    assert_no_secret(out.getvalue())


def test_console_output_is_redacted_too() -> None:
    out = TtyStringIO()
    configure_logging(make_settings("console"), stream=out)
    try:
        raise RuntimeError(API_SECRET)
    except RuntimeError:
        get_logger("t").exception("boom", header=f"IWS k:{'f' * 40}", token="abc123")
    logging.getLogger("arq.worker").info("with %s", OTHER_SECRET)
    assert_no_secret(out.getvalue())
    assert "f" * 40 not in out.getvalue()
    assert "abc123" not in out.getvalue()


def test_a_failing_stream_does_not_print_the_record(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    configure_logging(make_settings("json"), stream=Broken())
    get_logger("t").info("unwritable", raw_secret=API_SECRET)
    err = capsys.readouterr().err
    assert "logging error: OSError" in err
    assert API_SECRET not in err
    assert "unwritable" not in err


# --- lines written together ----------------------------------------------------------------------


def file_events(path: Path) -> list[str]:
    return [orjson.loads(line)["event"] for line in path.read_text().splitlines()]


async def test_in_an_event_loop_lines_to_a_file_wait_for_the_timer_and_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    with path.open("w", buffering=1) as out:  # line-buffered, as stderr
        configure_logging(make_settings("json"), stream=out)
        log = get_logger("t")
        log.info("first")
        log.debug("below the level")
        log.info("second", raw_secret=API_SECRET)
        assert path.read_text() == ""
        await asyncio.sleep(FLUSH_AFTER_S * 2)  # a later timer than the handler's: it runs first
        assert file_events(path) == ["first", "second"]
        # A stdlib record, a warning: written at once, after the lines that wait.
        log.info("third")
        logging.getLogger("arq.worker").info("foreign")
        log.info("fourth")
        log.warning("at once")
        assert file_events(path) == ["first", "second", "third", "foreign", "fourth", "at once"]
    assert_no_secret(path.read_text())


def test_lines_left_by_a_stopped_loop_go_out_with_the_next_loops(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"

    async def log_then_wait(event: str, wait_s: float) -> None:
        get_logger("t").info(event)
        await asyncio.sleep(wait_s)

    with path.open("w", buffering=1) as out:
        configure_logging(make_settings("json"), stream=out)
        asyncio.run(log_then_wait("first", 0))  # its loop is closed before its timer runs
        assert path.read_text() == ""
        asyncio.run(log_then_wait("second", FLUSH_AFTER_S * 2))
        assert file_events(path) == ["first", "second"]


@pytest.mark.system  # a fresh interpreter, to see what it writes at exit
def test_waiting_lines_are_written_at_exit() -> None:
    script = """
import asyncio
from worker.core.logs import configure_logging, get_logger
from worker.core.settings import Settings
configure_logging(Settings(log_format="json"))
log = get_logger("t")
async def main() -> None:
    log.info("in a loop")
asyncio.run(main())
log.info("outside a loop")
asyncio.run(main())
"""
    result = subprocess.run(  # noqa: S603 - this interpreter with a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [orjson.loads(line)["event"] for line in result.stderr.splitlines()]
    assert lines == ["in a loop", "outside a loop", "in a loop"]


# --- the redactor on its own ---------------------------------------------------------------------


def test_redactor_without_secrets_changes_nothing_else() -> None:
    redact = secret_redactor([])
    event = {"event": "hello", "n": 1, "f": 1.5, "flag": True, "nothing": None, "items": ["a", {"b": "c"}]}
    assert redact(None, "info", dict(event)) == event
    assert redact(None, "info", {"event": "IWS k:abc"}) == {"event": f"IWS k:{REDACTED}"}


def test_redactor_replaces_the_longest_secret_whole() -> None:
    redact = secret_redactor(["abc", "abcdef", ""])
    assert redact(None, "info", {"event": "x abcdef y abc"}) == {"event": f"x {REDACTED} y {REDACTED}"}


def test_redactor_matches_secrets_in_any_case_in_flat_lines_ascii_or_not() -> None:
    # Flat lines of strings take the quick test first: it must find what the pattern finds.
    redact = secret_redactor(["Secret-Abc", "whsec_S3cr3t"])
    flat = {"event": "e", "n": 1, "ok": True}
    for text in ("x SECRET-abc y", "s3CR3T!", "caf\u00e9 secret-abc", "iws k:sig \u00e9", "IwS k:sig"):
        assert text not in str(redact(None, "info", {**flat, "v": text})), text
    assert secret_redactor([])(None, "info", {**flat, "v": "iWs k:sig"})["v"] == f"iWs k:{REDACTED}"
    # A non-ASCII secret: the pattern's case-insensitive match ("\u017f", the long s, matches
    # "s") is one that lower() does not give, so such lines must not take the quick test.
    assert redact(None, "info", {**flat, "v": "no secret here"})["v"] == "no secret here"
    assert secret_redactor(["pa\u017f\u017f"])(None, "info", {**flat, "v": "PASS"})["v"] == REDACTED


def test_redactor_survives_cycles_and_broken_reprs() -> None:
    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError(API_SECRET)

    cyclic: list[Any] = [API_SECRET]
    cyclic.append(cyclic)
    result = secret_redactor([API_SECRET])(None, "info", {"event": "e", "cyclic": cyclic, "odd": NoRepr()})
    assert API_SECRET not in repr(result)
    assert result["odd"] == "<unrepresentable NoRepr>"


# --- console mode --------------------------------------------------------------------------------


def test_console_mode_renders_readable_text() -> None:
    out = io.StringIO()
    configure_logging(make_settings("console"), stream=out)
    with bind_job_context("default:k-3", "k-3", "default", 1):
        get_logger("worker.jobs").info("change_applied", stage_id=42)
    text = out.getvalue()
    assert not text.lstrip().startswith("{")
    assert "change_applied" in text
    assert "stage_id=42" in text
    assert "job_id=default:k-3" in text
    assert "[worker.jobs]" in text
    assert not ANSI.search(text), "no colours when the stream is not a terminal"


def test_auto_on_a_terminal_is_coloured_console() -> None:
    out = TtyStringIO()
    configure_logging(make_settings("auto"), stream=out)
    get_logger("t").info("hello", n=1)
    text = out.getvalue()
    assert ANSI.search(text)
    assert "hello" in ANSI.sub("", text)
    assert "n=1" in ANSI.sub("", text)


def test_no_color_turns_colours_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = TtyStringIO()
    configure_logging(make_settings("auto"), stream=out)
    get_logger("t").info("hello")
    assert "hello" in out.getvalue()
    assert not ANSI.search(out.getvalue())


def test_console_renders_tracebacks() -> None:
    out = io.StringIO()
    configure_logging(make_settings("console"), stream=out)
    try:
        raise KeyError("missing")
    except KeyError:
        get_logger("t").exception("boom")
    assert "Traceback (most recent call last)" in out.getvalue()
    assert "KeyError: 'missing'" in out.getvalue()
