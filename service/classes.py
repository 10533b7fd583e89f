"""The study's eight emotions, in the order every model's output uses.

This is the only place the class list is spelled out; everything else imports it.
"""

from enum import IntEnum


class Emotion(IntEnum):
    ANGER = 0
    SURPRISE = 1
    DISGUST = 2
    FEAR = 3
    NEUTRAL = 4
    HAPPINESS = 5
    SADNESS = 6
    CONTEMPT = 7


CLASS_NAMES: tuple[str, ...] = tuple(emotion.name for emotion in Emotion)
NUM_CLASSES = len(CLASS_NAMES)


def parse_label(text: str) -> Emotion:
    """Map a legend label of any case (``anger``, ``ANGER``, `` Happiness ``) to its class."""
    try:
        return Emotion[text.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown emotion label {text!r}; expected one of {CLASS_NAMES}") from None
