"""Paddle 3.1.1's dygraph-to-static conversion, converted once per layer class instead of once per layer.

``paddle.jit.save`` and ``paddle.jit.to_static`` convert every sub-layer's ``forward`` by rewriting its source
(``FunctionCache.convert_with_cache`` in ``paddle.jit.dy2static.program_translator``). The cache is a
``WeakKeyDictionary`` keyed by the function it is given, and for a layer that is the *bound* method
``layer.forward``: a new object on every attribute access, dropped from the weak dictionary at once. So every layer
instance, on every save or trace, is converted again: a temporary module written and imported, and its source
positions mapped, for each of PP-OCRv4 det's ~165 layers (2.6-3.3 s per save on this machine, 64x64 input, of
which the program itself is a small part). A study saves each trial's model twice (the candidate and, for the
interleaved timing, its reference) and traces it for its groups.

The conversion reads nothing of the instance: Paddle's own ``ast_to_func`` builds the converted function from the
source, globals and closure of ``method.__func__``, and ``convert_call`` binds ``self`` afterwards with
``functools.partial``. Keying the cache by ``method.__func__`` therefore returns the same function Paddle would
build again. Installed from the two places that convert (``train.inference.export_inference``,
``prune.graph.trace``); idempotent.
"""

from __future__ import annotations

import inspect

from paddle.jit.dy2static import program_translator

_INSTALLED = "_ocrdet_keys_methods_by_function"
PADDLE_CONVERT_WITH_CACHE = program_translator.FunctionCache.convert_with_cache


def _convert_with_cache(self: program_translator.FunctionCache, func):
    key = func.__func__ if inspect.ismethod(func) else func
    static_func = self._converted_static_func_caches.get(key)
    if static_func is None:
        static_func = self._convert(func)
        self._converted_static_func_caches[key] = static_func
    return static_func


def convert_each_class_once() -> None:
    """Make Paddle's conversion cache key bound methods by their function (see the module docstring)."""
    cache_class = program_translator.FunctionCache
    if getattr(cache_class, _INSTALLED, False):
        return
    if not hasattr(cache_class, "_convert") or not hasattr(program_translator._FUNCTION_CACHE,
                                                          "_converted_static_func_caches"):
        return  # another Paddle than the one this was written against (3.1.1): leave its cache as it is
    cache_class.convert_with_cache = _convert_with_cache
    setattr(cache_class, _INSTALLED, True)
