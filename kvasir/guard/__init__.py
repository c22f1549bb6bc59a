"""Guards around the model (``--guard-config FILE``): an input pipeline run in the API
process before a request reaches the engine (``injection``: rule-based prompt-injection
and jailbreak detection) and an output pipeline over the streamed text (``pii`` and
``blocklist`` redaction that never lets a match out split across chunks). Each guard has
an action: ``block`` (400 ``content_filter`` for input; the output stream ends with
finish_reason ``content_filter``), ``redact`` (output only) or ``flag`` (metric + log).
"""
