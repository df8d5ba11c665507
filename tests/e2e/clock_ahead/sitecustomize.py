"""Run a Python process with its clock moved ahead by ``CMI_TEST_CLOCK_AHEAD`` seconds.

Put on ``PYTHONPATH`` by the test that runs the documented commands a year from now: the
wall clock Python reads (``time.time``, ``datetime.now``, ``date.today``) moves; monotonic
clocks, which only measure intervals, do not.
"""

from __future__ import annotations

import datetime as _dt
import os
import time as _time

_AHEAD = float(os.environ.get("CMI_TEST_CLOCK_AHEAD", "0") or 0)

if _AHEAD:
    _real_time = _time.time
    _real_time_ns = _time.time_ns
    _real_datetime = _dt.datetime
    _real_date = _dt.date

    def _time_ahead() -> float:
        return _real_time() + _AHEAD

    def _time_ns_ahead() -> int:
        return _real_time_ns() + int(_AHEAD * 1e9)

    class _SameTypes(type):
        # C code (and pydantic) makes plain datetimes and dates: they are still ones.
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, cls.__mro__[1])

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, cls.__mro__[1])

    class _DatetimeAhead(_real_datetime, metaclass=_SameTypes):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return cls.fromtimestamp(_time_ahead(), tz)

        @classmethod
        def utcnow(cls):  # type: ignore[no-untyped-def]
            return cls.fromtimestamp(_time_ahead(), _dt.UTC).replace(tzinfo=None)

        @classmethod
        def today(cls):  # type: ignore[no-untyped-def]
            return cls.fromtimestamp(_time_ahead())

    class _DateAhead(_real_date, metaclass=_SameTypes):
        @classmethod
        def today(cls):  # type: ignore[no-untyped-def]
            return cls.fromtimestamp(_time_ahead())

    _time.time = _time_ahead
    _time.time_ns = _time_ns_ahead
    _dt.datetime = _DatetimeAhead  # type: ignore[misc]
    _dt.date = _DateAhead  # type: ignore[misc]
