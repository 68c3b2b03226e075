"""`Sampler`: the one sampling engine behind evaluation, rollouts, option expansion and synthesis.

Host side: tokenise, plan which tokens each request must prefill (only what its cached ancestor lacks),
bucket shapes so compiles are reused, then one batched prefill, a device-side fork of shared prefixes
into their samples, and one batched decode loop. Results carry the text, token ids, untempered
log-probabilities and the finish reason; each result may keep its KV state for further continuation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphallm_jax.models import sharding as shd
from alphallm_jax.models.kv_cache import KVCache
from alphallm_jax.sampling import engine
from alphallm_jax.sampling.kv_pool import KVPool, SeqState
from alphallm_jax.sampling.stop_rules import StopTables, ending_stop
from alphallm_jax.sampling.token_sampling import sampling_mode
from alphallm_jax.sampling.token_texts import plain_anchor, token_bytes, token_texts
from alphallm_jax.utils.distributed import check_lockstep, fetch, spans_processes
from alphallm_jax.utils.shapes import MIN_ROWS, bucket_length, pow2_at_least, round_up, row_bucket

_TEXT_CONTEXT_TOKENS = 8  # tokens of left context used to decode a completion's text exactly
STOP_CONTEXT_BYTES = 256  # of a request's `stop_context`: more than any stop string's length


@dataclasses.dataclass
class Completion:
    """One sampled continuation. `text` includes the stop string that ended it (options end with their
    newline); `token_ids`/`logprobs` include a final EOS token when one was sampled.

    Stops are checked token by token, so `text` and `token_ids` run to the end of the token that
    completed the stop string: the text may continue a little past it (stop "an" sampled as the token
    " and" ends the text with " and"). `stop_rules.ending_stop` / `str.index` find where the stop ends.
    `logprobs` are untempered and untruncated; for a model whose embedding is padded past the
    tokenizer's vocabulary, over the ids the tokenizer has (the others are never sampled).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "eos" | "length"
    stop_string: str | None = None  # the stop string that ended it: the first to end (the longer on a tie)
    state: SeqState | None = None  # continue sampling from here (None unless kept)

    @property
    def sum_logprob(self) -> float:
        return float(np.sum(self.logprobs))


@dataclasses.dataclass
class SampleRequest:
    """Continue `state` (after appending `extra_tokens`) by at most `max_new_tokens`.

    `stop`: stop strings; a single str is one stop string, not one per character. `top_k`: 0 (or
    negative) for none; a k past the vocabulary keeps it all. `seed`: the row's 32-bit PRNG seed, any
    int taken modulo 2**32.
    """

    state: SeqState
    max_new_tokens: int
    extra_tokens: tuple[int, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    # Text the sample continues, in which the stop strings `context_stops` (some of `stop`) may begin: a
    # step's closing newline, whose blank line "\n\n" the sample's first "\n" completes. The other stops,
    # and all of them without a context, are matched within the sample only.
    stop_context: str = ""
    context_stops: tuple[str, ...] = ()

    def __post_init__(self):
        self.stop = stop_strings(self.stop)
        self.context_stops = stop_strings(self.context_stops)


@dataclasses.dataclass
class SamplerStats:
    prefilled_tokens: int = 0  # tokens written to the cache by prefill (padding excluded)
    decoded_tokens: int = 0  # tokens sampled
    cache_hits: int = 0  # requests whose own state was cached
    rebuilds: int = 0  # requests whose state had been evicted and was rebuilt from an ancestor
    evictions: int = 0
    device_calls: int = 0  # prefill + decode launches
    compactions: int = 0  # decode loops continued in a smaller batch once most rows had stopped
    batches: int = 0  # prefill-and-decode rounds (`sample` splits its requests into max_batch rounds)
    batch_rows: int = 0  # requests over those rounds (padding rows excluded)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


CACHE_LEN_GRANULE = 32


# Width of the generated-token buffers of a decode call: one scatter per step writes them whatever their
# width, so every request of up to 256 new tokens shares one width, and one decode program per row and
# cache bucket serves options, rollouts and whole solutions alike (instead of one per length bucket).
MIN_NEW_SLOTS = 256


# Slots per KV cache chunk on CPU: a decode step's attention reads only the chunks some row has reached
# (`decoder.attend_chunks`). On accelerators the cache stays one chunk: a `lax.cond` per chunk and
# layer is untested there, and their attention is not the share of a step it is on CPU.
CPU_KV_CHUNK_SLOTS = 64


def default_kv_chunk_slots() -> int | None:
    return CPU_KV_CHUNK_SLOTS if jax.default_backend() == "cpu" else None


def cache_len_for(max_len: int, chunk_slots: int | None = None) -> int:
    """KV cache slots for sequences of up to `max_len` tokens.

    An unchunked cache is read whole by every decode step, so it is only rounded up to a multiple of 32.
    A chunked one (`chunk_slots`, CPU) costs no compute for the chunks no row has reached
    (`decoder.attend_chunks` skips them), so its length goes to a geometric bucket of whole chunks
    (`bucket_length`: 1, 2, 3, 4, 6, 8, 12, ... chunks): the samplers of a run, each sized for its own
    stage (evaluation, rollouts, search, synthesis), then share their compiled prefill, decode and
    row programs (the quick demo's three cache lengths became two, and one with its `sampling.max_len`)."""
    if chunk_slots:
        return bucket_length(max_len, chunk_slots)
    return round_up(max_len, CACHE_LEN_GRANULE)


class Sampler:
    """Batched, jitted sampling with KV forking for tree search.

    Args:
      model: an NNX `Decoder`; tokenizer: the project's `Tokenizer` (None: token ids in and out,
        `Completion.text` empty, no stop strings).
      max_len: longest sequence (prompt plus everything generated) a kept state may reach.
      pool_slots: cached states kept on device for continuation (least recently used evicted).
      max_batch: rows per device call; larger request lists are split.
      mesh: optional mesh; batch rows are sharded over (data, fsdp), heads over tensor.
      eos_ids: end-of-sequence ids (default: the tokenizer's and the model config's).
      min_rows: fewest rows of a device call (`utils.shapes.MIN_ROWS` by default: fewer compiles). A
        call of one row padded to 8 costs 8x the prefill compute of a large model on CPU; latency-bound
        use of such a model passes 1.
      kv_chunk_slots: slots per KV cache chunk (`KVCache`); attention skips the chunks no row has
        reached. 0: `default_kv_chunk_slots()`; negative: one chunk.
      fine_row_buckets: row buckets in steps of 1.5x, not 2x (`utils.shapes.row_bucket(fine=True)`): less
        padding, more compiled shapes.
    """

    def __init__(self, model, tokenizer, *, max_len: int = 1024, pool_slots: int = 64, max_batch: int = 256,
                 mesh: jax.sharding.Mesh | None = None, rules: shd.ShardingRules | None = None,
                 eos_ids: Sequence[int] | None = None, min_rows: int = MIN_ROWS,
                 kv_chunk_slots: int = 0, fine_row_buckets: bool = False):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.max_batch = max_batch
        self.mesh = mesh
        self.rules = rules or shd.ShardingRules()
        self.graphdef, self.params = nnx.split(model)
        if eos_ids is None:
            eos_ids = set(self.cfg.eos_token_ids) | set(tokenizer.eos_ids if tokenizer else ())
        self.eos_ids = jnp.asarray(sorted(eos_ids), jnp.int32)
        self._row_multiple = shd.batch_shards(mesh)
        # On a mesh spanning processes every process makes each call with the same requests (checked).
        self._lockstep = spans_processes(mesh)
        self._min_rows = min_rows
        self._fine_rows = fine_row_buckets
        self.kv_chunk_slots = (default_kv_chunk_slots() if kv_chunk_slots == 0
                               else None if kv_chunk_slots < 0 else kv_chunk_slots)
        self._pool_slots = pool_slots
        self._pool: KVPool | None = None
        self._stop_tables: dict[tuple[str, ...], StopTables] = {}
        self._token_texts: tuple[str, ...] | None = None
        self._token_bytes: tuple[bytes, ...] | None = None
        # Embedding rows past the tokenizer's vocabulary (a padded vocabulary) are never sampled; None
        # when there are none, so the decode programs are those of an unpadded model.
        known = tokenizer.vocab_size if tokenizer is not None else self.cfg.vocab_size
        self._vocab_limit = known if known < self.cfg.vocab_size else None
        self.stats = SamplerStats()

    # ----------------------------------------------------------------------------------- public API

    def new_state(self, prompt: str | Sequence[int], *, add_bos: bool = True) -> SeqState:
        """A root state for a prompt (text is tokenised); nothing runs until it is continued."""
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token ids or build the Sampler with one")
        tokens = self.tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("cannot sample from an empty prompt (no tokens and no BOS)")
        return SeqState(tokens=tuple(int(t) for t in tokens))

    def extend(self, state: SeqState, text_or_tokens: str | Sequence[int]) -> SeqState:
        """A child of `state` with text appended (tokenised as it continues other text, without the word-start
        marker a SentencePiece tokenizer gives text on its own); only the new tokens are prefilled when it is
        continued."""
        extra = (self.tokenizer.encode_continuation(text_or_tokens) if isinstance(text_or_tokens, str)
                 else text_or_tokens)
        return SeqState(tokens=state.tokens + tuple(int(t) for t in extra), parent=state)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
                 num_samples: int = 1, seed: int = 0, prompt_seeds: Sequence[int] | None = None,
                 keep_states: bool = False) -> list[list[Completion]]:
        """For each prompt, `num_samples` completions. Same seed, same output.

        `prompts` is a list of strings: a single str raises a TypeError (pass `[prompt]`), rather than
        being read as one prompt per character. `stop`: stop strings; a single str is one stop string.
        The prompt is prefilled once and forked on device into its samples. `seed` and `prompt_seeds`
        (one per prompt) are non-negative ints (ValueError otherwise); `prompt_seeds` replaces the
        prompt's position in the call, so a prompt's samples do not depend on which batch or process
        it was sampled in.
        """
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts; got a str: pass [prompt]")
        if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
            raise ValueError(f"{len(prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
        _check_seeds("seed", [seed])
        _check_seeds("prompt_seeds", prompt_seeds or [])
        roots = [self.new_state(p) for p in prompts]
        requests = [
            SampleRequest(state=root, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, stop=stop_strings(stop),
                          seed=_row_seed(seed, i if prompt_seeds is None else int(prompt_seeds[i]), j))
            for i, root in enumerate(roots) for j in range(num_samples)
        ]
        flat = self.sample(requests, keep_states=keep_states)
        return [flat[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

    def sample(self, requests: Sequence[SampleRequest], *, keep_states: bool = True) -> list[Completion]:
        """Continue many states at once; with `keep_states`, each completion's state stays cached."""
        for r in requests:  # all refused before any batch runs or any counter moves
            self._check_request(r)
        out: list[Completion] = []
        for start in range(0, len(requests), self.max_batch):
            out += self._sample_batch(list(requests[start:start + self.max_batch]), keep_states)
        return out

    def release(self, state: SeqState) -> None:
        if self._pool is not None:
            self._pool.release(state)

    def cut(self, context: Sequence[int], token_ids: Sequence[int], chars: int) -> tuple[list[int], str]:
        """The fewest leading tokens of a completion `token_ids` (sampled after `context`) whose text holds
        at least `chars` characters, and that text: where an option or a solution ends inside a sample
        (a final answer's line, an end stop). Estimated from the tokens' texts, then checked by decoding
        (a multi-byte character spans tokens)."""
        texts = self._texts()
        k, total = 0, 0
        while k < len(token_ids) and total < chars:
            total += len(texts[token_ids[k]]) if token_ids[k] < len(texts) else 0
            k += 1
        while k < len(token_ids) and len(self.decode_after(context, token_ids[:k])) < chars:
            k += 1
        ids = [int(t) for t in token_ids[:k]]
        return ids, self.decode_after(context, ids)

    def decode_after(self, context: Sequence[int], token_ids: Sequence[int]) -> str:
        """The text the tokens add after `context` (EOS excluded), decoded after the context's last few
        tokens so that word-boundary spaces come out as in the whole sequence. After a context with no
        text (an empty prompt: BOS alone) the tokens are decoded after a plain anchor token, so the first
        keeps its word-boundary space, as in the token texts the stop strings were matched against
        (decoding the whole sequence would drop it). Ids the tokenizer does not have are skipped."""
        if self.tokenizer is None:
            return ""
        eos = set(int(e) for e in np.asarray(self.eos_ids))
        body = [t for t in self._known_ids(token_ids) if t not in eos]
        bos = self.tokenizer.bos_id
        tail = [t for t in self._known_ids(context[-_TEXT_CONTEXT_TOKENS:]) if t != bos]
        prefix = self.tokenizer.decode(tail)
        if not prefix:
            tail = [plain_anchor(self.tokenizer)] + tail
            prefix = self.tokenizer.decode(tail)
        full = self.tokenizer.decode(tail + body)
        return full[len(prefix):] if full.startswith(prefix) else self.tokenizer.decode(body)

    # ------------------------------------------------------------------------------------ internals

    def _known_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` without those the tokenizer cannot decode (a safety net: they are never sampled)."""
        n = self.tokenizer.vocab_size
        return [t for t in map(int, ids) if 0 <= t < n]

    @property
    def pool(self) -> KVPool:
        if self._pool is None:
            self._pool = KVPool(self.cfg, self._pool_slots, cache_len_for(self.max_len, self.kv_chunk_slots),
                                cache_factory=self._new_cache)
        return self._pool

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.create(self.cfg, batch, max_len, chunk_slots=self.kv_chunk_slots, mesh=self.mesh,
                              rules=self.rules)

    def _rows(self, n: int) -> int:
        """Rows of a device call holding `n` requests (the shape bucket; see `utils.shapes.row_bucket`)."""
        return row_bucket(n, self._row_multiple, self._min_rows, self._fine_rows)

    def _put(self, x: np.ndarray) -> jax.Array:
        """Host batch array onto the device, rows sharded over (data, fsdp) when there is a mesh."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = shd.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.rules)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _stop_table(self, stops: tuple[str, ...]) -> StopTables:
        if stops not in self._stop_tables:
            if stops and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; this Sampler was built without one")
            self._stop_tables[stops] = StopTables(stops, self._bytes())
        return self._stop_tables[stops]

    def _texts(self) -> tuple[str, ...]:
        """Each token id's surface text (`token_texts`), built on first use."""
        if self._token_texts is None:
            self._token_texts = (token_texts(self.tokenizer, self.cfg.vocab_size) if self.tokenizer
                                 else ("",) * self.cfg.vocab_size)
        return self._token_texts

    def _bytes(self) -> tuple[bytes, ...]:
        """Each token id's UTF-8 bytes (`token_bytes`), which the stop automata read."""
        if self._token_bytes is None:
            self._token_bytes = (token_bytes(self.tokenizer, self.cfg.vocab_size) if self.tokenizer
                                 else (b"",) * self.cfg.vocab_size)
        return self._token_bytes

    def _check_request(self, r: SampleRequest) -> None:
        if r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        context = len(r.state.tokens) + len(r.extra_tokens)
        if context + r.max_new_tokens > self.max_len:
            raise ValueError(
                f"request needs {context + r.max_new_tokens} tokens ({context} context + {r.max_new_tokens} new) "
                f"but the sampler holds at most {self.max_len} (its max_len: a stage sets it from "
                f"sampling.max_len or search.max_len, or the longest prompt plus the stage's new tokens, "
                f"capped by the policy's and the critic's max_position_embeddings)")

    def _sample_batch(self, reqs: list[SampleRequest], keep_states: bool) -> list[Completion]:
        self.stats.batches += 1
        self.stats.batch_rows += len(reqs)
        # 1. What each request must prefill: the tokens its nearest cached ancestor lacks.
        plans = []
        rebuilt: dict[int, list[int]] = {}  # evicted state id -> its requests here (it is cached again)
        for b, r in enumerate(reqs):
            base = self._pool.nearest_cached(r.state) if self._pool is not None else None
            if base is not None and base is r.state:
                self.stats.cache_hits += 1
            elif r.state.was_cached:
                self.stats.rebuilds += 1
                rebuilt.setdefault(r.state.id, []).append(b)
            skip = len(base.tokens) - 1 if base is not None else 0
            chunk = r.state.tokens[skip:] + tuple(r.extra_tokens)
            plans.append((base, skip, chunk))

        # 2. One prefill per distinct (base, chunk): samples of one prompt share it.
        unique: dict[tuple, int] = {}
        source = [unique.setdefault((id(b), c), len(unique)) for b, _, c in plans]
        firsts = [plans[source.index(u)] for u in range(len(unique))]
        n_unique = self._rows(len(unique))
        seq = bucket_length(max(len(c) for _, _, c in firsts), 16)
        chunk_us = np.zeros((n_unique, seq), np.int32)
        pos_us = np.full((n_unique, seq), -1, np.int32)
        for u, (_, skip, chunk) in enumerate(firsts):
            chunk_us[u, :len(chunk)] = chunk
            pos_us[u, :len(chunk)] = np.arange(skip, skip + len(chunk))
        if self._lockstep:
            # The pool slots read too: pools whose host-side LRU drifted apart would gather other rows.
            check_lockstep("sampler", (chunk_us, pos_us, source, keep_states, [
                (r.seed, r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.stop, r.context_stops,
                 r.stop_context[-STOP_CONTEXT_BYTES:]) for r in reqs],
                [None if b is None else b.slot for b, _, _ in firsts]))
        if any(b is not None for b, _, _ in firsts):
            cache = self.pool.gather([b for b, _, _ in firsts] + [None] * (n_unique - len(firsts)))
        else:
            full = cache_len_for(self.max_len, self.kv_chunk_slots)
            # A whole-read cache whose rows go into no pool slot (no kept state, no rebuilt one) needs only
            # what this call needs.
            if not keep_states and not rebuilt and not self.kv_chunk_slots:
                need = max(s + len(c) for _, s, c in firsts) + max(r.max_new_tokens for r in reqs)
                full = min(full, bucket_length(need, 64))
            cache = self._new_cache(n_unique, full)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            blocks = engine.prefill_row_blocks(n_unique, seq, self._row_multiple)
            logits_uv, cache = engine.prefill(self.graphdef, self.params, cache, self._put(chunk_us), self._put(pos_us),
                                              blocks)
            self.stats.prefilled_tokens += sum(len(c) for _, _, c in firsts)
            if rebuilt:
                self._recache_rebuilt(reqs, plans, source, list(rebuilt.values()), cache)

            # 3. Fork shared prefixes into their samples (a device-side row copy).
            n_rows = self._rows(len(reqs))
            source_b = np.array(source + [0] * (n_rows - len(reqs)), np.int32)
            if n_rows != n_unique or not np.array_equal(source_b, np.arange(n_rows)):
                cache, logits_uv = engine.fork_rows(cache, logits_uv, self._put(source_b))

            # 4. Decode every row until it stops.
            stops = tuple(sorted({s for r in reqs for s in r.stop}))
            tables = self._stop_table(stops)
            max_new = pow2_at_least(max(r.max_new_tokens for r in reqs), MIN_NEW_SLOTS)
            state = self._initial_state(reqs, plans, cache, n_rows, max_new, tables)
            table_kqv, match_state_k = tables.on_device()
            mode = sampling_mode([r.temperature for r in reqs], [r.top_p for r in reqs], [r.top_k for r in reqs])
            decode_args = (table_kqv, match_state_k, self.eos_ids, mode, self._rows(1), self._vocab_limit)
            state = engine.decode(self.graphdef, self.params, state, logits_uv, *decode_args)
            self.stats.device_calls += 2
            state = self._finish_stragglers(state, len(reqs), decode_args)
        tokens_bt, logprobs_bt, num_gen_b, reason_b, stop_state_bk = fetch(
            (state.tokens_bt, state.logprobs_bt, state.num_gen_b, state.reason_b, state.stop_state_bk))
        self.stats.decoded_tokens += int(num_gen_b[:len(reqs)].sum())

        # 5. Completions, and their states kept in the pool for continuation.
        completions = []
        for b, r in enumerate(reqs):
            gen = [int(t) for t in tokens_bt[b, :num_gen_b[b]]]
            context = r.state.tokens + tuple(r.extra_tokens)
            reason = engine.FINISH_REASONS[int(reason_b[b])]
            matched = [s for k, s in enumerate(stops) if stop_state_bk[b, k] == tables.match_state_k[k] and s in r.stop]
            # Several stop strings can complete in the last token: the one that ended the text is the
            # first to end in the bytes the automata read (the tokens' bytes).
            ended_by = None
            if reason == "stop" and matched:
                ended_by = matched[0] if len(matched) == 1 else ending_stop(
                    b"".join(self._token_bytes[t] for t in gen), [s.encode("utf-8") for s in matched],
                    context=r.stop_context.encode("utf-8")[-STOP_CONTEXT_BYTES:],
                    within=[s.encode("utf-8") for s in matched if s not in r.context_stops]).decode("utf-8")
            completions.append(Completion(
                text=self.decode_after(context, gen),
                token_ids=gen,
                logprobs=[float(x) for x in logprobs_bt[b, :num_gen_b[b]]],
                finish_reason=reason,
                stop_string=ended_by,
                state=SeqState(tokens=context + tuple(gen), parent=r.state) if keep_states else None,
            ))
        if keep_states:
            self._store(state.cache, list(range(len(reqs))), [c.state for c in completions])
        return completions

    def _store(self, cache: KVCache, rows: list[int], states: list[SeqState], lengths: list[int] | None = None):
        pool = self.pool
        evicted_before = pool.evictions
        pool.store(cache, rows, states, lengths=lengths)
        self.stats.evictions += pool.evictions - evicted_before

    def _recache_rebuilt(self, reqs, plans, source: list[int], requests: list[list[int]], cache: KVCache) -> None:
        """Put the evicted states this batch rebuilt back into the pool (`requests[i]`: the requests that
        continue one), so that continuing one again prefills only its pending token, as for any cached state.

        A rebuilt state's prefilled row also holds its pending token and the request's extra tokens; the
        stored copy forgets them (a cached slot holds every token but the last). In a ring (sliding-window)
        cache those writes overwrote older slots: the state is cached only from a row where they fit in one
        chunk (`KVCache.max_chunk`), the writes that overwrite no key inside the window of their first
        query: the first of the state's requests whose row does.
        """
        max_tail = cache.max_chunk(self.cfg.sliding_window)
        keep = []
        for bs in requests:
            for b in bs:
                state, (_, skip, chunk) = reqs[b].state, plans[b]
                tail = skip + len(chunk) - (len(state) - 1)  # positions written after the state's cached part
                if max_tail is None or tail <= max_tail:
                    keep.append(b)
                    break
        if keep:
            self._store(cache, [source[b] for b in keep], [reqs[b].state for b in keep],
                        lengths=[len(reqs[b].state) - 1 for b in keep])

    def _finish_stragglers(self, state: engine.DecodeState, n_real: int, decode_args) -> engine.DecodeState:
        """A large batch's decode loop returns once few rows still run (rows finish at very different
        lengths: an option of one line next to a rollout to the end); those rows continue in a smaller
        batch and are written back, so finished rows stop costing a row of compute per step."""
        # Small batches never exit early: no host sync for them.
        while engine.shrink_below(state.tokens_bt.shape[0], self._rows(1)):
            running = np.flatnonzero(fetch(state.reason_b)[:n_real] == engine.RUNNING)
            if not len(running):
                return state
            sub_rows = self._rows(len(running))
            pad = sub_rows - len(running)
            rows_b = np.concatenate([running, np.full(pad, running[0])]).astype(np.int32)
            real_b = np.arange(sub_rows) < len(running)
            sub = engine.compact_rows(state, self._put(rows_b), self._put(real_b))
            sub = engine.resume_decode(self.graphdef, self.params, sub, *decode_args)
            write_b = np.where(real_b, rows_b, state.tokens_bt.shape[0]).astype(np.int32)  # padding: dropped
            state = engine.merge_rows(state, self._put(write_b), sub)
            self.stats.device_calls += 1
            self.stats.compactions += 1
        return state

    def _initial_state(self, reqs, plans, cache, n_rows, max_new, tables) -> engine.DecodeState:
        pad = n_rows - len(reqs)

        def col(values, dtype, fill):
            return self._put(np.array(list(values) + [fill] * pad, dtype))

        stop_mask_bk = np.zeros((n_rows, tables.table_kqv.shape[0]), bool)
        stop_state_bk = np.zeros((n_rows, tables.table_kqv.shape[0]), np.int32)
        for b, r in enumerate(reqs):
            context = r.stop_context.encode("utf-8")[-STOP_CONTEXT_BYTES:]
            for s in r.stop:
                stop_mask_bk[b, tables.index(s)] = True
                if s in r.context_stops:
                    stop_state_bk[b, tables.index(s)] = tables.initial_state(s, context)
        return engine.DecodeState(
            cache=cache,
            tokens_bt=self._put(np.zeros((n_rows, max_new), np.int32)),
            logprobs_bt=self._put(np.zeros((n_rows, max_new), np.float32)),
            last_token_b=col([0] * len(reqs), np.int32, 0),
            pos_b=col([s + len(c) for _, s, c in plans], np.int32, 0),
            num_gen_b=col([0] * len(reqs), np.int32, 0),
            reason_b=col([engine.RUNNING] * len(reqs), np.int32, engine.LENGTH),  # padding rows start done
            stop_state_bk=self._put(stop_state_bk),
            seed_b=col([int(r.seed) % 2**32 for r in reqs], np.uint32, 0),
            temperature_b=col([r.temperature for r in reqs], np.float32, 0.0),
            top_p_b=col([r.top_p for r in reqs], np.float32, 1.0),
            # Top-k past the vocabulary keeps it all, as k = vocabulary does; int32 on device.
            top_k_b=col([min(max(int(r.top_k), 0), self.cfg.vocab_size) for r in reqs], np.int32, 0),
            max_new_b=col([r.max_new_tokens for r in reqs], np.int32, 1),
            stop_mask_bk=self._put(stop_mask_bk),
        )

def sampler_from_config(cfg, model, tokenizer, *, max_len: int, pool_slots: int | None = None,
                        max_batch: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Sampler:
    """A `Sampler` with the run config's `sampling` section (row buckets, KV chunks; pool and batch
    unless a stage passes its own): every stage of a run builds its samplers here."""
    from alphallm_jax.utils.distributed import check_sampling_mesh

    check_sampling_mesh(mesh)
    s = cfg.sampling
    return Sampler(model, tokenizer, max_len=max_len, pool_slots=s.pool_slots if pool_slots is None else pool_slots,
                   max_batch=max_batch or s.max_batch, mesh=mesh, min_rows=s.min_rows,
                   kv_chunk_slots=s.kv_chunk_slots, fine_row_buckets=s.fine_row_buckets)


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: a single str is one stop string (iterating it would stop at any of its
    characters)."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _check_seeds(name: str, seeds: Sequence[int]) -> None:
    for s in seeds:
        if int(s) < 0:
            raise ValueError(f"{name}: seeds must be non-negative integers, got {int(s)}")


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A distinct, reproducible 32-bit seed per (call seed, prompt, sample)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])
