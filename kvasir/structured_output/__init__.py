"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) through
xgrammar.

Where each part runs:

- ``validate`` (``backend.py``): on the client side (the API server, ``LLM``), before a
  request reaches the engine; a bad schema, regex or grammar is a ``ValueError`` that
  names the field. Parsing only: it needs no tokenizer.
- ``StructuredOutputManager`` (``manager.py``): in the engine core. It compiles each
  request's grammar on a worker thread (cached by kind and spec), owns one matcher per
  request, and each step fills the token bitmask of every constrained request that
  samples (one row per draft position with speculative decoding) into
  ``SchedulerOutput.grammar_bitmask``. The scheduler only asks it ``is_ready`` (a request
  waits for its grammar without holding anyone else up), ``accept_tokens`` and
  ``validate_tokens`` (drafts are cut at the first token the grammar refuses).
- ``bitmask.py``: on the worker, the step's rows of the bitmask, applied to the logits in
  one batched call inside the sampler.

Tool calling (``kvasir.entrypoints.openai.tool_parsers``) builds its ``required`` /
named-function constraints as ``StructuredOutputsParams`` through
``tool_choice_constraint``.
"""

from kvasir.structured_output.backend import validate

__all__ = ["validate"]
