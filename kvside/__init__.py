"""kvside: a local LLM runtime on llama.cpp that edits the KV cache instead of recomputing it.

The llama.cpp bindings are imported here, before anything can import numpy: with a CUDA build,
numpy loaded first makes the tokenizer segfault (a libstdc++ clash inside std::regex).
"""

from kvside import _llama  # noqa: F401  (must stay the first import)

__version__ = "0.1.0"
