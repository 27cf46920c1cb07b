"""A container overwritten in place while a budgeted model runs: every later generation stops with a clear error,
instead of silently computing with the new bytes of pieces verified once, evicted and read again (verify_reads="first",
the default) or never verified ("never"). native/src/io_thread.c compares the file's size, inode and modification
time with those at open after every read whose CRC is not checked; once they differ, every read is checked against its
CRC (so a file restored in place reads fine again)."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest

import edgemoe
from edgemoe.errors import EdgeMoEError

importlib.import_module("edgemoe.engine_c")


@pytest.fixture
def container(tiny_dir, tmp_path):
    from edgemoe_export import export

    return export(tiny_dir("qwen3moe"), tmp_path / "a.emoe", show_progress=False)


def _overwrite_experts_in_place(path) -> None:
    """Negate every f32 expert weight, writing into the same file (same inode, same size): what `cp` onto an open
    model, a sync tool or a second export to the same name does."""
    from edgemoe.container import open_container

    c = open_container(path, verify=False)
    spans = [(t.offset, t.nbytes) for t in c.tensors.values() if t.kind == "expert"]
    c.close()
    with open(path, "r+b") as f:
        for off, n in spans:
            f.seek(off)
            arr = np.frombuffer(f.read(n), np.float32)
            f.seek(off)
            f.write((-arr).tobytes())


@pytest.mark.parametrize("verify_reads", ["first", "never"])
def test_overwritten_container_is_an_error_on_every_later_read(container, verify_reads):
    ids = [3, 17, 42, 99, 150]
    # a piece read for the first time under "first" fails its CRC as damage; any other read finds the file changed
    # since it was opened, is checked against its CRC too, and fails it
    msg = r"a\.emoe: checksum mismatch in .*(the file was modified after the model opened it|the file is damaged)"
    with edgemoe.load(container, memory_budget="64MiB", verify_reads=verify_reads) as m:
        assert m.streaming
        first = m.generate(ids, max_new_tokens=4)
        m.drop_cache()
        assert m.generate(ids, max_new_tokens=4) == first  # unchanged file, read again: the same text
        _overwrite_experts_in_place(container)
        for _ in range(3):
            m.drop_cache()  # the next generation reads every expert it uses again
            with pytest.raises(EdgeMoEError, match=msg) as info:
                m.generate(ids, max_new_tokens=4)
            if verify_reads == "never":  # nothing was checked before: only the changed file explains the check
                assert "modified after the model opened it" in str(info.value)


def test_restored_in_place_reads_again(container):
    """Written back with its original bytes, the file is checked piece by piece and reads fine: same text."""
    ids = [3, 17, 42, 99, 150]
    original = container.read_bytes()
    with edgemoe.load(container, memory_budget="64MiB", verify_reads="never") as m:
        first = m.generate(ids, max_new_tokens=4)
        _overwrite_experts_in_place(container)
        m.drop_cache()
        with pytest.raises(EdgeMoEError, match="modified after the model opened it"):
            m.generate(ids, max_new_tokens=4)
        with open(container, "r+b") as f:
            f.write(original)
        m.drop_cache()
        assert m.generate(ids, max_new_tokens=4) == first


def test_replaced_by_rename_keeps_the_opened_file(container, tmp_path):
    """`mv new.emoe model.emoe` leaves the open file (its inode) intact: the model keeps computing the old weights,
    which is consistent, so that is no error."""
    ids = [3, 17, 42, 99, 150]
    staged = tmp_path / "staged.emoe"
    shutil.copyfile(container, staged)
    _overwrite_experts_in_place(staged)
    with edgemoe.load(container, memory_budget="64MiB") as m:
        first = m.generate(ids, max_new_tokens=4)
        staged.replace(container)
        m.drop_cache()
        assert m.generate(ids, max_new_tokens=4) == first
