"""The built-in calibration set of ``export.weights.method: gptq`` when ``calibration.path`` is not given.

Short, varied texts written for qvlc (prose, dialogue, code, numbers, tables, Chinese), plus
the tiny tokenizer's training corpus. It is small (a few thousand tokens with Qwen2's tokenizer): windows of
``seqlen`` tokens are drawn from it at seeded offsets and overlap when ``nsamples × seqlen`` exceeds it. It makes
``method: gptq`` work out of the box; a deployment should calibrate on texts like the ones it will serve
(``calibration.path``).
"""

from __future__ import annotations

from qvlc.checkpoint.build_tiny_tokenizer import CORPUS

TEXTS: tuple[str, ...] = (
    CORPUS,
    "System: You are a helpful assistant.\nUser: What is shown in this picture?\nAssistant: The photo shows a narrow street in an old town after rain. "
    "Wet cobblestones reflect the yellow light of the shop windows, a woman with a blue umbrella walks past a "
    "bakery, and two bicycles lean against a stone wall. In the background a church tower rises above the "
    "roofs, and the sky is turning orange as the sun sets.\n",
    "User: Read the receipt and tell me the total.\nAssistant: The receipt "
    "lists three items: coffee 3.20, croissant 2.80 and orange juice 4.50. The subtotal is 10.50, the tax of "
    "8% adds 0.84, so the total is 11.34. It was paid by card on 14 March 2024 at 09:42.\n",
    "def merge_intervals(intervals):\n    \"\"\"Merge overlapping [start, end] intervals.\"\"\"\n    result = []\n"
    "    for start, end in sorted(intervals):\n        if result and start <= result[-1][1]:\n"
    "            result[-1][1] = max(result[-1][1], end)\n        else:\n            result.append([start, end])\n"
    "    return result\n\n\nprint(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))  # [[1, 6], [8, 10], "
    "[15, 18]]\n",
    "| model | parameters | layers | hidden size | heads |\n|---|---|---|---|---|\n| Qwen2-VL-2B | 1.5 B "
    "(text) | 28 | 1536 | 12 |\n| Qwen2-VL-7B | 7.6 B (text) | 28 | 3584 | 28 |\n\nThe vision tower has 32 "
    "blocks of width 1280 in both sizes; a merger maps four patches to one token of the text width.\n",
    "The history of the printing press shows how a single machine can change the way people think. Before "
    "Gutenberg, books were copied by hand, slowly and expensively; afterwards, pamphlets, newspapers and "
    "textbooks spread ideas across borders within weeks. Literacy grew, scientific results could be checked "
    "by readers far away, and arguments that once reached a few scholars were read by thousands.",
    "To bake bread, mix 500 g of flour, 10 g of salt, 7 g of dried yeast and 350 ml of warm water. Knead the "
    "dough for ten minutes until it is smooth, cover it and let it rise for an hour. Shape a loaf, let it rise "
    "again for thirty minutes, then bake it at 220 °C for about 35 minutes, until it sounds hollow when tapped.",
    "今天天气很好，我们去公园散步吧。图片里有一只小猫坐在窗台上，外面下着雨。请用一句话描述这张图片的内容。"
    "这个模型可以同时理解文字和图像，并且能够回答关于图片的问题。",
    "Q: A train leaves at 14:05 and arrives at 17:50. How long is the journey?\nA: From 14:05 to 17:05 is "
    "three hours, and from 17:05 to 17:50 is 45 minutes, so the journey takes 3 hours and 45 minutes.\n"
    "Q: What is 17 × 23?\nA: 17 × 20 = 340 and 17 × 3 = 51, so 17 × 23 = 391.\n",
    "In the quiet hours before dawn the harbour belongs to the gulls. Fishing boats rock at their moorings, "
    "ropes creak, and the smell of salt and diesel hangs over the water. Then the first engine starts, a light "
    "comes on in the market hall, and the day begins: crates of ice, shouts across the quay, prices chalked on "
    "a board, and the first customers arriving with baskets on their arms.",
    "SELECT city, COUNT(*) AS orders, ROUND(AVG(total), 2) AS average\nFROM orders\nWHERE created_at >= "
    "'2024-01-01'\nGROUP BY city\nHAVING COUNT(*) > 100\nORDER BY orders DESC\nLIMIT 10;\n",
    "Photosynthesis takes place in the chloroplasts. Light energy splits water molecules, releasing oxygen, and "
    "the energy captured is stored in ATP and NADPH. In the Calvin cycle these carry the energy into the "
    "fixation of carbon dioxide, producing sugars that the plant uses to grow, to build cellulose and to store "
    "energy as starch in its roots, seeds and fruit.",
)
