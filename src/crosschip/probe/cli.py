"""`crosschip probe compare|ranks|replay`: the probe's command line (mounted under the main CLI as `probe`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from crosschip.cli_common import JsonOpt, err, make_app, out, print_json, run_app
from crosschip.probe.compare import DEFAULT_MARGIN  # numpy only: keeps `crosschip --help` fast

probe_app = make_app("probe", "Find where a training run goes wrong: compare probe recordings (runs or ranks), "
                               "replay a step window.")
_RANK_HELP = "Rank of {run} to read (a torchrun recording holds one per rank; default 0)."


def _print_json(obj: Any) -> None:
    from crosschip.htmlreport import jsonable  # imports torch: only when JSON is asked for

    print_json(jsonable(obj))


def _print_verdict(doc: dict[str, Any], json_out: bool, render: Callable[[dict[str, Any]], list[Any]]) -> None:
    """The report as JSON or tables + notes + verdict; exit 0 on a match, 1 otherwise."""
    if json_out:
        _print_json(doc)
    else:
        for table in render(doc):
            out.print(table)
        for note in doc.get("notes") or []:
            err.print(Text(f"note: {note}", style="dim"))
        out.print(f"verdict: {doc['verdict'].upper()}", highlight=False)
    raise typer.Exit(0 if doc["verdict"] == "match" else 1)


@probe_app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="Reference training run directory (with a probe recording).")],
    run_b: Annotated[Path, typer.Argument(help="Training run to check against the reference.")],
    noise: Annotated[Path | None, typer.Option(help="The reference setup recorded again (another seed/device): "
                                                    "its difference from RUN_A sets the tolerance.")] = None,
    margin: Annotated[float, typer.Option(help="Tolerance = margin x reference noise (or x floor).")] = DEFAULT_MARGIN,
    report: Annotated[Path | None, typer.Option(help="Write report.json and report.html here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report directory.")] = False,
    rank_a: Annotated[int, typer.Option(min=0, help=_RANK_HELP.format(run="RUN_A"))] = 0,
    rank_b: Annotated[int, typer.Option(min=0, help=_RANK_HELP.format(run="RUN_B"))] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Align two probe recordings; name the first diverging step and module and the first NaN/Inf origin.

    Two ranks of one run: `compare RUN RUN --rank-b 1`; the same rank of two runs (before and after a chip
    move): `compare OLD NEW --rank-a 1 --rank-b 1`. Every rank at once: `probe ranks RUN`.
    Exit code 0 when they match, 1 when they diverge, 2 on a usage error."""
    from crosschip.fsio import check_output_dir
    from crosschip.probe.compare import compare_runs
    from crosschip.probe.report import build_probe_report, render_table, write_probe_report

    if report is not None:  # refuse before the work, not after it
        check_output_dir(report, overwrite)
    result = compare_runs(run_a, run_b, noise=noise, margin=margin, rank_a=rank_a, rank_b=rank_b)
    doc = build_probe_report(result)
    if report is not None:
        paths = write_probe_report(doc, report, overwrite=overwrite)
        if not json_out:
            err.print(f"report: {paths['html']}", highlight=False)
    _print_verdict(doc, json_out, render_table)


@probe_app.command()
def ranks(
    run: Annotated[Path, typer.Argument(help="Training run directory recorded under torchrun with --probe.")],
    reference: Annotated[int, typer.Option(min=0, help="The rank every other rank is compared with.")] = 0,
    margin: Annotated[float, typer.Option(help="Outputs: tolerance = margin x the pair's usual spread "
                                               "(median over steps); gradients: margin x the precision floor.")]
    = DEFAULT_MARGIN,
    json_out: JsonOpt = False,
) -> None:
    """Compare every rank of one run with the reference rank; name the first rank, step and module that
    produced a NaN/Inf or diverged.

    Under DDP ranks see different data: outputs are judged against their usual distance between ranks,
    full gradients must agree, FSDP2's local gradient shards are only checked for NaN/Inf.
    Exit code 0 when no rank went wrong, 1 otherwise, 2 on a usage error."""
    from crosschip.probe.ranks import compare_ranks
    from crosschip.probe.report import render_ranks_table

    doc = compare_ranks(run, reference=reference, margin=margin).to_dict()
    _print_verdict(doc, json_out, render_ranks_table)


def _replay_summary(replay_dir: Path) -> dict[str, Any]:
    """Where the replay put its recording and tensors, and which steps it holds."""
    from crosschip.probe import store

    manifest = store.read_manifest(replay_dir)
    stats = store.read_stats(replay_dir)
    steps = sorted({int(s) for s in stats.column("step").to_pylist()})
    tensors_dir = replay_dir / "probe" / "tensors"
    files = sorted(p.name for p in tensors_dir.glob("*.safetensors")) if tensors_dir.is_dir() else []
    return {"replay_dir": str(replay_dir), "device": manifest.get("device"), "precision": manifest.get("precision"),
            "mode": manifest.get("mode"), "steps": steps, "tensors_dir": str(tensors_dir), "tensor_files": files}


@probe_app.command()
def replay(
    run: Annotated[Path, typer.Argument(help="Training run directory with a probe recording and checkpoints.")],
    step: Annotated[int, typer.Option(help="Replay up to and including this step.")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda[:N], npu[:N] ... (default: the run's).")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: the run's).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Replay directory "
                                                 "(default RUN/replay-step-S-<device>-<precision>).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing replay directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Reload the checkpoint before STEP and replay up to it deterministically, dumping full tensors."""
    from crosschip.probe.replay import replay as run_replay

    replay_dir = run_replay(run, step, device=device, precision=precision, out=out_dir, overwrite=overwrite)
    summary = _replay_summary(Path(replay_dir))
    if json_out:
        return _print_json(summary)
    steps = summary["steps"]
    span = f"{steps[0]}..{steps[-1]}" if steps else "none"
    err.print(f"replayed steps {span} on {summary['device']} ({summary['precision']})", highlight=False)
    err.print(f"recording: {summary['replay_dir']}", highlight=False)
    err.print(f"tensors: {summary['tensors_dir']} ({len(summary['tensor_files'])} files)", highlight=False)
    err.print(f"compare with: crosschip probe compare {run} {summary['replay_dir']}", highlight=False)
    return None


def main() -> None:
    """Entry point (`python -m crosschip.probe.cli`, or `crosschip probe`): errors are one line, exit 2."""
    run_app(probe_app)


if __name__ == "__main__":
    main()
