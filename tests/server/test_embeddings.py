"""``POST /v1/embeddings`` against HF transformers' final hidden states pooled the same
way (a tiny random Llama in float32, the default model's tokenizer), through the
official openai client; ``LLM.embed``; bad input as 400s."""

from __future__ import annotations

import base64
import functools

import numpy as np
import pytest
import torch
from server_utils import start_server

from kvasir.models.default import default_model_path

VOCAB = 49152
TEXTS = ["The capital of France is Paris.", "hello", "A much longer sentence " * 6]


def save_tiny_llama(path: str, vocab_size: int, seed: int, hidden_size: int):
    """A tiny random Llama with unit-scale weights (as tests/model_utils.py's
    ``randomize_``: HF's init makes hidden states near-degenerate), saved to ``path``."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = str(tmp_path_factory.mktemp("embed-llama"))
    hf = save_tiny_llama(path, vocab_size=VOCAB, seed=9, hidden_size=64)
    return path, hf


@pytest.fixture(scope="module")
def embed_server(tiny):
    path, _ = tiny
    srv = start_server(
        "--model", path, "--tokenizer", default_model_path(), "--max-model-len", "256",
        "--kv-cache-gb", "0.02", "--max-num-batched-tokens", "16",
        "--matryoshka-dimensions", "16,32", "--responses-store-size", "2",
    )  # fmt: skip
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture
def oai(embed_server):
    import openai

    return openai.OpenAI(
        base_url=embed_server.url + "/v1", api_key=embed_server.api_key, max_retries=0
    )


def _hf_pooled(hf, ids: list[int], pooling: str, dims: int | None = None) -> np.ndarray:
    with torch.no_grad():
        h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # [T, H]
    v = h[-1] if pooling == "LAST" else h.mean(dim=0)
    if dims is not None:
        v = v[:dims]
    return torch.nn.functional.normalize(v, dim=0).numpy()


@functools.cache
def _tokenizer():
    from kvasir.models.loader.gguf_loader import gguf_tokenizer

    return gguf_tokenizer(default_model_path())


def _ids(text: str) -> list[int]:
    return list(_tokenizer().encode(text, add_special_tokens=True))


def test_embeddings_match_hf(oai, tiny) -> None:
    _, hf = tiny
    # Strings, batched; the client asks for base64 by default and decodes it.
    r = oai.embeddings.create(model=oai.models.list().data[0].id, input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2]
    for text, d in zip(TEXTS, r.data, strict=True):
        ref = _hf_pooled(hf, _ids(text), "LAST")
        np.testing.assert_allclose(np.asarray(d.embedding), ref, atol=1e-5, rtol=0)
    assert r.usage.prompt_tokens == sum(len(_ids(t)) for t in TEXTS)
    # Token ids, float encoding, mean pooling (an extra), chunked over several steps.
    ids = list(range(100, 140))
    r = oai.embeddings.create(
        model=r.model, input=[ids, ids[:5]], encoding_format="float",
        extra_body={"pooling_type": "mean"},
    )  # fmt: skip
    for toks, d in zip([ids, ids[:5]], r.data, strict=True):
        np.testing.assert_allclose(
            np.asarray(d.embedding), _hf_pooled(hf, toks, "MEAN"), atol=1e-5, rtol=0
        )
    # Matryoshka truncation, then normalisation.
    r = oai.embeddings.create(model=r.model, input=ids, dimensions=16, encoding_format="float")
    assert len(r.data[0].embedding) == 16
    np.testing.assert_allclose(
        np.asarray(r.data[0].embedding), _hf_pooled(hf, ids, "LAST", 16), atol=1e-5, rtol=0
    )


def test_base64_is_little_endian_float32(embed_server) -> None:
    with embed_server.client() as http:
        f = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": "float"})
        b = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    assert f.status_code == b.status_code == 200, (f.text, b.text)
    decoded = np.frombuffer(base64.b64decode(b.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, f.json()["data"][0]["embedding"], rtol=0, atol=0)
    assert abs(np.linalg.norm(decoded) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "dimensions": 7}, "dimensions"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "dimensions": 65}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": []}, "input"),
        ({"input": [1, VOCAB + 5]}, "input"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": "x " * 400}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(embed_server, body: dict, param: str) -> None:
    with embed_server.client() as http:
        r = http.post("/v1/embeddings", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
        assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_dimensions_refused_without_matryoshka(http) -> None:
    """The shared default-model server declares no Matryoshka dimensions."""
    r = http.post("/v1/embeddings", json={"input": "hi", "dimensions": 32})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert "Matryoshka" in r.json()["error"]["message"]
    r = http.post("/v1/embeddings", json={"input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert len(r.json()["data"][0]["embedding"]) == 576  # SmolLM2-135M's hidden size


def test_llm_embed_matches_hf(tiny) -> None:
    from kvasir import LLM, PoolingParams

    path, hf = tiny
    llm = LLM(model=path, max_model_len=128, kv_cache_gb=0.01, block_size=4, log=False)
    prompts = [list(range(7, 30)), [3, 4], list(range(200, 209))]
    for pooling in ("LAST", "MEAN"):
        outs = llm.embed(prompts, PoolingParams(pooling_type=pooling))
        for p, o in zip(prompts, outs, strict=True):
            np.testing.assert_allclose(
                np.asarray(o.outputs.embedding), _hf_pooled(hf, p, pooling), atol=1e-5, rtol=0
            )
    kv = llm.llm_engine.engine_core.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks
    with pytest.raises(ValueError, match="dimensions"):
        llm.embed("hi" if llm.get_tokenizer() else [1, 2], PoolingParams(dimensions=1000))


def test_responses_store_bounded_by_flag(embed_server) -> None:
    """This module's server also runs with --responses-store-size 2 (a cheap tiny model
    for a /v1/responses check): the oldest response is dropped from the store."""
    with embed_server.client() as http:
        ids = []
        for i in range(3):
            r = http.post("/v1/responses", json={"input": f"n{i}", "max_output_tokens": 1})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        assert http.get(f"/v1/responses/{ids[0]}").status_code == 404
        assert http.get(f"/v1/responses/{ids[2]}").status_code == 200
        r = http.post(
            "/v1/responses",
            json={"input": "x", "previous_response_id": ids[0], "max_output_tokens": 1},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
