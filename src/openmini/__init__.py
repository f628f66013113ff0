"""OpenMini: small open-weight models behind the OpenAI Chat Completions and Responses APIs.

``from openmini import LLM, SamplingParams`` gives the offline API. Heavy modules (torch)
load lazily, so the torch-free parts (scheduler, KV manager) stay cheap to import.
"""

from openmini.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from openmini.entrypoints.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from openmini import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'openmini' has no attribute {name!r}")
