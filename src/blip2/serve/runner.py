"""What the server's batcher thread runs: the loaded models, each request kind ("group") mapped to the
pipeline method that answers it, one batch at a time (see `blip2.serve.batching` for the batching and
`blip2.serve.app` for the routes that queue the jobs).

A job's group is `(method, options, ...)`: jobs of equal groups run together. The methods are the
routes' (`caption`, `ask`, `match`, `search`), `index` (`GET /search` over the server's index) and the
chat completions' `chat` and `stream` (`/v1/chat/completions`, answered as `Captioner.chat` answers).
"""

from collections.abc import Sequence
from typing import Any

from blip2.errors import UserError
from blip2.pipelines import Captioner, Retriever
from blip2.serve.chat import StopCut, cut


class Models:
    """The loaded models and what each serves (the `methods` of its kind: `Captioner` or `Retriever`),
    and the index searched by `GET /search`; runs a batch of one group (in the batcher's thread).

    Args:
        pipelines: a stage-2 pipeline for caption/ask, a stage-1 one for match/search; either or both.
        index: a `blip2.index.Index` to search, built with one of `pipelines` (another is refused,
            `UserError`).
    """

    def __init__(self, pipelines: Sequence[Any], index: Any = None):
        self.by_method: dict[str, Any] = {}
        for pipe in pipelines:
            for method in pipe.methods:
                self.by_method.setdefault(method, pipe)
        self.index = index
        self.index_retriever: Any = None
        if index is not None:
            retrievers = [p for p in pipelines if isinstance(p, Retriever)]
            if not retrievers:
                raise UserError("searching an index needs the retrieval model it was built with")
            index.check_model(retrievers[0])
            self.index_retriever = retrievers[0]

    def pipe(self, method: str) -> Any:
        """The pipeline serving `method`; `UserError` naming the checkpoint it needs when none does."""
        if method not in self.by_method:
            use = (Captioner if method in Captioner.methods else Retriever).checkpoint_kind
            raise UserError(f"{method} needs {use}: start the server with --model pointing at one")
        return self.by_method[method]

    def prepare(self, group: tuple[Any, ...], payload: Any) -> Any:
        """Check one job on its own before it is batched (a `UserError` fails it alone): a generation
        must fit the LLM's positions after its own prompt; /ask's conversation becomes its prompt here
        (fitted to the pipeline's `max_txt_len` tokens: the tokenizer is this thread's), and so does a
        chat completion's (its question, or the checkpoint's caption prompt when it has none)."""
        method, options = group[0], dict(group[1])
        if method == "caption":
            self.pipe(method).check_generation_length([payload[1]], options)
        elif method in ("ask", "chat", "stream"):
            pipe = self.pipe("ask")
            image, question, turns, *rest = payload
            if question is None:
                prompt = pipe.config.llm.prompt
            else:
                prompt = pipe.conversation_prompt(question, turns)
            pipe.check_generation_length([prompt], options)
            return image, prompt, *rest
        return payload

    def run_group(self, group: tuple[Any, ...], payloads: list[Any]) -> list[Any]:
        """The results of a batch of jobs of `group`, one per payload, in order."""
        method, options = group[0], dict(group[1])
        if method == "index":
            return [self.index.search(self.index_retriever, **p) for p in payloads]
        pipe = self.pipe(method if method not in ("chat", "stream") else "ask")
        if method == "caption":
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "ask":  # (image, prompt): `prepare` made the conversation a prompt
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "chat":  # (image, prompt, stop strings)
            texts = pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
            return [
                self._finished(pipe, p[1], t, p[2], options) for p, t in zip(payloads, texts, strict=True)
            ]
        if method == "stream":  # (image, prompt, stop strings, emit): never batched
            return [self._stream(pipe, *p, options) for p in payloads]
        if method == "match":
            itm, itc = pipe.pair_scores([p[0] for p in payloads], [p[1] for p in payloads])
            return list(zip(itm.tolist(), itc.tolist(), strict=True))
        if method == "search":
            return [pipe.search(images, query, top_k=k, rerank=r) for images, query, k, r in payloads]
        raise UserError(f"unknown method {method}")

    @staticmethod
    def _finished(
        pipe: Any, prompt: str, text: str, stops: list[str], options: dict[str, Any]
    ) -> dict[str, Any]:
        """A chat completion's text cut at its stop strings, why it ended and its token counts (the
        prompt's: the image's query tokens and the prompt's text tokens)."""
        out, stopped = cut(text, stops)
        tok = pipe.llm_tokenizer
        made = len(tok(text, add_special_tokens=False)["input_ids"])
        prompt_tokens = pipe.config.qformer.num_query_tokens + len(tok(prompt)["input_ids"])
        completion_tokens = len(tok(out, add_special_tokens=False)["input_ids"])
        length = not stopped and made >= options.get("max_new_tokens", 0)
        return {
            "text": out,
            "finish_reason": "length" if length else "stop",
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

    def _stream(
        self, pipe: Any, image: Any, prompt: str, stops: list[str], emit: Any, options: dict[str, Any]
    ) -> dict[str, Any]:
        """Stream one completion: each piece of text goes to `emit` as it is generated (cut at the stop
        strings, stripped at both ends, as `_finished` cuts the whole text)."""
        cutter, pieces = StopCut(stops), []
        for piece in pipe.stream(image, prompt, **options):
            pieces.append(piece)
            out = cutter.feed(piece)
            if out:
                emit(out)
        out = cutter.finish()
        if out:
            emit(out)
        done = self._finished(pipe, prompt, "".join(pieces).strip(), stops, options)
        return {**done, "text": cutter.text}
