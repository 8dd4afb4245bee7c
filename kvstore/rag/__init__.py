"""RAG chunk-cache reuse (§7): ``build`` turns stored chunk KV into a prompt's cache,
``blend`` recomputes the tokens that reuse got most wrong, ``budget`` decides how many
(adaptive within the caller's ``min_speedup``).

``from kvstore.rag import build_cache`` is the entry point.
"""

from kvstore.rag.build import RagStats, build_cache, build_cache_naive, stored_chunk_tokens

__all__ = ["RagStats", "build_cache", "build_cache_naive", "stored_chunk_tokens"]
