"""Head-set presets: JSON files naming (layer, head) pairs plus u and w, shipped or made by a search.

    {"format": "attnlab.softpag-preset/1", "name": ..., "family": "sd3", "model": ..., "heads": "L7:H3,H5; L9:*",
     "u": 0.5, "scale": 3.0, "target": "identity", "joint": "full", "source": ..., "search": {...}}

`load_preset` takes a shipped preset's name (see `list_presets`) or a path to such a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .headsets import HeadSet

FORMAT = "attnlab.softpag-preset/1"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "softpag"
_KEYS = ("heads", "u", "scale", "target", "joint")


def list_presets(family: Optional[str] = None) -> list[str]:
    """Names of the shipped presets (for `family` only, if given)."""
    names = []
    for path in sorted(PRESET_DIR.glob("*.json")):
        if family is None or json.loads(path.read_text()).get("family") == family:
            names.append(path.stem)
    return names


def load_preset(name_or_path: Union[str, Path]) -> dict:
    """The preset as a dict with at least `heads` (validated text), `u` and `scale`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"no SoftPAG preset {str(name_or_path)!r}; shipped presets: {list_presets()} "
                         "(or pass the path of a preset JSON file)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    if "heads" not in data:
        raise ValueError(f"{path}: a preset needs 'heads'")
    HeadSet.parse(data["heads"])
    data.setdefault("u", 1.0)
    data.setdefault("scale", 3.0)
    data.setdefault("name", path.stem)
    return data


def save_preset(path: Union[str, Path], heads, u: float, scale: float, **fields) -> Path:
    """Write a preset file (atomically); `fields` adds family, model, target, joint, source, search, ..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "name": fields.pop("name", path.stem), **{k: fields.pop(k) for k in ("family", "model") if k in fields},
            "heads": str(HeadSet.of(heads)), "u": float(u), "scale": float(scale), **fields}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def preset_options(data: dict) -> dict:
    """The SoftPAG options a preset sets (heads, u, scale, target, joint)."""
    return {k: data[k] for k in _KEYS if k in data}
