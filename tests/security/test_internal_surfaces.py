"""Internal surfaces: no unsafe deserialisation or dynamic code anywhere in the package
(an AST scan, not a text grep, so comments saying "never pickle" do not count), the
engine core's IPC sockets are owner-only, and a malformed message to the core is
dropped and logged, never executed."""

from __future__ import annotations

import ast
import logging
import os
import stat
from pathlib import Path

import msgspec

from kvasir.engine.messages import EngineCoreRequest
from kvasir.sampling_params import SamplingParams

PKG = Path(__file__).resolve().parents[2] / "kvasir"
_BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_BANNED_BUILTINS = {"eval", "exec"}


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _BANNED_MODULES:
                    out.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _BANNED_MODULES:
                out.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            f = node.func
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and f.id in _BANNED_BUILTINS:
                out.append(f"{where}: {f.id}()")
            if isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else None
                if f.attr == "load" and base == "torch":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        out.append(f"{where}: torch.load without weights_only=True")
                if f.attr in ("load", "load_all", "unsafe_load") and base == "yaml":
                    out.append(f"{where}: yaml.{f.attr} (use yaml.safe_load)")
                if f.attr == "load" and base in ("np", "numpy"):
                    ap = kw.get("allow_pickle")
                    if isinstance(ap, ast.Constant) and ap.value is True:
                        out.append(f"{where}: numpy.load(allow_pickle=True)")
    return out


def test_no_pickle_eval_or_unsafe_load_in_the_package() -> None:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 100  # the scan really walks the package
    found = [f for p in files for f in _findings(p)]
    assert found == []


def test_the_scan_catches_what_it_bans(tmp_path: Path) -> None:
    """The scanner itself, on a file that does each banned thing once."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
        "eval('1')\nexec('x=1')\ntorch.load('f')\ntorch.load('f', weights_only=False)\n"
        "torch.load('f', weights_only=True)\nyaml.load('a')\nnp.load('f', allow_pickle=True)\n"
        "model.eval()\nre.compile('x')\n"
    )
    found = _findings(bad)
    kinds = [f.split(": ", 1)[1] for f in found]
    assert kinds == [
        "import pickle",
        "from dill import",
        "eval()",
        "exec()",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "yaml.load (use yaml.safe_load)",
        "numpy.load(allow_pickle=True)",
    ]


def test_engine_core_ipc_sockets_are_owner_only() -> None:
    from kvasir.engine.arg_utils import EngineArgs
    from kvasir.engine.core_client import EngineCoreClient

    config = EngineArgs(model="tiny-llama", load_format="dummy").create_engine_config()
    client = EngineCoreClient(config, on_dead=lambda code: None)
    try:
        d = client.input_addr[len("ipc://") :].rsplit("/", 1)[0]
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for addr in (client.input_addr, client.output_addr):
            st = os.stat(addr[len("ipc://") :])
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
    finally:
        client.shutdown()


class _RecordingCore:
    def __init__(self) -> None:
        self.added: list[str] = []
        self.aborted: list[list[str]] = []

    def add_request(self, req: EngineCoreRequest) -> None:
        self.added.append(req.request_id)

    def abort_requests(self, ids: list[str]) -> None:
        self.aborted.append(ids)


def test_malformed_core_messages_are_dropped_and_logged(caplog) -> None:
    from kvasir.engine.core_proc import MSG_ABORT, MSG_ADD, EngineCoreProc
    from kvasir.engine.messages import EngineCoreAbort

    proc = EngineCoreProc.__new__(EngineCoreProc)  # no sockets: the handler alone
    proc.core = _RecordingCore()  # type: ignore[assignment]
    proc._req_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
    proc._abort_decoder = msgspec.msgpack.Decoder(EngineCoreAbort)
    proc._rejected = []
    proc._shutdown = False
    enc = msgspec.msgpack.encode
    good = EngineCoreRequest("r1", [1, 2, 3], SamplingParams(max_tokens=2))
    malformed = [
        [MSG_ADD, b"\xc1\xc1 not msgpack"],
        [MSG_ADD, enc({"request_id": 5, "prompt_token_ids": "x"})],  # wrong types
        [MSG_ADD, enc({"request_id": "r2"})],  # missing fields
        [MSG_ADD],  # missing frame
        [MSG_ABORT, enc([1, 2, 3])],
        [b"\x80\x04cos\nsystem\n", b"pickle-looking junk"],
        [],
    ]
    with caplog.at_level(logging.ERROR, logger="kvasir.engine.core_proc"):
        for frames in malformed:
            proc._handle_input(frames)
    assert proc.core.added == [] and proc.core.aborted == []  # type: ignore[attr-defined]
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == len(malformed)
    proc._handle_input([MSG_ADD, enc(good)])
    proc._handle_input([MSG_ABORT, enc(EngineCoreAbort(["r1"]))])
    assert proc.core.added == ["r1"] and proc.core.aborted == [["r1"]]  # type: ignore[attr-defined]
    assert not proc._shutdown
