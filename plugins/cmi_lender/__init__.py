"""A reference lender firm: loan requests answered from a risk-tier table and a daily
lending limit, through the request-to-offer hooks. Register an instance::

    from cmi_lender import ReferenceLender

    adapter = Adapter(plugins=[ReferenceLender(database="lender.db", daily_limit=limit)])
"""

from __future__ import annotations

from cmi_lender.plugin import (
    CREDIT_BAND,
    DEFAULT_RISK_TIERS,
    MAX_TERM_MONTHS,
    RATE_LOCK,
    LimitReached,
    ReferenceLender,
    RiskTier,
    credit_evidence,
)

__all__ = [
    "CREDIT_BAND",
    "DEFAULT_RISK_TIERS",
    "MAX_TERM_MONTHS",
    "RATE_LOCK",
    "LimitReached",
    "ReferenceLender",
    "RiskTier",
    "credit_evidence",
]
