"""ISO 4217 currency codes and their minor units.

The table holds the codes whose minor unit ISO 4217 defines (precious metals, testing and
"no currency" codes, whose minor unit is "N.A.", are left out: money is never counted in
them). It includes codes recently withdrawn that still appear on historic transactions
(ANG, BGN, CUC, SLL, ZWL).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = ["MINOR_UNITS", "minor_units"]

_TABLE: dict[int, str] = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: (
        "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD "
        "BTN BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD "
        "EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR "
        "IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP "
        "MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN "
        "QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL "
        "THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR "
        "ZMW ZWG ZWL"
    ),
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}

MINOR_UNITS: Final = MappingProxyType(
    {code: digits for digits, codes in _TABLE.items() for code in codes.split()}
)
"""Read-only mapping of ISO 4217 alphabetic code to its number of minor-unit digits."""


def minor_units(code: str) -> int:
    """Return the number of decimal places the currency ``code`` uses.

    :raises KeyError: the code is not an ISO 4217 currency with defined minor units.
    """
    return MINOR_UNITS[code]
