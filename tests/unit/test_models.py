"""The canonical models: money, times, pseudonymity and consistency rules."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from cmi_sdk import (
    CMIError,
    Constraints,
    ModelValidationError,
    Money,
    Offer,
    Request,
    Transaction,
    load_model,
)


@pytest.mark.parametrize(
    ("amount", "currency", "held"),
    [
        ("5.7", "USD", "5.70"),
        ("1000", "JPY", "1000"),
        ("1.5", "KWD", "1.500"),
        ("0.1234", "CLF", "0.1234"),
        ("-0.00", "EUR", "0.00"),
        (Decimal("451.890"), "USD", "451.89"),
        (7, "USD", "7.00"),
    ],
)
def test_money_holds_the_currency_minor_units(amount: Any, currency: str, held: str) -> None:
    money = Money(amount=amount, currency=currency)
    assert str(money.amount) == held
    assert money.minor_units == len(held.partition(".")[2])


@pytest.mark.parametrize(
    ("amount", "currency", "message"),
    [
        ("451.891", "USD", "more decimal places than USD allows"),
        ("1.5", "JPY", "more decimal places than JPY allows"),
        ("0.0001", "KWD", "more decimal places than KWD allows"),
        (451.89, "USD", "floats are refused"),
        (True, "USD", "boolean"),
        ("NaN", "USD", "finite"),
        ("Infinity", "USD", "finite"),
        ("1e18", "USD", "smaller than 10\\*\\*18"),
        ("1", "XXX", "not an ISO 4217 currency"),
        ("1", "usd", "not an ISO 4217 currency"),
    ],
)
def test_money_refuses(amount: Any, currency: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Money(amount=amount, currency=currency)


def test_largest_amount_is_accepted() -> None:
    assert Money(amount="999999999999999999.99", currency="USD").amount == Decimal(
        "999999999999999999.99"
    )


def test_money_addition_checks_currency() -> None:
    total = Money(amount="1.10", currency="USD") + Money(amount="2.20", currency="USD")
    assert total == Money(amount="3.30", currency="USD")
    with pytest.raises(ValueError, match="cannot add EUR to USD"):
        _ = Money(amount="1", currency="USD") + Money(amount="1", currency="EUR")


def _ticket(examples_dir: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((examples_dir / "ticket.json").read_text())
    return data


def test_json_float_amounts_are_refused(examples_dir: Any) -> None:
    data = _ticket(examples_dir)
    data["total"]["amount"] = 451.89
    with pytest.raises(ModelValidationError) as info:
        load_model(Transaction, json.dumps(data))
    assert [(i.path, "floats are refused" in i.reason) for i in info.value.issues] == [
        ("total.amount", True)
    ]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, CMIError)


def test_times_are_aware_and_utc(examples_dir: Any) -> None:
    data = _ticket(examples_dir)
    data["occurred_at"] = "2003-06-02T10:05:00-04:00"
    tx = load_model(Transaction, data)
    assert tx.occurred_at == dt.datetime(2003, 6, 2, 14, 5, tzinfo=dt.UTC)
    assert tx.occurred_at.utcoffset() == dt.timedelta(0)
    data["occurred_at"] = "2003-06-02T10:05:00"
    with pytest.raises(ModelValidationError, match="occurred_at: must be timezone-aware"):
        load_model(Transaction, data)


@pytest.mark.parametrize("ref", ["Jane Doe", "jane@example.com", "ab", "-lead", "x" * 129])
def test_customer_ref_is_pseudonymous(examples_dir: Any, ref: str) -> None:
    data = _ticket(examples_dir)
    data["customer_ref"] = ref
    with pytest.raises(ModelValidationError, match="customer_ref: must be a pseudonymous token"):
        load_model(Transaction, data)


def test_details_must_match_kind(examples_dir: Any) -> None:
    data = _ticket(examples_dir)
    data["kind"] = "purchase"
    with pytest.raises(ModelValidationError):
        load_model(Transaction, data)
    data = _ticket(examples_dir)
    del data["details"]
    with pytest.raises(ModelValidationError, match="needs FlightDetails"):
        load_model(Transaction, data)


def test_total_must_be_the_sum_of_items(examples_dir: Any) -> None:
    data = _ticket(examples_dir)
    item = {
        "description": "fare",
        "quantity": "2",
        "unit_price": {"amount": "200.00", "currency": "USD"},
        "amount": {"amount": "400.00", "currency": "USD"},
    }
    data["items"] = [item]
    with pytest.raises(ModelValidationError, match="not the sum of the line items"):
        load_model(Transaction, data)
    data["total"]["amount"] = "400.00"
    assert load_model(Transaction, data).total.amount == Decimal("400.00")
    item["amount"] = {"amount": "399.99", "currency": "USD"}
    with pytest.raises(ModelValidationError, match="quantity \\* unit_price"):
        load_model(Transaction, data)
    item["amount"] = {"amount": "400.00", "currency": "EUR"}
    with pytest.raises(ModelValidationError, match="same currency"):
        load_model(Transaction, data)


def test_unknown_fields_are_refused_and_models_are_frozen(examples_dir: Any) -> None:
    data = _ticket(examples_dir)
    data["nickname"] = "x"
    with pytest.raises(ModelValidationError, match="nickname: Extra inputs are not permitted"):
        load_model(Transaction, data)
    tx = load_model(Transaction, _ticket(examples_dir))
    with pytest.raises(ValidationError):
        tx.id = "other"  # type: ignore[misc]


def test_request_rules(examples_dir: Any) -> None:
    data = json.loads((examples_dir / "request.json").read_text())
    request = load_model(Request, data)
    assert request.wanted.kind == "flight"
    assert request.constraints.max_price == Money(amount="600", currency="USD")
    bad = {**data, "respond_by": data["created_at"]}
    with pytest.raises(ModelValidationError, match="respond_by must be after created_at"):
        load_model(Request, bad)
    bad = {**data, "kind": "loan"}
    with pytest.raises(ModelValidationError):
        load_model(Request, bad)
    with pytest.raises(ValidationError, match="earliest_date is after latest_date"):
        Constraints(earliest_date=dt.date(2026, 7, 2), latest_date=dt.date(2026, 7, 1))


def test_offer_rules(examples_dir: Any) -> None:
    data = json.loads((examples_dir / "offer.json").read_text())
    offer = load_model(Offer, data)
    assert offer.valid_until > offer.valid_from
    bad = {**data, "valid_until": data["valid_from"]}
    with pytest.raises(ModelValidationError, match="valid_until must be after valid_from"):
        load_model(Offer, bad)
    bad = {**data, "items": []}
    with pytest.raises(ModelValidationError, match="items"):
        load_model(Offer, bad)


def test_load_model_reports_bad_json() -> None:
    with pytest.raises(ModelValidationError, match="Expecting property name"):
        load_model(Transaction, "{not json")
    with pytest.raises(ModelValidationError):
        load_model(Transaction, b"\xff\xfe")
