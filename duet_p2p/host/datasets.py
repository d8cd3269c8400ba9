"""A host.toml dataset read from disk: npy, safetensors, csv or parquet, never pickle.

Each file is checked before it is parsed: a regular file (symbolic links resolved), no
larger than a cap, and for npy a header whose shape accounts for the file's size exactly,
so a tiny file cannot claim a huge array.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

import numpy as np
import torch

from duet_p2p.errors import ConfigurationError
from duet_p2p.host.config import TENSOR_FORMATS, DatasetSpec, open_regular
from duet_p2p.schema import schema_for_tensor

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MAX_BYTES = 4 * 1024**3
NUMERIC_KINDS = "biuf"
"""numpy dtype kinds that can be hosted: booleans, integers and floats."""
NPY_VERSIONS = ((1, 0), (2, 0), (3, 0))
MIN_PYARROW = (14, 0, 1)
"""Older pyarrow unpickles extension types found in a parquet file."""


def load_dataset(spec: DatasetSpec, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """The data of ``spec``: a torch.Tensor (npy, safetensors) or a pandas.DataFrame."""
    loaders = {"npy": _npy, "safetensors": _safetensors, "csv": _csv, "parquet": _parquet}
    if spec.format not in loaders:
        _fail(spec, "format", f"unknown format {spec.format!r}")
    value = loaders[spec.format](spec, max_bytes)
    if isinstance(value, torch.Tensor):
        try:
            schema_for_tensor(value, spec.columns, spec.identifier, spec.rows_per_identifier)
        except ValueError as exc:
            _fail(spec, "columns", str(exc))
    elif spec.identifier is not None and spec.identifier not in [str(c) for c in value.columns]:
        _fail(spec, "identifier", f"{spec.identifier!r} is not a column of {spec.path}")
    return value


def host_kwargs(spec: DatasetSpec) -> dict[str, Any]:
    """Keyword arguments for ``Owner.host(value, **host_kwargs(spec))``."""
    kwargs: dict[str, Any] = {
        "tags": (spec.name, *spec.tags),
        "description": spec.description,
        "searchable": spec.searchable,
        "public": spec.public,
        "show_metadata": spec.show_metadata,
        "identifier": spec.identifier,
        "rows_per_identifier": spec.rows_per_identifier,
    }
    if spec.format in TENSOR_FORMATS:
        kwargs["columns"] = spec.columns
    return kwargs


def _fail(spec: DatasetSpec, key: str, message: str) -> NoReturn:
    raise ConfigurationError(f"{spec.where}.{key}: {message}")


def _open(spec: DatasetSpec, max_bytes: int) -> BinaryIO:
    """The file, opened once and checked through its descriptor: regular, within the cap."""
    try:
        handle = open_regular(spec.path.resolve())
    except OSError as exc:
        _fail(spec, "path", f"cannot open {spec.path}: {exc.strerror or exc}")
    size = os.fstat(handle.fileno()).st_size
    if size > max_bytes:
        handle.close()
        _fail(spec, "path", f"{spec.path} is {size} bytes, over the cap of {max_bytes}")
    return handle


def _npy(spec: DatasetSpec, max_bytes: int) -> torch.Tensor:
    fmt = np.lib.format
    with _open(spec, max_bytes) as handle:
        try:
            version = fmt.read_magic(handle)
            if version not in NPY_VERSIONS:
                raise ValueError(f"unknown format version {version}")
            # 3.0 differs from 2.0 only in the header's encoding
            old = version == (1, 0)
            read_header = fmt.read_array_header_1_0 if old else fmt.read_array_header_2_0
            shape, _, dtype = read_header(handle)
        except (ValueError, OSError, SyntaxError) as exc:
            _fail(spec, "path", f"{spec.path} is not an .npy array: {exc}")
        if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
            _fail(spec, "path", f"{spec.path} holds {dtype}: only numbers and booleans are hosted")
        expected = handle.tell() + math.prod(shape) * dtype.itemsize
        if expected != os.fstat(handle.fileno()).st_size:
            _fail(spec, "path", f"{spec.path}: its header does not match its size")
        handle.seek(0)
        try:
            array = np.load(handle, allow_pickle=False, mmap_mode=None)
        except (ValueError, OSError) as exc:
            _fail(spec, "path", f"cannot read {spec.path}: {exc}")
    if not isinstance(array, np.ndarray):
        _fail(spec, "path", f"{spec.path} is not a single .npy array")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _safetensors(spec: DatasetSpec, max_bytes: int) -> torch.Tensor:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        _fail(spec, "format", "reading safetensors needs the package: pip install safetensors")
    _open(spec, max_bytes).close()
    try:
        with safe_open(str(spec.path.resolve()), framework="pt") as tensors:
            names = sorted(tensors.keys())
            if spec.tensor is None and len(names) != 1:
                _fail(spec, "tensor", f"{spec.path} holds {len(names)} tensors "
                      f"({', '.join(names[:10])}): set tensor to one of them")  # fmt: skip
            name = names[0] if spec.tensor is None else spec.tensor
            if name not in names:
                _fail(spec, "tensor", f"{spec.path} holds no tensor {name!r}")
            tensor = tensors.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        _fail(spec, "path", f"cannot read {spec.path}: {exc}")
    if tensor.is_complex():
        _fail(spec, "path", f"{spec.path} holds {tensor.dtype}: only numbers and booleans")
    return tensor


def _pandas(spec: DatasetSpec) -> Any:
    try:
        import pandas
    except ImportError:
        _fail(spec, "format", f"reading {spec.format} needs pandas: pip install pandas")
    return pandas


def _csv(spec: DatasetSpec, max_bytes: int) -> pd.DataFrame:
    pandas = _pandas(spec)
    with _open(spec, max_bytes) as handle:
        try:
            return pandas.read_csv(handle)
        except (ValueError, OSError, pandas.errors.ParserError) as exc:
            _fail(spec, "path", f"cannot read {spec.path} as CSV: {exc}")


def _parquet(spec: DatasetSpec, max_bytes: int) -> pd.DataFrame:
    pandas = _pandas(spec)
    try:
        import pyarrow
    except ImportError:
        _fail(spec, "format", "reading parquet needs pyarrow: pip install pyarrow")
    version = tuple(int(p) for p in pyarrow.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_PYARROW:
        _fail(spec, "format", f"pyarrow {pyarrow.__version__} is too old: pip install -U pyarrow")
    with _open(spec, max_bytes) as handle:
        try:
            return pandas.read_parquet(handle, engine="pyarrow")
        except (ValueError, OSError, pyarrow.ArrowException) as exc:
            _fail(spec, "path", f"cannot read {spec.path} as parquet: {exc}")
