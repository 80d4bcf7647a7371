"""Settings of the webhook's secrets (several, per account) and of iVvy's base URLs (no plain http),
and the served webhook with per-account secrets only."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from producers.openapi import CHANGES_PATH
from tests.conftest import TEST_API_SECRET
from tests.test_hostile_input import LOOPBACK, WebhookProcess, served_webhook, signed
from worker.core import keys
from worker.core.errors import ConfigError
from worker.core.settings import Settings

ONE = "whsec_" + base64.b64encode(b"first webhook secret, 32 bytes!!").decode()
TWO = "whsec_" + base64.b64encode(b"second webhook secret, 32 bytes!").decode()
IVVY = {"IVVY_API_KEY": "key", "IVVY_API_SECRET": TEST_API_SECRET}


@pytest.mark.parametrize(
    "url",
    [
        "http://api.ap-southeast-2.ivvy.com",
        "http://10.0.0.7:8765",
        "http://fake-ivvy:8765",
        "HTTP://api.ivvy.com/",
        "http://[2001:db8::1]:80",
    ],
)
def test_a_plain_http_base_url_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"IVVY_BASE_URL must be an https:// URL.*LEADSTAGE_PLAIN_HTTP_HOSTS"):
        Settings.from_env({"IVVY_BASE_URL": url, **IVVY})
    accounts = tmp_path / "accounts.json"
    accounts.write_bytes(orjson.dumps({"acme": {"base_url": url, "api_key": "k", "api_secret": TEST_API_SECRET}}))
    with pytest.raises(ConfigError, match=r"account 'acme' base_url must be an https:// URL"):
        Settings.from_env({"LEADSTAGE_ACCOUNTS_FILE": str(accounts)})


@pytest.mark.parametrize(
    "url",
    ["https://api.ivvy.com", "http://127.0.0.1:8765", "http://localhost:1", "http://[::1]:8765", "http://127.9.9.9"],
)
def test_https_and_loopback_base_urls_are_accepted(url: str) -> None:
    assert Settings.from_env({"IVVY_BASE_URL": url, **IVVY}).accounts["default"].base_url == url


def test_hosts_named_in_plain_http_hosts_may_use_http() -> None:
    env = {"IVVY_BASE_URL": "http://fake-ivvy:8765", **IVVY, "LEADSTAGE_PLAIN_HTTP_HOSTS": "other, FAKE-IVVY"}
    assert Settings.from_env(env).accounts["default"].base_url == "http://fake-ivvy:8765"
    with pytest.raises(ConfigError):
        Settings.from_env({**env, "IVVY_BASE_URL": "http://api.ivvy.com"})


def test_webhook_secret_may_hold_several_secrets_for_rotation() -> None:
    settings = Settings.from_env({"WEBHOOK_SECRET": f" {ONE}  {TWO} "})
    assert settings.webhook_secrets() == [(None, ONE), (None, TWO)]
    assert settings.webhook_secrets() == Settings.from_env({"WEBHOOK_SECRET": f"{ONE},{TWO}"}).webhook_secrets()
    assert {ONE, TWO} <= set(settings.secret_values())


@pytest.mark.parametrize(
    "value",
    ["whsec_!!!!", "whsec_", "whsec_Br0kenS3cretX", "not-whsec", f"{ONE} whsec_!!!!", f"{ONE} plain"],
)
def test_a_webhook_secret_that_is_not_whsec_base64_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET") as refused:
        Settings.from_env({"WEBHOOK_SECRET": value})
    for part in value.split():
        secret = part.removeprefix("whsec_")
        assert not secret or secret not in str(refused.value)


def test_per_account_webhook_secrets_come_from_their_file(tmp_path: Path) -> None:
    path = tmp_path / "webhook-secrets.json"
    path.write_bytes(orjson.dumps({"eu": ONE, "us": [TWO]}))
    settings = Settings.from_env({"LEADSTAGE_WEBHOOK_SECRETS_FILE": str(path), "WEBHOOK_SECRET": ""})
    assert settings.webhook_secrets() == [("eu", ONE), ("us", TWO)]
    assert {ONE, TWO} <= set(settings.secret_values())
    assert ONE not in repr(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[]", "must hold a JSON object"),
        (b"{}", "must hold a JSON object"),
        (orjson.dumps({"bad name": ONE}), "the name must be"),
        (orjson.dumps({"default": 5}), "must be a whsec_ secret or a non-empty list"),
        (orjson.dumps({"default": []}), "must be a whsec_ secret or a non-empty list"),
        (orjson.dumps({"default": "whsec_!!!!"}), "account 'default' must be a Standard Webhooks secret: whsec_"),
        (orjson.dumps({"asia": ONE}), "account 'asia' is not a configured account"),
    ],
)
def test_a_bad_webhook_secrets_file_names_what_is_wrong(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "webhook-secrets.json"
    path.write_bytes(content)
    env = {"LEADSTAGE_WEBHOOK_SECRETS_FILE": str(path), "IVVY_BASE_URL": "https://api.ivvy.com", **IVVY}
    with pytest.raises(ConfigError, match="LEADSTAGE_WEBHOOK_SECRETS_FILE") as refused:
        Settings.from_env(env)
    assert message in str(refused.value)
    assert "!!!!" not in str(refused.value)


@pytest.fixture
def eu_webhook(tmp_path: Path, redis_url: str) -> Iterator[WebhookProcess]:
    """``leadstage webhook`` as deployed, with per-account secrets only (no WEBHOOK_SECRET)."""
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_bytes(orjson.dumps({"eu": [ONE, TWO]}))
    variables = {"REDIS_URL": redis_url, "LEADSTAGE_WEBHOOK_SECRETS_FILE": str(secrets_file)}
    with served_webhook(variables, tmp_path / "webhook.log") as served:
        yield served


@pytest.mark.system  # serves the webhook as a process
async def test_the_served_webhook_routes_by_the_accounts_own_secret(
    eu_webhook: WebhookProcess, redis_client: aioredis.Redis
) -> None:
    port, log_path = eu_webhook.port, eu_webhook.log_path
    body = orjson.dumps({"name": "Hot", "applyTo": "lead"})
    async with aiohttp.ClientSession(f"http://{LOOPBACK}:{port}") as http:
        for number, secret in enumerate((ONE, TWO)):
            headers = signed(body, secret=secret, msg_id=f"eu-{number}")
            async with http.post(CHANGES_PATH, data=body, headers=headers) as response:
                assert response.status == 202
        other = "whsec_" + base64.b64encode(b"not one of eu's secrets at all").decode()
        async with http.post(CHANGES_PATH, data=body, headers=signed(body, secret=other)) as response:
            assert response.status == 401
    assert sorted(await redis_client.zrange(keys.queue_key("leadstage:queue", "eu"), 0, -1)) == [b"eu:eu-0", b"eu:eu-1"]
    text = log_path.read_text()
    assert "Traceback" not in text
    assert ONE.removeprefix("whsec_") not in text
