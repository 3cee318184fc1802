"""Near-miss request field names: ``max_token`` is sent as it is, and warned about once.

Every field batcher does not know passes through untouched (new API parameters work without a
batcher release), so a misspelt one reaches the provider, which answers 400 on every line.
A name close to a field of the chat-completions API (``difflib.get_close_matches``) is warned
about once, before the first request that carries it is sent. Names that servers other than
OpenAI's accept (vLLM's ``top_k``, llama.cpp's ``min_p``...) are never taken for typos.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batcher.config import JobConfig

#: The request fields of ``POST /chat/completions`` (the OpenAI API reference).
KNOWN_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop",
    "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
    "logit_bias", "logprobs", "top_logprobs", "user", "response_format", "seed", "tools",
    "tool_choice", "parallel_tool_calls", "functions", "function_call", "service_tier",
    "store", "metadata", "modalities", "audio", "prediction", "reasoning_effort",
    "web_search_options", "verbosity", "safety_identifier", "prompt_cache_key",
})  # fmt: skip
#: Fields of other OpenAI-compatible servers (vLLM, llama.cpp, TGI, OpenRouter): not typos,
#: though some are close to a known field (``top_k`` to ``top_p``, ``min_tokens`` to
#: ``max_tokens``).
EXTENSION_FIELDS = frozenset({
    "top_k", "min_p", "typical_p", "tfs_z", "repetition_penalty", "repeat_penalty",
    "repeat_last_n", "penalty_last_n", "mirostat", "mirostat_mode", "mirostat_tau",
    "mirostat_eta", "grammar", "json_schema", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "structured_outputs", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    "skip_special_tokens", "spaces_between_special_tokens", "min_tokens", "ignore_eos",
    "best_of", "use_beam_search", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "truncate_prompt_tokens", "priority", "cache_prompt",
    "n_probs", "id_slot", "provider", "transforms", "models", "route", "reasoning",
    "include_reasoning", "thinking", "enable_thinking", "top_a", "logit_bias_type",
    "dry_multiplier", "xtc_probability", "xtc_threshold", "samplers", "top_n_sigma",
})  # fmt: skip
#: How close a name must be to a known field to be taken for a typo of it (difflib's ratio):
#: ``max_token`` is 0.95 from ``max_tokens``; a deliberate name such as ``user_id`` (0.73 from
#: ``user``) is left alone.
CUTOFF = 0.75


def near_miss(name: str) -> str | None:
    """The known field ``name`` is probably a typo of, or ``None``."""
    if name in KNOWN_FIELDS or name in EXTENSION_FIELDS:
        return None
    close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1, cutoff=CUTOFF)
    return close[0] if close else None


class FieldNames:
    """Remembers the field names already looked at, so each near miss is warned about once.

    Shared by the readers of a run (one thread each, for a job with variants): the names seen
    are kept under a lock. A body whose fields are all known costs a set lookup per field.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warnings(self, names: Iterable[str], where: str) -> list[str]:
        """A warning for each near-miss name in ``names`` not looked at before; ``where`` says
        where it was found (``[request]``, ``line 3``)."""
        unknown = [name for name in names if name not in KNOWN_FIELDS]
        if not unknown:
            return []
        with self._lock:
            new = [name for name in unknown if name not in self._seen]
            self._seen.update(new)
        found = []
        for name in new:
            guess = near_miss(name)
            if guess is not None:
                found.append(
                    f"batcher: warning: request field {name!r} ({where}) is not a known field; "
                    f"did you mean {guess!r}? It is sent as it is"
                )
        return found


def job_field_warnings(job: JobConfig, fields: FieldNames) -> list[str]:
    """Warnings for the near-miss field names of the job's ``[request]`` and its variants'
    requests, before anything is sent (``fields`` then knows them: lines repeat no warning)."""
    found = fields.warnings(job.request, "[request]")
    for variant in job.variants:
        found += fields.warnings(variant.request, f"variant {variant.name}")
    return found
