"""Hub model ids through huggingface_hub: a hub cache laid out by the test (offline),
and downloads from a loopback server that answers the hub's endpoints (HF_ENDPOINT).

The model is a tiny random Llama saved by HF transformers with SmolLM2's tokenizer; what
kvasir loads from the hub is checked against transformers' own greedy generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hub_server import FakeHub, Repo, write_hub_cache

from kvasir.config import ModelConfig
from kvasir.models.default import default_model_path
from kvasir.models.loader import resolve_model_path
from kvasir.models.loader.hub import parse_hub_model_id, resolve_hub_model, select_gguf

SHA = "a" * 40
SHA_V1 = "b" * 40
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A repo's files: config, safetensors, tokenizer, plus a README and a pickle decoy."""
    from kvasir.models.loader.gguf_loader import gguf_tokenizer

    out = tmp_path_factory.mktemp("tiny-repo")
    tok = gguf_tokenizer(default_model_path())
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    files["README.md"] = b"# tiny\n"
    files["pytorch_model.bin"] = b"a pickle kvasir must never fetch"
    return files


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean hub environment: no token, online, caches under tmp_path."""
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    resolve_hub_model.cache_clear()
    yield tmp_path / "cache"
    resolve_hub_model.cache_clear()


def _hf_greedy(snapshot: Path, prompt_ids: list[int], n: int) -> list[int]:
    hf = transformers.LlamaForCausalLM.from_pretrained(snapshot, torch_dtype=torch.float32)
    out = hf.generate(
        torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n
    )
    return out[0, len(prompt_ids) :].tolist()


def test_parse_hub_model_id() -> None:
    assert parse_hub_model_id("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert parse_hub_model_id("org/x-GGUF:Q4_K_M") == ("org/x-GGUF", "Q4_K_M")
    for not_hub in ("./org/name", "/abs/path", "~/m", "model.gguf", "llama-3-8b", "a/b/c", "a/.."):
        assert parse_hub_model_id(not_hub) is None, not_hub


def test_select_gguf() -> None:
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m.Q8_0.gguf", "m-f16.gguf"]
    assert select_gguf(files, "o/m", "Q8_0", None) == "m.Q8_0.gguf"
    assert select_gguf(files, "o/m", "q4_k_s", None) == "m-Q4_K_S.gguf"
    assert select_gguf(files, "o/m", None, None) == "m-Q4_K_M.gguf"  # llama.cpp's default
    assert select_gguf(files, "o/m", None, "m-f16.gguf") == "m-f16.gguf"
    with pytest.raises(ValueError, match="Q5_K_M.*matching GGUF files"):
        select_gguf(files, "o/m", "Q5_K_M", None)
    with pytest.raises(ValueError, match="gguf_file 'nope.gguf' is not in"):
        select_gguf(files, "o/m", None, "nope.gguf")


def test_hub_cache_offline_loads_like_transformers(
    tiny_files: dict[str, bytes], hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {k: v for k, v in tiny_files.items() if not k.endswith(".bin")}
    snap = write_hub_cache(hub_env, "org/tiny", files, SHA, {"main": SHA})
    write_hub_cache(hub_env, "org/tiny", files, SHA_V1, {"v1": SHA_V1})
    for revision, want in ((None, SHA), ("main", SHA), ("v1", SHA_V1), (SHA_V1, SHA_V1)):
        mc = ModelConfig(model="org/tiny", revision=revision, download_dir=str(hub_env))
        path, fmt = resolve_model_path(mc)
        assert (Path(path), fmt) == (
            hub_env / "models--org--tiny" / "snapshots" / want,
            "safetensors",
        )
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve_model_path(ModelConfig(model="org/tiny", revision="v2", download_dir=str(hub_env)))

    from kvasir import LLM, SamplingParams

    llm = LLM("org/tiny", download_dir=str(hub_env), max_model_len=128, kv_cache_gb=0.02, log=False)
    try:
        prompt = "The quick brown fox"
        ids = llm.get_tokenizer().encode(prompt)
        out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert list(out[0].outputs[0].token_ids) == _hf_greedy(snap, ids, 6)
    finally:
        del llm


def test_offline_and_not_cached_is_a_clear_error(
    hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"'org/absent'.*not fully in the hub cache.*HF_HUB_OFFLINE"
    ):
        resolve_model_path(ModelConfig(model="org/absent", download_dir=str(hub_env)))


def test_download_only_needed_files_then_cache(
    tiny_files: dict[str, bytes], hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub({"org/tiny": Repo(dict(tiny_files), sha=SHA, refs={"v1": SHA})}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path, fmt = resolve_model_path(ModelConfig(model="org/tiny", download_dir=str(hub_env)))
        assert fmt == "safetensors"
        assert Path(path) == hub_env / "models--org--tiny" / "snapshots" / SHA
        want = {n for n in tiny_files if n not in ("README.md", "pytorch_model.bin")}
        assert set(hub.downloaded()) == want
        for name in want:
            assert (Path(path) / name).read_bytes() == tiny_files[name]
        assert not (Path(path) / "pytorch_model.bin").exists()
        # a second resolution (a new process: the per-process cache cleared) is served
        # from the hub cache without a single request
        resolve_hub_model.cache_clear()
        num_requests = len(hub.requests)
        assert (
            resolve_model_path(ModelConfig(model="org/tiny", download_dir=str(hub_env)))[0] == path
        )
        assert len(hub.requests) == num_requests
        with pytest.raises(ValueError, match=r"no revision 'nope' \(--revision\)"):
            resolve_model_path(
                ModelConfig(model="org/tiny", revision="nope", download_dir=str(hub_env))
            )
        with pytest.raises(ValueError, match="neither a local path nor a repo on"):
            resolve_model_path(ModelConfig(model="org/missing", download_dir=str(hub_env)))


def test_private_repo_needs_hf_token(
    tiny_files: dict[str, bytes], hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = {k: v for k, v in tiny_files.items() if k != "model.safetensors"}
    small["model.safetensors"] = tiny_files["model.safetensors"]
    with FakeHub({"org/private": Repo(small, sha=SHA, token="hf_secret")}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        mc = ModelConfig(model="org/private", download_dir=str(hub_env))
        with pytest.raises(ValueError, match="HF_TOKEN"):
            resolve_model_path(mc)
        assert hub.downloaded() == []
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        resolve_hub_model.cache_clear()
        assert resolve_model_path(mc)[1] == "safetensors"
        assert "model.safetensors" in hub.downloaded()


def test_pickle_only_repo_is_refused(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle", "model.pt": b"pickle"}
    with FakeHub({"org/pickles": Repo(files, sha=SHA)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ValueError, match="only pickled weights.*never loads pickles"):
            resolve_model_path(ModelConfig(model="org/pickles", download_dir=str(hub_env)))
        assert hub.downloaded() == []


def test_gguf_repo_quant_suffix_and_gguf_file(
    hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = Path(default_model_path()).read_bytes()
    files = {
        "README.md": b"# gguf\n",
        "SmolLM2-135M-Instruct-Q4_1.gguf": gguf,
        "SmolLM2-135M-Instruct-Q8_0.gguf": b"GGUF not this one",
        "SmolLM2-135M-Instruct-f16.gguf": b"GGUF nor this one",
    }
    with FakeHub({"org/smol-GGUF": Repo(files, sha=SHA)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path, fmt = resolve_model_path(
            ModelConfig(model="org/smol-GGUF:q4_1", download_dir=str(hub_env))
        )
        assert fmt == "gguf" and path.endswith("SmolLM2-135M-Instruct-Q4_1.gguf")
        assert hub.downloaded() == ["SmolLM2-135M-Instruct-Q4_1.gguf"]
        assert Path(path).read_bytes() == gguf
        path2, _ = resolve_model_path(
            ModelConfig(
                model="org/smol-GGUF",
                gguf_file="SmolLM2-135M-Instruct-f16.gguf",
                download_dir=str(hub_env),
            )
        )
        assert Path(path2).read_bytes() == files["SmolLM2-135M-Instruct-f16.gguf"]
        with pytest.raises(ValueError, match="no quant tag.*matching GGUF files"):
            resolve_model_path(ModelConfig(model="org/smol-GGUF", download_dir=str(hub_env)))


def test_kvasir_generate_cli_with_hub_id(
    tiny_files: dict[str, bytes], hub_env: Path, tmp_path: Path
) -> None:
    """``kvasir generate org/name`` end to end in a subprocess: HF_ENDPOINT, --revision and
    --download-dir reach the loader, and the text matches transformers' greedy tokens."""
    with FakeHub({"org/tiny": Repo(dict(tiny_files), sha=SHA, refs={"v1": SHA})}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"))
        env.pop("HF_HUB_OFFLINE", None)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        args = [
            sys.executable, "-m", "kvasir.entrypoints.cli", "generate", "--model", "org/tiny",
            "--revision", "v1", "--download-dir", str(hub_env), "--raw", "--max-tokens", "5",
            "--ignore-eos", "--max-model-len", "128", "--kv-cache-gb", "0.02", "Hello there",
        ]  # fmt: skip
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "model.safetensors" in hub.downloaded()
    snap = hub_env / "models--org--tiny" / "snapshots" / SHA
    tok = transformers.AutoTokenizer.from_pretrained(snap)
    ids = tok.encode("Hello there")
    want = tok.decode(_hf_greedy(snap, ids, 5))
    assert want.strip() in proc.stdout, (proc.stdout, want)
