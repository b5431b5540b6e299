"""amfs-dist: distributed meta-training for few-shot learning (AMFS, MAML, FO-MAML) on Ray.

The Python API (docs/api.md); the `amfs` commands call these same functions:

    train_run(config=None, out=None, *, resume_if_exists=False, **overrides) -> Run
    load(run_dir_or_uri) -> Model
    Model.adapt(support_images, support_labels) -> Adapted
    Adapted.predict(query_images) -> (labels, probabilities)
    evaluate_run(run, episodes=None, data_source=None, **overrides) -> dict
    image_folder(dir) -> (files, labels)      query_files(dir_or_list) -> files

Example:

    import amfs_dist
    run = amfs_dist.train_run(out="runs/demo", train_steps=200)
    adapted = amfs_dist.load(run.path).adapt(support_images, ["cat", "dog", "cat", "dog"])
    labels, probabilities = adapted.predict(query_images)
"""

__version__ = "0.1.0"

# the API is imported on first use: `import amfs_dist` (and every `amfs` command) stays cheap
# (not train/evaluate: amfs_dist.train and amfs_dist.evaluate are the package's modules)
__all__ = ["Adapted", "Model", "Run", "evaluate_run", "image_folder", "load", "query_files",
           "train_run"]


def __getattr__(name: str):
    if name in __all__:
        from amfs_dist import api
        return getattr(api, name)
    raise AttributeError(f"module 'amfs_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
