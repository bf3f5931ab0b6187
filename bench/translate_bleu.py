"""Transformer translation on Multi30k EN-DE: test_2016 BLEU (sacreBLEU, detokenized, beam search) within a budget.

    PYTHONPATH=src python bench/translate_bleu.py [--budget 3600] [--recipe multi30k-en-de] [--set k=v ...]

Target (issue 3): BLEU >= 30 within 60 minutes on the 2-core CPU (stretch 35; >= 37 on a GPU). The step count is
fitted to the budget from a measured step time (recipe's steps as a cap unless --no-cap), so a slower machine
trains fewer steps rather than overrunning.
"""

from _budget import budget_args, run

a = budget_args("multi30k-en-de", 3600)
r = run(a.recipe, a.budget, a.set, eval_share=0.1, no_cap=a.no_cap)
bleu = next((v for k, v in r.items() if k.startswith("test_bleu")), 0.0)
print(
    f"RESULT {a.recipe}: test BLEU {bleu:.2f} in {r['wall']:.0f}s "
    f"({'meets' if bleu >= 30 and r['wall'] <= a.budget * 1.05 else 'misses'} the 30 / {a.budget:.0f}s target)"
)
