"""lm-eval's `local-completions` model against a real `crosschip serve`: its loglikelihoods are the model's.

Two tiny tasks shipped in tests/serve/lmeval/ (local JSONL, no hub): a multiple-choice task (loglikelihood
requests) and a perplexity task (loglikelihood_rolling). lm-eval tokenizes with the checkpoint's own tokenizer
and sends token ids with `echo: true, max_tokens: 1, logprobs: 1` (lm_eval/models/openai_completions.py), then
sums the echoed prompt logprobs of the continuation. Every request's sum must equal what `transformers`
computes on the same ids. The ids are rebuilt with lm-eval's own encoders (`_encode_pair`, rolling windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

TASKS = Path(__file__).parent / "lmeval"
TOLERANCE = 1e-4
CONTEXT = 256


@pytest.fixture(scope="module")
def server(launch: Callable[..., Any], serve_ckpt: Path) -> Any:
    return launch(serve_ckpt, "--max-context", str(CONTEXT))


def _task(name: str, cache: Path) -> dict[str, Any]:
    """The shipped task config with its data file made absolute and the datasets cache kept in the test's tmp."""
    config = yaml.safe_load((TASKS / f"{name}.yaml").read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"] = {"data_files": {k: str(TASKS / v) for k, v in files.items()}, "cache_dir": str(cache)}
    return config


def _lm(server: Any, ckpt: Path, add_bos_token: bool) -> Any:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=server.url + "/completions", model=server.model, tokenizer=str(ckpt),
        tokenizer_backend="huggingface", tokenized_requests=True, add_bos_token=add_bos_token,
        batch_size=4, max_length=CONTEXT, max_retries=1, timeout=120,
    )


def _evaluate(lm: Any, task: dict[str, Any]) -> list[dict[str, Any]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                              log_samples=True, bootstrap_iters=0, random_seed=0)
    assert results is not None
    return results["samples"][task["task"]]


@torch.inference_mode()
def _hf_loglikelihood(model: Any, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from the plain `transformers` forward, in float64 sums."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(continuation))


def _arguments(sample: dict[str, Any]) -> list[tuple[str, ...]]:
    """A logged sample's request arguments, as tuples (lm-eval logs them as lists or as arg_N dicts)."""
    args = sample["arguments"]
    rows = args.values() if isinstance(args, dict) else args
    return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in rows]


def test_multiple_choice_loglikelihoods_equal_transformers(
    server: Any, serve_ckpt: Path, ref_model: Any, tmp_path: Path
) -> None:
    # add_bos_token: lm-eval's API models encode without special tokens unless told; with it, every context
    # starts with the BOS training put before each document.
    lm = _lm(server, serve_ckpt, add_bos_token=True)
    samples = _evaluate(lm, _task("crosschip_tiny_mc", tmp_path / "datasets"))
    assert len(samples) == 4
    checked = 0
    for sample in samples:
        lls = [float(r[0][0]) for r in sample["resps"]]
        for (context, continuation), ll in zip(_arguments(sample), lls, strict=True):
            ctx_ids, cont_ids = lm._encode_pair(context, continuation)
            assert ctx_ids[0] == lm.tokenizer.bos_token_id and ctx_ids.count(ctx_ids[0]) == 1
            assert ll == pytest.approx(_hf_loglikelihood(ref_model, ctx_ids, cont_ids), abs=TOLERANCE)
            checked += 1
    assert checked == 12


def test_rolling_loglikelihoods_equal_transformers(
    server: Any, serve_ckpt: Path, ref_model: Any, tmp_path: Path
) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    # Default add_bos_token (False): each rolling window already starts with prefix_token_id, the BOS.
    lm = _lm(server, serve_ckpt, add_bos_token=False)
    samples = _evaluate(lm, _task("crosschip_tiny_ppl", tmp_path / "datasets"))
    assert len(samples) == 3
    for sample in samples:
        ((text,),) = _arguments(sample)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length - 1,
            context_len=1)]
        assert windows[0][0] == [lm.tokenizer.bos_token_id]  # scored after BOS, as trained
        expected = sum(_hf_loglikelihood(ref_model, ctx, cont) for ctx, cont in windows)
        got = float(sample["resps"][0][0])
        assert math.isfinite(got) and got == pytest.approx(expected, abs=TOLERANCE)
