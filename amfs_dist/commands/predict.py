"""`amfs predict RUN --support DIR --query DIR|LIST [--out FILE.csv|FILE.json]`.

Adapts a finished run to the classes of an ImageFolder-style support folder (one subfolder of
images per class) and classifies each query image: load + adapt + predict of the Python API.
Without --out, the CSV is printed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

OUT_SUFFIXES = (".csv", ".json")


def register(sub) -> None:
    p = sub.add_parser("predict", help="adapt a finished run to your own classes (a folder "
                                       "per class) and classify query images",
                       description="Adapt a finished run (a directory or s3:// / gs:// URI) to "
                                   "the classes of --support, one subfolder of images per "
                                   "class, and print each query's predicted class and "
                                   "probabilities as CSV (or write CSV/JSON to --out).")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--support", required=True, metavar="DIR",
                   help="one subfolder per class, holding that class's images")
    p.add_argument("--query", required=True, metavar="DIR|LIST",
                   help="a folder of images, or a text file of image paths (one a line, "
                        "relative to the file's folder)")
    p.add_argument("--out", metavar="FILE", help="write the predictions to FILE.csv or FILE.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from amfs_dist.api import image_folder, load, query_files
    from amfs_dist.errors import UserError

    out = Path(args.out) if args.out else None
    if out is not None:  # refused before the work, so that nothing is written
        if out.suffix.lower() not in OUT_SUFFIXES:
            raise UserError(f"--out {out}: the suffix must be .csv or .json")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} not found")
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder")
    support, support_labels = image_folder(args.support)
    queries = query_files(args.query)
    adapted = load(args.run).adapt(support, support_labels)
    labels, probabilities = adapted.predict(queries)
    rows = [{"query": str(q), "predicted": label,
             "probabilities": {c: round(p, 6) for c, p in zip(adapted.classes, row)}}
            for q, label, row in zip(queries, labels, probabilities.tolist())]
    if out is None:
        sys.stdout.write(_csv(rows, adapted.classes))
        return 0
    if out.suffix.lower() == ".json":
        text = json.dumps({"run": args.run, "method": adapted.model.method,
                           "classes": adapted.classes, "predictions": rows}, indent=2) + "\n"
    else:
        text = _csv(rows, adapted.classes)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)  # a reader sees the old file or the whole new one
    print(f"amfs: {len(rows)} predictions written to {out}", file=sys.stderr)
    return 0


def _csv(rows: list[dict], classes: list[str]) -> str:
    """query, predicted, then one p_CLASS column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "predicted", *(f"p_{c}" for c in classes)])
    for row in rows:
        writer.writerow([row["query"], row["predicted"], *row["probabilities"].values()])
    return buffer.getvalue()
