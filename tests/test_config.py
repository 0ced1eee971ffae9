"""Settings are checked in one place (`diffmem.config`): every value is in range or one InputError line naming the
option, whatever the value (fuzzed)."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffmem.config import Config, setting
from diffmem.errors import InputError


@dataclass(frozen=True)
class Demo(Config):
    budget = {"generations*batch_size": 1000}

    generations: int = setting(1, option="--generations", ge=1, le=100)
    batch_size: int = setting(8, option="--batch-size", ge=1)
    guidance_scale: float | None = setting(None, option="--guidance", gt=1)
    sigma: float = setting(0.1, option="--sigma", ge=0)
    method: str = setting("a", option="--method", choices=("a", "b"))
    flag: bool = setting(False, option="--flag")
    steps: str | int = setting("first", option="--steps")

    def check(self) -> None:
        if self.method == "b" and self.sigma == 0:
            raise InputError("--method b needs --sigma above 0")


def test_defaults_and_conversion() -> None:
    demo = Demo(sigma=1, generations=4.0)
    assert demo.sigma == 1.0 and isinstance(demo.sigma, float)
    assert demo.generations == 4 and isinstance(demo.generations, int)
    assert demo.guidance_scale is None and demo.steps == "first"
    with pytest.raises(FrozenInstanceError):
        demo.sigma = 2.0  # type: ignore[misc]
    assert demo.replace(sigma=0.5).sigma == 0.5 and demo.sigma == 1.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"generations": 0}, "--generations must be a whole number from 1 to 100, not 0"),
    ({"generations": 2.5}, "--generations must be a whole number from 1 to 100, not 2.5"),
    ({"generations": True}, "--generations must be a whole number"),
    ({"guidance_scale": 1.0}, "--guidance must be a finite number above 1, or left out, not 1.0"),
    ({"guidance_scale": math.inf}, "--guidance must be a finite number above 1"),
    ({"sigma": math.nan}, "--sigma must be a finite number from 0, not nan"),
    ({"sigma": "0.1"}, "--sigma must be a finite number from 0, not '0.1'"),
    ({"method": "c"}, "--method must be one of a, b, not 'c'"),
    ({"flag": 1}, "--flag must be true or false, not 1"),
    ({"generations": 100, "batch_size": 11}, "--generations x --batch-size is 1100, over the budget of 1000"),
    ({"method": "b", "sigma": 0.0}, "--method b needs --sigma above 0"),
    ({"generations": 10**30}, "--generations must be a whole number from 1 to 100, not 10000000000"),
])
def test_each_bad_value_is_one_line_naming_the_option(changes: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        Demo(**changes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_from_values_takes_declared_fields_and_refuses_foreign_ones_when_strict() -> None:
    demo = Demo.from_values({"sigma": 0.3, "k": None, "other": 5, "guidance_scale": None})
    assert demo.sigma == 0.3 and demo.guidance_scale is None
    assert Demo.from_values({"other": None}, strict=True) == Demo()
    with pytest.raises(InputError, match="--other does not apply here"):
        Demo.from_values({"other": 5}, strict=True)
    assert Demo.rule("guidance_scale").option == "--guidance"
    assert "sigma" in Demo.names() and Demo().to_dict()["sigma"] == 0.1


VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(generations=VALUES, batch_size=VALUES, guidance=VALUES, sigma=VALUES, method=VALUES, flag=VALUES)
def test_any_value_is_accepted_in_range_or_refused_in_one_line(generations, batch_size, guidance, sigma, method,
                                                                flag) -> None:
    values = {"generations": generations, "batch_size": batch_size, "guidance_scale": guidance, "sigma": sigma,
              "method": method, "flag": flag}
    try:
        demo = Demo.from_values(values)
    except InputError as exc:
        assert str(exc).startswith("--") and "\n" not in str(exc)
        return
    assert isinstance(demo.generations, int) and 1 <= demo.generations <= 100
    assert isinstance(demo.batch_size, int) and demo.batch_size >= 1
    assert demo.generations * demo.batch_size <= 1000
    assert demo.guidance_scale is None or (math.isfinite(demo.guidance_scale) and demo.guidance_scale > 1)
    assert isinstance(demo.sigma, float) and math.isfinite(demo.sigma) and demo.sigma >= 0
    assert demo.method in ("a", "b") and isinstance(demo.flag, bool)


def test_numpy_scalars_are_the_numbers_they_hold() -> None:
    """np.int64(4) was refused as "not a whole number" (it is no Python int); a numpy bool is still no number."""
    import numpy as np

    demo = Demo(generations=np.int64(4), batch_size=np.int32(2), guidance_scale=np.float32(7.5))
    assert (demo.generations, demo.batch_size, demo.guidance_scale) == (4, 2, 7.5)
    assert type(demo.generations) is int and type(demo.guidance_scale) is float
    for bad in (np.bool_(True), np.float64(1.5)):
        with pytest.raises(InputError, match="--generations must be"):
            Demo(generations=bad)
