"""Adapt a trained run to a folder of your own images and classify new ones.

    python examples/predict_your_images.py RUN --support DIR --query DIR
    python examples/predict_your_images.py --demo [--tiny]

--support holds one subfolder per class (ImageFolder layout: support/cat/1.jpg, support/dog/
7.png, ...); --query a folder of images to classify. Any size and mode: images are converted to
the run's input as cross-domain evaluation does. The same as `amfs predict RUN --support DIR
--query DIR`. --demo trains a run and writes a support and query folder of glyph PNGs (RGB,
64x64) to show it; --tiny makes that run tiny.
"""
import argparse
import tempfile
from pathlib import Path

import amfs_dist

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", nargs="?", help="a finished run: directory or s3:// / gs:// URI")
parser.add_argument("--support", help="one subfolder of images per class")
parser.add_argument("--query", help="a folder of images to classify")
parser.add_argument("--demo", action="store_true", help="train a run and make image folders")
parser.add_argument("--tiny", action="store_true", help="with --demo: a tiny, quick run")
args = parser.parse_args()


def demo_folders(root: Path) -> tuple[str, str]:
    """Three test-split glyph classes as PNG files: 2 support images each, 2 queries each."""
    from PIL import Image

    from amfs_dist.data.synthetic import glyph_images
    glyphs = glyph_images(seed=0, size=28)
    for c in glyphs.splits["test"][:3]:
        name, members = glyphs.class_names[c], glyphs.members(int(c))
        (root / "support" / name).mkdir(parents=True)
        (root / "query").mkdir(exist_ok=True)
        for i, member in enumerate(members[:4]):
            image = Image.fromarray(glyphs.images[member][0]).resize((64, 64)).convert("RGB")
            image.save(root / ("support" if i < 2 else "query") / (name if i < 2 else "")
                       / f"{name}-{i}.png")
    return str(root / "support"), str(root / "query")


if args.demo:
    root = Path(tempfile.mkdtemp(prefix="amfs-demo-"))
    settings = ({"train_steps": 2, "model_width": 8, "train_meta_batch": 2, "eval_episodes": 2,
                 "train_val_every": 0} if args.tiny else {"train_steps": 300})
    args.run = amfs_dist.train_run(out=root / "run", data_ways=3, data_shots=2, **settings).path
    args.support, args.query = demo_folders(root)
elif not (args.run and args.support and args.query):
    parser.error("give RUN, --support and --query (or --demo)")

model = amfs_dist.load(args.run)
files, labels = amfs_dist.image_folder(args.support)
adapted = model.adapt(files, labels)
queries = amfs_dist.query_files(args.query)
predicted, probabilities = adapted.predict(queries)
print(f"{model.method} run {args.run}, adapted to {len(adapted.classes)} classes "
      f"from {len(files)} images")
for query, label, p in zip(queries, predicted, probabilities):
    print(f"{Path(query).name:>24}  {label:<12} p={float(p.max()):.2f}")
