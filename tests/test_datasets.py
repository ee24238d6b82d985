"""ROI-indexed zarr datasets: open_ds / prepare_ds, funlib.persistence metadata, alignment."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
import zarr
from funlib.geometry import Coordinate, Roi

from luigi_daisy.datasets import (
    Array,
    check_write_alignment,
    open_ds,
    prepare_ds,
)
from luigi_daisy.errors import DatasetError, LuigiDaisyError
from luigi_daisy.luigi import ZarrTarget

VOXEL_SIZE = (4, 2)
TOTAL_ROI = Roi((-8, 4), (40, 40))  # 10 x 20 voxels, negative offset


def ramp(shape, dtype=np.uint16):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------- round trips
def test_round_trip_in_world_units(tmp_path):
    path = tmp_path / "volume.zarr" / "raw"
    array = prepare_ds(path, TOTAL_ROI, VOXEL_SIZE, np.uint16, write_size=(8, 8),
                       units=["nm", "nm"], axis_names=["y", "x"])
    assert array.roi == TOTAL_ROI
    assert array.voxel_size == Coordinate(VOXEL_SIZE)
    assert array.offset == Coordinate(-8, 4)
    assert array.shape == (10, 20)
    assert array.chunk_shape == Coordinate(2, 4)
    assert array.dtype == np.uint16

    block = Roi((0, 12), (16, 8))  # voxels [2:6, 4:8]
    values = ramp((4, 4))
    array[block] = values
    np.testing.assert_array_equal(array[block], values)
    np.testing.assert_array_equal(array.data[2:6, 4:8], values)

    reopened = open_ds(path)
    assert reopened.roi == TOTAL_ROI
    assert reopened.voxel_size == Coordinate(VOXEL_SIZE)
    assert reopened.offset == Coordinate(-8, 4)
    assert reopened.axis_names == ["y", "x"]
    assert reopened.units == ["nm", "nm"]
    assert reopened.types == ["space", "space"]
    assert reopened.chunk_shape == Coordinate(2, 4)
    np.testing.assert_array_equal(reopened[block], values)
    whole = reopened[reopened.roi]
    assert whole.shape == (10, 20)
    assert whole.sum() == values.sum()


def test_3d_negative_offset_round_trip_and_coordinate_index(tmp_path):
    roi = Roi((-40, -8, 0), (80, 32, 24))
    array = prepare_ds(tmp_path / "a.zarr", roi, (40, 4, 4), np.float32, chunk_shape=(1, 4, 3))
    data = np.random.default_rng(0).random((2, 8, 6), dtype=np.float32)
    array[roi] = data
    np.testing.assert_array_equal(open_ds(tmp_path / "a.zarr")[roi], data)
    # a world coordinate picks the voxel it falls into
    assert array[Coordinate(0, -8, 4)] == data[1, 0, 1]
    assert array[Coordinate(39, -5, 7)] == data[1, 0, 1]
    np.testing.assert_array_equal(array.to_ndarray(), data)
    with pytest.raises(DatasetError, match="outside"):
        array[Coordinate(40, 0, 0)]


def test_scalar_write_broadcasts(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8, mode="w")
    array[Roi((-8, 4), (8, 4))] = 3
    assert array.data[:2, :2].tolist() == [[3, 3], [3, 3]]
    assert array.data[2:, 2:].sum() == 0


# --------------------------------------------------------------------------- fill values
def test_read_partly_outside_fills(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.int32)
    array[array.roi] = ramp((10, 20), np.int32) + 1
    # two voxels before the array in y, one after it in x
    roi = Roi((-16, 38), (16, 8))
    out = array[roi]
    assert out.shape == (4, 4)
    expected = np.zeros((4, 4), np.int32)
    expected[2:, :3] = (ramp((10, 20), np.int32) + 1)[:2, 17:20]
    np.testing.assert_array_equal(out, expected)

    array.fill_value = -1
    filled = array[roi]
    assert (filled[:2] == -1).all() and (filled[:, 3] == -1).all()
    np.testing.assert_array_equal(filled[2:, :3], expected[2:, :3])

    nines = array.to_ndarray(roi, fill_value=9)
    assert (nines[:2] == 9).all()
    np.testing.assert_array_equal(nines[2:, :3], expected[2:, :3])

    # wholly outside: all fill
    outside = array.to_ndarray(Roi((400, 400), (8, 4)), fill_value=5)
    assert outside.shape == (2, 2) and (outside == 5).all()


def test_open_ds_fill_value_and_unfit_fill_value(tmp_path):
    prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8)
    array = open_ds(tmp_path / "a.zarr", fill_value=200)
    assert (array[Roi((-16, 4), (8, 2))] == 200).all()
    with pytest.raises(DatasetError, match="fill value"):
        array.to_ndarray(Roi((-16, 4), (8, 2)), fill_value=-1)


# --------------------------------------------------------------------------- refusals
def test_misaligned_roi_is_refused_with_roi_and_voxel_size(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8)
    bad = Roi((-6, 4), (8, 4))  # begin -6 is not on the 4-grid counted from -8
    with pytest.raises(DatasetError) as excinfo:
        array[bad]
    assert str(bad) in str(excinfo.value) and "(4, 2)" in str(excinfo.value)
    with pytest.raises(DatasetError, match="voxel"):
        array[Roi((-8, 4), (8, 3))] = 1
    with pytest.raises(DatasetError, match="dimensions"):
        array[Roi((0, 0, 0), (4, 4, 4))]
    # DatasetError is a ValueError and a LuigiDaisyError
    assert issubclass(DatasetError, ValueError) and issubclass(DatasetError, LuigiDaisyError)


def test_write_outside_wrong_shape_and_read_only_are_refused(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8)
    with pytest.raises(DatasetError, match="not inside"):
        array[Roi((-16, 4), (16, 4))] = 1
    with pytest.raises(DatasetError, match="shape"):
        array[Roi((-8, 4), (8, 4))] = np.zeros((3, 3), np.uint8)
    read_only = open_ds(tmp_path / "a.zarr")
    with pytest.raises(DatasetError, match="read-only"):
        read_only[Roi((-8, 4), (8, 4))] = 1
    writable = open_ds(tmp_path / "a.zarr", mode="r+")
    writable[Roi((-8, 4), (8, 4))] = 1
    assert open_ds(tmp_path / "a.zarr").data[:2, :2].sum() == 4


def test_prepare_ds_refuses_misaligned_geometry(tmp_path):
    with pytest.raises(DatasetError, match="total_roi"):
        prepare_ds(tmp_path / "a.zarr", Roi((-6, 4), (40, 40)), VOXEL_SIZE, np.uint8)
    with pytest.raises(DatasetError, match="total_roi"):
        prepare_ds(tmp_path / "a.zarr", Roi((-8, 4), (42, 40)), VOXEL_SIZE, np.uint8)
    with pytest.raises(DatasetError, match="write_size"):
        prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8, write_size=(6, 8))
    with pytest.raises(DatasetError, match="chunk_shape"):
        prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8, write_size=(8, 8),
                   chunk_shape=(4, 4))
    with pytest.raises(DatasetError, match="dimensions"):
        prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, (4, 2, 2), np.uint8)
    with pytest.raises(DatasetError, match="mode"):
        prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8, mode="x")
    assert not (tmp_path / "a.zarr").exists()


# --------------------------------------------------------------------------- existing data
def test_prepare_ds_reuses_compatible_and_refuses_incompatible(tmp_path):
    path = tmp_path / "a.zarr"
    first = prepare_ds(path, TOTAL_ROI, VOXEL_SIZE, np.uint8, write_size=(8, 8))
    first[Roi((-8, 4), (8, 8))] = 7
    again = prepare_ds(path, TOTAL_ROI, VOXEL_SIZE, np.uint8, write_size=(8, 8))
    assert again.data[0, 0] == 7  # reused, not recreated
    # not asking for chunks accepts the existing ones
    assert prepare_ds(path, TOTAL_ROI, VOXEL_SIZE, np.uint8).chunk_shape == Coordinate(2, 4)

    cases = [
        (dict(total_roi=Roi((-8, 4), (40, 44))), "ROI"),
        (dict(total_roi=Roi((0, 4), (40, 40))), "ROI"),
        (dict(voxel_size=(2, 2), total_roi=TOTAL_ROI), "voxel size"),
        (dict(dtype=np.uint16), "dtype"),
        (dict(write_size=(16, 8)), "chunk shape"),
        (dict(units=["nm", "nm"]), "units"),
    ]
    for change, named in cases:
        arguments = dict(total_roi=TOTAL_ROI, voxel_size=VOXEL_SIZE, dtype=np.uint8,
                         write_size=(8, 8))
        arguments.update(change)
        with pytest.raises(DatasetError, match=named) as excinfo:
            prepare_ds(path, **arguments)
        assert "mode='w'" in str(excinfo.value)

    # mode "w" overwrites
    fresh = prepare_ds(path, Roi((0, 0), (8, 8)), (1, 1), np.float64, mode="w")
    assert open_ds(path).roi == Roi((0, 0), (8, 8)) and fresh.dtype == np.float64
    with pytest.raises(DatasetError, match="already exists"):
        prepare_ds(path, Roi((0, 0), (8, 8)), (1, 1), np.float64, mode="w-")
    with pytest.raises(DatasetError, match="no zarr array"):
        prepare_ds(tmp_path / "missing.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8, mode="r")


def test_open_ds_missing_path_and_group(tmp_path):
    missing = tmp_path / "nothing.zarr"
    with pytest.raises(DatasetError, match=str(missing)):
        open_ds(missing)
    group = zarr.open_group(str(tmp_path / "container.zarr"), mode="w")
    group.create_array("raw", shape=(4, 4), dtype="u1")
    with pytest.raises(DatasetError, match="group.*raw"):
        open_ds(tmp_path / "container.zarr")
    assert open_ds(tmp_path / "container.zarr" / "raw").shape == (4, 4)
    with pytest.raises(DatasetError, match="prepare_ds"):
        open_ds(tmp_path / "container.zarr" / "raw", mode="w")


def test_open_ds_defaults_without_metadata(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(3, 5, 6), dtype="f4")
    array = open_ds(tmp_path / "plain.zarr")
    assert array.voxel_size == Coordinate(1, 1, 1)
    assert array.offset == Coordinate(0, 0, 0)
    assert array.roi == Roi((0, 0, 0), (3, 5, 6))
    assert array.axis_names == ["d0", "d1", "d2"]
    assert array.units == ["", "", ""]
    assert array.types == ["space", "space", "space"]


def test_open_ds_reads_daisy1_resolution_and_axis_name_channels(tmp_path):
    data = zarr.create_array(str(tmp_path / "old.zarr"), shape=(2, 4, 4), dtype="u1",
                             zarr_format=2)
    data.attrs.update({"resolution": [8, 8], "offset": [16, 0], "axis_names": ["c^", "y", "x"]})
    array = open_ds(tmp_path / "old.zarr")
    assert array.voxel_size == Coordinate(8, 8)
    assert array.roi == Roi((16, 0), (32, 32))
    assert array.types == ["channel", "space", "space"]
    assert array.channel_shape == (2,)


def test_prepare_ds_fills_in_missing_metadata_of_a_plain_array(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="u1")
    prepare_ds(tmp_path / "plain.zarr", Roi((0, 0), (4, 4)), (1, 1), np.uint8)
    attrs = dict(open_ds(tmp_path / "plain.zarr").attrs)
    assert attrs["voxel_size"] == [1, 1] and attrs["types"] == ["space", "space"]


# --------------------------------------------------------------------------- metadata format
def test_attributes_match_funlib_persistence_format(tmp_path):
    """The attributes funlib.persistence 0.7's prepare_ds writes, key for key, in order."""
    prepare_ds(tmp_path / "a.zarr", Roi((-8, 4), (40, 40)), (4, 2), np.uint8, num_channels=2,
               axis_names=["c^", "y", "x"], units=["nm", "nm"], chunk_shape=(2, 4))
    stored = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    assert stored["zarr_format"] == 3
    assert list(stored["attributes"].items()) == [
        ("axis_names", ["c^", "y", "x"]),
        ("units", ["nm", "nm"]),
        ("voxel_size", [4, 2]),
        ("offset", [-8, 4]),
        ("types", ["channel", "space", "space"]),
    ]
    assert stored["shape"] == [2, 10, 20]
    assert stored["chunk_grid"]["configuration"]["chunk_shape"] == [2, 2, 4]

    prepare_ds(tmp_path / "b.zarr", Roi((0, 0), (10, 20)), (1, 1), np.float32, zarr_format=2)
    zattrs = json.loads((tmp_path / "b.zarr" / ".zattrs").read_text())
    assert list(zattrs.items()) == [
        ("axis_names", ["d0", "d1"]),
        ("units", ["", ""]),
        ("voxel_size", [1, 1]),
        ("offset", [0, 0]),
        ("types", ["space", "space"]),
    ]
    assert open_ds(tmp_path / "b.zarr").roi == Roi((0, 0), (10, 20))


def test_custom_metadata_is_stored_but_may_not_shadow_ours(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                       custom_metadata={"source": "test"})
    assert array.attrs["source"] == "test"
    with pytest.raises(DatasetError, match="voxel_size"):
        prepare_ds(tmp_path / "b.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                   custom_metadata={"voxel_size": [1, 1]})


# --------------------------------------------------------------------------- channels
def test_channel_dimensions_are_carried_through(tmp_path):
    array = prepare_ds(tmp_path / "affs.zarr", TOTAL_ROI, VOXEL_SIZE, np.float32,
                       num_channels=3, write_size=(8, 8))
    assert array.shape == (3, 10, 20)
    assert array.chunk_shape == Coordinate(3, 2, 4)
    assert array.types == ["channel", "space", "space"]
    assert array.axis_names == ["c0^", "d0", "d1"]
    assert array.roi == TOTAL_ROI
    block = Roi((0, 8), (8, 4))
    values = np.stack([np.full((2, 2), c, np.float32) for c in range(3)])
    array[block] = values
    np.testing.assert_array_equal(open_ds(tmp_path / "affs.zarr")[block], values)
    partly = array.to_ndarray(Roi((-16, 8), (16, 4)), fill_value=-1)
    assert partly.shape == (3, 4, 2)
    assert (partly[:, :2] == -1).all()
    with pytest.raises(DatasetError, match="shape"):
        array[block] = np.zeros((2, 2), np.float32).reshape(1, 2, 2).repeat(2, axis=0)


def test_channel_dimension_between_spatial_ones(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", Roi((0, 0), (8, 12)), (2, 3), np.uint8,
                       num_channels=2, types=["space", "channel", "space"],
                       axis_names=["y", "c^", "x"])
    assert array.shape == (4, 2, 4)
    values = ramp((2, 2, 2), np.uint8)
    array[Roi((2, 3), (4, 6))] = values
    reopened = open_ds(tmp_path / "a.zarr")
    assert reopened.types == ["space", "channel", "space"]
    np.testing.assert_array_equal(reopened[Roi((2, 3), (4, 6))], values)
    np.testing.assert_array_equal(reopened.data[1:3, :, 1:3], values)


def test_several_channel_dimensions(tmp_path):
    array = prepare_ds(tmp_path / "a.zarr", Roi((0, 0), (4, 4)), (1, 1), np.uint8,
                       num_channels=(2, 3))
    assert array.shape == (2, 3, 4, 4) and array.channel_shape == (2, 3)
    assert array[Roi((0, 0), (2, 2))].shape == (2, 3, 2, 2)
    with pytest.raises(DatasetError, match="types"):
        prepare_ds(tmp_path / "b.zarr", Roi((0, 0), (4, 4)), (1, 1), np.uint8,
                   num_channels=2, types=["space", "space", "space"])


# --------------------------------------------------------------------------- write alignment
def test_check_write_alignment_accepts_aligned_grids(tmp_path):
    array = prepare_ds(tmp_path / "out.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                       write_size=(8, 8))
    # write ROI of whole chunks, grid starting at the array's offset
    check_write_alignment(array, Roi((0, 0), (8, 8)), TOTAL_ROI, "task")
    check_write_alignment(array, Roi((0, 0), (16, 24)), TOTAL_ROI, "task")
    # grid starting one chunk in, given by the template alone
    check_write_alignment(array, Roi((0, 12), (8, 16)), None, "task")
    # a dimension with a single block needs no alignment: no other block writes there
    check_write_alignment(array, Roi((0, 0), (40, 8)), TOTAL_ROI, "task")


def test_check_write_alignment_refuses_partial_chunks_with_fitting_shape(tmp_path):
    path = tmp_path / "out.zarr"
    array = prepare_ds(path, TOTAL_ROI, VOXEL_SIZE, np.uint8, write_size=(8, 8))
    with pytest.raises(DatasetError) as excinfo:
        check_write_alignment(array, Roi((0, 0), (12, 8)), TOTAL_ROI, "segment")
    message = str(excinfo.value)
    assert message.startswith("segment:")
    assert str(path) in message
    assert "race" in message
    # write shape 3 x 4 voxels from the array's offset: chunks of (3, 4) fit
    assert "(3, 4)" in message
    assert "(8, 8)" in message  # the chunk size in world units


def test_check_write_alignment_refuses_offset_grid_with_fitting_shape(tmp_path):
    array = prepare_ds(tmp_path / "out.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                       num_channels=2, chunk_shape=(4, 4))
    # blocks of 4 x 4 voxels beginning 2 voxels into the array along y
    total_write = Roi((0, 4), (32, 40))
    with pytest.raises(DatasetError) as excinfo:
        check_write_alignment(array, Roi((0, 0), (16, 8)), total_write, "predict")
    message = str(excinfo.value)
    assert "predict" in message and "chunk boundary" in message
    assert "(2, 2, 4)" in message  # channel extent kept, gcd(4, 2) = 2 along y
    fitting = prepare_ds(tmp_path / "fit.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                         num_channels=2, chunk_shape=(2, 2, 4))
    check_write_alignment(fitting, Roi((0, 0), (16, 8)), total_write, "predict")


def test_check_write_alignment_refuses_roi_off_the_voxel_grid(tmp_path):
    array = prepare_ds(tmp_path / "out.zarr", TOTAL_ROI, VOXEL_SIZE, np.uint8,
                       write_size=(8, 8))
    with pytest.raises(DatasetError, match="voxel size"):
        check_write_alignment(array, Roi((0, 0), (6, 8)), TOTAL_ROI, "task")


def test_check_write_alignment_uses_shards(tmp_path):
    array = prepare_ds(tmp_path / "out.zarr", Roi((0, 0), (16, 16)), (1, 1), np.uint8,
                       chunk_shape=(2, 2), shards=(8, 8))
    assert array.write_chunk_shape == Coordinate(8, 8)
    check_write_alignment(array, Roi((0, 0), (8, 8)), Roi((0, 0), (16, 16)), "task")
    with pytest.raises(DatasetError, match="shard"):
        check_write_alignment(array, Roi((0, 0), (4, 4)), Roi((0, 0), (16, 16)), "task")


# --------------------------------------------------------------------------- Luigi target
def test_zarr_target_exists_and_opens(tmp_path):
    target = ZarrTarget(tmp_path / "volume.zarr", "labels")
    assert isinstance(target, luigi.Target)
    assert target.path == f"{tmp_path}/volume.zarr/labels"
    assert not target.exists()
    prepared = target.prepare(TOTAL_ROI, VOXEL_SIZE, np.uint64, write_size=(8, 8))
    assert isinstance(prepared, Array)
    assert target.exists()
    opened = target.open()
    assert opened.roi == TOTAL_ROI and opened.dtype == np.uint64
    target.open("r+")[Roi((-8, 4), (8, 8))] = 1
    assert target.open()[Roi((-8, 4), (8, 8))].sum() == 8  # 2 x 4 voxels
    # the container is not the array
    assert not ZarrTarget(tmp_path / "volume.zarr").exists()
    assert ZarrTarget(tmp_path / "volume.zarr" / "labels").exists()


def test_zarr_target_on_a_group_does_not_exist(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    assert not ZarrTarget(tmp_path / "g.zarr").exists()


# --------------------------------------------------------------------------- funlib.persistence
def test_funlib_persistence_opens_ours_and_we_open_theirs(tmp_path):
    funlib_persistence = pytest.importorskip("funlib.persistence")

    ours = prepare_ds(tmp_path / "ours.zarr", Roi((-40, 8, 16), (80, 32, 24)), (40, 4, 8),
                      np.uint16, num_channels=2, axis_names=["c^", "z", "y", "x"],
                      units=["nm", "nm", "nm"], write_size=(40, 16, 8))
    values = ramp((2, 2, 8, 3))
    ours[ours.roi] = values
    theirs_view = funlib_persistence.open_ds(str(tmp_path / "ours.zarr"))
    assert theirs_view.roi == ours.roi
    assert theirs_view.voxel_size == ours.voxel_size
    assert theirs_view.offset == ours.offset
    assert theirs_view.axis_names == ours.axis_names
    assert theirs_view.units == ours.units
    assert theirs_view.types == ours.types
    np.testing.assert_array_equal(theirs_view[ours.roi], values)
    # funlib's prepare_ds on our dataset finds it compatible and reuses it
    reused = funlib_persistence.prepare_ds(
        str(tmp_path / "ours.zarr"), shape=(2, 2, 8, 3), offset=Coordinate(-40, 8, 16),
        voxel_size=Coordinate(40, 4, 8), axis_names=["c^", "z", "y", "x"],
        units=["nm", "nm", "nm"], types=["channel", "space", "space", "space"],
        dtype=np.uint16, mode="r+")
    np.testing.assert_array_equal(reused[ours.roi], values)

    theirs = funlib_persistence.prepare_ds(
        str(tmp_path / "theirs.zarr"), shape=(10, 20), offset=Coordinate(-8, 4),
        voxel_size=Coordinate(4, 2), units=["um", "um"], chunk_shape=(2, 4), dtype=np.int8)
    theirs[Roi((-8, 4), (8, 8))] = np.full((2, 4), 5, np.int8)
    ours_view = open_ds(tmp_path / "theirs.zarr")
    assert ours_view.roi == theirs.roi == TOTAL_ROI
    assert ours_view.voxel_size == theirs.voxel_size
    assert ours_view.offset == theirs.offset
    assert ours_view.axis_names == theirs.axis_names == ["d0", "d1"]
    assert ours_view.units == theirs.units
    assert ours_view.types == theirs.types
    assert ours_view[Roi((-8, 4), (8, 8))].tolist() == [[5] * 4] * 2
    # and our prepare_ds reuses theirs
    assert prepare_ds(tmp_path / "theirs.zarr", TOTAL_ROI, (4, 2), np.int8,
                      chunk_shape=(2, 4)).data[0, 0] == 5


def test_attributes_equal_funlib_persistence_attributes(tmp_path):
    funlib_persistence = pytest.importorskip("funlib.persistence")
    cases = [
        dict(total_roi=TOTAL_ROI, voxel_size=(4, 2), shape=(10, 20)),
        dict(total_roi=TOTAL_ROI, voxel_size=(4, 2), shape=(3, 10, 20), num_channels=3),
        dict(total_roi=TOTAL_ROI, voxel_size=(4, 2), shape=(3, 10, 20), num_channels=3,
             axis_names=["c^", "y", "x"], units=["nm", "nm"],
             types=["channel", "space", "space"]),
    ]
    for number, case in enumerate(cases):
        names = {key: case[key] for key in ("axis_names", "units", "types") if key in case}
        ours = prepare_ds(tmp_path / f"ours{number}.zarr", case["total_roi"],
                          case["voxel_size"], np.uint8, num_channels=case.get("num_channels"),
                          **names)
        funlib_persistence.prepare_ds(
            str(tmp_path / f"theirs{number}.zarr"), shape=case["shape"],
            offset=case["total_roi"].offset, voxel_size=Coordinate(case["voxel_size"]),
            dtype=np.uint8, **names)
        ours_json = json.loads((tmp_path / f"ours{number}.zarr" / "zarr.json").read_text())
        theirs_json = json.loads((tmp_path / f"theirs{number}.zarr" / "zarr.json").read_text())
        assert list(ours_json["attributes"].items()) == list(theirs_json["attributes"].items())
        assert ours.roi == TOTAL_ROI
