"""`genai-lab bench --against llama.cpp`: the GGUF files it measures hold our model's weights, and
without llama.cpp it skips with a message. llama.cpp itself is never built here."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from core.bench.llamacpp import against_llama_cpp, write_gguf_files


def _tiny_q4_1_gguf(path):
    """A GGUF like the shipped one in miniature: a Q4_1 matrix, an F32 norm, some metadata."""
    import gguf

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (8, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_file_type(3)  # mostly Q4_1
    writer.add_token_list(["<s>", "a", "b"])
    q = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.ffn_down.weight", q, raw_shape=q.shape, raw_dtype=3)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1)  # what a loader reads


def test_the_gguf_files_hold_the_shipped_weights_in_each_format(tmp_path):
    import gguf

    exact = _tiny_q4_1_gguf(tmp_path / "m.Q4_1.gguf")
    paths = write_gguf_files(tmp_path / "m.Q4_1.gguf", tmp_path / "out")
    assert paths["Q4_1"] == tmp_path / "m.Q4_1.gguf"  # the shipped file as it is
    for name, rounded, file_type in (
        ("F32", exact, 0),
        ("F16", exact.astype(np.float16), 1),
        ("Q8_0", None, 7),
    ):
        reader = gguf.GGUFReader(paths[name])
        tensors = {t.name: t for t in reader.tensors}
        down, norm = tensors["blk.0.ffn_down.weight"], tensors["blk.0.attn_norm.weight"]
        assert down.tensor_type == gguf.GGMLQuantizationType[name]
        assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay F32
        values = gguf.quants.dequantize(down.data, down.tensor_type)
        if rounded is not None:
            assert np.array_equal(values, rounded.astype(values.dtype))
        else:  # 8 bits per weight: within one step of each block's scale
            assert np.abs(values - exact).max() < np.abs(exact).max() / 127
        assert reader.get_field("general.file_type").contents() == file_type
        assert reader.get_field("tokenizer.ggml.tokens").contents() == ["<s>", "a", "b"]
        assert reader.get_field("llama.block_count").contents() == 1
    again = write_gguf_files(tmp_path / "m.Q4_1.gguf", tmp_path / "out")
    assert again == paths  # written once, then reused


def test_without_llama_cpp_the_comparison_is_skipped_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GENAI_LAB_CACHE", str(tmp_path))
    said: list[str] = []
    assert against_llama_cpp(quick=True, echo=said.append, build=False) == {}
    assert said == ["  llama.cpp comparison skipped: not installed"]


def test_an_unknown_comparison_is_refused_before_anything_runs():
    from core.cli import build_app

    result = CliRunner().invoke(build_app(), ["bench", "--only", "core", "--against", "vllm"])
    assert result.exit_code != 0
    assert "--against: got 'vllm', the one known is 'llama.cpp'" in result.output
