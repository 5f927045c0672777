"""Content-Type by file extension: Python's built-in table plus common media types."""

from __future__ import annotations

import mimetypes
from typing import Final
from urllib.parse import quote

DEFAULT_TYPE: Final = "application/octet-stream"

# Built-in defaults only: the host's /etc/mime.types must not change what we serve.
_TYPES: Final[dict[str, str]] = dict(mimetypes.MimeTypes().types_map[True])
_TYPES.update(
    {
        ".avif": "image/avif",
        ".heic": "image/heic",
        ".webp": "image/webp",
        ".svg": "image/svg+xml",
        ".m4v": "video/x-m4v",
        ".mkv": "video/x-matroska",
        ".mp4": "video/mp4",
        ".ogv": "video/ogg",
        ".ts": "video/mp2t",
        ".webm": "video/webm",
        ".mov": "video/quicktime",
        ".flac": "audio/flac",
        ".m4a": "audio/mp4",
        ".mp3": "audio/mpeg",
        ".oga": "audio/ogg",
        ".ogg": "audio/ogg",
        ".opus": "audio/opus",
        ".wav": "audio/wav",
        ".m3u8": "application/vnd.apple.mpegurl",
        ".mpd": "application/dash+xml",
        ".vtt": "text/vtt",
        ".srt": "application/x-subrip",
        ".woff2": "font/woff2",
    }
)


def guess_type(key: str) -> str:
    """Return the media type for the key's extension, or application/octet-stream."""
    dot = key.rfind(".")
    if dot <= key.rfind("/"):
        return DEFAULT_TYPE
    return _TYPES.get(key[dot:].lower(), DEFAULT_TYPE)


def content_disposition(filename: str, disposition: str = "inline") -> str:
    """RFC 6266: an ASCII `filename` fallback plus `filename*` in UTF-8 (RFC 8187)."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%' else "_" for c in filename)
    encoded = quote(filename, safe="!#$&+-.^_`|~")  # RFC 8187 attr-char
    return f"{disposition}; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{encoded}"
