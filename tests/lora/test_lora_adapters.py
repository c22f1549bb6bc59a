"""Bad adapters are clear errors naming the adapter (and the engine keeps serving);
merging folds and unfolds exactly; ``auto`` measures both strategies."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from kvasir import LLM, LoRARequest, SamplingParams
from tests.lora.lora_utils import hf_greedy, save_random_adapter
from tests.model_utils import save_tiny_llama

PROMPT = [5, 17, 33, 9, 100, 41, 7]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("lora_bad")
    base = str(root / "base")
    save_tiny_llama(base, seed=5)
    good = str(root / "good")
    save_random_adapter(
        base, good, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), 1
    )
    other = str(root / "other_base")  # hidden size 32 and 3 layers: another model
    save_tiny_llama(other, seed=6, hidden_size=32, num_hidden_layers=3, intermediate_size=64)
    made = {"base": base, "good": good}
    for name, model, cfg in [
        ("rank32", base, peft.LoraConfig(r=32, target_modules=["q_proj"])),
        ("hidden", other, peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0])),
        ("layer2", other, peft.LoraConfig(r=4, target_modules=["o_proj"], layers_to_transform=[2])),
        ("embed", base, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
        ("head", base, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
        ("dora", base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)),
    ]:  # fmt: skip
        made[name] = str(root / name)
        save_random_adapter(model, made[name], cfg, 2)
    made["bin"] = str(root / "bin")
    shutil.copytree(good, made["bin"])
    os.rename(os.path.join(made["bin"], "adapter_model.safetensors"),
              os.path.join(made["bin"], "adapter_model.bin"))  # fmt: skip
    made["corrupt"] = str(root / "corrupt")
    shutil.copytree(good, made["corrupt"])
    with open(os.path.join(made["corrupt"], "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    made["badjson"] = str(root / "badjson")
    shutil.copytree(good, made["badjson"])
    with open(os.path.join(made["badjson"], "adapter_config.json"), "w") as f:
        f.write("{")
    made["prefix"] = str(root / "prefix")
    shutil.copytree(good, made["prefix"])
    with open(os.path.join(made["prefix"], "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["peft_type"] = "PREFIX_TUNING"
    with open(os.path.join(made["prefix"], "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return made


@pytest.fixture(scope="module")
def good_ref(dirs):
    return hf_greedy(dirs["base"], dirs["good"], PROMPT, 3)[0]


@pytest.fixture(scope="module")
def llm(dirs):
    return LLM(model=dirs["base"], enable_lora=True, max_loras=2, max_lora_rank=16,
               max_model_len=64, block_size=4, kv_cache_gb=0.01, log=False)  # fmt: skip


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "is not a directory"),
        ("rank32", "exceeds max_lora_rank (16)"),
        ("hidden", "hidden size mismatch"),
        ("layer2", "target module 'model.layers.2.self_attn.o_proj' does not exist"),
        ("embed", "LoRA on embed_tokens"),
        ("head", "modules_to_save"),
        ("dora", "DoRA"),
        ("bin", "pickled adapter_model.bin files are refused"),
        ("corrupt", "could not be read"),
        ("badjson", "adapter_config.json could not be read"),
        ("prefix", "peft_type 'PREFIX_TUNING' is not supported"),
    ],
)
def test_bad_adapter_is_a_clear_error(llm, dirs, good_ref, name, message):
    path = dirs.get(name, "/nonexistent/adapter")
    sp = SamplingParams(temperature=0.0, max_tokens=3)
    with pytest.raises(ValueError, match=f"adapter {name!r}.*{re.escape(message)}"):
        llm.generate([PROMPT], sp, use_tqdm=False, lora_request=LoRARequest(name, 50, path))
    # The engine keeps serving: a good adapter and the base model still run.
    good = LoRARequest("good", 1, dirs["good"])
    outs = llm.generate([PROMPT, PROMPT], sp, use_tqdm=False, lora_request=[good, None])
    assert outs[0].outputs[0].token_ids == good_ref


def test_lora_request_needs_enable_lora_and_unique_ids(dirs, llm):
    sp = SamplingParams(temperature=0.0, max_tokens=2)
    with pytest.raises(ValueError, match="adapter id 1 is already 'good'"):
        llm.generate([PROMPT], sp, use_tqdm=False,
                     lora_request=LoRARequest("other", 1, dirs["rank32"]))  # fmt: skip
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, dirs["good"])
    plain = LLM(model=dirs["base"], max_model_len=64, kv_cache_gb=0.01, log=False)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate([PROMPT], sp, use_tqdm=False,
                       lora_request=LoRARequest("good", 1, dirs["good"]))  # fmt: skip


@pytest.mark.parametrize("strategy", ["merged", "auto"])
def test_merge_unmerge_is_exact(dirs, strategy):
    llm = LLM(model=dirs["base"], enable_lora=True, max_loras=2, lora_strategy=strategy,
              max_model_len=64, block_size=4, kv_cache_gb=0.01, log=False)  # fmt: skip
    manager = llm.llm_engine.engine_core.lora_manager
    before = {i: layer.base_layer.weight.detach().clone() for i, layer in enumerate(manager.layers)}
    good = LoRARequest("good", 1, dirs["good"])
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = hf_greedy(dirs["base"], dirs["good"], PROMPT, 12)[0]
    # One adapter alone: merged (after auto's first measured steps).
    out = llm.generate([PROMPT], sp, use_tqdm=False, lora_request=good)[0]
    assert out.outputs[0].token_ids == want
    stats = manager.stats()
    # auto tried merging after its first single-adapter steps and measured both.
    assert stats["merges"] >= 1 and stats["merged_steps"] >= 1
    if strategy == "merged":
        assert stats["merged"] == 1.0 and stats["unmerged_steps"] == 0
    else:
        assert manager._auto.merged is not None and manager._auto.unmerged is not None
    # The base joins: unmerged, and the base weights are bit-identical to before.
    base_want = hf_greedy(dirs["base"], None, PROMPT, 12)[0]
    outs = llm.generate([PROMPT, PROMPT], sp, use_tqdm=False, lora_request=[good, None])
    assert outs[0].outputs[0].token_ids == want
    assert outs[1].outputs[0].token_ids == base_want
    assert manager.merged_slot == -1
    for i, layer in enumerate(manager.layers):
        assert torch.equal(layer.base_layer.weight, before[i])
