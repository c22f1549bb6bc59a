"""``kvasir plan``: what a model x hardware x configuration will do before it is deployed.

A hardware catalogue (``hardware``), FLOPs and bytes of every operator of a step
(``roofline``), a performance model of kvasir's engine on top of it (``perf``,
``workload``), KV-cache capacity computed as the engine computes it (``memory``), a
cost model (``tco``), the seed's design studies (``studies``), and ``verify``, which
runs ``kvasir bench`` and compares. A tool over the public API: nothing here runs on
the engine's hot loop.
"""
