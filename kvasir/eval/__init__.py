"""Model-quality evaluations that run through the engine itself (``kvasir eval ...``).

Each subcommand lives in its own module with ``add_cli_args(parser)`` and
``main(args) -> int``; ``kvasir.entrypoints.cli`` lists them in ``EVAL_COMMANDS``.
"""
