"""fa2dispatch: FlashAttention-2 for PyTorch on whatever GPU you have.

One attention API, several kernels under it, and a dispatcher that picks one and says why::

    out = fa2dispatch.attention(q, k, v, causal=True)
    print(fa2dispatch.explain(q, k, v, causal=True))
"""

from fa2dispatch.api import attention, explain
from fa2dispatch.dispatch import Decision, use_backend
from fa2dispatch.errors import NoBackendError
from fa2dispatch.fp8 import hadamard, quantize_fp8
from fa2dispatch.kvcache import attention_with_kvcache, explain_kvcache
from fa2dispatch.problem import AttentionProblem
from fa2dispatch.varlen import attention_varlen, explain_varlen

__version__ = "0.1.0"

__all__ = ["AttentionProblem", "Decision", "NoBackendError", "attention", "attention_varlen", "attention_with_kvcache",
           "explain", "explain_kvcache", "explain_varlen", "hadamard", "quantize_fp8", "use_backend", "__version__"]
