"""tpi's GGUF reader (tpi.formats.gguf_file) against gguf's GGUFReader, the independent reference."""
from pathlib import Path

import gguf
import pytest

from model_factory import TINY_VARIANTS
from tpi.errors import ModelFormatError
from tpi.formats.gguf import open_gguf
from tpi.formats.gguf_file import GGUFArray, GGUFFile, GGUFFormatError
from tpi.master.convert import _copy_metadata


def assert_same_metadata(ours: GGUFFile, ref: gguf.GGUFReader) -> None:
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # GGUF.*: header, not keys
    assert list(ours.metadata) == list(ref_fields)
    for key, field in ref_fields.items():
        assert ours.value_types[key] == field.types[0], key
        raw = ours.metadata[key]
        if isinstance(raw, GGUFArray):
            assert raw.elem_type == field.types[1] and len(raw) == len(field.data), key
        assert ours.value(key) == field.contents(), key


def assert_same_tensors(ours: GGUFFile, ref: gguf.GGUFReader) -> None:
    assert ours.data_start == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        assert mine.shape == tuple(int(d) for d in theirs.shape), mine.name
        assert (mine.n_bytes, mine.data_offset) == (theirs.n_bytes, theirs.data_offset), mine.name
        assert (mine.data.dtype, mine.data.shape) == (theirs.data.dtype, theirs.data.shape), mine.name
        assert mine.data.tobytes() == theirs.data.tobytes(), mine.name


@pytest.mark.parametrize("name", sorted(TINY_VARIANTS))
def test_tiny_gguf_reads_exactly_as_gguf_reader(tiny_gguf, name):
    path = tiny_gguf(name)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert_same_metadata(ours, ref)
    assert_same_tensors(ours, ref)


def test_smollm2_reads_exactly_as_gguf_reader_with_its_vocabulary_left_unparsed(smollm2, smollm2_reader):
    ours = GGUFFile(smollm2)
    tokens = ours.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFArray) and len(tokens) == 49152
    assert_same_metadata(ours, smollm2_reader)
    assert_same_tensors(ours, smollm2_reader)


def test_copied_vocab_metadata_keeps_every_key_value_and_type(tiny_gguf, tmp_path):
    src = tiny_gguf("tiny_qwen2_q8_0")
    out = tmp_path / "copy.vocab.gguf"
    _copy_metadata(GGUFFile(src), out)
    copy = GGUFFile(out)
    assert copy.tensors == []
    assert_same_metadata(copy, gguf.GGUFReader(out))
    source = GGUFFile(src)
    assert {k: source.value(k) for k in source.metadata} == {k: copy.value(k) for k in copy.metadata}
    assert source.value_types == copy.value_types


@pytest.mark.parametrize("keep, reason", [
    (2 / 3, "tensor blk.1.* ends at byte"),  # a fraction of the file: cut inside the tensor data
    (300, "more than 300 bytes can hold"),  # cut inside the key/values
    (20, "too few for the GGUF header"),
])
def test_truncated_file_is_a_format_error_naming_where_it_ends(tiny_gguf, tmp_path, keep, reason):
    data = tiny_gguf("tiny_llama_q4_0").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(keep if keep >= 1 else len(data) * keep)])
    with pytest.raises(GGUFFormatError, match=reason):
        GGUFFile(cut)
    with pytest.raises(ModelFormatError, match="cut.gguf: not a readable GGUF file .*truncated"):
        open_gguf(cut)


def test_metadata_cut_inside_the_vocabulary_is_a_format_error(smollm2, tmp_path):
    tokens = GGUFFile(smollm2).metadata["tokenizer.ggml.tokens"]
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(tokens.offset + 100_000))  # ~10k tokens in
    with pytest.raises(GGUFFormatError, match="past the end of the file"):
        GGUFFile(cut)


@pytest.mark.parametrize("content, reason", [
    (b"this is not a model\n" * 10, "GGUF magic"),
    (b"", "empty"),
])
def test_not_a_gguf_file_is_a_format_error(tmp_path, content, reason):
    bogus = tmp_path / "notes.gguf"
    bogus.write_bytes(content)
    with pytest.raises(ModelFormatError, match=f"notes.gguf: not a readable GGUF file .*{reason}"):
        open_gguf(bogus)
