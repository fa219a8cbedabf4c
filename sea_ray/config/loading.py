"""Reading a job config: YAML plus dotted overrides, preset expansion, one validation pass.

:func:`load_config` reads YAML, applies dotted overrides (``optim.lr=1e-4``) and calls
:func:`validate`, which expands a model preset, validates types and ranges with pydantic (the
classes of :mod:`sea_ray.config.schema`), then checks the rules across fields
(:mod:`sea_ray.config.rules`, and the search rules here, which validate each end of a search
range), and raises one :class:`~sea_ray.errors.ConfigError` that lists every problem (unknown keys
come with a did-you-mean). Also here: dotted keys (:func:`get_dotted`, :func:`set_dotted`,
:func:`flatten_dotted`), and the walk over path fields (:func:`path_fields`, :func:`map_paths`).
Nothing here touches Ray or a GPU.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from sea_ray.config.rules import TUNE_FIXED_SECTIONS, TUNE_MODES, cross_field_problems
from sea_ray.config.schema import JOBS, TUNE_METRICS, TuneConfig
from sea_ray.errors import ConfigError
from sea_ray.presets import PRESETS, get_preset


# --------------------------------------------------------------------------- dotted keys


def get_dotted(raw: dict, key: str, default: Any = None) -> Any:
    """``raw["a"]["b"]["c"]`` for ``key="a.b.c"``; ``default`` when a part is missing or the way
    passes a value that is not a mapping."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """``raw["a"]["b"]["c"] = value`` for ``key="a.b.c"``, in place (``value`` itself, not a
    copy); a part on the way that is missing or not a mapping becomes an empty mapping.
    Returns ``raw``."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return raw


def flatten_dotted(raw: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of nested mappings by its dotted key: ``{"a": {"b": 1, "c": {}}, "d": 2}`` ->
    ``{"a.b": 1, "d": 2}`` (an empty mapping has no leaf; a key may itself hold dots)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dotted(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (['a','b','c'], VALUE parsed as YAML so numbers, bools and lists work)."""
    if "=" not in item:
        raise ConfigError([f"override {item!r} is not of the form dotted.key=value"])
    key, _, raw = item.partition("=")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r} has an empty key"])
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        set_dotted(out, ".".join(path), value)
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PRESET_FILE_SUFFIXES = (".yaml", ".yml")


def is_preset_file(name: Any) -> bool:
    """A user preset: ``model: {preset: path/to/model.yaml}`` names a YAML file holding a model
    block (which may itself name a built-in preset), not a built-in preset's name."""
    return isinstance(name, str) and name.endswith(PRESET_FILE_SUFFIXES)


def anchor_preset_files(raw: Any, base_dir: Path) -> Any:
    """Relative preset files of a YAML file's config made absolute against the folder of that file
    (as a pipeline's recipes are found next to the pipeline file); values given on the command
    line stay relative to the working directory, like every other path."""
    if isinstance(raw, list):
        return [anchor_preset_files(v, base_dir) for v in raw]
    if not isinstance(raw, dict):
        return raw
    out = {k: anchor_preset_files(v, base_dir) for k, v in raw.items()}
    model = out.get("model")
    if isinstance(model, dict) and is_preset_file(model.get("preset")) and not Path(model["preset"]).is_absolute():
        out["model"] = dict(model, preset=str((base_dir / model["preset"]).resolve()))
    for key, value in list(out.items()):  # dotted keys of `set` sections and overrides
        if key.endswith("model.preset") and is_preset_file(value) and not Path(value).is_absolute():
            out[key] = str((base_dir / value).resolve())
    return out


def _read_preset_file(path: str, loc: str, problems: list[str]) -> Optional[dict]:
    try:
        block = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        problems.append(f"{loc}.preset: preset file not found: {path}")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"{loc}.preset: {path} is not valid YAML: {exc}")
        return None
    if isinstance(block, dict) and set(block) == {"model"}:  # a file that spells the section's name
        block = block["model"]
    if not isinstance(block, dict):
        problems.append(f"{loc}.preset: {path} must hold a model block (vision, adapter, llm)")
        return None
    if is_preset_file(block.get("preset")):
        problems.append(f"{loc}.preset: {path} names another preset file; a preset file may name a built-in "
                        "preset only")
        return None
    return block


def _expand_presets(raw: Any, problems: list[str], where: str = "") -> Any:
    """Replace every ``model: {preset: X, ...}`` by the preset merged with the keys beside it. ``X``
    is a built-in preset's name or a YAML file of a model block (which may name a built-in preset
    itself): built-in <- file <- the config's own keys."""
    if not isinstance(raw, dict):
        return raw
    out = {}
    for key, value in raw.items():
        loc = f"{where}.{key}" if where else key
        if key == "model" and isinstance(value, dict) and value.get("preset"):
            name, own = value["preset"], value
            if is_preset_file(name):
                block = _read_preset_file(name, loc, problems)
                if block is None:
                    out[key] = {k: v for k, v in value.items() if k != "preset"}
                    continue
                own = _deep_merge({k: v for k, v in block.items() if k != "preset"}, value)
                name = block.get("preset")
                if not name:
                    out[key] = own
                    continue
            if name not in PRESETS:
                close = difflib.get_close_matches(str(name), PRESETS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{loc}.preset: unknown preset {name!r}{hint}; valid: {', '.join(sorted(PRESETS))} "
                                "or a YAML file of a model block (model.yaml)")
                out[key] = {k: v for k, v in own.items() if k != "preset"}
            else:
                out[key] = _deep_merge(get_preset(name), own)
        else:
            out[key] = _expand_presets(value, problems, loc)
    return out


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section reached by following ``loc`` from ``cls``."""
    node: Any = cls
    for part in loc:
        if isinstance(part, int) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(part)
        if field is None:
            return []
        node = field.annotation
        args = getattr(node, "__args__", ())  # Optional[Section]
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            node = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _format_error(cls: type[BaseModel], err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc[:-1]), n=1)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"{dotted}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{dotted}: required"
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def _drop(raw: dict, loc: tuple) -> None:
    node: Any = raw
    for part in loc[:-1]:
        if not isinstance(node, (dict, list)):
            return
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)


def validate(raw: dict, job: Optional[str] = None, source: Optional[str] = None):
    """Validate a raw config dict; return the typed config or raise ConfigError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping, got {type(raw).__name__}"], source)
    job = job or raw.get("job")
    if job not in JOBS:
        raise ConfigError([f"job: must be one of {', '.join(JOBS)} (got {job!r})"], source)
    cls = JOBS[job]
    raw = _expand_presets(dict(raw, job=job), problems)
    cfg = None
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems.extend(_format_error(cls, e) for e in errors)
        # Drop the bad fields and validate again, so the cross-field rules still run on the rest.
        partial = copy.deepcopy(raw)
        for e in errors:
            if e["type"] != "missing":
                _drop(partial, tuple(e["loc"]))
        try:
            cfg = cls.model_validate(partial)
        except ValidationError:
            cfg = None
    if cfg is not None:
        problems.extend(cross_field_problems(cfg))
        if isinstance(cfg, TuneConfig):
            problems.extend(_tune_problems(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, job: Optional[str] = None):
    """Read YAML, apply dotted overrides, validate. Raises ConfigError (never a bare exception)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping, got {type(raw).__name__}"], str(path))
    raw = apply_overrides(anchor_preset_files(raw, path.resolve().parent), overrides or [])
    if job is not None and raw.get("job") not in (None, job):
        raise ConfigError([f"job: this command runs {job!r} but the config says {raw.get('job')!r}"], str(path))
    return validate(raw, job=job, source=str(path))


def to_dict(cfg: BaseModel) -> dict:
    """The resolved config as plain data (what run folders record)."""
    return cfg.model_dump(mode="json")


def path_fields(cfg: BaseModel) -> list[tuple[str, str, str]]:
    """(dotted key, value, role) of every path set in a config, roles as marked on the fields
    (input, output, model, world); list fields give one entry per item (``key.N``), lists of
    sections one per path of each (``key.N.field``)."""
    found: list[tuple[str, str, str]] = []
    map_paths(cfg, lambda key, value, role: found.append((key, value, role)) or value)
    return found


def map_paths(cfg: BaseModel, fn: Callable[[str, str, str], str], prefix: str = "") -> BaseModel:
    """``cfg`` with every path set in it replaced by ``fn(dotted key, value, role)`` (keys and
    roles as :func:`path_fields` gives them); a copy where a value changes, ``cfg`` itself
    otherwise (never changed in place)."""
    update: dict[str, Any] = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            new = map_paths(value, fn, f"{key}.")
        elif isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
            new = [map_paths(item, fn, f"{key}.{i}.") for i, item in enumerate(value)]
        else:
            role = (field.json_schema_extra or {}).get("path") if isinstance(field.json_schema_extra, dict) else None
            if role is None or value is None:
                continue
            if isinstance(value, list):
                new = [fn(f"{key}.{i}", item, role) for i, item in enumerate(value)]
            else:
                new = fn(key, value, role)
        if new is not value and new != value:
            update[name] = new
    return cfg.model_copy(update=update) if update else cfg


# --------------------------------------------------------------------------- search rules


def _tune_problems(cfg: TuneConfig) -> list[str]:
    problems: list[str] = []
    base = cfg.base.model_dump(mode="json")
    for key, dim in cfg.space.items():
        node = get_dotted(base, key, KeyError)
        if node is KeyError or isinstance(node, dict):
            close = difflib.get_close_matches(key, list(flatten_dotted(base)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"space.{key}: not a key of the base align config{hint}")
            continue
        if key.split(".")[0] in TUNE_FIXED_SECTIONS:
            problems.append(f"space.{key}: {', '.join(TUNE_FIXED_SECTIONS)} are fixed for every trial")
            continue
        if dim.type in ("uniform", "loguniform", "randint"):
            if dim.values is not None:
                problems.append(f"space.{key}: {dim.type} takes low and high, not values")
            if dim.low is None or dim.high is None or dim.low >= dim.high:
                problems.append(f"space.{key}: {dim.type} needs low < high")
                continue
            if dim.type == "loguniform" and dim.low <= 0:
                problems.append(f"space.{key}: loguniform needs low > 0")
                continue
            if dim.type == "randint" and not (float(dim.low).is_integer() and float(dim.high).is_integer()):
                problems.append(f"space.{key}: randint needs integer low and high")
                continue
            cast = int if dim.type == "randint" else float
            candidates = [cast(dim.low), cast(dim.high)]
        else:
            if dim.low is not None or dim.high is not None:
                problems.append(f"space.{key}: choice takes values, not low/high")
            if not dim.values:
                problems.append(f"space.{key}: choice needs a non-empty values list")
                continue
            bad = [v for v in dim.values if not isinstance(v, (str, int, float, bool))]
            if bad:
                problems.append(f"space.{key}: choice values must be strings, numbers or booleans (got {bad})")
                continue
            candidates = list(dim.values)
        for value in candidates:  # every end of the range must give a valid align config
            try:
                validate(set_dotted(copy.deepcopy(base), key, value), job="align")
            except ConfigError as exc:
                problems.extend(f"space.{key}={value!r} gives an invalid align config: {p}" for p in exc.problems)
    if cfg.metric not in TUNE_METRICS:
        close = difflib.get_close_matches(cfg.metric, TUNE_METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"metric: unknown metric {cfg.metric!r}{hint}; valid: {', '.join(TUNE_METRICS)}")
    elif cfg.mode != TUNE_MODES.get(cfg.metric, "min"):
        problems.append(f"mode: {cfg.metric} is optimised with mode={TUNE_MODES.get(cfg.metric, 'min')}")
    if cfg.metric == "val_lm_loss" and not cfg.validation.lm_loss:
        problems.append("validation.lm_loss: must be true when metric is val_lm_loss")
    if cfg.metric == "loss_sea" and not cfg.base.sea.enabled:
        problems.append("metric: loss_sea needs base.sea.enabled=true")
    if cfg.validation.labels:
        if not cfg.base.data.val_manifest:
            problems.append("base.data.val_manifest: required with validation.labels (the manifest they label)")
    elif not cfg.base.data.labels:
        problems.append("base.data.labels: required (validation holds out labelled images), or give "
                        "validation.labels")
    if cfg.base.optim.max_steps and cfg.report_every_n_steps > cfg.base.optim.max_steps:
        problems.append(f"report_every_n_steps: {cfg.report_every_n_steps} > base.optim.max_steps "
                        f"{cfg.base.optim.max_steps}: trials would report once, at their end")
    return problems

