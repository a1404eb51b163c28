"""Small file helpers: atomic writes, so a killed process never leaves half a file behind, a check of a
safetensors file that reads its header only (nothing is loaded or unpickled), and the earlier run a folder
holds (what a new run there would mix with or replace)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1))


def earlier_run(folder: str | Path, names: tuple[str, ...]) -> list[str]:
    """Which of a run's ``names`` (files or folders) ``folder`` holds: empty where no run has started."""
    folder = Path(folder)
    return [name for name in names if (folder / name).exists()]


def remove_earlier_run(folder: str | Path, names: tuple[str, ...]) -> list[str]:
    """Remove the run's ``names`` that ``folder`` holds (an explicit overwrite); returns what was removed."""
    removed = earlier_run(folder, names)
    for name in removed:
        path = Path(folder) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed


def append_csv_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` to a CSV log: a new file takes the row's sorted numeric keys as its header; an
    existing one keeps its header (keys it lacks are dropped, missing ones left empty)."""
    path = Path(path)
    keys = sorted(k for k in row if isinstance(row[k], int | float))
    new = not path.exists()
    if not new:
        with open(path) as f:
            keys = f.readline().strip().split(",")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(keys)
        w.writerow([row.get(k, "") for k in keys])


_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when it is.

    Reads the 8-byte header length and the JSON header only (no tensor is loaded): the header must parse,
    name each tensor's dtype, shape and byte range, and the ranges must tile the data exactly up to the end
    of the file, so a truncated or padded file, or garbage, is caught. Bit flips inside tensor data are not.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"{path.name} is truncated or not safetensors ({n}-byte header, {size}-byte file)"
            raw = fh.read(n)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{path.name} has a garbled header (not safetensors JSON)"
    if not isinstance(header, dict):
        return f"{path.name} has a garbled header (not a JSON object)"
    ranges: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                return f"{path.name} has garbled metadata"
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
            ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            return f"{path.name}: tensor {name!r} has a garbled entry"
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            return f"{path.name}: tensor {name!r} spans {end - begin} bytes, its shape needs another size"
        ranges.append((begin, end))
    data = size - 8 - n
    pos = 0
    for begin, end in sorted(ranges):
        if begin != pos:
            return f"{path.name}: tensor data has a gap or overlap at byte {begin}"
        pos = end
    if pos != data:
        return f"{path.name} is truncated or padded (tensors need {pos} data bytes, the file holds {data})"
    return None
