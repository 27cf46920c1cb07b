"""The test extras are requirements, not options: a missing C core or a missing reference library (transformers,
llama-cpp-python, onnxruntime, gguf, the openai client) must fail the tests that need it, never skip them."""

from pathlib import Path


def test_no_test_skips_on_a_missing_import():
    offenders = [p.name for p in Path(__file__).parent.glob("*.py")
                 if p.name != Path(__file__).name and "importor" + "skip(" in p.read_text()]
    assert not offenders, f"importorskip hides a missing dependency as a skip in {offenders}; import it instead"
