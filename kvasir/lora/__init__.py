"""Multi-LoRA serving: PEFT adapters applied per token on top of the base model's linear
layers, many adapters (and the base) in one batch.

* ``request.LoRARequest``: which adapter a request runs under;
* ``adapter``: reading and validating PEFT adapters (LoRA and (IA)^3);
* ``layers``: the wrappers around ``LinearBase`` layers that add the batched delta;
* ``ops`` / ``kvasir.kernels.lora``: the shrink/expand products (torch and Triton);
* ``manager``: the runner's side (device slots, host cache, prefetch, strategy);
* ``kvasir.core.lora_slots``: the scheduler's side (which adapter holds which slot).

Importing this package imports no torch; the submodules that need it do.
"""

from kvasir.lora.request import LoRARequest

__all__ = ["LoRARequest"]
