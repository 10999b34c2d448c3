"""The prompts of the speculative-decoding rows (issue 18): a prompt-grounded edit and an open story."""
from __future__ import annotations

CODE_FILE = '''import math


def mean(values):
    """The arithmetic mean of a non-empty list of numbers."""
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    """The population variance of a non-empty list of numbers."""
    centre = mean(values)
    total = 0.0
    for value in values:
        total += (value - centre) ** 2
    return total / len(values)


def standard_deviation(values):
    """The population standard deviation of a non-empty list of numbers."""
    return math.sqrt(variance(values))


def normalise(values):
    """The values shifted to mean zero and scaled to unit standard deviation."""
    centre = mean(values)
    spread = standard_deviation(values)
    if spread == 0.0:
        return [0.0 for _ in values]
    return [(value - centre) / spread for value in values]


def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    out = []
    for start in range(len(values) - window + 1):
        out.append(mean(values[start:start + window]))
    return out


if __name__ == "__main__":
    data = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    print(mean(data), variance(data), standard_deviation(data))
    print(normalise(data))
    print(moving_average(data, 3))
'''

EDIT_REQUEST = ("Rewrite the following Python file with one change: rename the function `mean` to "
                "`average` everywhere. Output the whole file and nothing else.\n\n" + CODE_FILE)

STORY_REQUEST = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def chat_ids(tokenizer, request: str) -> list[int]:
    """The request as one user turn in the model's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": request}])
    return tokenizer.encode(request, add_bos=True, special=True)
