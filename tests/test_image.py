"""The container image's recipe (Dockerfile, .dockerignore) and its one name in every manifest.

No image builder or registry is needed: these check the Dockerfile's essentials as text.
"""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"ghcr.io/OWNER/amfs-dist:{PROJECT['version']}"  # the placeholder users replace


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())  # join continued lines
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def pin(name: str) -> str:
    return next(d for d in PROJECT["dependencies"] if re.match(rf"{name}\b", d))


def test_dockerfile_builds_on_rays_gpu_image_of_the_pinned_version():
    froms = [arg for op, arg in instructions() if op == "FROM"]
    ray_minor = re.search(r"==(\d+\.\d+)", pin("ray")).group(1)  # ray[...]==2.60.*
    assert froms == [f"rayproject/ray:{ray_minor}.0-py311-gpu"]


def test_dockerfile_installs_as_the_images_own_user_never_root():
    ops = instructions()
    users = [arg for op, arg in ops if op == "USER"]
    assert users and users[-1] == "ray" and not {"root", "0"} & set(users)
    first_user = next(i for i, (op, _) in enumerate(ops) if op == "USER")
    for i, (op, arg) in enumerate(ops):
        if op == "RUN":
            assert i > first_user, f"RUN as root: {arg}"
        if op in ("COPY", "ADD"):
            assert "--chown=ray" in arg, f"{op} leaves root-owned files: {arg}"


def test_dockerfile_installs_the_package_and_pins_torch_as_pyproject_does():
    runs = " ".join(arg for op, arg in instructions() if op == "RUN")
    assert pin("torch") in runs and pin("torchvision") in runs
    installs = re.findall(r"pip install ([^&;]*)", runs)
    assert any(re.search(r"(^|\s)/home/ray/amfs-dist(\s|$)", i) for i in installs), installs
    assert not any(re.search(r"(^|\s)(-e|--editable)\b", i) for i in installs)
    copied = " ".join(arg for op, arg in instructions() if op == "COPY")
    for needed in ("pyproject.toml", "README.md", "amfs_dist"):  # README: pyproject's readme
        assert needed in copied


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern excludes the paths it matches and everything under them."""
    def regex(p: str) -> str:
        out = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(regex(p.strip("/")), q) for p in patterns for q in prefixes)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for path in [".venv/bin/python", "runs/amfs-1/checkpoint.pt", "sweeps/s1/trial/result.json",
                 "amfs_dist/__pycache__/train.cpython-311.pyc", "tests/__pycache__/x.pyc",
                 ".pytest_cache/v/cache", ".git/HEAD", "amfs_dist.egg-info/PKG-INFO",
                 "stores/omniglot/meta.json", "build/lib/amfs_dist/cli.py",
                 "experiments-out/compare-20260101-000000/cells/a/model.pt",
                 "results/compare/results.md", ".env", "cluster/k8s/.env"]:
        assert ignored(path, patterns), path
    for path in ["pyproject.toml", "README.md", "amfs_dist/train.py",
                 "amfs_dist/data/splits/cub.txt", "amfs_dist/experiments/compare.yaml",
                 "amfs_dist/tuning/tiny-cpu.yaml"]:
        assert not ignored(path, patterns), path


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_one_image_name_in_every_manifest_and_in_the_build_commands():
    found = {}
    for path in sorted((REPO / "cluster" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for image in images(doc):
                found.setdefault(image, []).append(path.name)
    assert set(found) == {IMAGE}, found
    for doc in ("Dockerfile", "cluster/README.md"):
        text = (REPO / doc).read_text()
        assert f"docker build -t {IMAGE} ." in text and f"docker push {IMAGE}" in text, doc


def test_cluster_readme_ray_start_recipe_has_ports_of_its_own_and_token_auth():
    """The `ray start --head` recipe: Ray's fixed default ports clash with any other Ray on the
    machine (the dashboard agent's 52365 breaks `ray job submit`), and a head started by hand
    listens on every interface, so the recipe's default is token authentication."""
    text = (REPO / "cluster" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    (recipe,) = [b for b in blocks if "ray start --head" in b and "ray job submit" in b]
    code = re.sub(r"\\\n", " ", "\n".join(line.split("#")[0] for line in recipe.splitlines()))
    (head,) = [line for line in code.splitlines() if "ray start --head" in line]
    for flag in ("--port=", "--ray-client-server-port=", "--dashboard-port=",
                 "--dashboard-agent-listen-port="):
        assert flag in head, flag
    assert re.search(r"^export RAY_AUTH_MODE=token\b", code, re.M)
    assert "RAY_AUTH_TOKEN=" in code and "RAY_AUTH_MODE=disabled" not in code
    (submit,) = [line for line in code.splitlines() if "ray job submit" in line]
    assert "$DASHBOARD_PORT" in submit
    # before submitting, one line if the head's job-submission agent does not answer
    assert code.index("ray job list") < code.index("ray job submit")
    assert "job-submission agent is not up" in recipe
    assert subprocess.run(["bash", "-n"], input=recipe, text=True).returncode == 0
