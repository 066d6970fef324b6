"""palmcore.pipeline: the Hugging Face pipeline call shape over a palmcore model, so that

    generator = palmcore.pipeline("text-generation", model="runs/default")
    print(generator("The quick brown fox", max_length=50))

runs as the seed article's transformers example does. Only the "text-generation" task exists.
"""

from __future__ import annotations

from palmcore.text import generate, resolve_model


class TextGenerationPipeline:
    """A callable over one model and tokenizer; see __call__."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, text_inputs, *, max_length: int | None = None, max_new_tokens: int | None = None,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, return_full_text: bool = True,
                 seed: int = 0):
        """[{"generated_text": ...}] per sequence (a list of such lists for a list of inputs),
        with transformers' meanings and defaults: ``max_length`` counts the prompt's tokens and
        the new ones (default 20 in all, as transformers' generation config), ``max_new_tokens``
        only the new ones (it wins when both are given); ``do_sample=False`` is greedy;
        ``return_full_text`` puts the prompt in front. Sampling follows PALM_SPEC "Sampling" with
        this seed (sequence j of an input draws as row j)."""
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text_inputs must be a string or a non-empty list of strings")
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
        if not do_sample and num_return_sequences > 1:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding gives one sequence)")
        outputs = []
        for text in texts:
            if max_new_tokens is not None:
                new = max_new_tokens
            else:
                new = (20 if max_length is None else max_length) - len(self.tokenizer.encode(text))
                if new < 0:
                    raise ValueError(f"max_length ({max_length}) is shorter than the prompt "
                                     f"({len(self.tokenizer.encode(text))} tokens)")
            continuations = generate((self.model, self.tokenizer), [text] * num_return_sequences, max_new_tokens=new,
                                     temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty, seed=seed)
            outputs.append([{"generated_text": (text if return_full_text else "") + c} for c in continuations])
        return outputs[0] if single else outputs


def pipeline(task: str, model, *, device: str = "cpu", precision: str = "fp32") -> TextGenerationPipeline:
    """A "text-generation" pipeline over ``model``: a run folder or checkpoint, a palmcore.train
    result or a (model, tokenizer) pair (a path is loaded on ``device`` in ``precision``)."""
    if task != "text-generation":
        raise ValueError(f"unknown task {task!r}: palmcore.pipeline has 'text-generation'")
    return TextGenerationPipeline(*resolve_model(model, device, precision))
