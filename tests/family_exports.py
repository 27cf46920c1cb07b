"""The family tests' tiny checkpoint and its exports: a module builds one tiny transformers checkpoint and exports it
once per bit width (MWQ widths calibrated on a short fixed text); IDS are the tokens the tests run."""

import numpy as np

IDS = np.random.default_rng(0).integers(3, 320, 24)
CALIB = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 60


def family_exports(tmp_path_factory, name: str, build):
    """-> get(bits=32): the container of the checkpoint `build(directory)` writes, exported at `bits` (cached);
    get.dir is the checkpoint."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp(name)
    ckpt = build(root / "ckpt")
    (root / "calib.txt").write_text(CALIB)
    cache = {}

    def get(bits: int = 32):
        if bits not in cache:
            cache[bits] = export(ckpt, root / f"{name}{bits}.emoe", bits=bits, calib=root / "calib.txt",
                                 calib_tokens=512, show_progress=False)
        return cache[bits]

    get.dir = ckpt
    return get
