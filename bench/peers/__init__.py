"""``kvrack bench peers``: kvrack beside the stores users would pick instead, same machine, same run.

``workload`` is the one workload every byte store runs (block sizes x batch sizes, write / read / mixed, and a
prefix-reuse replay from ``kvrack sim``'s generators with equal memory); ``stores`` holds each system behind
its own normal client (kvrack over shared memory, TCP and NIXL; Redis through redis-py); ``lmcache`` runs
LMCache's multi-process server through its own benchmark client and kvrack's paged-KV torch API on the same
KV shapes; ``mooncake`` says whether Mooncake Store can run here; ``run`` puts it together.
"""
