import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> directory of a tiny random HF checkpoint (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(family: str, variant: str = "") -> Path:
        key = family + variant
        if key not in cache:
            kwargs = {}
            if variant == "fused":
                kwargs["save_original_format"] = False
            elif variant == "sharded":
                kwargs["max_shard_size"] = "100KB"
            cache[key] = build_tiny_model(family, root / key, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_emoe(tiny_dir, tmp_path_factory):
    """(family, bits) -> exported container path."""
    root = tmp_path_factory.mktemp("emoe")
    cache: dict[tuple, Path] = {}

    def get(family: str, bits: int = 32, variant: str = "") -> Path:
        key = (family, bits, variant)
        if key not in cache:
            from edgemoe_export import export

            cache[key] = export(tiny_dir(family, variant), root / f"{family}{variant}_{bits}.emoe", bits=bits,
                                show_progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def bench_x86(tmp_path_factory) -> Path:
    """The host build of edgemoe-bench: $EDGEMOE_BENCH, or built here with CMake (target edgemoe-bench only)."""
    if os.environ.get("EDGEMOE_BENCH"):
        return Path(os.environ["EDGEMOE_BENCH"])
    if not shutil.which("cmake") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("cmake or a C compiler is missing: cannot build edgemoe-bench")
    build = tmp_path_factory.mktemp("bench_build")
    for cmd in (["cmake", "-S", Path(__file__).resolve().parents[1] / "native", "-B", build,
                 "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", build, "--target", "edgemoe-bench", "-j", "2"]):
        r = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build / "edgemoe-bench"


def hf_logits(model_dir: Path, ids, round_fp16: bool = False):
    import numpy as np
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if round_fp16:  # the same weights the fp16 container stores: matrices rounded to fp16, 1-D tensors kept
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(p.half().float())
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def rel_err(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


__all__ = ["FAMILIES", "build_tiny_model", "hf_logits", "rel_err"]  # what test modules import from here
