"""Texts the embedder tests share: short ones and ones longer than the model's window."""

from __future__ import annotations

SHORT = [
    "The cat sat on the mat.",
    "How do I reset my password if I no longer have access to my email account?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "Explain the difference between a list and a tuple in Python.",
    "She hasn't decided whether she'll accept the job offer in Berlin.",
    "Die Katze schläft auf dem Sofa, während draußen der Regen fällt.",
    "Café crème, naïve façade, résumé: accents are stripped or kept?",
    "東京は日本の首都です。",
    "I love this! 😀🎉 Best purchase I've made all year.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "   Leading and trailing whitespace should not matter.   ",
    "A",
    "",
    (
        "Summarise the main arguments for and against a four-day working week, citing at least two "
        "studies, and conclude with a recommendation for a mid-sized software company."
    ),
    (
        "The mitochondria is the powerhouse of the cell, but it also plays a central role in "
        "apoptosis, calcium signalling and the regulation of cellular metabolism."
    ),
]


ESSAY = (
    "The history of the printing press begins long before Gutenberg. Woodblock printing was used "
    "in China as early as the seventh century, and movable type made of ceramic was invented by Bi "
    "Sheng around 1040. Metal movable type appeared in Korea in the thirteenth century, where the "
    "Jikji, a Buddhist text, was printed in 1377. In Europe, Johannes Gutenberg combined a screw "
    "press adapted from wine making, an oil-based ink, and a hand mould for casting type in large "
    "quantities. His Bible, completed around 1455, showed that printed books could match the beauty "
    "of manuscripts while being produced far more quickly. Within fifty years, presses operated in "
    "more than two hundred cities, and millions of volumes had been printed. The consequences were "
    "profound: literacy spread, scientific results could be reproduced exactly, vernacular languages "
    "gained standard spellings, and religious reformers used pamphlets to reach audiences that no "
    "preacher could address in person. Historians still debate how much the press caused these "
    "changes and how much it merely accelerated trends already under way, but few doubt that it "
    "transformed how knowledge was stored, copied and shared across generations. "
)


LONG = [
    ESSAY * 2,
    " ".join(SHORT[:13]) + " " + " ".join(reversed(SHORT)) + " " + ESSAY,
    "User: Can you help me plan a two-week trip through Japan in spring? I like hiking, food and "
    "old temples, and I do not want to rush. Assistant: "
    + " ".join(
        f"Day {d}: take a morning walk, visit a temple, try a local dish, and rest in the evening."
        for d in range(1, 15)
    ),
]


TEXTS = SHORT + LONG
