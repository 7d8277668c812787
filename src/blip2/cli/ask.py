"""`blip2 ask --model M IMAGE QUESTION...`: answer questions about an image (one answer a line).

With `--chat` each question sees the earlier questions and answers; `--stream` prints each answer as it
is generated (greedy or sampling). `--video` (InstructBLIP): IMAGE is a video file, `--frames` of it
sampled uniformly.
"""

from __future__ import annotations

import argparse

from blip2.cli import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(parser)
    parser.add_argument("image", help="the image file (with --video: the video file)")
    parser.add_argument("questions", nargs="+", help="one or more questions")
    parser.add_argument(
        "--chat", action="store_true", help="ask in turn, each question seeing the earlier answers"
    )
    parser.add_argument("--stream", action="store_true", help="print answers as they are generated")
    parser.add_argument("--video", action="store_true", help="IMAGE is a video (InstructBLIP models)")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames read from the video (default: the model's, else 4)"
    )
    options.add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from blip2.errors import UserError
    from blip2.interop.hf import VIDEO_FRAMES
    from blip2.pipelines import InstructCaptioner, Video
    from blip2.processing import load_image

    options.show_notices()
    if args.frames is not None and not args.video:
        raise UserError("--frames is the number of frames read from a video: give --video too")
    generate_options = options.generation_options(args)
    pipe = options.load_pipeline(
        args.model, args.device, args.dtype, method="ask", **options.load_options(args)
    )
    if args.video and not isinstance(pipe, InstructCaptioner):
        raise UserError(f"--video needs {InstructCaptioner.checkpoint_kind}")
    if args.video:  # decoded once for all the questions
        image = Video(Video(args.image, args.frames).frames(pipe.config.video_frames or VIDEO_FRAMES))
    else:
        image = load_image(args.image, args.max_pixels)
    history: list[tuple[str, str]] = []
    for question in args.questions:
        turns = history if args.chat else []
        if args.stream:
            pieces = []
            for piece in pipe.chat(image, question, turns, stream=True, **generate_options):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print()
            answer = "".join(pieces).strip()
        else:
            answer = pipe.chat(image, question, turns, **generate_options)
            print(answer, flush=True)
        history.append((question, answer))
    return 0
