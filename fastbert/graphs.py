"""CUDA-graph inference for small batches (issue 22 part 3; DESIGN.md section 3, "Host path").

A small-batch encoder forward is a few microseconds of GPU work per layer and tens of host
microseconds of launches; replaying a captured CUDA graph launches the whole forward at once.

    graphed = fastbert.cuda_graphs(model, max_batch=32, max_tokens=2048)
    rows = graphed(input_ids, cu_seqlens, max_seqlen)    # (T, C), as
    rows = model(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                 return_packed=True).last_hidden_state

Packed input as BertModel takes it (input_ids (1, T), cu_seqlens int32 (B + 1,)) is rounded up to
a bucket (batch, tokens): batch and token counts at powers of two up to max_batch / max_tokens.
Each bucket's forward is captured once, on its first use, over static buffers: token ids, their
positions, and cu_seqlens of batch + 2 entries laid out as

    [the B + 1 real offsets, T for each unused sequence slot, the bucket's token count]

so the unused slots are empty sequences and the padding tokens T..bucket form one sequence of
their own, attended only among themselves. max_seqlen is the bucket's token count, an upper bound
of every length known without reading cu_seqlens, so the forward never syncs with the host. A call
copies its inputs into the buffers (device to device), replays, and returns a copy of the real
rows. Everything else runs the model eagerly: more sequences or tokens than the largest bucket,
CPU tensors, a model in training mode or with grad mode on, and the kill switch (`enabled =
False`, or FASTBERT_CUDA_GRAPHS=0 in the environment when the graphs are made). The graphs read
the parameters where they were at capture: in-place writes (load_state_dict) are seen, and moving
or replacing the weights (model.to(...)) drops the graphs, which are captured again on use.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastbert.padding import positions_in_sequence

ENV_SWITCH = "FASTBERT_CUDA_GRAPHS"


def buckets(limit: int, smallest: int = 1) -> List[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"fastbert.cuda_graphs: expected a positive int limit, got {limit!r}")
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def bucket_for(sizes: List[int], n: int) -> Optional[int]:
    """The smallest size >= n, or None past the largest."""
    for size in sizes:
        if size >= n:
            return size
    return None


class _Bucket:
    """The static buffers of one (batch, tokens) bucket and, once captured, its graph."""

    def __init__(self, batch: int, tokens: int, device: torch.device, position_offset: int):
        self.batch, self.tokens, self.position_offset = batch, tokens, position_offset
        self.ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.full((tokens,), position_offset, dtype=torch.long, device=device)
        # batch + 1 offsets of the real and empty slots, then the padding sequence's end
        self.cu_seqlens = torch.zeros(batch + 2, dtype=torch.int32, device=device)
        self.cu_seqlens[-1] = tokens
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.rows: Optional[Tensor] = None  # (tokens, C) output of the captured forward

    def fill(self, input_ids: Tensor, cu_seqlens: Tensor, positions: Tensor) -> None:
        """Copy one call's packed input in; the rest becomes empty slots and padding."""
        b, t = cu_seqlens.numel() - 1, input_ids.numel()
        self.ids[:t].copy_(input_ids.reshape(-1))
        self.ids[t:].zero_()
        self.positions[:t].copy_(positions)
        self.positions[t:].fill_(self.position_offset)
        self.cu_seqlens[:b + 1].copy_(cu_seqlens)
        self.cu_seqlens[b + 1:-1].fill_(t)

    def forward(self, model) -> Tensor:
        """The model on the buffers: (tokens, C) rows."""
        return model(self.ids.view(1, -1), position_ids=self.positions.view(1, -1),
                     cu_seqlens=self.cu_seqlens, max_seqlen=self.tokens,
                     return_packed=True).last_hidden_state


class GraphedEncoder:
    """A BertModel's packed inference forward, replayed from CUDA graphs per bucket (see the
    module docstring). `enabled = False` turns the graphs off (eager from then on)."""

    def __init__(self, model, max_batch: int = 32, max_tokens: int = 2048,
                 enabled: Optional[bool] = None, warmup: int = 2):
        self.model = model
        self.batch_sizes = buckets(max_batch)
        self.token_sizes = buckets(max_tokens, smallest=min(16, max_tokens))
        if enabled is None:
            enabled = os.environ.get(ENV_SWITCH, "1") != "0"
        self.enabled = bool(enabled)
        self.warmup = warmup
        self._buckets: Dict[Tuple[int, int], _Bucket] = {}
        self._pool = None  # one memory pool shared by every bucket's graph
        self._weights = None  # where the word embeddings were at capture
        self.replays = 0  # calls served by a graph (tests and benchmarks read it)

    def bucket(self, batch: int, tokens: int) -> Optional[Tuple[int, int]]:
        """The (batch, tokens) bucket a call of this size runs in, or None (eager)."""
        b, t = bucket_for(self.batch_sizes, batch), bucket_for(self.token_sizes, tokens)
        return None if b is None or t is None else (b, t)

    def _graphable(self, input_ids: Tensor) -> bool:
        return (self.enabled and input_ids.is_cuda and not self.model.training
                and not torch.is_grad_enabled() and torch.cuda.is_available()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """(T, C) rows of the packed batch input_ids (1, T) with cu_seqlens int32 (B + 1,)."""
        key = self.bucket(cu_seqlens.numel() - 1, input_ids.numel())
        if key is None or not self._graphable(input_ids):
            return self.model(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                              return_packed=True).last_hidden_state
        self._drop_if_moved()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = self._capture(*key, input_ids.device)
        positions = positions_in_sequence(cu_seqlens, input_ids.numel()) \
            + self.model.config.position_offset
        bucket.fill(input_ids, cu_seqlens, positions)
        bucket.graph.replay()
        self.replays += 1
        return bucket.rows[:input_ids.numel()].clone()

    def _drop_if_moved(self) -> None:
        """Forget the graphs when the weights moved (model.to): they read the old memory."""
        weights = self.model.embeddings.word_embeddings.weight
        if self._weights != (weights.data_ptr(), weights.dtype):
            self._buckets.clear()
            self._weights = (weights.data_ptr(), weights.dtype)

    def _capture(self, batch: int, tokens: int, device: torch.device) -> _Bucket:
        """Warm the bucket's kernels up (Triton compiles on first launch), then capture."""
        with torch.inference_mode(False):  # buffers with version counters (see below)
            bucket = _Bucket(batch, tokens, device, self.model.config.position_offset)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                bucket.forward(self.model)
        torch.cuda.current_stream(device).wait_stream(stream)
        # a new version of cu_seqlens: what backends cache per cu_seqlens version (the torch
        # backend's padded layout) is then computed inside the graph, from each replay's
        # offsets, not captured as the warm-up's constants
        bucket.cu_seqlens.add_(0)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        bucket.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.graph, pool=self._pool):
            bucket.rows = bucket.forward(self.model)
        return bucket

    def capture_all(self, device=None) -> None:
        """Capture every bucket now (largest first, so smaller graphs reuse its pool memory)."""
        device = torch.device(device or "cuda")
        self._drop_if_moved()
        for b in reversed(self.batch_sizes):
            for t in reversed(self.token_sizes):
                if (b, t) not in self._buckets:
                    self._buckets[(b, t)] = self._capture(b, t, device)


def cuda_graphs(model, max_batch: int = 32, max_tokens: int = 2048,
                enabled: Optional[bool] = None) -> GraphedEncoder:
    """`model`'s packed inference forward replayed from CUDA graphs for up to max_batch sequences
    and max_tokens tokens (see fastbert/graphs.py); eager outside them."""
    return GraphedEncoder(model, max_batch=max_batch, max_tokens=max_tokens, enabled=enabled)
