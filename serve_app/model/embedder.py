"""A loaded model that turns texts into vectors (`TextEmbedder`): loading, tokenising,
pooling, the forward passes and their fast paths.

The Ray replica, the batch job and the tests all embed through it; nothing else
re-implements pooling, padding or truncation. The device and precision come from
`hardware`, the tokenizer from `tokenizer`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import AutoModel

from serve_app.core.encoded import Encoded, Item, Runtime, TokenIds
from serve_app.core.errors import ModelOutputError
from serve_app.core.hubfiles import model_directory
from serve_app.core.modelinfo import ModelSpec
from serve_app.model.gpushare import hold_to_gpu_share, settle_gpu_share
from serve_app.model.hardware import (
    choose_dtype,
    default_batch_tokens,
    dtype_name,
    pick_device,
    tokenize_on_the_calling_thread,
)
from serve_app.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class TextEmbedder:
    """A loaded model that turns texts into vectors."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        max_input_tokens: int = 8192,
        device: str = "auto",
        dtype: str = "auto",
        gpu_fraction: float | None = None,
        cpu_threads: int | None = None,
        max_batch_tokens: int | None = None,
        pack_cpu_weights: bool = True,
        share_rows: bool = True,
    ) -> None:
        self.spec = spec
        self._pack_cpu_weights = pack_cpu_weights
        self._share_rows = share_rows
        self.weights_packed = False
        self.elementwise_fused = False  # model.fusing: norms and MLP activations
        self.rows_shared = False  # several short texts per row of a pass (model.rows)
        self.device = pick_device(device, gpu_fraction)
        # Ray does not police GPU memory: a process holds itself to the share it asked for
        # (model.gpushare), at once, and to the share less its context after a first pass.
        self._gpu_fraction = gpu_fraction if self.device.type == "cuda" and gpu_fraction else None
        self.gpu_share: dict | None = None
        if self._gpu_fraction:
            hold_to_gpu_share(self._gpu_fraction, self.device)
        if self.device.type == "cpu":
            tokenize_on_the_calling_thread()
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
        self.dtype, dtype_reason = choose_dtype(dtype, self.device)
        self.max_tokens = min(max_input_tokens, spec.max_tokens)
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(self.device)

        started = time.perf_counter()
        directory = model_directory(spec)  # a hub model: this machine's cache, fetched once
        # The tokenizer loads on a second thread while the weights load on this one.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, directory, spec.padding_side)
            self.model = AutoModel.from_pretrained(directory, dtype=self.dtype)
            self.model = self.model.to(self.device).eval()
            self.tokenizer = tokenizer.result()
        self.load_s = time.perf_counter() - started
        # No KV cache for decoder models (Qwen3): nothing is generated, and filling one
        # costs 10-15% of a short text's pass and memory besides.
        self._forward_options = {"use_cache": False} if hasattr(self.model.config, "use_cache") else {}
        # A fast tokenizer is not safe to call from two threads at once ("Already
        # borrowed"); forward passes are, so only tokenising is serialised.
        self._tokenizer_lock = threading.Lock()
        self._thread_state = threading.local()
        if self.device.type == "cpu":
            for block in _blocks(self.model):
                block.register_forward_pre_hook(self._before_block)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self._specials = self._special_tokens_around_a_text()
        self._eos_id = self._eos_to_append()
        self.runtime = Runtime(str(self.device), dtype_name(self.dtype), dtype_reason)
        logger.info(
            "Loaded %s from %s on %s in %s (%s) in %.2f s, %d dims, pooling=%s, max %d tokens, "
            "%d tokens per pass",
            spec.name, directory, self.device, dtype_name(self.dtype), dtype_reason, self.load_s,
            spec.dimensions, spec.pooling, self.max_tokens, self.max_batch_tokens,
        )

    @classmethod
    def from_settings(cls, spec: ModelSpec, settings, gpu_fraction: float, cpu_threads: int):
        """The embedder an `AppArgs` describes: the service's replicas and the batch job's actors."""
        return cls(
            spec,
            max_input_tokens=settings.max_input_tokens,
            device=settings.device,
            dtype=settings.dtype,
            gpu_fraction=gpu_fraction,
            cpu_threads=cpu_threads,
            max_batch_tokens=settings.max_batch_tokens,
            pack_cpu_weights=settings.pack_cpu_weights,
            share_rows=settings.share_rows,
        )

    def settle_gpu_share(self) -> str | None:
        """Hold the whole process, CUDA context included, to its share of the GPU
        (model.gpushare), after a one-text pass that loads the kernels the share must count;
        a sentence saying how, or None off a shared GPU."""
        if not self._gpu_fraction:
            return None
        with contextlib.suppress(ModelOutputError):  # float16 overflowing: its requests say so
            self.encode(["warm up"])
        share = settle_gpu_share(self._gpu_fraction, self.device)
        self.gpu_share = share.as_dict()
        return share.sentence

    def speed_up(self, threads: int | None = None) -> list[str]:
        """Turn on the CPU fast paths that check out here (packed weights, shared rows);
        a sentence on each. Safe while other threads run passes; called once the
        replica is ready, since each takes a moment. `threads`: torch threads for the
        work on this thread (a replica's speed-up thread takes 1: see the scheduler)."""
        if threads is not None and self.device.type == "cpu":
            self._use_threads(threads)
        return [self.pack_weights(), self.fuse_elementwise(), self.share_rows()]

    def share_rows(self) -> str:
        """Run short texts several to a row (`model.rows`) if, on a few texts, that gives
        what padding each gives; one sentence saying what happened."""
        from serve_app.core.vectors import cosine_pairwise

        if not self._share_rows:
            return "Rows not shared: share_rows is off"
        if self.device.type != "cpu":
            return "Rows not shared: not on a CPU (GPU passes keep padding; not measured there)"
        if self.rows_shared:
            return "Short texts already share rows of a pass"
        from serve_app.model.rows import ATTENTION, register_attention

        attention = getattr(self.model.config, "_attn_implementation", None)
        if attention != "sdpa":
            return f"Rows not shared: the model runs {attention} attention (shared rows need sdpa)"
        ids, _ = self.tokenize(_ROW_CHECK_TEXTS)
        try:
            # From here every pass, padded ones too, runs through the rows' attention
            # function, which is sdpa's own for a pass given no layout: safe while other
            # passes run.
            register_attention()
            self.model.config._attn_implementation = ATTENTION
            want = self._forward(ids)
            got = self._forward_rows([ids])  # all of them in one row, in order
        except Exception as exc:  # a model (or transformers) whose attention the rows do not fit
            why_not = f"they failed on this model ({type(exc).__name__}: {exc})"
        else:
            cosines = cosine_pairwise(want, got)
            if not (np.isfinite(want).all() and np.isfinite(got).all()):
                why_not = f"the model gives inf or NaN in {dtype_name(self.dtype)} (its requests say so)"
            elif not np.all(cosines >= 0.999):
                why_not = f"they changed an embedding (cosine {cosines.min():.4f} to padding's)"
            else:
                why_not = None
        if why_not:
            self.model.config._attn_implementation = attention
            return f"Rows not shared: {why_not}"
        self.rows_shared = True
        return f"Short texts share rows of a pass (cosine to padding at least {cosines.min():.5f})"

    def pack_weights(self) -> str:
        """Lay out the linear layers' weights for this CPU once (`model.packing`), unless
        the settings or the hardware say otherwise; one sentence saying what happened.

        Safe while other threads run passes: a layer is swapped whole, and the model is
        checked against its own plain answer after the first block.
        """
        from serve_app.core.vectors import cosine
        from serve_app.model.packing import can_pack, pack_linears

        if not self._pack_cpu_weights:
            return "Linear weights not packed: pack_cpu_weights is off"
        if self.weights_packed:
            return "Linear weights already packed"
        if (why_not := can_pack(self.model, self.device, self.dtype)) is not None:
            return f"Linear weights not packed: {why_not}"
        probe = ["A sentence of ordinary length, to check the packed layers against the plain ones."]
        try:
            want = self.encode(probe).vectors[0]
        except ModelOutputError:
            return f"Linear weights not packed: the model gives inf or NaN in {dtype_name(self.dtype)}"

        def same_answer() -> bool:
            return cosine(self.encode(probe).vectors[0], want) >= 0.9999

        layers, seconds = pack_linears(self.model, _blocks(self.model), same_answer)
        self.weights_packed = layers > 0
        if not self.weights_packed:
            return "Linear weights not packed: the packed layers failed their check (see the warning)"
        return f"Packed {layers} linear layers' weights for oneDNN in {seconds:.2f} s"

    def fuse_elementwise(self) -> str:
        """Less elementwise work around the packed linears (`model.fusing`), if the model
        then gives what it gave on a few texts; one sentence saying what happened."""
        from serve_app.core.vectors import cosine_pairwise
        from serve_app.model.fusing import fuse_elementwise

        if not self.weights_packed:
            return "Elementwise work not fused: it needs the packed linear weights"
        if self.elementwise_fused:
            return "Elementwise work already fused"
        ids, _ = self.tokenize(_ROW_CHECK_TEXTS)
        want = self._forward(ids)
        lowest = []

        def same_answer() -> bool:
            lowest.append(float(cosine_pairwise(want, self._forward(ids)).min()))
            return lowest[-1] >= 0.999  # the bound bfloat16 is held to against float32

        norms, mlps = fuse_elementwise(self.model, self.dtype, same_answer)
        if not lowest:
            return "Elementwise work not fused: the model has no RMSNorm or gated SiLU MLP that fits"
        if not norms + mlps:
            return f"Elementwise work not fused: it changed the embeddings (cosine {lowest[0]:.4f} to unfused)"
        self.elementwise_fused = True
        return (f"Fused {norms} RMSNorms and {mlps} MLP activations (cosine to unfused at least "
                f"{lowest[0]:.5f})")

    def encode(
        self,
        texts: list[Item],
        threads: Callable[[], int] | None = None,
        between: Callable[[], None] | None = None,
    ) -> Encoded:
        """Embed `texts` (prompts already applied; or `TokenIds`), longest first in
        token-budget batches.

        `threads`, if given, says how many CPU threads to use: before each forward pass and
        again before each transformer block, so that a pass running when another worker
        starts or ends moves to its new share within one block instead of holding more
        threads than there are cores (or fewer) until it ends: a large model's pass takes
        seconds.

        `between`, if given, is called between two forward passes of the call and, on a
        CPU, before each transformer block of a pass that is not short (a quarter of the
        token budget or more); it may call `encode` itself on this thread. The scheduler
        runs a cell's text there, so that the cell waits for one block of a column's pass,
        tens of milliseconds, not for the rest of the pass, up to a second for a 0.6B model
        on one core; a short pass (a few cells' texts) ends about as soon as the cell's
        own would. A call made from `between` gets no `between` of its own unless it
        passes one.
        """
        state = self._thread_state
        outer = getattr(state, "source", None), getattr(state, "between", None)
        if self.device.type == "cpu":
            state.source, state.between = threads, None  # _encode sets it for each pass
        try:
            return self._encode(texts, threads, between)
        finally:
            state.source, state.between = outer

    def _before_block(self, _module, _args) -> None:
        """Before each transformer block on a CPU: the call's `between`, then its thread
        share, which `between` or another worker may have changed."""
        state = self._thread_state
        if (between := getattr(state, "between", None)) is not None:
            between()
        if (source := getattr(state, "source", None)) is not None:
            self._use_threads(source())

    def _encode(
        self, texts: list[Item], threads: Callable[[], int] | None, between: Callable[[], None] | None
    ) -> Encoded:
        ids, truncated = self.tokenize(texts)
        vectors = np.empty((len(texts), self.spec.dimensions), dtype=np.float32)
        from serve_app.model.rows import padded_passes, plan_passes

        plan = plan_passes if self.rows_shared else padded_passes
        for n, rows in enumerate(plan([len(x) for x in ids], self.max_batch_tokens)):
            if n and between is not None:
                between()
            flat = [i for row in rows for i in row]
            if self.device.type == "cpu":
                long_pass = sum(len(ids[i]) for i in flat) * 4 >= self.max_batch_tokens
                self._thread_state.between = between if long_pass else None
                if threads is not None:
                    self._use_threads(threads())
            if len(flat) == len(rows):  # a text per row: padding's mask is the cheaper one
                vectors[flat] = self._forward([ids[i] for i in flat])
            else:
                vectors[flat] = self._forward_rows([[ids[i] for i in row] for row in rows])
        # float16 overflows on some texts for some models (Qwen's among them); a NaN vector
        # would reach the client as nulls, a cache, or a job's output, and poison every
        # similarity computed from it.
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise ModelOutputError.not_finite(bad, dtype_name(self.dtype), str(self.device))
        return Encoded(
            vectors=vectors, tokens=[len(x) for x in ids], truncated=truncated, runtime=self.runtime
        )

    def _use_threads(self, wanted: int) -> None:
        # OpenMP thread counts are per calling thread, and a new thread starts from
        # OMP_NUM_THREADS, which Ray sets to 1; torch.get_num_threads() does not see
        # that. Setting the count costs ~2 ms on the next pass, so only on a change.
        if getattr(self._thread_state, "threads", None) != wanted:
            torch.set_num_threads(wanted)
            self._thread_state.threads = wanted

    def tokenize(self, texts: list[Item]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (or per `TokenIds`), cut to the limit, and whether each was cut."""
        limit = self.max_tokens - (1 if self._eos_id is not None else 0)
        ids: list[list[int]] = [[] for _ in texts]
        cut = [False] * len(texts)
        strings = [i for i, text in enumerate(texts) if isinstance(text, str)]
        if strings:
            # One token over the limit tells a text that fits from one that was cut.
            rows = self._encode_ids([texts[i] for i in strings], limit + 1)
            over = [i for i, row in zip(strings, rows, strict=True) if len(row) > limit]
            for i, row in zip(strings, rows, strict=True):
                ids[i] = row
            if over:
                for i, row in zip(over, self._encode_ids([texts[i] for i in over], limit), strict=True):
                    ids[i], cut[i] = row, True
        for i, text in enumerate(texts):
            if isinstance(text, TokenIds):
                ids[i], cut[i] = self._wrap_ids(list(text.ids), limit)
        if self._eos_id is not None:
            eos = self._eos_id
            ids = [row if row and row[-1] == eos else row + [eos] for row in ids]
        return ids, cut

    def _wrap_ids(self, core: list[int], limit: int) -> tuple[list[int], bool]:
        """Token ids as the tokenizer would give them for their text: its special tokens
        around them (unless the client sent them), cut to the same limit as a text."""
        head, tail = self._specials
        if head and core[: len(head)] == head:
            core = core[len(head):]
        if tail and core[-len(tail):] == tail:
            core = core[: -len(tail)]
        room = max(0, limit - len(head) - len(tail))
        return head + core[:room] + tail, len(core) > room

    def _encode_ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        with self._tokenizer_lock:
            return self.tokenizer(
                texts, truncation=True, max_length=max_length, padding=False,
                return_attention_mask=False, return_token_type_ids=False,
            )["input_ids"]

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.spec.padding_side == "left"
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(
            input_ids=input_ids, attention_mask=mask, **self._forward_options
        ).last_hidden_state
        pooled = pool(hidden.float(), mask, self.spec.pooling)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()

    @torch.inference_mode()
    def _forward_rows(self, rows: list[list[list[int]]]) -> np.ndarray:
        """Vectors for texts laid end to end in rows (`model.rows`), in order of appearance."""
        from serve_app.model.rows import FLAT_MULTIPLE, layout_rows

        # Decoder models (last-token pooling) attend causally, encoders both ways; the
        # check in share_rows() catches a model for which that guess is wrong.
        layout = layout_rows(rows, causal=self.spec.pooling == "lasttoken", pad_id=self.pad_id,
                             multiple=FLAT_MULTIPLE)
        input_ids = layout.input_ids.to(self.device)
        hidden = self.model(
            input_ids=input_ids,
            # Every flat token is a text's (or the padding row's, which attends to itself):
            # a mask of ones lets transformers build none (without one it would build a
            # block mask from the positions, which the rows' attention does not read).
            attention_mask=torch.ones_like(input_ids),
            position_ids=layout.positions.to(self.device), shared_rows=layout, **self._forward_options,
        ).last_hidden_state[0]
        # Each text pooled by the same rule as a padded row, over its own tokens only.
        index, masks = layout.text_slots()
        pooled = pool(hidden[index.to(self.device)].float(), masks.to(self.device), self.spec.pooling)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()

    def _special_tokens_around_a_text(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own ([CLS] and [SEP], or
        Qwen3-Embedding's <|endoftext|>), learnt from one word."""
        marked = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        for start in range(len(marked) - len(plain) + 1):
            if marked[start : start + len(plain)] == plain:
                return marked[:start], marked[start + len(plain):]
        return [], []

    def _eos_to_append(self) -> int | None:
        """The token a last-token model must end on, if its tokenizer does not add one.

        Qwen3-Embedding's tokenizer appends <|endoftext|> itself, while its
        `eos_token` is <|im_end|>: appending the tokenizer's EOS again would pool
        the wrong token. Without such a template the model's own `eos_token_id`
        (<|endoftext|> for Qwen3-Embedding, as its model card appends) is added.
        """
        if self.spec.pooling != "lasttoken":
            return None
        if self._specials[1]:
            return None  # the tokenizer ends every input with a token of its own
        eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos if isinstance(eos, int) else self.tokenizer.eos_token_id


# Texts of different lengths and scripts, for checking shared rows against padding.
_ROW_CHECK_TEXTS = [
    "The contract may be terminated by either party with thirty days' written notice.",
    "合同任何一方可提前三十天书面通知终止本合同。",
    "Reset password",
    "How do I export last quarter's invoices to a spreadsheet?",
]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states (batch, seq, dim) into one vector per row."""
    keep = mask.unsqueeze(-1).bool()
    if mode == "mean":
        summed = torch.where(keep, hidden, 0.0).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
    if mode == "max":
        return torch.where(keep, hidden, float("-inf")).max(dim=1).values
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if mode == "cls":
        index = torch.where(mask.bool(), positions, mask.shape[1]).min(dim=1).values
    elif mode == "lasttoken":
        index = torch.where(mask.bool(), positions, -1).max(dim=1).values
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A transformer's repeated blocks: its largest ModuleList (Qwen3's `layers`, BERT's
    `encoder.layer`); none for a model without one."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    return list(max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters())))


