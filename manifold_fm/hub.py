"""Where a ``name_or_path`` argument points: an existing local folder, a local folder that does not exist, or a
Hugging Face Hub repository id; and whether the Hub can be used right now.

``huggingface_hub`` treats any name that is not an existing folder as a repository id and, with no network, retries
for half a minute before reporting a misleading "does not appear to have a file named config.json". Here a name that
is not a valid repository id (an absolute path, ``./x``, ``a/b/c``, ...) and does not exist is reported at once as a
missing local folder, and a repository id is looked up in the Hugging Face cache only when the Hub cannot be reached
(``HF_HUB_OFFLINE`` set, or one request to the endpoint fails within a few seconds), failing in one line when it is
not cached.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``name`` or ``namespace/name`` of word characters, ``-`` and ``.`` (the Hub's rule for repository ids).
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")

#: Seconds the reachability request may take before the Hub counts as unreachable.
PROBE_TIMEOUT_S = 5.0


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repository id: one or two ``/``-separated parts of word characters, ``-`` and
    ``.``, none starting or ending with ``-`` or ``.``, no ``--`` or ``..``, at most 96 characters."""
    if not _REPO_ID.match(name) or len(name) > 96 or "--" in name or ".." in name:
        return False
    return all(part[0] not in "-." and part[-1] not in "-." for part in name.split("/"))


def local_or_repo_id(name_or_path: str | Path, what: str) -> Path | str:
    """``name_or_path`` as an existing local :class:`~pathlib.Path`, or as a repository id (a ``str``) when nothing
    exists there and the name can be one; otherwise a ``FileNotFoundError`` naming the missing folder (``what`` says
    what it should hold, e.g. ``"tokenizer"``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if isinstance(name_or_path, str) and looks_like_repo_id(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"{what} folder {name_or_path} does not exist; pass an existing local folder")


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be used now (``HF_HUB_OFFLINE`` is set, or one HEAD request to the endpoint, through
    ``huggingface_hub``'s own session and so its proxies, fails within ``timeout`` seconds), or ``None`` if it can.
    Any HTTP response, an error status included, means it is reachable."""
    from huggingface_hub import constants, get_session

    # huggingface_hub reads the variable once, on import; a value set later (a notebook, a test) counts too.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any failure of this one request; its types depend on huggingface_hub's version
        return f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__})"
    return None


def offline_snapshot(
    repo_id: str, what: str, *, cache_dir: str | Path | None = None, revision: str | None = None
) -> Path | None:
    """``None`` when the Hub can be used (the caller's loader then resolves ``repo_id`` as usual); otherwise the
    folder of its snapshot in the Hugging Face cache, read without the network, or a one-line ``FileNotFoundError``
    saying what to do when it is not cached (``what`` names the thing, e.g. ``"tokenizer"``)."""
    reason = hub_unreachable()
    if reason is None:
        return None
    import huggingface_hub

    try:
        found = huggingface_hub.snapshot_download(
            repo_id, cache_dir=cache_dir, revision=revision, local_files_only=True
        )
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: nothing cached for this revision
        raise FileNotFoundError(
            f"{what} {repo_id} is not a local folder nor in the Hugging Face cache, and the Hub cannot be used "
            f"({reason}): download it where there is a network (hf download {repo_id} --local-dir DIR) and pass DIR"
        ) from None
    return Path(found)


__all__ = ["PROBE_TIMEOUT_S", "hub_unreachable", "local_or_repo_id", "looks_like_repo_id", "offline_snapshot"]
