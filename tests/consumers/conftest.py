"""Stage fixtures live in tests/conftest.py; the type is re-exported for the stage tests."""

from tests.conftest import RunnerFactory

__all__ = ["RunnerFactory"]
