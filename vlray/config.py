"""Typed job configuration: defaults in code < YAML preset < command-line flags.

Every key is reachable from the command line with ``--set section.key=value``; unknown keys and
bad values are collected and reported together, each with the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """One or more configuration problems; ``str()`` lists each on its own line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class S3Config:
    """S3 / S3-compatible storage settings. Empty values fall back to the AWS environment."""

    endpoint_url: str = ""
    region: str = ""
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    anonymous: bool = False
    fetch_concurrency: int = 16
    """Image objects (``s3://`` / path cells) fetched at once per decode actor."""
    max_attempts: int = 10
    """Attempts per S3 request (AWS standard retry: 5xx, throttling, dropped connections)."""
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    check_timeout_s: float = 5.0
    """Deadline of the start-of-job reachability check of ``s3://`` input and output."""
    transient_retry_s: float = 60.0
    """How long a decode actor keeps retrying the rows of a batch that failed transiently (a
    network outage), waiting 2, 4, 8, ... s between rounds; rows still failing after that are
    left undone (not error rows) for the next run, which exits 1."""


@dataclass(frozen=True)
class InputConfig:
    """Where images come from and how rows are read."""

    uri: str = ""
    """Parquet file / folder / glob, or a folder of image files. Empty: the offline demo."""
    image_column: str = "image"
    id_column: str = "id"
    max_pixels: int = 100_000_000
    """Decompression-bomb limit: images whose header declares more pixels are refused undecoded."""
    decode: str = "exact"
    """"exact": full decode, model inputs bit-identical to the reference processor. "draft":
    JPEGs much larger than the model's input are decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain, never below the target size (faster; close to but not equal to the reference:
    measured quality bound in docs/BENCHMARKS.md). "gpu": plain RGB JPEGs (no EXIF rotation)
    are decoded in batches on the encoder's GPU (nvJPEG, through torchvision) and resized there;
    everything else decodes as exact. Needs a GPU, one embedding model and no SAM; not
    bit-identical (a different IDCT and a float resize)."""
    rows_per_block: int = 128
    """Rows per read block; small blocks keep every decode actor busy on small inputs. 128 (the
    default encoder batch) measured 15% faster end to end than 64 on 2 CPUs: each actor batch
    is one block, not two concatenated."""
    rows_per_task: int = 256
    """Rows (Parquet) or files (folders) per read task. A bigger Parquet row group (pyarrow's
    default file is one group) is split into row ranges, so work spreads over the decode actors
    and output is committed as it goes; each range re-reads the group up to its start (Parquet
    has no row seek), so a group is split into fewer ranges when it is very large in bytes."""
    max_bytes: int = 256 << 20
    """Largest image file or object fetched for a path cell or a folder entry (checked from its
    size before reading): bigger ones become error rows."""
    allow_outside_root: bool = False
    """Let relative paths in an image column leave the dataset's folder (``../``), and paths of
    an ``s3://`` dataset name local files; off, such cells are error rows."""
    keep_columns: tuple[str, ...] | None = None
    """Input columns copied into ``embeddings/`` beside each embedding, typed as in the input,
    and returned with query hits (``metadata``). Parquet: column names. WebDataset: ``caption``
    (the sample's ``.txt``) and fields of its ``.json`` object. Unset: a WebDataset's caption
    when its samples have ``.txt`` members, nothing otherwise; ``[]``: nothing. On the command
    line: ``--set input.keep_columns=caption,url``."""


@dataclass(frozen=True)
class ModelConfig:
    """The model: a hub id or a local ``save_pretrained`` folder, or a random-weight architecture."""

    name: str = ""
    weights: str = "pretrained"
    """``pretrained`` (safetensors from ``name``) or ``random`` (architecture from ``arch``)."""
    arch: str = ""
    """Architecture config (config.json of a checkpoint, or a file in configs/arch/) for random weights."""
    processor: dict[str, Any] = field(default_factory=dict)
    """Overrides of the checkpoint's preprocessor_config.json (e.g. max_num_patches)."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    seed: int = 0
    store_tokens: bool = False
    """Also write each image's merged-token matrix to ``tokens/`` (qwen2_vl)."""


@dataclass(frozen=True)
class SamConfig:
    """SAM masks: a second model in the same pass (``name``), or the main model when it is SAM."""

    name: str = ""
    """A SAM checkpoint beside an embedding model (one pass, two models); empty: no masks."""
    weights: str = "pretrained"
    arch: str = ""
    processor: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    mode: str = "auto"
    """``auto`` (prompted when a row has points or boxes, else automatic), ``automatic``, ``prompted``."""
    points_column: str = "points"
    labels_column: str = "labels"
    boxes_column: str = "boxes"
    multimask_output: bool = True
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    mask_threshold: float = 0.0
    batch_size: int = 4
    """Images per SAM actor batch (the image encoder runs once per same-shape group)."""


@dataclass(frozen=True)
class RegionsConfig:
    """Region search: SAM's masks of each image embedded by the embedding model (needs both
    ``model.name`` and ``sam.name``). See ``vlray.regions``."""

    enabled: bool = False
    max_per_image: int = 16
    """Regions per image at most, best predicted IoU first."""
    min_area: float = 0.01
    """Masks covering less than this fraction of the image are skipped."""
    context: float = 0.1
    """The crop is the mask's box grown by this fraction of the box's size on each side."""
    background: str = "keep"
    """``keep`` the pixels around the mask, or ``gray``: set them to the processor's mean."""


@dataclass(frozen=True)
class ComputeConfig:
    """Ray resources and batch sizes (all mapped to Ray in ``vlray.pipeline.resources``)."""

    decode_actors: int = 0
    """CPU decode actors (0: one per CPU left after the encoders)."""
    decode_batch_size: int = 32
    encode_actors: int = 1
    encode_batch_size: int = 128
    max_group_size: int = 256
    """Largest same-shape group run through the encoder in one forward."""
    num_gpus: float = -1
    """GPUs per encoder actor (-1: 1 when the cluster has GPUs, else 0)."""
    num_cpus: int = 0
    """CPUs of a local Ray started for the run (0: all)."""
    torch_threads: int = 0
    """Intra-op threads of the encoder on CPU (0: the CPUs reserved for it)."""
    fuse: str = "auto"
    """Decode and encode in the same actors: "on", "off", or "auto" (on when the encoder runs
    on CPU: both stages share the same cores, and a separate encoder only adds a hop)."""


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    uri: str = "vlray-output"
    rows_per_file: int = 2048
    dtype: str = "float32"
    thumbnails: int = 256
    """Longest side of a JPEG preview per image in ``thumbnails/<sha1(id)>.jpg`` (0: none; the
    query service shows them); images already smaller keep their size. Off by default with
    ``input.decode: gpu`` (the images are decoded on the GPU). Cost: bench/thumbnails.py."""
    max_error_fraction: float = 0.5
    """Error budget: the run stops with exit 1 once more than this fraction of the rows seen
    are error rows (checked from ``error_budget_min_rows`` rows on). 1.0: never."""
    error_budget_min_rows: int = 100


@dataclass(frozen=True)
class IndexConfig:
    """FAISS index choice."""

    enabled: bool = True
    factory: str = ""
    """FAISS factory string; empty: chosen from the row count and the memory budget."""
    memory_budget_gb: float = 4.0
    flat_max: int = 200_000


@dataclass(frozen=True)
class JobConfig:
    """The whole job."""

    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    s3: S3Config = field(default_factory=S3Config)
    demo: bool = False
    """Run on bundled sample images with a random-weight model (no download)."""
    retry_errors: bool = False
    """Process again the rows in ``errors/``; their old error rows are removed when redone."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    """Converts a YAML or string value to ``typ``; appends a problem and returns None on failure."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return _build(typ, value, where, problems)
    origin = typing.get_origin(typ)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or len(arms) != 1:
            return value
        return _coerce(value, arms[0], where, problems)
    if origin in (tuple, list):
        return _names(value, where, problems)
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        problems.append(f"{where}: expected true/false, got {value!r}")
        return None
    if typ in (int, float):
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return None
        try:
            number = typ(value) if typ is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            problems.append(f"{where}: expected {typ.__name__}, got {value!r}")
            return None
        return number
    if typ is str:
        return "" if value is None else str(value)
    return value


def _names(value: Any, where: str, problems: list[str]) -> tuple[str, ...] | None:
    """A list of names from YAML (a list) or a flag (``a,b`` or ``[a, b]``)."""
    if isinstance(value, str):
        text = value.strip()
        value = yaml.safe_load(text) if text.startswith("[") else text.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where}: expected a list of names, got {value!r}")
        return None
    return tuple(v.strip() for v in value if v.strip())


def _build(cls: type, values: Mapping[str, Any], where: str, problems: list[str]) -> Any:
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            known = ", ".join(sorted(hints))
            problems.append(f"{path}: unknown key (known here: {known})")
            continue
        coerced = _coerce(value, hints[key], path, problems)
        if coerced is not None:
            kwargs[key] = coerced
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"--set {dotted}: {part} is not a section"])
    node[parts[-1]] = value


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=x"]`` into a nested mapping (values stay strings unless YAML maps)."""
    tree: dict[str, Any] = {}
    problems = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected dotted.key=value")
            continue
        parsed: Any = value
        if value.strip().startswith("{"):
            parsed = yaml.safe_load(value)
        _set_dotted(tree, key.strip(), parsed)
    if problems:
        raise ConfigError(problems)
    return tree


def configs_dir() -> Path:
    """The folder of the presets (``*.yaml``) and architecture configs (``arch/<name>/``).

    The repo's top-level ``configs/`` installs as the package ``vlray.configs`` (pyproject.toml),
    found here for a wheel and an editable install alike; a source tree that is not installed
    (``python jobs/embed.py`` from a checkout) has no such package and uses its ``configs/``.
    """
    from importlib.resources import files

    try:
        return Path(str(files("vlray.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


def _preset_path(path: Path) -> Path:
    """``path`` itself when it is a file; else, for ``NAME[.yaml]`` or ``configs/NAME[.yaml]``,
    the preset shipped with vlray (so an installed vlray runs its presets from any folder)."""
    if path.is_file() or path.is_absolute() or len(path.parts) > 2:
        return path
    if len(path.parts) == 2 and path.parts[0] != "configs":
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    bundled = configs_dir() / name
    return bundled if bundled.is_file() else path


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML preset into a mapping; a missing or malformed file raises ConfigError.

    ``path`` is a file, or the name of a preset shipped with vlray (``siglip2-base-naflex``,
    ``configs/siglip2-base-naflex.yaml``) when no such file is in the current folder.
    """
    path = _preset_path(Path(path))
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in configs_dir().glob("*.yaml")))
        raise ConfigError(
            [f"--config {path}: no such file (presets shipped with vlray: {presets})"]
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"--config {path}: not valid YAML ({exc})".replace("\n", " ")]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: the top level must be a mapping"])
    return data


PROCESSOR_KEYS = frozenset(
    {
        "size", "crop_size", "patch_size", "max_num_patches", "min_pixels", "max_pixels",
        "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample",
        "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_center_crop",
        "do_pad", "pad_size", "do_convert_rgb", "pooling",
    }
)  # fmt: skip
"""Keys ``model.processor`` / ``sam.processor`` may override (preprocessor_config.json keys the
families read): anything else is a typo that would be ignored."""


def _region_problems(config: JobConfig) -> list[str]:
    regions, problems = config.regions, []
    if regions.background not in ("keep", "gray"):
        problems.append(f"regions.background: {regions.background!r} is not keep or gray")
    if regions.max_per_image < 1:
        problems.append("regions.max_per_image: must be >= 1")
    if not 0.0 <= regions.min_area <= 1.0:
        problems.append(f"regions.min_area: {regions.min_area} is not in [0, 1]")
    if not 0.0 <= regions.context <= 10.0:
        problems.append(f"regions.context: {regions.context} is not in [0, 10]")
    if regions.enabled and config.input.decode != "exact":
        problems.append("regions.enabled: crops need input.decode exact (the full frame)")
    if regions.enabled and not config.sam.name:
        problems.append("regions.enabled: needs sam.name (a SAM checkpoint beside the model)")
    return problems


def _validate(config: JobConfig) -> list[str]:
    problems = []
    for section in ("model", "sam"):
        for key in getattr(config, section).processor:
            if key not in PROCESSOR_KEYS:
                close = difflib.get_close_matches(key, PROCESSOR_KEYS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                problems.append(
                    f"{section}.processor.{key}: unknown key ({hint}known: "
                    + ", ".join(sorted(PROCESSOR_KEYS))
                    + ")"
                )
    if config.model.weights not in ("pretrained", "random"):
        problems.append(f"model.weights: {config.model.weights!r} is not 'pretrained' or 'random'")
    if config.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"model.dtype: {config.model.dtype!r} is not auto/float32/bfloat16/float16")
    if config.sam.mode not in ("auto", "automatic", "prompted"):
        problems.append(f"sam.mode: {config.sam.mode!r} is not auto/automatic/prompted")
    if config.sam.weights not in ("pretrained", "random"):
        problems.append(f"sam.weights: {config.sam.weights!r} is not 'pretrained' or 'random'")
    problems += _region_problems(config)
    if config.input.decode not in ("exact", "draft", "gpu"):
        problems.append(f"input.decode: {config.input.decode!r} is not exact, draft or gpu")
    if config.input.decode == "gpu" and config.output.thumbnails:
        problems.append(
            "input.decode: gpu decodes on the encoder's GPU, and thumbnails are made by the "
            "CPU decode: use output.thumbnails 0 or input.decode exact"
        )
    if config.compute.fuse not in ("auto", "on", "off"):
        problems.append(f"compute.fuse: {config.compute.fuse!r} is not auto/on/off")
    if config.output.dtype not in ("float32", "float16"):
        problems.append(f"output.dtype: {config.output.dtype!r} is not float32 or float16")
    if not 0 < config.output.max_error_fraction <= 1:
        problems.append(
            f"output.max_error_fraction: {config.output.max_error_fraction} is not in (0, 1]"
        )
    if not 0 <= config.output.thumbnails <= 4096:
        problems.append(f"output.thumbnails: {config.output.thumbnails} is not 0 (off) to 4096")
    for section, name in (
        ("compute", "decode_batch_size"),
        ("compute", "encode_batch_size"),
        ("compute", "encode_actors"),
        ("compute", "max_group_size"),
        ("output", "rows_per_file"),
        ("input", "max_pixels"),
        ("input", "rows_per_block"),
        ("input", "rows_per_task"),
        ("input", "max_bytes"),
    ):
        if getattr(getattr(config, section), name) < 1:
            problems.append(f"{section}.{name}: must be >= 1")
    if not config.demo and not config.input.uri:
        problems.append(
            "input.uri: no input given (use --input PATH, or run with no flags for the demo)"
        )
    if not config.demo and not config.model.name and not config.model.arch:
        problems.append("model.name: no model given (use --model HUB_ID_OR_FOLDER)")
    return problems


def build_config(
    yaml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> JobConfig:
    """Builds the job config: typed defaults, then the YAML preset, then overrides (flags).

    Raises:
        ConfigError: listing every problem found, not just the first.
    """
    tree: dict[str, Any] = {}
    if yaml_path is not None:
        tree = load_yaml(yaml_path)
    if overrides:
        tree = _merge(tree, overrides)
    problems: list[str] = []
    config = _build(JobConfig, tree, "", problems)
    if config.input.decode == "gpu" and "thumbnails" not in (tree.get("output") or {}):
        config = dataclasses.replace(
            config, output=dataclasses.replace(config.output, thumbnails=0)
        )
    problems += _validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def to_dict(config: JobConfig, redact: bool = True) -> dict[str, Any]:
    """The config as plain data, with secrets removed (for summaries and manifests)."""
    data = dataclasses.asdict(config)
    if redact:
        for key in ("key", "secret"):
            if data["s3"].get(key):
                data["s3"][key] = "***"
    return data
