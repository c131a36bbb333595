"""`sfpc` command line. Each subcommand imports only what it needs, so that serving never loads
torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _cmd_synth(argv: Sequence[str]) -> int:
    from sfpc.training import synth

    return synth.main(list(argv)) or 0


def train_parser() -> argparse.ArgumentParser:
    """The parser of `sfpc train` (every TrainConfig field is a flag with a help line)."""
    from sfpc.training.config import add_config_arguments

    p = argparse.ArgumentParser(
        prog="sfpc train",
        # The full usage line lists 50 flags; an error message should not drown in it.
        usage="sfpc train --data DATA [options]   (sfpc train --help: every option)",
        description="Train an SFPC model (or a baseline / ablation) on NIfTI data. By default the "
                    "data set is read once first and every value not given below is planned from "
                    "it (2D or 3D, spacing, patch, normalisation, augmentation, schedule; "
                    "<out>/plan.json says why; `sfpc plan` shows the plan without training). "
                    "--config takes a YAML/JSON file of the same fields. Multi-GPU: torchrun "
                    "--nproc_per_node N -m sfpc.cli train ...",
    )
    p.add_argument("--no-plan", action="store_true",
                   help="do not plan from the data: every value not given keeps its default (the "
                        "paper's 3D BraTS recipe)")
    add_config_arguments(p, planned=True)
    return p


def _cmd_train(argv: Sequence[str]) -> int:
    from pathlib import Path

    from sfpc.training.config import (
        ConfigError,
        TrainConfig,
        checked_values,
        resolve,
    )

    p = train_parser()
    ns = p.parse_args(list(argv))
    given = checked_values(p, ns)  # every value typed is checked before any data is read
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        plan = fingerprint = None
        fields = dict(given)
        if not ns.no_plan:
            from sfpc.training.plan import plan_for, summary_lines

            fingerprint, plan = plan_for(given["data"], given, given.get("device", "auto"),
                                         progress=main_rank)
            fields = plan.config_fields()
            if main_rank:  # stderr: stdout ends with the run's JSON report, for scripts
                print("\n".join(summary_lines(fingerprint, plan)), file=sys.stderr, flush=True)
        cfg = resolve(TrainConfig(**fields))
        if plan is not None and fingerprint is not None and main_rank:
            from sfpc.training.plan import write_plan

            write_plan(Path(cfg.out) / "plan.json", fingerprint, plan)
        from sfpc.training.trainer import train

        result = train(cfg)
    except ConfigError as e:
        p.error(str(e))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # The data or a value that only the data shows to be wrong: a message, not a traceback.
        print(f"sfpc train: error: {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0  # under torchrun only rank 0 reports
    report = {"best_val_dice": result["best_dice"], "best_iteration": result["best_iteration"],
              "step_time_median_s": result["step_time_median_s"],
              "checkpoint": result["checkpoint"], "last_checkpoint": result["last"],
              "warnings": len(result["warnings"])}
    if plan is not None:
        report["plan"] = str(Path(cfg.out) / "plan.json")
    if not result["validated"]:
        report["note"] = ("no validation data (--val-count 0 or too few labelled cases), so no "
                          "score: the model is last_checkpoint")
    print(json.dumps(report, indent=2))
    return 0


def _cmd_plan(argv: Sequence[str]) -> int:
    from sfpc.training import plan

    return plan.main(list(argv))


def _cmd_evaluate(argv: Sequence[str]) -> int:
    from sfpc.training import evaluate_cli

    return evaluate_cli.main(list(argv))


def _cmd_export(argv: Sequence[str]) -> int:
    from sfpc.model import export_cli

    return export_cli.main(list(argv))


def _cmd_stage_spreads(argv: Sequence[str]) -> int:
    from sfpc.training import stage_spreads

    return stage_spreads.main(list(argv))


def _cmd_organ_split(argv: Sequence[str]) -> int:
    from sfpc.training import organ_task

    return organ_task.main(list(argv))


def _cmd_demo(argv: Sequence[str]) -> int:
    from sfpc.training import demo

    return demo.main(list(argv))


def _cmd_uncertainty_eval(argv: Sequence[str]) -> int:
    from sfpc.training import uncertainty_cli

    return uncertainty_cli.eval_main(list(argv))


def _cmd_calibrate(argv: Sequence[str]) -> int:
    from sfpc.training import uncertainty_cli

    return uncertainty_cli.calibrate_main(list(argv))


def _cmd_build_default_model(argv: Sequence[str]) -> int:
    from sfpc.training import default_model

    return default_model.main(list(argv))


def _cmd_serve(argv: Sequence[str]) -> int:
    from sfpc.server.cli import serve

    return serve(argv)


def _cmd_worker(argv: Sequence[str]) -> int:
    from sfpc.server.cli import worker

    return worker(argv)


def _cmd_predict(argv: Sequence[str]) -> int:
    from sfpc.inference import predict

    return predict.main(list(argv))


def _cmd_sample_data(argv: Sequence[str]) -> int:
    from sfpc.io import sample_data

    return sample_data.main(list(argv))


def _cmd_client(argv: Sequence[str]) -> int:
    from sfpc.clients.cli import main as client_main

    return client_main(argv)


def _cmd_listen(argv: Sequence[str]) -> int:
    from sfpc.clients.listen import main as listen_main

    return listen_main(list(argv))


COMMANDS = {
    "predict": (_cmd_predict, "segment a NIfTI file, DICOM series or folder locally (no server)"),
    "sample-data": (_cmd_sample_data, "download the public sample scans the README uses"),
    "synth": (_cmd_synth, "generate synthetic BraTS-like 3D or ACDC-like 2D NIfTI data"),
    "plan": (_cmd_plan, "read a data set once and show the training configuration planned "
                        "from it (plan.json)"),
    "train": (_cmd_train, "train SFPC, an ablation row or a baseline (planned from the data)"),
    "evaluate": (_cmd_evaluate, "evaluate a checkpoint: Dice, HD95, ASD, boundary Dice"),
    "export": (_cmd_export, "export a checkpoint to ONNX (+ uncertainty graph, Triton repo)"),
    "organ-split": (_cmd_organ_split, "write the abdominal CT organ task's slice-block split"),
    "demo": (_cmd_demo, "synthetic data -> short training -> evaluation, end to end"),
    "uncertainty-eval": (_cmd_uncertainty_eval, "score uncertainty maps (error AUROC/AP, ECE) of "
                                                "an export on labelled cases"),
    "stage-spreads": (_cmd_stage_spreads, "measure FLPM spreads at more decoder depths "
                                           "(for export --uncertainty-method flpm_stages)"),
    "calibrate": (_cmd_calibrate, "fit an export's temperature and review-flag threshold"),
    "build-default-model": (_cmd_build_default_model, "re-create the shipped organ CT model "
                                                      "from shared/data/organs"),
    "serve": (_cmd_serve, "serve exported models over HTTP (FastAPI gateway)"),
    "worker": (_cmd_worker, "run asynchronous jobs of the distributed mode (PostgreSQL)"),
    "client": (_cmd_client, "batch-segment folders or PACS series through a gateway"),
    "listen": (_cmd_listen, "receive DICOM series (C-STORE), segment them through a gateway, "
                            "send the results back"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sfpc <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<20} {text}")
        print("\n`sfpc <command> --help` for a command's options.")
        return 0
    if argv[0] == "--version":
        import sfpc

        print(sfpc.__version__)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"sfpc: unknown command {argv[0]!r}; run `sfpc --help`", file=sys.stderr)
        return 2
    return int(cmd[0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
