"""`amfs status RUN_DIR|URI`: one JSON object saying how far a run is, local or on object storage.

  step / steps       the last logged step (metrics.jsonl) against train.steps
  last_metrics       that step's metrics row; last_validation: the last row with val_accuracy
  workers            the shard workers that computed that step (its `workers` column: an
                     elastic run may have fewer than dist.workers); absent where the run logs
                     none (in-process runs)
  checkpoint_age_s   seconds since checkpoint.pt was last written (null: none yet)
  finished, result   whether result.json exists, and its content
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("status", help="how far a run is (local or s3:// / gs://), as JSON",
                       description="Print one JSON object for a run: its step against "
                                   "train.steps, the shard workers that computed it, the last "
                                   "metrics and validation, the "
                                   "checkpoint's age in seconds and, once finished, its result.")
    p.add_argument("run", metavar="RUN_DIR|URI")
    p.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(run_status(args.run)))
    return 0


def run_status(run: str | Path) -> dict:
    import pyarrow.fs as pafs

    from amfs_dist.storage import is_uri, staged_run
    if is_uri(run):  # read the small files from a local copy, the checkpoint's time in place
        with staged_run(str(run), ("config.yaml", "metrics.jsonl", "result.json")) as remote:
            return _status(str(run), remote.local, remote.info("checkpoint.pt"))
    info = pafs.LocalFileSystem().get_file_info(str(Path(run).resolve() / "checkpoint.pt"))
    return _status(str(run), Path(run), info)


def _status(name: str, local: Path, checkpoint) -> dict:
    import pyarrow.fs as pafs

    from amfs_dist.runs import RESULT, read_metrics, read_result, read_run_config
    cfg = read_run_config(local, flag="", name=name)
    # a last line being written right now is dropped, as on --resume
    rows = read_metrics(local / "metrics.jsonl") if (local / "metrics.jsonl").is_file() else []
    validations = [r for r in rows if r.get("val_accuracy") is not None]
    result = read_result(local) if (local / RESULT).is_file() else None
    age = (round(time.time() - checkpoint.mtime.timestamp(), 1)
           if checkpoint.type == pafs.FileType.File else None)
    workers = {"workers": rows[-1]["workers"]} if rows and "workers" in rows[-1] else {}
    return {"run": name, "method": cfg.method_name, "step": rows[-1]["step"] if rows else 0,
            "steps": cfg.train.steps, **workers, "finished": result is not None,
            "checkpoint_age_s": age, "last_metrics": rows[-1] if rows else None,
            "last_validation": ({k: validations[-1][k] for k in ("step", "val_accuracy",
                                                                 "val_loss")}
                                if validations else None),
            "result": result}
