"""Task refuses geometry it cannot tile, with a ValueError that names the argument."""

from __future__ import annotations

import pytest

from luigi_daisy import Roi, Task


def _nothing(block):
    return None


def make_task(
    total_roi=Roi((0, 0), (100, 100)),
    read_roi=Roi((0, 0), (10, 10)),
    write_roi=Roi((2, 2), (6, 6)),
    fit="valid",
):
    return Task(
        "a",
        total_roi=total_roi,
        read_roi=read_roi,
        write_roi=write_roi,
        process_function=_nothing,
        read_write_conflict=True,
        fit=fit,
    )


def assert_refused(arguments, **kwargs):
    """Task(**kwargs) raises a ValueError whose message names one of ``arguments``."""
    with pytest.raises(ValueError) as excinfo:
        make_task(**kwargs)
    message = str(excinfo.value)
    assert any(argument in message for argument in arguments), (
        f"error message does not name any of {arguments}: {message!r}"
    )


def test_valid_geometry_is_accepted():
    make_task()
    make_task(fit="overhang")
    make_task(fit="shrink")
    # read == write (no context) and total == one read roi are fine
    make_task(total_roi=Roi((5,), (10,)), read_roi=Roi((0,), (10,)), write_roi=Roi((0,), (10,)))


@pytest.mark.parametrize(
    "kwargs, arguments",
    [
        (dict(total_roi=Roi((0, 0, 0), (100, 100, 100))), ("total_roi",)),
        (dict(read_roi=Roi((0, 0, 0), (10, 10, 10))), ("read_roi", "write_roi")),
        (dict(write_roi=Roi((2,), (6,))), ("write_roi", "read_roi")),
        (
            dict(
                total_roi=Roi((0,), (100,)),
                read_roi=Roi((0, 0), (10, 10)),
                write_roi=Roi((2, 2), (6, 6)),
            ),
            ("total_roi", "read_roi"),
        ),
    ],
    ids=["total_3d", "read_3d", "write_1d", "total_1d"],
)
def test_dimension_mismatch(kwargs, arguments):
    assert_refused(arguments, **kwargs)


@pytest.mark.parametrize(
    "kwargs, arguments",
    [
        (dict(read_roi=Roi((0, 0), (10, 0)), write_roi=Roi((0, 0), (10, 0))), ("read_roi", "write_roi")),
        (dict(write_roi=Roi((2, 2), (0, 6))), ("write_roi",)),
        (dict(write_roi=Roi((2, 2), (6, -1))), ("write_roi",)),
        (dict(read_roi=Roi((0, 0), (-10, 10))), ("read_roi", "write_roi")),
        (dict(total_roi=Roi((0, 0), (0, 100))), ("total_roi",)),
        (dict(total_roi=Roi((0, 0), (100, -100))), ("total_roi",)),
    ],
    ids=["read_and_write_empty", "write_empty", "write_negative", "read_negative",
         "total_empty", "total_negative"],
)
def test_empty_or_negative_shapes(kwargs, arguments):
    assert_refused(arguments, **kwargs)


@pytest.mark.parametrize(
    "write_roi",
    [
        Roi((2, 2), (9, 6)),  # sticks out at the high end
        Roi((-1, 2), (6, 6)),  # sticks out at the low end
        Roi((0, 0), (11, 11)),  # larger than read
        Roi((20, 20), (5, 5)),  # disjoint
    ],
    ids=["high", "low", "larger", "disjoint"],
)
def test_write_roi_not_inside_read_roi(write_roi):
    assert_refused(("write_roi", "read_roi"), write_roi=write_roi)


@pytest.mark.parametrize("fit", ["bogus", "VALID ", "", "overhanging"])
def test_unknown_fit(fit):
    assert_refused(("fit",), fit=fit)


@pytest.mark.parametrize("fit", ["valid", "overhang", "shrink"])
@pytest.mark.parametrize(
    "total_roi",
    [
        Roi((0, 0), (9, 100)),
        Roi((0, 0), (100, 9)),
        Roi((-5, -5), (9, 9)),
    ],
    ids=["short_dim0", "short_dim1", "short_both"],
)
def test_total_roi_smaller_than_read_roi(total_roi, fit):
    assert_refused(("total_roi", "read_roi"), total_roi=total_roi, fit=fit)
