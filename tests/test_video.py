"""Video files: frames sampled uniformly with PyAV; unreadable input gets one sentence."""

from __future__ import annotations

import pytest
from PIL import Image

from blip2.errors import UserError
from blip2.video import frame_indices, read_frames

av = pytest.importorskip("av")

COLORS = [
    (250, 0, 0),
    (0, 250, 0),
    (0, 0, 250),
    (250, 250, 0),
    (0, 250, 250),
    (250, 0, 250),
    (250, 250, 250),
    (0, 0, 0),
]


def write_video(path, colors, per_color: int = 3) -> None:
    """A 32x32 mpeg4 video: `per_color` frames of each color in turn."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for color in colors:
            for _ in range(per_color):
                frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), color))
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def nearest(image) -> tuple[int, int, int]:
    pixel = image.getpixel((16, 16))
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, pixel, strict=True)))


def test_frame_indices_take_the_middle_of_equal_segments():
    assert frame_indices(24, 4) == [3, 9, 15, 21]
    assert frame_indices(2, 4) == [0, 0, 1, 1]
    assert frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(UserError, match="at least 1"):
        frame_indices(10, 0)


def test_read_frames_samples_uniformly_from_a_file_and_from_bytes(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, COLORS, per_color=3)  # 24 frames, 8 colors
    frames = read_frames(path, num_frames=4)  # frames 3, 9, 15, 21 -> colors 1, 3, 5, 7
    assert [f.size for f in frames] == [(32, 32)] * 4
    assert [nearest(f) for f in frames] == [COLORS[1], COLORS[3], COLORS[5], COLORS[7]]
    again = read_frames(path.read_bytes(), num_frames=4)
    assert [nearest(f) for f in again] == [nearest(f) for f in frames]
    short = tmp_path / "short.mp4"
    write_video(short, COLORS[:2], per_color=1)
    assert [nearest(f) for f in read_frames(short, num_frames=4)] == [
        COLORS[0],
        COLORS[0],
        COLORS[1],
        COLORS[1],
    ]


def test_unreadable_videos_get_one_sentence(tmp_path):
    with pytest.raises(UserError, match="video file not found"):
        read_frames(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(UserError, match="cannot decode .*junk.mp4"):
        read_frames(junk)
    with pytest.raises(UserError, match="cannot decode the uploaded video"):
        read_frames(b"\x00\x01garbage")
    image = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(image)
    frames = read_frames(image, num_frames=2)  # a still image is a one-frame video to FFmpeg
    assert len(frames) == 2
