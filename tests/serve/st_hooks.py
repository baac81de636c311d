"""schemathesis hooks for tests/serve/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

One rule of the API is not expressible in JSON Schema: prompt tokens + max_tokens must fit the context (vLLM and
OpenAI answer 400 `context_length_exceeded` otherwise; tests/serve/test_api.py tests that answer). Generated
requests are kept inside it: the prompt's JSON size in bytes bounds its tokens from above (a byte-level BPE token
is at least one byte), plus room for BOS and the chat template.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis

TEMPLATE_TOKENS = 64  # BOS plus the chat template's role markers, per request (a bound, not a measure)


def _prompt_bound(body: dict[str, Any]) -> int:
    """An upper bound of the request's prompt tokens."""
    prompt = body.get("prompt", body.get("messages", ""))
    return len(json.dumps(prompt, ensure_ascii=False).encode("utf-8", "surrogatepass")) + TEMPLATE_TOKENS


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    """Generation (examples, fuzzing): drop requests whose prompt and max_tokens may not fit the context."""
    if not isinstance(body, dict):
        return True
    wanted = [body[k] for k in ("max_tokens", "max_completion_tokens") if isinstance(body.get(k), int | float)]
    return _prompt_bound(body) + int(max(wanted, default=16)) <= int(os.environ["CROSSCHIP_ST_CONTEXT"])


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """The coverage phase's boundary values skip filters: there, lower a max_tokens the schema allows (at most the
    context) to what fits beside the prompt. A value beyond the schema's maximum (a negative case) is kept."""
    body, context = case.body, int(os.environ["CROSSCHIP_ST_CONTEXT"])
    if not isinstance(body, dict):
        return
    room = max(1, context - _prompt_bound(body))
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and room < value <= context:
            body[key] = room
