"""The fast GGUF path: our reader vs gguf.GGUFReader and hand-built bytes, our
dequantisation vs gguf.quants.dequantize bit for bit, our tokenizer vs
AutoTokenizer.from_pretrained(dir, gguf_file=...), and one parse shared by the arch config,
the weights and the tokenizer."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kvasir.attention.backend import get_backend_cls
from kvasir.config import ModelConfig
from kvasir.models.default import default_model_path
from kvasir.models.loader import (
    gguf_loader,
    gguf_reader,
    load_arch_config,
    load_model,
    load_tokenizer,
)
from kvasir.models.loader.gguf_reader import GGUFTensor, dequantize, read_gguf

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def ref_reader(gguf_path: str) -> Any:
    return gguf.GGUFReader(gguf_path)


# ---- reader -------------------------------------------------------------------------------


def test_reader_matches_gguf_reader(gguf_path: str, ref_reader: Any) -> None:
    ours = read_gguf(gguf_path)
    assert read_gguf(gguf_path) is ours  # parsed once per process
    keys = [k for k in ref_reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected = ref_reader.fields[key].contents()
        assert ours.metadata[key] == expected and type(ours.metadata[key]) is type(expected), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900
    assert (ours.version, ours.alignment) == (3, ref_reader.alignment)
    assert ours.data_offset == ref_reader.data_offset
    assert len(ours.tensors) == len(ref_reader.tensors) == 272
    for t, ref in zip(ours.tensors, ref_reader.tensors, strict=True):
        assert (t.name, t.tensor_type, t.offset, t.nbytes) == (
            ref.name, ref.tensor_type, ref.data_offset, ref.n_bytes
        )  # fmt: skip
        assert t.shape == tuple(int(d) for d in reversed(ref.shape))  # torch order
        assert np.array_equal(t.data, ref.data.view(np.uint8).reshape(-1)), t.name
        assert not t.data.flags.writeable


def _gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _handmade_gguf(kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]],
                   alignment: int = 32, version: int = 3, data: bytes = b"") -> bytes:  # fmt: skip
    """A GGUF file from raw key/value records and (name, ggml dims, type, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        out += _gguf_string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    return out + b"\0" * (-len(out) % alignment) + data


def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    return _gguf_string(key) + struct.pack("<I", value_type) + payload


def _array(element_type: int, count: int, payload: bytes) -> bytes:
    return struct.pack("<IQ", element_type, count) + payload


def test_reader_all_value_types(tmp_path: Path) -> None:
    kvs = [
        _kv("u8", 0, struct.pack("<B", 250)),
        _kv("i8", 1, struct.pack("<b", -5)),
        _kv("u16", 2, struct.pack("<H", 65000)),
        _kv("i16", 3, struct.pack("<h", -30000)),
        _kv("u32", 4, struct.pack("<I", 4_000_000_000)),
        _kv("i32", 5, struct.pack("<i", -2_000_000_000)),
        _kv("f32", 6, struct.pack("<f", 0.1)),
        _kv("bool", 7, b"\x01"),
        _kv("str", 8, _gguf_string("héllo ☕")),
        _kv("u64", 10, struct.pack("<Q", 2**64 - 1)),
        _kv("i64", 11, struct.pack("<q", -(2**62))),
        _kv("f64", 12, struct.pack("<d", 0.1)),
        _kv("general.alignment", 4, struct.pack("<I", 64)),
        _kv("a_u8", 9, _array(0, 3, bytes([1, 2, 255]))),
        _kv("a_i16", 9, _array(3, 2, struct.pack("<2h", -1, 7))),
        _kv("a_f32", 9, _array(6, 2, struct.pack("<2f", 1.5, -0.25))),
        _kv("a_bool", 9, _array(7, 3, b"\x01\x00\x01")),
        _kv("a_u64", 9, _array(10, 2, struct.pack("<2Q", 0, 2**63))),
        _kv("a_f64", 9, _array(12, 1, struct.pack("<d", 1e300))),
        _kv("a_str", 9, _array(8, 3, _gguf_string("a") + _gguf_string("") + _gguf_string("日本"))),
        _kv("a_empty", 9, _array(5, 0, b"")),
        _kv(
            "a_nested",
            9,
            _array(9, 2, _array(5, 2, struct.pack("<2i", 1, -2)) + _array(8, 1, _gguf_string("x"))),
        ),  # fmt: skip
    ]
    f16 = np.array([[1.0, -2.0, 0.5], [3.0, 4.0, 65504.0]], dtype=np.float16)
    path = tmp_path / "all.gguf"
    path.write_bytes(_handmade_gguf(kvs, [("w", [3, 2], 1, 0)], alignment=64, data=f16.tobytes()))
    parsed = read_gguf(str(path))
    assert parsed.metadata == {
        "u8": 250, "i8": -5, "u16": 65000, "i16": -30000, "u32": 4_000_000_000,
        "i32": -2_000_000_000, "f32": float(np.float32(0.1)), "bool": True, "str": "héllo ☕",
        "u64": 2**64 - 1, "i64": -(2**62), "f64": 0.1, "general.alignment": 64,
        "a_u8": [1, 2, 255], "a_i16": [-1, 7], "a_f32": [1.5, -0.25], "a_bool": [True, False, True],
        "a_u64": [0, 2**63], "a_f64": [1e300], "a_str": ["a", "", "日本"], "a_empty": [],
        "a_nested": [[1, -2], ["x"]],
    }  # fmt: skip
    assert type(parsed.metadata["bool"]) is bool and type(parsed.metadata["a_bool"][0]) is bool
    assert parsed.alignment == 64 and parsed.data_offset % 64 == 0
    (w,) = parsed.tensors
    assert (w.name, w.tensor_type, w.shape, w.nbytes) == ("w", Q.F16, (2, 3), 12)
    assert np.array_equal(dequantize(w), f16.astype(np.float32))
    # gguf's own reader agrees on what it can represent
    ref = gguf.GGUFReader(str(path))
    for key in ("u8", "i16", "u64", "f32", "str", "a_str", "a_f32", "a_u64"):
        assert ref.fields[key].contents() == parsed.metadata[key], key
    assert ref.data_offset == parsed.data_offset


def test_reader_written_by_gguf_writer(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(128)
    w.add_array("nested", [[1, 2, 3], [4]])
    w.add_token_list(["<s>", "a", "ü"])
    w.add_token_scores([0.0, -1.5, 2.25])
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64), Q.Q8_0)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("q", q8, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parsed = read_gguf(str(path))
    assert parsed.metadata["nested"] == [[1, 2, 3], [4]]
    assert parsed.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "ü"]
    assert parsed.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, 2.25]
    assert parsed.alignment == 128 and parsed.data_offset % 128 == 0
    x, q = parsed.tensors
    assert x.shape == (3, 4) and q.shape == (4, 64) and q.tensor_type == Q.Q8_0
    assert np.array_equal(dequantize(x), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.array_equal(dequantize(q), gguf_dequantize(q8, Q.Q8_0))


def test_reader_cache_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.gguf"
    path.write_bytes(_handmade_gguf([_kv("v", 4, struct.pack("<I", 1))], []))
    first = read_gguf(str(path))
    assert read_gguf(str(path)) is first
    path.write_bytes(_handmade_gguf([_kv("v", 4, struct.pack("<I", 2))], []))
    later = os.stat(path).st_mtime_ns + 10**9  # same size: only the mtime tells them apart
    os.utime(path, ns=(later, later))
    assert read_gguf(str(path)).metadata == {"v": 2}


def test_reader_errors(gguf_path: str, tmp_path: Path) -> None:
    def check(data: bytes, match: str) -> None:
        path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"GGUF file '{re.escape(str(path))}'.*{match}"):
            read_gguf(str(path))

    with open(gguf_path, "rb") as f:
        head = f.read(2_000_000)
    check(b"", "empty")
    check(b"GGML" + head[4:1000], "bad magic")
    check(head[:4] + struct.pack("<I", 1) + head[8:1000], "unsupported version 1")
    check(head[:20], "header")
    check(head[:5000], "metadata")  # inside the vocabulary
    # tensor table intact, data cut short: the first tensor past the end is named
    check(head[: read_gguf(gguf_path).data_offset + 100], "tensor '.*' .*beyond the end")
    check(_handmade_gguf([_kv("k", 99, b"")], []), "unknown value type 99")
    check(_handmade_gguf([_kv("k", 8, struct.pack("<Q", 2**40))], []), "runs past the end")
    check(_handmade_gguf([_kv("k", 8, _gguf_string(b"\xff\xfe"))], []), "not valid UTF-8")
    check(_handmade_gguf([], [("t", [32], 2, 64)], data=b"\0" * 40), "beyond the end")
    check(_handmade_gguf([], [("t", [32], 1234, 0)]), "unknown ggml type 1234")
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        read_gguf(str(tmp_path / "missing.gguf"))


# ---- dequantisation -----------------------------------------------------------------------


def _same_bits(ours: np.ndarray, ref: np.ndarray) -> bool:
    ref = np.asarray(ref, dtype=np.float32)
    nan = np.isnan(ref)
    return (
        ours.dtype == np.float32
        and ours.shape == ref.shape
        and np.array_equal(np.isnan(ours), nan)
        and np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    )


def test_dequantize_default_model_bit_exact(gguf_path: str, ref_reader: Any) -> None:
    ours = read_gguf(gguf_path)
    kinds = {t.tensor_type for t in ours.tensors}
    assert kinds == {Q.F32, Q.Q4_1, Q.Q8_0}
    for t, ref in zip(ours.tensors, ref_reader.tensors, strict=True):
        expected = gguf_dequantize(ref.data, ref.tensor_type)
        assert _same_bits(dequantize(t), expected), t.name


@pytest.mark.parametrize(
    "kind",
    [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
     Q.Q2_K, Q.Q3_K],
    ids=lambda kind: kind.name,
)  # fmt: skip
def test_dequantize_random_blocks_bit_exact(kind: GGMLQuantizationType) -> None:
    # Every byte pattern, scales included (so NaN/inf/subnormal fp16 scales too).
    block_size, type_size = GGML_QUANT_SIZES[kind]
    rows, blocks_per_row = 6, 8
    raw = np.random.default_rng(int(kind)).integers(
        0, 256, size=rows * blocks_per_row * type_size, dtype=np.uint8
    )
    shape = (rows, blocks_per_row * block_size)
    tensor = GGUFTensor("t", kind, shape, 0, raw.size, raw)
    with np.errstate(all="ignore"):  # NaN/inf scales are part of the point
        if kind in (Q.F32, Q.F16):  # gguf's reader hands these over typed, not as bytes
            typed = raw.view(np.float32 if kind == Q.F32 else np.float16).reshape(shape)
            expected = gguf_dequantize(typed, kind)
        else:
            expected = gguf_dequantize(raw.reshape(rows, -1), kind)
        ours = dequantize(tensor)
    assert ours.flags.writeable and _same_bits(ours, expected)


def test_dequantize_unsupported_type_names_tensor() -> None:
    tensor = GGUFTensor("blk.0.x.weight", Q.I32, (4,), 0, 16, np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match=r"'blk.0.x.weight' \(I32\) of GGUF file 'f.gguf'"):
        dequantize(tensor, "f.gguf")


def test_iterate_gguf_matches_previous_path(gguf_path: str, ref_reader: Any) -> None:
    """Weights as the GGUFReader + gguf.quants + torch un-permutation path produced them."""
    parsed = read_gguf(gguf_path)
    arch = gguf_loader.gguf_arch_config(parsed, gguf_path)
    ref_by_name = {t.name: t for t in ref_reader.tensors}
    wanted = {"token_embd.weight", "output_norm.weight", "blk.3.attn_q.weight",
              "blk.3.attn_k.weight", "blk.3.ffn_down.weight"}  # fmt: skip
    seen = 0
    for (hf_name, weight), t in zip(
        gguf_loader.iterate_gguf(parsed, gguf_path, arch), parsed.tensors, strict=True
    ):
        if t.name not in wanted:
            continue
        seen += 1
        ref = torch.from_numpy(np.array(gguf_dequantize(ref_by_name[t.name].data, t.tensor_type)))
        heads = {"attn_q": arch.num_attention_heads, "attn_k": arch.num_key_value_heads}
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:  # llama.cpp rows [heads, head_dim/2, 2] -> HF [heads, 2, head_dim/2]
            n = heads[kind]
            ref = ref.reshape(n, ref.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(ref.shape)
        assert weight.dtype == torch.float32 and weight.is_contiguous()
        assert torch.equal(weight, ref), hf_name
    assert seen == len(wanted)


# ---- tokenizer ----------------------------------------------------------------------------

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading spaces\nand\ttabs\r\n",
    "naïve café ☕ 日本語 한국어 Ελληνικά",
    "emoji 👩‍👩‍👧 🏳️‍🌈 and \u200b zero width",
    "<|im_end|>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "1234567890 3.14159 -42 1e-9",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "<repo_name>kvasir<file_sep>main.py",
    "<|endoftext|>trailing",
    "mixed\u00a0nbsp and\u3000ideographic space",
    "I'm can't won't they'll we've",
    "URL: https://example.com/a?b=c&d=e#f",
    "\n\n\n",
    "combining: e\u0301 vs é",
    "<not_a_token> <|im_start|",
]


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path: str) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


def _assert_same_tokenizer(ours: Any, ref: Any) -> None:
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id",
                 "add_bos_token", "add_eos_token", "chat_template", "name_or_path"):  # fmt: skip
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert {k: str(v) for k, v in ours.added_tokens_decoder.items()} == {
        k: str(v) for k, v in ref.added_tokens_decoder.items()
    }
    assert repr(ours) == repr(ref)


def test_tokenizer_matches_hf(gguf_path: str, hf_tokenizer: Any) -> None:
    ours = gguf_loader.gguf_tokenizer(gguf_path)
    assert gguf_loader.gguf_tokenizer(gguf_path) is ours
    _assert_same_tokenizer(ours, hf_tokenizer)
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (
        1, 2, 0, 2
    )  # fmt: skip
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
            text, add_special_tokens=False
        )
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            )
    messages = [
        {"role": "user", "content": "Hi! Write `print(1)` in Python."},
        {"role": "assistant", "content": "print(1)\n"},
        {"role": "user", "content": "Thanks 😊"},
    ]
    for add_generation_prompt in (False, True):
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = ours.apply_chat_template(messages, tokenize=False, **kw)
        assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        ids = ours.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]
        assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, **kw)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n")


def _write_tokenizer_gguf(path: Path, arch: str) -> None:
    """A byte-level BPE vocabulary with control and user-defined tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens) + [3, 3, 3, 4]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_synthetic_matches_hf(arch: str, tmp_path: Path) -> None:
    # qwen2 maps to Qwen2Tokenizer in transformers, llama to TokenizersBackend
    path = tmp_path / "m.gguf"
    _write_tokenizer_gguf(path, arch)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = gguf_loader.gguf_tokenizer(str(path))
    _assert_same_tokenizer(ours, ref)
    for text in ("the in a the<think> <|im_end|>hi", "  he the  \n x", "<|im_start|>ü"):
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
    # A tokenizer.json beside the GGUF wins in transformers: we defer to it too.
    ref.save_pretrained(str(tmp_path))
    assert gguf_loader._tokenizer_from_metadata(read_gguf(str(path))) is None


# ---- one parse for everything -------------------------------------------------------------


def test_start_up_parses_once(gguf_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_reader._read_cached.cache_clear()
    gguf_loader._cached_tokenizer.cache_clear()
    parses: list[str] = []
    real_parse = gguf_reader._parse
    monkeypatch.setattr(gguf_reader, "_parse", lambda *a: parses.append(a[0]) or real_parse(*a))

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the GGUF file was read a second time")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    from transformers.integrations.gguf import reader as hf_reader

    monkeypatch.setattr(hf_reader, "_mapped", forbidden)
    mc = ModelConfig(model=gguf_path)
    arch = load_arch_config(mc)
    model = load_model(mc, arch, get_backend_cls("torch"), torch.float32, torch.device("cpu"))
    tok = load_tokenizer(mc)
    assert parses == [gguf_path]
    parsed = read_gguf(gguf_path)
    hello = parsed.metadata["tokenizer.ggml.tokens"].index("Hello")
    assert tok("Hello")["input_ids"] == [hello]
    embed = dequantize(parsed.tensor_map["token_embd.weight"])  # [vocab, hidden]
    assert torch.equal(model.model.embed_tokens.weight[hello], torch.from_numpy(embed[hello]))
