# The amfs-dist image: Ray's GPU image with this package installed. Every manifest in
# cluster/k8s runs it; build and push it under your registry's name (cluster/README.md):
#
#   docker build -t ghcr.io/OWNER/amfs-dist:0.1.0 .
#   docker push ghcr.io/OWNER/amfs-dist:0.1.0
#
# The Ray version (2.60) and Python (3.11) match pyproject.toml and the manifests' rayVersion.
FROM rayproject/ray:2.60.0-py311-gpu

# Ray's image runs as `ray` (uid 1000, group users) with its Python in /home/ray/anaconda3,
# owned by that user. Install as `ray` from files `ray` owns: a root-owned copy makes the build
# fail with "could not create 'amfs_dist.egg-info': Permission denied".
USER ray
# torch as pinned in pyproject.toml, in a layer of its own: the largest one, rebuilt only when
# the pin changes (PyPI's Linux wheels carry CUDA)
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
RUN mkdir -p /home/ray/amfs-dist
COPY --chown=ray:users pyproject.toml README.md /home/ray/amfs-dist/
COPY --chown=ray:users amfs_dist /home/ray/amfs-dist/amfs_dist
# a regular install (not editable) into the image's Python; the sources are not needed after it.
# The package carries the experiment and sweep files (amfs_dist/experiments, amfs_dist/tuning):
# `amfs experiment compare` and `amfs tune --config tiny-cpu` work from any folder of the image.
RUN pip install --no-cache-dir /home/ray/amfs-dist \
    && rm -rf /home/ray/amfs-dist \
    && amfs --help > /dev/null \
    && cd / && python -c "from amfs_dist.experiment.spec import load_experiment; \
from amfs_dist.tune.space import load_sweep; load_experiment('compare'); load_sweep('tiny-cpu')"
WORKDIR /home/ray
