"""``python -m cmi_sdk.cli``: the ``cmi`` command."""

from __future__ import annotations

import sys

from cmi_sdk.cli import main

sys.exit(main())
