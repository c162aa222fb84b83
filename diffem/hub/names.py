"""Names, tokens and secrets of publishing: repo ids, revisions, the Hub token, :class:`PublishError`.

A leaf module (standard library only; ``huggingface_hub`` inside the functions that need it), so
that the configuration (:meth:`diffem.config.EMConfig.validate` checks ``hub.repo_id``) and the
pipeline loader (:func:`diffem.pipeline.published_index`) may use it from below the Hub layer.

Secrets: the token is given to the API client only; every message that could quote it passes
through :func:`redact`.
"""

from __future__ import annotations

import os
import re

__all__ = ["PublishError", "revision_name", "check_repo_id", "hub_offline", "resolve_token", "redact"]

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class PublishError(ValueError):
    """A problem found before anything is uploaded; the message names what to fix (never the token)."""


def revision_name(lap: int) -> str:
    """The branch of lap ``lap``: ``lap-KK`` (``lap-03``)."""
    if isinstance(lap, bool) or not isinstance(lap, int) or lap < 0:
        raise ValueError(f"`lap` must be a non-negative integer, got {lap!r}")
    return f"lap-{lap:02d}"


def check_repo_id(repo_id) -> str:
    """``repo_id`` if it has the form ``namespace/name`` that the Hub accepts.

    Raises:
        PublishError: for anything else (no namespace, empty parts, characters other than
            letters, digits, ``-``, ``_``, ``.``, ``--`` or ``..`` inside, a trailing ``.git``).
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    ok = (
        len(parts) == 2
        and all(_REPO_NAME.match(p) for p in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith((".", "-", ".git"))
    )
    if not ok:
        raise PublishError(
            f"repo id {repo_id!r} has a bad format: expected `namespace/name` (your user or organisation, "
            "a slash, the model name; letters, digits, '-', '_' and '.' only), e.g. `someone/diffem-manifold`"
        )
    return repo_id


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, now or at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def resolve_token(token: str | None = None) -> str | None:
    """The token to upload with: ``token``, else ``$HF_TOKEN``, else huggingface_hub's login (``hf auth login``)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced by ``***``."""
    text = str(text)
    if token:
        text = text.replace(token, "***")
    return text
