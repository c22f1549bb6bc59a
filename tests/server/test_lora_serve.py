"""Multi-LoRA through ``kvasir serve``: a request's ``model`` names the adapter; the
outputs match HF transformers + peft; ``/v1/models`` lists adapters with their
``parent``; adapters load and unload at run time (``--allow-runtime-lora-updating``,
behind the API key); adapters under ``--lora-dir`` load lazily on first use; every bad
input is a 400 naming the parameter; per-adapter metrics."""

from __future__ import annotations

import httpx
import pytest
from server_utils import start_server

from kvasir.models.default import default_model_path
from tests.lora.lora_utils import hf_greedy, save_random_adapter
from tests.model_utils import save_tiny_llama

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("lora-serve")
    base = str(root / "base")
    save_tiny_llama(base, vocab_size=49152, seed=21)
    paths = {}
    cfgs = {
        "a": peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": peft.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"),
        "c": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "big": peft.LoraConfig(r=32, target_modules=["q_proj"]),
    }  # fmt: skip
    (root / "dir").mkdir()
    for i, (name, cfg) in enumerate(cfgs.items()):
        paths[name] = str(root / "dir" / name if name == "c" else root / name)
        save_random_adapter(base, paths[name], cfg, 30 + i)
    return base, paths, str(root / "dir")


@pytest.fixture(scope="module")
def srv(setup):
    base, paths, lora_dir = setup
    s = start_server(
        "--model", base, "--tokenizer", default_model_path(), "--max-model-len", "128",
        "--kv-cache-gb", "0.02", "--enable-lora", "--lora-modules", f"a={paths['a']}",
        "--lora-dir", lora_dir, "--max-loras", "2", "--max-lora-rank", "16",
        "--allow-runtime-lora-updating",
    )  # fmt: skip
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()


@pytest.fixture
def http(srv):
    with httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {srv.api_key}"}, timeout=120
    ) as c:
        yield c


def _complete(http, model: str) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0.0,
              "ignore_eos": True},
    )  # fmt: skip


def _want(http, setup, adapter: str | None) -> str:
    """HF + peft's greedy text (tokenized and decoded by the server's tokenizer)."""
    base, paths, _ = setup
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    tokens = hf_greedy(base, paths[adapter] if adapter else None, ids, 5)[0]
    return http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


def _base_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def test_adapters_are_models_matching_hf_peft(http, setup):
    data = http.get("/v1/models").json()["data"]
    base_name = data[0]["id"]
    assert [(m["id"], m.get("parent")) for m in data] == [(base_name, None), ("a", base_name)]
    base_text = _complete(http, base_name).json()["choices"][0]["text"]
    assert base_text == _want(http, setup, None)
    r = _complete(http, "a")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _want(http, setup, "a") != base_text
    # An adapter under --lora-dir, loaded lazily on its first request ((IA)^3 here).
    r = _complete(http, "c")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _want(http, setup, "c")
    assert "c" in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_unknown_adapter_is_400_naming_model(http):
    r = _complete(http, "no-such-adapter")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "model" and "no-such-adapter" in err["message"]


def test_load_and_unload_at_run_time(http, srv, setup):
    _, paths, _ = setup
    body = {"lora_name": "b", "lora_path": paths["b"]}
    assert httpx.post(srv.url + "/v1/load_lora_adapter", json=body).status_code == 401
    r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200, r.text
    assert http.post("/v1/load_lora_adapter", json=body).json()["error"]["param"] == "lora_name"
    b = [m for m in http.get("/v1/models").json()["data"] if m["id"] == "b"]
    assert b and b[0]["root"] == paths["b"]
    r = _complete(http, "b")
    assert r.json()["choices"][0]["text"] == _want(http, setup, "b")
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert r.status_code == 200, r.text
    assert _complete(http, "b").status_code == 400
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 404
    # Bad adapters are refused at load, naming lora_path.
    for path, msg in [("/nonexistent", "not a directory"), (paths["big"], "max_lora_rank")]:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "lora_path" and msg in r.json()["error"]["message"]
    # The engine kept serving.
    assert _complete(http, "a").status_code == 200


def test_per_adapter_metrics(http):
    assert _complete(http, "a").status_code == 200
    text = http.get("/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("kvasir:lora_request_success_total")]
    assert any('lora_name="a"' in ln and float(ln.split()[-1]) >= 1 for ln in lines), lines
    assert "kvasir:lora_requests_info{" in text and 'max_lora="2"' in text
    assert 'kvasir:lora_cache_events_total{event="disk_loads"' in text
