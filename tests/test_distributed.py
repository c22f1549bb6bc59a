"""The collectives of ``ParallelState`` on gloo, two real processes, against values
computed by hand; a collective whose peer never comes fails after the timeout; a group
of one rank runs no collective at all."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback

import pytest
import torch

from kvasir.config import ParallelConfig
from kvasir.distributed.parallel_state import (
    init_parallel_state,
    loopback_ifname,
    single_process_state,
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collectives(rank: int, init: str, q: mp.Queue) -> None:
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_ifname()
        st = init_parallel_state(
            ParallelConfig(tensor_parallel_size=2), rank, init, torch.device("cpu")
        )
        x = torch.arange(4, dtype=torch.float32) + 10 * rank  # rank 0: 0..3, rank 1: 10..13
        summed = st.tp.all_reduce(x.clone())
        gathered = st.tp.all_gather(x.view(1, 4), dim=-1)
        at_root = st.tp.gather(x.view(1, 4), dst=0, dim=0)
        q.put(
            (
                rank,
                summed.tolist(),
                gathered.tolist(),
                None if at_root is None else at_root.tolist(),
            )
        )
    except BaseException:
        q.put((rank, traceback.format_exc(), None, None))


def _p2p(rank: int, init: str, q: mp.Queue) -> None:
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_ifname()
        st = init_parallel_state(
            ParallelConfig(pipeline_parallel_size=2), rank, init, torch.device("cpu")
        )
        if st.is_first_stage:
            st.pp.send(torch.full((2, 3), 7.0), dst=1)
            q.put((rank, st.pp_rank, st.is_last_stage, None))
        else:
            got = st.pp.recv(torch.empty(2, 3), src=0)
            q.put((rank, st.pp_rank, st.is_last_stage, got.tolist()))
    except BaseException:
        q.put((rank, traceback.format_exc(), None, None))


def _lonely(rank: int, init: str, q: mp.Queue) -> None:
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_ifname()
        cfg = ParallelConfig(tensor_parallel_size=2, distributed_timeout=3.0)
        st = init_parallel_state(cfg, rank, init, torch.device("cpu"))
        if rank == 1:
            q.put((rank, "skipped", 0.0))
            time.sleep(30)  # never joins the all-reduce
            return
        t0 = time.monotonic()
        try:
            st.tp.all_reduce(torch.ones(4))
            q.put((rank, "returned", time.monotonic() - t0))
        except RuntimeError as e:
            q.put((rank, f"raised: {type(e).__name__}", time.monotonic() - t0))
    except BaseException:
        q.put((rank, traceback.format_exc(), 0.0))


def _run(target, n: int = 2, timeout: float = 60.0) -> dict[int, tuple]:  # noqa: ANN001
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"tcp://127.0.0.1:{_port()}"
    procs = [ctx.Process(target=target, args=(r, init, q), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(n):
            item = q.get(timeout=timeout)
            out[item[0]] = item[1:]
    finally:
        for p in procs:
            p.kill()
            p.join(5)
    return out


def test_all_reduce_all_gather_gather() -> None:
    out = _run(_collectives)
    for rank in (0, 1):
        summed, gathered, at_root = out[rank]
        assert summed == [10.0, 12.0, 14.0, 16.0], summed
        assert gathered == [[0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]]
        assert at_root == ([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]] if rank == 0 else None)


def test_send_recv_between_pipeline_stages() -> None:
    out = _run(_p2p)
    assert out[0][:2] == (0, False)
    assert out[1] == (1, True, [[7.0] * 3] * 2)


def test_collective_without_its_peer_times_out() -> None:
    out = _run(_lonely)
    assert out[1][0] == "skipped"
    what, elapsed = out[0]
    assert what.startswith("raised"), what
    assert 2.0 < elapsed < 20.0


def test_one_rank_runs_no_collective() -> None:
    st = single_process_state(torch.device("cpu"))
    x = torch.randn(3, 4)
    assert st.tp.all_reduce(x) is x and st.tp.all_gather(x) is x and st.tp.gather(x) is x
    assert (st.tp_size, st.pp_size, st.is_first_stage, st.is_last_stage) == (1, 1, True, True)
    assert not torch.distributed.is_initialized()


@pytest.fixture(autouse=True)
def _no_leftover_group() -> None:
    yield
    assert not torch.distributed.is_initialized()
