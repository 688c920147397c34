"""Small helpers shared by the argument checks."""

import numbers
from typing import Any, TypeGuard


def is_number(value: Any) -> TypeGuard[float]:
    """Whether ``value`` is a real number (Python's or NumPy's), a bool excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an integer (Python's or NumPy's), a bool excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
