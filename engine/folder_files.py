"""Files in the input, output and temp folders as the HTTP API reads and writes them (`/view`, uploads).

Torch-free and HTTP-free: names arrive as strings, problems leave as exceptions the server maps to status
codes (UnsafePathError: 403, FileNotFoundError: 404, FileRequestError: 400). Every name goes through
`resolve_inside`; hidden names (a leading dot, like the queue's database) are never served. Pillow is
imported only by the functions that decode images.
"""
from __future__ import annotations

import io
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from engine.context import RunSettings
from engine.paths import UnsafePathError, resolve_inside

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Content types `/view` shows in the browser; anything else is sent as a download.
INLINE_MEDIA = ("image/", "video/", "audio/")
PREVIEW_ENCODINGS = {"webp": ("WEBP", "image/webp", ".webp"), "jpeg": ("JPEG", "image/jpeg", ".jpg"),
                     "jpg": ("JPEG", "image/jpeg", ".jpg"), "png": ("PNG", "image/png", ".png")}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FileRequestError(ValueError):
    """A request that cannot name a file: missing fields, a bad format, content that is not an image."""


@dataclass(frozen=True)
class FileAnswer:
    """What `/view` sends: a file as it is (`path`), or re-encoded bytes (`content`)."""

    content_type: str
    disposition: str
    filename: str
    path: Path | None = None
    content: bytes | None = None


def folder_file(settings: RunSettings, kind: str, subfolder: str, filename: str) -> Path:
    """The file a `{filename, subfolder, type}` reference names, proven to lie inside its folder."""
    if not filename:
        raise FileRequestError("a file reference needs a filename")
    try:
        folder = settings.folder_for(kind or "output")
    except ValueError as problem:
        raise UnsafePathError(str(problem)) from None
    relative = str(PurePosixPath(subfolder.replace("\\", "/")) / filename) if subfolder else filename
    if any(part.startswith(".") and part not in (".", "..") for part in re.split(r"[\\/]", relative)):
        raise UnsafePathError(f"file name {relative!r} names a hidden file")
    return resolve_inside(folder, relative)


def view(settings: RunSettings, query: dict[str, str]) -> FileAnswer:
    """`GET /view`: the file, or with `preview=webp;90` / `jpeg;80` or `channel=rgb|a` a re-encoded copy."""
    path = folder_file(settings, query.get("type", "output"), query.get("subfolder", ""), query.get("filename", ""))
    if not path.is_file():
        raise FileNotFoundError(f"no file {query.get('filename')!r} in {query.get('type', 'output')}")
    preview, channel = query.get("preview"), query.get("channel", "rgba")
    if preview or channel != "rgba":
        return _reencoded(path, preview, channel)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not content_type.startswith(INLINE_MEDIA) or content_type == "image/svg+xml":
        # Pages and SVGs run scripts with the server's origin: anything but plain media is a download.
        return FileAnswer("application/octet-stream", "attachment", path.name, path=path)
    return FileAnswer(content_type, "inline", path.name, path=path)


def _reencoded(path: Path, preview: str | None, channel: str) -> FileAnswer:
    from PIL import Image
    kind, _, quality_text = (preview or "png").partition(";")
    if kind.lower() not in PREVIEW_ENCODINGS:
        raise FileRequestError(f"preview format must be one of {sorted(PREVIEW_ENCODINGS)}, got {kind!r}")
    if channel not in ("rgb", "a", "rgba"):
        raise FileRequestError(f"channel must be rgb, a or rgba, got {channel!r}")
    try:
        quality = int(quality_text) if quality_text else 90
    except ValueError:
        raise FileRequestError(f"preview quality must be an integer, got {quality_text!r}") from None
    # As ComfyUI: JPEG has no alpha channel, so an alpha preview asked for as JPEG comes as WebP.
    pil_format, content_type, suffix = PREVIEW_ENCODINGS["webp" if channel == "a" and kind.lower() in ("jpeg", "jpg")
                                                         else kind.lower()]
    image = _open_image(path)
    if channel == "a":  # as ComfyUI: the alpha alone, over black
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        image = Image.new("RGBA", image.size)
        image.putalpha(alpha)
    elif channel == "rgb" or pil_format == "JPEG":
        image = image.convert("RGB")
    encoded = io.BytesIO()
    image.save(encoded, pil_format, quality=max(1, min(quality, 100)))
    return FileAnswer(content_type, "inline", path.with_suffix(suffix).name, content=encoded.getvalue())


def _open_image(source: Path | bytes) -> Any:
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as problem:
        what = source.name if isinstance(source, Path) else "the upload"
        raise FileRequestError(f"{what} is not an image Pillow can read ({type(problem).__name__})") from None
    return image


def upload_name(raw: str) -> str:
    """An uploaded file's own name without any folders (`../../x.png` is `x.png`), or FileRequestError."""
    # Some clients (aiohttp among them) percent-encode the multipart file name: `..%2Fx.png` is `../x.png`.
    name = re.split(r"[\\/]", unquote(raw or ""))[-1].strip()
    if not name or name in (".", "..") or name.startswith("."):
        raise FileRequestError(f"upload needs a plain file name, got {raw!r}")
    if _CONTROL.search(name):
        raise FileRequestError(f"upload file name {raw!r} contains control characters")
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise FileRequestError(f"only images may be uploaded ({', '.join(UPLOAD_SUFFIXES)}), got {name!r}")
    return name


def save_upload(settings: RunSettings, fields: dict[str, Any], content: bytes, filename: str,
                mask: bool) -> dict[str, str]:
    """`POST /upload/image` and `/upload/mask` once the multipart body is read: `fields` are its text
    fields. A mask upload writes the mask's alpha channel into a copy of `original_ref`'s image."""
    name = upload_name(filename)
    kind, subfolder = str(fields.get("type") or "input"), str(fields.get("subfolder") or "")
    target = folder_file(settings, kind, subfolder, name)
    if len(content) > MAX_UPLOAD_BYTES:
        raise FileRequestError(f"uploads are limited to {MAX_UPLOAD_BYTES} bytes")
    uploaded = _open_image(content)
    if mask:
        content = _masked_original(settings, fields.get("original_ref"), uploaded)
    overwrite = str(fields.get("overwrite", "")).lower() in ("true", "1")
    target = free_name(target, content, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return {"name": target.name, "subfolder": subfolder, "type": kind}


def _masked_original(settings: RunSettings, original_ref: Any, mask: Any) -> bytes:
    """ComfyUI's mask editor sends the mask as an image whose alpha is the mask: that alpha, resized to the
    original, replaces the original's alpha; the result is a PNG (the only common format with alpha)."""
    from PIL import Image
    try:
        reference = json.loads(original_ref) if isinstance(original_ref, str) else None
    except json.JSONDecodeError:
        reference = None
    if not isinstance(reference, dict) or not isinstance(reference.get("filename"), str):
        raise FileRequestError("a mask upload needs original_ref: JSON {\"filename\", \"subfolder\", \"type\"}")
    original_path = folder_file(settings, str(reference.get("type") or "output"),
                                str(reference.get("subfolder") or ""), reference["filename"])
    if not original_path.is_file():
        raise FileNotFoundError(f"original_ref names no file: {reference['filename']!r}")
    from PIL.PngImagePlugin import PngInfo
    original = _open_image(original_path)
    # As ComfyUI: the copy keeps the original's text chunks, so a masked output still carries its workflow.
    metadata = PngInfo()
    for key, value in (getattr(original, "text", None) or {}).items():
        metadata.add_text(key, value)
    original = original.convert("RGBA")
    alpha = mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L")
    original.putalpha(alpha.resize(original.size, Image.Resampling.LANCZOS))
    encoded = io.BytesIO()
    original.save(encoded, "PNG", pnginfo=metadata)
    return encoded.getvalue()


def free_name(target: Path, content: bytes, overwrite: bool) -> Path:
    """ComfyUI's upload naming: reuse an identical file, else `name (1).png`, `name (2).png`, ..."""
    if overwrite:
        return target
    candidate, counter = target, 1
    while candidate.exists():
        if candidate.read_bytes() == content:
            return candidate
        candidate = target.with_name(f"{target.stem} ({counter}){target.suffix}")
        counter += 1
    return candidate


def encode_preview(image: Any, image_format: str, max_side: int = 512) -> bytes | None:
    """A PIL image as the bytes of a websocket preview frame, shrunk to `max_side`; None for non-images."""
    if not hasattr(image, "save") or not hasattr(image, "thumbnail"):
        return None
    image = image.copy()
    image.thumbnail((max_side, max_side))
    encoded = io.BytesIO()
    (image.convert("RGB") if image_format == "JPEG" else image).save(encoded, image_format, quality=90)
    return encoded.getvalue()


def built_file(root: Path, name: str) -> Path:
    """A file of the built editor (web/dist): never a folder (no listings), never a hidden file."""
    if any(part.startswith(".") for part in name.split("/")):
        raise UnsafePathError(f"{name!r} names a hidden file")
    path = resolve_inside(root, name)
    if not path.is_file():
        raise FileNotFoundError(name)
    return path


def content_type_of(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("font/woff2", ".woff2")
