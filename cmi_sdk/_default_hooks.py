"""The SDK's own behaviour for the emission hooks, as an ordinary default plugin.

Every implementation here is ``trylast``, so any plugin a firm registers answers first.
"""

from __future__ import annotations

import datetime as dt

from cmi_sdk._models import SharingTerms, TermsDecision, TermsPolicy, TermsProposal
from cmi_sdk.hookspecs import hookimpl

__all__ = ["cmi_review_terms", "cmi_select_standard"]


@hookimpl(trylast=True)
def cmi_select_standard(terms: SharingTerms) -> tuple[str, str | None]:
    """The standard and document type the customer's terms name."""
    return terms.standard, terms.document_type


@hookimpl(trylast=True)
def cmi_review_terms(
    proposal: TermsProposal, policy: TermsPolicy, now: dt.datetime
) -> TermsDecision:
    """Judge a proposal against the firm's published policy.

    A purpose the firm does not accept, or pull-only terms when the firm does not offer
    pull, is rejected: no change the firm could propose keeps the customer's intent. What
    can be brought inside the policy gets one alternative that changes only that: the
    digest interval, the timing, or the period the terms hold for.
    """
    if policy.purposes is not None and proposal.purpose.code not in policy.purposes:
        accepted = ", ".join(policy.purposes) or "none"
        return TermsDecision(
            outcome="rejected",
            reason=f"the firm does not share data for purpose {proposal.purpose.code!r}"
            f" (it accepts: {accepted})",
        )
    changes: dict[str, object] = {}
    reasons: list[str] = []
    hours = proposal.digest_hours
    timing = "digest" if hours is not None else proposal.when
    if timing not in policy.timings:
        if timing == "pull":
            return TermsDecision(
                outcome="rejected", reason="the firm does not offer pull-only terms"
            )
        # A push the firm does not offer this way: propose the other push timing.
        if timing == "now" and "digest" in policy.timings:
            changes["when"] = f"digest:{policy.min_digest_hours}h"
            reasons.append("the firm sends documents in digests, not one at a time")
        elif timing == "digest" and "now" in policy.timings:
            changes["when"] = "now"
            reasons.append("the firm sends documents at once, not in digests")
        else:
            return TermsDecision(outcome="rejected", reason="the firm offers pull-only terms")
    elif hours is not None:
        bounded = min(max(hours, policy.min_digest_hours), policy.max_digest_hours)
        if bounded != hours:
            changes["when"] = f"digest:{bounded}h"
            reasons.append(
                f"digests are every {policy.min_digest_hours} to {policy.max_digest_hours} hours"
            )
    if policy.max_duration_days is not None:
        latest = now + dt.timedelta(days=policy.max_duration_days)
        if proposal.until is None or proposal.until > latest:
            changes["until"] = latest.replace(microsecond=0)
            reasons.append(f"the firm keeps terms for at most {policy.max_duration_days} days")
    if not changes:
        return TermsDecision(outcome="accepted")
    alternative = TermsProposal.model_validate({**proposal.model_dump(), **changes})
    return TermsDecision(outcome="alternative", reason="; ".join(reasons), alternative=alternative)
