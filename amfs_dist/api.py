"""The Python API: train, load a finished run, adapt it to your own classes, predict, evaluate.

    import amfs_dist
    run = amfs_dist.train_run(out="runs/demo", train_steps=200)      # what `amfs train` does
    model = amfs_dist.load(run.path)                             # a run dir or s3:// / gs:// URI
    adapted = model.adapt(support_images, support_labels)        # tensors, PIL images or files
    labels, probabilities = adapted.predict(query_images)
    amfs_dist.evaluate_run(run.path, episodes=100)               # what `amfs eval` does

Images of any size and mode are converted to the run's input shape by the cross-domain rule
(docs/datasets.md): RGB <-> grey by BT.601 luminance, bilinear antialiased resize. The CLI
commands call these same functions (`amfs predict` is load + adapt + predict).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from amfs_dist.config import SCHEMA, Config, flatten, load_config, resolve
from amfs_dist.errors import UserError

# a torch tensor [N, C, H, W] (uint8 0-255 or float in [0, 1]), or a sequence of images each
# a tensor [C, H, W] / [H, W], a PIL image, or an image file's path
Images = torch.Tensor | Sequence[Any]

# PIL modes read as one grey channel; every other mode is read as RGB
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# predict() runs the queries in chunks of this many: support-set batch-norm statistics make
# each query's prediction independent of the others, so chunking changes nothing but memory
QUERY_CHUNK = 512
# train_run(train_steps=10) is train_run(**{"train.steps": 10}): each key with its dots as underscores
_KEY_BY_KWARG = {key.replace(".", "_"): key for key in SCHEMA}


def _config_key(name: str) -> str:
    if name in SCHEMA:
        return name
    if name in _KEY_BY_KWARG:
        return _KEY_BY_KWARG[name]
    raise UserError(f"{name}: unknown config key (pass dotted keys as **{{'train.steps': 10}} "
                    f"or with underscores, train_steps=10)")


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {_config_key(name): value for name, value in kwargs.items()}


@dataclass(frozen=True)
class Run:
    """A finished training run: where it lives (directory or URI) and its result.json."""

    path: str
    result: dict = field(repr=False)

    def load(self) -> Model:
        return load(self.path)


def train_run(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
          resume_if_exists: bool = False, progress: bool = False, wait_for_lock: bool = False,
          **overrides: Any) -> Run:
    """Meta-train and evaluate on the test split: what `amfs train` does.

    config: a Config, a mapping (nested as in a YAML file, or {dotted key: value}), a YAML
    file's path, or None (the defaults). overrides: config keys, dotted via **{"kernel.lam": 1}
    or with underscores (kernel_lam=1). out: the run directory or an s3:// / gs:// URI
    (default runs/METHOD-TIMESTAMP). resume_if_exists: continue the run in `out` if there is
    one with the same config (a finished one is only read back), else start it.
    wait_for_lock: wait for another process that owns `out`, instead of refusing.
    """
    from amfs_dist import lifecycle

    extra = _overrides(overrides)
    if isinstance(config, Config):
        cfg = config.replace(**extra)
    elif isinstance(config, dict):
        cfg = resolve(flatten(config), extra)
    else:
        cfg = load_config(config, extra)
    if resume_if_exists and out is None:
        raise UserError("resume_if_exists needs out (the run to start or continue)")
    out = str(out) if out is not None else str(lifecycle.default_run_dir(cfg))
    result = lifecycle.train(cfg, out, start_or_continue=resume_if_exists,
                             wait_for_lock=wait_for_lock, progress=progress)
    return Run(out, result)


def evaluate_run(run: Run | str | Path, episodes: int | None = None,
                 data_source: str | None = None, progress: bool = False,
                 **overrides: Any) -> dict:
    """Evaluate a finished run on test episodes: what `amfs eval` does, the same dict.

    data_source: another data set (a store, local or at a URI) for a cross-domain test;
    overrides: config keys as for train_run (e.g. eval_queries=5, maml_test_steps=20).
    """
    from amfs_dist.evaluate import eval_run

    path = run.path if isinstance(run, Run) else run
    return eval_run(path, episodes, _overrides(overrides), progress, data_source=data_source)


def load(run: Run | str | Path) -> Model:
    """A finished run's model (a run directory, or an s3:// / gs:// URI read into memory)."""
    from amfs_dist.evaluate import load_run
    from amfs_dist.storage import is_uri, staged_run

    path = str(run.path if isinstance(run, Run) else run)
    if is_uri(path):
        with staged_run(path, ("config.yaml", "model.pt")) as remote:
            return Model(path, *load_run(remote.local))
    if not Path(path).is_dir():
        raise UserError(f"{path}: run directory not found")
    return Model(path, *load_run(path))


class Model:
    """A meta-trained model: adapt it to a support set of new classes with `adapt`."""

    def __init__(self, path: str, cfg: Config, learner, input_shape: tuple[int, ...]):
        self.path, self.cfg, self.input_shape = path, cfg, tuple(input_shape)
        self.method: str = cfg.method_name
        self.trained_ways: int = cfg.data.ways
        self._learners = {cfg.data.ways: learner}

    def __repr__(self) -> str:
        return (f"Model({self.path!r}, method={self.method!r}, input_shape={self.input_shape}, "
                f"trained_ways={self.trained_ways})")

    def learner(self, ways: int):
        """The MetaLearner for `ways` classes, with this run's parameters. Heads built from the
        support set (kernel, R2-D2, ProtoNet) take any number; a fixed output layer (MAML's)
        takes only the number it was trained for."""
        from amfs_dist.runs import state_dict_mismatch

        if ways not in self._learners:
            from amfs_dist.algorithms.learner import MetaLearner
            trained = self._learners[self.trained_ways]
            state = trained.module.state_dict()
            learner = MetaLearner(self.cfg.replace(**{"data.ways": ways}), self.input_shape,
                                  trained.device)
            if state_dict_mismatch(learner.module, state):
                raise UserError(f"{self.path}: a {self.method} model's output layer is fixed "
                                f"at the {self.trained_ways} classes it was trained for; the "
                                f"support set has {ways} (kernel, r2d2 and protonet heads take "
                                f"any number)")
            learner.module.load_state_dict(state)
            self._learners[ways] = learner
        return self._learners[ways]

    def images(self, images: Images) -> torch.Tensor:
        """Images as float [N, C, H, W] in [0, 1] of this model's input shape."""
        self._require_images()
        return to_input(images, self.input_shape)

    def _require_images(self) -> None:
        if len(self.input_shape) != 3:
            raise UserError(f"{self.path}: a regression run (data.source="
                            f"{self.cfg.data.source}) takes points, not images")

    def adapt(self, support_images: Images, support_labels: Sequence[Hashable] | torch.Tensor
              ) -> Adapted:
        """Adapt to a support set: one image per label, at least 2 classes, any labels (the
        classes are the distinct labels, in order of first appearance)."""
        self._require_images()
        labels = (support_labels.tolist() if isinstance(support_labels, torch.Tensor)
                  else list(support_labels))
        classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise UserError(f"the support set has {len(classes)} class(es); adaptation needs at "
                            f"least 2")
        learner = self.learner(len(classes))  # a class count the head cannot take fails first
        xs = self.images(support_images)
        if len(xs) != len(labels):
            raise UserError(f"{len(xs)} support images but {len(labels)} labels")
        index = {c: i for i, c in enumerate(classes)}
        ys = torch.tensor([index[c] for c in labels], dtype=torch.int64)
        return Adapted(self, learner, classes, xs, ys)


class Adapted:
    """A model adapted to one support set; `predict` classifies query images into its classes.

    The inner loop (kernel solve, prototypes or MAML steps) runs on the stored support set
    within each predict call, batched with the queries, as in evaluation."""

    def __init__(self, model: Model, learner, classes: list, xs: torch.Tensor, ys: torch.Tensor):
        self.model, self.learner, self.classes = model, learner, classes
        self.xs, self.ys = xs.to(learner.device), ys.to(learner.device)

    def predict(self, query_images: Images) -> tuple[list, torch.Tensor]:
        """(predicted labels, probabilities [Q, classes] with columns in self.classes' order)."""
        xq = self.model.images(query_images)
        params = {k: v.detach() for k, v in self.learner.params().items()}
        chunks = []
        # MAML's inner steps take gradients; nothing here requires grad, so nothing is recorded
        with torch.enable_grad(), self.learner.autocast_context():
            for start in range(0, len(xq), QUERY_CHUNK):
                chunk = xq[start:start + QUERY_CHUNK].to(self.learner.device)
                out, _ = self.learner.adapt_predict(params, self.xs, self.ys, chunk,
                                                    training=False)
                chunks.append(torch.softmax(out.detach().float(), dim=-1).cpu())
        probabilities = torch.cat(chunks) if chunks else torch.zeros(0, len(self.classes))
        labels = [self.classes[i] for i in probabilities.argmax(-1).tolist()]
        return labels, probabilities


def to_input(images: Images, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Images (a batch tensor or a sequence of tensors, PIL images or paths) as float
    [N, C, H, W] in [0, 1] of input_shape, by the cross-domain rule."""
    from amfs_dist.data.convert import image_converter

    convert = image_converter(input_shape[0], input_shape[1])
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise UserError(f"images: expected a tensor [N, C, H, W], got shape "
                            f"{tuple(images.shape)}")
        return convert(_as_float(images))
    batch = [convert(_as_float(_one_image(image))[None]) for image in images]
    if not batch:
        raise UserError("no images given")
    return torch.cat(batch)


def _one_image(image) -> torch.Tensor:
    from PIL import Image

    from amfs_dist.data.prepare.common import open_image, to_tensor
    if isinstance(image, (str, Path)):
        image = open_image(Path(image))
    if isinstance(image, Image.Image):
        return to_tensor(image, "L" if image.mode in GREY_MODES else "RGB")
    if isinstance(image, torch.Tensor) and image.dim() in (2, 3):
        return image if image.dim() == 3 else image[None]
    raise UserError(f"images: expected tensors [C, H, W], PIL images or file paths, got "
                    f"{type(image).__name__}"
                    f"{' of shape ' + str(tuple(image.shape)) if hasattr(image, 'shape') else ''}")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise UserError(f"images: expected uint8 (0-255) or float (0-1) tensors, got {x.dtype}")
    return x.float()


def image_folder(path: str | Path) -> tuple[list[Path], list[str]]:
    """(image files, their class names) of an ImageFolder-style folder: one subfolder per
    class holding its images (torchvision's extensions; hidden entries are skipped)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: support folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class subfolders (expected one folder of images per class)")
    samples = [(Path(file), classes[i]) for file, i in
               make_dataset(str(root), {c: i for i, c in enumerate(classes)},
                            extensions=IMG_EXTENSIONS, allow_empty=True)
               if not Path(file).name.startswith(".")]
    found = {label for _, label in samples}
    for name in classes:
        if name not in found:
            raise UserError(f"{root / name}: class '{name}' has no images "
                            f"({', '.join(IMG_EXTENSIONS)})")
    return [file for file, _ in samples], [label for _, label in samples]


def query_files(path: str | Path) -> list[Path]:
    """The query images: a folder's image files (sorted, not recursive), or a list file of
    paths, one a line (relative to the list's folder; blank lines and # comments skipped)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise UserError(f"{source}: no query images ({', '.join(IMG_EXTENSIONS)})")
        return files
    if not source.is_file():
        raise UserError(f"{source}: query folder or list file not found")
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: cannot read the query list ({type(e).__name__})") from None
    files = [source.parent / line.strip() for line in lines
             if line.strip() and not line.lstrip().startswith("#")]
    if not files:
        raise UserError(f"{source}: the query list names no images")
    return files
