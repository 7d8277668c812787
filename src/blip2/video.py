"""Video files -> frames: decoded with PyAV (FFmpeg), a few frames sampled uniformly over the video.

InstructBLIP's video model (transformers' `InstructBlipVideoForConditionalGeneration`) reads a clip as a
handful of frames (4 in the released configuration): each goes through the image side alone and their
query outputs are laid end to end as the soft prompt. `read_frames` gives those frames: the video cut
into equal segments, the middle frame of each kept.
"""

from __future__ import annotations

import io
import os
from typing import Any

from blip2.errors import UserError


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise UserError("reading video files needs PyAV: pip install 'blip2[video]'") from None
    return av


def frame_indices(total: int, num_frames: int) -> list[int]:
    """The middle frame of each of `num_frames` equal segments of `total` frames (a short video gives
    some frames more than once, so that every clip has `num_frames`)."""
    if num_frames < 1:
        raise UserError(f"num_frames must be at least 1, not {num_frames}")
    return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]


def read_frames(video: str | os.PathLike[str] | bytes, num_frames: int = 4) -> list[Any]:
    """`num_frames` RGB frames (PIL images) sampled uniformly from a video file or its bytes.

    Raises:
        UserError: the file is missing, is not a video PyAV can decode, or has no frames; PyAV is
            not installed.
    """
    av = _av()
    name = "the uploaded video" if isinstance(video, bytes) else str(video)
    if not isinstance(video, bytes) and not os.path.isfile(video):
        raise UserError(f"video file not found: {video}")

    def open_video() -> Any:
        return av.open(io.BytesIO(video) if isinstance(video, bytes) else str(video))

    try:
        with open_video() as container:
            if not container.streams.video:
                raise UserError(f"{name} has no video stream: pass a video file (mp4, webm, avi, ...)")
            total = container.streams.video[0].frames  # 0 when the container does not say
        if total <= 0:  # count by decoding
            with open_video() as container:
                total = sum(1 for _ in container.decode(video=0))
        if total == 0:
            raise UserError(f"{name} has no frames")
        wanted = frame_indices(total, num_frames)
        picked: dict[int, Any] = {}
        with open_video() as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    picked[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1]:
                    break
    except av.FFmpegError as e:
        raise UserError(f"cannot decode {name} ({e.strerror or e}): pass a video file FFmpeg reads") from None
    if len(picked) < len(set(wanted)):  # fewer frames than the container announced
        if not picked:
            raise UserError(f"{name} has no decodable frames")
        last = picked[max(picked)]
        return [picked.get(i, last) for i in wanted]
    return [picked[i] for i in wanted]
