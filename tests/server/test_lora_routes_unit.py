"""The adapter registry and its routes without a model: ``--allow-runtime-lora-updating``
off means no load/unload routes (404); on, adapters are checked against the model's
module shapes at load; ``--lora-dir`` names resolve lazily; unknown names are 400s
naming ``model``."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvasir.bench.lora import write_random_adapter
from kvasir.config import LoRAConfig
from kvasir.entrypoints.openai.errors import OpenAIError, install_exception_handlers
from kvasir.entrypoints.openai.serving_lora import LoRAModels, add_lora_routes

SHAPES = {"model.layers.0.self_attn.q_proj": [64, 64], "model.layers.0.mlp.down_proj": [128, 64]}


class _Ctx:
    def __init__(self, lora: LoRAModels) -> None:
        self.lora = lora


def _models(tmp_path, **kw) -> LoRAModels:
    return LoRAModels(LoRAConfig(**kw), "base", SHAPES, 16)


def _app(models: LoRAModels, allow: bool) -> TestClient:
    app = FastAPI()
    install_exception_handlers(app)
    add_lora_routes(app, _Ctx(models), allow)
    return TestClient(app)


def test_routes_only_with_the_flag(tmp_path):
    write_random_adapter(str(tmp_path / "a"), {k: tuple(v) for k, v in SHAPES.items()}, 8, 0)
    body = {"lora_name": "a", "lora_path": str(tmp_path / "a")}
    off = _app(_models(tmp_path), allow=False)
    assert off.post("/v1/load_lora_adapter", json=body).status_code == 404
    models = _models(tmp_path)
    on = _app(models, allow=True)
    r = on.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 200 and "added successfully" in r.text
    assert models.resolve("a").lora_int_id == 1
    r = on.post("/v1/unload_lora_adapter", json={"lora_name": "a", "lora_int_id": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_int_id"
    assert on.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
    # Ids are never reused: a new load of the same name gets a new id.
    assert on.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert models.resolve("a").lora_int_id == 2


def test_wrong_shapes_and_unknown_names(tmp_path):
    other = {"model.layers.0.self_attn.q_proj": (32, 64)}  # another base's hidden size
    write_random_adapter(str(tmp_path / "dir" / "x"), other, 4, 0)
    models = _models(tmp_path, lora_dir=str(tmp_path / "dir"))
    with pytest.raises(OpenAIError) as e:
        models.resolve("x")  # found under --lora-dir, refused at its first use
    assert e.value.status_code == 400 and e.value.param == "model"
    assert "hidden size mismatch" in e.value.message
    for name in ("nope", "../dir", "."):
        with pytest.raises(OpenAIError) as e:
            models.resolve(name)
        assert e.value.status_code == 400 and e.value.param == "model"
