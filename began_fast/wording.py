"""How the messages word a count: "1 step", "2 steps"."""


def counted(count: int, noun: str) -> str:
    """`count` and `noun`, in the plural unless the count is 1 ("1 image", "0 images"); every noun here takes an s."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
