"""A ``name_or_path`` that is a missing local folder is reported as one at once, and a Hub id with the Hub out of reach
fails in one line after at most one network attempt (manifold_fm/hub.py), for the tokenizer and exported-model loaders.

Every test runs with name resolution replaced by a recorder that refuses, so a network attempt is counted, never made.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

import manifold_fm
from manifold_fm.hub import looks_like_repo_id
from manifold_fm.tokenizers.diffusers_adapter import DiffusersTokenizer


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host names anything tried to reach (every connection starts with a lookup), each refused at once."""
    seen: list[str] = []

    def refuse(host: str, *args: object, **kwargs: object) -> list[object]:
        seen.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return seen


def test_repo_id_rule() -> None:
    for name in ("gpt2", "stabilityai/sd-vae-ft-ema", "black-forest-labs/FLUX.2-dev", "a_b/c.d-e"):
        assert looks_like_repo_id(name), name
    for name in ("/models/vae", "./vae", "../vae", "a/b/c", "~/vae", "a\\b", "org/.hidden", "a--b/c", "a..b", ""):
        assert not looks_like_repo_id(name), name


@pytest.mark.parametrize("name", ["{tmp}/nope", "./no-such-vae-here", "models/sd/vae", "{tmp}"])
def test_a_missing_local_folder_is_reported_at_once(tmp_path: Path, lookups: list[str], name: str) -> None:
    given: str | Path = name.replace("{tmp}", str(tmp_path / "missing"))
    if name == "{tmp}":
        given = Path(given)  # a Path is a local folder whatever its name
    with pytest.raises(FileNotFoundError, match=r"^tokenizer folder .* does not exist; pass an existing local folder$"):
        DiffusersTokenizer.from_pretrained(given)
    assert lookups == []


def test_a_hub_id_offline_fails_in_one_line_without_the_network(
    lookups: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        DiffusersTokenizer.from_pretrained("no-such-org/no-such-vae")
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "hf download no-such-org/no-such-vae --local-dir DIR) and pass DIR" in message
    assert lookups == []


def test_a_hub_id_with_the_hub_unreachable_makes_one_attempt_and_says_what_to_do(lookups: list[str]) -> None:
    with pytest.raises(FileNotFoundError) as err:
        DiffusersTokenizer.from_pretrained("no-such-org/no-such-vae")
    message = str(err.value)
    assert "\n" not in message and f"{constants.ENDPOINT} cannot be reached" in message and "pass DIR" in message
    assert lookups == [constants.ENDPOINT.split("://")[1].split("/")[0]]  # the one probe, no retries


def test_exported_model_hub_id_offline_is_one_line(lookups: list[str]) -> None:
    with pytest.raises(FileNotFoundError) as err:
        manifold_fm.from_pretrained("no-such-org/no-such-model")
    message = str(err.value)
    assert "\n" not in message and message.startswith("exported model no-such-org/no-such-model is not a local folder")
    assert len(lookups) == 1
