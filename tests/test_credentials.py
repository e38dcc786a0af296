"""``FalCredentials``: a Prefect ``CredentialsBlock`` passing Prefect's block standard suite."""

from __future__ import annotations

import pytest
from prefect.blocks.abstract import CredentialsBlock
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr

from prefect_gptimage.credentials import FalCredentials, resolve_client


@pytest.mark.parametrize("block", [FalCredentials])
class TestFalCredentials(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[FalCredentials]) -> type[FalCredentials]:
        return block

    @pytest.mark.skip(
        reason="downloads _logo_url (urlopen), and this suite runs without internet access"
    )
    def test_has_a_valid_image(self, block: type[FalCredentials]) -> None:  # type: ignore[override]
        """Skipped offline; the logo URL is still required to be set (checked below)."""


def test_is_a_credentials_block_with_a_logo() -> None:
    assert issubclass(FalCredentials, CredentialsBlock)
    assert str(FalCredentials._logo_url).startswith("https://")


def test_key_from_block_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert FalCredentials().get_key() is None
    monkeypatch.setenv("FAL_KEY_ID", "id")
    assert FalCredentials().get_key() is None  # the secret is missing
    monkeypatch.setenv("FAL_KEY_SECRET", "secret")
    assert FalCredentials().get_key() == "id:secret"
    monkeypatch.setenv("FAL_KEY", "env-key")
    assert FalCredentials().get_key() == "env-key"
    assert FalCredentials(api_key=SecretStr("")).get_key() == "env-key"
    assert FalCredentials(api_key=SecretStr("block-key")).get_key() == "block-key"


def test_key_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    creds = FalCredentials(api_key=SecretStr("very-secret-key"))
    assert "very-secret-key" not in repr(creds) and "very-secret-key" not in str(creds)
    assert "very-secret-key" not in creds.model_dump_json()


def test_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_gptimage.fal.async_client import AsyncFalQueueClient
    from prefect_gptimage.fal.client import FalQueueClient

    creds = FalCredentials(api_key=SecretStr("k-id:k-secret"))
    client = creds.get_client()
    assert isinstance(client, FalQueueClient)
    assert (
        client
        is creds.get_client()
        is FalCredentials(api_key=SecretStr("k-id:k-secret")).get_client()
    )
    assert resolve_client(creds) is client
    monkeypatch.setenv("FAL_KEY", "k-id:k-secret")
    assert resolve_client(None) is client  # the environment's key: the same shared client
    assert isinstance(creds.get_async_client(), AsyncFalQueueClient)


def test_save_and_load_round_trip(unique: str) -> None:
    name = f"fal-{unique}"
    FalCredentials(api_key=SecretStr("stored-key")).save(name)
    loaded = FalCredentials.load(name)
    assert isinstance(loaded, FalCredentials) and loaded.get_key() == "stored-key"
