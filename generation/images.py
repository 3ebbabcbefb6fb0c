"""Opening an image that came from outside: the one place untrusted bytes become pixels.

    image, stored_size = decode_untrusted(data, max_pixels=4_194_304)            # an init image
    image, stored_size = decode_untrusted(data, max_pixels, draft_size=512)      # an imported photo

Only PNG, JPEG and WebP are opened: Pillow would otherwise try every format it knows, EPS
(which runs Ghostscript), TIFF, ICO, PCX and more, each one more decoder exposed to whoever sent
the bytes. The pixel count is read from the header and checked before any pixel is decoded, so
a few kilobytes that claim 13000x13000 never inflate to a gigabyte. Every refusal is an
`ImageRefused` whose message is one sentence about the image, never the decoder's own text.

The init image of the service (`generation.jobs`) and every picture `dataset import` reads
(`training.importer`) go through here. Floor: part of generation/, imports only PIL; the bot may
import it, as it never pulls in torch.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
ACCEPTED_NAMES = "PNG, JPEG or WebP"


class ImageRefused(ValueError):
    """Bytes that will not be decoded; `message` says why, in words for the person who sent them."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def decode_untrusted(data: bytes, max_pixels: int,
                     draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and its size as stored, or ImageRefused.

    With `draft_size`, a JPEG decodes at the smallest of 1/2, 1/4 or 1/8 scale that keeps both
    sides at least that big (free in the decoder), and the pixel cap applies to what is decoded.
    """
    with warnings.catch_warnings():
        # Pillow's own bomb warning starts at ~90 MP; the cap below is this project's instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            stored_size = image.size
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused(f"{stored_size[0]}x{stored_size[1]}: at most {max_pixels} pixels are accepted")
            image.load()
        except UnidentifiedImageError:
            raise ImageRefused(f"not an image in an accepted format ({ACCEPTED_NAMES})") from None
        except Image.DecompressionBombError:
            # Past twice Pillow's own limit, refused by Image.open from the header alone.
            raise ImageRefused(f"too large: at most {max_pixels} pixels are accepted") from None
        except ImageRefused:
            raise
        except (OSError, SyntaxError, ValueError, EOFError):
            # Pillow reports a damaged file with any of these, depending on the codec and the stage.
            raise ImageRefused("damaged or truncated") from None
    return image, stored_size
