"""The slot engine: many replies decoded together, one fixed-shape step replayed as a CUDA graph.

Each reply in flight owns one row of a static KV cache (`rows` x `length` positions per layer). All rows
are written at one shared position `t`, so one decoding step is a fixed-shape forward pass for the first
`b` rows over the first `L` positions: it is captured once per (b, L) bucket as a CUDA graph, with the
sampling (repetition penalty, temperature, top-k 50 then top-p, per row) and the bookkeeping of the next
step inside it, and replayed 4 or 8 times (`STEPS`) before the host reads the new tokens. A new reply is
prefilled into a free row so that its prompt ends at `t` (left-padded with its neighbours in one
batch); its tokens keep their own rotary positions, so where a row sits in the cache does not matter.
The attention mask of row i allows positions [start_i, t]. When the window of live positions drifts
towards the end of the cache, or a new prompt does not fit before `t`, the live part is shifted (one
copy). Finished rows are filled with the last live row, so the live rows are always the first `n`.

The model is any transformers causal LM whose attention layers call `past_key_values.update()` and
accept a prepared 4-D mask (Llama and SmolLM2 here). On the CPU the same step runs eagerly.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

STEPS = 8  # decoding steps between two reads of the new tokens, at most (a new reply waits at most this many to join)
FEW_ROWS = 16  # up to this many live rows, the host reads the new tokens every 4 steps; above, every 8 (half the host work)
TOP_K = 50  # transformers' default top-k, applied before top-p as in `generate`
CHUNK = 2048  # top-k runs over chunks of about this many columns first (`top_k`)
PREFILL_TOKENS = 8192  # prompt tokens (padding included) prefilled in one forward pass at most
# positions a row keeps free past its reply: one launch of steps, and one more already queued when it ends
MARGIN = 2 * STEPS
MIN_SHIFT = 256  # the live window is moved back to the cache's start only when that frees this much


def sample(logits, temperature, top_p, penalty, seen):
    """Next token per row: repetition penalty on seen tokens, then greedy (temperature 0) or top-k/top-p sampling.

    Everything is tensor arithmetic with no host synchronisation, so it can be captured in a CUDA graph.
    """
    import torch

    logits = logits.float()
    pen = penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    top, index = top_k(logits / temperature.clamp_min(1e-5)[:, None], min(TOP_K, logits.shape[-1]))
    greedy = index[:, 0]  # the best token (dividing by a temperature keeps the order)
    probs = top.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each candidate
    probs = probs.masked_fill(before > top_p[:, None], 0.0)  # the first candidate always stays
    choice = (probs / torch.empty_like(probs).exponential_(1.0)).argmax(-1)  # a draw from probs
    sampled = index.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def top_k(x, k: int):
    """`x.topk(k)` (values in descending order, their indices) in two stages: the k best of each chunk of
    about 2,048 columns, then the k best of those. One row of a 128k vocabulary is then many small
    parallel selections instead of one long one (on an H200, 55 us a step for one row in one stage)."""
    import torch

    rows, width = x.shape
    chunks = width // CHUNK
    if chunks < 2:
        return x.topk(k, dim=-1)
    size = -(-width // chunks)
    if size * chunks != width:
        x = torch.nn.functional.pad(x, (0, size * chunks - width), value=float("-inf"))
    top, index = x.view(rows, chunks, size).topk(k, dim=-1)
    index = index + torch.arange(0, size * chunks, size, device=x.device)[None, :, None]
    top, pick = top.reshape(rows, -1).topk(k, dim=-1)
    return top, index.reshape(rows, -1).gather(-1, pick)


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for grouped-query models with a prepared mask, without copying K/V for every query head.

    transformers' `sdpa` repeats K and V to the query heads whenever a mask is given (4x the cache
    traffic for Llama-3.2-1B); here the query heads of one K/V head become extra query rows instead.
    Registered with transformers' AttentionInterface as `shallow_grouped_sdpa`.
    """
    import torch

    b, heads, q, d = query.shape
    groups = heads // key.shape[1]
    if groups > 1:
        query = query.reshape(b, key.shape[1], groups * q, d)  # head kv*g + r, position i -> row r*q + i
        if attention_mask is not None and q > 1:
            attention_mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


ATTENTION = "shallow_grouped_sdpa"


def register_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_sdpa)
    return ATTENTION


class _Window:
    """What the attention layers see as `past_key_values`: views of some rows and positions of the cache."""

    def __init__(self, keys, values, index) -> None:
        self.keys, self.values, self.index = keys, values, index

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.index, key_states)
        values.index_copy_(2, self.index, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@dataclass
class Request:
    ids: list[int]
    max_new_tokens: int
    eos: frozenset[int]
    temperature: float
    top_p: float
    repetition_penalty: float
    out: queue.Queue = field(default_factory=queue.Queue)  # lists of new token ids, then None (done) or an exception
    generated: int = 0
    queued: int = 0  # tokens the launches queued so far will have written for it (the prefill's first one included)
    cancelled: bool = False
    finished: bool = False  # ended (or cancelled and let go): tokens still in flight for it are dropped
    engine_id: str = ""  # the paged engine's own name for it
    marks: list | None = None  # when a list: (event, time.perf_counter()) as the engine admits, prefills, launches, delivers


def _mark(request: Request, event: str) -> None:
    if request.marks is not None:
        request.marks.append((event, time.perf_counter()))


class EngineStopped(RuntimeError):
    pass


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, K/V heads, head size) of a transformers model config: what one cached token holds, twice (K and V)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def _buckets(limit: int, first: int) -> list[int]:
    sizes, size = [], first
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class SlotEngine:
    def __init__(self, model, rows: int, length: int, *, cuda_graphs: bool = True, pad_id: int = 0,
                 compile: bool | str = False, compile_mode: str | None = None, prefill_model=None) -> None:
        import torch

        cfg = model.config
        self.model, self.rows, self.length, self.pad_id = model, rows, length, pad_id
        # Optionally through torch.compile (dynamic shapes: one compile for every bucket): the model's forward
        # pass ("model", or True), that and, as a second graph, the sampling and bookkeeping after it ("split"),
        # or the whole step in one ("step").
        compile = "model" if compile is True else compile
        if compile not in (False, None, "model", "split", "step"):
            raise ValueError(f"compile must be model, split or step, not {compile!r}")
        # prefills go through `forward` too: eagerly, a prefill is ~12 ms of the host's Python for 16 layers (H200,
        # 1B shape), most of a reply's time to its first token once the step itself is compiled
        self.forward = torch.compile(model, dynamic=True, mode=compile_mode) if compile in ("model", "split") else model
        self._step = torch.compile(self._step, dynamic=True, mode=compile_mode) if compile == "step" else self._step
        self._finish = torch.compile(self._finish, dynamic=True, mode=compile_mode) if compile == "split" else self._finish
        # `prefill_model`: the prompts go through another copy of the model (same modules and cache layout): the
        # int4 mode's full-precision weights, as its int4 kernel is fast at a few rows and slow at a prompt's many
        if prefill_model is None:
            self.prefill = self.forward
        else:
            self.prefill = torch.compile(prefill_model, dynamic=True, mode=compile_mode) if compile in ("model", "split") else prefill_model
        self.device = model.device
        dtype = model.dtype
        layers, heads, head_dim = kv_shape(cfg)
        vocab = model.get_output_embeddings().weight.shape[0]
        dev = self.device

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        self.keys = [zeros(rows, heads, length, head_dim, dtype=dtype) for _ in range(layers)]
        self.values = [zeros(rows, heads, length, head_dim, dtype=dtype) for _ in range(layers)]
        self.tokens, self.pos, self.start = zeros(rows, 1), zeros(rows, 1), zeros(rows)
        self.temperature, self.top_p = zeros(rows, dtype=torch.float32), zeros(rows, dtype=torch.float32)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=dev)
        self.seen = zeros(rows, vocab, dtype=torch.bool)
        self.out, self.col, self.write_at = zeros(rows, STEPS), zeros(1), zeros(1)
        self.first = zeros(rows)  # the first token of each reply prefilled in this launch
        # The new tokens come back through pinned memory, the wait on an event: it lets go of the
        # interpreter lock (Tensor.tolist() on a CUDA tensor would hold it while the GPU works). Two sets,
        # for the two launches in flight: the GPU runs the next steps while the host hands out the last ones.
        cuda = dev.type == "cuda"
        self.out_host = [torch.zeros(rows, STEPS + 1, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.pending: collections.deque[_Launch] = collections.deque()
        # launches kept queued ahead of the one being handed out: 1 where the device runs on while the host
        # works (CUDA); 0 on the CPU, where a launch is done when it returns and waiting would only delay tokens
        self.ahead = 1 if cuda else 0
        self.launches = 0
        self.starts: list[int] = []  # the host's copy of `start` for the live rows (no device reads to move rows)
        self.admitting: list[Request] = []  # taken from `waiting`, being prefilled
        self.key_index = torch.arange(length, device=dev)
        self.row_buckets = _buckets(rows, 1)
        self.len_buckets = _buckets(length, 128)
        self.t = 0  # the host's copy of write_at
        self.live: list[Request] = []  # live[i] owns row i
        self.waiting: list[Request] = []
        self.incoming: queue.Queue[Request] = queue.Queue()
        self.graphs: dict[tuple[int, int], object] = {}
        self.use_graphs = bool(cuda_graphs) and dev.type == "cuda"
        self.stopping = threading.Event()
        self.wake = threading.Event()
        if self.use_graphs:
            self._capture_all()
        if compile in ("model", "split"):
            self._warm_prefill()
        self.thread = threading.Thread(target=self._run, name="slot-engine", daemon=True)
        self.thread.start()

    @property
    def cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() for k in self.keys) * 2

    # -- the step --------------------------------------------------------------------------------

    def _step(self, b: int, length: int) -> None:
        """One decoding step for rows [:b] over positions [:length]; only device tensors, no host sync."""
        idx = self.key_index[:length][None, :]
        mask = ((idx >= self.start[:b, None]) & (idx <= self.write_at)) | (idx == self.write_at)
        window = _Window([k[:b, :, :length] for k in self.keys], [v[:b, :, :length] for v in self.values], self.write_at)
        logits = self.forward(
            input_ids=self.tokens[:b], position_ids=self.pos[:b], attention_mask=mask[:, None, None, :],
            past_key_values=window, use_cache=True,
        ).logits[:, -1]
        self._finish(logits, b)

    def _finish(self, logits, b: int) -> None:
        """The step after the forward pass: each row's next token sampled, recorded and fed back."""
        nxt = sample(logits, self.temperature[:b], self.top_p[:b], self.penalty[:b], self.seen[:b])
        self.out[:b].index_copy_(1, self.col, nxt[:, None])
        self.tokens[:b, 0] = nxt
        self.pos[:b] += 1
        self.seen[:b].scatter_(1, nxt[:, None], True)
        self.write_at += 1
        self.col += 1

    def _capture_all(self) -> None:
        """Capture the step for every (rows, positions) bucket once, before any request (it runs on garbage)."""
        import torch

        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            for length in self.len_buckets:
                for b in self.row_buckets:
                    with torch.cuda.stream(stream):  # warm up on a side stream, as CUDA graph capture requires
                        self.write_at.zero_()
                        self.col.zero_()
                        self._step(b, length)
                    torch.cuda.current_stream().wait_stream(stream)
                    self.write_at.zero_()
                    self.col.zero_()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._step(b, length)
                    self.graphs[(b, length)] = graph
            self.write_at.zero_()
            self.col.zero_()
            self.seen.zero_()
        torch.cuda.synchronize()

    def _warm_prefill(self) -> None:
        """Compile the prefill's forward pass before the first reply waits for it: one prompt and two (torch.compile
        specialises a batch of one; prompt lengths above one are one compile). Runs before any reply owns a row."""
        import torch

        with torch.inference_mode():
            for k, q in ((1, 24), (2, 40)):
                if k > self.rows:  # an engine of one row never prefills two prompts together
                    continue
                keys = self.len_buckets[0]
                ids = torch.full((k, q), self.pad_id, dtype=torch.long, device=self.device)
                positions = torch.arange(q, device=self.device).expand(k, q).contiguous()
                query_at = torch.arange(q, device=self.device)
                mask = self.key_index[None, :keys] <= query_at[:, None]
                window = _Window([x[:k, :, :keys] for x in self.keys], [x[:k, :, :keys] for x in self.values], query_at)
                with self._prefill_attention():
                    self.prefill(input_ids=ids, position_ids=positions, attention_mask=mask[None, None].expand(k, 1, q, keys).contiguous(),
                                         past_key_values=window, use_cache=True, logits_to_keep=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if self.stopping.is_set() or not self.thread.is_alive():
            raise EngineStopped("the generation engine is not running")
        if len(request.ids) + MARGIN > self.length:
            raise ValueError(f"a prompt of {len(request.ids)} tokens does not fit the engine's {self.length}-token rows")
        request.max_new_tokens = max(1, min(request.max_new_tokens, self.length - MARGIN - len(request.ids)))
        self.incoming.put(request)
        self.wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self.wake.set()

    def stop(self, timeout: float = 10) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self.stopping.is_set():
                try:
                    self._iteration()
                except Exception as exc:  # every reply in flight fails with it; the engine goes on
                    logger.exception("generation step failed")
                    for request in self.live + self.waiting + self.admitting:
                        if not request.finished:
                            request.out.put(RuntimeError(f"generation failed: {exc}"))
                    self.live, self.waiting, self.starts, self.admitting = [], [], [], []
                    self.pending.clear()
        for request in self.live + self.waiting + _drain(self.incoming):
            if not request.finished:
                request.out.put(EngineStopped("the generation engine stopped"))

    def _iteration(self) -> None:
        """Admit, launch the next steps, then hand out the tokens of the launch before (still one in flight).

        The GPU works through launch k+1 while the host delivers launch k's tokens and does its
        bookkeeping, so the host's time (and its waits for the interpreter lock) does not idle the GPU.
        A launch's tokens are read through the rows as they were when it was launched (`_Launch.owners`);
        a reply that ended meanwhile ignores what was written for it since.
        """
        if not self.live and not self.waiting and not self.pending:
            self.wake.wait(0.5)
        self.wake.clear()
        self.waiting.extend(_drain(self.incoming))
        self.waiting = [r for r in self.waiting if not r.cancelled]
        self._release([i for i, r in enumerate(self.live) if r.cancelled])
        new = 0
        if self.waiting and len(self.live) < self.rows:
            new = self._admit()
        launched = self._launch(new) if self.live else False
        # one launch stays queued ahead while more were queued; once every live reply has all the steps it needs
        # queued, they are all handed out (no launch is queued only to be thrown away, nor waited for)
        while len(self.pending) > (self.ahead if launched else 0):
            self._harvest(self.pending.popleft())

    def _launch(self, new: int) -> bool:
        """Queue decoding steps for the live rows and the copy of their tokens to the host; False when none was
        needed: every live reply already has the steps it needs to reach its limit queued (a new reply's first
        token still goes out, in a launch of no steps if need be).

        4 steps (8 above FEW_ROWS rows), fewer when no live reply needs that many more: a reply's last launch
        is as long as it needs, and none is queued ahead only to be thrown away. None in a launch that brings new
        replies in at few rows (below)."""
        n = len(self.live)
        need = max(r.max_new_tokens - r.queued for r in self.live)
        # Up to FEW_ROWS rows, the launch that brings new replies in has no steps: their first tokens (sampled from
        # the prefill) go out as soon as the prefill is done, not 4 steps later, and the steps follow in the next
        # launch, queued at once. Above, admissions come often and each would cost a launch of its own.
        steps = 0 if new and n <= FEW_ROWS else min(STEPS if n > FEW_ROWS else STEPS // 2, max(need, 0))
        if steps == 0 and not new:
            return False
        if self.t + STEPS > self.length:
            self._shift(min(self.starts))
        b = next(size for size in self.row_buckets if size >= n)
        length = next(size for size in self.len_buckets if size >= self.t + STEPS)
        self.col.zero_()
        graph = self.graphs.get((b, length))
        for _ in range(steps):
            graph.replay() if graph is not None else self._step(b, length)
        self.t += steps
        slot = self.launches % 2
        self.launches += 1
        host = self.out_host[slot]
        host[:n, 0].copy_(self.first[:n], non_blocking=True)
        host[:n, 1:].copy_(self.out[:n], non_blocking=True)
        if self.ready[slot] is not None:
            self.ready[slot].record()
        self.pending.append(_Launch(slot=slot, owners=list(self.live), steps=steps, new=range(n - new, n)))
        for request in self.live:
            request.queued += steps
        for request in self.live[n - new:]:
            _mark(request, "first launch queued")
        return True

    def _harvest(self, launch: _Launch) -> None:
        """Wait for a launch's tokens (without the interpreter lock) and hand them to their replies."""
        if all(request.finished for request in launch.owners):
            return  # its replies ended (or were cancelled) since: nothing to wait for
        ready = self.ready[launch.slot]
        if ready is not None:
            ready.synchronize()
        n = len(launch.owners)
        for i in launch.new:
            _mark(launch.owners[i], "first tokens ready")
        rows = self.out_host[launch.slot][:n].tolist()
        ended = set()
        for i, (request, tokens) in enumerate(zip(launch.owners, rows)):
            if request.finished:
                continue
            tokens = tokens[0 : launch.steps + 1] if i in launch.new else tokens[1 : launch.steps + 1]
            if not self._deliver(request, tokens):
                request.finished = True
                ended.add(id(request))
        if ended:
            self._release([i for i, r in enumerate(self.live) if id(r) in ended])

    def _deliver(self, request: Request, tokens: list[int]) -> bool:
        """Hand a request its new tokens; False when it has ended (end of sequence, its limit, or cancelled)."""
        if request.cancelled:
            return False
        new, ended = [], False
        for token in tokens:
            if token in request.eos:  # counted, as `generate` counts it, but not shown
                request.generated += 1
                ended = True
                break
            new.append(token)
            request.generated += 1
            if request.generated >= request.max_new_tokens:
                ended = True
                break
        if new:
            request.out.put(new)
        if ended:
            request.out.put(None)
        return not ended

    def _release(self, rows: list[int]) -> None:
        """Free these rows; the last live rows move into the gaps so the live rows stay the first n."""
        for i in sorted(rows, reverse=True):
            self.live[i].finished = True
            last = len(self.live) - 1
            if i != last:
                self._move(last, i)
                self.live[i] = self.live[last]
                self.starts[i] = self.starts[last]
            self.live.pop()
            self.starts.pop()

    def _move(self, src: int, dst: int) -> None:
        lo = self.starts[src]
        for k in self.keys + self.values:
            k[dst, :, lo : self.t] = k[src, :, lo : self.t]
        for buf in (self.tokens, self.pos, self.start, self.temperature, self.top_p, self.penalty, self.seen):
            buf[dst] = buf[src]

    def _shift(self, d: int) -> None:
        """Move the live rows' positions [lo, t) to [lo - d, t - d) (d < 0 moves them later)."""
        n = len(self.live)
        if d == 0:
            return
        lo = min(self.starts, default=self.t) if n else self.t
        if n and lo < self.t:
            for k in self.keys + self.values:
                k[:n, :, lo - d : self.t - d] = k[:n, :, lo : self.t].clone()
        self.start[:n] -= d
        self.starts = [s - d for s in self.starts]
        self.t -= d
        self.write_at.fill_(self.t)

    def _prefill_attention(self):
        """Prefills attend without cuDNN's kernel on CUDA: cuDNN plans every new shape (prompt length, batch,
        keys), 60-80 ms of host time each on an H200, and prefills rarely repeat a shape; that plan was most
        of a reply's time to first token. The captured steps keep it (planned once, at capture)."""
        import contextlib

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _to_device(self, data, dtype):
        """A host list on the device without waiting for the GPU (pinned memory, asynchronous copy)."""
        import torch

        host = torch.tensor(data, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _admit(self) -> int:
        """Prefill waiting prompts into free rows (queued on the GPU, no wait); returns how many joined."""
        import torch

        room = self.rows - len(self.live)
        batch: list[Request] = []
        longest = 0
        for request in self.waiting[:room]:
            longest_if = max(longest, len(request.ids))
            if batch and longest_if * (len(batch) + 1) > PREFILL_TOKENS:
                break
            batch.append(request)
            longest = longest_if
        self.waiting = self.waiting[len(batch):]
        self.admitting = batch  # until they are live: a failure here must still reach them
        # Shapes from a small set (prompt length a multiple of 16, key length a bucket): attention kernels
        # that plan per shape (cuDNN's) are planned once per shape, not for every new position t.
        longest = min(-(-longest // 16) * 16, self.length - STEPS)
        # The new prompts end at t: make room before t, and move a window that has drifted far back to the start.
        span = self.t - min(self.starts) if self.starts else 0
        target = max(span, longest)
        if self.t < longest or self.t - target >= MIN_SHIFT or self.t + STEPS > self.length:
            self._shift(self.t - target)
        n, k, t, dev = len(self.live), len(batch), self.t, self.device
        lengths = self._to_device([len(r.ids) for r in batch], torch.long)
        ids = self._to_device([[self.pad_id] * (longest - len(r.ids)) + r.ids for r in batch], torch.long)
        positions = (torch.arange(longest, device=dev)[None, :] - (longest - lengths)[:, None]).clamp_min(0)
        query_at = t - longest + torch.arange(longest, device=dev)  # cache index of each prompt position
        keys = next(size for size in self.len_buckets if size >= t)
        key_at = self.key_index[:keys]  # positions from t on are masked for every prompt position
        mask = ((key_at[None, None, :] >= (t - lengths)[:, None, None]) & (key_at[None, None, :] <= query_at[None, :, None])) | (
            key_at[None, None, :] == query_at[None, :, None]
        )
        rows = slice(n, n + k)
        window = _Window([x[rows, :, :keys] for x in self.keys], [x[rows, :, :keys] for x in self.values], query_at)
        for request in batch:
            _mark(request, "admit")
        with self._prefill_attention():
            logits = self.prefill(input_ids=ids, position_ids=positions, attention_mask=mask[:, None], past_key_values=window,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
        settings = self._to_device([[r.temperature, r.top_p, r.repetition_penalty] for r in batch], torch.float32)
        self.temperature[rows], self.top_p[rows], self.penalty[rows] = settings[:, 0], settings[:, 1], settings[:, 2]
        self.seen[rows] = False
        seen_rows = self._to_device([n + j for j, r in enumerate(batch) for _ in r.ids], torch.long)
        seen_ids = self._to_device([i for r in batch for i in r.ids], torch.long)
        self.seen.index_put_((seen_rows, seen_ids), torch.ones((), dtype=torch.bool, device=dev))
        first = sample(logits, self.temperature[rows], self.top_p[rows], self.penalty[rows], self.seen[rows])
        self.first[rows] = first
        self.tokens[rows, 0] = first
        self.pos[rows, 0] = lengths
        self.start[rows] = t - lengths
        self.seen[rows].scatter_(1, first[:, None], True)
        for request in batch:
            request.queued = 1  # the first token, sampled from the prefill
            _mark(request, "prefill queued")
        self.live.extend(batch)
        self.starts.extend(t - len(r.ids) for r in batch)
        self.admitting = []
        return k


@dataclass
class _Launch:
    slot: int  # which host buffer and event
    owners: list[Request]  # the request of each row when it was launched
    steps: int
    new: range  # rows prefilled in this launch: their first token comes with it


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
