"""Training examples that teach a policy to write questions, so that it can imagine new ones.

The SFT loss covers solutions only, so a policy trained from scratch on D0 (the built-in demo) has never
learnt to produce question text and cannot synthesize prompts. These extra examples put the loss on the
question itself: the prompt is BOS plus the question prefix ("Question:"), the response the rest of the
plain prompt (" {question}\\nAnswer:"), so the model learns `Question: -> new question -> \\nAnswer:`,
which unconditional sampling (and the few-shot variation prompt) relies on. Pretrained LLMs need none.
"""

from __future__ import annotations

from collections.abc import Sequence

from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import QUESTION_PREFIX, plain_prompt
from alphallm_jax.train.batching import SFTExample


def question_lm_examples(problems: Sequence[Problem], tokenizer, prefix: str = QUESTION_PREFIX.rstrip()) -> list[
        SFTExample]:
    """One example per problem with the loss on its question text (see the module docstring).

    The split into prompt and response is made on the tokens of the whole plain prompt, so the model sees
    exactly the token sequence that the plain format produces (a separate encode of the response could
    tokenize the boundary differently).
    """
    prefix_ids = tokenizer.encode(prefix, add_bos=True)
    examples = []
    for p in problems:
        text = plain_prompt(p.question).rstrip("\n")  # "Question: q\nAnswer:"
        ids = tokenizer.encode(text, add_bos=True)
        if ids[:len(prefix_ids)] == prefix_ids:
            examples.append(SFTExample(prefix_ids, ids[len(prefix_ids):]))
        else:  # the prefix merged with the question's first token: the response starts after it anyway
            examples.append(SFTExample(prefix_ids, tokenizer.encode(text[len(prefix):])))
    return examples
