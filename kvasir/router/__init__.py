"""``kvasir router``: a cache- and load-aware router over ``kvasir serve`` replicas, with
health checks, drain and cordon, retries and stream migration, hedging, weighted
versions with shadow traffic, and state shared through etcd. See ``kvasir.router.app``."""
