"""Row mapping both bundled stores share: their columns come back in the same order, so
one function turns a row into its model for SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from cmi_sdk._models import Link, SharingTerms
from cmi_sdk._secrets import SecretsKeyring, open_secret

__all__ = ["link_of_row", "terms_of_row", "utc"]


def terms_of_row(values: Sequence[Any], keyring: SecretsKeyring | None) -> SharingTerms:
    """Terms from their JSON and their (perhaps sealed) secret."""
    data = json.loads(values[0])
    data["secret"] = open_secret(keyring, values[1], context=f"terms:{data['id']}")
    return SharingTerms.model_validate(data)


def link_of_row(values: Sequence[Any]) -> Link:
    """A link from its columns: id, account, intermediary, reference, created, revoked."""
    return Link.model_validate(
        {
            "id": values[0],
            "account": values[1],
            "intermediary": values[2],
            "customer_ref": values[3],
            "created_at": utc(values[4]),
            "revoked_at": None if values[5] is None else utc(values[5]),
        }
    )


def utc(timestamp: float) -> dt.datetime:
    """A POSIX timestamp as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)
