"""The engine-core process and its client on a tiny random-weight model: requests and
aborts over ZeroMQ, rejections, death notice, and no orphan when the parent dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

from server_utils import REPO_ROOT, pid_alive

from kvasir.engine.arg_utils import EngineArgs
from kvasir.engine.core_client import EngineCoreClient
from kvasir.engine.messages import EngineCoreRequest
from kvasir.sampling_params import SamplingParams

TINY = dict(
    model="tiny-llama", load_format="dummy", kv_cache_gb=0.01, max_model_len=128, device="cpu"
)


def _req(rid: str, n_prompt: int, max_tokens: int) -> EngineCoreRequest:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return EngineCoreRequest(rid, list(range(1, n_prompt + 1)), sp, arrival_time=time.time())


def test_requests_aborts_rejections_and_death() -> None:
    async def main() -> None:
        deaths: list[int | None] = []
        config = EngineArgs(**TINY).create_engine_config()
        client = await EngineCoreClient.start(config, deaths.append, "WARNING")
        try:
            assert client.model_info is not None and client.model_info.max_model_len == 128
            client.add_request(_req("a", 5, 4))
            client.add_request(_req("b", 5, 1000))  # runs until aborted
            client.add_request(_req("too-long", 200, 4))  # never fits max_model_len
            tokens: dict[str, int] = {"a": 0, "b": 0}
            finished: dict[str, str] = {}
            rejected = []
            while "a" not in finished or not rejected or tokens["b"] < 3:
                batch = await asyncio.wait_for(client.get_output(), 30)
                rejected += batch.rejected
                for out in batch.outputs:
                    tokens[out.request_id] += len(out.new_token_ids)
                    if out.finish_reason:
                        finished[out.request_id] = out.finish_reason
            assert tokens["a"] == 4 and finished["a"] == "length"
            assert [r.request_id for r in rejected] == ["too-long"]
            assert not rejected[0].queue_full and "max_model_len" in rejected[0].message
            client.abort_requests(["b"])
            while True:  # the core confirms with stats showing nothing left
                batch = await asyncio.wait_for(client.get_output(), 30)
                st = batch.scheduler_stats
                if st is not None and st.num_running_reqs == 0 and st.num_waiting_reqs == 0:
                    break
            assert st.kv_cache_usage == 0.0
            assert not deaths
            os.kill(client.pid, signal.SIGKILL)  # type: ignore[arg-type]
            for _ in range(100):
                if deaths:
                    break
                await asyncio.sleep(0.05)
            assert deaths == [-signal.SIGKILL]
        finally:
            client.shutdown()

    asyncio.run(main())


def test_core_exits_when_parent_is_killed() -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from kvasir.engine.arg_utils import EngineArgs
        from kvasir.engine.core_client import EngineCoreClient

        async def main():
            config = EngineArgs(**{TINY!r}).create_engine_config()
            client = await EngineCoreClient.start(config, lambda code: None, "WARNING")
            print("CORE_PID", client.pid, flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = ""
        while not line.startswith("CORE_PID"):  # the core prints its own start-up line
            line = parent.stdout.readline()  # type: ignore[union-attr]
            assert line, "the parent exited before starting the core"
        core_pid = int(line.split()[1])
        assert pid_alive(core_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(core_pid), "engine core outlived its parent"
    finally:
        parent.kill()
