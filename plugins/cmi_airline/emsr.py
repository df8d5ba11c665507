"""EMSR-b: Belobaba's expected marginal seat revenue heuristic, version b.

A flight's fare classes are ordered by fare, highest first (class 1 is the dearest). EMSR-b
protects seats for the higher classes from the lower ones, one *nest* at a time: nest ``j``
is classes ``1..j`` taken together, as if they were one class with

* mean demand ``mu_j = mu_1 + ... + mu_j``,
* standard deviation ``sigma_j = sqrt(sigma_1**2 + ... + sigma_j**2)`` (independent,
  normally distributed demands), and
* the demand-weighted fare ``F_j = (f_1 mu_1 + ... + f_j mu_j) / mu_j``.

The protection level ``y_j`` of nest ``j`` is the number of seats at which one more seat
kept for the nest is expected to earn exactly what selling it to class ``j + 1`` earns
now (Littlewood's rule applied to the nest)::

    F_j * P(D_j > y_j) = f_(j+1)   so   y_j = mu_j + sigma_j * z,
                                        z = Phi^-1(1 - f_(j+1) / F_j)

Class ``j + 1`` may then sell what is left once ``y_j`` seats are kept aside: the nested
booking limit ``b_(j+1) = C - y_j``. The example every text checks against is Talluri &
van Ryzin's (*The Theory and Practice of Revenue Management*, 2004, table 2.3): fares
1050, 567, 534, 520, means 17.3, 45.1, 39.6, 34.0 and deviations 5.8, 15.0, 13.2, 11.3
give protection levels 16.72, 50.94 and 83.15.

Everything here is plain arithmetic on floats: these are forecasts, not money. The
plugin turns what it needs into :class:`~decimal.Decimal` at the edge, rounding in the
airline's favour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from statistics import NormalDist

__all__ = ["bid_price", "booking_limits", "marginal_seat_revenue", "protection_levels"]

_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class _Nest:
    """Classes ``1..j`` pooled: their demand's mean and deviation, and weighted fare."""

    mean: float
    sd: float
    weighted_fare: float

    def tail(self, seats: float) -> float:
        """P(D_j >= seats): the chance the nest's demand reaches ``seats``."""
        return 1.0 - NormalDist(self.mean, self.sd).cdf(seats)


def _check(
    fares: Sequence[Decimal | float], means: Sequence[float], sds: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    if not (len(fares) == len(means) == len(sds)):
        raise ValueError(
            f"fares, means and sds must have one entry per class; got {len(fares)},"
            f" {len(means)} and {len(sds)}"
        )
    if not fares:
        raise ValueError("at least one fare class is needed")
    f = [float(x) for x in fares]
    m = [float(x) for x in means]
    s = [float(x) for x in sds]
    for name, values in (("fare", f), ("mean", m), ("sd", s)):
        for i, value in enumerate(values):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} of class {i + 1} must be a positive number, not {value}")
    for i in range(1, len(f)):
        if f[i] >= f[i - 1]:
            raise ValueError(
                "fares must be strictly decreasing (highest first); class"
                f" {i + 1}'s fare {fares[i]} is not below class {i}'s {fares[i - 1]}"
            )
    return f, m, s


def _nests(f: list[float], m: list[float], s: list[float]) -> list[_Nest]:
    nests = []
    mean = variance = revenue = 0.0
    for fare, mu, sigma in zip(f, m, s, strict=True):
        mean += mu
        variance += sigma * sigma
        revenue += fare * mu
        nests.append(_Nest(mean, math.sqrt(variance), revenue / mean))
    return nests


def protection_levels(
    fares: Sequence[Decimal | float], means: Sequence[float], sds: Sequence[float]
) -> list[float]:
    """EMSR-b's nested protection levels: ``y_j`` seats kept for classes ``1..j``.

    :param fares: the fare of each class, highest first, strictly decreasing.
    :param means: each class's mean demand (positive).
    :param sds: each class's standard deviation of demand (positive).
    :return: ``n - 1`` levels, ``y_1 .. y_(n-1)`` (none for a single class). A negative
        solution means the nest needs no seats kept for it and is clamped to 0.

        The levels are made nested (each at least the one before it): ``y_j`` protects
        classes ``1..j``, which include classes ``1..j-1``, so it cannot sensibly be the
        smaller. The formula alone can dip when a class adds little mean demand but much
        variance and its fare is close to the next one's; the running maximum then keeps
        the earlier level. It never changes levels that are already nested (Talluri & van
        Ryzin's example is reproduced exactly).
    :raises ValueError: the sequences differ in length or are empty; a fare, mean or
        deviation is not a positive finite number; the fares do not strictly decrease.
    """
    f, m, s = _check(fares, means, sds)
    levels: list[float] = []
    floor = 0.0
    for j, nest in enumerate(_nests(f, m, s)[:-1]):
        # F_j is a weighted mean of fares all above f_(j+1), so the ratio is in (0, 1).
        z = _STANDARD_NORMAL.inv_cdf(1.0 - f[j + 1] / nest.weighted_fare)
        floor = max(floor, nest.mean + nest.sd * z)
        levels.append(floor)
    return levels


def booking_limits(capacity: int, protection_levels: Sequence[float]) -> list[int]:
    """Nested booking limits: how many seats each class may sell out of ``capacity``.

    Class 1 may sell every seat; class ``j + 1`` may sell what is left once ``y_j`` seats
    are kept for classes ``1..j``: ``b_(j+1) = max(0, capacity - ceil(y_j))``. The limits
    are nested: a seat class ``j + 1`` may sell, every class above it may sell too.

    Protection levels are rounded **up**. ``y_j`` is where keeping one more seat for the
    nest stops paying; the whole-seat rule, "protect the smallest ``y`` for which
    ``F_j * P(D_j > y) <= f_(j+1)``", lands on ``ceil(y_j)``. The error it allows is one
    seat kept back too many for a dearer class, never one sold cheap that a later,
    dearer customer would have bought; the airline's own bid price (see
    :func:`marginal_seat_revenue`) then never exceeds the fare of a class these limits
    leave open.

    :param capacity: the seats left to sell (0 or more).
    :param protection_levels: ``y_1 .. y_(n-1)``, as :func:`protection_levels` returns.
    :return: ``n`` limits, class 1's first; non-increasing, each in ``0..capacity``.
    :raises ValueError: capacity is negative; a level is negative, not finite, or smaller
        than the one before it.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be a whole number of seats, 0 or more, not {capacity!r}")
    previous = 0.0
    for j, level in enumerate(protection_levels):
        if not math.isfinite(level) or level < 0:
            raise ValueError(f"protection level {j + 1} must be 0 or more, not {level}")
        if level < previous:
            raise ValueError(
                f"protection levels must be nested (non-decreasing); level {j + 1} ({level})"
                f" is below level {j} ({previous})"
            )
        previous = level
    return [capacity] + [max(0, capacity - math.ceil(y)) for y in protection_levels]


def marginal_seat_revenue(
    fares: Sequence[Decimal | float],
    means: Sequence[float],
    sds: Sequence[float],
    remaining: int,
    *,
    nest: int,
) -> float:
    """The expected revenue the last of ``remaining`` seats earns from classes ``1..nest``.

    ``F_nest * P(D_nest >= remaining)``: the seat is sold only if the nest's demand reaches
    it, and then at the nest's weighted fare. This is the quantity EMSR-b weighs against
    the fare of class ``nest + 1`` (it is what defines ``y_nest``), so it is the
    displacement cost of selling that class: whenever :func:`booking_limits` leaves class
    ``nest + 1`` open for a seat, that seat's value here is below the class's fare.

    :param fares: as for :func:`protection_levels`.
    :param means: as for :func:`protection_levels`.
    :param sds: as for :func:`protection_levels`.
    :param remaining: the seats left (1 or more); the value is that of the last of them.
    :param nest: how many classes, from the highest, the seat is kept for (1 to n).
    :raises ValueError: as :func:`protection_levels`; ``remaining`` below 1; ``nest`` out
        of range.
    """
    f, m, s = _check(fares, means, sds)
    _check_remaining(remaining)
    if isinstance(nest, bool) or not isinstance(nest, int) or not 1 <= nest <= len(f):
        raise ValueError(f"nest must be a number of classes from 1 to {len(f)}, not {nest!r}")
    pooled = _nests(f, m, s)[nest - 1]
    return pooled.weighted_fare * pooled.tail(remaining)


def bid_price(
    fares: Sequence[Decimal | float],
    means: Sequence[float],
    sds: Sequence[float],
    remaining: int,
) -> float:
    """The expected marginal value of the last seat when ``remaining`` are left.

    ``max over j = 1..n-1 of F_j * P(D_j >= remaining)``: what the seat is worth to the
    nest that values it most (with a single class, to that class itself). It decreases as
    ``remaining`` grows.

    This is an approximation, and a conservative one. Each nest is treated as one class
    with normal demand and its average fare (the customer who takes the last seat is in
    truth more likely to pay a lower fare of the nest than its average); demand still to
    come is the whole forecast, not what is left of it; and taking the largest nest's value
    ignores that a seat can be used only once. Because a nest includes the classes below
    the top one, the bid price can exceed the fare of a class EMSR-b's booking limits leave
    open: to decide on one class, use :func:`marginal_seat_revenue` with the nest above it,
    as the reference airline does.

    :param fares: as for :func:`protection_levels`.
    :param means: as for :func:`protection_levels`.
    :param sds: as for :func:`protection_levels`.
    :param remaining: the seats left (1 or more).
    :return: the value, in the fares' currency, as a float (``Decimal(str(value))``
        converts it; round it up to the currency's minor units for a floor).
    :raises ValueError: as :func:`protection_levels`; ``remaining`` below 1.
    """
    f, m, s = _check(fares, means, sds)
    _check_remaining(remaining)
    nests = _nests(f, m, s)
    return max(nest.weighted_fare * nest.tail(remaining) for nest in nests[: max(1, len(f) - 1)])


def _check_remaining(remaining: int) -> None:
    if isinstance(remaining, bool) or not isinstance(remaining, int) or remaining < 1:
        raise ValueError(f"remaining must be a whole number of seats, 1 or more, not {remaining!r}")
