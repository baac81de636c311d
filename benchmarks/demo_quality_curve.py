"""The demo's quality curve: validation loss below the corpus's unigram entropy, every 20 steps, of one run of the
demo's own training config (`crosschip.demo.demo_train_config`) and schedule for --steps steps.

It is what `crosschip.demo.DEMO_MIN_STEPS` rests on: the step floor must end above the quality bar (1.5 nats below
unigram) with a margin. A step is the same work on any machine, so the curve does not depend on the load; only its
wall time does.

    python benchmarks/demo_quality_curve.py [--steps 600] [--workdir /tmp/demo-curve]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console

from crosschip.data.corpus import stdlib_docstring_corpus, unigram_entropy
from crosschip.demo import QUALITY_BAR_NATS, DemoContext, demo_train_config
from crosschip.train.loop import Trainer
from crosschip.train.report import NullReporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="demo-curve-"))
    stdlib_docstring_corpus(workdir / "corpus.jsonl")
    ctx = DemoContext(workdir, Console(stderr=True), minutes=1e6, steps=args.steps, overwrite=True)
    cfg = demo_train_config(ctx, args.steps)
    cfg.eval_every, cfg.save_every, cfg.time_budget_s = 20, 10**9, None
    trainer = Trainer(cfg, NullReporter())
    entropy = unigram_entropy(trainer.inputs.dataset.train, len(trainer.inputs.tokenizer))
    result = trainer.run()
    rows = [{"step": h["step"], "val_loss": h["val_loss"], "below_unigram": round(entropy - h["val_loss"], 3)}
            for h in result.history if h.get("val_loss") is not None]
    print(json.dumps({"steps": args.steps, "unigram_entropy": entropy, "quality_bar": QUALITY_BAR_NATS,
                      "tokens_per_s": result.tokens_per_s, "wall_s": result.elapsed_s, "curve": rows}, indent=1))


if __name__ == "__main__":
    main()
